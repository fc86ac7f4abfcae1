#!/usr/bin/env bash
# The packaging test (scripts/test.sh runs it): builds both .deb (and .rpm) files and checks them
#   - their file lists and modes (dpkg-deb -c, rpm -qp) and control data (conffiles, depends,
#     maintainer scripts / scriptlets),
#   - `dpkg -i` of the agent package into a scratch root (dpkg --root, maintainer scripts run
#     chrootless with DPKG_ROOT): every file in place with its mode, the conffile registered,
#     the unit enabled (and not started), the spool directory created by its tmpfiles entry;
#     then `dpkg -P` removes it all,
#   - `systemd-analyze verify` of both units against the packaged binaries, and
#     `systemd-analyze security --offline=true` exposure <= 2.0 for both,
#   - every generated man page renders with `man -l` without a warning,
#   - the completions are accepted by bash, zsh and fish (syntax),
#   - the sshd drop-in: `sshd -t` accepts it, it forces the recorder for a user, and the
#     break-glass Match block (uncommented) exempts that account.
# Installs what it needs (cargo-deb, cargo-generate-rpm, rpm, man-db, zsh, fish) when missing;
# never skips a check.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/ztna-pkg-test.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
FAILS=0
log() { printf '[packaging-test] %s\n' "$*" >&2; }
fail() { printf '[packaging-test] FAIL: %s\n' "$*" >&2; FAILS=$((FAILS + 1)); }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- tools -------------------------------------------------------------------------------
need=()
command -v man >/dev/null || need+=(man-db)
command -v groff >/dev/null || need+=(groff-base)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v deb-systemd-helper >/dev/null || need+=(init-system-helpers)
command -v rpm >/dev/null || need+=(rpm)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v cargo-deb >/dev/null; then
  log "installing cargo-deb (compiles for a few minutes)"
  cargo install cargo-deb --locked --quiet
fi
if ! command -v cargo-generate-rpm >/dev/null; then
  log "installing cargo-generate-rpm (compiles for a few minutes)"
  cargo install cargo-generate-rpm --locked --quiet
fi

# --- build -------------------------------------------------------------------------------
mapfile -t DEBS < <(PACKAGING_RPM=1 packaging/build.sh)
AGENT_DEB=${DEBS[0]} SERVER_DEB=${DEBS[1]} AGENT_RPM=${DEBS[2]} SERVER_RPM=${DEBS[3]}
log "built $(basename "$AGENT_DEB") ($(du -k "$AGENT_DEB" | cut -f1) KiB), $(basename "$SERVER_DEB") ($(du -k "$SERVER_DEB" | cut -f1) KiB)"
log "built $(basename "$AGENT_RPM") ($(du -k "$AGENT_RPM" | cut -f1) KiB), $(basename "$SERVER_RPM") ($(du -k "$SERVER_RPM" | cut -f1) KiB)"

