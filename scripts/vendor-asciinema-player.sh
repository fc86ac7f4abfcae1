#!/usr/bin/env bash
# Refreshes the vendored asciinema-player (server/web/vendor/asciinema-player/) from the npm
# package at a pinned version: its built single-file bundle (the terminal emulator's wasm is
# inlined), its stylesheet and its LICENSE. The dashboard is embedded in the server binary,
# so nothing is fetched at run time. Usage: scripts/vendor-asciinema-player.sh [VERSION]
set -euo pipefail
VERSION=${1:-3.18.0}
cd "$(dirname "$0")/.."
DEST=server/web/vendor/asciinema-player
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
( cd "$TMP" && npm pack --silent "asciinema-player@$VERSION" >/dev/null )
tar -xzf "$TMP"/asciinema-player-"$VERSION".tgz -C "$TMP"
PKG="$TMP/package"
got=$(node -p "require('$PKG/package.json').version")
[ "$got" = "$VERSION" ] || { echo "npm gave version $got, wanted $VERSION" >&2; exit 1; }
mkdir -p "$DEST"
cp "$PKG/dist/bundle/asciinema-player.min.js" "$DEST/asciinema-player.min.js"
cp "$PKG/dist/bundle/asciinema-player.css" "$DEST/asciinema-player.css"
cp "$PKG/LICENSE" "$DEST/LICENSE"
echo "$VERSION" > "$DEST/VERSION"
( cd "$DEST" && sha256sum asciinema-player.min.js asciinema-player.css LICENSE > SHA256SUMS )
echo "vendored asciinema-player $VERSION into $DEST"
