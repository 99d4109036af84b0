"""tune and export_model jobs on a tiny prepared data set: real Spark tasks, real Keras training."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from sparktf import dataset, idx, registry, storage
from sparktf.jobs import export_model, prepare_data, tune


@pytest.fixture(scope="module")
def prepared(spark, bucket, mnist_subset):
    train_x, train_y, test_x, test_y = mnist_subset
    raw = f"s3://{bucket}/tune/raw"
    client = storage.client()
    for name, array in {"train-images-idx3-ubyte.gz": train_x[:600], "train-labels-idx1-ubyte.gz": train_y[:600],
                        "t10k-images-idx3-ubyte.gz": test_x[:200], "t10k-labels-idx1-ubyte.gz": test_y[:200]}.items():
        storage.write_bytes(storage.join_uri(raw, name), gzip.compress(idx.encode_idx(array)), client)
    out = f"s3://{bucket}/tune/prepared/"
    prepare_data.run(spark, prepare_data.parse_args(["--input-uri", raw, "--output-uri", out]))
    return out


def tune_args(prepared_uri: str, output_uri: str, *extra: str):
    return tune.parse_args(["--prepared-uri", prepared_uri, "--output-uri", output_uri, "--model-family", "mlp",
                            "--epochs", "2", "--patience", "2", "--batch-sizes", "32", *extra])


@pytest.fixture(scope="module")
def tuned(spark, prepared, bucket):
    """A 2x2 grid where one learning rate diverges: 2 trials succeed, 2 are recorded as failed."""
    out = f"s3://{bucket}/tune/run1/"
    result = tune.run(spark, tune_args(prepared, out, "--learning-rates", "0.05,1e12",
                                       "--hidden-units", "32,64", "--optimizer", "sgd"))
    return out, result


def test_every_trial_is_recorded_and_diverging_ones_fail_softly(tuned):
    out, result = tuned
    assert result["trials"] == 4 and result["succeeded"] == 2 and result["failed"] == 2
    results = storage.read_json(out + "results.json")
    by_lr = {}
    for record in results["trials"]:
        by_lr.setdefault(record["params"]["learning_rate"], []).append(record)
        assert storage.head(storage.join_uri(out, "trials", record["trial_id"], "metrics.json")) is not None
    for record in by_lr[1e12]:
        assert record["status"] == "failed" and record["reason"].startswith("diverged")
    for record in by_lr[0.05]:
        assert record["status"] == "ok"
        for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "epochs_run", "train_seconds"):
            assert record[key] is not None
        assert record["val_accuracy"] > 0.5  # learned something real on 540 digits
        assert record["executor"]["task_cpus"] == 1
        assert storage.head(record["model_uri"]) is not None


def test_selection_uses_validation_accuracy_only(tuned):
    out, result = tuned
    results = storage.read_json(out + "results.json")
    ok = [r for r in results["trials"] if r["status"] == "ok"]
    best_by_val = max(ok, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert results["selection_metric"] == "val_accuracy"
    assert result["best"]["trial_id"] == results["best_trial_id"] == best_by_val["trial_id"]
    assert [row["trial_id"] for row in results["leaderboard"]][0] == best_by_val["trial_id"]


def test_figure_is_a_png(tuned):
    _out, result = tuned
    assert storage.read_bytes(result["figure_uri"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_finished_trials(spark, prepared, tuned):
    out, result = tuned
    again = tune.run(spark, tune_args(prepared, out, "--learning-rates", "0.05,1e12",
                                      "--hidden-units", "32,64", "--optimizer", "sgd"))
    assert again["best"] == result["best"]
    records = storage.read_json(out + "results.json")["trials"]
    assert all(r.get("reused") for r in records if r["status"] == "ok")


def test_job_fails_only_when_every_trial_fails(spark, prepared, s3_prefix):
    with pytest.raises(RuntimeError, match="every one of 2 trials failed"):
        tune.run(spark, tune_args(prepared, s3_prefix + "/all-bad/", "--learning-rates", "1e12",
                                  "--hidden-units", "16,32", "--optimizer", "sgd"))
    assert storage.head(s3_prefix + "/all-bad/results.json") is not None  # what happened is still written


def test_max_parallel_trials_deals_round_robin():
    trial_list = [{"trial_id": str(i)} for i in range(5)]
    assert tune.assign_partitions(trial_list, 0) == [[t] for t in trial_list]
    groups = tune.assign_partitions(trial_list, 2)
    assert [[t["trial_id"] for t in g] for g in groups] == [["0", "2", "4"], ["1", "3"]]


def export(results_uri: str, models_uri: str, run: str, *extra: str) -> dict:
    return export_model.run(None, export_model.parse_args([
        "--results-uri", results_uri, "--models-uri", models_uri, "--model-name", "digits", "--source-run", run,
        "--trained-at", "2026-11-22T03:00:00+00:00", *extra]))


def test_export_versions_promotes_and_is_idempotent(tuned, s3_prefix, prepared):
    out, result = tuned
    models = s3_prefix + "/models/"
    first = export(out + "results.json", models, "run-1")
    assert first["version"] == 1 and first["promoted"] and first["champion_version"] == 1
    assert first["trial_id"] == result["best"]["trial_id"]
    version_dir = registry.version_uri(models, "digits", 1)
    for name in ("model.keras", "metadata.json", "saved_model/saved_model.pb"):
        assert storage.head(storage.join_uri(version_dir, name)) is not None, name
    metadata = registry.resolve(models, "digits")
    assert metadata["version"] == 1 and metadata["manifest_sha256"] and metadata["code_version"]
    assert metadata["metrics"]["val_accuracy"] == pytest.approx(result["best"]["val_accuracy"], abs=1e-4)

    # Exporting the same run again reuses its version.
    again = export(out + "results.json", models, "run-1")
    assert again["version"] == 1 and again["reused_version"] and not again["promoted"]

    # Another run with the same test set and the same score does not beat the champion.
    second = export(out + "results.json", models, "run-2")
    assert second["version"] == 2 and not second["promoted"]
    assert "does not beat" in second["promotion_reason"] and "same test set" in second["promotion_reason"]
    assert registry.read_champion(models, "digits")["version"] == 1

    # A champion tested on another test set is re-evaluated on this one before comparing.
    pointer = registry.read_champion(models, "digits")
    registry.set_champion(models, "digits", {**pointer, "manifest_sha256": "other", "metrics": {"test_accuracy": 0.0}})
    third = export(out + "results.json", models, "run-3")
    assert "re-evaluated" in third["promotion_reason"]
    assert third["champion_score"] == pytest.approx(first["metrics"]["test_accuracy"], abs=1e-4)
    assert not third["promoted"]  # same weights, same score: not strictly better


def test_champion_loads_and_predicts_sensibly(tuned, s3_prefix, prepared):
    out, _result = tuned
    models = s3_prefix + "/models/"
    export(out + "results.json", models, "run-1")
    metadata = registry.resolve(models, "digits")
    model = registry.load_verified_model(metadata["model_uri"], metadata["model_sha256"])
    x_test, y_test = dataset.read_split(prepared, "test")
    probabilities = np.asarray(model(x_test[:100], training=False))
    assert probabilities.shape == (100, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    accuracy = float((probabilities.argmax(axis=1) == y_test[:100]).mean())
    assert accuracy == pytest.approx(metadata["metrics"]["test_accuracy"], abs=0.1)
    assert accuracy > 0.5


def test_tampered_artifact_is_refused(tuned, s3_prefix):
    out, _result = tuned
    models = s3_prefix + "/models/"
    export(out + "results.json", models, "run-1")
    metadata = registry.resolve(models, "digits")
    blob = bytearray(storage.read_bytes(metadata["model_uri"]))
    blob[-10] ^= 0xFF
    storage.write_bytes(metadata["model_uri"], bytes(blob))
    with pytest.raises(registry.ModelIntegrityError):
        registry.load_verified_model(metadata["model_uri"], metadata["model_sha256"])


def test_missing_champion_is_a_clear_error(s3_prefix):
    with pytest.raises(registry.ModelNotFound, match="has no champion"):
        registry.resolve(s3_prefix + "/models/", "nobody")


def test_learning_rate_halves_when_validation_stops_improving(s3_prefix, mnist_subset):
    """With lr_decay_patience, a plateau in validation accuracy halves the learning rate.

    The validation set is made unlearnable on purpose: blank images labelled 9, a class the
    training labels never contain, so validation accuracy stays at 0 after the first epoch.
    """
    from sparktf import trials

    train_x, train_y, _test_x, _test_y = mnist_subset
    keep = train_y[:600] != 9
    data = {"x_train": train_x[:600][keep][:, :, :, None], "y_train": train_y[:600][keep].astype(np.int32),
            "x_val": np.zeros((20, 28, 28, 1), np.uint8), "y_val": np.full(20, 9, np.int32),
            "x_test": train_x[600:700, :, :, None], "y_test": train_y[600:700].astype(np.int32),
            "input_shape": (28, 28, 1), "num_classes": 10}
    trial = {"trial_id": "plateau", "params": {"learning_rate": 0.004, "hidden_units": 16, "batch_size": 64,
                                               "dropout": 0.0, "optimizer": "adam"}}
    record = trials.train_trial(trial, data, family="mlp", epochs=3, patience=5, trials_uri=s3_prefix, seed=1,
                                lr_decay_patience=1)
    assert record["status"] == "ok", record
    assert record["history"]["val_accuracy"] == [0.0, 0.0, 0.0]
    # The rate each epoch trained with: epoch 2 did not improve on epoch 1, so epoch 3 runs at half.
    assert record["history"]["learning_rate"] == pytest.approx([0.004, 0.004, 0.002])
