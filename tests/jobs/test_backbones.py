"""Your own classes on a registered backbone: the refusals before any Spark job, featurizing once on
Spark, heads tuned as trials, and the one exported model (real S3, real Spark, real Keras)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from sparktf import applications, backbones, features, knobs, registry
from sparktf.airflow import validation

INPUT = (16, 16, 3)


def tiny_backbone(*, classes: int = 4, pooled: bool = True, channels: int = 3, nested: bool = False, seed: int = 0):
    """A small conv net taking uint8 pixels: conv, pooling, a hidden Dense, a Dense classifier.

    ``pooled=False`` ends in a conv and a softmax after global pooling (no Dense classifier: no
    feature layer). ``nested`` wraps it as register_model wraps a stock network (pixels ->
    rescaling -> the network as one nested model).
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((INPUT[0], INPUT[1], channels), dtype="float32" if nested else "uint8", name="pixels")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    if pooled:
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(12, activation="relu", name="hidden")(x)
        outputs = layers.Dense(classes, activation="softmax", name="predictions")(x)
    else:
        x = layers.Conv2D(classes, 1)(x)
        x = layers.GlobalAveragePooling2D()(x)
        outputs = layers.Activation("softmax")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    if not nested:
        return model
    pixels = keras.Input(INPUT, dtype="uint8", name="pixels")
    return keras.Model(pixels, model(layers.Rescaling(1.0, name="to_float")(pixels)), name="tiny_uint8")


