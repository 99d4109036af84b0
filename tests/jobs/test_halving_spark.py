"""Successive halving on Spark (tune job, ``--search-strategy halving``): tiny data, real Keras, local SparkSession."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparktf import halving_driver, rungs, storage
from sparktf.jobs import export_model, prepare_data, tune
from sparktf_dev.testing import ROOT, crash_test_env, upload_mnist


@pytest.fixture(scope="module")
def prepared(spark, bucket, mnist_subset):
    raw = f"s3://{bucket}/halving/raw"
    upload_mnist(raw, mnist_subset, train_limit=400, test_limit=100)
    out = f"s3://{bucket}/halving/prepared/"
    prepare_data.run(spark, prepare_data.parse_args(["--input-uri", raw, "--output-uri", out]))
    return out


def halving_args(prepared_uri: str, output_uri: str):
    """4 configurations, rungs at 1 and 2 epochs, factor 2."""
    return tune.parse_args(sys_args(prepared_uri, output_uri))


def attempt_records(trials_uri: str) -> list[dict]:
    """Every rung-step attempt's own record in the store (one per trained step, whichever run trained it)."""
    keys = storage.list_keys(storage.prefix_uri(trials_uri))
    bucket = storage.parse_uri(trials_uri).bucket
    return [storage.read_json(storage.object_uri(bucket, k)) for k in keys if "/rungs/" in k and "/attempts/" in k and k.endswith("/metrics.json")]


