#!/usr/bin/env python3
"""The agent's benchmark (issue 4), every figure next to a baseline measured in the same run.

Through a real OpenSSH sshd on loopback, with and without our ForceCommand:
  1. bulk output throughput (ssh -tt, the recorded PTY path; and ssh host cmd, no PTY),
  2. echo latency (one byte typed, the same byte back; p50/p99; also through `script` as the
     ForceCommand, the reference; `--echo-only` measures only this),
then
  3. the daemon's RSS while 20 SSH sessions stream at once,
  4. a full spool (default 1 GiB, 1 MiB chunks) drained to the backend, against the
     backend's own ingest rate for the same chunks posted directly.

Run as root (it creates the `ztnatest` user and starts sshd): bench/agent.sh [--quick]
Prints a Markdown table; nothing is asserted (goals are reported, not enforced).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import http.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = "ztnatest"


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, what, proc=None):
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                sys.exit(f"{what} exited")
            time.sleep(0.025)
    sys.exit(f"{what} did not listen on {port}")


class Env:
    def __init__(self, bin_dir, work):
        self.work = work
        # Absolute: sshd runs the ForceCommand from the test user's home directory.
        bin_dir = os.path.abspath(bin_dir)
        self.agent = os.path.join(bin_dir, "ztna-recorder")
        self.server = os.path.join(bin_dir, "ztna-recorder-server")
        self.procs = []
        os.chmod(work, 0o755)

    def admin(self, *args):
        return json.loads(sh(self.server, "--data-dir", f"{self.work}/server", "admin", *args))

    def start_backend(self):
        self.port = getattr(self, "port", None) or free_port()
        self.backend = subprocess.Popen(
            [self.server, "--data-dir", f"{self.work}/server", "serve", "--listen", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(f"{self.work}/server.log", "a"))
        wait_port(self.port, "server", self.backend)

    def stop_backend(self):
        self.backend.send_signal(signal.SIGTERM)
        self.backend.wait()

    def setup_backend(self):
        self.org = self.admin("org", "create", "--name", "bench", "--feature", "session_recording")["org_id"]
        self.user = self.admin("user", "create", "--org", self.org, "--email", "b@bench.invalid", "--role", "admin")["user_id"]
        self.admin("settings", "set", "--org", self.org, "--recording-enabled", "true")
        m = self.admin("machine", "register", "--org", self.org, "--name", "bench", "--owner", self.user)
        self.node_key = m["node_key"]
        os.makedirs(f"{self.work}/agent", exist_ok=True)
        os.chmod(f"{self.work}/agent", 0o755)
        with open(f"{self.work}/agent/node.key", "w") as f:
            f.write(self.node_key)
        os.chmod(f"{self.work}/agent/node.key", 0o600)
        self.start_backend()
        self.config = f"{self.work}/agent/config.toml"
        with open(self.config, "w") as f:
            f.write(f'server_url = "http://127.0.0.1:{self.port}"\n'
                    f'node_key_file = "{self.work}/agent/node.key"\n'
                    f'spool_dir = "{self.work}/agent/spool"\n'
                    f'socket = "{self.work}/agent/recorder.sock"\n'
                    f'spool_max_bytes = {8 << 30}\nrescan_secs = 1\nretry_max_secs = 1\n')
        os.chmod(self.config, 0o644)
        self.socket = f"{self.work}/agent/recorder.sock"

    def start_daemon(self):
        self.daemon = subprocess.Popen([self.agent, "daemon", "--config", self.config],
                                       stdout=subprocess.DEVNULL, stderr=open(f"{self.work}/daemon.log", "a"))
        for _ in range(400):
            if self.status() is not None:
                return
            time.sleep(0.025)
        sys.exit("daemon did not come up")

    def stop_daemon(self):
        self.daemon.send_signal(signal.SIGTERM)
        self.daemon.wait()

    def status(self):
        r = subprocess.run([self.agent, "status", "--json", "--config", self.config], capture_output=True, text=True)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def setup_ssh(self):
        if subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0:
            sh("useradd", "-m", "-s", "/bin/bash", USER)
        sh("usermod", "-p", "*", USER)
        os.makedirs("/run/sshd", exist_ok=True)
        d = f"{self.work}/ssh"
        os.makedirs(d)
        os.chmod(d, 0o755)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/hostkey")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/clientkey")
        shutil.copy(f"{d}/clientkey.pub", f"{d}/authorized_keys")
        os.chmod(f"{d}/authorized_keys", 0o644)
        self.sshd = {}
        # "script": util-linux `script` as the ForceCommand, writing nothing: a PTY relay and
        # no recording, the floor for any recorder that puts its own PTY between sshd's and
        # the program. "script-file": the same writing its typescript (a raw copy of the
        # output) to a file on the spool's disk. "tee": the no-PTY path's counterpart, a pipe
        # relay that also writes such a copy (no encoding, no fsync, no upload). The copies
        # are the floor for any recorder that keeps what it records on local disk first.
        copies = f"{self.work}/copies"
        os.makedirs(copies)
        os.chmod(copies, 0o1777)
        for name, force in (("plain", None), ("recorded", f"{self.agent} shell --config {self.config}"),
                            ("script", '/usr/bin/script -q -c "$SSH_ORIGINAL_COMMAND" /dev/null'),
                            ("script-file", f'/usr/bin/script -q -c "$SSH_ORIGINAL_COMMAND" {copies}/script.out'),
                            ("tee", f'/bin/sh -c "$SSH_ORIGINAL_COMMAND | tee {copies}/tee.out"')):
            port = free_port()
            conf = (f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nPidFile {d}/{name}.pid\n"
                    f"AuthorizedKeysFile {d}/authorized_keys\nUsePAM no\nStrictModes no\n"
                    f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nAllowUsers {USER}\n"
                    f"MaxStartups 100:30:200\nMaxSessions 100\nLogLevel ERROR\n")
            if force:
                conf += f"ForceCommand {force}\n"
            with open(f"{d}/{name}.conf", "w") as f:
                f.write(conf)
            p = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", f"{d}/{name}.conf"],
                                 stdout=subprocess.DEVNULL, stderr=open(f"{d}/{name}.log", "w"))
            self.procs.append(p)
            wait_port(port, f"sshd {name}", p)
            self.sshd[name] = port
        self.key = f"{d}/clientkey"

    def ssh(self, which, *args):
        return ["ssh", "-p", str(self.sshd[which]), "-i", self.key, "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                *args, f"{USER}@127.0.0.1"]

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()
        for attr in ("daemon", "backend"):
            p = getattr(self, attr, None)
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def throughput(env, which, mib, tty):
    cmd = f"head -c {mib * 3 // 4}M /dev/urandom | base64 -w 120"
    args = env.ssh(which, "-tt" if tty else "-T") + [cmd]
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL if not tty else subprocess.PIPE, stdout=subprocess.PIPE)
    n = 0
    while True:
        b = p.stdout.read1(1 << 16)
        if not b:
            break
        n += len(b)
    p.wait()
    return n / (time.perf_counter() - t0) / (1 << 20)


def echo_latency(env, which, samples):
    p = subprocess.Popen(env.ssh(which, "-tt") + ["stty raw -echo; exec cat"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    fd_in, fd_out = p.stdin.fileno(), p.stdout.fileno()
    # Wait until cat answers (the login and stty are done).
    deadline = time.time() + 20
    while time.time() < deadline:
        os.write(fd_in, b"\x01")
        import select
        r, _, _ = select.select([fd_out], [], [], 0.2)
        if r and b"\x01" in os.read(fd_out, 4096):
            break
    time.sleep(0.3)
    import select
    while select.select([fd_out], [], [], 0.1)[0]:
        os.read(fd_out, 4096)
    lat = []
    for i in range(samples):
        c = bytes([ord("a") + i % 26])
        t0 = time.perf_counter()
        os.write(fd_in, c)
        got = b""
        while c not in got:
            got += os.read(fd_out, 64)
        lat.append((time.perf_counter() - t0) * 1000)
    os.write(fd_in, b"\x04")
    p.kill()
    p.wait()
    lat.sort()
    return lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def reset_peak(pid):
    # "5" sets the process's peak resident set (VmHWM) back to its current RSS (Linux 4.0+),
    # so each phase's peak is the kernel's exact figure, not what a sampler happened to see.
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def rss_with_sessions(env, n, secs):
    """The daemon's RSS at idle, its peak while `n` sessions stream, and its peak while their
    chunks upload once they have ended (many sessions ending at once is when the most upload
    bodies are in memory); the most sessions `status` showed live at once."""
    cmd = f"end=$((SECONDS+{secs})); while [ $SECONDS -lt $end ]; do head -c 3000 /dev/urandom | base64; sleep 0.02; done"
    pid = env.daemon.pid
    idle = rss_kib(pid)
    reset_peak(pid)
    procs = [subprocess.Popen(env.ssh("recorded", "-tt") + [cmd], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    live_max = 0
    while any(p.poll() is None for p in procs):
        st = env.status()
        if st:
            live_max = max(live_max, len(st["sessions_live"]))
        time.sleep(0.2)
    peak = rss_kib(pid, "VmHWM")
    reset_peak(pid)
    while env.status()["sessions_spooled"]:
        time.sleep(0.05)
    return idle, peak, rss_kib(pid, "VmHWM"), live_max


# --- the frame protocol (src/ipc.rs), to fill the spool directly --------------------------
VERSION = 1
START, DECISION, EVENTS, END, ACK = 1, 2, 3, 4, 5


def frame(kind, payload):
    return struct.pack(">BBI", VERSION, kind, len(payload)) + payload


def read_frame(s):
    head = b""
    while len(head) < 6:
        b = s.recv(6 - len(head))
        if not b:
            raise EOFError
        head += b
    _, kind, n = struct.unpack(">BBI", head)
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return kind, body


def fill_spool(env, total_mib, sessions):
    """`sessions` sessions of 1 MiB chunks, total_mib in all, backend down."""
    line_data = "x" * (64 * 1024 - 40)
    per = total_mib // sessions
    for k in range(sessions):
        s = socket.socket(socket.AF_UNIX)
        s.connect(env.socket)
        start = {"session_type": "ssh", "header": {"version": 2, "width": 80, "height": 24},
                 "metadata": {"kind": "interactive"}}
        s.sendall(frame(START, json.dumps(start).encode()))
        kind, body = read_frame(s)
        assert kind == DECISION and json.loads(body)["mode"] == "record", body
        t = 0.0
        for _ in range(per * 16):  # 16 lines of 64 KiB = 1 MiB chunk
            t += 0.001
            s.sendall(frame(EVENTS, (json.dumps([round(t, 6), "o", line_data]) + "\n").encode()))
        s.sendall(frame(END, json.dumps({"exit_status": 0, "metadata": {}}).encode()))
        kind, _ = read_frame(s)
        assert kind == ACK
        s.close()


def spool_chunks(env):
    """Chunk files in the spool, or None once no session is left. Read from the spool itself
    (the bench runs as root): asking the daemon (`status`) 20 times a second would put a
    process start and a spool walk per poll on the daemon's side of the comparison."""
    root = f"{env.work}/agent/spool/sessions"
    n, sessions = 0, 0
    for d in os.scandir(root):
        sessions += 1
        try:
            n += sum(1 for e in os.scandir(d.path) if e.name.startswith("chunk-"))
        except FileNotFoundError:
            pass
    return n if sessions else None


