"""Publishing a predictions partition when runs overlap, copies fail, re-runs shrink, and the
incoming folder holds markers and oversized objects.

Races are made deterministic by running the other job *inside* a storage call of the first one
(a hook between two steps), never by timing.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from PIL import Image

from sparktf import incoming, job, predictions, registry, scoring, storage
from sparktf.jobs import batch_inference
from sparktf_dev.faults import FaultProxy, FaultRule, route_storage
from sparktf_dev.testing import batch_inference_argv, encode, land_partition, train_tiny_model
from sparktf_dev.testing import register_trial as register_model

PROCESSED_AT = "2026-11-21T02:30:00+00:00"
IMAGES = 12


@pytest.fixture(scope="module")
def ws(bucket, mnist_subset) -> str:
    """A registry with champion v1 and a v2 of the same weights (rows tell the runs apart)."""
    ws = f"s3://{bucket}/inference-publish/ws"
    record = train_tiny_model(ws + "/scratch", mnist_subset)
    register_model(ws + "/models/", "digits", record)
    register_model(ws + "/models/", "digits", record, version=2, champion=False)
    return ws


_DAYS = itertools.count(1)


@pytest.fixture
def landed(ws, mnist_subset) -> str:
    """A date of its own for each test, with IMAGES valid digits landed."""
    date = f"2026-10-{next(_DAYS):02d}"
    _tx, _ty, test_x, test_y = mnist_subset
    land_partition(ws + "/incoming/", date, test_x[:IMAGES], test_y[:IMAGES], with_bad=False)
    return date


def args(ws: str, date: str, *extra: str):
    return batch_inference.parse_args(
        batch_inference_argv(ws, date, "--batch-size", "8", "--max-keys-per-task", "8", *extra, processed_at=PROCESSED_AT)
    )


def run_once_inside(monkeypatch, module, name: str, when, action) -> list:
    """Make ``module.name`` run ``action()`` once, the first time ``when(*args)`` holds, before
    doing its own work: the other run happens exactly between two steps of this one."""
    original = getattr(module, name)
    fired: list = []

    def hooked(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(True)
            action()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, hooked)
    return fired


def relative_keys(partition: str) -> set[str]:
    prefix = storage.parse_uri(partition).key
    return {key[len(prefix) :] for key in storage.list_keys(partition)}


def failure_of(action) -> Exception | None:
    """Run ``action()``; the exception it raised, or None (assertions on the store come first)."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - returned for the test to check
        return err
    return None


def assert_whole(partition: str, attempt_id: str, model_version: int, rows: int = IMAGES) -> dict:
    """The partition is exactly one run's complete output, and nothing else."""
    manifest = predictions.read_published(partition)
    assert manifest is not None, f"{partition} has no _SUCCESS"
    scored, errors = predictions.read_predictions(partition)
    assert {r["model_version"] for r in scored} <= {manifest["model_version"]}, "rows of another run's files"
    assert len(scored) == manifest["scored"] == rows
    assert errors == []
    listed = manifest["files"]["predictions"] + manifest["files"]["errors"]
    assert relative_keys(partition) == set(listed) | {predictions.MANIFEST_NAME}
    assert manifest["attempt_id"] == attempt_id
    assert manifest["model_version"] == model_version
    assert all(predictions.publisher_of(rel) == manifest["publish_id"] for rel in listed)
    return manifest


def test_a_run_that_publishes_while_another_publishes_wins_and_the_other_changes_nothing(spark, ws, landed, monkeypatch):
    date = landed
    partition = f"{ws}/predictions/digits/{date}/"
    other: dict = {}
    # The manual run has copied its files and is about to write _SUCCESS when the nightly run
    # (pinned to v2) starts, scores, and publishes from start to end.
    fired = run_once_inside(
        monkeypatch,
        storage,
        "write_json",
        lambda uri, *a, **k: uri == partition + predictions.MANIFEST_NAME,
        lambda: other.update(batch_inference.run(spark, args(ws, date, "--attempt-id", "nightly", "--model-version", "2"))),
    )
    lost = failure_of(lambda: batch_inference.run(spark, args(ws, date, "--attempt-id", "manual")))
    assert fired
    assert_whole(partition, "nightly", 2)
    assert other["published"]
    assert isinstance(lost, job.FinalFailure)
    assert "first run to publish wins" in str(lost)
    assert "attempt nightly" in str(lost)
    assert lost.result["published"] is False
    assert storage.list_keys(f"{ws}/predictions/digits/_staging/{date}/") == []


