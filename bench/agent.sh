#!/usr/bin/env bash
# The agent's benchmark (issue 4): release build (as the packages are built), then bench/agent_bench.py (run as root:
# it creates the `ztnatest` user and starts two sshd on loopback). Extra args pass through,
# e.g. `bench/agent.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-release.sh --locked
exec python3 bench/agent_bench.py --bin-dir "${CARGO_TARGET_DIR:-$PWD/target}/release" "$@"
