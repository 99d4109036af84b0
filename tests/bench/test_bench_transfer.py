"""The transfer benchmark's data sets and goal checks (its pure functions only: never the benchmark)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(bench_module):
    return bench_module("bench_mnist_transfer")


def test_budgets_parse_and_refuse_what_is_not_a_count(bench):
    assert bench.parse_budgets("10, 100,all") == [10, 100, None]
    for bad in ("ten", "1", "", "10,-5"):
        with pytest.raises(ValueError, match=r"budget|neither"):
            bench.parse_budgets(bad)


def test_the_target_set_keeps_its_digits_and_their_names(bench):
    images = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2)
    labels = np.array([0, 5, 1, 6, 9, 4, 5, 7, 8, 2], dtype=np.uint8)
    x, y = bench.digit_subset(images, labels, bench.TARGET_DIGITS)
    assert y.tolist() == [5, 6, 9, 5, 7, 8]
    assert x[:, 0, 0].tolist() == [4, 12, 16, 24, 28, 32]  # each image still with its own label


def test_labels_per_class_draws_exactly_k_of_each_class_seeded(bench):
    labels = np.repeat(np.array([5, 6, 7], dtype=np.uint8), [30, 12, 20])
    chosen = bench.labels_per_class(labels, 10, seed=3)
    assert np.bincount(labels[chosen], minlength=8)[5:].tolist() == [10, 10, 10]
    assert len(set(chosen.tolist())) == 30
    assert chosen.tolist() == sorted(chosen.tolist())
    assert chosen.tolist() == bench.labels_per_class(labels, 10, seed=3).tolist()
    assert chosen.tolist() != bench.labels_per_class(labels, 10, seed=4).tolist()
    assert bench.labels_per_class(labels, None, seed=3).tolist() == list(range(len(labels)))
    with pytest.raises(ValueError, match="label 6 has 12 images, fewer than 13"):
        bench.labels_per_class(labels, 13, seed=3)


def test_the_default_head_grid_has_at_least_the_goals_configurations(bench):
    opts = bench.parse_args([])
    assert opts.budgets == [10, 100, None]
    assert bench.grid_size(opts) >= bench.GOAL_MIN_CONFIGS
    assert bench.grid_size(bench.parse_args(["--head-learning-rates", "0.01", "--head-dropouts", "0"])) == 2


def _row(bench, per_class, transfer, scratch, *, featurize=10.0, heads=20.0, configs=8, scratch_s=100.0):
    def result(acc, trials):
        return {"best": {"test_accuracy": acc, "params": {}}, "trials": trials, "succeeded": trials}

    return bench.row_of(per_class, result(transfer, configs), result(scratch, 1), featurize, heads, scratch_s)


def test_goals_pass_and_miss_on_their_thresholds(bench):
    rows = [_row(bench, 100, 0.951, 0.90), _row(bench, None, 0.9905, 0.989)]
    assert [g["status"] for g in bench.check_goals(rows)] == ["PASS", "PASS", "PASS", "PASS"]
    rows = [_row(bench, 100, 0.949, 0.91), _row(bench, None, 0.989, 0.99, heads=95.0)]
    goals = bench.check_goals(rows)
    assert [g["status"] for g in goals] == ["MISS", "MISS", "MISS", "MISS"]
    assert goals[1]["figures"] == "94.90 % vs 91.00 %: +3.90 points"
    assert goals[3]["figures"] == "10 s + 95 s (8 configs) = 105 s vs 100 s"
    fast_but_small = bench.check_goals([_row(bench, None, 0.995, 0.99, configs=7)])
    assert fast_but_small[3]["status"] == "MISS"  # fewer than 8 configurations never pass the time goal


def test_a_budget_not_run_is_not_a_pass_and_the_report_says_every_figure(bench):
    rows = [_row(bench, 10, 0.8, 0.5)]
    goals = bench.check_goals(rows)
    assert [g["status"] for g in goals] == ["not run"] * 4
    report = bench.format_report(rows, goals)
    assert "| 10 | 80.00 % | 50.00 % | +30.00 | 10.0 | 20.0 | 8 | 100.0 |" in report
    assert "not run: all labels: transfer >= 99.0 %" in report
