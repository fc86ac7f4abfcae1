#!/usr/bin/env bash
# The server load benchmark (release build): upload_chunk throughput/latency and list latency
# at 100,000 recordings, on SQLite + local files and on PostgreSQL + S3 (moto on loopback).
#   bench/server-load.sh [--backend sqlite|pg|both] [--seconds N] [--recordings N]
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(command -v python3)
"$PYBIN" -c 'import moto.server' 2>/dev/null || "$PYBIN" -m pip install -q 'moto[server]>=5,<6'
PORT=$("$PYBIN" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
"$PYBIN" -m moto.server -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
export ZTNA_TEST_PG_URL=${ZTNA_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export ZTNA_TEST_S3_ENDPOINT=http://127.0.0.1:$PORT ZTNA_TEST_S3_ACCESS_KEY=test \
  ZTNA_TEST_S3_SECRET_KEY=test ZTNA_TEST_S3_REGION=us-east-1
cargo bench -p ztna-recorder-server --bench server_load -- "$@"
