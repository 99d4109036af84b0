"""Models the package did not train: stock Keras Applications networks and users' own ``.keras``
files, checked and turned into registry versions that the nightly inference applies to photos.

Pure functions (no Airflow, no Spark): the ``register_model`` job (:mod:`sparktf.jobs.register_model`)
calls them, and so can a notebook. Cheap to import: TensorFlow/Keras and h5py are imported inside
the functions that need them, so the ``register_model`` DAG file can read :data:`APPLICATIONS`.

What a registered artifact is, whatever its source:

* a ``.keras`` file that loads in Keras **safe mode** and holds **no Lambda layer** (no Python code
  is ever deserialised);
* one input ``(height, width, channels)`` fed **uint8 pixels in [0, 255]**, with the network's own
  preprocessing as Keras layers inside (for a stock network: Inception-style scaling to [-1, 1] as
  ``Rescaling(1/127.5, offset=-1)`` in front, or the network's built-in layers);
* one output of ``num_classes`` scores, named by a label list of exactly that length.

Nothing here downloads weights: a stock network is built with ``weights=None`` and then given the
weights file the user uploaded (``model.save_weights("x.weights.h5")`` on a machine with internet).

The ImageNet class names ship with the package (``sparktf/data/imagenet_class_index.json``, in Keras'
``imagenet_class_index.json`` layout ``{"0": ["n01440764", "tench"], ...}``). Source: the
``IMAGENET_NAMES`` table of keras-team/keras-hub, ``keras_hub/src/utils/imagenet/imagenet_utils.py``
(Apache 2.0), the same content as Keras' own ``imagenet_class_index.json``; see
``sparktf/data/README.md``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import sparktf

SOURCES = ("keras_application", "keras_file")
LABEL_SOURCES = ("imagenet", "label_map")
RESIZE_POLICIES = ("center_crop", "resize")  # the same names as sparktf.images.RESIZE_POLICIES
IMAGENET_CLASSES = 1000
IMAGENET_INDEX_FILE = "data/imagenet_class_index.json"
WEIGHTS_SUFFIX = ".weights.h5"
KERAS_SUFFIX = ".keras"
LABEL_MAP_MAX_BYTES = 16 * 1024 * 1024
_URI_RE = re.compile(r"^s3a?://[^/]+/.+")


class RegistrationRefused(ValueError):
    """A model, weights file or label map that cannot become a registry version, and why."""


@dataclass(frozen=True)
class Application:
    """A ``keras.applications`` network the package can build and register.

    Attributes:
        name: the constructor's name in ``keras.applications``.
        size: the square input side its ImageNet weights were trained at.
        preprocessing: ``inception`` (pixels scaled to [-1, 1]: a ``Rescaling(1/127.5,
            offset=-1)`` layer is put in front) or ``included`` (the network has its own
            preprocessing layers and takes [0, 255]).
    """

    name: str
    size: int
    preprocessing: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)


# Networks whose ImageNet preprocessing is exactly expressible as safe Keras layers. Left out:
# VGG/ResNet ("caffe": BGR and mean subtraction, no layer for the channel flip), DenseNet/NASNet
# (per-channel std), and EfficientNetB0-B7, whose builder adds the rescaling its ImageNet weights
# need only when it downloads them itself (built with weights=None, the scores would be wrong).
APPLICATIONS: dict[str, Application] = {
    a.name: a
    for a in (
        Application("InceptionV3", 299, "inception"),
        Application("InceptionResNetV2", 299, "inception"),
        Application("Xception", 299, "inception"),
        Application("MobileNetV2", 224, "inception"),
        Application("MobileNetV3Small", 224, "included"),
        Application("MobileNetV3Large", 224, "included"),
        Application("EfficientNetV2B0", 224, "included"),
        Application("EfficientNetV2B1", 240, "included"),
        Application("EfficientNetV2B2", 260, "included"),
        Application("EfficientNetV2B3", 300, "included"),
    )
}


# ---------------------------------------------------------------------------------------------
# The request (pure Python: the DAG checks it before any heavy work)
# ---------------------------------------------------------------------------------------------


def check_request(request: dict[str, Any]) -> list[str]:
    """Problems with a registration request (empty when it is consistent), each saying what to fix.

    Keys: ``model_name``, ``source``, ``application``, ``weights_uri``, ``model_uri``, ``labels``,
    ``label_map_uri``, ``resize_policy``. Only the fields the source uses are checked.
    """
    problems = []
    source = request.get("source")
    if not re.match(sparktf.MODEL_NAME_PATTERN, str(request.get("model_name") or "")):
        problems.append(f"model_name must be lower-case letters, digits, '.', '_' or '-', got {request.get('model_name')!r}")
    if source == "keras_application":
        if request.get("application") not in APPLICATIONS:
            problems.append(f"application {request.get('application')!r} is not one of {sorted(APPLICATIONS)}")
        weights = str(request.get("weights_uri") or "")
        if not (_URI_RE.match(weights) and weights.endswith(WEIGHTS_SUFFIX)):
            problems.append(f"weights_uri must be the S3 URI of a {WEIGHTS_SUFFIX} file saved with model.save_weights(...), got {weights!r}")
    elif source == "keras_file":
        model_uri = str(request.get("model_uri") or "")
        if not (_URI_RE.match(model_uri) and model_uri.endswith(KERAS_SUFFIX)):
            problems.append(f"model_uri must be the S3 URI of a {KERAS_SUFFIX} file saved with model.save(...), got {model_uri!r}")
    else:
        problems.append(f"source must be one of {SOURCES}, got {source!r}")
    labels = request.get("labels")
    if labels == "label_map":
        if not _URI_RE.match(str(request.get("label_map_uri") or "")):
            problems.append(
                "labels=label_map needs label_map_uri: the S3 URI of a JSON list/dict or a text "
                f"file with one label per line, got {request.get('label_map_uri')!r}"
            )
    elif labels != "imagenet":
        problems.append(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
    if request.get("resize_policy", "center_crop") not in RESIZE_POLICIES:
        problems.append(f"resize_policy must be one of {RESIZE_POLICIES}, got {request.get('resize_policy')!r}")
    return problems


def expected_classes(request: dict[str, Any]) -> int | None:
    """How many outputs the model will have, when that is known without loading it."""
    return IMAGENET_CLASSES if request.get("source") == "keras_application" else None


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def imagenet_class_index() -> list[tuple[str, str]]:
    """The 1000 ImageNet classes in the networks' output order: ``[(wnid, keras_name), ...]``."""
    from importlib import resources

    text = resources.files("sparktf").joinpath(IMAGENET_INDEX_FILE).read_text(encoding="utf-8")
    index = json.loads(text)
    return [tuple(index[str(i)]) for i in range(len(index))]


