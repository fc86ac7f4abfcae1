#!/usr/bin/env python3
"""What `upload_chunk` costs as one recording grows long: ms per upload by chunk count.

A session of hours is thousands of chunks (`chunk_max_secs` = 10 closes one every ten
seconds of output). Starts each given build of `ztna-recorder-server` on embedded defaults
(SQLite + local files, as `bench/agent_bench.py` does), starts one recording through the agent
route and uploads `--chunks` one-line chunks to it in index order, one at a time on one
keep-alive connection, and prints the mean ms per upload for each block of `--block` chunks.
A cost that grows with the block number is a cost per upload that grows with the recording.

Builds run one after the other in each round (`--rounds`), so the table shows every round.

    cargo build -p ztna-recorder-server            # or --release
    python3 bench/many_chunks.py --server old=/path/to/old/debug --server new=target/debug
"""
import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import agent_bench  # noqa: E402  (its Env starts a server and registers a machine)


def one_run(bin_dir, chunks, block):
    work = tempfile.mkdtemp(prefix="ztna-many-chunks.")
    env = agent_bench.Env(bin_dir, work)
    try:
        env.setup_backend()
        c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=120)

        def post(body):
            c.request("POST", "/api/session-recording-agent", body=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()

        st, data = post({"action": "start", "node_key": env.node_key, "session_type": "ssh",
                         "header": {"version": 2, "width": 80, "height": 24}})
        assert st == 201, data
        sid = json.loads(data)["data"]["session_id"]
        per_block = []
        for b in range(chunks // block):
            t0 = time.perf_counter()
            for k in range(b * block, (b + 1) * block):
                st, data = post({"action": "upload_chunk", "node_key": env.node_key, "session_id": sid,
                                 "chunk_index": k, "chunk_data": f'[{k}.5, "o", "line {k}\\r\\n"]\n'})
                assert st == 200, data
            per_block.append((time.perf_counter() - t0) / block * 1000)
        c.close()
        return per_block
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", action="append", required=True,
                    help="LABEL=DIR holding a ztna-recorder-server build (repeat to compare)")
    ap.add_argument("--chunks", type=int, default=4000)
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    builds = [s.split("=", 1) if "=" in s else (s, s) for s in a.server]
    blocks = a.chunks // a.block
    head = " | ".join(f"chunks {b * a.block}–{(b + 1) * a.block}" for b in range(blocks))
    print(f"| build | round | {head} |")
    print("|---|---|" + "---|" * blocks)
    for r in range(a.rounds):
        for label, d in builds:
            ms = one_run(d, a.chunks, a.block)
            print(f"| {label} | {r + 1} | " + " | ".join(f"{m:.2f} ms" for m in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
