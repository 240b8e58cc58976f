#!/usr/bin/env bash
# The CUDA checks of the performance issue, in one call on a lent GPU machine (the `device` tool):
# the tests marked `gpu` (CUDA shard equals the reference kernel, RemoteAdam against a --device cuda
# shard over the data channel and over gRPC) and the update-kernel benchmark on CPU and CUDA.
#
#   here, once:      bash bench/device_check.sh --fetch     # wheels the device image lacks -> .whl/
#   device tool:     run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
#
# The device image has python3 (3.12) with torch (CUDA), numpy, safetensors, prometheus-client,
# grpcio and protobuf, but no grpcio-health-checking / grpcio-reflection; grpcio and protobuf are
# carried too, at the versions the committed stubs were generated for. Output: $OUT/gpu_tests.txt,
# $OUT/kernel.txt, $OUT/kernel.json (the lines also reach the call's output tail).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEEL_DIR=${WHEEL_DIR:-.whl}
WHEELS=(grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1)

if [[ ${1:-} == --fetch ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEEL_DIR" "${WHEELS[@]}"
    exit
fi

out=${OUT:-/tmp/device-check}
mkdir -p "$out"
nvidia-smi -L || true
python3 -m venv --system-site-packages /tmp/optserve-venv || exit 1
PY=/tmp/optserve-venv/bin/python
$PY -m pip install -q --no-index --no-deps --no-compile "$WHEEL_DIR"/*.whl || exit 1
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
$PY -c 'import torch, grpc, google.protobuf as p; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
        "grpcio", grpc.__version__, "protobuf", p.__version__)'
export PYTHONUNBUFFERED=1
$PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/service/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
$PY bench/run.py --only a 2>&1 | tee "$out/kernel.txt"
cp bench/results/latest.json "$out/kernel.json" 2>/dev/null
exit "$tests"
