"""sparktf.applications and the register_model job: stock Keras networks built from uploaded
weights (real architectures, weights the tests make), users' .keras files, label maps, the packaged
ImageNet class names, and every refusal (nothing registered)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from sparktf import applications, registry, storage
from sparktf.applications import RegistrationRefused
from sparktf.jobs import register_model
from sparktf_dev.testing import application_weights


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory) -> str:
    return application_weights("MobileNetV3Small", str(tmp_path_factory.mktemp("w") / "mnv3s.weights.h5"), sharpen=20.0)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """InceptionV3 (~24M parameters, a 96 MB file): made once for the module."""
    return application_weights("InceptionV3", str(tmp_path_factory.mktemp("w") / "inception_v3.weights.h5"), sharpen=5.0)


@pytest.fixture(scope="module")
def inception_artifact(inception_weights, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("a") / "model.keras")
    applications.build_application("InceptionV3", inception_weights).save(path)
    return path


def probe_batch(side: int) -> np.ndarray:
    from sparktf_dev.testing import photo

    return np.stack([np.asarray(photo(seed, side, side)) for seed in (21, 22)])


def lambda_model(path: str) -> str:
    """A small image classifier with a Lambda layer (Python code inside the artifact)."""
    import keras

    pixels = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0)(pixels)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(pixels, keras.layers.Dense(4, activation="softmax")(x)).save(path)
    return path


def small_classifier(path: str, classes: int = 4, input_shape=(32, 32, 3)) -> str:
    """A user's own safe .keras file: preprocessing as a layer, fixed input size."""
    import keras

    keras.utils.set_random_seed(3)
    pixels = keras.Input(input_shape)
    x = keras.layers.Rescaling(1 / 255.0)(pixels)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(pixels, keras.layers.Dense(classes, activation="softmax")(x)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# ImageNet labels and label maps
# ---------------------------------------------------------------------------------------------


def test_packaged_imagenet_class_index_is_complete_and_in_output_order():
    index = applications.imagenet_class_index()
    assert len(index) == 1000
    wnids = [wnid for wnid, _name in index]
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids == sorted(wnids)
    assert len(set(wnids)) == 1000
    labels = applications.imagenet_labels()
    # the reference recipe's example: coral reef, scuba diver, brain coral, snorkel, promontory
    assert [labels[i] for i in (973, 983, 109, 801, 976)] == ["coral reef", "scuba diver", "brain coral", "snorkel", "promontory"]
    assert (labels[0], labels[999], index[0][0], index[999][0]) == ("tench", "toilet tissue", "n01440764", "n15075141")
    assert not any("_" in label for label in labels)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'["cat", "dog", "bird"]', ["cat", "dog", "bird"]),
        (b'{"1": "dog", "0": "cat", "2": "bird"}', ["cat", "dog", "bird"]),
        (b'{"0": ["n01", "tabby_cat"], "1": ["n02", "dog"], "2": ["n03", "bird"]}', ["tabby cat", "dog", "bird"]),
        (b"cat\ndog\noiseau bleu\n\n", ["cat", "dog", "oiseau bleu"]),
        (b"\xef\xbb\xbfcat\r\ndog\r\nbird", ["cat", "dog", "bird"]),
    ],
    ids=["json-list", "json-dict", "keras-index", "text", "text-bom-crlf"],
)
def test_label_maps(content, expected):
    assert applications.parse_label_map(content) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no labels"),
        (b"[]", "no labels"),
        (b'{"0": "cat", "2": "dog"}', "keys"),
        (b'["cat", 3]', "strings"),
        (b'["cat", ', "does not parse"),
        (b"cat\n\ndog\n", "empty labels"),
        (b"\xff\xfe\x00", "UTF-8"),
    ],
)
def test_bad_label_maps_are_refused(content, message):
    with pytest.raises(RegistrationRefused, match=message):
        applications.parse_label_map(content)


def test_label_map_size_must_match_the_outputs():
    applications.check_labels(["a"] * 1000, 1000)
    with pytest.raises(RegistrationRefused, match="has 999 labels but the model has 1000 outputs"):
        applications.check_labels(["a"] * 999, 1000)


