#!/usr/bin/env bash
# The whole loop on embedded defaults, in a scratch directory, without root:
#   1. builds and starts the bundled server (SQLite + local files),
#   2. creates an org with session recording on, an admin, and registers this machine,
#   3. runs the agent daemon with its socket and spool in the scratch directory,
#   4. records a short scripted session through `ztna-recorder shell`, the sshd ForceCommand
#      (the same path a real SSH login takes; under `script` for a PTY when available),
#   5. prints the recording as the backend lists it, and plays it back with asciinema if
#      installed.
# ZTNA_QUICKSTART_DIR=DIR keeps everything in DIR; ZTNA_QUICKSTART_KEEP=1 leaves the server
# and daemon running at the end.
set -euo pipefail
# A scratch directory named relative to where the script was started from.
case "${ZTNA_QUICKSTART_DIR:-/}" in /*) ;; *) ZTNA_QUICKSTART_DIR=$PWD/$ZTNA_QUICKSTART_DIR ;; esac
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
need() { command -v "$1" >/dev/null || { echo "quickstart: $1 is needed" >&2; exit 1; }; }
need cargo
need python3

say "building (release)"
scripts/build-release.sh --locked
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release
SERVER_BIN=$BIN/ztna-recorder-server
AGENT_BIN=$BIN/ztna-recorder

DIR=${ZTNA_QUICKSTART_DIR:-$(mktemp -d /tmp/ztna-quickstart.XXXXXX)}
mkdir -p "$DIR/server" "$DIR/agent"
echo "scratch directory: $DIR"

PIDS=()
cleanup() {
  if [ -z "${ZTNA_QUICKSTART_KEEP:-}" ]; then
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
  fi
}
trap cleanup EXIT

json() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$1"; }
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_for() { # what, command…
  local what=$1; shift
  for _ in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "quickstart: $what did not come up" >&2; exit 1
}

S=("$SERVER_BIN" --data-dir "$DIR/server")
say "creating an org, an admin and this machine"
ORG=$("${S[@]}" admin org create --name quickstart --feature session_recording | json org_id)
ADMIN=$("${S[@]}" admin user create --org "$ORG" --email admin@quickstart.invalid --role admin | json user_id)
TOKEN=$("${S[@]}" admin token --user "$ADMIN" | json token)
"${S[@]}" admin settings set --org "$ORG" --recording-enabled true >/dev/null
REG=$("${S[@]}" admin machine register --org "$ORG" --name "$(hostname)" --owner "$ADMIN")
MACHINE=$(echo "$REG" | json machine_id)
(umask 077; echo "$REG" | json node_key >"$DIR/agent/node.key")
echo "org $ORG, machine $MACHINE ($(hostname))"

PORT=$(free_port)
URL=http://127.0.0.1:$PORT
say "starting the server on $URL"
"${S[@]}" serve --listen "127.0.0.1:$PORT" >"$DIR/server.log" 2>&1 &
PIDS+=($!)
wait_for "the server" bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT"

cat >"$DIR/agent/config.toml" <<EOF
server_url = "$URL"
node_key_file = "$DIR/agent/node.key"
spool_dir = "$DIR/agent/spool"
socket = "$DIR/agent/recorder.sock"
chunk_max_secs = 2
EOF
export ZTNA_RECORDER_CONFIG=$DIR/agent/config.toml

say "starting the agent daemon (socket and spool in $DIR/agent)"
"$AGENT_BIN" daemon >"$DIR/daemon.log" 2>&1 &
PIDS+=($!)
wait_for "the daemon" "$AGENT_BIN" status

say "a scripted session through the ForceCommand (ztna-recorder shell)"
export SSH_CONNECTION="127.0.0.1 50022 127.0.0.1 22"
SESSION='echo "hello from $(hostname)"; uname -sr; for i in 1 2 3; do echo "step $i"; sleep 0.3; done'
if command -v script >/dev/null; then
  # A PTY, as `ssh -t host CMD` gives one.
  # (stdin stays open while the session runs, as a user's terminal does)
  sleep 4 | SSH_ORIGINAL_COMMAND=$SESSION script -qec "'$AGENT_BIN' shell --config '$ZTNA_RECORDER_CONFIG'" /dev/null
else
  SSH_ORIGINAL_COMMAND=$SESSION "$AGENT_BIN" shell --config "$ZTNA_RECORDER_CONFIG" </dev/null
fi
unset SSH_ORIGINAL_COMMAND

say "waiting for the upload"
list() {
  curl -fsS -X POST "$URL/api/session-recording" -H "Authorization: Bearer $TOKEN" \
    -H 'Content-Type: application/json' -d "{\"action\":\"list\",\"org_id\":\"$ORG\"}"
}
uploaded=
for _ in $(seq 1 100); do
  if list | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["recordings"]; sys.exit(0 if r and r[0]["status"]=="completed" else 1)'; then
    uploaded=1
    break
  fi
  sleep 0.2
done
"$AGENT_BIN" status
if [ -z "$uploaded" ]; then
  echo "quickstart: the session did not reach the backend in 20 s; the daemon's log:" >&2
  tail -n 20 "$DIR/daemon.log" >&2
  exit 1
fi

say "the recording as the backend lists it"
list | python3 -m json.tool

# The whole asciicast, as the backend serves it (header line, then the chunks in order).
CAST=$DIR/session.cast
SESSION_ID=$(list | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["recordings"][0]["id"])')
curl -fsS "$URL/api/session-recording/cast?org_id=$ORG&session_id=$SESSION_ID" \
  -H "Authorization: Bearer $TOKEN" -o "$CAST" 2>/dev/null ||
list | python3 -c '
import json, sys, os
rec = json.load(sys.stdin)["data"]["recordings"][0]
objects = sys.argv[1]
out = [json.dumps(rec["metadata"]["header"])]
for c in rec["metadata"].get("chunks", []):
    p = os.path.join(objects, "recordings", rec["org_id"], rec["id"], "chunk-%d.cast" % c["index"])
    out.append(open(p).read().rstrip("\n"))
open(sys.argv[2], "w").write("\n".join(out) + "\n")
' "$DIR/server/objects" "$CAST"
echo "asciicast: $CAST"
grep -q 'step 3' "$CAST" || { echo "quickstart: the recording lacks the session's output" >&2; exit 1; }
if command -v asciinema >/dev/null; then
  say "played back with asciinema"
  asciinema cat "$CAST"
fi
if [ -n "${ZTNA_QUICKSTART_KEEP:-}" ]; then
  echo "server and daemon left running: pids ${PIDS[*]}"
  echo "dashboard: $URL/  (admin token: $TOKEN)"
else
  echo "dashboard (while the server runs; ZTNA_QUICKSTART_KEEP=1 keeps it up): $URL/"
fi
