#!/usr/bin/env python3
"""The daemon's ingest alone: CPU per MiB that `ztna-recorder daemon` spends taking a session's
frames off its socket and spooling them (chunk files written, fsynced and renamed), with no
sshd, PTY or relay around it, so that builds of the daemon can be compared with little noise.

    cargo build --release -p ztna-recorder
    python3 bench/daemon_ingest.py --daemon base=OLD/ztna-recorder --daemon new=target/release/ztna-recorder \\
        [--mib 200] [--rate 40] [--frame-kib 32] [--rounds 4]

This script plays the recorder: one session, `Events` frames of --frame-kib KiB of 4 KiB `o`
events (base64 text with `\\r\\n`, as `head -c … /dev/urandom | base64` gives), sent at
--rate MiB/s (0: as fast as the socket takes them; the agent benchmark's PTY path runs at
about 40 MiB/s). The figure is the daemon's user+system CPU (/proc/PID/stat) from the first
frame to the session's `Ack`, per MiB. The backend is down (nothing listens at its URL), so no
upload runs in the window; builds are interleaved round by round, and each round starts a fresh
daemon on a fresh spool. `PERF=FILE` also records the daemon with `perf record -g` (slower).
"""
import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import agent_bench as ab  # noqa: E402


def cpu_secs(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def frames(mib, frame_kib):
    raw = base64.encodebytes(os.urandom(3000)).decode().replace("\n", "\r\n")[:4000]
    out, total, t = [], 0, 0.0
    while total < mib << 20:
        lines = []
        for _ in range(max(1, frame_kib // 4)):
            t += 0.0001
            lines.append(json.dumps([round(t, 6), "o", raw]) + "\n")
        p = "".join(lines).encode()
        out.append(ab.frame(ab.EVENTS, p))
        total += len(p)
    return out, total


def one(daemon, work, batch, total, args):
    agent = f"{work}/agent"
    os.makedirs(agent)
    with open(f"{agent}/node.key", "w") as f:
        f.write("ab" * 64)
    os.chmod(f"{agent}/node.key", 0o600)
    cfg = f"{agent}/config.toml"
    sock = f"{agent}/recorder.sock"
    with open(cfg, "w") as f:
        f.write(f'server_url = "http://127.0.0.1:9"\nnode_key_file = "{agent}/node.key"\n'
                f'spool_dir = "{agent}/spool"\nsocket = "{sock}"\nspool_max_bytes = {8 << 30}\n')
    d = subprocess.Popen([daemon, "daemon", "--config", cfg], stdout=subprocess.DEVNULL,
                         stderr=open(f"{work}/daemon.log", "a"))
    perf = None
    try:
        for _ in range(400):
            if subprocess.run([daemon, "status", "--json", "--config", cfg],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.025)
        else:
            sys.exit("daemon did not come up")
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        start = {"session_type": "ssh", "header": {"version": 2, "width": 80, "height": 24},
                 "metadata": {"kind": "interactive"}}
        s.sendall(ab.frame(ab.START, json.dumps(start).encode()))
        kind, body = ab.read_frame(s)
        assert kind == ab.DECISION and json.loads(body)["mode"] == "record", body
        if os.environ.get("PERF"):
            perf = subprocess.Popen(["perf", "record", "-g", "-p", str(d.pid), "-o", os.environ["PERF"]],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        gap = (args.frame_kib << 10) / (args.rate << 20) if args.rate else 0
        c0, w0 = cpu_secs(d.pid), time.monotonic()
        due = w0
        for f in batch:
            s.sendall(f)
            if gap:
                due += gap
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
        s.sendall(ab.frame(ab.END, json.dumps({"exit_status": 0, "metadata": {}}).encode()))
        kind, _ = ab.read_frame(s)
        assert kind == ab.ACK, kind
        c1, w1 = cpu_secs(d.pid), time.monotonic()
        s.close()
        mib = total / (1 << 20)
        return (c1 - c0) * 1000 / mib, mib / (w1 - w0)
    finally:
        if perf:
            perf.send_signal(2)
            perf.wait()
        d.terminate()
        d.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", action="append", required=True, help="LABEL=PATH of ztna-recorder")
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--rate", type=int, default=40, help="MiB/s; 0 = as fast as possible")
    ap.add_argument("--frame-kib", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    batch, total = frames(args.mib, args.frame_kib)
    res = {}
    for r in range(args.rounds):
        specs = args.daemon[r % len(args.daemon):] + args.daemon[: r % len(args.daemon)]
        for spec in specs:
            label, _, path = spec.rpartition("=")
            work = tempfile.mkdtemp(prefix="ztna-ingest-", dir="/var/tmp")
            try:
                ms, rate = one(os.path.abspath(path), work, batch, total, args)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            res.setdefault(label or path, []).append(ms)
            print(f"round {r + 1}, {label or path}: {ms:.2f} ms/MiB at {rate:.0f} MiB/s", file=sys.stderr, flush=True)
    print(f"{total / (1 << 20):.0f} MiB, {args.frame_kib} KiB frames at "
          f"{args.rate or 'full'} MiB/s, {args.rounds} rounds: daemon CPU ms/MiB, median (all rounds)")
    for label, v in res.items():
        print(f"- {label}: {statistics.median(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})")


if __name__ == "__main__":
    main()
