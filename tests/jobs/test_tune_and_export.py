"""tune and export_model jobs on a tiny prepared data set: real Spark tasks, real Keras training."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sparktf
from sparktf import dataset, registry, search, storage, trials
from sparktf.jobs import export_model, prepare_data, tune
from sparktf_dev.testing import ROOT, crash_test_env, prepare, upload_mnist


@pytest.fixture(scope="module")
def prepared(spark, bucket, mnist_subset):
    _train_x, _train_y, _test_x, _test_y = mnist_subset
    raw = f"s3://{bucket}/tune/raw"
    upload_mnist(raw, mnist_subset, train_limit=600, test_limit=200)
    out = f"s3://{bucket}/tune/prepared/"
    prepare_data.run(spark, prepare_data.parse_args(["--input-uri", raw, "--output-uri", out]))
    return out


def tune_args(prepared_uri: str, output_uri: str, *extra: str):
    return tune.parse_args(
        [
            "--prepared-uri",
            prepared_uri,
            "--output-uri",
            output_uri,
            "--model-family",
            "mlp",
            "--augment",
            "0",
            "--epochs",
            "2",
            "--patience",
            "2",
            "--batch-sizes",
            "32",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def tuned(spark, prepared, bucket):
    """A 2x2 grid where one learning rate diverges: 2 trials succeed, 2 are recorded as failed."""
    out = f"s3://{bucket}/tune/run1/"
    result = tune.run(spark, tune_args(prepared, out, "--learning-rates", "0.05,1e12", "--hidden-units", "32,64", "--optimizer", "sgd"))
    return out, result


def test_every_trial_is_recorded_and_diverging_ones_fail_softly(tuned):
    out, result = tuned
    assert result["trials"] == 4
    assert result["succeeded"] == 2
    assert result["failed"] == 2
    results = storage.read_json(out + "results.json")
    by_lr = {}
    for record in results["trials"]:
        by_lr.setdefault(record["params"]["learning_rate"], []).append(record)
        assert storage.head(storage.join_uri(out, "trials", record["trial_id"], "metrics.json")) is not None
    for record in by_lr[1e12]:
        assert record["status"] == "failed"
        assert record["reason"].startswith("diverged")
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
    assert next(row["trial_id"] for row in results["leaderboard"]) == best_by_val["trial_id"]


def test_figure_is_a_png(tuned):
    _out, result = tuned
    assert storage.read_bytes(result["figure_uri"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_finished_trials(spark, prepared, tuned):
    out, result = tuned
    again = tune.run(spark, tune_args(prepared, out, "--learning-rates", "0.05,1e12", "--hidden-units", "32,64", "--optimizer", "sgd"))
    assert again["best"] == result["best"]
    records = storage.read_json(out + "results.json")["trials"]
    assert all(r.get("reused") for r in records if r["status"] == "ok")


def test_job_fails_only_when_every_trial_fails(spark, prepared, s3_prefix):
    with pytest.raises(RuntimeError, match="every one of 2 trials failed"):
        tune.run(spark, tune_args(prepared, s3_prefix + "/all-bad/", "--learning-rates", "1e12", "--hidden-units", "16,32", "--optimizer", "sgd"))
    assert storage.head(s3_prefix + "/all-bad/results.json") is not None  # what happened is still written


def test_max_parallel_trials_deals_round_robin():
    trial_list = [{"trial_id": str(i)} for i in range(5)]
    assert tune.assign_partitions(trial_list, 0) == [[t] for t in trial_list]
    groups = tune.assign_partitions(trial_list, 2)
    assert [[t["trial_id"] for t in g] for g in groups] == [["0", "2", "4"], ["1", "3"]]


def export(results_uri: str, models_uri: str, run: str, *extra: str) -> dict:
    return export_model.run(
        export_model.parse_args(
            [
                "--results-uri",
                results_uri,
                "--models-uri",
                models_uri,
                "--model-name",
                "digits",
                "--source-run",
                run,
                "--trained-at",
                "2026-11-22T03:00:00+00:00",
                *extra,
            ]
        )
    )


def test_export_versions_promotes_and_is_idempotent(tuned, s3_prefix, prepared):
    out, result = tuned
    models = s3_prefix + "/models/"
    first = export(out + "results.json", models, "run-1")
    assert first["version"] == 1
    assert first["promoted"]
    assert first["champion_version"] == 1
    assert first["trial_id"] == result["best"]["trial_id"]
    version_dir = registry.version_uri(models, "digits", 1)
    metadata = registry.resolve(models, "digits")
    for uri in (
        storage.join_uri(version_dir, "metadata.json"),
        metadata["model_uri"],
        storage.join_uri(metadata["saved_model_uri"], "saved_model.pb"),
    ):
        assert uri.startswith(version_dir + "/"), uri
        assert storage.head(uri) is not None, uri
    assert metadata["version"] == 1
    assert metadata["manifest_sha256"]
    assert metadata["code_version"]
    assert metadata["metrics"]["val_accuracy"] == pytest.approx(result["best"]["val_accuracy"], abs=1e-4)

    # Exporting the same run again reuses its version.
    again = export(out + "results.json", models, "run-1")
    assert again["version"] == 1
    assert again["reused_version"]
    assert not again["promoted"]

    # Another run with the same test split and the same score does not beat the champion.
    second = export(out + "results.json", models, "run-2")
    assert second["version"] == 2
    assert not second["promoted"]
    assert "does not beat" in second["promotion_reason"]
    assert "same test split" in second["promotion_reason"]
    assert registry.read_champion(models, "digits")["version"] == 1


# ---------------------------------------------------------------------------------------------
# Like-for-like promotion (issue 15, point 1)
# ---------------------------------------------------------------------------------------------


def champion_with(models: str, **changes) -> dict:
    """Rewrite the champion pointer (as a champion of another lineage would have it): its recorded
    test accuracy is 0, so any comparison would replace it."""
    pointer = registry.read_champion(models, "digits")
    registry.set_champion(models, "digits", {**pointer, "metrics": {"test_accuracy": 0.0, "test_loss": 9.0}, **changes})
    return pointer


def test_the_champion_records_its_lineage(tuned, s3_prefix, prepared):
    out, _result = tuned
    models = s3_prefix + "/models/"
    export(out + "results.json", models, "run-1")
    manifest = dataset.read_manifest(prepared)
    pointer, metadata = registry.read_champion(models, "digits"), registry.resolve(models, "digits")
    for record in (pointer, metadata):
        assert record["label_names"] == manifest["label_names"]
        assert record["input_shape"] == [28, 28, 1]
        assert record["test_split_sha256"] == manifest["test_split_sha256"]
        assert len(record["test_split_sha256"]) == 64


def test_a_champion_trained_on_other_labels_is_not_replaced(tuned, s3_prefix):
    """Same input shape, same class count, other label names: the scores say nothing about each other."""
    out, _result = tuned
    models = s3_prefix + "/models/"
    export(out + "results.json", models, "run-1")
    champion_with(models, label_names=list("abcdefghij"))
    second = export(out + "results.json", models, "run-2")
    assert not second["promoted"]
    assert second["champion_version"] == 1
    assert second["champion_score"] is None
    reason = second["promotion_reason"]
    assert reason.startswith("not compared with champion v1: the champion v1 was trained on labels ['a', 'b'")
    assert "new model_name" in reason
    assert "champion_policy 'replace'" in reason
    assert registry.read_champion(models, "digits")["version"] == 1


def test_a_champion_of_another_shape_and_class_count_is_not_compared_and_nothing_raises(tuned, s3_prefix, tmp_path):
    """Re-scoring such a champion on this run's test set raised on every retry: now it is a plain refusal."""
    import keras

    from sparktf.models import build_model

    out, _result = tuned
    models = s3_prefix + "/models/"
    path = str(tmp_path / "photos.keras")
    build_model("mlp", (32, 32, 3), 5, hidden_units=4).save(path)
    other = registry.write_version(
        models,
        "digits",
        model_path=path,
        metadata={
            "input_shape": [32, 32, 3],
            "label_names": list("abcde"),
            "manifest_sha256": "other-data",
            "metrics": {"test_accuracy": 0.0, "test_loss": 9.0},
        },
    )
    keras.backend.clear_session()
    assert registry.make_champion(models, "digits", other, reason="test").promoted
    exported = export(out + "results.json", models, "run-1")
    assert not exported["promoted"]
    assert exported["champion_version"] == other["version"]
    assert "was trained on labels ['a', 'b', 'c', 'd', 'e'] (5 labels)" in exported["promotion_reason"]


