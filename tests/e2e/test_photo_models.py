"""Stock pretrained networks through Airflow, as a user runs the reference recipe's Inception example: weights
files uploaded, register_model DAG runs (InceptionV3 and MobileNetV3Small; a refusal), then
nightly_inference over a partition of real-world-like photos with each model, side by side.

No pretrained weights can be downloaded here: the real architectures get weights this module makes
(seeded, batch-norm calibrated on synthetic photos) and uploads, exactly where a user would upload
``model.save_weights(...)``'s file. Every published row is checked against the model applied in
this process to the same bytes with the same decode.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparktf import applications, images, predictions, registry, scoring, storage
from sparktf_dev.testing import application_weights, asset_events, land_photos, not_green, run_dag

pytestmark = pytest.mark.e2e
DATE = "2026-11-20"
MODELS = {  # registered name -> (application, sharpen, weights file name, logical date of its nightly run)
    "mobilenet-v3-small": ("MobileNetV3Small", 20.0, "mobilenet_v3_small.weights.h5", "2026-12-02T02:30:00+00:00"),
    "inception-v3": ("InceptionV3", 5.0, "inception_v3.weights.h5", "2026-12-02T03:30:00+00:00"),
}
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def workspace(bucket, tmp_path_factory) -> dict:
    """Uploaded weights files (as a user would) and one day of photos plus bad files."""
    ws = f"s3://{bucket}/e2e-photos/ws"
    local = tmp_path_factory.mktemp("weights")
    uploads = {}
    for name, (application, sharpen, file_name, _when) in MODELS.items():
        path = application_weights(application, str(local / file_name), sharpen=sharpen)
        with open(path, "rb") as fh:
            data = fh.read()
        uri = f"{ws}/uploads/{file_name}"
        storage.write_bytes(uri, data)
        uploads[name] = {"uri": uri, "sha256": storage.sha256_hex(data)}
    landed = land_photos(ws + "/incoming/", DATE)
    return {"ws": ws, "uploads": uploads, "landed": landed}


@pytest.fixture(scope="module")
def registered(airflow_env, workspace, tmp_path_factory) -> dict:
    summaries = {}
    for name, (application, *_rest) in MODELS.items():
        conf = {
            "workspace_uri": workspace["ws"],
            "model_name": name,
            "source": "keras_application",
            "application": application,
            "weights_uri": workspace["uploads"][name]["uri"],
            "labels": "imagenet",
            "promote": True,
        }
        code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("register"), "register_model", conf)
        assert code == 0, output[-6000:]
        summaries[name] = summary
    return summaries


@pytest.fixture(scope="module")
def nightly(airflow_env, workspace, registered, tmp_path_factory) -> dict:
    """One nightly_inference run per model, both for the same day."""
    summaries = {}
    for name, (*_rest, logical_date) in MODELS.items():
        conf = {"workspace_uri": workspace["ws"], "model_name": name, "date": DATE, "batch_size": 4, "fetch_threads": 4, "max_failure_ratio": 0.5}
        code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("nightly"), "nightly_inference", conf, logical_date=logical_date)
        assert code == 0, output[-6000:]
        summaries[name] = summary
    return summaries


def states(summary: dict) -> dict:
    return {task: info["state"] for task, info in summary["tasks"].items()}


def test_stock_networks_are_registered_through_the_dag(registered, workspace):
    for name, (application, *_rest) in MODELS.items():
        summary = registered[name]
        assert not_green(summary) == {}
        report = summary["tasks"]["check_registered"]["xcom"]
        spec = applications.APPLICATIONS[application]
        assert report["registered"]
        assert report["version"] == 1
        assert report["promoted"]
        assert report["champion_version"] == 1
        assert report["input_shape"] == list(spec.input_shape)
        assert report["num_classes"] == 1000
        metadata = registry.resolve(workspace["ws"] + "/models/", name)  # the champion
        assert metadata["resize_policy"] == "center_crop"
        assert metadata["channels"] == 3
        assert metadata["label_names"] == applications.imagenet_labels()
        assert metadata["source"]["application"] == application
        assert metadata["source"]["weights_sha256"] == workspace["uploads"][name]["sha256"]
        assert metadata["model_sha256"] == report["model_sha256"]
        assert storage.stream_sha256(metadata["model_uri"]) == metadata["model_sha256"]


def test_a_label_map_of_the_wrong_size_is_refused_before_spark(airflow_env, workspace, registered, tmp_path):
    storage.write_bytes(workspace["ws"] + "/uploads/labels-999.txt", "\n".join(f"class {i}" for i in range(999)).encode())
    conf = {
        "workspace_uri": workspace["ws"],
        "model_name": "wrong-labels",
        "source": "keras_application",
        "application": "InceptionV3",
        "weights_uri": workspace["uploads"]["inception-v3"]["uri"],
        "labels": "label_map",
        "label_map_uri": workspace["ws"] + "/uploads/labels-999.txt",
    }
    code, summary, output = run_dag(airflow_env, tmp_path, "register_model", conf)
    assert code == 1
    assert states(summary) == {
        "validate_params": "failed",
        "register_model": "upstream_failed",
        "check_registered": "upstream_failed",
        "mlflow": "upstream_failed",
    }
    assert "has 999 labels but the model has 1000 outputs" in output
    assert storage.list_keys(workspace["ws"] + "/models/wrong-labels/") == []


def reference_top5(metadata: dict, landed: dict) -> dict:
    """key -> (probabilities, top-5 [(label, score)]) of the registered model run in this process
    on each photo's bytes, decoded as the job decodes them."""
    model = registry.load_version_model(metadata)
    height, width, channels = metadata["input_shape"]
    keys = sorted(k for k, v in landed.items() if "kind" in v)
    batch = np.stack(
        [
            images.decode_image(landed[k]["bytes"], height=height, width=width, channels=channels, resize_policy=metadata["resize_policy"])
            for k in keys
        ]
    )
    probabilities = np.asarray(model(batch, training=False), dtype=np.float32)
    order, scores = scoring.top_k(probabilities, 5)
    labels = metadata["label_names"]
    return {k: (probabilities[i], [(labels[c], float(s)) for c, s in zip(order[i], scores[i])]) for i, k in enumerate(keys)}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_photo_gets_the_models_top5_labels(nightly, workspace, name):
    summary = nightly[name]
    assert not_green(summary) == {}
    published = summary["tasks"]["publish"]["xcom"]
    assert published["model_name"] == name
    assert published["date"] == DATE
    assert published["output_uri"] == f"{workspace['ws']}/predictions/{name}/{DATE}/"
    metadata = registry.resolve(workspace["ws"] + "/models/", name, published["model_version"])
    reference = reference_top5(metadata, workspace["landed"])
    rows, errors = predictions.read_predictions(published["output_uri"])
    assert sorted(r["key"] for r in rows) == sorted(reference)  # every photo, once, whatever its format
    labels = metadata["label_names"]
    for row in rows:
        probabilities, expected = reference[row["key"]]
        got = [(t["label"], t["score"]) for t in row["top_k"]]
        assert len(got) == 5
        assert (row["predicted_label"], row["score"]) == got[0]
        for (label, score), (want_label, want_score) in zip(got, expected):
            assert abs(score - want_score) <= SCORE_TOLERANCE, (row["key"], got, expected)
            # The same label at every rank; only two classes the model itself scores the same
            # (within rounding of batch composition) may trade places.
            assert label == want_label or abs(probabilities[labels.index(label)] - want_score) <= 1e-5, (row["key"], got, expected)
        assert all(label in labels and "_" not in label for label, _s in got)  # human-readable names
        assert (row["model_name"], row["model_version"], row["partition_date"]) == (name, 1, DATE)
    # the set-aside list: exactly the bad files, each with an acceptable reason
    bad = {k: v["reasons"] for k, v in workspace["landed"].items() if "reasons" in v}
    assert {e["key"] for e in errors} == set(bad)
    assert all(e["reason"] in bad[e["key"]] for e in errors), errors


def test_two_models_score_the_same_day_side_by_side(nightly, workspace, airflow_env):
    ws = workspace["ws"]
    partitions = {name: f"{ws}/predictions/{name}/{DATE}/" for name in MODELS}
    for name, uri in partitions.items():
        manifest = predictions.read_published(uri)
        assert manifest["model_name"] == name
        assert manifest["date"] == DATE
        assert manifest["scored"] == 10
        assert manifest["set_aside"] == 4
    assert storage.list_keys(f"{ws}/predictions/{DATE}/") == []  # nothing in a shared, model-less partition
    assert all(storage.list_keys(f"{ws}/predictions/{name}/_staging/") == [] for name in MODELS)
    events = [extra for extra in asset_events(airflow_env, "nightly_predictions") if extra["output_uri"].startswith(ws + "/")]  # the DB is shared
    assert sorted((e["model_name"], e["output_uri"]) for e in events) == sorted((name, uri) for name, uri in partitions.items())