class CutAfter:
    """Fails the driver once it has ``steps`` records, as a killed or cleared task would end the run."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, *, record: dict, done: int) -> None:
        if done >= self.steps:
            raise RuntimeError(f"cut after {done} rung steps (test)")


def test_a_cut_run_resumes_from_the_last_completed_rung_and_trains_no_epoch_twice(spark, prepared, s3_prefix):
    out = f"{s3_prefix}/tuning/"
    halving_driver.TEST_HOOKS["after_step"] = CutAfter(3)
    try:
        with pytest.raises(RuntimeError, match="cut after"):
            tune.run(spark, halving_args(prepared, out))
    finally:
        halving_driver.TEST_HOOKS.clear()
    trials_uri = storage.join_uri(out, "trials")
    trained_before = len(attempt_records(trials_uri))
    trained_epochs_before = sum(r["epochs_trained"] for r in attempt_records(trials_uri))
    assert trained_before >= 3

    result = tune.run(spark, halving_args(prepared, out))
    stats = result["halving"]
    assert stats["rungs"] == [1, 2]
    assert stats["rung_steps_reused"] >= 3  # the steps the cut run finished are not trained again
    assert 0 < stats["slot_utilisation"] <= 1

    # Count epochs trained per configuration over both runs: each equals the epochs of the highest rung it reached.
    trained: dict[str, int] = {}
    for record in attempt_records(trials_uri):
        assert record["status"] == "ok", record
        trained[record["config_id"]] = trained.get(record["config_id"], 0) + record["epochs_trained"]
    results = storage.read_json(result["results_uri"])
    reached = {r["trial_id"]: r["epochs_run"] for r in results["trials"]}
    assert trained == reached
    assert sorted(reached.values()).count(2) >= 2  # at least the top half went on to the last rung
    assert stats["trial_epochs"] == sum(reached.values())
    assert stats["epochs_trained_this_run"] == sum(reached.values()) - trained_epochs_before

    # A step above the first trained from its own checkpoint: one epoch, from epoch 1.
    top = [r for r in results["trials"] if r["rung"] == 1]
    assert all(r["from_epochs"] == 1 and len(r["history"]["loss"]) == 1 for r in top)
    best = results["best_trial_id"]
    assert best in {r["trial_id"] for r in top}  # selection at the highest rung
    assert result["leaderboard"][0]["rung"] == 1

    # Clearing the successful run trains nothing: every rung is reused.
    again = tune.run(spark, halving_args(prepared, out))
    assert again["halving"]["epochs_trained_this_run"] == 0
    assert again["halving"]["trial_epochs"] == stats["trial_epochs"]
    assert again["best"]["trial_id"] == best
    assert len(attempt_records(trials_uri)) == sum(len(r["rung_history"]) for r in results["trials"])

    # The selected configuration's checkpoint at its highest rung is what the export job versions.
    exported = export_model.run(
        export_model.parse_args(
            [
                *("--results-uri", result["results_uri"], "--models-uri", f"{s3_prefix}/models/", "--model-name", "digits"),
                *("--source-run", "run-1", "--trained-at", "2026-11-22T03:00:00+00:00"),
            ]
        )
    )
    assert (exported["version"], exported["trial_id"]) == (1, best)


def test_a_rung_record_is_reused_only_with_its_checkpoint_and_fingerprint(s3_prefix):
    checkpoint = f"{s3_prefix}/checkpoint.keras"
    storage.write_bytes(checkpoint, b"weights")
    record = {"status": "ok", "fingerprint": {"a": 1}, "checkpoint_uri": checkpoint, "checkpoint_sha256": storage.sha256_hex(b"weights")}
    assert rungs.reusable(record, {"a": 1}, "job-1")
    assert not rungs.reusable(record, {"a": 2}, "job-1")
    storage.write_bytes(checkpoint, b"other")
    assert not rungs.reusable(record, {"a": 1}, "job-1")
    assert rungs.reusable({"status": "failed", "fingerprint": {"a": 1}, "job_id": "job-1"}, {"a": 1}, "job-1")
    assert not rungs.reusable({"status": "failed", "fingerprint": {"a": 1}, "job_id": "job-0"}, {"a": 1}, "job-1")


def test_a_rung_step_whose_worker_is_killed_ranks_last_and_its_lower_rung_is_not_trained_again(prepared, s3_prefix, tmp_path):
    """spark-submit in local[2,2] (one task retry): every step to the 2-epoch rung SIGKILLs its Python
    worker (the test-only switch); the retried task records the crash instead of training again."""
    from sparktf.airflow.spark_job_operator import package_zip

    out = s3_prefix + "/crash/"
    zip_path, _sha = package_zip()
    env = crash_test_env("/rungs/0002")
    args = sys_args(prepared, out)
    command = [
        str(Path(sys.executable).with_name("spark-submit")),
        "--master",
        "local[2,2]",
        "--conf",
        "spark.ui.enabled=false",
        "--py-files",
        zip_path,
    ]
    command += [str(ROOT / "jobs" / "tune.py"), *args, "--result-uri", out + "result.json"]
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    assert "Python worker exited unexpectedly" in job.stderr

    results = storage.read_json(out + "results.json")
    crashed = [r for r in results["trials"] if r["status"] == "failed"]
    assert crashed
    assert all(r["rung"] == 1 and r["reason"].startswith("crashed: ") and r["attempt"] == 1 for r in crashed)
    assert all(r["rung_history"][0]["status"] == "ok" for r in crashed)  # recorded with the rung they reached
    best = next(r for r in results["trials"] if r["trial_id"] == results["best_trial_id"])
    assert (best["status"], best["rung"]) == ("ok", 0)
    epochs = {}
    for record in attempt_records(out + "trials"):
        epochs[(record["config_id"], record["rung"])] = epochs.get((record["config_id"], record["rung"]), 0) + record["epochs_trained"]
    assert set(epochs.values()) == {1} | ({0} if crashed else set())  # rung 0 once each; the crashed steps' retries trained nothing


def sys_args(prepared_uri: str, output_uri: str) -> list[str]:
    """:func:`halving_args` as a command line."""
    return [
        *("--prepared-uri", prepared_uri, "--output-uri", output_uri, "--model-family", "mlp", "--augment", "0"),
        *("--learning-rates", "0.01,0.003", "--hidden-units", "16,32", "--batch-sizes", "32"),
        *("--search-strategy", "halving", "--halving-min-epochs", "1", "--halving-factor", "2", "--epochs", "2"),
    ]