# --- file lists --------------------------------------------------------------------------
# expect_entry LISTING MODE PATH: the `dpkg-deb -c` listing has PATH with MODE (ls -l style).
expect_entry() {
  local listing=$1 mode=$2 path=$3
  if ! awk -v m="$mode" -v p="./$path" '$1 == m && $6 == p { found = 1 } END { exit !found }' "$listing"; then
    fail "$(basename "$listing" .list): no $mode ./$path"
  fi
}
dpkg-deb -c "$AGENT_DEB" >"$WORK/agent.list"
dpkg-deb -c "$SERVER_DEB" >"$WORK/server.list"
for f in \
  "-rwxr-xr-x usr/bin/ztna-recorder" \
  "-rwxr-xr-x usr/libexec/ztna-recorder/ztna-recorderd" \
  "-rw-r--r-- etc/ztna-recorder/config.toml" \
  "-rw-r--r-- usr/lib/systemd/system/ztna-recorder.service" \
  "-rw-r--r-- usr/lib/tmpfiles.d/ztna-recorder.conf" \
  "-rw-r--r-- usr/share/ztna-recorder/sshd_config.d/50-ztna-recorder.conf" \
  "-rw-r--r-- usr/share/man/man1/ztna-recorder.1.gz" \
  "-rw-r--r-- usr/share/man/man1/ztna-recorder-shell.1.gz" \
  "-rw-r--r-- usr/share/man/man1/ztna-recorder-config-check.1.gz" \
  "-rw-r--r-- usr/share/bash-completion/completions/ztna-recorder" \
  "-rw-r--r-- usr/share/zsh/vendor-completions/_ztna-recorder" \
  "-rw-r--r-- usr/share/fish/vendor_completions.d/ztna-recorder.fish" \
  "-rw-r--r-- usr/share/doc/ztna-recorder/copyright"; do
  expect_entry "$WORK/agent.list" ${f% *} ${f#* }
done
for f in \
  "-rwxr-xr-x usr/bin/ztna-recorder-server" \
  "-rw-r----- etc/ztna-recorder-server/env" \
  "-rw-r--r-- usr/lib/systemd/system/ztna-recorder-server.service" \
  "-rw-r--r-- usr/lib/sysusers.d/ztna-recorder-server.conf" \
  "-rw-r--r-- usr/share/man/man1/ztna-recorder-server.1.gz" \
  "-rw-r--r-- usr/share/man/man1/ztna-recorder-server-admin-machine-register.1.gz" \
  "-rw-r--r-- usr/share/bash-completion/completions/ztna-recorder-server" \
  "-rw-r--r-- usr/share/zsh/vendor-completions/_ztna-recorder-server" \
  "-rw-r--r-- usr/share/fish/vendor_completions.d/ztna-recorder-server.fish"; do
  expect_entry "$WORK/server.list" ${f% *} ${f#* }
done
# Nothing may land in sshd's configuration: the drop-in is the administrator's to copy.
if grep -q '\./etc/ssh' "$WORK/agent.list" "$WORK/server.list"; then fail "a package ships a file under /etc/ssh"; fi
# The hidden subcommands stay out of the man pages.
if grep -q -- '-man\.1\.gz\|-completions\.1\.gz' "$WORK/agent.list" "$WORK/server.list"; then fail "hidden subcommands have man pages"; fi

dpkg-deb -f "$AGENT_DEB" Depends | grep -e libc6 >/dev/null || fail "agent: Depends lacks libc6"
[ "$(dpkg-deb -I "$AGENT_DEB" conffiles)" = /etc/ztna-recorder/config.toml ] || fail "agent: conffiles is not exactly /etc/ztna-recorder/config.toml"
[ "$(dpkg-deb -I "$SERVER_DEB" conffiles)" = /etc/ztna-recorder-server/env ] || fail "server: conffiles is not exactly /etc/ztna-recorder-server/env"
for deb in "$AGENT_DEB" "$SERVER_DEB"; do
  for s in preinst postinst prerm postrm; do
    if dpkg-deb -I "$deb" "$s" >"$WORK/$s" 2>/dev/null; then
      sh -n "$WORK/$s" || fail "$(basename "$deb"): $s is not valid sh"
      # Scripts may read sshd's configuration (prerm does), never write it.
      if grep -nE '(cp|mv|rm|ln|install|tee|sed -i|>>?)[^#]*(/etc/ssh|sshd_config)' "$WORK/$s"; then
        fail "$(basename "$deb"): $s writes sshd's configuration"
      fi
    fi
  done
done
dpkg-deb -I "$AGENT_DEB" postinst | grep -e 'deb-systemd-helper enable ztna-recorder.service' >/dev/null || fail "agent: postinst does not enable the unit"
if dpkg-deb -I "$AGENT_DEB" postinst | grep -e 'deb-systemd-invoke start' >/dev/null; then fail "agent: postinst starts the unreconfigured daemon"; fi
dpkg-deb -I "$SERVER_DEB" postinst | grep -e 'systemd-sysusers' >/dev/null || fail "server: postinst does not create the system user"
dpkg-deb -I "$SERVER_DEB" postinst | grep -e 'deb-systemd-helper enable ztna-recorder-server.service' >/dev/null || fail "server: postinst does not enable the unit"

# --- the .rpm files: file lists with modes, config files, scriptlets ----------------------
rpm_files() { rpm -qp --qf '[%{FILEMODES:perms} %{FILENAMES}\n]' "$1"; }
rpm_files "$AGENT_RPM" >"$WORK/agent-rpm.list"
rpm_files "$SERVER_RPM" >"$WORK/server-rpm.list"
for f in \
  "-rwxr-xr-x /usr/bin/ztna-recorder" \
  "-rwxr-xr-x /usr/libexec/ztna-recorder/ztna-recorderd" \
  "-rw-r--r-- /etc/ztna-recorder/config.toml" \
  "-rw-r--r-- /usr/lib/systemd/system/ztna-recorder.service" \
  "-rw-r--r-- /usr/lib/tmpfiles.d/ztna-recorder.conf" \
  "-rw-r--r-- /usr/share/ztna-recorder/sshd_config.d/50-ztna-recorder.conf" \
  "-rw-r--r-- /usr/share/man/man1/ztna-recorder-config-check.1.gz" \
  "-rw-r--r-- /usr/share/bash-completion/completions/ztna-recorder" \
  "-rw-r--r-- /usr/share/zsh/site-functions/_ztna-recorder" \
  "-rw-r--r-- /usr/share/fish/vendor_completions.d/ztna-recorder.fish"; do
  grep -qxF -- "$f" "$WORK/agent-rpm.list" || fail "agent rpm: no $f"
done
for f in \
  "-rwxr-xr-x /usr/bin/ztna-recorder-server" \
  "-rw-r----- /etc/ztna-recorder-server/env" \
  "-rw-r--r-- /usr/lib/systemd/system/ztna-recorder-server.service" \
  "-rw-r--r-- /usr/share/man/man1/ztna-recorder-server.1.gz"; do
  grep -qxF -- "$f" "$WORK/server-rpm.list" || fail "server rpm: no $f"
done
[ "$(rpm -qcp "$AGENT_RPM")" = /etc/ztna-recorder/config.toml ] || fail "agent rpm: config files are not exactly /etc/ztna-recorder/config.toml"
[ "$(rpm -qcp "$SERVER_RPM")" = /etc/ztna-recorder-server/env ] || fail "server rpm: config files are not exactly /etc/ztna-recorder-server/env"
rpm -qp --scripts "$AGENT_RPM" >"$WORK/agent-rpm.scripts"
grep -qF 'systemctl enable ztna-recorder.service' "$WORK/agent-rpm.scripts" || fail "agent rpm: %post does not enable the unit"
grep -qF 'would lock those SSH users out' "$WORK/agent-rpm.scripts" || fail "agent rpm: %preun has no ForceCommand guard"
if grep -nE '(cp|mv|rm|ln|install|tee|sed -i|>>?)[^#]*(/etc/ssh|sshd_config)' "$WORK/agent-rpm.scripts"; then fail "agent rpm: a scriptlet writes sshd's configuration"; fi
rpm -qp --scripts "$SERVER_RPM" | grep -F 'useradd -r' >/dev/null || fail "server rpm: %pre does not create the system user"

# --- dpkg -i into a scratch root ---------------------------------------------------------
R="$WORK/root"
mkdir -p "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/updates" "$R/var/lib/dpkg/triggers" "$R/etc/systemd/system"
: >"$R/var/lib/dpkg/status"
: >"$R/var/lib/dpkg/available"
DPKG=(dpkg --root="$R" --force-script-chrootless --force-depends --force-not-root)
# An sshd configuration that installing, removing and purging must leave byte for byte.
mkdir -p "$R/etc/ssh/sshd_config.d"
printf 'Include /etc/ssh/sshd_config.d/*.conf\nPasswordAuthentication no\n' >"$R/etc/ssh/sshd_config"
sshd_sum() { (cd "$R/etc/ssh" && find . -type f -exec sha256sum {} + | sort); }
SSHD_BEFORE=$(sshd_sum)
# Maintainer scripts run on this machine with DPKG_ROOT=$R; deb-systemd-helper honours it.
"${DPKG[@]}" -i "$AGENT_DEB" >"$WORK/dpkg-i.log" 2>&1 || { cat "$WORK/dpkg-i.log" >&2; fail "dpkg -i into the scratch root"; }
[ "$(dpkg-query --admindir="$R/var/lib/dpkg" -W -f '${Status}' ztna-recorder)" = "install ok installed" ] \
  || fail "dpkg does not list ztna-recorder as installed"
# check_file PATH MODE
check_file() {
  if [ ! -e "$R/$1" ]; then fail "scratch root: /$1 missing"; return; fi
  local m; m=$(stat -c '%a %U' "$R/$1")
  [ "$m" = "$2 root" ] || fail "scratch root: /$1 is $m, expected $2 root"
}
check_file usr/bin/ztna-recorder 755
check_file usr/libexec/ztna-recorder/ztna-recorderd 755
check_file etc/ztna-recorder/config.toml 644
check_file usr/lib/systemd/system/ztna-recorder.service 644
check_file usr/lib/tmpfiles.d/ztna-recorder.conf 644
check_file usr/share/ztna-recorder/sshd_config.d/50-ztna-recorder.conf 644
check_file usr/share/man/man1/ztna-recorder.1.gz 644
check_file usr/share/bash-completion/completions/ztna-recorder 644
check_file usr/share/zsh/vendor-completions/_ztna-recorder 644
check_file usr/share/fish/vendor_completions.d/ztna-recorder.fish 644
[ -L "$R/etc/systemd/system/multi-user.target.wants/ztna-recorder.service" ] \
  || fail "postinst did not enable ztna-recorder.service (no multi-user.target.wants link)"
[ "$(sshd_sum)" = "$SSHD_BEFORE" ] || fail "installing changed /etc/ssh"
dpkg-query --admindir="$R/var/lib/dpkg" -W -f '${Conffiles}' ztna-recorder | grep -e '/etc/ztna-recorder/config.toml' >/dev/null \
  || fail "/etc/ztna-recorder/config.toml is not registered as a conffile"
"$R/usr/bin/ztna-recorder" --version | grep -e "^ztna-recorder " >/dev/null || fail "the installed binary does not run"
# The spool: what the tmpfiles entry creates at boot (and postinst creates under systemd).
systemd-tmpfiles --root="$R" --create ztna-recorder.conf 2>"$WORK/tmpfiles.err" || { cat "$WORK/tmpfiles.err" >&2; fail "systemd-tmpfiles --create"; }
check_file var/lib/ztna-recorder 700
check_file var/lib/ztna-recorder/spool 700
# The config as shipped parses, and `config check` names the missing server_url.
if ZTNA_RECORDER_CONFIG="$R/etc/ztna-recorder/config.toml" "$R/usr/bin/ztna-recorder" config check --offline >"$WORK/check.out" 2>&1; then
  fail "config check passes on the unedited example config"
fi
grep -q 'server_url is not set' "$WORK/check.out" || { cat "$WORK/check.out" >&2; fail "config check on the example config does not name server_url"; }
grep -q 'unknown key' "$WORK/check.out" && fail "the example config has unknown keys: $(cat "$WORK/check.out")"
# Shipped set, not commented out: without it one user can fill the whole spool.
grep -q '^spool_max_bytes_per_user = [0-9]' "$R/etc/ztna-recorder/config.toml" \
  || fail "the shipped config sets no spool_max_bytes_per_user"
# `shell` runs as the user who logs in and must read the installed config: a user's login
# on the shipped config (enforce off, no daemon yet) runs, unrecorded. A throwaway user with a
# real shell (`nobody`'s is nologin, which `shell` would run).
chmod 755 "$WORK"
LOGIN_USER=ztna-pkg-login
if ! id -u "$LOGIN_USER" >/dev/null 2>&1; then
  as_root useradd --system --user-group --no-create-home --shell /bin/sh "$LOGIN_USER"
  trap 'rm -rf "$WORK"; as_root userdel "$LOGIN_USER" 2>/dev/null || true' EXIT
fi
out=$(cd / && as_root setpriv --reuid="$LOGIN_USER" --regid="$(id -g "$LOGIN_USER")" --clear-groups env SSH_ORIGINAL_COMMAND='echo login-ok' \
  ZTNA_RECORDER_CONFIG="$R/etc/ztna-recorder/config.toml" ZTNA_RECORDER_SOCKET="$WORK/no-daemon.sock" \
  "$R/usr/bin/ztna-recorder" shell 2>"$WORK/login.err") || true
[ "$out" = login-ok ] || fail "a user's session on the installed config did not run: $out $(cat "$WORK/login.err")"
# Uncommenting every example key must give a valid config (keys and types as the agent reads them).
sed -E 's/^#([a-z_]+ = )/\1/' "$R/etc/ztna-recorder/config.toml" >"$WORK/all-keys.toml"
echo "$(printf 'ab%.0s' $(seq 64))" >"$WORK/node-key"
sed -i "s|^node_key_file = .*|node_key_file = \"$WORK/node-key\"|" "$WORK/all-keys.toml"
"$R/usr/bin/ztna-recorder" config check --offline --config "$WORK/all-keys.toml" >"$WORK/check.out" 2>&1 \
  || { cat "$WORK/check.out" >&2; fail "the example config with every key uncommented is not valid"; }
grep -q 'unknown key' "$WORK/check.out" && fail "example config key unknown to the agent: $(cat "$WORK/check.out")"

# --- units: verify and security, against the packaged binaries ---------------------------
dpkg-deb -x "$SERVER_DEB" "$R"
# verify resolves dependencies (sysinit.target…) under --root: give it this machine's units,
# without overwriting ours. It checks ExecStart= against the packaged binaries in $R and
# Documentation=man: against the packaged man pages (MANPATH).
cp -rn /usr/lib/systemd/system/. "$R/usr/lib/systemd/system/"
for unit in ztna-recorder.service ztna-recorder-server.service; do
  if ! MANPATH="$R/usr/share/man" systemd-analyze verify --root="$R" "$R/usr/lib/systemd/system/$unit" >"$WORK/verify.out" 2>&1; then
    cat "$WORK/verify.out" >&2; fail "systemd-analyze verify $unit"
  elif [ -s "$WORK/verify.out" ]; then
    cat "$WORK/verify.out" >&2; fail "systemd-analyze verify $unit printed warnings"
  fi
  systemd-analyze security --offline=true --root="$R" "$R/usr/lib/systemd/system/$unit" >"$WORK/security.out" 2>&1 || true
  score=$(sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p' "$WORK/security.out")
  if [ -z "$score" ]; then cat "$WORK/security.out" >&2; fail "no exposure score for $unit"; continue; fi
  log "$unit: systemd-analyze security exposure $score"
  awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || fail "$unit: exposure $score > 2.0"
done

# --- man pages render, completions parse -------------------------------------------------
pages=0
for page in "$R"/usr/share/man/man1/*.1.gz; do
  pages=$((pages + 1))
  out=$(MANWIDTH=100 man --warnings -l "$page" 2>&1 >"$WORK/page.txt") || fail "man -l $(basename "$page") failed"
  [ -z "$out" ] || fail "man -l $(basename "$page"): $out"
  name=$(basename "$page" .1.gz)
  grep -q "^NAME" "$WORK/page.txt" || fail "$name: rendered page has no NAME section"
done
[ "$pages" -ge 15 ] || fail "only $pages man pages in the two packages"
log "$pages man pages render"
bash -n "$R/usr/share/bash-completion/completions/ztna-recorder" || fail "bash completion syntax"
bash -c "source '$R/usr/share/bash-completion/completions/ztna-recorder-server'; complete -p ztna-recorder-server" >/dev/null || fail "bash completion does not register"
zsh -n "$R/usr/share/zsh/vendor-completions/_ztna-recorder" || fail "zsh completion syntax"
fish --no-execute "$R/usr/share/fish/vendor_completions.d/ztna-recorder.fish" || fail "fish completion syntax"

# --- the sshd drop-in --------------------------------------------------------------------
S="$WORK/sshd"
mkdir -p "$S/sshd_config.d"
ssh-keygen -q -t ed25519 -N '' -f "$S/host_key" </dev/null
cp "$R/usr/share/ztna-recorder/sshd_config.d/50-ztna-recorder.conf" "$S/sshd_config.d/"
printf 'Include %s/sshd_config.d/*.conf\nHostKey %s/host_key\nMaxAuthTries 4\nX11Forwarding yes\n' "$S" "$S" >"$S/sshd_config"
# sshd's effective settings for a login by $1 (captured first: with pipefail, `grep -q`
# closing the pipe early would fail the pipeline).
sshd_T() { local out; out=$(/usr/sbin/sshd -T -f "$S/sshd_config" -C "user=$1,host=h,addr=192.0.2.1"); printf '%s\n' "$out"; }
/usr/sbin/sshd -t -f "$S/sshd_config" || fail "sshd -t rejects the drop-in"
sshd_T alice | grep -xe 'forcecommand /usr/bin/ztna-recorder shell' >/dev/null \
  || fail "the drop-in does not force the recorder"
# Forwarding would carry unrecorded traffic: off, even though sshd_config says yes for X11.
for k in allowagentforwarding allowtcpforwarding allowstreamlocalforwarding x11forwarding permittunnel; do
  sshd_T alice | grep -xe "$k no" >/dev/null || fail "the drop-in leaves $k on"
done
# The shell sshd runs the recorder through must run nothing of the user's first (see the drop-in).
for kv in SHLVL=1 BASH_ENV= LD_PRELOAD=; do
  sshd_T alice | grep -xe "setenv $kv" >/dev/null || fail "the drop-in does not set $kv"
done
sed -i -E 's/^#(Match User )breakglass/\1root/; s/^#(    ForceCommand none)/\1/' "$S/sshd_config.d/50-ztna-recorder.conf"
/usr/sbin/sshd -t -f "$S/sshd_config" || fail "sshd -t rejects the drop-in with the break-glass block"
sshd_T root | grep -xe 'forcecommand none' >/dev/null \
  || fail "the break-glass Match block does not exempt its account"
sshd_T alice | grep -xe 'forcecommand /usr/bin/ztna-recorder shell' >/dev/null \
  || fail "the break-glass block exempts everyone"
# The Match block ends with the drop-in: sshd_config's own settings stay global.
sshd_T alice | grep -xe 'maxauthtries 4' >/dev/null \
  || fail "the drop-in's Match block swallows the main sshd_config"

# --- remove and purge --------------------------------------------------------------------
rm -rf "$R/var/lib/ztna-recorder"
# While sshd forces the recorder, removal is refused (it would lock every user out).
cp "$R/usr/share/ztna-recorder/sshd_config.d/50-ztna-recorder.conf" "$R/etc/ssh/sshd_config.d/"
if "${DPKG[@]}" -r ztna-recorder >"$WORK/dpkg-r.log" 2>&1; then
  fail "dpkg -r removed the package while sshd's ForceCommand points at it"
else
  grep -q "would lock those SSH users out" "$WORK/dpkg-r.log" || { cat "$WORK/dpkg-r.log" >&2; fail "prerm refused without saying why"; }
  [ -x "$R/usr/bin/ztna-recorder" ] || fail "the refused removal still removed the binary"
fi
rm "$R/etc/ssh/sshd_config.d/50-ztna-recorder.conf"
"${DPKG[@]}" -r ztna-recorder >"$WORK/dpkg-r.log" 2>&1 || { cat "$WORK/dpkg-r.log" >&2; fail "dpkg -r"; }
[ -e "$R/usr/bin/ztna-recorder" ] && fail "dpkg -r left /usr/bin/ztna-recorder"
[ -e "$R/etc/ztna-recorder/config.toml" ] || fail "dpkg -r removed the conffile (only purge may)"
"${DPKG[@]}" -P ztna-recorder >"$WORK/dpkg-p.log" 2>&1 || { cat "$WORK/dpkg-p.log" >&2; fail "dpkg -P"; }
[ -e "$R/etc/ztna-recorder/config.toml" ] && fail "dpkg -P left the conffile"
[ -e "$R/etc/systemd/system/multi-user.target.wants/ztna-recorder.service" ] && fail "dpkg -P left the unit enabled"
[ "$(sshd_sum)" = "$SSHD_BEFORE" ] || fail "remove/purge changed /etc/ssh"

if [ "$FAILS" -gt 0 ]; then log "$FAILS check(s) failed"; exit 1; fi
log "all packaging checks passed"
