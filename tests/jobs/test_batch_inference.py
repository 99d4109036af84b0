"""batch_inference job on local Spark and a real S3 server: a tiny real Keras model, a partition
of images in every mode/format/size mixed with corrupt files, atomic re-runs, and failure modes."""

from __future__ import annotations

import numpy as np
import pytest

from sparktf import incoming, predictions, registry, scoring, storage
from sparktf.images import decode_image
from sparktf.jobs import batch_inference
from sparktf_dev.testing import LABEL_NAMES, batch_inference_argv, land_partition, train_tiny_model
from sparktf_dev.testing import register_trial as register_model

DATE = "2026-11-20"
PROCESSED_AT = "2026-11-21T02:30:00+00:00"
VALID = 50


@pytest.fixture(scope="module")
def workspace(bucket, mnist_subset) -> dict:
    """A registry with one champion (v1) and an incoming partition of 50 valid + 8 bad files."""
    ws = f"s3://{bucket}/inference-job/ws"
    record = train_tiny_model(ws + "/scratch", mnist_subset)
    metadata = register_model(ws + "/models/", "digits", record)
    _train_x, _train_y, test_x, test_y = mnist_subset
    landed = land_partition(ws + "/incoming/", DATE, test_x[:VALID], test_y[:VALID])
    return {"ws": ws, "metadata": metadata, "landed": landed}


def job_args(ws: str, date: str = DATE, *extra: str, models: str | None = None):
    return batch_inference.parse_args(
        batch_inference_argv(ws, date, "--batch-size", "16", "--max-keys-per-task", "10", *extra, models_uri=models, processed_at=PROCESSED_AT)
    )


@pytest.fixture(scope="module")
def first_run(spark, workspace) -> dict:
    return batch_inference.run(spark, job_args(workspace["ws"], DATE, "--attempt-id", "first"))


@pytest.fixture(scope="module")
def reference(workspace) -> dict:
    """The model's own output on each valid image, decoded in this process."""
    metadata = workspace["metadata"]
    model = registry.load_verified_model(metadata["model_uri"], metadata["model_sha256"])
    valid = {k: v for k, v in workspace["landed"].items() if "label" in v}
    keys = sorted(valid)
    batch = np.stack([decode_image(valid[k]["bytes"]) for k in keys])
    probabilities = np.asarray(model(batch, training=False))
    return {k: probabilities[i] for i, k in enumerate(keys)}


def test_every_image_is_scored_or_set_aside(first_run, workspace):
    landed = workspace["landed"]
    assert first_run["listed"] == len(landed) == VALID + 8
    assert first_run["scored"] == VALID
    assert first_run["set_aside"] == 8
    assert first_run["scored"] + first_run["set_aside"] == first_run["listed"]
    assert first_run["model_version"] == 1
    assert first_run["tasks"] == 6
    assert sum(first_run["label_histogram"].values()) == VALID
    assert not first_run["failure_ratio_exceeded"]


def test_predictions_match_the_model_on_the_decoded_array(first_run, workspace, reference):
    rows, _errors = predictions.read_predictions(first_run["output_uri"])
    by_key = {row["key"]: row for row in rows}
    assert set(by_key) == set(reference)  # every valid image, nothing else, no duplicates
    assert len(rows) == len(by_key)
    for key, probabilities in reference.items():
        row = by_key[key]
        order = np.argsort(-probabilities, kind="stable")[:5]
        assert [t["label"] for t in row["top_k"]] == [LABEL_NAMES[i] for i in order], key
        assert np.allclose([t["score"] for t in row["top_k"]], probabilities[order], atol=1e-5), key
        assert row["predicted_label"] == LABEL_NAMES[order[0]]
        assert row["score"] == row["top_k"][0]["score"]
        assert row["model_name"] == "digits"
        assert row["model_version"] == 1
        assert row["partition_date"] == DATE
        assert row["processed_at"].isoformat() == PROCESSED_AT
    landed = workspace["landed"]
    correct = np.mean([by_key[k]["predicted_label"] == landed[k]["label"] for k in by_key])
    assert correct >= 0.7, f"only {correct:.0%} of the digits recognised"


def test_every_bad_file_is_listed_with_its_reason(first_run, workspace):
    _predictions, errors = predictions.read_predictions(first_run["output_uri"])
    bad = {k: v["reasons"] for k, v in workspace["landed"].items() if "reasons" in v}
    by_key = {row["key"]: row for row in errors}
    assert set(by_key) == set(bad)
    assert len(errors) == len(bad)
    for key, reasons in bad.items():
        assert by_key[key]["reason"] in reasons, (key, by_key[key])
    assert sum(first_run["reasons"].values()) == 8
    assert {e["key"] for e in first_run["errors_sample"]} == set(bad)


