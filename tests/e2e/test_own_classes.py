"""Your own classes, through the DAGs as a user runs them (issue 17, point 6): a small backbone this
module trains in seconds, registered with the register_model DAG; an ImageFolder of generated RGB
photos of 3 classes (100x80 to 1600x1200, JPEG and PNG, nested folders, two bad files); a
tuning_pipeline run with ``backbone`` and a small head grid, exported; a nightly_inference run over
new photos, every row checked against the exported model applied in this process; a second tuning
run over the same data (nothing featurized); a backbone refused before any Spark job.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparktf import images, predictions, registry, storage
from sparktf.airflow.pipeline_settings import path_safe
from sparktf_dev.testing import encode, not_green, photo, run_dag

pytestmark = pytest.mark.e2e
CLASSES = {"beach": (235, 200, 130), "forest": (30, 130, 45), "night": (15, 20, 70)}  # the user's labels -> tint
SIZES = [(100, 80), (160, 120), (320, 240), (480, 640), (640, 480), (1600, 1200)]  # (width, height)
PER_CLASS = 10
BACKBONE_INPUT = (32, 32, 3)
BACKBONE = "photo-features"
NIGHT = ("2026-12-03T02:30:00+00:00", "2026-12-02")  # logical date of the nightly run -> its partition
SCORE_TOLERANCE = 1e-5


def class_photo(label: str, seed: int, size: tuple[int, int]) -> bytes:
    """A generated photo of ``label`` (its tint over shapes and grain), JPEG or PNG by ``seed``."""
    from PIL import Image

    pixels = 0.45 * np.asarray(photo(seed, *size), dtype=np.float64) + 0.55 * np.array(CLASSES[label])
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return encode(img, "JPEG", quality=90) if seed % 2 else encode(img, "PNG")


def photo_name(seed: int, n: int) -> str:
    """Nested folders below the label, a space in some names; the extension by :func:`class_photo`'s format."""
    return f"{'trip 2026/day ' + str(n % 3) if n % 2 else 'phone'}/img_{n:03d}.{'jpg' if seed % 2 else 'png'}"


def land_image_folder(prefix: str, seed0: int) -> dict[str, str]:
    """``<prefix>/<label>/<nested>/<file>`` for every class; key -> label."""
    landed = {}
    for c, label in enumerate(CLASSES):
        for n in range(PER_CLASS):
            seed = seed0 + 100 * c + n
            uri = f"{prefix}/{label}/{photo_name(seed, n)}"
            storage.write_bytes(uri, class_photo(label, seed, SIZES[n % len(SIZES)]))
            landed[storage.parse_uri(uri).key] = label
    return landed