def test_a_champion_tested_on_another_split_is_not_compared(tuned, s3_prefix):
    out, _result = tuned
    models = s3_prefix + "/models/"
    export(out + "results.json", models, "run-1")
    champion_with(models, test_split_sha256="0" * 64, manifest_sha256="other-data")
    second = export(out + "results.json", models, "run-2")
    assert not second["promoted"]
    assert second["champion_score"] is None
    assert "the champion v1 was tested on another test split" in second["promotion_reason"]
    assert registry.read_champion(models, "digits")["version"] == 1


def old_champion(models: str, model_path: str, first: dict, manifest_sha256: str) -> None:
    """A champion exported before the lineage was recorded: neither its metadata nor its pointer
    name the test split, and the pointer carries no labels or input shape either."""
    version = registry.write_version(
        models,
        "digits",
        model_path=model_path,
        metadata={
            "input_shape": first["input_shape"],
            "label_names": first["label_names"],
            "manifest_sha256": manifest_sha256,
            "metrics": {"test_accuracy": 0.0, "test_loss": 9.0},
        },
    )
    pointer = registry.champion_pointer(version)
    registry.set_champion(models, "digits", {k: v for k, v in pointer.items() if k not in ("label_names", "input_shape", "test_split_sha256")})


def test_an_old_champion_is_compared_by_its_version_metadata(tuned, s3_prefix, tmp_path):
    """Labels and shape come from the old champion's version metadata; the same prepared data
    (manifest sha256) proves the same test split, other data proves nothing."""
    out, _result = tuned
    models = s3_prefix + "/models/"
    export(out + "results.json", models, "run-1")
    first = registry.resolve(models, "digits", 1)
    path = str(tmp_path / "old.keras")
    storage.download_file(first["model_uri"], path)

    old_champion(models, path, first, first["manifest_sha256"])
    second = export(out + "results.json", models, "run-2")
    assert second["promoted"]
    assert "beats champion v2 0.00000 (recorded on the same test set" in second["promotion_reason"]

    old_champion(models, path, first, "other-data")
    third = export(out + "results.json", models, "run-3")
    assert not third["promoted"]
    assert third["champion_version"] == 4
    assert "the champion v4 records no test-split identity" in third["promotion_reason"]


