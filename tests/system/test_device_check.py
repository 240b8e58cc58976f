"""bench/device_check.sh works the first time on a GPU machine: its install sequence and the gpu
tests' collection, proven here on CPU (--dry-run), with the device image's situation reproduced:
"the image's python3" is this repository's .venv interpreter, itself a virtual environment holding
torch, pytest and setuptools. Without CUDA the real run fails loudly instead of passing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_check.sh"
IMAGE_PYTHON = sys.executable  # a venv's python, like the device image's python3
DEADLINE = 900  # generous: an editable install on a loaded 2-core machine


def _run(tmp_path: Path, *args: str, wheels: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": IMAGE_PYTHON, "VENV": str(tmp_path / "venv"), "OUT": str(tmp_path / "out"),
           "WHEEL_DIR": str(wheels)}
    env.pop("OPTSERVE_REQUIRE_CUDA", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=DEADLINE)


@pytest.fixture(scope="module")
def probe_wheel(tmp_path_factory) -> Path:
    """A tiny wheel standing in for the carried ones (grpcio, ...), built offline."""
    src = tmp_path_factory.mktemp("probe")
    (src / "optserve_probe").mkdir()
    (src / "optserve_probe" / "__init__.py").write_text("CARRIED = True\n")
    (src / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "optserve-probe"
        version = "1.0"
        [tool.setuptools]
        packages = ["optserve_probe"]
        """))
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([IMAGE_PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, timeout=DEADLINE, capture_output=True)
    return wheels


def test_a_system_site_packages_venv_of_a_venv_python_loses_its_packages(tmp_path):
    """The situation the script must handle, reproduced: what it used to do cannot even import torch."""
    subprocess.run([IMAGE_PYTHON, "-m", "venv", "--without-pip", "--system-site-packages", str(tmp_path / "v")],
                   check=True, timeout=DEADLINE)

    seen = subprocess.run([str(tmp_path / "v" / "bin" / "python"), "-c", "import torch"], capture_output=True,
                          timeout=DEADLINE)

    assert seen.returncode != 0


def test_the_dry_run_installs_offline_and_collects_the_gpu_tests(tmp_path, probe_wheel):
    result = _run(tmp_path, "--dry-run", wheels=probe_wheel)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "DEVICE CHECK PASSED (dry)" in result.stdout
    summary = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert summary["ok"] and summary["mode"] == "dry"
    assert summary["collected"] >= 15  # item 6's coverage, every case collected
    assert "(b) step 0.25+0.25 MiB, shard on cpu" in result.stdout  # the CUDA step's script runs
    venv_python = str(tmp_path / "venv" / "bin" / "python")
    where = subprocess.run([venv_python, "-c", "import optserve_probe, optserve, grpc_health, torch, sys; "
                                               "print(optserve_probe.__file__); print(sys.prefix)"],
                           capture_output=True, text=True, timeout=DEADLINE, check=True).stdout.split()
    assert where[0].startswith(str(tmp_path / "venv"))  # the carried wheel went into the venv


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_without_cuda_the_real_run_fails_loudly(tmp_path, probe_wheel):
    result = _run(tmp_path, wheels=probe_wheel)

    assert result.returncode == 3, result.stdout + result.stderr
    assert "DEVICE CHECK FAILED (gpu): torch.cuda.is_available() is false" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_gpu_tests_required_without_cuda_fail_instead_of_skipping():
    env = {**os.environ, "OPTSERVE_REQUIRE_CUDA": "1"}

    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                             "tests/service/test_gpu.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=DEADLINE)

    assert result.returncode != 0
    assert "OPTSERVE_REQUIRE_CUDA=1 but torch.cuda.is_available() is false" in result.stdout + result.stderr


def test_a_real_run_without_wheels_says_how_to_fetch_them(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()

    result = _run(tmp_path, wheels=empty)

    assert result.returncode == 1
    assert "run 'bash bench/device_check.sh --fetch' here and carry .whl" in result.stderr