def test_a_run_that_finishes_while_another_is_scoring_wins(spark, ws, landed, monkeypatch):
    date = landed
    partition = f"{ws}/predictions/digits/{date}/"
    incoming = predictions.partition_uri(ws + "/incoming/", date)
    # The manual run has started (and seen an unpublished date) when the nightly run does all its work.
    fired = run_once_inside(
        monkeypatch,
        storage,
        "iter_objects",
        lambda prefix, *a, **k: prefix == incoming,
        lambda: batch_inference.run(spark, args(ws, date, "--attempt-id", "nightly", "--model-version", "2")),
    )
    lost = failure_of(lambda: batch_inference.run(spark, args(ws, date, "--attempt-id", "manual")))
    assert fired
    assert_whole(partition, "nightly", 2)
    assert isinstance(lost, job.FinalFailure)
    assert "first run to publish wins" in str(lost)
    assert storage.list_keys(f"{ws}/predictions/digits/_staging/{date}/") == []

    # Run again afterwards, the manual run replaces it: it has seen the nightly output now.
    batch_inference.run(spark, args(ws, date, "--attempt-id", "manual-again"))
    assert_whole(partition, "manual-again", 1)


def test_a_zombie_task_attempt_that_stages_after_the_winner_reported_cannot_change_the_partition(spark, ws, landed, monkeypatch):
    """After every task reported its parts, a zombie attempt of task 0 (other keys, model v2) stages
    its output: the publish copies exactly the files the winners reported."""
    date = landed
    partition = f"{ws}/predictions/digits/{date}/"
    keys = storage.list_keys(predictions.partition_uri(ws + "/incoming/", date))
    zombie: dict = {}
    publish = predictions.publish_partition

    def zombie_stages_first(attempt, staged_files, *rest, **kwargs):
        zombie.update(
            scoring.score_partition(
                0,
                keys[:3],
                bucket=storage.parse_uri(ws).bucket,
                staged_uri=attempt.staged_uri,
                model=registry.resolve(ws + "/models/", "digits", "2"),
                partition_date=date,
                processed_at=batch_inference.processed_timestamp(PROCESSED_AT, date),
                batch_size=8,
                fetch_threads=2,
                max_pixels=40_000_000,
                top=5,
            )
        )
        zombie["winners"] = [f["name"] for f in staged_files]
        return publish(attempt, staged_files, *rest, **kwargs)

    monkeypatch.setattr(predictions, "publish_partition", zombie_stages_first)
    batch_inference.run(spark, args(ws, date, "--attempt-id", "winner"))
    assert zombie["scored"] == 3
    assert_whole(partition, "winner", 1)  # every row of the winners' parts, none of the zombie's
    scored, _errors = predictions.read_predictions(partition)
    assert sorted(r["key"] for r in scored) == keys
    assert zombie["file"] not in zombie["winners"]
    assert zombie["errors_file"] not in zombie["winners"]


def test_a_failed_copy_leaves_the_published_partition_whole(spark, ws, landed, s3_server):
    date = landed
    partition = f"{ws}/predictions/digits/{date}/"
    first = batch_inference.run(spark, args(ws, date, "--attempt-id", "good"))
    before = predictions.read_predictions(partition)
    # The re-run's first copy into the partition goes through, every other one is refused.
    rules = [
        FaultRule("latency", method="PUT", copy=True, key=f"/predictions/digits/{date}/", times=1),
        FaultRule("access_denied", method="PUT", copy=True, key=f"/predictions/digits/{date}/"),
    ]
    with FaultProxy(s3_server.endpoint, rules=rules) as proxy, route_storage(proxy.settings(s3_server.settings())):
        failed = failure_of(lambda: batch_inference.run(spark, args(ws, date, "--attempt-id", "rerun", "--max-keys-per-task", "4")))
    assert proxy.faults["access_denied"] >= 1
    manifest = assert_whole(partition, "good", 1)
    assert "AccessDenied" in str(failed)
    assert manifest["publish_id"] == first["publish_id"]
    assert predictions.read_predictions(partition) == before
    assert storage.list_keys(f"{ws}/predictions/digits/_staging/{date}/") == []


