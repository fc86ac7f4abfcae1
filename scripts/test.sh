#!/usr/bin/env bash
# The test command: installs and starts everything the tests talk to, then runs them all.
#   - PostgreSQL: the one on 127.0.0.1:5432 when it answers, else a private one (initdb + pg_ctl)
#   - an S3-speaking server (moto) on a loopback port
#   - the asciinema CLI, OpenSSH's sshd and ssh client
# Missing services are installed here, never skipped: the tests fail loudly without them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/ztna-test.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "${PG_LOCAL:-}" ]; then
    runuser -u postgres -- pg_ctl -D "$PG_LOCAL" -m fast stop >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '[test.sh] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

APT_UPDATED=
apt_install() {
  [ -n "$APT_UPDATED" ] || { as_root apt-get update -qq; APT_UPDATED=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- Debian packages --------------------------------------------------------------------
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3 python3-pip python3-venv)
# the dashboard's end-to-end test: Debian's Chromium, driven from Node by playwright-core
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v npm >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then log "installing ${need[*]}"; apt_install "${need[@]}"; fi

# --- Python tools: moto (S3 server) and asciinema (the reference player/parser) ---------
PYBIN=$(command -v python3)
if ! "$PYBIN" -c 'import moto.server, asciinema' 2>/dev/null; then
  log "installing moto[server] and asciinema from PyPI"
  "$PYBIN" -m pip install -q 'moto[server]>=5,<6' 'asciinema==2.4.0' 2>&1 | grep -v 'Running pip as' || true
fi
ASCIINEMA_BIN=$(command -v asciinema || true)
[ -n "$ASCIINEMA_BIN" ] || ASCIINEMA_BIN="$("$PYBIN" -c 'import sys,os;print(os.path.join(os.path.dirname(sys.executable),"asciinema"))')"
export ZTNA_TEST_ASCIINEMA="$ASCIINEMA_BIN"
"$ZTNA_TEST_ASCIINEMA" --version >/dev/null

free_port() { "$PYBIN" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_tcp() { # host port what
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "$3 did not come up on $1:$2"; return 1
}

# --- PostgreSQL ---------------------------------------------------------------------------
PG_HOST=127.0.0.1 PG_PORT=5432
# ZTNA_TEST_PRIVATE_PG=1 forces the private one (to check this path on a machine that has one).
if [ -n "${ZTNA_TEST_PRIVATE_PG:-}" ] || ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  log "starting a private PostgreSQL"
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then apt_install postgresql; fi
  PGBIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")
  export PATH="$PGBIN:$PATH"
  PG_LOCAL="$WORK/pg"
  PG_PORT=$(free_port)
  mkdir -p "$PG_LOCAL" && chown postgres "$PG_LOCAL"
  runuser -u postgres -- initdb -D "$PG_LOCAL" -A trust -U postgres >/dev/null
  runuser -u postgres -- pg_ctl -D "$PG_LOCAL" -o "-p $PG_PORT -k $PG_LOCAL -c listen_addresses=127.0.0.1" -l "$PG_LOCAL/log" -w start >/dev/null
fi
export ZTNA_TEST_PG_URL="postgres://postgres@$PG_HOST:$PG_PORT/postgres"
wait_tcp "$PG_HOST" "$PG_PORT" PostgreSQL

# --- S3 (moto) ----------------------------------------------------------------------------
S3_PORT=$(free_port)
"$PYBIN" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
wait_tcp 127.0.0.1 "$S3_PORT" "moto S3 server"
export ZTNA_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
export ZTNA_TEST_S3_ACCESS_KEY=test ZTNA_TEST_S3_SECRET_KEY=test ZTNA_TEST_S3_REGION=us-east-1
export ZTNA_TEST_SSHD=/usr/sbin/sshd
# The tests must find every service above; none of them may skip.
export ZTNA_TEST_REQUIRE_ALL=1

log "PostgreSQL $ZTNA_TEST_PG_URL, S3 $ZTNA_TEST_S3_ENDPOINT, asciinema $ZTNA_TEST_ASCIINEMA"
cargo test --workspace --locked "$@"

# --- The dashboard end to end: the built server binary, its admin CLI and the agent route,
# --- and the embedded web UI in headless Chromium. Screenshots go to target/e2e-artifacts/.
log "dashboard end-to-end test (server/web/e2e)"
(cd server/web/e2e && npm ci --no-audit --no-fund --loglevel=error)
cargo build -p ztna-recorder-server --locked
ZTNA_SERVER_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/ztna-recorder-server" \
  ZTNA_E2E_ARTIFACTS="$ROOT/target/e2e-artifacts" CHROMIUM=/usr/bin/chromium \
  node server/web/e2e/e2e.mjs

# --- Packaging: both .debs built (release), checked, the agent's installed into a scratch root
# --- with dpkg --root; the units verified; man pages rendered; the sshd drop-in checked.
log "packaging test (packaging/test.sh)"
packaging/test.sh

# --- The README's first command, on the release build the packaging test made.
log "quickstart (scripts/quickstart.sh)"
ZTNA_QUICKSTART_DIR="$WORK/quickstart" scripts/quickstart.sh
