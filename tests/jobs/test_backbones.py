"""Your own classes on a registered backbone: the refusals before any Spark job, featurizing once on
Spark, heads tuned as trials, and the one exported model (real S3, real Spark, real Keras)."""

from __future__ import annotations

import os
import tempfile

import pytest

from sparktf import applications, backbones, knobs, registry
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