def test_partition_is_published_with_a_manifest_of_sizes_and_etags(first_run, workspace):
    ws = workspace["ws"]
    manifest = predictions.read_published(first_run["output_uri"])
    assert manifest["format"] == predictions.MANIFEST_FORMAT
    assert (manifest["listed"], manifest["scored"], manifest["set_aside"]) == (VALID + 8, VALID, 8)
    assert manifest["model_version"] == 1
    assert manifest["model_sha256"] == workspace["metadata"]["model_sha256"]
    assert manifest["replaces"] is None
    assert manifest["publish_id"] == first_run["publish_id"]
    assert first_run["publish_id"].startswith("first-")
    assert first_run["output_uri"] == f"{ws}/predictions/digits/{DATE}/"  # one folder per model
    present = {o["key"][len(storage.parse_uri(first_run["output_uri"]).key) :]: o for o in storage.iter_objects(first_run["output_uri"])}
    assert set(present) == set(predictions.listed_files(manifest)) | {predictions.MANIFEST_NAME}
    for rel in predictions.listed_files(manifest):
        # every file is named after this attempt and recorded with the size and ETag it has
        assert predictions.publisher_of(rel) == first_run["publish_id"], rel
        assert manifest["objects"][rel]["size"] == present[rel]["size"]
        assert manifest["objects"][rel]["etag"] == present[rel]["etag"]
    assert sum(manifest["objects"][rel]["rows"] for rel in manifest["files"]["predictions"]) == VALID
    assert sum(manifest["objects"][rel]["rows"] for rel in manifest["files"]["errors"]) == 8
    assert storage.list_keys(f"{ws}/predictions/digits/_staging/") == []


def test_model_is_loaded_once_per_python_worker(first_run):
    # 6 tasks ran on at most 2 reused Python workers: the model was loaded once per worker at most.
    assert first_run["python_workers"] <= 2
    assert 1 <= first_run["model_loads"] <= first_run["python_workers"]


def canonical(rows):
    return sorted((r["key"], r["predicted_label"], round(r["score"], 5), str(r["processed_at"])) for r in rows)


def test_rerun_replaces_the_partition_with_identical_rows(spark, first_run, workspace):
    ws = workspace["ws"]
    partition = first_run["output_uri"]
    before_rows, before_errors = predictions.read_predictions(partition)
    first_files = predictions.listed_files(predictions.read_published(partition))
    # A stray file in the partition is removed by the re-run. Another attempt still in flight
    # (its marker is fresh) keeps its staging and the copies it already made; a staging folder
    # without a marker is not the re-run's either: both are left for their owners.
    storage.write_bytes(partition + "part-99999.parquet", b"stale")
    in_flight = predictions.staging_uri(ws + "/predictions/digits/", DATE, "other-run-1-0a0b0c0d")
    storage.write_json(in_flight + predictions.ATTEMPT_MARKER, {"publish_id": "other-run-1-0a0b0c0d"})
    storage.write_bytes(partition + predictions.part_name("other-run-1-0a0b0c0d", 0), b"being copied")
    storage.write_bytes(f"{ws}/predictions/digits/_staging/{DATE}/crashed/part-00000.parquet", b"half")
    # Another model scoring the same day at the same time: its partition and staging are its own.
    others = [f"{ws}/predictions/photos/_staging/{DATE}/running/part-00000.parquet", f"{ws}/predictions/photos/{DATE}/_SUCCESS"]
    for uri in others:
        storage.write_bytes(uri, b"another model's")
    again = batch_inference.run(spark, job_args(ws, DATE, "--attempt-id", "second", "--max-keys-per-task", "20"))
    after_rows, after_errors = predictions.read_predictions(again["output_uri"])

    assert canonical(after_rows) == canonical(before_rows)
    assert sorted((e["key"], e["reason"]) for e in after_errors) == sorted((e["key"], e["reason"]) for e in before_errors)
    manifest = predictions.read_published(partition)
    assert manifest["attempt_id"] == "second"
    assert manifest["replaces"]["publish_id"] == first_run["publish_id"]
    assert again["tasks"] == 4
    assert again["replaced"]["publish_id"] == first_run["publish_id"]
    assert storage.head(partition + "part-99999.parquet") is None
    assert all(storage.head(partition + rel) is None for rel in first_files)  # the replaced output is gone
    assert storage.head(partition + predictions.part_name("other-run-1-0a0b0c0d", 0)) is not None
    assert storage.list_keys(f"{ws}/predictions/digits/_staging/{DATE}/") == sorted(
        [
            storage.parse_uri(in_flight).key + predictions.ATTEMPT_MARKER,
            f"{storage.parse_uri(ws).key}/predictions/digits/_staging/{DATE}/crashed/part-00000.parquet",
        ]
    )
    assert all(storage.read_bytes(uri) == b"another model's" for uri in others)