def imagenet_labels() -> list[str]:
    """Human-readable ImageNet labels (``coral reef``, ``scuba diver``, ...): Keras' names with
    spaces for underscores. Two names occur twice in ImageNet itself (``crane``: the bird and the
    machine; ``maillot``)."""
    return [name.replace("_", " ") for _wnid, name in imagenet_class_index()]


def parse_label_map(data: bytes) -> list[str]:
    """Labels from a label map file, in output order.

    Accepted: a JSON list of names; a JSON object whose keys are the indices ``"0"..."n-1"`` and
    whose values are names or Keras-style ``[id, name]`` pairs; or a text file with one label per
    line (trailing blank lines ignored).

    Raises:
        RegistrationRefused: for an empty, undecodable or inconsistent map.
    """
    if len(data) > LABEL_MAP_MAX_BYTES:
        raise RegistrationRefused(f"the label map is {len(data)} bytes, more than {LABEL_MAP_MAX_BYTES}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RegistrationRefused(f"the label map is not UTF-8 text: {err}") from None
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise RegistrationRefused(f"the label map looks like JSON but does not parse: {err}") from None
        labels = _labels_from_json(parsed)
    else:
        lines = [line.strip() for line in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        labels = lines
    if not labels:
        raise RegistrationRefused("the label map holds no labels")
    blank = [i for i, label in enumerate(labels) if not label]
    if blank:
        raise RegistrationRefused(f"the label map has empty labels at positions {blank[:10]}")
    return labels


def _labels_from_json(parsed: Any) -> list[str]:
    if isinstance(parsed, list):
        if not all(isinstance(v, str) for v in parsed):
            raise RegistrationRefused("a JSON label map list must hold strings only")
        return [v.strip() for v in parsed]
    if isinstance(parsed, dict):
        if set(parsed) != {str(i) for i in range(len(parsed))}:
            raise RegistrationRefused(f'a JSON label map object must have the output indices 0..{len(parsed) - 1} as keys ("0", "1", ...), once each')
        labels = []
        for i in range(len(parsed)):
            value = parsed[str(i)]
            if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
                value = value[1].replace("_", " ")  # Keras' [wnid, name], read as imagenet_labels() does
            if not isinstance(value, str):
                raise RegistrationRefused(f"label {i} of the JSON label map is not a name: {value!r}")
            labels.append(value.strip())
        return labels
    raise RegistrationRefused("a JSON label map must be a list or an object")


def check_labels(labels: list[str], num_classes: int) -> None:
    """Refuse a label list whose length is not the model's number of outputs."""
    if len(labels) != num_classes:
        raise RegistrationRefused(
            f"the label map has {len(labels)} labels but the model has {num_classes} outputs: every output needs exactly one label"
        )


# ---------------------------------------------------------------------------------------------
# Building a stock network from an uploaded weights file
# ---------------------------------------------------------------------------------------------


def application(name: str) -> Application:
    """The supported application called ``name``, or a refusal listing the supported ones."""
    if name not in APPLICATIONS:
        raise RegistrationRefused(f"application {name!r} is not supported; supported: {sorted(APPLICATIONS)}")
    return APPLICATIONS[name]


def weights_inventory(path: str) -> tuple[int, int]:
    """``(arrays, values)`` of the layers' weights stored in a Keras 3 ``.weights.h5`` file.

    Raises:
        RegistrationRefused: if the file is not such a weights file.
    """
    import h5py

    arrays = values = 0
    try:
        with h5py.File(path, "r") as handle:

            def visit(name: str, item) -> None:
                nonlocal arrays, values
                # The layers' variables only: a compiled model's file also holds its optimizer's.
                if isinstance(item, h5py.Dataset) and name.startswith("layers/") and "/vars/" in name:
                    arrays += 1
                    values += int(item.size)

            handle.visititems(visit)
    except OSError as err:
        raise RegistrationRefused(f"the weights file is not an HDF5 {WEIGHTS_SUFFIX} file: {err}") from None
    if arrays == 0:
        raise RegistrationRefused(f"the weights file holds no Keras 3 weights (save them with model.save_weights('name{WEIGHTS_SUFFIX}'))")
    return arrays, values


def build_application(name: str, weights_path: str):
    """The stock network ``name`` with the uploaded weights, taking uint8 pixels.

    The network is built exactly as ``keras.applications.<name>(weights=None)`` (so that the
    weights a user saved from ``<name>(weights="imagenet")`` fit it layer for layer), loaded, and
    wrapped: ``Input(uint8) -> preprocessing layer -> network``.

    Raises:
        RegistrationRefused: if the weights do not fit the architecture (another network, another
            number of classes, a file without the top layers, not a weights file).
    """
    import keras

    spec = application(name)
    base = getattr(keras.applications, spec.name)(weights=None)
    arrays, values = weights_inventory(weights_path)
    expected_arrays = len(base.weights)
    expected_values = sum(math.prod(v.shape) for v in base.weights)
    if (arrays, values) != (expected_arrays, expected_values):
        raise RegistrationRefused(
            f"the weights file does not fit {spec.name}: it holds {arrays} arrays ({values:,} values), "
            f"{spec.name} with its 1000-class top has {expected_arrays} ({expected_values:,}). Save them from "
            f"keras.applications.{spec.name}(weights='imagenet') (include_top=True) with save_weights"
        )
    try:
        base.load_weights(weights_path)
    except (ValueError, OSError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RegistrationRefused(f"the weights file does not fit {spec.name}: {first}") from None
    pixels = keras.Input(shape=spec.input_shape, dtype="uint8", name="pixels")
    if spec.preprocessing == "inception":
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="inception_preprocessing")(pixels)
    else:
        # The network rescales by itself; this layer only turns uint8 into float32.
        x = keras.layers.Rescaling(1.0, name="to_float")(pixels)
    outputs = base(x)
    return keras.Model(pixels, outputs, name=f"{spec.name.lower()}_uint8")


# ---------------------------------------------------------------------------------------------
# Checking a .keras file (a user's, or the one built above, as it will be served)
# ---------------------------------------------------------------------------------------------


def load_safely(path: str):
    """Load a ``.keras`` file as inference will: Keras safe mode, not compiled, no Lambda layer.

    Raises:
        RegistrationRefused: if it does not load in safe mode or holds a Lambda layer.
    """
    import keras

    if not str(path).endswith(KERAS_SUFFIX):
        raise RegistrationRefused(f"only {KERAS_SUFFIX} files are registered, got {path}")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # noqa: BLE001 - any failure to load safely is a refusal with its reason
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RegistrationRefused(
            f"the model cannot be loaded in Keras safe mode (custom code and Lambda layers are refused): {type(err).__name__}: {first}"
        ) from None
    lambdas = [layer.name for layer in _all_layers(model) if isinstance(layer, keras.layers.Lambda)]
    if lambdas:
        raise RegistrationRefused(
            f"the model holds Lambda layers {lambdas[:5]}: they carry Python code, which "
            f"is never run from a registered artifact; express them as built-in layers"
        )
    return model


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


def describe_model(model) -> tuple[tuple[int, int, int], int]:
    """``(input_shape, num_classes)`` of a servable image classifier.

    Raises:
        RegistrationRefused: unless it has one image input of fixed size with 1 or 3 channels
            and one output of fixed width.
    """
    inputs, outputs = list(model.inputs), list(model.outputs)
    if len(inputs) != 1 or len(outputs) != 1:
        raise RegistrationRefused(f"the model must have one input and one output, it has {len(inputs)} and {len(outputs)}")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in shape[1:]) or shape[3] not in (1, 3):
        raise RegistrationRefused(
            f"the model's input must be (batch, height, width, 1 or 3) with a fixed size, got {shape}: give keras.Input a shape such as (224, 224, 3)"
        )
    out = tuple(outputs[0].shape)
    if len(out) != 2 or out[1] is None or out[1] < 1:
        raise RegistrationRefused(f"the model's output must be (batch, classes), got {out}")
    return (int(shape[1]), int(shape[2]), int(shape[3])), int(out[1])


def probe(model, input_shape: tuple[int, int, int], num_classes: int):
    """Call the model as inference does (a uint8 batch, ``training=False``) and check the scores.

    Returns:
        The scores of the probe batch (a mid-grey and a gradient image).

    Raises:
        RegistrationRefused: if the call fails or gives the wrong shape or non-finite values.
    """
    import numpy as np

    height, width, channels = input_shape
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    batch = np.stack([np.full(input_shape, 128, dtype=np.uint8), np.broadcast_to(ramp, (height, width, channels)).astype(np.uint8)])
    try:
        scores = np.asarray(model(batch, training=False), dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - a model that cannot score uint8 pixels is refused
        raise RegistrationRefused(f"the model fails on a uint8 batch of shape {batch.shape}: {type(err).__name__}: {str(err)[:300]}") from None
    if scores.shape != (2, num_classes) or not np.isfinite(scores).all():
        raise RegistrationRefused(
            f"the model's scores on a uint8 probe batch are unusable (shape {scores.shape}, finite: {bool(np.isfinite(scores).all())})"
        )
    return scores


def version_metadata(
    *, input_shape: tuple[int, int, int], label_names: list[str], resize_policy: str, source: dict[str, Any], labels: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The registry metadata of an imported model (the registry adds name, version, URIs, sha256)."""
    import keras

    if resize_policy not in RESIZE_POLICIES:
        raise RegistrationRefused(f"resize_policy must be one of {RESIZE_POLICIES}, got {resize_policy!r}")
    return {
        "family": source["kind"],
        "input_shape": [int(v) for v in input_shape],
        "channels": int(input_shape[2]),
        "input_dtype": "uint8",
        "resize_policy": resize_policy,
        "num_classes": len(label_names),
        "label_names": list(label_names),
        "labels": labels,
        "source": source,
        "keras_version": keras.__version__,
        **extra,
    }
