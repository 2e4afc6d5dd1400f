#!/usr/bin/env bash
# Builds botfleet-agent for Jetson (aarch64, glibc ≤ 2.31: JetPack 5 and 6) with
# cargo-zigbuild; no C cross toolchain and no Docker needed.
#
#   cross/build-aarch64.sh            # debug build
#   cross/build-aarch64.sh --release  # release build
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add aarch64-unknown-linux-gnu >/dev/null
if ! command -v cargo-zigbuild >/dev/null 2>&1; then
    python3 -m pip install --quiet ziglang cargo-zigbuild
fi
cargo zigbuild -p botfleet-agent --target aarch64-unknown-linux-gnu.2.31 "$@"
profile=debug
[[ " $* " == *" --release "* ]] && profile=release
bin=target/aarch64-unknown-linux-gnu/$profile/botfleet-agent
floor=$(readelf -V "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
echo "$bin: needs $floor"
