#!/usr/bin/env bash
# Prepares, on a machine that reaches PyPI, what bench/gpu-check.sh needs on a GPU machine that
# reaches nothing: ONNX Runtime's GPU build and a prebuilt botfleet-bench, in
# bench/.gpu-wheels/ (ignored by git).
#
#   bench/gpu-wheels.sh                 onnxruntime-gpu's libraries + botfleet-bench, packed
#   bench/gpu-wheels.sh --with-cuda     also the CUDA 13 runtime, cuBLAS, cuDNN, cuFFT, cuRAND
#                                       and NVRTC wheels (for a machine without them)
#   TENSORRT_WHEELS=DIR bench/gpu-wheels.sh   also TensorRT 10 from wheels found in DIR
#
# What it found (2026-12-06, cp312 manylinux x86_64):
#   onnxruntime-gpu 1.31.1   255.6 MB wheel; CUDA 13 build (its `cuda`/`cudnn` extras:
#                            nvidia-cuda-runtime~=13.0, nvidia-cuda-nvrtc~=13.0, nvidia-cufft~=12.0,
#                            nvidia-curand~=10.0, nvidia-cudnn-cu13~=9.0); its TensorRT provider
#                            needs libnvinfer.so.10 / libnvonnxparser.so.10 (TensorRT 10).
#                            Unpacked: libonnxruntime.so.1.31.1 29 MB,
#                            libonnxruntime_providers_cuda.so 284 MB, _tensorrt.so 1 MB.
#   CUDA 13 wheels           cudnn-cu13 9.28.1.4 516.8 MB, cublas 13.10.0.20 444.3 MB,
#                            cufft 12.5.0.14 165.1 MB, curand 10.4.5.25 77.1 MB,
#                            cuda-nvrtc 13.5.37 58.2 MB, cuda-runtime 13.5.37 2.5 MB.
#                            The GPU machines' image already has these (PyTorch's cu130 set).
#   tensorrt-cu13-libs       no wheel on PyPI: every version (10.16.1.11 is the last TensorRT 10)
#                            is a 15 kB source stub (`wheel_stub`) that fetches the real wheel
#                            from NVIDIA's own index at install time, which neither this machine
#                            nor the GPU machine reaches. Bring the wheels in TENSORRT_WHEELS.
#
# The device tool carries at most 64 MiB per call (working tree included), so the libraries
# travel xz-compressed in parts (bench/.gpu-wheels/part-NN, about 48 MiB each) over several
# calls to the same warm machine; the script prints those calls. gpu-check.sh joins the parts.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=bench/.gpu-wheels
with_cuda=0
for arg in "$@"; do
    case "$arg" in
        --with-cuda) with_cuda=1 ;;
        *) echo "unknown option $arg" >&2; exit 2 ;;
    esac
done
target=${CARGO_TARGET_DIR:-target}
pip_for_gpu_machine() {
    # The GPU machines run Python 3.12 on manylinux x86_64; only what is named, no deps.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$dir/wheels" "$@"
}
mkdir -p "$dir/wheels"
rm -rf "$dir/stage" "$dir"/part-*
mkdir -p "$dir/stage/lib"

echo "onnxruntime-gpu"
pip_for_gpu_machine onnxruntime-gpu==1.31.1
python3 - "$dir"/wheels/onnxruntime_gpu-1.31.1-*.whl "$dir/stage/lib" <<'PY'
import sys, zipfile, os
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/lib") and ".so" in base:
            with open(os.path.join(out, base), "wb") as f:
                f.write(z.read(name))
            print("  ", base)
PY

unpack_libs() {
    # Every lib/ folder of the wheels given, flattened into stage/lib.
    python3 - "$dir/stage/lib" "$@" <<'PY'
import sys, zipfile, os
out = sys.argv[1]
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = name.split("/")
            if ".so" in parts[-1] and ("lib" in parts[:-1] or parts[0] == "tensorrt_libs"):
                with open(os.path.join(out, parts[-1]), "wb") as f:
                    f.write(z.read(name))
    print("  ", os.path.basename(wheel))
PY
}
if [ "$with_cuda" = 1 ]; then
    echo "CUDA 13 libraries"
    pip_for_gpu_machine nvidia-cuda-runtime~=13.0 nvidia-cuda-nvrtc~=13.0 nvidia-cufft~=12.0 \
        nvidia-curand~=10.0 nvidia-cudnn-cu13~=9.0 nvidia-cublas~=13.0
    unpack_libs "$dir"/wheels/nvidia_*.whl
fi
if [ -n "${TENSORRT_WHEELS:-}" ]; then
    echo "TensorRT from $TENSORRT_WHEELS"
    unpack_libs "$TENSORRT_WHEELS"/tensorrt*.whl
elif ! pip_for_gpu_machine tensorrt-cu13-libs==10.16.1.11 2>/dev/null; then
    echo "TensorRT: no tensorrt-cu13-libs wheel on PyPI (a stub that installs from NVIDIA's index);" \
        "the check runs without TensorRT unless TENSORRT_WHEELS names a folder with the wheels"
fi

# The GPU machine may have no Rust toolchain and no crates: a release binary built here
# (glibc of this Debian 12, older than the GPU machine's) travels with the libraries.
echo "botfleet-bench (release)"
# The same features as bench/run.sh, so that one release build serves both.
cargo build --release --locked --features botfleet-engine/multithread -p botfleet-e2e --bin botfleet-bench
cp "$target/release/botfleet-bench" "$dir/stage/"

echo "packing"
tar -C "$dir/stage" -cf - . | xz -6 -T0 | split -b 48M -d -a 2 - "$dir/part-"
rm -rf "$dir/stage"
parts=("$dir"/part-*)
du -ch "${parts[@]}" | tail -1 | sed 's/\ttotal/ in parts/'
echo
echo "To stage them on one warm GPU machine, one device call per part (carry names the part):"
for p in "${parts[@]}"; do
    echo "  carry [\"$p\"]: mkdir -p /tmp/gpu-stage && cp $p /tmp/gpu-stage/"
done
echo "then, in the next call: bench/gpu-check.sh   (it joins /tmp/gpu-stage/part-*)"