def trained_backbone(path: str) -> str:
    """A small conv net on uint8 pixels, trained for a few seconds to tell 4 kinds of photo apart
    (which colour channel dominates, or grey); its feature layer is its last Dense layer's input."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    tints = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (128, 128, 128)]
    y = rng.integers(0, 4, 256)
    x = np.stack([0.5 * np.asarray(photo(9000 + i, 32, 32), dtype=np.float32) + 0.5 * np.array(tints[k]) for i, k in enumerate(y)])
    inputs = keras.Input(BACKBONE_INPUT, dtype="uint8", name="pixels")
    h = layers.Rescaling(1.0 / 255.0)(inputs)
    h = layers.Conv2D(8, 3, activation="relu")(h)
    h = layers.MaxPooling2D()(h)
    h = layers.Conv2D(16, 3, activation="relu")(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(16, activation="relu", name="features")(h)
    model = keras.Model(inputs, layers.Dense(4, activation="softmax", name="kinds")(h), name="photo_features")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x.astype(np.uint8), y, epochs=4, batch_size=32, verbose=0)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def workspace(bucket, tmp_path_factory) -> dict:
    """The backbone's files uploaded as a user would, the labelled photos, and a night of new photos."""
    ws = f"s3://{bucket}/e2e-own-classes/ws"
    path = trained_backbone(str(tmp_path_factory.mktemp("backbone") / "photo_features.keras"))
    with open(path, "rb") as fh:
        storage.write_bytes(ws + "/uploads/photo_features.keras", fh.read())
    storage.write_bytes(ws + "/uploads/kinds.json", json.dumps(["reddish", "greenish", "bluish", "grey"]).encode())
    dataset = f"s3://{bucket}/e2e-own-classes/my-photos"
    land_image_folder(dataset, seed0=1)
    cut = class_photo("beach", 1, (640, 480))
    storage.write_bytes(f"{dataset}/beach/broken/cut-short.png", cut[: len(cut) // 3])
    storage.write_bytes(f"{dataset}/forest/phone/index.jpg", b"<html>moved</html>")
    incoming = f"{ws}/incoming/{NIGHT[1]}"
    new = {}
    for c, label in enumerate(CLASSES):
        for n in range(3):
            seed = 5000 + 10 * c + n
            data = class_photo(label, seed, SIZES[(2 * n + c) % len(SIZES)])
            key = storage.parse_uri(f"{incoming}/cam {c}/{label}-{n}.{'jpg' if seed % 2 else 'png'}").key
            storage.write_bytes(f"s3://{bucket}/{key}", data)
            new[key] = data
    return {"ws": ws, "dataset": dataset + "/", "new": new}


def states(summary: dict) -> dict:
    return {task: info["state"] for task, info in summary["tasks"].items()}


def head_conf(workspace: dict, **grid) -> dict:
    return {
        "dataset_uri": workspace["dataset"],
        "workspace_uri": workspace["ws"],
        "model_name": "my-photos",
        "backbone": BACKBONE,
        "learning_rates": [0.05],
        "hidden_units": [0, 8],
        "dropouts": [0.0],
        "l2_weights": [0.0],
        "batch_sizes": [8],
        "epochs": 4,
        "patience": 4,
        "validation_fraction": 0.2,
        "test_fraction": 0.2,
        **grid,
    }


@pytest.fixture(scope="module")
def registered(airflow_env, workspace, tmp_path_factory) -> dict:
    ws = workspace["ws"]
    conf = {
        "workspace_uri": ws,
        "model_name": BACKBONE,
        "source": "keras_file",
        "model_uri": ws + "/uploads/photo_features.keras",
        "labels": "label_map",
        "label_map_uri": ws + "/uploads/kinds.json",
        "resize_policy": "center_crop",
        "promote": True,
    }
    code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("register"), "register_model", conf)
    assert code == 0, output[-6000:]
    return summary


@pytest.fixture(scope="module")
def tuned(airflow_env, workspace, registered, tmp_path_factory) -> tuple[dict, str]:
    code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("tune"), "tuning_pipeline", head_conf(workspace, l2_weights=[0.0, 0.001]))
    assert code == 0, output[-6000:]
    return summary, output


@pytest.fixture(scope="module")
def nightly(airflow_env, workspace, tuned, tmp_path_factory) -> dict:
    version = str(tuned[0]["tasks"]["export_best_model"]["xcom"]["version"])
    conf = {"workspace_uri": workspace["ws"], "model_name": "my-photos", "model_version": version}
    code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("nightly"), "nightly_inference", conf, logical_date=NIGHT[0])
    assert code == 0, output[-6000:]
    return summary


def test_the_backbone_is_registered_through_the_dag(registered, workspace):
    assert not_green(registered) == {}, states(registered)
    report = registered["tasks"]["check_registered"]["xcom"]
    assert (report["version"], report["promoted"], report["input_shape"]) == (1, True, list(BACKBONE_INPUT))


def test_heads_are_tuned_on_features_computed_once(tuned):
    summary, _output = tuned
    for task in ("validate_params", "prepare_data", "tune", "export_best_model", "report"):
        assert states(summary)[task] == "success", states(summary)
    prepared = summary["tasks"]["prepare_data"]["xcom"]
    assert sum(prepared["counts"].values()) == len(CLASSES) * PER_CLASS
    assert prepared["rejected"] == 2
    assert prepared["num_classes"] == len(CLASSES)
    tune = summary["tasks"]["tune"]["xcom"]
    assert (tune["trials"], tune["succeeded"]) == (4, 4)
    assert tune["backbone"] == f"{BACKBONE}@1"
    assert tune["featurized"] == len(CLASSES) * PER_CLASS
    assert tune["features_reused"] is False
    assert sorted((row["hidden_units"], row["l2_weight"]) for row in tune["leaderboard"]) == [(0, 0.0), (0, 0.001), (8, 0.0), (8, 0.001)]
    assert storage.read_json(tune["results_uri"])["model_family"] == "head"
    assert f"**Backbone:** `{BACKBONE}` v1: featurized {len(CLASSES) * PER_CLASS} images." in summary["note"]


