#!/usr/bin/env python3
"""Recorder benchmark: `ztna-recorder record` against a bare PTY, util-linux `script` and the
asciinema CLI, in one interleaved run. Every tool runs inside a PTY this script owns (this
script is the user's terminal and reads it as fast as it can).

    cargo build --release -p ztna-recorder
    taskset -c 0 python3 bench/recorder_bench.py            # all processes on one CPU

Measures, per tool:
  * bulk throughput: `cat` of --mib MiB of text with colour codes and multi-byte characters
    (median of --rounds interleaved runs), and its ratio to the bare PTY;
  * CPU ms per MiB that the tool adds over the bare PTY (user+sys of the tool and everything
    it ran, from wait4, minus the bare run's);
  * peak RSS: the tool's own VmHWM (resident pages, shared ones included), sampled from
    /proc every 10 ms while it relays the bulk output (ru_maxrss is useless here: a child
    forked from this Python process inherits its high-water mark);
  * keystroke echo latency: --echo single-byte round trips through `dd bs=1` in raw mode,
    --echo-rounds interleaved runs per tool (medians of their p50 and p99);
  * start-up: spawn-to-exit wall time of recording `true` (median of --startup runs).
Each ztna-recorder build is also compared with `script` round by round (the pair's two runs
are adjacent in time, so the host's drift cancels): the median of the per-round throughput
ratios and CPU differences, their range, and in how many rounds ours was ahead.
Then one unmeasured round per tool checks that the terminal got exactly the program's bytes
and that the recording decodes back to exactly them.

Each tool writes a file that does not exist yet (removed before every run, for every tool):
on a filesystem mounted with `discard`, truncating an old recording costs milliseconds that
belong to the filesystem, not to the tool.
"""

import argparse
import fcntl
import hashlib
import json
import os
import pty
import shutil
import statistics
import struct
import sys
import tempfile
import termios
import time

COLS, ROWS = 120, 40


def make_payload(path, mib):
    """Text with SGR colour codes and 2-, 3- and 4-byte UTF-8 characters."""
    words = ["héllo", "wörld", "漢字", "日本語", "🙂", "naïve", "café", "Ωmega", "plain", "ascii"]
    lines = []
    size = 0
    i = 0
    while size < 1 << 20:
        line = "\x1b[3%dm%06d\x1b[0m %s %s \x1b[1m%s\x1b[0m %s\n" % (
            i % 8, i, words[i % 10], words[(i * 3) % 10], words[(i * 7) % 10], "-" * (i % 40))
        b = line.encode()
        lines.append(b)
        size += len(b)
        i += 1
    block = b"".join(lines)[: 1 << 20]
    # Cut on a line boundary so every MiB is whole UTF-8.
    block = block[: block.rfind(b"\n") + 1]
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
    return len(block) * mib


def spawn(argv):
    """Runs argv with a new PTY as its terminal (COLS x ROWS). Returns (pid, master fd)."""
    pid, fd = pty.fork()
    if pid == 0:
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    return pid, fd


def vm_hwm_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


DA1 = b"\x1b[c"


def answer_queries(fd, data, state):
    """Plays the terminal's part: asciinema 3 sends queries ending with Primary Device
    Attributes and waits for the answer. Returns how many leading bytes were queries."""
    if state.get("answered") or not data.startswith(b"\x1b"):
        state["answered"] = True
        return 0
    i = data.find(DA1)
    if i < 0:
        return 0
    os.write(fd, b"\x1b[?62;22c")
    state["answered"] = True
    return i + len(DA1)


def drain(fd, pid=None, digest=None, sample_hwm=False):
    """Reads the terminal until the tool's side is closed. Returns (payload bytes, peak
    VmHWM); terminal queries are answered and not counted."""
    total = 0
    hwm = 0
    next_sample = 0.0
    state = {}
    while True:
        if sample_hwm:
            now = time.perf_counter()
            if now >= next_sample:
                # The latest sample: VmHWM only grows, and the first ones may predate exec.
                hwm = vm_hwm_kib(pid) or hwm
                next_sample = now + 0.01
        try:
            b = os.read(fd, 65536)
        except OSError:
            break
        if not b:
            break
        if not state.get("answered"):
            b = b[answer_queries(fd, b, state):]
        total += len(b)
        if digest is not None:
            digest.update(b)
    return total, hwm


