#!/usr/bin/env bash
# Release build of the agent (ztna-recorder, ztna-recorderd) and the bundled server
# (ztna-recorder-server), in two cargo commands, one per package. Extra args go to both
# (`--locked`, say).
#
# Why two: cargo turns on, in one build, every feature that any package of that build asks a
# shared dependency for. Built with the server, the agent carries the server's HTTP/2 and
# hyper server code and more of serde, tracing and futures: a daemon binary 3 MB larger, with
# 950 KB more code (bench/README.md, "Build apart"). Built apart, the agent is what
# `cargo build -p ztna-recorder` gives, whoever builds it. The second build recompiles the
# dependencies whose features differ; each build's results stay in the target directory, so a
# later run of this script recompiles nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ztna-recorder "$@"
cargo build --release -p ztna-recorder-server "$@"