def test_the_export_is_one_model_with_the_users_labels(tuned, workspace):
    summary, _output = tuned
    export = summary["tasks"]["export_best_model"]["xcom"]
    assert export["trial_id"] == summary["tasks"]["tune"]["xcom"]["best"]["trial_id"]
    metadata = registry.resolve(workspace["ws"] + "/models/", "my-photos", export["version"])
    backbone = registry.resolve(workspace["ws"] + "/models/", BACKBONE, 1)
    assert metadata["label_names"] == sorted(CLASSES)
    assert (metadata["backbone"]["name"], metadata["backbone"]["version"]) == (BACKBONE, 1)
    assert metadata["backbone"]["model_sha256"] == backbone["model_sha256"]
    assert (metadata["input_shape"], metadata["input_dtype"], metadata["resize_policy"]) == (list(BACKBONE_INPUT), "uint8", "center_crop")
    assert metadata["model_uri"].endswith(".keras")


def test_the_nightly_run_labels_new_photos_with_the_users_classes(nightly, tuned, workspace):
    assert not_green(nightly) == {}, states(nightly)
    published = nightly["tasks"]["publish"]["xcom"]
    version = tuned[0]["tasks"]["export_best_model"]["xcom"]["version"]
    assert (published["model_name"], published["model_version"], published["date"]) == ("my-photos", version, NIGHT[1])
    assert (published["scored"], published["set_aside"]) == (len(workspace["new"]), 0)
    assert set(published["label_histogram"]) <= set(CLASSES)
    assert f"**{len(workspace['new'])} scored**, **0 set aside** of {len(workspace['new'])} images, with model `my-photos`" in nightly["note"]
    metadata = registry.resolve(workspace["ws"] + "/models/", "my-photos", version)
    # The exported file as it is stored: its bytes are the registered ones, then it loads in safe mode.
    assert storage.stream_sha256(metadata["model_uri"]) == metadata["model_sha256"]
    model = registry.load_verified_model(metadata["model_uri"], metadata["model_sha256"])
    height, width, channels = metadata["input_shape"]
    keys = sorted(workspace["new"])
    batch = np.stack(
        [
            images.decode_image(workspace["new"][k], height=height, width=width, channels=channels, resize_policy=metadata["resize_policy"])
            for k in keys
        ]
    )
    probabilities = np.asarray(model(batch, training=False), dtype=np.float64)
    expected = {k: (metadata["label_names"][int(p.argmax())], float(p.max())) for k, p in zip(keys, probabilities)}
    rows, errors = predictions.read_predictions(published["output_uri"])
    assert errors == []
    assert sorted(r["key"] for r in rows) == keys
    for row in rows:
        assert row["predicted_label"] in CLASSES
        label, score = expected[row["key"]]
        assert row["predicted_label"] == label, (row["key"], row["top_k"], expected[row["key"]])
        assert abs(row["score"] - score) <= SCORE_TOLERANCE, (row["key"], row["score"], score)
        assert {t["label"] for t in row["top_k"]} <= set(CLASSES)


@pytest.fixture(scope="module")
def tuned_again(airflow_env, workspace, tuned, tmp_path_factory) -> dict:
    """Another grid over the same photos and backbone, as a new run."""
    conf = head_conf(workspace, learning_rates=[0.02], hidden_units=[4])
    code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("again"), "tuning_pipeline", conf)
    assert code == 0, output[-6000:]
    return summary


def test_a_second_grid_over_the_same_data_featurizes_nothing(tuned_again, tuned):
    assert states(tuned_again)["tune"] == "success", states(tuned_again)
    tune = tuned_again["tasks"]["tune"]["xcom"]
    assert (tune["featurized"], tune["features_reused"]) == (0, True)
    assert tune["features_uri"] == tuned[0]["tasks"]["tune"]["xcom"]["features_uri"]
    assert (tune["trials"], tune["succeeded"]) == (1, 1)
    assert f"**Backbone:** `{BACKBONE}` v1: features reused (0 featurized)." in tuned_again["note"]


def test_a_backbone_that_does_not_exist_is_refused_before_any_spark_job(airflow_env, workspace, registered, tmp_path):
    conf = {**head_conf(workspace), "workspace_uri": workspace["ws"], "backbone": "no-such-network"}
    code, summary, output = run_dag(airflow_env, tmp_path, "tuning_pipeline", conf)
    assert code == 1
    assert states(summary)["validate_params"] == "failed"
    assert states(summary)["prepare_data"] == states(summary)["tune"] == states(summary)["export_best_model"] == "upstream_failed"
    assert "no-such-network" in output
    assert "register one with the register_model DAG" in output
    assert storage.list_keys(f"{workspace['ws']}/runs/tuning_pipeline/{path_safe(summary['run_id'])}/") == []  # no job wrote anything


