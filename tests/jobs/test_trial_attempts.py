"""One trial's record under duplicate attempts and changed artifacts: real Keras training, real S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from sparktf import registry, search, storage, trials
from sparktf_dev.faults import FaultProxy, FaultRule, route_storage


@pytest.fixture(autouse=True)
def no_hooks_left():
    yield
    trials.TEST_HOOKS.clear()


@pytest.fixture(scope="module")
def small_data(mnist_subset) -> dict:
    train_x, train_y, test_x, test_y = mnist_subset
    return {
        "x_train": train_x[:300, :, :, None],
        "y_train": train_y[:300].astype(np.int32),
        "x_val": train_x[300:400, :, :, None],
        "y_val": train_y[300:400].astype(np.int32),
        "x_test": test_x[:100, :, :, None],
        "y_test": test_y[:100].astype(np.int32),
        "input_shape": (28, 28, 1),
        "num_classes": 10,
    }


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
    assert record["status"] == zombie["status"] == "ok"
    assert not zombie.get("reused")
    assert record["attempt_id"] != zombie["attempt_id"]
    assert record["model_uri"] != zombie["model_uri"]

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
    assert again["reused"]
    assert again["attempt_id"] == first["attempt_id"]

    blob = bytearray(storage.read_bytes(first["model_uri"]))
    blob[-20] ^= 0xFF
    storage.write_bytes(first["model_uri"], bytes(blob))  # the named file no longer matches the record
    retrained = train(trial, small_data, s3_prefix)
    assert not retrained.get("reused")
    assert retrained["status"] == "ok"
    assert "does not match the record" in retrained["retrained_because"]
    assert retrained["attempt_id"] != first["attempt_id"]
    registry.verify_artifact(retrained["model_uri"], retrained["model_sha256"])
    assert storage.read_json(storage.join_uri(s3_prefix, trial["trial_id"], "metrics.json")) == retrained


def test_a_record_of_other_settings_is_not_reused(s3_prefix, small_data):
    trial = {"trial_id": "trial-fixed-id", "params": PARAMS}
    first = train(trial, small_data, s3_prefix, fingerprint={"manifest_sha256": "a"})
    other = train(trial, small_data, s3_prefix, fingerprint={"manifest_sha256": "b"})
    assert not other.get("reused")
    assert other["fingerprint"] == {"manifest_sha256": "b"}
    assert "fingerprint differs" in other["retrained_because"]
    assert other["attempt_id"] != first["attempt_id"]


def test_failed_records_are_reused_only_within_the_job_that_wrote_them(s3_prefix, small_data):
    bad = {**PARAMS, "hiden_units": 8}  # the model builder refuses it: the trial fails
    trial = {"trial_id": search.trial_id(bad), "params": bad}
    first = train(trial, small_data, s3_prefix, job_id="job-1")
    assert first["status"] == "failed"
    assert first["reason"].startswith("error: ValueError")
    assert train(trial, small_data, s3_prefix, job_id="job-1")["reused"]  # a re-run task of the same job
    later = train(trial, small_data, s3_prefix, job_id="job-2")  # a later run tries again
    assert not later.get("reused")
    assert later["retrained_because"] == "it failed in an earlier run"


# ---------------------------------------------------------------------------------------------
# Storage errors are not trial verdicts: the attempt raises, says so, and Spark retries it
# ---------------------------------------------------------------------------------------------


def started(attempt_id: str, job_id: str = "job-1", host: str = "h1", executor_id: str = "1", attempt: int = 0) -> dict:
    return {
        "attempt_id": attempt_id,
        "started": {"attempt_id": attempt_id, "job_id": job_id, "attempt": attempt, "executor": {"host": host, "executor_id": executor_id}},
        "finished": False,
        "raised": False,
    }


def test_only_attempts_that_neither_finished_nor_raised_count_as_killed():
    history = [
        started("0-a"),
        {**started("1-b"), "finished": True},
        {**started("2-c"), "raised": True},
        started("3-d"),
        started("4-e", job_id="job-0"),
        {"attempt_id": "5-f", "started": None, "finished": False, "raised": False},
    ]
    killed = trials.killed_attempts(history, "job-1", raised_here={"3-d"})  # 3-d's marker was lost: local note
    assert [k["attempt_id"] for k in killed] == ["0-a"]


def test_a_crash_verdict_needs_a_death_on_this_executor_or_two_anywhere():
    here = {"host": "h1", "executor_id": "1"}
    elsewhere = started("0-a", host="h2")["started"]
    assert trials.crash_verdict([], here) is None
    assert trials.crash_verdict([elsewhere], here) is None  # a lost node: trained again
    assert trials.crash_verdict([started("0-a")["started"]], here) == [started("0-a")["started"]]
    assert trials.crash_verdict([elsewhere, started("1-b", host="h3")["started"]], here) is not None
    record = trials.crash_record({"trial_id": "t"}, [started("1-b", attempt=1)["started"], elsewhere])
    assert record["reason"] == "crashed: the Python worker died during training (attempts 0, 1)"


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint, seed=1) as running:
        yield running


def test_an_attempt_whose_raised_marker_the_store_refuses_is_still_not_killed(s3_prefix, small_data, proxy, s3_server):
    """The store refuses the model and then the raised marker: the local note says the attempt raised."""
    trial, job_id = {"trial_id": "trial-store-refuses", "params": PARAMS}, f"job-refused-{uuid.uuid4().hex[:8]}"
    proxy.add_rule(FaultRule("access_denied", method="PUT", key=r"trial-store-refuses/attempts/[^/]+/(model\.keras|raised\.json)$"))
    with route_storage(proxy.settings(s3_server.settings())), pytest.raises(Exception, match="AccessDenied") as refused:
        train(trial, small_data, s3_prefix, job_id=job_id)
    assert trials.is_storage_error(refused.value)
    [attempt] = trials.attempt_history(s3_prefix, trial["trial_id"])
    assert attempt["started"]
    assert not attempt["finished"]
    assert not attempt["raised"]
    assert trials.raised_here(job_id, trial["trial_id"]) == {attempt["attempt_id"]}
    assert trials.killed_attempts([attempt], job_id, trials.raised_here(job_id, trial["trial_id"])) == []
    assert storage.read_json_if_exists(storage.join_uri(s3_prefix, trial["trial_id"], "metrics.json")) is None


def test_storage_errors_fail_the_attempt_and_the_retry_trains_the_trial(s3_prefix, proxy, s3_server, tmp_path):
    """Real Spark retries (local[1,3]) through the fault proxy: attempt 0 of one trial cannot save its
    model, attempt 0 of the other cannot publish its record; both raise, and each retry trains the
    trial again and ends ok (not failed, not "crashed")."""
    job_id = "job-retries"
    save_fails, record_fails = "trial-save-fails", "trial-record-fails"
    proxy.add_rule(FaultRule("internal", method="PUT", key=rf"{save_fails}/attempts/0-[^/]+/model\.keras$"))
    proxy.add_rule(FaultRule("internal", method="PUT", key=rf"{record_fails}/attempts/0-[^/]+/metrics\.json$"))
    out = tmp_path / "records.json"
    plugins = str(Path(trials.__file__).resolve().parents[1])
    env = {
        **os.environ,
        **proxy.settings(s3_server.settings()).environment(),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(p for p in (plugins, os.environ.get("PYTHONPATH")) if p),
    }
    command = [sys.executable, str(Path(__file__).with_name("trial_retry_job.py")), s3_prefix, str(out), job_id, save_fails, record_fails]
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    assert "TransientStorageError" in job.stderr  # Spark saw the attempts raise

    records = {r["trial_id"]: r for r in json.loads(out.read_text())}
    assert {t: (r["status"], r["attempt"], r["reason"]) for t, r in records.items()} == {save_fails: ("ok", 1, None), record_fails: ("ok", 1, None)}
    for trial_id, record in records.items():
        assert storage.read_json(storage.join_uri(s3_prefix, trial_id, "metrics.json")) == record
        registry.verify_artifact(record["model_uri"], record["model_sha256"])
        first, retry = trials.attempt_history(s3_prefix, trial_id)
        assert first["started"]["attempt"] == 0
        assert first["raised"]
        assert not first["finished"]
        assert retry["attempt_id"] == record["attempt_id"]
        assert retry["finished"]
        assert not retry["raised"]
        marker = storage.read_json(trials.attempt_uri(s3_prefix, trial_id, first["attempt_id"], trials.RAISED_NAME))
        assert marker["error"].startswith("TransientStorageError: PUT ")
        assert "still failing after" in marker["error"]
    assert proxy.faults["internal"] == 2 * storage.READ_ATTEMPTS  # each failing PUT outlived every retry
