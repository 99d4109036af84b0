"""The scaling benchmark's report matches trials across its variants, in grid and halving mode (its pure functions only: never the benchmark)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(bench_module):
    return bench_module("bench_tuning_scaling")


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


# --- --search-strategy halving ---------------------------------------------------------------


def test_grid_mode_keeps_its_trials_and_command_lines_and_halving_spreads_the_learning_rates(bench):
    grid = bench.parse_args([])
    assert (grid.search_strategy, grid.trials) == ("grid", 4)
    assert bench.learning_rates(grid) == "0.00100,0.00110,0.00120,0.00130"  # today's equal trials
    assert bench.halving_argv(grid) == []
    assert "--search-strategy" not in bench.common_argv(grid)
    assert [name for name, _ in bench.round_steps("grid")] == ["loop", "spark1", "spark2"]

    opts = bench.parse_args(["--search-strategy", "halving", "--epochs", "6", "--prepared-uri", "s3://b/prepared/"])
    assert opts.trials == 9
    rates = [float(r) for r in bench.learning_rates(opts).split(",")]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[-1] == pytest.approx(1e-2)
    assert len(rates) == 9
    assert rates[4] == pytest.approx(1e-3)  # geometric: the middle one is the geometric mean of the ends
    assert [name for name, _ in bench.round_steps("halving")] == ["spark1", "spark2"]  # no plain loop

    # The workers get the halving settings, and the tune job runs them.
    worker = bench.parse_args(bench.common_argv(opts)[1:])
    assert (worker.search_strategy, worker.halving_min_epochs, worker.halving_factor, worker.trials) == ("halving", 1, 3, 9)
    job = bench.tune_args(opts, "s3://b/out/")
    assert (job.search_strategy, job.halving_min_epochs, job.halving_factor, job.epochs) == ("halving", 1, 3, 6)
    assert bench.tune_args(grid, "s3://b/out/").search_strategy == "grid"


def test_option_problems_refuse_what_the_bench_cannot_measure(bench):
    assert bench.option_problems(bench.parse_args([])) == []
    assert bench.option_problems(bench.parse_args(["--trials", "3"])) == ["--trials must be even (equal work on 2 slots)"]
    assert bench.option_problems(bench.parse_args(["--search-strategy", "halving", "--epochs", "6"])) == []
    assert bench.option_problems(bench.parse_args(["--search-strategy", "halving", "--trials", "3", "--epochs", "6"])) == []  # odd is fine
    (few,) = bench.option_problems(bench.parse_args(["--search-strategy", "halving", "--trials", "2", "--epochs", "6"]))
    assert "must be at least --halving-factor (3)" in few
    (late,) = bench.option_problems(bench.parse_args(["--search-strategy", "halving", "--halving-min-epochs", "4", "--epochs", "3"]))
    assert "halving_min_epochs (4) is above epochs (3)" in late


def _halving_variant(bench, slots: int, seconds: float, train: list[float], epochs: list[int], utilisation: float, wall: float) -> dict:
    records = _records(f"h{slots}", train)
    for record, reached in zip(records, epochs, strict=True):
        record["epochs_run"] = reached
    halving = {"rungs": [1, 2], "factor": 2, "slots": slots, "rung_steps": 6, "trial_epochs": sum(epochs), "slot_utilisation": utilisation}
    return {
        "variant": f"local[{slots}]",
        "seconds": seconds,
        "session_startup_seconds": 3.0,
        "trials": bench.trial_rows(records),
        "halving": {**halving, "steps_wall_seconds": wall},
    }


def test_report_halving_round_gives_efficiency_utilisation_and_where_the_time_goes_with_no_loop(bench, capsys):
    # local[1]: 40 s, steps 30 s at utilisation 0.9 (27 slot-s busy), 20 s in the train timers.
    spark1 = _halving_variant(bench, 1, 40.0, [12.0, 8.0], [2, 1], 0.9, 30.0)
    spark2 = _halving_variant(bench, 2, 25.0, [13.0, 9.0], [2, 1], 0.75, 16.0)
    summary = bench.report_halving_round(1, {"spark1": spark1, "spark2": spark2})
    assert summary["efficiency"] == pytest.approx(40.0 / 50.0)
    assert (summary["t_loop"], summary["overhead"]) == (None, None)
    assert (summary["utilisation1"], summary["utilisation2"], summary["trial_epochs1"]) == (0.9, 0.75, 3)

    split = bench.halving_time_split(spark2)
    assert split == pytest.approx({"outside_steps": 9.0, "training": 11.0, "in_tasks_outside_training": 1.0, "idle_slots": 4.0})
    assert sum(split.values()) == pytest.approx(spark2["seconds"])  # every second of T is accounted for

    out = capsys.readouterr().out
    assert "T_loop = n/a" in out
    assert "overhead   = n/a" in out
    assert "trial-epochs 3 in 6 rung steps; slot utilisation 0.75 (24.0 busy slot-s of 32.0 available)" in out
    assert "| 0.001 | 2 | 2 | 12.0 | 13.0 |" in out
    assert "| 0.0011 | 1 | 1 | 8.0 | 9.0 |" in out
    assert "NOTE" not in out  # both variants trained the same trial-epochs
    assert bench.summary_keys("halving") == ("t1", "t2", "efficiency", "utilisation1", "utilisation2")
    assert bench.summary_keys("grid") == ("t_loop", "t1", "t2", "efficiency", "overhead")


def test_report_halving_round_says_when_the_variants_promoted_differently(bench, capsys):
    spark1 = _halving_variant(bench, 1, 40.0, [12.0, 8.0], [2, 1], 0.9, 30.0)
    spark2 = _halving_variant(bench, 2, 25.0, [13.0, 13.0], [2, 2], 0.75, 16.0)
    bench.report_halving_round(1, {"spark1": spark1, "spark2": spark2})
    assert "NOTE: local[1] trained 3 trial-epochs, local[2] 4" in capsys.readouterr().out
