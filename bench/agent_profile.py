#!/usr/bin/env python3
"""Where the CPU of the agent's PTY path goes, process by process (issue 4).

The same `ssh -tt` bulk output as `agent_bench.py` (base64 text through a real sshd on
loopback), once through plain sshd, once with `script` as the ForceCommand (a PTY relay that
records nothing) and once through our ForceCommand, each under a system-wide
`perf record -a`. With `--no-pty`, the same without a PTY (`ssh -T`), with `tee FILE` as the
reference instead of `script`. Prints, per run, the CPU milliseconds per MiB of output that
each group of processes took (perf samples, not /proc: short-lived processes and kernel
workers included), so the recorded run's extra cost is split into the parts that pay it.
Needs `perf` and root.

    scripts/build-release.sh
    python3 bench/agent_profile.py --bin-dir target/release [--mib 100] [--rounds 2] [--no-pty]

Each round runs the three in turn; every figure is the median over rounds. The recorded run's
uploads are waited for after its profile ends (they are deferred while output streams:
src/daemon/pacing.rs), so the backend shows here only as far as it works during the run.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import agent_bench as ab  # noqa: E402

FREQ = 2000  # samples per second per CPU


def group(pid, comm, env):
    if comm == "swapper":
        return "idle"
    if pid == env.daemon.pid:
        return "daemon (ztna-recorderd)"
    if pid == env.backend.pid:
        return "backend (ztna-recorder-server)"
    if comm.startswith("kworker"):
        return "kernel workers (tty flips, writeback)"
    if comm == "ztna-pty-out":
        return "relay: ztna-recorder shell, output thread"
    # The shell's threads without a PTY (src/shell/piped.rs names them).
    if comm in ("relay", "stdin", "daemon-watch"):
        return "relay: ztna-recorder shell, piped relay threads"
    if comm.startswith("ztna"):
        return "relay: ztna-recorder shell, other threads (recorder: encoding, frames)"
    if comm in ("script", "tee"):
        return f"relay: {comm}"
    if comm in ("base64", "head", "sshd", "ssh", "sh"):
        return comm
    return "other"


def profile(env, which, mib, out, tty):
    p = subprocess.Popen(["perf", "record", "-a", "-F", str(FREQ), "-o", out],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    rate = ab.throughput(env, which, mib, tty)
    p.send_signal(2)
    p.wait()
    script = subprocess.run(["perf", "script", "-i", out, "-F", "pid,comm"],
                            capture_output=True, text=True, check=True).stdout
    counts = {}
    for line in script.splitlines():
        # "COMM PID", whatever order -F names them in; a command name may hold spaces.
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        g = group(int(parts[1]), parts[0], env)
        counts[g] = counts.get(g, 0) + 1
    os.remove(out)
    return rate, {g: n * 1000 / FREQ / mib for g, n in counts.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(ab.ROOT, "target", "release"))
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-pty", action="store_true", help="ssh -T, with `tee FILE` as the reference")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (creates a user, starts sshd, perf record -a)")
    if shutil.which("perf") is None:
        sys.exit("needs perf (Debian: linux-perf)")
    work = tempfile.mkdtemp(prefix="ztna-agent-profile.")
    env = ab.Env(a.bin_dir, work)
    tty = not a.no_pty
    ref = "script" if tty else "tee"
    runs = ("plain", ref, "recorded")
    rates = {w: [] for w in runs}
    cost = {w: [] for w in runs}
    try:
        env.setup_backend()
        env.start_daemon()
        env.setup_ssh()
        ab.throughput(env, "recorded", 20, tty)  # warm caches and the spool
        for _ in range(a.rounds):
            for w in runs:
                while env.status()["sessions_spooled"]:
                    time.sleep(0.2)
                r, c = profile(env, w, a.mib, f"{work}/perf.data", tty)
                rates[w].append(r)
                cost[w].append(c)
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)
    groups = sorted({g for w in runs for c in cost[w] for g in c},
                    key=lambda g: -statistics.median(c.get(g, 0) for c in cost["recorded"]))
    med = {w: {g: statistics.median(c.get(g, 0) for c in cost[w]) for g in groups} for w in runs}
    print(f"CPU ms per MiB of output, {'ssh -tt' if tty else 'ssh -T'}, {a.mib} MiB per run, "
          f"median of {a.rounds} rounds")
    print()
    print(f"| process | plain sshd | `{ref}` | ours | ours − `{ref}` |")
    print("|---|---|---|---|---|")
    for g in groups:
        if g == "idle":
            continue
        row = [med[w][g] for w in runs]
        if max(row) < 0.05:
            continue
        print(f"| {g} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {row[2] - row[1]:+.2f} |")
    busy = {w: sum(v for g, v in med[w].items() if g != "idle") for w in runs}
    print(f"| **all but idle** | {busy['plain']:.2f} | {busy[ref]:.2f} | {busy['recorded']:.2f} "
          f"| {busy['recorded'] - busy[ref]:+.2f} |")
    print(f"| idle | {med['plain'].get('idle', 0):.2f} | {med[ref].get('idle', 0):.2f} "
          f"| {med['recorded'].get('idle', 0):.2f} | |")
    base = statistics.median(rates["plain"])
    print(f"| MiB/s (x plain) | {base:.1f} | {statistics.median(rates[ref]):.1f} "
          f"({statistics.median(rates[ref]) / base:.3f}) | {statistics.median(rates['recorded']):.1f} "
          f"({statistics.median(rates['recorded']) / base:.3f}) | |")


if __name__ == "__main__":
    main()
