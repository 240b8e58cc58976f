"""make bench's anchor check (bench/standalone.py): an anchor off its standalone form by more than
10% gets a WARNING line and makes the targets on it INVALID. Fake numbers only; nothing is timed."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is not installed; run.py imports it the same way
    sys.path.insert(0, str(ROOT))

from bench import standalone, transport  # noqa: E402
from bench.common import verdict  # noqa: E402


def test_anchor_within_ten_percent_of_its_standalone_form_is_valid():
    check = standalone.compare("tcp", [0.040, 0.041, 0.042], [0.038, 0.039, 0.040])
    assert check["valid"]
    assert abs(check["ratio"] - 0.041 / 0.039) < 1e-9


def test_anchor_slower_than_its_standalone_form_by_more_than_ten_percent_is_invalid():
    check = standalone.compare("tcp", [0.053, 0.052, 0.054], [0.037, 0.037, 0.038])
    assert not check["valid"]
    assert "WARNING" in standalone.check_lines([check])
    assert "INVALID" in standalone.check_lines([check])


def test_anchor_faster_than_its_standalone_form_by_more_than_ten_percent_is_invalid():
    assert not standalone.compare("tcp", [0.030], [0.040])["valid"]


def test_invalid_target_reads_invalid_whether_it_passed_or_not():
    assert verdict(True, valid=False) == "INVALID"
    assert verdict(False, valid=False) == "INVALID"
    assert verdict(True) == "PASS"
    assert verdict(False) == "MISS"


def _stat(ms: float) -> dict:
    return {"median": ms, "min": ms, "max": ms, "n": 1, "samples": [ms]}


def _transport_result(tcp_anchor_ms: float, rpc_anchor_ms: float) -> dict:
    ms = {transport.STEP: 55.0, transport.STEP_NO_ADAM: 40.0, transport.PUSH_PULL: 41.0,
          transport.STEP_GRPC: 125.0, transport.STEP_SHM: 35.0, transport.STEP_SHM_NO_ADAM: 20.0,
          transport.TCP: tcp_anchor_ms, transport.RPC: rpc_anchor_ms}
    rows = {name: {"ms": _stat(v), "gb_s": _stat(2 * transport.NBYTES / v / 1e6)} for name, v in ms.items()}
    rows[transport.RPC]["ps_step_ms"] = _stat(8.0)
    gb = {name: r["gb_s"]["median"] for name, r in rows.items()}
    checks = {transport.TCP: standalone.compare(transport.TCP, [tcp_anchor_ms / 1e3], [0.037]),
              transport.RPC: standalone.compare(transport.RPC, [rpc_anchor_ms / 1e3], [0.078])}
    return {"rows": rows, "adam_share_ms": _stat(15.0), "shm_adam_share_ms": _stat(15.0), "anchor_checks": checks,
            "ratios": {"step_vs_tcp": gb[transport.STEP] / gb[transport.TCP],
                       "transfer_vs_tcp": gb[transport.STEP_NO_ADAM] / gb[transport.TCP],
                       "step_vs_rpc": gb[transport.STEP] / gb[transport.RPC],
                       "push_pull_vs_tcp": gb[transport.PUSH_PULL] / gb[transport.TCP],
                       "grpc_step_vs_tcp": gb[transport.STEP_GRPC] / gb[transport.TCP],
                       "shm_step_vs_tcp": gb[transport.STEP_SHM] / gb[transport.TCP],
                       "shm_transfer_vs_tcp": gb[transport.STEP_SHM_NO_ADAM] / gb[transport.TCP]}}


def test_slow_tcp_anchor_makes_the_tcp_targets_invalid_and_leaves_the_rpc_target():
    text, targets = transport.report(_transport_result(tcp_anchor_ms=53.0, rpc_anchor_ms=79.0))
    valid = {t["id"]: t["valid"] for t in targets}
    assert valid == {"b/transfer": False, "b/tcp": False, "b/rpc": True, "b/shm": False}
    assert "WARNING: anchor check failed: raw TCP" in text


def test_honest_anchors_leave_every_target_valid_and_the_step_split_is_reported():
    text, targets = transport.report(_transport_result(tcp_anchor_ms=38.0, rpc_anchor_ms=79.0))
    assert all(t["valid"] for t in targets)
    assert "WARNING" not in text
    assert "Adam on the shard" in text