def test_attempts_dead_for_longer_than_the_stale_limit_are_cleaned_up(spark, first_run, workspace, monkeypatch):
    ws = workspace["ws"]
    partition = first_run["output_uri"]
    storage.write_json(
        predictions.staging_uri(ws + "/predictions/digits/", DATE, "dead-1-00000000") + predictions.ATTEMPT_MARKER, {"publish_id": "dead-1-00000000"}
    )
    storage.write_bytes(partition + predictions.part_name("dead-1-00000000", 3), b"never published")
    monkeypatch.setattr(predictions, "STALE_ATTEMPT_SECONDS", 0)  # every other attempt counts as dead
    batch_inference.run(spark, job_args(ws, DATE, "--attempt-id", "third"))
    manifest = predictions.read_published(partition)
    present = {k[len(storage.parse_uri(partition).key) :] for k in storage.list_keys(partition)}
    assert present == set(predictions.listed_files(manifest)) | {predictions.MANIFEST_NAME}
    assert storage.list_keys(f"{ws}/predictions/digits/_staging/") == []


def test_pinned_version_is_used(spark, workspace, first_run):
    record = train_tiny_model("", None)  # already trained in this process
    register_model(workspace["ws"] + "/models/", "digits", record, version=2, champion=False)
    result = batch_inference.run(spark, job_args(workspace["ws"], DATE, "--model-version", "2"))
    assert result["model_version"] == 2
    rows, _ = predictions.read_predictions(result["output_uri"])
    assert {r["model_version"] for r in rows} == {2}


def test_empty_partition_publishes_an_empty_partition(spark, workspace):
    result = batch_inference.run(spark, job_args(workspace["ws"], "2026-11-19"))
    assert (result["listed"], result["scored"], result["set_aside"]) == (0, 0, 0)
    assert result["model_loads"] == 0  # nothing to score: the model is not even loaded
    manifest = predictions.read_published(result["output_uri"])
    assert manifest["listed"] == 0
    assert not manifest["failure_ratio_exceeded"]
    rows, errors = predictions.read_predictions(result["output_uri"])
    assert rows == []
    assert errors == []


def test_missing_champion_fails_with_a_clear_message(spark, workspace, s3_prefix):
    with pytest.raises(registry.ModelNotFound, match="has no champion"):
        batch_inference.run(spark, job_args(workspace["ws"], DATE, models=s3_prefix + "/models/"))
    with pytest.raises(registry.ModelNotFound, match="version 7 does not exist"):
        batch_inference.run(spark, job_args(workspace["ws"], DATE, "--model-version", "7"))


def test_failure_ratio_breach_fails_after_writing(spark, workspace, s3_prefix, mnist_subset):
    ws = s3_prefix
    record = train_tiny_model("", None)
    register_model(ws + "/models/", "digits", record)
    _tx, _ty, test_x, test_y = mnist_subset
    landed = land_partition(ws + "/incoming/", DATE, test_x[:3], test_y[:3])  # 3 valid, 8 bad
    with pytest.raises(Exception, match="set aside, more than --max-failure-ratio"):
        batch_inference.run(spark, job_args(ws, DATE))
    rows, errors = predictions.read_predictions(f"{ws}/predictions/digits/{DATE}/")
    assert len(rows) == 3
    assert len(errors) == 8
    assert len(landed) == 11
    manifest = predictions.read_published(f"{ws}/predictions/digits/{DATE}/")
    assert manifest["failure_ratio_exceeded"] is True
    assert manifest["set_aside_ratio"] == pytest.approx(8 / 11, abs=1e-4)