def test_champion_policy_replace_moves_the_champion_without_comparing(tuned, s3_prefix):
    out, _result = tuned
    models = s3_prefix + "/models/"
    export(out + "results.json", models, "run-1")
    champion_with(models, label_names=list("abcdefghij"), metrics={"test_accuracy": 1.0, "test_loss": 0.0})
    second = export(out + "results.json", models, "run-2", "--champion-policy", "replace")
    assert second["promoted"]
    assert second["champion_version"] == 2
    assert second["promotion_reason"] == "champion_policy 'replace': made the champion without comparing"
    champion = registry.read_champion(models, "digits")
    assert champion["version"] == 2
    assert champion["promoted_over"] == 1
    assert champion["label_names"][0] == "0"
    again = export(out + "results.json", models, "run-2", "--champion-policy", "replace")
    assert not again["promoted"]
    assert again["promotion_reason"] == "already the champion"


def test_the_test_split_identity_follows_the_test_images(spark, bucket, mnist_subset, prepared):
    """MNIST's t10k file is the test split whatever the seed; a redrawn ImageFolder split is another."""
    from sparktf_dev.testing import prepare

    reseeded = prepare(spark, f"s3://{bucket}/tune/raw", f"s3://{bucket}/tune/prepared-seed-7/", "--seed", "7")
    first, again = dataset.read_manifest(prepared), dataset.read_manifest(reseeded["prepared_uri"])
    assert first["content_sha256"] != again["content_sha256"]  # train/validation were redrawn
    assert first["test_split_sha256"] == again["test_split_sha256"]

    images, labels = mnist_subset[0], mnist_subset[1]
    raw = f"s3://{bucket}/tune/folder-raw"
    client = storage.client()
    for index in range(40):
        buffer = io.BytesIO()
        Image.fromarray(images[index]).save(buffer, format="PNG")
        storage.write_bytes(f"{raw}/{labels[index] % 2}/{index:03d}.png", buffer.getvalue(), client)
    hashes = [
        dataset.read_manifest(prepare(spark, raw + "/", f"s3://{bucket}/tune/folder-{n}/", "--seed", str(seed))["prepared_uri"])["test_split_sha256"]
        for n, seed in enumerate((1, 2, 1))
    ]
    assert hashes[0] == hashes[2] != hashes[1]


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
    data = {
        "x_train": train_x[:600][keep][:, :, :, None],
        "y_train": train_y[:600][keep].astype(np.int32),
        "x_val": np.zeros((20, 28, 28, 1), np.uint8),
        "y_val": np.full(20, 9, np.int32),
        "x_test": train_x[600:700, :, :, None],
        "y_test": train_y[600:700].astype(np.int32),
        "input_shape": (28, 28, 1),
        "num_classes": 10,
    }
    trial = {"trial_id": "plateau", "params": {"learning_rate": 0.004, "hidden_units": 16, "batch_size": 64, "dropout": 0.0, "optimizer": "adam"}}
    record = trials.train_trial(trial, data, family="mlp", epochs=3, patience=5, trials_uri=s3_prefix, seed=1, lr_decay_patience=1)
    assert record["status"] == "ok", record
    assert record["history"]["val_accuracy"] == [0.0, 0.0, 0.0]
    # The rate each epoch trained with: epoch 2 did not improve on epoch 1, so epoch 3 runs at half.
    assert record["history"]["learning_rate"] == pytest.approx([0.004, 0.004, 0.002])


