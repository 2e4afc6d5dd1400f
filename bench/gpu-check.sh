#!/usr/bin/env bash
# The GPU check: ONNX Runtime's CUDA and TensorRT (FP32, FP16) engines on every fixture, run by
# `botfleet-bench gpu` (accuracy against tests/fixtures/reference, p50/p99 against the CPU
# backend and tract, TensorRT engine build cold and warm after a restart). Run it in the
# repository root of a Linux x86_64 machine with an NVIDIA GPU; it reaches no network.
#
#   bench/gpu-check.sh                  results in $OUT (default target/bench): gpu.json, gpu.md,
#                                       gpu-check.log, environment.txt
#   GPU_CHECK_ENGINES=onnxruntime-cpu bench/gpu-check.sh   the dry run of a machine without a GPU
#
# Only sets up the environment; the Rust side measures. Where each piece comes from, first
# found wins:
#   ONNX Runtime GPU   $ORT_DYLIB_PATH (with libonnxruntime_providers_cuda.so beside it);
#                      bench/.gpu-wheels/lib; the parts of bench/gpu-wheels.sh (joined from
#                      /tmp/gpu-stage or bench/.gpu-wheels); a python site-packages that has
#                      onnxruntime-gpu. Nothing is downloaded: the GPU machine reaches no index.
#   CUDA, cuDNN        the nvidia/*/lib folders of the machine's python (PyTorch's CUDA 13 wheels),
#                      /usr/local/cuda, bench/.gpu-wheels/lib (`gpu-wheels.sh --with-cuda`)
#   TensorRT 10        tensorrt_libs of a site-packages, or libnvinfer.so.10 in bench/.gpu-wheels/lib
#                      (`TENSORRT_WHEELS=… gpu-wheels.sh`); without it the TensorRT engines are
#                      reported unavailable with the loader's reason and CUDA is still measured
#   botfleet-bench     $BOTFLEET_BENCH; the one in the parts; target/{release,debug}; else a dev
#                      build (`--offline`: the crates must already be in ~/.cargo)
# Bounded: each step has a timeout, the whole script stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
out=${OUT:-target/bench}
mkdir -p "$out"
log=$out/gpu-check.log
exec > >(tee -a "$log") 2>&1
engines=${GPU_CHECK_ENGINES:-onnxruntime-cuda,onnxruntime-tensorrt,onnxruntime-tensorrt-fp16}
cpu_only=0
[[ "$engines" == *cuda* || "$engines" == *tensorrt* ]] || cpu_only=1
say() { echo "[gpu-check $(( $(date +%s) - started ))s] $*"; }
fail() { say "FAILED: $*"; exit 1; }
export RUST_BACKTRACE=0

# 1. The GPU.
if [ "$cpu_only" = 0 ]; then
    command -v nvidia-smi >/dev/null || fail "no nvidia-smi: this machine has no NVIDIA driver"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
        || fail "nvidia-smi finds no GPU"
fi

