"""`optserve experiment` end to end on a tiny budget: shard and worker processes, CSV, PNG, summary; the
char-level LM task, a DC-ASGD mode beside sync/async/ssp, and two repeats (mean ± std)."""
from __future__ import annotations

import csv

import pytest

from optserve.experiment import CSV_COLUMNS, ExperimentConfig, parse_delay, run_experiment

pytestmark = pytest.mark.system

MODES = ("sync", "async", "ssp:1", "dca:2")
WORKERS, STEPS, REPEATS = 2, 8, 2


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """One run shared by the tests below (process start-up dominates its time)."""
    out = tmp_path_factory.mktemp("experiment")
    result = run_experiment(task="charlm", workers=WORKERS, shards=1, modes=MODES, steps=STEPS,
                            repeats=REPEATS, progress=False, out_dir=out, timeout=120.0)
    with open(result["csv"], newline="") as f:
        reader = csv.DictReader(f)
        return result, reader.fieldnames, list(reader)


def test_csv_has_one_row_per_mode_run_worker_and_step(experiment):
    _, columns, rows = experiment

    assert tuple(columns) == CSV_COLUMNS
    assert sorted((r["mode"], int(r["repeat"]), int(r["worker"]), int(r["step"])) for r in rows) == sorted(
        (m, i, w, s) for m in MODES for i in range(REPEATS) for w in range(WORKERS) for s in range(1, STEPS + 1))
    assert all(float(r["wall_time"]) > 0 and float(r["loss"]) > 0 for r in rows)


def test_sync_workers_always_see_staleness_zero(experiment):
    _, _, rows = experiment

    assert {r["staleness"] for r in rows if r["mode"] == "sync"} == {"0"}
    assert {r["dropped"] for r in rows if r["mode"] == "sync"} == {"0"}


def test_ssp_never_applies_a_push_over_its_bound(experiment):
    _, _, rows = experiment

    assert all(int(r["staleness_max"]) <= 1 for r in rows if r["mode"] == "ssp:1" and r["staleness_max"])


def test_png_and_summary_are_written_with_a_row_per_mode(experiment):
    result, _, _ = experiment

    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result["summary"].read_text()
    assert table == result["table"]
    for mode in MODES:
        assert sum(line.startswith(f"| {mode} |") for line in table.splitlines()) == 1
    assert set(result["modes"]) == set(MODES)
    assert all(0.0 <= m["accuracy"] <= 1.0 and m["steps"] == REPEATS * WORKERS * STEPS
               for m in result["modes"].values())
    assert result["modes"]["sync"]["staleness_max"] == 0
    for mode, m in result["modes"].items():  # a step counts once, however many shards dropped its push
        assert m["steps_dropped"] == sum(1 for r in experiment[2] if r["mode"] == mode and r["dropped"] != "0")
        assert m["steps_dropped"] <= m["dropped"]


def test_summary_gives_mean_and_spread_over_the_runs(experiment):
    result, _, rows = experiment

    for mode, m in result["modes"].items():
        finals = [run["final_loss"] for run in m["runs"]]
        assert len(finals) == REPEATS
        assert m["final_loss"] == pytest.approx(sum(finals) / REPEATS)
        assert m["final_loss_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
        line = next(line for line in result["table"].splitlines() if line.startswith(f"| {mode} |"))
        assert f"{m['final_loss']:.4f} ± {m['final_loss_std']:.4f}" in line
        assert {r["repeat"] for r in rows if r["mode"] == mode} == {"0", "1"}


def test_the_dc_mode_runs_on_async_shards_with_compensation():
    from optserve.experiment import policy_arguments

    assert policy_arguments("dca:2") == ["--policy", "async", "--compensate", "dca:2"]
    assert policy_arguments("ssp:1") == ["--policy", "ssp:1"]


def test_delay_spec_parses_and_negative_workers_count_from_the_end():
    assert parse_delay("1:0.05,0:0") == {1: 0.05, 0: 0.0}
    assert ExperimentConfig(workers=4, delay=parse_delay("-1:0.02")).delay == {3: 0.02}


@pytest.mark.parametrize("kwargs, message", [
    (dict(modes=("sync", "bogus")), "unknown policy 'bogus'"),
    (dict(workers=2, delay={2: 0.1}), "worker must be in -2..1"),
    (dict(task="imagenet"), "unknown task 'imagenet'"),
    (dict(modes=("dc:x",)), "dc:LAMBDA"),
    (dict(repeats=0), "repeats must be >= 1"),
])
def test_bad_configuration_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**kwargs)


def test_malformed_delay_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="WORKER:SECONDS"):
        parse_delay("3=0.05")