def test_request_checks_say_what_to_fix():
    good = {
        "model_name": "inception-v3",
        "source": "keras_application",
        "application": "InceptionV3",
        "weights_uri": "s3://b/up/inception_v3.weights.h5",
        "labels": "imagenet",
        "resize_policy": "center_crop",
    }
    assert applications.check_request(good) == []
    assert applications.check_request({**good, "source": "keras_file", "model_uri": "s3://b/m.keras"}) == []
    problems = applications.check_request(
        {**good, "application": "ResNet50", "weights_uri": "s3://b/x.h5", "labels": "label_map", "model_name": "Bad Name"}
    )
    assert len(problems) == 4
    assert any("ResNet50" in p for p in problems)
    assert any(".weights.h5" in p for p in problems)
    assert any("label_map_uri" in p for p in problems)
    assert any("model_name" in p for p in problems)


# ---------------------------------------------------------------------------------------------
# Stock networks from a weights file
# ---------------------------------------------------------------------------------------------


def test_inception_v3_takes_uint8_and_scales_like_keras_preprocess_input(inception_weights, inception_artifact):
    import keras

    model = applications.load_safely(inception_artifact)
    assert applications.describe_model(model) == ((299, 299, 3), 1000)
    assert model.inputs[0].dtype == "uint8"
    scaling = model.get_layer("inception_preprocessing")
    assert isinstance(scaling, keras.layers.Rescaling)
    assert (scaling.scale, scaling.offset) == pytest.approx((1 / 127.5, -1.0))
    # The same network given Keras' own preprocess_input on float pixels: the same scores.
    reference = keras.applications.InceptionV3(weights=None)
    reference.load_weights(inception_weights)
    batch = probe_batch(299)
    expected = np.asarray(reference(keras.applications.inception_v3.preprocess_input(batch.astype("float32")), training=False))
    got = np.asarray(model(batch, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_small_network_keeps_its_own_preprocessing(mobilenet_weights, tmp_path):
    import keras

    model = applications.build_application("MobileNetV3Small", mobilenet_weights)
    path = str(tmp_path / "m.keras")
    model.save(path)
    served = applications.load_safely(path)
    assert applications.describe_model(served) == ((224, 224, 3), 1000)
    reference = keras.applications.MobileNetV3Small(weights=None)
    reference.load_weights(mobilenet_weights)
    assert any(isinstance(layer, keras.layers.Rescaling) for layer in reference.layers)  # its own, inside
    batch = probe_batch(224)
    np.testing.assert_allclose(np.asarray(served(batch, training=False)), np.asarray(reference(batch.astype("float32"), training=False)), atol=1e-6)


def test_weights_of_another_network_are_refused(mobilenet_weights):
    with pytest.raises(RegistrationRefused, match="does not fit InceptionV3"):
        applications.build_application("InceptionV3", mobilenet_weights)


def test_weights_with_another_number_of_classes_are_refused(tmp_path):
    import keras

    path = str(tmp_path / "ten.weights.h5")
    keras.applications.MobileNetV3Small(weights=None, classes=10).save_weights(path)
    with pytest.raises(RegistrationRefused, match="does not fit MobileNetV3Small"):
        applications.build_application("MobileNetV3Small", path)


def test_a_file_that_is_not_a_weights_file_is_refused(tmp_path):
    path = tmp_path / "x.weights.h5"
    path.write_bytes(b"<html>403 Forbidden</html>")
    with pytest.raises(RegistrationRefused, match="not an HDF5"):
        applications.build_application("MobileNetV3Small", str(path))


def test_an_unsupported_application_is_refused(mobilenet_weights):
    with pytest.raises(RegistrationRefused, match="not supported"):
        applications.build_application("EfficientNetB0", mobilenet_weights)


# ---------------------------------------------------------------------------------------------
# Users' .keras files
# ---------------------------------------------------------------------------------------------


def test_a_lambda_layer_is_refused(tmp_path):
    with pytest.raises(RegistrationRefused, match="safe mode"):
        applications.load_safely(lambda_model(str(tmp_path / "lambda.keras")))


def test_a_lambda_of_an_importable_function_is_refused_too(tmp_path):
    import keras

    pixels = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(keras.activations.relu)(pixels)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = str(tmp_path / "relu-lambda.keras")
    keras.Model(pixels, keras.layers.Dense(2)(x)).save(path)
    with pytest.raises(RegistrationRefused, match="Lambda"):
        applications.load_safely(path)


def test_a_model_without_a_fixed_image_size_is_refused(tmp_path):
    import keras

    path = str(tmp_path / "any-size.keras")
    pixels = keras.Input((None, None, 3))
    keras.Model(pixels, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(pixels))).save(path)
    with pytest.raises(RegistrationRefused, match="fixed size"):
        applications.describe_model(applications.load_safely(path))


# ---------------------------------------------------------------------------------------------
# The register_model job (in-process, real S3): registered versions and refusals
# ---------------------------------------------------------------------------------------------


def job_args(ws: str, name: str, *extra: str):
    return register_model.parse_args(["--models-uri", ws + "/models/", "--model-name", name, *extra])


def test_job_registers_a_small_network_with_imagenet_labels_and_promotes_it(s3_prefix, mobilenet_weights):
    ws = s3_prefix
    weights_uri = ws + "/uploads/mobilenet_v3_small.weights.h5"
    with open(mobilenet_weights, "rb") as fh:
        data = fh.read()
    storage.write_bytes(weights_uri, data)
    args = job_args(
        ws,
        "mobilenet",
        "--source",
        "keras_application",
        "--application",
        "MobileNetV3Small",
        "--weights-uri",
        weights_uri,
        "--labels",
        "imagenet",
        "--promote",
        "true",
        "--source-run",
        "run-1",
        "--registered-at",
        "2026-11-24T10:00:00+00:00",
    )
    result = register_model.run(args)
    assert result["registered"]
    assert result["version"] == 1
    assert result["promoted"]
    assert result["champion_version"] == 1
    assert result["labels_sample"] == ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
    metadata = registry.resolve(ws + "/models/", "mobilenet")
    assert metadata["input_shape"] == [224, 224, 3]
    assert metadata["channels"] == 3
    assert metadata["resize_policy"] == "center_crop"
    assert metadata["input_dtype"] == "uint8"
    assert metadata["label_names"] == applications.imagenet_labels()
    assert metadata["source"]["application"] == "MobileNetV3Small"
    assert metadata["source"]["weights_sha256"] == storage.sha256_hex(data)
    assert metadata["labels"]["kind"] == "imagenet"
    assert metadata["registered_at"] == "2026-11-24T10:00:00+00:00"
    model = registry.load_version_model(metadata)  # sha256-checked, safe mode
    assert applications.describe_model(model) == ((224, 224, 3), 1000)
    # A retry of the same run reuses its version instead of registering another.
    again = register_model.run(args)
    assert again["reused_version"]
    assert again["version"] == 1
    assert not again["promoted"]
    assert [m["version"] for m in registry.list_versions(ws + "/models/", "mobilenet")] == [1]


def test_job_registers_a_users_keras_file_with_a_text_label_map(s3_prefix, tmp_path):
    ws = s3_prefix
    path = small_classifier(str(tmp_path / "mine.keras"))
    storage.write_bytes(ws + "/uploads/mine.keras", Path(path).read_bytes())
    storage.write_bytes(ws + "/uploads/labels.txt", "chat\nchien\nécureuil\npoisson\n".encode())
    result = register_model.run(
        job_args(
            ws,
            "mine",
            "--source",
            "keras_file",
            "--model-uri",
            ws + "/uploads/mine.keras",
            "--labels",
            "label_map",
            "--label-map-uri",
            ws + "/uploads/labels.txt",
            "--resize-policy",
            "resize",
        )
    )
    assert result["registered"]
    assert not result["promoted"]
    assert result["champion_version"] is None
    metadata = registry.resolve(ws + "/models/", "mine", 1)
    assert metadata["label_names"] == ["chat", "chien", "écureuil", "poisson"]
    assert metadata["input_shape"] == [32, 32, 3]
    assert metadata["resize_policy"] == "resize"
    # the user's file is registered byte for byte
    assert metadata["model_sha256"] == metadata["source"]["model_sha256"] == storage.sha256_hex(Path(path).read_bytes())


def test_a_retry_reuses_its_version_only_for_the_same_request(s3_prefix, tmp_path):
    """The same run id asking again with a replaced model file or label map registers anew; asking the
    same again reuses (the request is compared: source, uploads' sha256s, labels)."""
    ws = s3_prefix
    model_uri, labels_uri = ws + "/uploads/mine.keras", ws + "/uploads/labels.txt"
    storage.write_bytes(model_uri, Path(small_classifier(str(tmp_path / "a.keras"))).read_bytes())
    storage.write_bytes(labels_uri, b"a\nb\nc\nd\n")
    args = job_args(
        ws,
        "mine",
        "--source",
        "keras_file",
        "--model-uri",
        model_uri,
        "--labels",
        "label_map",
        "--label-map-uri",
        labels_uri,
        "--source-run",
        "run-1",
    )
    first = register_model.run(args)
    assert first["registered"]
    assert first["version"] == 1

    storage.write_bytes(labels_uri, b"w\nx\ny\nz\n")  # the label map replaced between two attempts
    relabelled = register_model.run(args)
    assert relabelled["version"] == 2
    assert not relabelled["reused_version"]
    assert registry.resolve(ws + "/models/", "mine", 2)["label_names"] == ["w", "x", "y", "z"]

    storage.write_bytes(model_uri, Path(small_classifier(str(tmp_path / "b.keras"), input_shape=(24, 24, 3))).read_bytes())
    other_model = register_model.run(args)
    assert other_model["version"] == 3
    assert other_model["input_shape"] == [24, 24, 3]

    again = register_model.run(args)
    assert again["version"] == 3
    assert again["reused_version"]
    assert register_model.request_differences(registry.resolve(ws + "/models/", "mine", 1), register_model.asked_fields(args)) == [
        "model_sha256",
        "label_map_sha256",
    ]


@pytest.mark.parametrize("case", ["lambda", "labels", "weights", "missing", "params"])
def test_job_refusals_register_nothing(s3_prefix, tmp_path, mobilenet_weights, case):
    ws = s3_prefix
    if case == "lambda":
        storage.write_bytes(ws + "/up/m.keras", Path(lambda_model(str(tmp_path / "l.keras"))).read_bytes())
        extra, message = ["--source", "keras_file", "--model-uri", ws + "/up/m.keras"], "safe mode"
    elif case == "labels":
        storage.write_bytes(ws + "/up/m.keras", Path(small_classifier(str(tmp_path / "s.keras"))).read_bytes())
        storage.write_bytes(ws + "/up/labels.json", json.dumps(["a", "b", "c"]).encode())
        extra = ["--source", "keras_file", "--model-uri", ws + "/up/m.keras", "--labels", "label_map", "--label-map-uri", ws + "/up/labels.json"]
        message = "has 3 labels but the model has 4 outputs"
    elif case == "weights":
        storage.write_bytes(ws + "/up/x.weights.h5", Path(mobilenet_weights).read_bytes())
        extra = ["--source", "keras_application", "--application", "MobileNetV3Large", "--weights-uri", ws + "/up/x.weights.h5"]
        message = "does not fit MobileNetV3Large"
    elif case == "missing":
        extra, message = ["--source", "keras_file", "--model-uri", ws + "/up/absent.keras"], "does not exist"
    else:
        extra, message = ["--source", "keras_application", "--application", "ResNet50", "--weights-uri", "x"], "ResNet50"
    result = register_model.run(job_args(ws, "refused", *extra, "--promote", "true"))
    assert result["registered"] is False
    assert message in result["refused"]
    assert storage.list_keys(ws + "/models/") == []  # no version, no champion


def test_weights_saved_from_a_compiled_model_still_fit(tmp_path, mobilenet_weights):
    import keras

    model = keras.applications.MobileNetV3Small(weights=None)
    model.load_weights(mobilenet_weights)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(np.zeros((2, 224, 224, 3), np.float32), np.zeros((2,)), epochs=1, verbose=0)  # optimizer state exists
    path = str(tmp_path / "compiled.weights.h5")
    model.save_weights(path)
    built = applications.build_application("MobileNetV3Small", path)
    assert applications.describe_model(built) == ((224, 224, 3), 1000)


def test_the_job_runs_under_spark_submit_without_a_spark_session(s3_prefix, tmp_path):
    """register_model (like export_model) is launched by spark-submit, as the DAG does, but starts no
    SparkContext: its result reaches --result-uri all the same."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import sparktf
    from sparktf.airflow.spark_job_operator import package_zip
    from sparktf_dev.testing import ROOT

    zip_path, _sha = package_zip()
    plugins = str(Path(sparktf.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(p for p in (plugins, os.environ.get("PYTHONPATH")) if p),
    }
    result_uri = s3_prefix + "/result.json"
    command = [
        str(Path(sys.executable).with_name("spark-submit")),
        "--master",
        "local[1]",
        "--py-files",
        zip_path,
        str(ROOT / "jobs" / "register_model.py"),
        "--models-uri",
        s3_prefix + "/models/",
        "--model-name",
        "absent",
        "--source",
        "keras_file",
        "--model-uri",
        s3_prefix + "/up/absent.keras",
        "--result-uri",
        result_uri,
    ]
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    output = job.stdout + job.stderr
    assert "register_model runs on the driver only: no SparkSession" in output
    assert "Running Spark version" not in output
    assert "Spark UI of application" not in output
    result = storage.read_json(result_uri)
    assert result["registered"] is False
    assert "does not exist" in result["refused"]