# 2. The libraries: joined from the staged parts if they are here.
wheels=bench/.gpu-wheels
shopt -s nullglob
parts=(/tmp/gpu-stage/part-*)
[ ${#parts[@]} -gt 0 ] || parts=("$wheels"/part-*)
if [ ${#parts[@]} -gt 0 ] && [ ! -d "$wheels/lib" ]; then
    say "joining ${#parts[@]} parts"
    mkdir -p "$wheels"
    cat "${parts[@]}" | timeout 120 xz -d | tar -C "$wheels" -xf - || fail "the staged parts do not unpack (all there?)"
fi
sites=()
for py in python3 /opt/torch/.venv/bin/python3; do
    command -v "$py" >/dev/null || continue
    while IFS= read -r s; do [ -d "$s" ] && sites+=("$s"); done \
        < <(timeout 20 "$py" -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null)
done
# The first library that has the CUDA provider beside it (any, for the CPU dry run).
candidates=()
[ -n "${ORT_DYLIB_PATH:-}" ] && candidates+=("$ORT_DYLIB_PATH")
for d in "$wheels/lib" "${sites[@]/%//onnxruntime/capi}" bench/.venv/lib/python3*/site-packages/onnxruntime/capi; do
    for l in "$d"/libonnxruntime.so.1.*; do candidates+=("$l"); done
done
ort_lib=
for l in "${candidates[@]}"; do
    if [ "$cpu_only" = 1 ] || [ -e "$(dirname "$l")/libonnxruntime_providers_cuda.so" ]; then
        ort_lib=$l
        break
    fi
done
[ -n "$ort_lib" ] || fail "no ONNX Runtime library with the CUDA provider here (looked at: ${candidates[*]:-nothing}).
  This machine reaches no package index: prepare onnxruntime-gpu with bench/gpu-wheels.sh on a
  machine that does and stage its parts here (it prints the device calls), or set ORT_DYLIB_PATH."
case "$ort_lib" in /*) ;; *) ort_lib=$PWD/$ort_lib ;; esac
export ORT_DYLIB_PATH=$ort_lib

libdirs=("$(dirname "$ort_lib")")
[ -d "$wheels/lib" ] && libdirs+=("$PWD/$wheels/lib")
for s in "${sites[@]}"; do
    for d in "$s"/nvidia/*/lib "$s"/nvidia/*/*/lib "$s"/tensorrt_libs; do
        [ -d "$d" ] && libdirs+=("$d")
    done
done
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && libdirs+=("$d")
done
LD_LIBRARY_PATH=$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
have() { local d; for d in "${libdirs[@]}"; do compgen -G "$d/$1" >/dev/null && { echo "$d"; return 0; }; done; return 1; }
{
    echo "date: $(date -u +%FT%TZ)"
    echo "engines asked: $engines"
    echo "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    for l in 'libcudart.so.13*' 'libcublas.so.13*' 'libcudnn.so.9*' 'libcurand.so.10*' \
        'libcufft.so.12*' 'libnvinfer.so.10*' 'libnvonnxparser.so.10*'; do
        echo "$l: $(have "$l" || echo 'NOT FOUND')"
    done
    nvidia-smi 2>/dev/null || echo "nvidia-smi: none"
} > "$out/environment.txt"
cat "$out/environment.txt"
if [ "$cpu_only" = 0 ]; then
    have 'libcudart.so.13*' >/dev/null || fail "no CUDA 13 runtime (libcudart.so.13): bench/gpu-wheels.sh --with-cuda brings it"
    have 'libnvinfer.so.10*' >/dev/null \
        || say "WARNING: no TensorRT 10 (libnvinfer.so.10): the TensorRT engines will be reported unavailable"
fi

# 3. botfleet-bench.
target=${CARGO_TARGET_DIR:-target}
bench=${BOTFLEET_BENCH:-}
for b in "$wheels/botfleet-bench" "$target/release/botfleet-bench" "$target/debug/botfleet-bench"; do
    [ -n "$bench" ] && break
    [ -x "$b" ] && bench=$b
done
if [ -z "$bench" ]; then
    command -v cargo >/dev/null || fail "no botfleet-bench and no cargo: stage it with bench/gpu-wheels.sh"
    say "dev build (deps at opt-level 2)"
    timeout 300 cargo build --offline --locked --profile dev -p botfleet-e2e --bin botfleet-bench \
        || fail "the build failed or took over 5 min (offline: are the crates in ~/.cargo?)"
    bench=$target/debug/botfleet-bench
fi
say "botfleet-bench: $bench"

# 4. The measurements (the JSON is saved after every fixture, so a timeout keeps what was done).
left=$(( 450 - ($(date +%s) - started) ))
[ "$left" -gt 60 ] || fail "no time left for the measurements"
say "botfleet-bench gpu --engines $engines (at most ${left}s)"
timeout "$left" "$bench" --out "$out" --onnxruntime-library "$ORT_DYLIB_PATH" gpu \
    --engines "$engines" --tensorrt-cache "$target/tensorrt-cache" --budget-s 5
rc=$?
# After a timeout the summary is written from what was saved.
[ "$rc" = 124 ] && timeout 30 "$bench" --out "$out" gpu --summary-only
[ -f "$out/gpu.md" ] && cat "$out/gpu.md"
case $rc in
    0) say "done: $out/gpu.json, $out/gpu.md" ;;
    124) fail "timed out after ${left}s: $out/gpu.json holds the fixtures measured before" ;;
    *) fail "botfleet-bench gpu exited with $rc (reason above)" ;;
esac