def test_top_k_and_task_planning():
    probabilities = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], np.float32)
    order, scores = scoring.top_k(probabilities, 5)
    assert order.tolist() == [[1, 2, 0], [0, 1, 2]]
    assert np.allclose(scores[1], [0.5, 0.25, 0.25])
    assert incoming.plan_tasks(0, 2, 10) == 1
    assert incoming.plan_tasks(58, 2, 10) == 6
    assert incoming.plan_tasks(5000, 2, 2000) == 4
    assert incoming.plan_tasks(3, 8, 10) == 3
    groups = incoming.assign_keys([str(i) for i in range(7)], 3)
    assert groups == [["0", "3", "6"], ["1", "4"], ["2", "5"]]
    with pytest.raises(ValueError, match=r"partition date '2026-13-01' is not a day of the calendar \(month must be"):
        predictions.check_date("2026-13-01")
    with pytest.raises(ValueError, match="partition date must be YYYY-MM-DD"):
        predictions.check_date("20261301")


def task_summary(index: int, scored: int, set_aside: int, labels: dict, reasons: dict, **stats) -> dict:
    return {
        "index": index,
        "file": f"part-{index:05d}-0-x.parquet",
        "errors_file": f"_errors/part-{index:05d}-0-x.parquet",
        "file_size": 100 + index,
        "errors_size": 10 + index,
        "scored": scored,
        "set_aside": set_aside,
        "labels": labels,
        "reasons": reasons,
        "errors": [{"key": f"k{index}", "reason": "not_an_image"}] * set_aside,
        "executor": "driver",
        "stats": {"model_loaded_now": index == 0, "pid": 7, "model_seconds": 0.5, **stats},
    }


def test_task_summaries_are_added_up_in_label_order():
    tasks = [
        task_summary(0, 3, 1, {"10": 1, "2": 2}, {"not_an_image": 1}, storage_retries=2),
        task_summary(1, 2, 2, {"2": 1, "x": 1}, {"too_large": 1, "not_an_image": 1}),
    ]
    summary = batch_inference.summarise_tasks(tasks, ["2", "10"], listed=8, max_failure_ratio=0.3)
    assert (summary["scored"], summary["set_aside"], summary["ratio"]) == (5, 3, 3 / 8)
    assert list(summary["label_histogram"].items()) == [("2", 3), ("10", 1), ("x", 1)]  # the model's order, then others
    assert summary["reasons"] == {"not_an_image": 2, "too_large": 1}
    assert summary["storage_retries"] == 2
    assert summary["failure_ratio_exceeded"] is True
    with pytest.raises(RuntimeError, match="accounting error: 5 scored \\+ 3 set aside != 9 listed"):
        batch_inference.summarise_tasks(tasks, ["2", "10"], listed=9, max_failure_ratio=0.3)
    assert batch_inference.summarise_tasks([], [], listed=0, max_failure_ratio=0.0)["ratio"] == 0.0


def test_the_publish_gets_exactly_the_parts_the_tasks_reported():
    files = batch_inference.staged_files([task_summary(1, 2, 0, {}, {})])
    assert files == [
        {"name": "part-00001-0-x.parquet", "kind": "predictions", "index": 1, "rows": 2, "size": 101},
        {"name": "_errors/part-00001-0-x.parquet", "kind": "errors", "index": 1, "rows": 0, "size": 11},
    ]
    groups = batch_inference.plan_groups([{"key": k, "size": i} for i, k in enumerate("abcde")], 2, 2)
    assert groups == [(0, ["a", "e"], {"a": 0, "e": 4}), (1, ["b"], {"b": 1}), (2, ["c"], {"c": 2}), (3, ["d"], {"d": 3})]
    name, errors_name = scoring.staged_part_names(3, "1-abc")
    assert (name, errors_name) == ("part-00003-1-abc.parquet", "_errors/part-00003-1-abc.parquet")


def test_prediction_rows_keep_the_top_k_and_refuse_a_mismatched_output():
    rows = scoring.prediction_rows(["a", "b"], np.array([[0.2, 0.8], [0.6, 0.4]], np.float32), ["x", "y"], 1)
    assert rows == [
        {"key": "a", "predicted_label": "y", "score": pytest.approx(0.8), "top_k": [{"label": "y", "score": pytest.approx(0.8)}]},
        {"key": "b", "predicted_label": "x", "score": pytest.approx(0.6), "top_k": [{"label": "x", "score": pytest.approx(0.6)}]},
    ]
    with pytest.raises(ValueError, match=r"model output \(2, 2\) does not match 2 images x 3 labels"):
        scoring.prediction_rows(["a", "b"], np.zeros((2, 2), np.float32), ["x", "y", "z"], 1)