def register(models_uri: str, name: str, model, *, resize_policy: str = "center_crop", **overrides) -> dict:
    """Register ``model`` as register_model does (its metadata, then the champion pointer)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        shape = tuple(int(v) for v in model.inputs[0].shape[1:])
        classes = int(model.outputs[0].shape[-1])
        metadata = applications.version_metadata(
            input_shape=shape,
            label_names=[f"c{i}" for i in range(classes)],
            resize_policy=resize_policy,
            source={"kind": "keras_file", "model_uri": "s3://test/model.keras"},
            labels={"kind": "label_map"},
            input_dtype=str(model.inputs[0].dtype),
        )
        metadata.update(overrides)
        metadata = registry.write_version(models_uri, name, model_path=path, metadata=metadata)
    registry.make_champion(models_uri, name, metadata, reason="test backbone")
    return metadata


@pytest.fixture(scope="module")
def models_uri(bucket) -> str:
    import uuid

    uri = f"s3://{bucket}/backbones-{uuid.uuid4().hex[:8]}/models/"
    register(uri, "tiny", tiny_backbone())
    register(uri, "tiny-nested", tiny_backbone(nested=True))
    register(uri, "no-features", tiny_backbone(pooled=False))
    return uri


# ---------------------------------------------------------------------------------------------
# Point 1: the Param, the head's dimensions, the refusals before any Spark job
# ---------------------------------------------------------------------------------------------


def test_backbone_and_head_knobs_are_params_and_the_head_dimensions_need_a_backbone():
    specs = knobs.param_specs()
    assert specs["backbone"]["default"] == ""
    assert specs["backbone"]["type"] == "string"
    assert specs["l2_weights"]["items"]["minimum"] == 0
    assert specs["hidden_units"]["items"]["minimum"] == 0
    values = knobs.defaults()
    assert "l2_weight" not in knobs.search_space(values)  # from scratch: the space (and trial ids) as before
    assert knobs.search_space({**values, "backbone": "tiny", "l2_weights": [0.0, 0.01]})["l2_weight"] == [0.0, 0.01]
    assert knobs.validate({**values, "backbone": "tiny", "hidden_units": [0, 16], "l2_weights": [0.0, 0.01]}) == []
    linear = knobs.validate({**values, "hidden_units": [0, 16]})
    assert len(linear) == 1
    assert "hidden_units: 0 (a linear head) needs a backbone" in linear[0]
    l2 = knobs.validate({**values, "l2_weights": [0.01]})
    assert len(l2) == 1
    assert "l2_weights" in l2[0]
    assert "set backbone" in l2[0]


def test_tuning_problems_count_the_head_grid():
    params = {**knobs.defaults(), "backbone": "tiny", "l2_weights": [0.0, 0.001, 0.01], "dataset_uri": "s3://b/d/", "workspace_uri": "s3://b"}
    problems, summary = validation.tuning_problems(params)
    assert problems == []
    assert summary["trials"] == 2 * 2 * 1 * 1 * 3  # learning rates x hidden units x batch sizes x dropouts x L2 weights


def test_empty_backbone_needs_no_check(models_uri):
    assert validation.backbone_problems("", models_uri) == []


@pytest.mark.parametrize("name", ["tiny", "tiny@1", "tiny-nested"])
def test_a_usable_backbone_passes_and_says_its_input_and_features(models_uri, name):
    assert validation.backbone_problems(name, models_uri) == []
    checked = backbones.check_backbone(models_uri, name)
    assert checked["input_shape"] == list(INPUT)
    assert checked["resize_policy"] == "center_crop"
    assert checked["feature_dim"] == 12


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ("missing-model", "has no champion"),
        ("tiny@7", "version 7 does not exist"),
        ("tiny@x@y", "is not a model name or name@<version>"),
        ("Bad Name", "is not a model name or name@<version>"),
    ],
)
def test_a_backbone_that_does_not_exist_is_refused_saying_what_to_do(models_uri, backbone, expected):
    problems = validation.backbone_problems(backbone, models_uri)
    assert len(problems) == 1, problems
    assert expected in problems[0]
    if "does not exist" in expected or "no champion" in expected:
        assert "register one with the register_model DAG" in problems[0]


def test_a_backbone_without_a_feature_layer_is_refused(models_uri):
    problems = validation.backbone_problems("no-features", models_uri)
    assert len(problems) == 1, problems
    assert "has no usable feature layer" in problems[0]
    assert "global pooling" in problems[0]


def test_a_backbone_needing_an_input_the_data_cannot_give_is_refused(models_uri):
    register(models_uri, "four-channels", tiny_backbone(channels=4))
    problems = validation.backbone_problems("four-channels", models_uri)
    assert len(problems) == 1, problems
    assert "not an image (height, width, 1 or 3 channels)" in problems[0]
    metadata = registry.resolve(models_uri, "tiny")
    with pytest.raises(backbones.BackboneRefused, match="resize_policy 'stretch'"):
        backbones.backbone_input({**metadata, "resize_policy": "stretch"})
    with pytest.raises(backbones.BackboneRefused, match="takes string input"):
        backbones.backbone_input({**metadata, "input_dtype": "string"})


# ---------------------------------------------------------------------------------------------
# Point 2: featurize once on Spark, reuse, featurize again for another backbone version
# ---------------------------------------------------------------------------------------------

CLASSES = {"cat": (200, 60, 40), "dog": (40, 180, 60), "owl": (50, 60, 200)}
PER_CLASS = 10


def photo_bytes(color: tuple[int, int, int], size: tuple[int, int], index: int) -> tuple[str, bytes]:
    """A noisy photo of one dominant colour, JPEG or PNG by ``index``."""
    import io

    from PIL import Image

    rng = np.random.default_rng(index)
    pixels = np.clip(np.array(color)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    kind = "JPEG" if index % 2 else "PNG"
    Image.fromarray(pixels).save(buffer, format=kind)
    return kind.lower(), buffer.getvalue()


@pytest.fixture(scope="module")
def photos(spark, bucket):
    """An ImageFolder of generated RGB photos of 3 classes (sizes 20x16 to 64x48), prepared for the backbone."""
    import uuid

    from sparktf import storage
    from sparktf.jobs import prepare_data

    root = f"s3://{bucket}/photos-{uuid.uuid4().hex[:8]}"
    models = f"{root}/models/"
    register(models, "photo-backbone", tiny_backbone(seed=0))
    for label, color in CLASSES.items():
        for i in range(PER_CLASS):
            kind, data = photo_bytes(color, (20 + 4 * i, 16 + 3 * i), i + 100 * len(label) + ord(label[0]))
            storage.write_bytes(f"{root}/raw/{label}/nested/{i:02d}.{kind}", data)
    prepared = f"{root}/prepared/"
    argv = ["--input-uri", f"{root}/raw/", "--output-uri", prepared, "--backbone", "photo-backbone", "--models-uri", models]
    result = prepare_data.run(spark, prepare_data.parse_args([*argv, "--validation-fraction", "0.2", "--test-fraction", "0.2"]))
    return {"root": root, "models_uri": models, "prepared_uri": prepared, "prepare_result": result}


def test_prepare_data_decodes_to_the_backbones_recorded_input(photos):
    from sparktf import dataset

    manifest = dataset.read_manifest(photos["prepared_uri"])
    assert manifest["image_shape"] == list(INPUT)
    assert manifest["resize_policy"] == "center_crop"
    assert manifest["backbone"]["name"] == "photo-backbone"
    assert manifest["label_names"] == sorted(CLASSES)
    assert sum(manifest["splits"][s]["count"] for s in dataset.SPLITS) == len(CLASSES) * PER_CLASS


def test_features_are_computed_once_and_again_only_for_another_backbone(spark, photos):
    from sparktf import dataset

    manifest = dataset.read_manifest(photos["prepared_uri"])
    features_root = photos["root"] + "/features/"

    def run():
        backbone = backbones.check_backbone(photos["models_uri"], "photo-backbone")
        return features.featurize(
            spark, prepared_uri=photos["prepared_uri"], manifest=manifest, backbone=backbone, features_root=features_root, batch_size=4
        )

    uri, found, featurized = run()
    assert featurized == len(CLASSES) * PER_CLASS == found["images"]
    assert found["feature_dim"] == 12
    # The shards hold what the backbone's extractor gives in this process, in read_split's order.
    model = registry.load_version_model(registry.resolve(photos["models_uri"], "photo-backbone"))
    extractor = backbones.feature_extractor(model)
    x_test, y_test = dataset.read_split(photos["prepared_uri"], "test", manifest)
    got_x, got_y = features.read_features_split(uri, "test", found)
    np.testing.assert_array_equal(got_y, y_test)
    np.testing.assert_allclose(got_x, np.asarray(extractor(x_test, training=False)), rtol=1e-5, atol=1e-6)

    again_uri, again, featurized_again = run()
    assert (again_uri, featurized_again) == (uri, 0)
    assert again == found

    register(photos["models_uri"], "photo-backbone", tiny_backbone(seed=1))  # v2 becomes the champion
    new_uri, new, featurized_new = run()
    assert featurized_new == len(CLASSES) * PER_CLASS
    assert new_uri != uri
    assert new["backbone"]["version"] == 2


# ---------------------------------------------------------------------------------------------
# Point 3: heads tuned as trials on the features, one exported model backbone + head
# ---------------------------------------------------------------------------------------------


def head_tune_args(photos: dict, output_uri: str):
    from sparktf.jobs import tune

    return tune.parse_args(
        [
            "--prepared-uri",
            photos["prepared_uri"],
            "--output-uri",
            output_uri,
            "--models-uri",
            photos["models_uri"],
            "--features-uri",
            photos["root"] + "/features-tune/",
            "--backbone",
            "photo-backbone@1",
            "--learning-rates",
            "0.05",
            "--hidden-units",
            "0,8",
            "--l2-weights",
            "0,0.001",
            "--dropouts",
            "0",
            "--batch-sizes",
            "8",
            "--epochs",
            "3",
            "--patience",
            "3",
        ]
    )


@pytest.fixture(scope="module")
def tuned_heads(spark, photos):
    from sparktf.jobs import tune

    out = photos["root"] + "/run1/tuning/"
    first = tune.run(spark, head_tune_args(photos, out))
    second = tune.run(spark, head_tune_args(photos, out))  # a cleared run: same data, same backbone
    return out, first, second


def test_heads_are_tuned_as_trials_on_features_computed_once(tuned_heads):
    from sparktf import storage

    out, first, second = tuned_heads
    assert first["trials"] == 4
    assert first["succeeded"] == 4
    assert first["backbone"] == "photo-backbone@1"
    assert first["featurized"] == len(CLASSES) * PER_CLASS
    assert (second["featurized"], second["features_reused"], second["reused"]) == (0, True, 4)
    results = storage.read_json(out + "results.json")
    assert results["model_family"] == "head"
    assert results["features"]["feature_dim"] == 12
    assert sorted({(t["params"]["hidden_units"], t["params"]["l2_weight"]) for t in results["trials"]}) == [
        (0, 0.0),
        (0, 0.001),
        (8, 0.0),
        (8, 0.001),
    ]
    assert {"l2_weight", "hidden_units"} <= set(first["leaderboard"][0])


def test_the_export_is_one_model_backbone_and_head_taking_uint8_pixels(spark, photos, tuned_heads):
    import keras

    from sparktf import dataset, storage
    from sparktf.jobs import export_model

    out, _first, _second = tuned_heads
    argv = ["--results-uri", out + "results.json", "--models-uri", photos["models_uri"], "--model-name", "my-photos"]
    result = export_model.run(export_model.parse_args([*argv, "--source-run", "r1", "--trained-at", "2026-12-07T00:00:00+00:00"]))
    assert result["promoted"]
    metadata = registry.resolve(photos["models_uri"], "my-photos")
    backbone = registry.resolve(photos["models_uri"], "photo-backbone", 1)
    assert metadata["label_names"] == sorted(CLASSES)
    assert metadata["backbone"]["name"] == "photo-backbone"
    assert (metadata["backbone"]["version"], metadata["backbone"]["model_sha256"]) == (1, backbone["model_sha256"])
    assert (metadata["resize_policy"], metadata["input_shape"], metadata["input_dtype"]) == ("center_crop", list(INPUT), "uint8")
    assert metadata["model_uri"].endswith(".keras")

    served = registry.load_version_model(metadata)  # sha256-checked, allowlist, safe mode
    assert served.inputs[0].dtype == "uint8"
    assert applications.describe_model(served) == (INPUT, len(CLASSES))
    x_test, _y = dataset.read_split(photos["prepared_uri"], "test")
    best = {t["trial_id"]: t for t in storage.read_json(out + "results.json")["trials"]}[result["trial_id"]]
    head = registry.load_verified_model(best["model_uri"], best["model_sha256"])
    extractor = backbones.feature_extractor(registry.load_version_model(backbone))
    expected = np.asarray(head(extractor(x_test, training=False), training=False))
    np.testing.assert_allclose(np.asarray(served(x_test, training=False)), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(served, keras.Model)


@pytest.mark.parametrize(("application", "dim"), [("MobileNetV3Small", 1024), ("MobileNetV2", 1280)])
def test_the_feature_layer_of_stock_networks_is_their_pooled_vector(application, dim):
    """A stock network wrapped as register_model wraps it: the features are the classifier's input."""
    import keras

    base = getattr(keras.applications, application)(weights=None, input_shape=(32, 32, 3), classes=5)
    pixels = keras.Input((32, 32, 3), dtype="uint8", name="pixels")
    wrapped = keras.Model(pixels, base(keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(pixels)))
    extractor = backbones.feature_extractor(wrapped)
    assert tuple(extractor.outputs[0].shape) == (None, dim)
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.asarray(extractor(batch, training=False)).shape == (2, dim)