# ---------------------------------------------------------------------------------------------
# Trials that stay correct when the data, the settings or the code change (issue 8, point 3)
# ---------------------------------------------------------------------------------------------


def test_every_setting_that_changes_a_result_changes_the_trial_ids(monkeypatch):
    monkeypatch.delenv(sparktf.CODE_SHA256_ENV, raising=False)

    def ids(*extra: str, manifest_sha256: str = "manifest-1") -> list[str]:
        args = tune.parse_args(["--prepared-uri", "s3://b/p/", "--output-uri", "s3://b/o/", *extra])
        fingerprint = tune.trial_fingerprint(args, {"content_sha256": manifest_sha256})
        return [
            t["trial_id"]
            for t in search.build_trials(
                tune.search_space(args), fixed={"optimizer": args.optimizer, "augment": args.augment}, fingerprint=fingerprint
            )
        ]

    reference = ids()
    assert reference == ids()
    assert ids("--max-parallel-trials", "2") == reference
    for extra in (
        ["--model-family", "mlp"],
        ["--epochs", "9"],
        ["--patience", "3"],
        ["--lr-decay-patience", "0"],
        ["--augment", "0.2"],
        ["--seed", "7"],
        ["--optimizer", "sgd"],
    ):
        assert set(ids(*extra)).isdisjoint(reference), extra
    assert set(ids(manifest_sha256="manifest-2")).isdisjoint(reference)
    monkeypatch.setenv(sparktf.CODE_SHA256_ENV, "f" * 64)
    assert set(ids()).isdisjoint(reference)


def test_re_preparing_other_data_into_the_same_run_trains_new_trials(spark, mnist_subset, s3_prefix):
    train_x, train_y, test_x, test_y = mnist_subset
    prepared_uri, out = s3_prefix + "/prepared/", s3_prefix + "/tuning/"
    args = tune_args(prepared_uri, out, "--learning-rates", "0.05", "--hidden-units", "32", "--optimizer", "sgd", "--epochs", "1")
    runs = []
    for start in (0, 400):  # the same run prepared twice, from different images
        raw = f"{s3_prefix}/raw-{start}"
        upload_mnist(raw, (train_x[start : start + 400], train_y[start : start + 400], test_x[:100], test_y[:100]))
        manifest_sha256 = prepare(spark, raw, prepared_uri)["content_sha256"]
        tune.run(spark, args)
        runs.append((manifest_sha256, storage.read_json(out + "results.json")))
    (first_hash, first), (second_hash, second) = runs
    assert first_hash != second_hash
    assert second["manifest_sha256"] == second_hash
    assert not any(r.get("reused") for r in second["trials"])  # nothing trained on the old split is reused
    assert {r["trial_id"] for r in second["trials"]}.isdisjoint({r["trial_id"] for r in first["trials"]})
    for record in second["trials"]:
        assert record["fingerprint"]["manifest_sha256"] == second_hash
        published = storage.read_json(storage.join_uri(out, "trials", record["trial_id"], "metrics.json"))
        assert published["fingerprint"] == record["fingerprint"] == second["fingerprint"]


