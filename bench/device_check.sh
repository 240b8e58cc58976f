#!/usr/bin/env bash
# The CUDA path's check, in one call on a lent GPU machine (the `device` tool), and its CPU dry run.
#
#   here, once:    bash bench/device_check.sh --fetch     # wheels the device image lacks -> .whl/
#   device tool:   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
#   CPU dry run:   bash bench/device_check.sh --dry-run   # the same install sequence and collection,
#                                                         # no CUDA needed (tests/system/test_device_check.py)
#
# What it runs, in order, printing each step ("== step: ..."):
#   1. a venv that sees the image's packages: the device image's python3 is itself a virtual
#      environment (torch, pytest, setuptools in it), so a --system-site-packages venv made from it
#      would see only the base interpreter's packages. The venv is made --without-pip and a .pth file
#      adds every site-packages directory of python3 (site.addsitedir, so their own .pth files count);
#      the venv's own site-packages comes first, so the carried wheels win over the image's copies.
#   2. the carried wheels (grpcio and protobuf at the stubs' versions, grpcio-health-checking,
#      grpcio-reflection) and optserve itself (editable, no build isolation, no index).
#   3. CUDA present: anything else FAILS (exit 3), except with --dry-run.
#   4. the tests marked `gpu` (tests/service/test_gpu.py) with OPTSERVE_REQUIRE_CUDA=1, so none may
#      skip; a skipped or missing test fails the check. --dry-run collects them only.
#   5. `make bench` sections (a) and (b) (bench/run.py --only a,b --quick; (a) runs on CPU and CUDA),
#      and (b)'s 64+64 MiB step against a CPU and a CUDA shard (bench/device_step.py).
#      --dry-run imports them only.
#   6. $OUT/device_check.json: versions, the GPU, test counts, failures, the bench's figures.
# Exit status: 0 only when every step passed. Output also under $OUT (gpu_tests.txt, gpu_tests.xml,
# bench.txt, bench/latest.json, device_check.json); $OUT defaults to /tmp/device-check.
#
# Environment: PYTHON (default python3: "the image's python"), VENV (default /tmp/optserve-venv),
# WHEEL_DIR (default .whl), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/optserve-venv}
WHEEL_DIR=${WHEEL_DIR:-.whl}
WHEELS=(grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1)
mode=gpu
case ${1:-} in
    --fetch)
        grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
        "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEEL_DIR" "${WHEELS[@]}"
        exit ;;
    --dry-run) mode=dry ;;
    "") ;;
    *) echo "usage: bash bench/device_check.sh [--fetch | --dry-run]" >&2; exit 2 ;;
esac

out=${OUT:-/tmp/device-check}
mkdir -p "$out"
step() { echo "== step: $*"; }
fail() { echo "DEVICE CHECK FAILED ($mode): $2" >&2; exit "$1"; }
echo "device check: mode $mode, python $PYTHON, venv $VENV, wheels $WHEEL_DIR, output $out"
[[ $mode == gpu ]] && { nvidia-smi -L || echo "nvidia-smi: not found or failed"; }

step "1. venv over the image's packages"
rm -rf "$VENV"
"$PYTHON" -m venv --without-pip "$VENV" || fail 1 "python -m venv --without-pip $VENV"
PY=$VENV/bin/python
purelib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || fail 1 "venv python"
"$PYTHON" - > "$purelib/_optserve_image_site.pth" <<'EOF' || fail 1 "reading the image's site-packages"
import site, sys
dirs = [d for d in site.getsitepackages() + sys.path if d.endswith(("site-packages", "dist-packages"))]
print("import site; list(map(site.addsitedir, %r))" % list(dict.fromkeys(dirs)))
EOF
"$PY" -c 'import torch, pytest, setuptools' || fail 1 "torch, pytest or setuptools not visible in the venv"
"$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip -q || fail 1 "no pip and ensurepip failed"

