#!/usr/bin/env bash
# Builds botfleet-agent for Jetson (aarch64-unknown-linux-gnu, glibc <= 2.31: JetPack 5
# and 6) with cargo-zigbuild, checks the glibc floor, and smoke-tests the binary under
# qemu: `--version` and a benchmark of a real fixture model. No C cross compiler, no
# Docker (Cross.toml is there for those who have Docker and prefer `cross`).
#
#   cross/build-aarch64.sh            # debug build
#   cross/build-aarch64.sh --release  # release build
#
# Installs what a fresh Debian 12 lacks: the rustup target, ziglang + cargo-zigbuild
# (pip, into .venv), qemu-user-static and libc6-arm64-cross (apt).
# Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
GLIBC_FLOOR=2.31
target=aarch64-unknown-linux-gnu

rustup target add "$target" >/dev/null
if [[ ! -x .venv/bin/cargo-zigbuild ]]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet ziglang cargo-zigbuild
fi
export PATH="$PWD/.venv/bin:$PATH"
if ! command -v qemu-aarch64-static >/dev/null 2>&1 || [[ ! -d /usr/aarch64-linux-gnu ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq qemu-user-static libc6-arm64-cross binutils >/dev/null
fi

started=$(date +%s)
cargo zigbuild --locked -p botfleet-agent --target "$target.$GLIBC_FLOOR" "$@"
built=$(date +%s)
profile=debug
[[ " $* " == *" --release "* ]] && profile=release
bin=${CARGO_TARGET_DIR:-target}/$target/$profile/botfleet-agent

needed=$(readelf -V "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
echo "$bin: $(stat -c %s "$bin") bytes, needs glibc $needed (floor $GLIBC_FLOOR)"
if [[ "$(printf '%s\n%s\n' "$needed" "$GLIBC_FLOOR" | sort -V | tail -1)" != "$GLIBC_FLOOR" ]]; then
    echo "FAIL: $bin needs glibc $needed, above $GLIBC_FLOOR (JetPack 5)" >&2
    exit 1
fi

run() { qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" "$@"; }
run --version
run bench --model tests/fixtures/models/ch_ppocr_mobile_v2.0_cls_infer.onnx \
    --input x:FP32:1x3x48x192 --warmup 1 --runs 5 --json
echo "aarch64 $profile build: $((built - started)) s; checks: $(($(date +%s) - built)) s"
