#!/usr/bin/env python3
"""The server's CPU per MiB uploaded: what an agent's `upload_chunk` costs the backend.

Starts each given build of `ztna-recorder-server` on embedded defaults (SQLite + local files,
as `bench/agent_bench.py` does), posts the same 1 MiB chunks of recorded PTY output to one
recording through the agent route, one at a time, and reads the server process's user+system
CPU time (`/proc/PID/stat`) before and after. The chunks are what our agent sends for bulk
output: 4 KiB `o` events of base64 text with `\\r\\n` line ends, so the body escapes them.

Builds are measured in interleaved rounds (medians), so load on the machine falls on each.

    cargo build --release -p ztna-recorder-server
    python3 bench/server_ingest_cpu.py --server old=/path/to/old/release --server new=target/release
"""
import argparse
import base64
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import agent_bench  # noqa: E402  (its Env starts a server and registers a machine)


def cpu_secs(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def chunk_text():
    random.seed(1)
    out = base64.encodebytes(random.randbytes(1 << 20)).decode().replace("\n", "\r\n")
    lines, t = [], 0.0
    for i in range(0, len(out), 4095):
        t += 0.0003
        lines.append(json.dumps([round(t, 6), "o", out[i:i + 4095]]) + "\n")
    return "".join(lines)


def one_run(bin_dir, chunk, n):
    work = tempfile.mkdtemp(prefix="ztna-ingest-bench.")
    env = agent_bench.Env(bin_dir, work)
    try:
        env.setup_backend()

        def post(body):
            c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=120)
            c.request("POST", "/api/session-recording-agent", body=body,
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            c.close()
            return r.status, data

        st, data = post(json.dumps({"action": "start", "node_key": env.node_key, "session_type": "ssh",
                                    "header": {"version": 2, "width": 80, "height": 24}}).encode())
        assert st == 201, data
        sid = json.loads(data)["data"]["session_id"]
        bodies = [json.dumps({"action": "upload_chunk", "node_key": env.node_key, "session_id": sid,
                              "chunk_index": k, "chunk_data": chunk}).encode() for k in range(n)]
        c0, t0 = cpu_secs(env.backend.pid), time.perf_counter()
        for b in bodies:
            st, data = post(b)
            assert st == 200, data
        c1, t1 = cpu_secs(env.backend.pid), time.perf_counter()
        mib = n * len(chunk) / (1 << 20)
        return (c1 - c0) / mib * 1000, mib / (t1 - t0)
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", action="append", required=True,
                    help="LABEL=DIR holding a ztna-recorder-server build (repeat to compare)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=100, help="1 MiB chunks per run")
    a = ap.parse_args()
    builds = [s.split("=", 1) if "=" in s else (s, s) for s in a.server]
    chunk = chunk_text()
    res = {label: [] for label, _ in builds}
    for r in range(a.rounds):
        for label, d in builds:
            res[label].append(one_run(d, chunk, a.chunks))
            print(f"round {r + 1} {label}: {res[label][-1][0]:.2f} CPU ms/MiB, {res[label][-1][1]:.1f} MiB/s",
                  file=sys.stderr, flush=True)
    first = statistics.median(c for c, _ in res[builds[0][0]])
    print("| build | server CPU ms per MiB uploaded (median) | x first | MiB/s, one client (median) |")
    print("|---|---|---|---|")
    for label, _ in builds:
        cpu = statistics.median(c for c, _ in res[label])
        rate = statistics.median(m for _, m in res[label])
        print(f"| {label} | {cpu:.2f} | {cpu / first:.2f}x | {rate:.1f} |")


if __name__ == "__main__":
    main()