def fresh(path):
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def run(argv, out=None, digest=None, sample_hwm=False):
    fresh(out)
    t0 = time.perf_counter()
    pid, fd = spawn(argv)
    n, hwm = drain(fd, pid, digest, sample_hwm)
    _, status, ru = os.wait4(pid, 0)
    t = time.perf_counter() - t0
    os.close(fd)
    return {
        "secs": t,
        "bytes": n,
        "cpu": ru.ru_utime + ru.ru_stime,
        "maxrss": ru.ru_maxrss,
        "hwm": hwm,
        "status": os.waitstatus_to_exitcode(status),
    }


def echo_latency(argv, n):
    pid, fd = spawn(argv)
    buf = b""
    state = {}
    while b"R" not in buf:
        b = os.read(fd, 4096)
        buf += b[answer_queries(fd, b, state):]
    lat = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        os.write(fd, b"x")
        got = os.read(fd, 64)
        lat.append(time.perf_counter_ns() - t0)
        assert got == b"x", got
    drain(fd)
    os.waitpid(pid, 0)
    os.close(fd)
    lat.sort()
    return lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000


def startup(argv, out):
    fresh(out)
    t0 = time.perf_counter()
    pid, fd = spawn(argv)
    drain(fd)
    os.waitpid(pid, 0)
    t = time.perf_counter() - t0
    os.close(fd)
    return t


def cast_output(path):
    out = []
    with open(path, encoding="utf-8") as f:
        header = json.loads(f.readline())
        assert header["version"] == 2, header
        for line in f:
            t, code, data = json.loads(line)
            if code == "o":  # asciinema 3 adds an "x" (exit status) event
                out.append(data)
    return "".join(out).encode("utf-8")