def test_features_too_large_to_broadcast_reach_trials_from_shards(spark, photos, tuned_heads):
    from sparktf import storage
    from sparktf.jobs import tune

    out = photos["root"] + "/run-shards/tuning/"
    args = head_tune_args(photos, out)
    args.broadcast_max_mb = 0.0
    result = tune.run(spark, args)
    assert (result["succeeded"], result["featurized"]) == (4, 0)
    assert storage.read_json(out + "results.json")["data_transfer"] == "feature_shards"


# ---------------------------------------------------------------------------------------------
# fine_tune_layers: a last phase through the partly unfrozen backbone, on the images
# ---------------------------------------------------------------------------------------------


def test_fine_tuning_is_a_backbone_grid_setting_refused_elsewhere():
    values = knobs.defaults()
    assert knobs.search_space({**values, "backbone": "tiny", "fine_tune_layers": [0, 2]})["fine_tune_layers"] == [0, 2]
    assert "fine_tune_layers" not in knobs.search_space(values)
    assert knobs.validate({**values, "backbone": "tiny", "fine_tune_layers": [0, 2]}) == []
    without = knobs.validate({**values, "fine_tune_layers": [2]})
    assert len(without) == 1
    assert without[0].startswith("fine_tune_layers: fine-tuning is a backbone head's setting")
    halving = knobs.validate({**values, "backbone": "tiny", "fine_tune_layers": [1], "search_strategy": "halving"})
    assert len(halving) == 1
    assert "search_strategy to grid" in halving[0]
    assert knobs.validate({**values, "backbone": "tiny", "fine_tune_layers": [0], "search_strategy": "halving"}) == []


