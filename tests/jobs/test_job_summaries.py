"""The pure summaries the jobs build from their work: what reaches XCom and the driver."""

from __future__ import annotations

from sparktf import knobs, scoring, trials
from sparktf.jobs import tune


def _record(trial_id: str, val: float, test: float, *, status: str = "ok", executor_id: str = "1") -> dict:
    return {
        "trial_id": trial_id,
        "params": dict.fromkeys(knobs.search_dimensions(), 1),
        "status": status,
        "reason": None if status == "ok" else "loss became NaN",
        "val_accuracy": val,
        "test_accuracy": test,
        "val_loss": 0.1,
        "epochs_run": 2,
        "train_seconds": 1.0,
        "executor": {"executor_id": executor_id, "host": "127.0.0.1"},
    }


def test_the_tuning_summary_names_the_best_trial_by_validation_and_counts_failures():
    records = [_record("a", 0.90, 0.99), _record("b", 0.95, 0.91, executor_id="2"), {**_record("c", 0.0, 0.0, status="failed"), "reused": True}]
    results = {"trials": records, "figure_uri": "s3://b/run/fig.png", "wall_seconds": 1.5}
    summary = tune.job_summary(results, trials.leaderboard(records), results_uri="s3://b/run/results.json", trials_uri="s3://b/run/trials")
    assert summary["best"]["trial_id"] == "b"  # validation decides, not test
    assert (summary["trials"], summary["succeeded"], summary["failed"], summary["reused"]) == (3, 2, 1, 1)
    assert summary["failed_trials"] == [{"trial_id": "c", "reason": "loss became NaN"}]
    assert summary["executors"] == ["1", "2"]
    assert (summary["results_uri"], summary["trials_uri"]) == ("s3://b/run/results.json", "s3://b/run/trials")


def test_a_partition_summary_counts_labels_and_reasons_and_keeps_a_sample_of_errors():
    scored = {
        "predictions": [{"key": f"k{i}", "predicted_label": "7" if i % 3 else "1"} for i in range(6)],
        "errors": [{"key": f"bad{i}", "reason": "not_an_image", "detail": ""} for i in range(60)],
        "stats": {"batches": 1},
    }
    summary = scoring.partition_summary(3, ("part-00003-0-x.parquet", 100), ("_errors/part-00003-0-x.parquet", 20), scored, {"executor_id": "4"})
    assert (summary["scored"], summary["set_aside"]) == (6, 60)
    assert summary["labels"] == {"1": 2, "7": 4}
    assert summary["reasons"] == {"not_an_image": 60}
    assert len(summary["errors"]) == 50
    assert (summary["file"], summary["file_size"], summary["errors_size"], summary["executor"]) == ("part-00003-0-x.parquet", 100, 20, "4")