# ---------------------------------------------------------------------------------------------
# A trial whose process is killed (issue 8, point 5)
# ---------------------------------------------------------------------------------------------


def test_a_trial_whose_process_is_killed_is_recorded_as_failed_and_the_job_finishes(prepared, s3_prefix, tmp_path):
    """spark-submit in local[2,2] (local mode's way to allow one task retry): the trial with 48
    hidden units SIGKILLs its own Python worker (the test-only hook); the retried task records it."""
    from sparktf.airflow.spark_job_operator import package_zip

    out = s3_prefix + "/crash/"
    zip_path, _sha = package_zip()
    env = crash_test_env('"hidden_units": 48')
    command = [
        str(Path(sys.executable).with_name("spark-submit")),
        "--master",
        "local[2,2]",
        "--conf",
        "spark.ui.enabled=false",
        "--py-files",
        zip_path,
        str(ROOT / "jobs" / "tune.py"),
        "--prepared-uri",
        prepared,
        "--output-uri",
        out,
        "--model-family",
        "mlp",
        "--epochs",
        "1",
        "--patience",
        "1",
        "--batch-sizes",
        "32",
        "--learning-rates",
        "0.05",
        "--hidden-units",
        "32,48",
        "--result-uri",
        out + "result.json",
    ]
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    assert "Python worker exited unexpectedly" in job.stderr  # Spark saw the process die

    result = storage.read_json(out + "result.json")
    assert (result["trials"], result["succeeded"], result["failed"]) == (2, 1, 1)
    [failed] = result["failed_trials"]
    assert failed["reason"] == "crashed: the Python worker died during training (attempt 0)"
    records = {r["trial_id"]: r for r in storage.read_json(out + "results.json")["trials"]}
    assert records[failed["trial_id"]]["params"]["hidden_units"] == 48
    assert records[failed["trial_id"]]["attempt"] == 1  # recorded by the retry, which did not train again
    assert result["best"]["params"]["hidden_units"] == 32
    [attempt] = trials.attempt_history(out + "trials", failed["trial_id"])
    assert attempt["started"]["attempt"] == 0
    assert not attempt["finished"]


# ---------------------------------------------------------------------------------------------
# Exports that crash or find changed files (issue 8, points 1 and 2)
# ---------------------------------------------------------------------------------------------


def test_an_export_that_died_keeps_its_version_for_its_run_only(tuned, s3_prefix):
    out, _result = tuned
    models = s3_prefix + "/models/"

    def crash(**_info) -> None:
        raise RuntimeError("simulated crash after the artifacts, before the metadata")

    registry.TEST_HOOKS["before_metadata"] = crash
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            export(out + "results.json", models, "run-1")
    finally:
        registry.TEST_HOOKS.clear()
    assert registry.list_versions(models, "digits") == []
    assert storage.head(registry.claim_uri(models, "digits", 1)) is not None

    other = export(out + "results.json", models, "run-2")
    assert other["version"] == 2
    assert other["promoted"]
    retried = export(out + "results.json", models, "run-1")
    assert retried["version"] == 1
    assert not retried["reused_version"]
    assert not retried["promoted"]
    assert "does not beat champion v2" in retried["promotion_reason"]
    assert retried["champion_version"] == 2
    assert retried["promotion_attempts"] == 1
    again = export(out + "results.json", models, "run-1")
    assert again["version"] == 1
    assert again["reused_version"]
    assert [m["version"] for m in registry.list_versions(models, "digits")] == [1, 2]


def test_a_reused_version_whose_files_changed_is_refused(tuned, s3_prefix):
    out, _result = tuned
    models = s3_prefix + "/models/"
    first = export(out + "results.json", models, "run-1")
    metadata = registry.resolve(models, "digits")
    assert registry.verify_saved_model(metadata) == len(metadata["saved_model_files"])
    uri = storage.join_uri(first["saved_model_uri"], "saved_model.pb")
    storage.write_bytes(uri, storage.read_bytes(uri) + b"tampered")
    with pytest.raises(registry.ModelIntegrityError, match=r"saved_model\.pb: sha256"):
        export(out + "results.json", models, "run-1")