def test_only_the_top_weighted_layers_are_unfrozen_and_batch_norm_stays_frozen():
    import keras

    from sparktf import finetune

    extractor = backbones.feature_extractor(tiny_backbone())
    assert [layer.name for layer in finetune.weighted_layers(extractor)][-1] == "hidden"
    assert len(finetune.weighted_layers(extractor)) == 2  # the conv and the hidden Dense: not the classifier above the features
    assert finetune.unfreeze_top(extractor, 1) == ["hidden"]
    assert [layer.name for layer in extractor.layers if layer.trainable and layer.weights] == ["hidden"]
    assert finetune.unfreeze_top(extractor, 0) == []
    assert not [layer for layer in extractor.layers if layer.trainable and layer.weights]
    with pytest.raises(ValueError, match="more than the 2 layers with weights"):
        finetune.unfreeze_top(extractor, 3)

    nested = backbones.feature_extractor(tiny_backbone(nested=True))  # as register_model wraps a stock network
    assert len(finetune.weighted_layers(nested)) == 2
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    bn_net = keras.Model(inputs, keras.layers.Dense(2, name="classifier")(x))
    bn_extractor = backbones.feature_extractor(bn_net)
    assert finetune.unfreeze_top(bn_extractor, 1) == ["conv"]
    assert not bn_extractor.get_layer("bn").trainable