def drain(env, total_mib, sessions):
    """Fills the spool with the backend down, starts the backend, waits for an empty spool.
    Returns the bytes spooled, the seconds from the backend listening to the spool empty, and
    the seconds from the first chunk the daemon got acknowledged to the spool empty (the drain
    rate proper, without the daemon's wait to notice the backend is back)."""
    env.stop_backend()
    fill_spool(env, total_mib, sessions)  # returns once the daemon acked every session's end
    spooled = env.status()["bytes_spooled"]
    before = spool_chunks(env)
    env.start_backend()
    t0 = time.perf_counter()
    first = None
    while True:
        n = spool_chunks(env)
        if n is None:
            break
        if first is None and n < before:
            first = time.perf_counter()
        time.sleep(0.02)
    end = time.perf_counter()
    return spooled, end - t0, end - (first or t0)


def ingest_baseline(env, total_mib, parallel):
    """The backend's ingest rate: the same 1 MiB chunks posted directly, `parallel` sessions
    at once, one chunk at a time each (as the daemon does), bodies built beforehand."""
    line = json.dumps([0.5, "o", "x" * (64 * 1024 - 40)]) + "\n"
    chunk = line * 16
    per = total_mib // parallel

    def post(body):
        c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=120)
        c.request("POST", "/api/session-recording-agent", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    ids = []
    for _ in range(parallel):
        st, data = post(json.dumps({"action": "start", "node_key": env.node_key, "session_type": "ssh",
                                    "header": {"version": 2, "width": 80, "height": 24}}).encode())
        assert st == 201, data
        ids.append(json.loads(data)["data"]["session_id"])
    bodies = {sid: [json.dumps({"action": "upload_chunk", "node_key": env.node_key, "session_id": sid,
                                "chunk_index": i, "chunk_data": chunk}).encode() for i in range(per)]
              for sid in ids}

    def worker(sid):
        for b in bodies[sid]:
            st, data = post(b)
            assert st == 200, data

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(sid,)) for sid in ids]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return per * parallel * len(chunk), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", f"{ROOT}/target"), "release"))
    ap.add_argument("--mib", type=int, default=200, help="bulk output per throughput run")
    ap.add_argument("--samples", type=int, default=1000, help="echo latency samples per run")
    ap.add_argument("--echo-rounds", type=int, default=3, help="interleaved echo runs per side")
    ap.add_argument("--spool-mib", type=int, default=1024)
    ap.add_argument("--drain-rounds", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--echo-only", action="store_true", help="only the echo latency rows")
    a = ap.parse_args()
    if a.quick:
        a.mib, a.samples, a.spool_mib, a.drain_rounds, a.echo_rounds = 40, 200, 128, 1, 1
    if os.geteuid() != 0:
        sys.exit("run as root (creates a user, starts sshd)")
    work = tempfile.mkdtemp(prefix="ztna-agent-bench.")
    env = Env(a.bin_dir, work)
    rows = []
    try:
        env.setup_backend()
        env.start_daemon()
        env.setup_ssh()
        if not a.echo_only:
            # RSS first, on a fresh daemon: 20 sessions streaming at once.
            idle, peak, uploading, live = rss_with_sessions(env, a.sessions, 10)
            rows.append((f"daemon RSS, MiB ({live} live sessions seen, {a.sessions} started)",
                         f"{idle / 1024:.1f} (idle)",
                         f"{peak / 1024:.1f} (peak, live); {uploading / 1024:.1f} (peak, uploading after)",
                         "goal < 20"))
            for tty in (True, False):
                runs = {w: [] for w in (("plain", "recorded", "script", "script-file") if tty
                                        else ("plain", "recorded", "tee"))}
                for _ in range(3):
                    for w in runs:
                        runs[w].append(throughput(env, w, a.mib, tty))
                        # The recorded run's upload must not overlap the next measurement.
                        while env.status()["sessions_spooled"]:
                            time.sleep(0.2)
                base, ours = statistics.median(runs["plain"]), statistics.median(runs["recorded"])
                mode = "ssh -tt (PTY)" if tty else "ssh host cmd (no PTY)"
                rows.append((f"bulk output, {mode}, MiB/s (median of 3)", f"{base:.1f}", f"{ours:.1f}",
                             f"{ours / base:.3f} (goal >= 0.90)"))
                if tty:
                    ref = statistics.median(runs["script"])
                    rows.append(("  reference: `script` as the ForceCommand (PTY relay, records nothing)",
                                 f"{base:.1f}", f"{ref:.1f}", f"{ref / base:.3f}"))
                    ref = statistics.median(runs["script-file"])
                    rows.append(("  reference: `script` writing its typescript to a file (PTY relay, a raw copy on local disk)",
                                 f"{base:.1f}", f"{ref:.1f}", f"{ref / base:.3f}"))
                else:
                    ref = statistics.median(runs["tee"])
                    rows.append(("  reference: the command piped into `tee FILE` as the ForceCommand (pipe relay, a raw copy on local disk)",
                                 f"{base:.1f}", f"{ref:.1f}", f"{ref / base:.3f}"))
        # Quiet machine for latency: let the throughput runs' uploads finish first.
        while env.status()["sessions_spooled"]:
            time.sleep(0.2)
        # Interleaved rounds, medians of their p50 and p99: one run's p99 moves 2x on this VM.
        # `script` as the ForceCommand is the reference, as for throughput: a PTY relay that
        # records nothing puts the same two extra hops (its PTY, its process) in each echo.
        sides = ("plain", "recorded", "script")
        runs = {w: [] for w in sides}
        for r in range(a.echo_rounds):
            # Each side goes first in turn, so none always follows another's session.
            for w in sides[r % 3:] + sides[:r % 3]:
                runs[w].append(echo_latency(env, w, a.samples))
        lat = {w: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
               for w, v in runs.items()}
        each = ", ".join(f"{r[1]:.3f}" for r in runs["recorded"])
        rows.append((f"echo latency p50, ms (median of {a.echo_rounds} interleaved runs of {a.samples} samples)",
                     f"{lat['plain'][0]:.3f}", f"{lat['recorded'][0]:.3f}",
                     f"+{lat['recorded'][0] - lat['plain'][0]:.3f} ms"))
        rows.append((f"echo latency p99, ms (median; recorded runs: {each})", f"{lat['plain'][1]:.3f}",
                     f"{lat['recorded'][1]:.3f}", f"+{lat['recorded'][1] - lat['plain'][1]:.3f} ms (goal <= +0.3)"))
        rows.append(("  reference: `script` as the ForceCommand, p50 / p99, ms",
                     f"{lat['plain'][0]:.3f} / {lat['plain'][1]:.3f}",
                     f"{lat['script'][0]:.3f} / {lat['script'][1]:.3f}",
                     f"+{lat['script'][0] - lat['plain'][0]:.3f} / +{lat['script'][1] - lat['plain'][1]:.3f} ms"))
        if not a.echo_only:
            # Let the sessions' uploads finish before the spool benchmark.
            while env.status()["sessions_spooled"]:
                time.sleep(0.2)
            # Drain and direct ingest interleaved, `--drain-rounds` of each: the backend's own rate
            # moves by ±25% from one run to the next on this VM.
            drains, bases, waits = [], [], []
            for _ in range(a.drain_rounds):
                spooled, secs, dsecs = drain(env, a.spool_mib, 4)
                drains.append(spooled / dsecs / (1 << 20))
                waits.append((spooled / secs / (1 << 20), secs - dsecs))
                nbytes, bsecs = ingest_baseline(env, a.spool_mib, 4)
                bases.append(nbytes / bsecs / (1 << 20))
            ours, base = statistics.median(drains), statistics.median(bases)
            each = ", ".join(f"{d:.0f}/{b:.0f}" for d, b in zip(drains, bases))
            rows.append((f"spool drain, MiB/s ({spooled / (1 << 20):.0f} MiB spooled, 1 MiB chunks, 4 sessions; "
                         f"first acknowledgement to empty spool; median of {a.drain_rounds} interleaved rounds, "
                         f"drain/ingest each: {each})",
                         f"{base:.1f} (backend ingest)", f"{ours:.1f} (daemon drain)", f"{ours / base:.3f}"))
            with_wait = statistics.median(w for w, _ in waits)
            rows.append(("spool drain including the wait for the backend to come back, MiB/s",
                         f"{base:.1f}", f"{with_wait:.1f} ({statistics.median(s for _, s in waits):.2f} s to the first acknowledgement)",
                         f"{with_wait / base:.3f}"))
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)
    print("| measure | baseline (sshd alone / backend direct) | with the agent | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