def script_output(path):
    with open(path, "rb") as f:
        data = f.read()
    start = data.index(b"\n") + 1
    end = data.rindex(b"\nScript done")
    return data[start:end]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recorder", action="append", default=None,
                    help="ztna-recorder binary; repeat as LABEL=PATH to compare builds in one run")
    ap.add_argument("--asciinema", action="append", default=None,
                    help="asciinema CLI(s) to compare (default: asciinema on PATH)")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--echo", type=int, default=3000)
    ap.add_argument("--echo-rounds", type=int, default=5,
                    help="interleaved echo runs per tool; the table gives the median p50 and p99")
    ap.add_argument("--startup", type=int, default=40)
    ap.add_argument("--big-gib", type=float, default=0,
                    help="also record this many GiB with ztna-recorder and report its peak RSS")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="ztna-bench-")
    payload = os.path.join(work, "payload.txt")
    total = make_payload(payload, args.mib)
    mib = total / (1 << 20)

    def cmd_for(tool, cmd):
        out = os.path.join(work, tool["name"] + tool["ext"])
        return tool["argv"](cmd, out), out

    tools = [{"name": "bare PTY", "ext": "", "argv": lambda c, o: ["sh", "-c", c]},
             {"name": "script", "ext": ".typescript", "argv": lambda c, o: ["script", "-q", "-c", c, o]}]
    for a in args.asciinema or [shutil.which("asciinema")]:
        if not a:
            continue
        ver = os.popen("'%s' --version" % a).read().strip()
        # asciinema 3 writes asciicast v3 unless told otherwise.
        fmt = ["-f", "asciicast-v2"] if ver.startswith("asciinema 3") else []
        tools.append({"name": ver or a, "ext": ".cast",
                      "argv": (lambda a, f: lambda c, o: [a, "rec", "-q", "--overwrite"] + f + ["-c", c, o])(a, fmt)})
    for spec in args.recorder or ["target/release/ztna-recorder"]:
        label, _, path = spec.rpartition("=")
        rec = os.path.abspath(path)
        tools.append({"name": "ztna-recorder" + (" " + label if label else ""), "ext": ".cast",
                      "argv": (lambda rec: lambda c, o: [rec, "record", "-q", "--overwrite", "-c", c, o])(rec)})

    bulk = "stty -opost; exec cat '%s'" % payload
    echo = "stty raw -echo; printf R; exec dd bs=1 count=%d status=none" % args.echo

    res = {t["name"]: {"secs": [], "cpu": [], "hwm": [], "startup": []} for t in tools}
    print("payload %.0f MiB, %d rounds, %d echoes x %d rounds, %d start-ups; affinity %s" % (
        mib, args.rounds, args.echo, args.echo_rounds, args.startup, sorted(os.sched_getaffinity(0))),
        file=sys.stderr)
    for r in range(args.rounds):
        order = tools[r % len(tools):] + tools[: r % len(tools)]
        for t in order:
            argv, out = cmd_for(t, bulk)
            x = run(argv, out, sample_hwm=True)
            assert x["bytes"] == total, (t["name"], x["bytes"], total)
            res[t["name"]]["secs"].append(x["secs"])
            res[t["name"]]["cpu"].append(x["cpu"])
            res[t["name"]]["hwm"].append(x["hwm"])
    for i in range(args.startup):
        for t in tools:
            argv, out = cmd_for(t, "true")
            res[t["name"]]["startup"].append(startup(argv, out))
    # One echo run per tool said little: the same tool's p50 moved 2x between runs on one
    # VM. Interleaved rounds, medians of each round's p50 and p99.
    echoes = {t["name"]: [] for t in tools}
    for r in range(args.echo_rounds):
        order = tools[r % len(tools):] + tools[: r % len(tools)]
        for t in order:
            argv, _ = cmd_for(t, echo)
            echoes[t["name"]].append(echo_latency(argv, args.echo))
    for name, runs in echoes.items():
        res[name]["echo"] = (statistics.median(p50 for p50, _ in runs),
                             statistics.median(p99 for _, p99 in runs))

    # Unmeasured: the terminal got the exact bytes, the recording decodes to them.
    with open(payload, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    for t in tools:
        argv, out = cmd_for(t, bulk)
        d = hashlib.sha256()
        run(argv, out, digest=d)
        ok = d.hexdigest() == want
        if t["ext"] == ".cast":
            ok = ok and hashlib.sha256(cast_output(out)).hexdigest() == want
        elif t["ext"] == ".typescript":
            ok = ok and hashlib.sha256(script_output(out)).hexdigest() == want
        res[t["name"]]["verified"] = ok

    bare = res["bare PTY"]
    bare_secs = statistics.median(bare["secs"])
    bare_cpu = statistics.median(bare["cpu"])
    print("| tool | MiB/s | x bare | CPU ms/MiB added | peak RSS | echo p50 | echo p99 | start-up | output verified |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in tools:
        x = res[t["name"]]
        secs = statistics.median(x["secs"])
        cpu = statistics.median(x["cpu"])
        p50, p99 = x["echo"]
        print("| %s | %.0f | %.2fx | %s | %.1f MiB | %.0f µs | %.0f µs | %.1f ms | %s |" % (
            t["name"], mib / secs, bare_secs / secs,
            "-" if x is bare else "%.2f" % ((cpu - bare_cpu) * 1000 / mib),
            max(x["hwm"]) / 1024,
            p50, p99, statistics.median(x["startup"]) * 1000,
            "yes" if x["verified"] else "NO"))

    # Round by round against `script`: its run and ours in one round are minutes apart at
    # most, so the host's drift (the bare PTY's rate moved 2x between runs on one VM) cancels
    # out of each pair; the medians above may still come from different rounds.
    sc = res.get("script")
    paired = [t for t in tools if t["name"].startswith("ztna-recorder")]
    if sc and paired:
        print("\nRound by round against `script` (throughput: script's time / ours, above 1 = "
              "ours faster; CPU: ours - script's, ms/MiB):")
        for t in paired:
            x = res[t["name"]]
            speed = [a / b for a, b in zip(sc["secs"], x["secs"])]
            cpu = [(b - a) * 1000 / mib for a, b in zip(sc["cpu"], x["cpu"])]
            print("- %s: throughput %.3f (%.3f–%.3f), ahead in %d of %d rounds; "
                  "CPU %+.2f (%+.2f to %+.2f), at or below in %d of %d" % (
                      t["name"], statistics.median(speed), min(speed), max(speed),
                      sum(v > 1 for v in speed), len(speed),
                      statistics.median(cpu), min(cpu), max(cpu), sum(v <= 0 for v in cpu), len(cpu)))

    if args.big_gib:
        n = int(args.big_gib * 1024 / args.mib)
        big = "stty -opost; for i in $(seq %d); do cat '%s'; done" % (n, payload)
        argv = [rec, "record", "-q", "--overwrite", "-c", big, os.path.join(work, "big.cast")]
        x = run(argv, sample_hwm=True)
        print("\nztna-recorder, %.1f GiB of output: %.0f MiB/s, peak RSS (VmHWM) %.1f MiB" % (
            x["bytes"] / (1 << 30), x["bytes"] / (1 << 20) / x["secs"], x["hwm"] / 1024))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