def test_a_rerun_that_would_shrink_the_partition_is_refused_unless_allowed(spark, ws, landed):
    date = landed
    partition = f"{ws}/predictions/digits/{date}/"
    first = batch_inference.run(spark, args(ws, date, "--attempt-id", "full"))
    listed = incoming.list_partition(ws + "/incoming/", date)
    bucket = storage.parse_uri(ws).bucket
    storage.delete_keys(bucket, [o["key"] for o in listed[: IMAGES - 5]])  # most images expired: 5 left

    refused = failure_of(lambda: batch_inference.run(spark, args(ws, date, "--attempt-id", "expired")))
    assert_whole(partition, "full", 1)
    assert predictions.read_published(partition)["publish_id"] == first["publish_id"]
    assert isinstance(refused, job.FinalFailure)
    assert re.search("refusing to replace .* with 5: fewer than 50%", str(refused)), refused

    storage.delete_keys(bucket, [o["key"] for o in listed])  # nothing left at all
    refused = failure_of(lambda: batch_inference.run(spark, args(ws, date, "--attempt-id", "empty")))
    assert_whole(partition, "full", 1)
    assert isinstance(refused, job.FinalFailure)
    assert "with 0" in str(refused)
    assert storage.list_keys(f"{ws}/predictions/digits/_staging/{date}/") == []

    allowed = batch_inference.run(spark, args(ws, date, "--attempt-id", "allowed", "--allow-shrink", "true"))
    assert allowed["listed"] == 0
    assert allowed["replaced"]["publish_id"] == first["publish_id"]
    assert predictions.read_published(partition)["allow_shrink"] is True
    assert predictions.read_predictions(partition) == ([], [])


def test_folder_markers_are_counted_and_oversized_objects_set_aside_unfetched(spark, ws, landed, s3_server):
    date = landed
    prefix = f"{ws}/incoming/{date}/"
    key = storage.parse_uri(prefix).key
    digit_png = encode(Image.fromarray(np.full((28, 28), 200, np.uint8)), "PNG")
    noise = np.random.default_rng(5).integers(0, 256, (220, 220, 3), dtype=np.uint8)
    storage.write_bytes(prefix + "scans/", b"")  # a folder marker: counted only
    storage.write_bytes(prefix + "camera/", digit_png)  # ends in "/" but is an image
    storage.write_bytes(prefix + "notes/", b"not an image\n")  # ends in "/", has content
    storage.write_bytes(prefix + "huge.png", encode(Image.fromarray(noise), "PNG"))  # ~145 kB
    with FaultProxy(s3_server.endpoint) as proxy, route_storage(proxy.settings(s3_server.settings()), spark):
        result = batch_inference.run(spark, args(ws, date, "--attempt-id", "markers", "--max-image-bytes", "100000"))
    assert result["markers_skipped"] == 1
    assert result["listed"] == IMAGES + 3
    assert (result["scored"], result["set_aside"]) == (IMAGES + 1, 2)
    rows, errors = predictions.read_predictions(result["output_uri"])
    assert key + "camera/" in {r["key"] for r in rows}
    reasons = {e["key"]: (e["reason"], e["detail"]) for e in errors}
    assert reasons[key + "notes/"][0] == "not_an_image"
    assert reasons[key + "huge.png"][0] == "too_large"
    assert "not fetched" in reasons[key + "huge.png"][1]
    assert proxy.requested[("GET", key + "huge.png")] == 0  # set aside by its listed size alone
    assert proxy.requested[("GET", key + "camera/")] >= 1
    assert predictions.read_published(result["output_uri"])["markers_skipped"] == 1
