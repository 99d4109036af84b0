"""Progress lines from the driver: each trial or inference task reported once, as it finishes.

The tests write the objects the tasks would write, one at a time, and wait for the line before
writing the next, so "as it happens" is checked without timing assumptions.
"""

from __future__ import annotations

import logging

import pytest

from sparktf import predictions, progress, search, storage
from sparktf_dev.testing import wait_until


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log():
    logger = logging.getLogger(f"sparktf.test-progress-{id(object())}")
    logger.setLevel(logging.INFO)
    handler = Lines()
    logger.addHandler(handler)
    logger.lines = handler.lines
    return logger


def record(trial: dict, status: str = "ok", **extra) -> dict:
    base = {"trial_id": trial["trial_id"], "params": trial["params"], "status": status, "train_seconds": 12.34}
    if status == "ok":
        base.update(val_accuracy=0.9731, test_accuracy=0.97)
    else:
        base["reason"] = "diverged: training loss became NaN/inf in epoch 1"
    return {**base, **extra}


def test_trials_are_reported_one_line_each_as_they_finish(s3_prefix, log):
    space = {"learning_rate": [0.001, 0.003, 0.01], "hidden_units": [64], "batch_size": [128], "dropout": [0.5]}
    trial_a, trial_b, trial_c = search.build_trials(space)
    trials_uri = f"{s3_prefix}/tuning/trials"
    metrics = lambda t: storage.join_uri(trials_uri, t["trial_id"], "metrics.json")
    # Left by an earlier attempt: C finished (the job reuses it), B failed (the job trains it again).
    storage.write_json(metrics(trial_c), record(trial_c))
    storage.write_json(metrics(trial_b), record(trial_b, "failed"))

    watch = progress.TrialProgress(trials_uri, [trial_a, trial_b, trial_c], log=log, interval=0.05).start()
    assert len(log.lines) == 1
    assert "trial 1/3 reused from an earlier attempt (lr 0.01, hidden 64" in log.lines[0]

    storage.write_json(metrics(trial_a), record(trial_a))
    wait_until(lambda: len(log.lines) == 2, "trial A reported", 30)
    watch.poll()  # one more full pass: B's stale record is not a finished trial
    assert len(log.lines) == 2
    assert log.lines[1] == (
        f"tuning progress: trial 2/3 done (lr 0.001, hidden 64, batch 128, dropout 0.5): val_accuracy 0.9731, 12.3 s [{trial_a['trial_id']}]"
    )

    storage.write_json(metrics(trial_b), record(trial_b, "failed", train_seconds=3.0))
    wait_until(lambda: len(log.lines) == 3, "trial B reported", 30)
    assert "trial 3/3 done (lr 0.003, hidden 64, batch 128, dropout 0.5): FAILED: diverged" in log.lines[2]
    watch.stop()
    assert len(log.lines) == 3  # each trial once; nothing left to say


def test_stop_reports_what_finished_since_the_last_poll(s3_prefix, log):
    trials = search.build_trials({"learning_rate": [0.001, 0.002], "hidden_units": [32], "batch_size": [64], "dropout": [0.0]})
    trials_uri = f"{s3_prefix}/trials"
    watch = progress.TrialProgress(trials_uri, trials, log=log, interval=3600).start()  # never polls by itself
    for trial in trials:
        storage.write_json(storage.join_uri(trials_uri, trial["trial_id"], "metrics.json"), record(trial))
    assert log.lines == []
    watch.stop()
    assert [line.split(" (")[0] for line in log.lines] == ["tuning progress: trial 1/2 done", "tuning progress: trial 2/2 done"]


def test_inference_tasks_are_reported_with_their_images(s3_prefix, log):
    staged = f"{s3_prefix}/predictions/_staging/2026-11-20/attempt-1/"
    watch = progress.InferenceProgress(staged, [3, 2], log=log, interval=0.05).start()
    errors = [{"key": "incoming/2026-11-20/x.png", "reason": "not_an_image", "detail": "html"}]
    storage.write_bytes(staged + "part-00001.parquet", b"predictions part")  # not the last file a task writes
    storage.write_bytes(staged + "_errors/part-00001.parquet", predictions.errors_parquet(errors, partition_date="2026-11-20"))
    wait_until(lambda: len(log.lines) == 1, "task 1 reported", 30)
    assert log.lines[0] == "inference progress: task 1 done, 2 images (1 set aside); 1/2 tasks, 2/5 images"
    storage.write_bytes(staged + "_errors/part-00000.parquet", predictions.errors_parquet([], partition_date="2026-11-20"))
    wait_until(lambda: len(log.lines) == 2, "task 0 reported", 30)
    assert log.lines[1] == "inference progress: task 0 done, 3 images; 2/2 tasks, 5/5 images"
    watch.stop()
    assert len(log.lines) == 2


def test_progress_never_fails_the_job(log):
    watch = progress.TrialProgress("s3://no-such-bucket-sparktf/trials", [], log=log, interval=0.05).start()
    watch.stop()
    assert any("no progress lines" in line for line in log.lines)