step "2. carried wheels and optserve (editable, offline)"
shopt -s nullglob
wheels=("$WHEEL_DIR"/*.whl)
if (( ${#wheels[@]} )); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --ignore-installed "${wheels[@]}" \
        || fail 1 "installing ${wheels[*]}"
elif [[ $mode == gpu ]]; then
    fail 1 "no wheels in $WHEEL_DIR: run 'bash bench/device_check.sh --fetch' here and carry .whl"
else
    echo "no wheels in $WHEEL_DIR: the image's own grpcio/protobuf are used (dry run)"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || fail 1 "pip install -e ."
"$PY" - <<'EOF' || fail 1 "imports after the install"
import google.protobuf, grpc, grpc_health.v1.health, grpc_reflection.v1alpha.reflection, torch
import optserve, optserve.server.main
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "grpcio", grpc.__version__,
      "protobuf", google.protobuf.__version__, "optserve", optserve.__version__, "from", optserve.__file__)
EOF

step "3. CUDA"
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    "$PY" -c 'import torch; print("CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
elif [[ $mode == gpu ]]; then
    fail 3 "torch.cuda.is_available() is false: no GPU, the check proves nothing (use --dry-run on CPU)"
else
    echo "no CUDA (dry run: the gpu tests are collected, not run)"
fi

export PYTHONUNBUFFERED=1
step "4. tests marked gpu"
tests_rc=0
if [[ $mode == gpu ]]; then
    OPTSERVE_REQUIRE_CUDA=1 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider --junitxml="$out/gpu_tests.xml" \
        tests/service/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
    tests_rc=${PIPESTATUS[0]}
else
    "$PY" -m pytest -q --collect-only -m gpu -p no:cacheprovider tests/service/test_gpu.py 2>&1 \
        | tee "$out/gpu_tests.txt"
    tests_rc=${PIPESTATUS[0]}
fi

step "5. bench sections (a) and (b), and (b)'s step with the shard on CUDA"
bench_rc=0
if [[ $mode == gpu ]]; then
    "$PY" bench/run.py --only a,b --quick --time-limit 200 --out "$out/bench" 2>&1 | tee "$out/bench.txt"
    bench_rc=${PIPESTATUS[0]}
    "$PY" bench/device_step.py --devices cpu,cuda --json "$out/device_step.json" 2>&1 | tee -a "$out/bench.txt"
    [[ ${PIPESTATUS[0]} == 0 ]] || bench_rc=1
else
    "$PY" -c 'import bench.run, bench.kernel, bench.transport; print("bench sections a, b import")' \
        2>&1 | tee "$out/bench.txt"
    bench_rc=${PIPESTATUS[0]}
    # the CUDA step's script, on the CPU with a tiny tensor: it runs, whatever the machine
    "$PY" bench/device_step.py --devices cpu --reps 1 --warmup 0 --numel 65536 2>&1 | tee -a "$out/bench.txt"
    [[ ${PIPESTATUS[0]} == 0 ]] || bench_rc=1
fi

step "6. summary"
MODE=$mode TESTS_RC=$tests_rc BENCH_RC=$bench_rc OUTDIR=$out "$PY" - <<'EOF'
import json, os, pathlib, re, sys
import xml.etree.ElementTree as ET
import torch
out = pathlib.Path(os.environ["OUTDIR"])
mode, tests_rc, bench_rc = os.environ["MODE"], int(os.environ["TESTS_RC"]), int(os.environ["BENCH_RC"])
summary = {"mode": mode, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "tests_rc": tests_rc, "bench_rc": bench_rc, "failures": []}
if mode == "gpu":
    xml = out / "gpu_tests.xml"
    if xml.exists():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        summary["tests"] = counts
        summary["failures"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None
                               or c.find("skipped") is not None]
        if counts["tests"] == 0 or counts["skipped"]:
            tests_rc = tests_rc or 1
    else:
        tests_rc = tests_rc or 1
    bench = out / "bench" / "latest.json"
    if bench.exists():
        data = json.loads(bench.read_text())
        summary["bench"] = {"targets": data.get("targets"), "sections": data.get("sections")}
    else:
        bench_rc = bench_rc or 1
else:
    text = (out / "gpu_tests.txt").read_text()
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    summary["collected"] = int(m.group(1)) if m else 0
    if not summary["collected"]:
        tests_rc = tests_rc or 1
summary["ok"] = tests_rc == 0 and bench_rc == 0
(out / "device_check.json").write_text(json.dumps(summary, indent=1, default=str))
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}))
print("DEVICE CHECK", "PASSED" if summary["ok"] else "FAILED", f"({mode})")
sys.exit(0 if summary["ok"] else 1)
EOF
