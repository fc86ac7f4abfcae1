#!/usr/bin/env bash
# The main job on embedded defaults: builds and starts the bundled server on SQLite + local
# files in a scratch directory. (Extended to the whole agent loop as the agent lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p ztna-recorder-server
DIR=${ZTNA_QUICKSTART_DIR:-$(mktemp -d /tmp/ztna-quickstart.XXXXXX)}
echo "data dir: $DIR"
exec target/release/ztna-recorder-server serve --data-dir "$DIR"