def test_fine_tuning_more_layers_than_the_backbone_has_is_refused_before_any_spark_job(models_uri):
    assert validation.backbone_problems("tiny", models_uri, [0, 2]) == []
    problems = validation.backbone_problems("tiny", models_uri, [0, 1, 3, 5])
    assert problems == ["fine_tune_layers: backbone 'tiny' has 2 layers with weights below its features, fewer than [3, 5]; give at most 2"]


def weighted_pairs(composed, photos: dict) -> tuple[list, list]:
    """The weighted layers below the features of a composed model and of the registered backbone it came from, bottom to top."""
    from sparktf import finetune

    backbone = registry.load_version_model(registry.resolve(photos["models_uri"], "photo-backbone", 1))
    extractor = composed.get_layer(f"{backbone.name}_features")
    return finetune.weighted_layers(extractor), finetune.weighted_layers(backbones.feature_extractor(backbone))


@pytest.fixture(scope="module")
def fine_tuned(spark, photos):
    from sparktf import storage
    from sparktf.jobs import tune

    out = photos["root"] + "/run-fine-tune/tuning/"
    args = head_tune_args(photos, out)
    args.hidden_units, args.l2_weights, args.fine_tune_layers = [8], [0.0], [0, 1]
    result = tune.run(spark, args)
    return out, result, storage.read_json(out + "results.json")


