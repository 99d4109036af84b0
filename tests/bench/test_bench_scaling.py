"""The scaling benchmark's report matches trials across its variants (its pure functions only: never the benchmark)."""

from __future__ import annotations

import sys

import pytest

from sparktf_dev.testing import ROOT


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_tuning_scaling
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return bench_tuning_scaling


def _records(prefix: str, seconds: list[float]) -> list[dict]:
    """Records as each variant writes them: same hyperparameters, ids that differ per variant (the fingerprint)."""
    return [
        {
            "trial_id": f"trial-{prefix}{i}",
            "params": {"learning_rate": 0.001 * (1 + 0.1 * i), "hidden_units": 64, "optimizer": "adam", "augment": 0.0},
            "status": "ok",
            "epochs_run": 2,
            "train_seconds": s,
            "executor": {"pid": 100 + i, "executor_id": "driver", "task_cpus": 1},
        }
        for i, s in enumerate(seconds)
    ]


def test_report_round_matches_the_loop_and_spark_trials_by_hyperparameters_not_by_id(bench, capsys):
    res = {
        "loop": {"seconds": 40.0, "data_seconds": 1.0, "trials": bench.trial_rows(_records("loop", [10.0, 11.0]))},
        "spark1": {"seconds": 44.0, "session_startup_seconds": 3.0, "variant": "local[1]", "trials": bench.trial_rows(_records("s1", [10.5, 11.5]))},
        "spark2": {"seconds": 24.0, "session_startup_seconds": 3.0, "variant": "local[2]", "trials": bench.trial_rows(_records("s2", [12.0, 13.0]))},
    }
    summary = bench.report_round(1, res)
    assert summary["efficiency"] == pytest.approx(44.0 / 48.0)
    matched = list(bench.matched_trials(res).values())
    assert [(m["loop"], m["spark1"], m["spark2"]) for m in matched] == [(10.0, 10.5, 12.0), (11.0, 11.5, 13.0)]
    assert "| 0.0011 | 11.0 | 11.5 | 13.0 |" in capsys.readouterr().out


def test_matched_trials_refuses_variants_that_ran_other_trials(bench):
    loop = bench.trial_rows(_records("loop", [10.0, 11.0]))
    other = bench.trial_rows(_records("s1", [10.0]))
    res = {"loop": {"trials": loop}, "spark1": {"trials": other}, "spark2": {"trials": loop}}
    with pytest.raises(ValueError, match="spark1 ran other trials"):
        bench.matched_trials(res)
