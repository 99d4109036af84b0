"""Test support for ``test_trial_attempts``: trials as Spark tasks that Spark retries.

Runs each trial as its own task on a ``local[1,3]`` master (one slot, three attempts per task:
local mode's way to allow retries) with the storage retries shortened, so a store that keeps
failing one request makes the attempt raise in seconds. Prints nothing; writes the records.

Usage: ``python trial_retry_job.py <trials-uri> <records.json> <job-id> <trial-id>...``
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

PARAMS = {"learning_rate": 0.01, "hidden_units": 8, "batch_size": 32, "dropout": 0.0, "optimizer": "adam"}


def train_group(trials_uri: str, job_id: str):
    def task(trial_ids: Iterator[str]) -> Iterator[dict]:
        import numpy as np

        from sparktf import storage, trials
        from sparktf_dev import testing

        # One try per request and short backoffs: a failing request outlives its retries quickly.
        storage.REQUEST_MAX_ATTEMPTS = 0
        storage.BACKOFF_BASE_SECONDS = 0.01
        train_x, train_y, test_x, test_y = testing.read_mnist()
        data = {
            "x_train": train_x[:300, :, :, None],
            "y_train": train_y[:300].astype(np.int32),
            "x_val": train_x[300:400, :, :, None],
            "y_val": train_y[300:400].astype(np.int32),
            "x_test": test_x[:100, :, :, None],
            "y_test": test_y[:100].astype(np.int32),
            "input_shape": (28, 28, 1),
            "num_classes": 10,
        }
        for trial_id in trial_ids:
            yield trials.train_trial(
                {"trial_id": trial_id, "params": PARAMS}, data, family="mlp", epochs=1, patience=1, trials_uri=trials_uri, seed=3, job_id=job_id
            )

    return task


def main(argv: list[str]) -> int:
    trials_uri, out_path, job_id, *trial_ids = argv
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[1,3]")
        .appName("trial-retries")
        .config("spark.ui.enabled", "false")
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )
    try:
        records = spark.sparkContext.parallelize(trial_ids, len(trial_ids)).mapPartitions(train_group(trials_uri, job_id)).collect()
    finally:
        spark.stop()
    with open(out_path, "w") as fh:
        json.dump(records, fh, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