def test_a_fine_tuning_trial_trains_the_top_layer_through_the_backbone_on_the_images(photos, fine_tuned):
    from sparktf import dataset

    _out, result, results = fine_tuned
    assert (result["trials"], result["succeeded"]) == (2, 2)
    assert results["data_transfer"] == "features_and_images"
    by_layers = {t["params"]["fine_tune_layers"]: t for t in results["trials"]}
    frozen, tuned = by_layers[0], by_layers[1]
    assert "fine_tune" not in frozen
    assert not frozen.get("takes_pixels")
    assert tuned["takes_pixels"]
    assert tuned["fine_tune"]["layers"] == ["hidden"]
    assert tuned["fine_tune"]["learning_rate"] == pytest.approx(0.05 * 0.1)
    assert tuned["epochs_run"] == frozen["epochs_run"] + tuned["fine_tune"]["epochs_run"]  # same head phase, then the images
    assert tuned["fine_tune"]["val_accuracy_head"] == pytest.approx(frozen["val_accuracy"], abs=1e-6)

    model = registry.load_verified_model(tuned["model_uri"], tuned["model_sha256"])
    assert model.inputs[0].dtype == "uint8"
    (conv, hidden), (backbone_conv, backbone_hidden) = weighted_pairs(model, photos)
    # The conv layer was frozen: the backbone's weights. The top one trained unless fine-tuning was worse (then all kept).
    np.testing.assert_array_equal(conv.get_weights()[0], backbone_conv.get_weights()[0])
    hidden_moved = not np.array_equal(hidden.get_weights()[0], backbone_hidden.get_weights()[0])
    assert hidden_moved == (tuned["fine_tune"]["kept"] == "fine_tuned")
    x_val, y_val = dataset.read_split(photos["prepared_uri"], "validation")
    accuracy = float(np.mean(np.argmax(np.asarray(model(x_val, training=False)), axis=1) == y_val))
    assert accuracy == pytest.approx(tuned["val_accuracy"], abs=1e-6)  # the record's metrics are the saved model's, on the images


def test_a_fine_tuned_trial_is_exported_as_it_was_trained(photos, fine_tuned):
    from sparktf import backbones as backbones_module
    from sparktf import dataset

    _out, _result, results = fine_tuned
    tuned = next(t for t in results["trials"] if t["params"]["fine_tune_layers"] == 1)
    metadata = {"label_names": sorted(CLASSES), "source_run": "fine-tune", "trial_id": tuned["trial_id"]}
    version = backbones_module.export_transfer(photos["models_uri"], "fine-tuned-photos", tuned, results, metadata)
    expected_layers = ["hidden"] if tuned["fine_tune"]["kept"] == "fine_tuned" else []
    assert version["fine_tuned_layers"] == expected_layers
    served = registry.load_version_model(version)
    trained = registry.load_verified_model(tuned["model_uri"], tuned["model_sha256"])
    x_test, _y = dataset.read_split(photos["prepared_uri"], "test")
    np.testing.assert_allclose(np.asarray(served(x_test, training=False)), np.asarray(trained(x_test, training=False)), rtol=1e-6, atol=1e-7)


def test_fine_tuning_that_diverges_keeps_the_frozen_weights(photos):
    import keras

    from sparktf import dataset, finetune, models, trials

    data = {
        "images": dataset.load_arrays(photos["prepared_uri"]),
        "backbone": {k: registry.resolve(photos["models_uri"], "photo-backbone", 1)[k] for k in ("model_uri", "model_sha256")},
    }
    head = models.build_head((12,), len(CLASSES), hidden_units=0)
    record = {"params": {"learning_rate": 1e9, "batch_size": 8, "fine_tune_layers": 2, "optimizer": "sgd"}, "max_epochs": 2, "epochs_run": 1}
    frozen = {"val_accuracy": 0.5, "val_loss": 1.0}
    keras.utils.set_random_seed(0)
    model, metrics = finetune.fine_tune(head, data, record, frozen=frozen, callbacks=[keras.callbacks.TerminateOnNaN()])
    assert record["fine_tune"]["kept"] == "frozen"
    assert record["fine_tune"]["val_accuracy_fine_tuned"] is None or record["fine_tune"]["val_accuracy_fine_tuned"] <= metrics["val_accuracy"]
    assert metrics == trials.evaluate(model, data["images"])  # the composed frozen model's own metrics on the images
    for trained, registered in zip(*weighted_pairs(model, photos), strict=True):
        np.testing.assert_array_equal(trained.get_weights()[0], registered.get_weights()[0])
