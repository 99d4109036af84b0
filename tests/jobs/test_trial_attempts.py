"""One trial's record under duplicate attempts and changed artifacts: real Keras training, real S3."""

from __future__ import annotations

import numpy as np
import pytest

from sparktf import registry, search, storage, trials


@pytest.fixture(autouse=True)
def no_hooks_left():
    yield
    trials.TEST_HOOKS.clear()


@pytest.fixture(scope="module")
def small_data(mnist_subset) -> dict:
    train_x, train_y, test_x, test_y = mnist_subset
    return {"x_train": train_x[:300, :, :, None], "y_train": train_y[:300].astype(np.int32),
            "x_val": train_x[300:400, :, :, None], "y_val": train_y[300:400].astype(np.int32),
            "x_test": test_x[:100, :, :, None], "y_test": test_y[:100].astype(np.int32),
            "input_shape": (28, 28, 1), "num_classes": 10}


PARAMS = {"learning_rate": 0.01, "hidden_units": 8, "batch_size": 32, "dropout": 0.0, "optimizer": "adam"}


def train(trial: dict, data: dict, trials_uri: str, **kwargs) -> dict:
    return trials.train_trial(trial, data, family="mlp", epochs=1, patience=1, trials_uri=trials_uri, seed=3, **kwargs)


def test_a_duplicate_attempt_cannot_make_the_record_name_another_model(s3_prefix, small_data):
    """A zombie attempt of the same trial finishes between this attempt's upload and its record."""
    trial = {"trial_id": search.trial_id(PARAMS), "params": PARAMS}
    duplicate: dict = {}

    def zombie_finishes_first(record: dict) -> None:
        trials.TEST_HOOKS.pop("before_publish")
        duplicate["record"] = train(trial, small_data, s3_prefix)

    trials.TEST_HOOKS["before_publish"] = zombie_finishes_first
    record = train(trial, small_data, s3_prefix)
    zombie = duplicate["record"]
    assert record["status"] == zombie["status"] == "ok" and not zombie.get("reused")
    assert record["attempt_id"] != zombie["attempt_id"] and record["model_uri"] != zombie["model_uri"]

    published = storage.read_json(storage.join_uri(s3_prefix, trial["trial_id"], "metrics.json"))
    assert published == record  # published last
    registry.verify_artifact(published["model_uri"], published["model_sha256"])  # names its own file
    registry.verify_artifact(zombie["model_uri"], zombie["model_sha256"])  # the zombie's file is intact too
    history = trials.attempt_history(s3_prefix, trial["trial_id"])
    assert sorted(a["attempt_id"] for a in history) == sorted([record["attempt_id"], zombie["attempt_id"]])
    assert all(a["started"] and a["finished"] for a in history)


def test_reuse_checks_the_model_file_and_retrains_when_it_changed(s3_prefix, small_data):
    trial = {"trial_id": search.trial_id(PARAMS), "params": PARAMS}
    first = train(trial, small_data, s3_prefix)
    again = train(trial, small_data, s3_prefix)
    assert again["reused"] and again["attempt_id"] == first["attempt_id"]

    blob = bytearray(storage.read_bytes(first["model_uri"]))
    blob[-20] ^= 0xFF
    storage.write_bytes(first["model_uri"], bytes(blob))  # the named file no longer matches the record
    retrained = train(trial, small_data, s3_prefix)
    assert not retrained.get("reused") and retrained["status"] == "ok"
    assert "does not match the record" in retrained["retrained_because"]
    assert retrained["attempt_id"] != first["attempt_id"]
    registry.verify_artifact(retrained["model_uri"], retrained["model_sha256"])
    assert storage.read_json(storage.join_uri(s3_prefix, trial["trial_id"], "metrics.json")) == retrained


def test_a_record_of_other_settings_is_not_reused(s3_prefix, small_data):
    trial = {"trial_id": "trial-fixed-id", "params": PARAMS}
    first = train(trial, small_data, s3_prefix, fingerprint={"manifest_sha256": "a"})
    other = train(trial, small_data, s3_prefix, fingerprint={"manifest_sha256": "b"})
    assert not other.get("reused") and other["fingerprint"] == {"manifest_sha256": "b"}
    assert "fingerprint differs" in other["retrained_because"] and other["attempt_id"] != first["attempt_id"]


def test_failed_records_are_reused_only_within_the_job_that_wrote_them(s3_prefix, small_data):
    bad = {**PARAMS, "hiden_units": 8}  # the model builder refuses it: the trial fails
    trial = {"trial_id": search.trial_id(bad), "params": bad}
    first = train(trial, small_data, s3_prefix, job_id="job-1")
    assert first["status"] == "failed" and first["reason"].startswith("error: ValueError")
    assert train(trial, small_data, s3_prefix, job_id="job-1")["reused"]  # a re-run task of the same job
    later = train(trial, small_data, s3_prefix, job_id="job-2")  # a later run tries again
    assert not later.get("reused") and later["retrained_because"] == "it failed in an earlier run"