# ---------------------------------------------------------------------------------------------
# A Keras Applications backbone (weights this module makes), heads frozen and fine-tuned
# ---------------------------------------------------------------------------------------------

STOCK_BACKBONE = "stock-features"


@pytest.fixture(scope="module")
def stock_tuned(airflow_env, workspace, registered, tmp_path_factory) -> dict:
    """MobileNetV3Small registered through the DAG from a weights file, then a grid of a frozen and a fine-tuned head."""
    from sparktf_dev.testing import application_weights

    path = application_weights("MobileNetV3Small", str(tmp_path_factory.mktemp("stock") / "mobilenet_v3_small.weights.h5"))
    with open(path, "rb") as fh:
        storage.write_bytes(workspace["ws"] + "/uploads/mobilenet_v3_small.weights.h5", fh.read())
    conf = {
        "workspace_uri": workspace["ws"],
        "model_name": STOCK_BACKBONE,
        "source": "keras_application",
        "application": "MobileNetV3Small",
        "weights_uri": workspace["ws"] + "/uploads/mobilenet_v3_small.weights.h5",
        "labels": "imagenet",
        "promote": True,
    }
    code, _summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("register-stock"), "register_model", conf)
    assert code == 0, output[-6000:]
    grid = {"backbone": STOCK_BACKBONE, "model_name": "my-photos-stock", "hidden_units": [0], "fine_tune_layers": [0, 1], "epochs": 2, "patience": 2}
    code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("tune-stock"), "tuning_pipeline", head_conf(workspace, **grid))
    assert code == 0, output[-6000:]
    return summary


def test_a_stock_network_is_a_backbone_and_a_trial_fine_tunes_its_top_layer(stock_tuned, workspace):
    from sparktf import dataset

    assert not_green(stock_tuned) == {}, states(stock_tuned)
    tune = stock_tuned["tasks"]["tune"]["xcom"]
    assert (tune["trials"], tune["succeeded"], tune["backbone"]) == (2, 2, f"{STOCK_BACKBONE}@1")
    assert tune["featurized"] == len(CLASSES) * PER_CLASS
    results = storage.read_json(tune["results_uri"])
    assert results["data_transfer"] == "features_and_images"
    assert results["backbone"]["input_shape"] == [224, 224, 3]
    by_layers = {t["params"]["fine_tune_layers"]: t for t in results["trials"]}
    assert "fine_tune" not in by_layers[0]
    fine = by_layers[1]["fine_tune"]
    assert len(fine["layers"]) == 1
    assert fine["kept"] in ("fine_tuned", "frozen")
    assert by_layers[1]["takes_pixels"]

    export = stock_tuned["tasks"]["export_best_model"]["xcom"]
    metadata = registry.resolve(workspace["ws"] + "/models/", "my-photos-stock", export["version"])
    assert metadata["label_names"] == sorted(CLASSES)
    assert (metadata["backbone"]["name"], metadata["input_shape"], metadata["input_dtype"]) == (STOCK_BACKBONE, [224, 224, 3], "uint8")
    best = {t["trial_id"]: t for t in results["trials"]}[export["trial_id"]]
    fine_tuned = best.get("fine_tune", {}).get("kept") == "fine_tuned"
    assert metadata["fine_tuned_layers"] == (best["fine_tune"]["layers"] if fine_tuned else [])
    served = registry.load_version_model(metadata)
    x_test, _y = dataset.read_split(results["prepared_uri"], "test")
    trained = registry.load_verified_model(best["model_uri"], best["model_sha256"])
    if not best.get("takes_pixels"):  # a frozen head: the export composed it with the registered backbone
        from sparktf import backbones

        stock = registry.resolve(workspace["ws"] + "/models/", STOCK_BACKBONE, 1)
        trained = backbones.compose(registry.load_version_model(stock), trained)
    np.testing.assert_allclose(np.asarray(served(x_test, training=False)), np.asarray(trained(x_test, training=False)), rtol=1e-5, atol=1e-6)


def test_fine_tuning_more_layers_than_the_backbone_has_is_refused_through_the_dag(airflow_env, workspace, registered, tmp_path):
    conf = head_conf(workspace, fine_tune_layers=[0, 40])
    code, summary, output = run_dag(airflow_env, tmp_path, "tuning_pipeline", conf)
    assert code == 1
    assert states(summary)["validate_params"] == "failed"
    assert states(summary)["prepare_data"] == "upstream_failed"
    assert f"fine_tune_layers: backbone '{BACKBONE}' has 3 layers with weights below its features, fewer than [40]; give at most 3" in output
