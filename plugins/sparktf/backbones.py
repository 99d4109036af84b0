"""A registered model used as a frozen backbone for the user's own classes (transfer learning).

A backbone is any version in the registry (``name`` = its champion, or ``name@<version>``): a
stock network imported with ``register_model`` or a model this package trained. Its **feature
layer** is the input of its last ``Dense`` layer (the classifier), found through nested models
and a trailing ``Activation``; it must be one vector per image (``(batch, features)``), as after
a global pooling or a flatten and hidden layer. Its recorded input (``input_shape``,
``resize_policy``) is what ``prepare_data`` decodes to.

:func:`check_backbone` is what the tuning DAG runs before any Spark job; every refusal is a
:class:`BackboneRefused` whose message says what to do. :func:`compose` puts the backbone's
feature extractor and a trained head into one model taking uint8 pixels (what the export
registers).
"""

from __future__ import annotations

import re
from typing import Any

from sparktf import images, registry

BACKBONE_RE = re.compile(r"^(?P<name>[^@\s]+)(?:@(?P<version>[0-9]+))?$")
# The input dtypes a backbone may declare: the prepared pixels are uint8 0..255, which every one
# of these takes without loss (the models rescale inside).
PIXEL_DTYPES = ("uint8", "float32", "float16", "float64", "bfloat16")
REGISTER_HINT = "register one with the register_model DAG (source keras_application or keras_file), or leave backbone empty to train from scratch"


class BackboneRefused(ValueError):
    """A backbone that cannot be used; the message says why and what to do."""


def parse_backbone(text: str) -> tuple[str, int | None]:
    """``"name"`` -> ``(name, None)`` (its champion); ``"name@3"`` -> ``(name, 3)``.

    Raises:
        BackboneRefused: for any other form.
    """
    match = BACKBONE_RE.match(str(text).strip())
    if not match:
        raise BackboneRefused(f"{text!r} is not a model name or name@<version> (e.g. mobilenet-v2 or mobilenet-v2@3)")
    version = match.group("version")
    return match.group("name"), int(version) if version is not None else None


def resolve_backbone(models_uri: str, text: str, s3=None) -> dict[str, Any]:
    """The registry metadata of the backbone ``text`` names.

    Raises:
        BackboneRefused: the name is invalid, or the model or version does not exist.
    """
    name, version = parse_backbone(text)
    try:
        return registry.resolve(models_uri, name, version, s3)
    except ValueError as err:  # an invalid model name (registry.model_root)
        raise BackboneRefused(f"{text!r}: {err}") from None
    except registry.ModelNotFound as err:
        raise BackboneRefused(f"{err}; {REGISTER_HINT}") from None
    except registry.ModelIntegrityError as err:
        raise BackboneRefused(f"{err}; register the backbone again, or name another version") from None


def backbone_input(metadata: dict[str, Any]) -> dict[str, Any]:
    """``{height, width, channels, resize_policy}`` the backbone takes, from its metadata.

    Raises:
        BackboneRefused: the recorded input is not a fixed-size image of 1 or 3 channels of pixel
            values, or its resize policy is unknown (the data cannot give such an input).
    """
    label = f"model {metadata.get('name')!r} version {metadata.get('version')}"
    shape = metadata.get("input_shape") or []
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape) or shape[2] not in (1, 3):
        raise BackboneRefused(
            f"{label} takes input {shape}, not an image (height, width, 1 or 3 channels): "
            f"a backbone must take one fixed-size grayscale or RGB image; {REGISTER_HINT}"
        )
    dtype = metadata.get("input_dtype") or "uint8"
    if dtype not in PIXEL_DTYPES:
        raise BackboneRefused(f"{label} takes {dtype} input, not pixel values ({', '.join(PIXEL_DTYPES)}): register a model taking image pixels")
    policy = metadata.get("resize_policy") or images.DEFAULT_RESIZE_POLICY
    if policy not in images.RESIZE_POLICIES:
        raise BackboneRefused(f"{label} records resize_policy {policy!r}, none of {images.RESIZE_POLICIES}: register it again with one of them")
    return {"height": shape[0], "width": shape[1], "channels": shape[2], "resize_policy": policy}


def _producer(tensor) -> tuple[Any, Any]:
    """``(operation, its input tensor)`` of the operation that produced a Keras tensor in its graph."""
    operation, node_index, _ = tensor._keras_history
    inputs = operation._inbound_nodes[node_index].input_tensors
    return operation, (inputs[0] if len(inputs) == 1 else None)


def _is_pointwise_classifier(operation, source) -> bool:
    """A 1x1 ``Conv2D`` on a 1x1 map: a Dense classifier on pooled features in conv form."""
    import keras

    return (
        isinstance(operation, keras.layers.Conv2D)
        and source is not None
        and tuple(operation.kernel_size) == (1, 1)
        and tuple(source.shape[1:3]) == (1, 1)
        and source.shape[3] is not None
    )


def feature_output(model):
    """The feature tensor of ``model`` in its own graph: the input of its last ``Dense`` layer.

    Raises:
        BackboneRefused: no such layer, or it is not one vector per image.
    """
    import keras

    if len(model.outputs) != 1:
        raise BackboneRefused(f"model {model.name!r} has {len(model.outputs)} outputs: a backbone has one classifier output")
    operation, source = _producer(model.outputs[0])
    while isinstance(operation, (keras.layers.Activation, keras.layers.Softmax, keras.layers.Flatten)) and source is not None:
        operation, source = _producer(source)  # a softmax (and a flatten) after the classifier layer
    if isinstance(operation, keras.Model) and source is not None:
        features = feature_extractor(operation)(source)
    elif isinstance(operation, keras.layers.Dense) and source is not None:
        features = source
    elif _is_pointwise_classifier(operation, source):
        # MobileNetV3's top: a 1x1 convolution on the pooled (1, 1, C) map, then a flatten.
        features = keras.layers.Flatten(name=f"{operation.name}_features")(source)
    else:
        raise BackboneRefused(
            f"model {model.name!r} has no usable feature layer: its output comes from a {type(operation).__name__} layer, "
            f"not a Dense classifier on pooled features; register a network that ends in global pooling (or flatten) and a Dense layer"
        )
    if len(features.shape) != 2 or features.shape[1] is None:
        raise BackboneRefused(
            f"model {model.name!r} has no usable feature layer: its classifier takes {tuple(features.shape)}, "
            f"not one vector per image; register a network that pools (GlobalAveragePooling2D or Flatten) before its Dense layer"
        )
    return features


def feature_extractor(model):
    """A model from the backbone's input to its features (shares the backbone's layers and weights)."""
    import keras

    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # a single tensor: called with one array, no structure warning
    return keras.Model(inputs, feature_output(model), name=f"{model.name}_features")


def check_backbone(models_uri: str, text: str, s3=None) -> dict[str, Any]:
    """Resolve, load (sha256-checked, safe mode) and check a backbone; what the run will use.

    Returns:
        ``{name, version, model_uri, model_sha256, input_shape, resize_policy, feature_dim, fine_tunable_layers}``
        (the layers with weights between the pixels and the features, what ``fine_tune_layers`` may unfreeze).

    Raises:
        BackboneRefused: with what to do. Storage errors raise as they are (no verdict).
    """
    metadata = resolve_backbone(models_uri, text, s3)
    wanted = backbone_input(metadata)
    try:
        model = registry.load_version_model(metadata, s3)
    except registry.ModelIntegrityError as err:
        raise BackboneRefused(f"{err}: register the backbone again") from None
    from sparktf import finetune

    extractor = feature_extractor(model)
    return {
        **summary(metadata, wanted),
        "feature_dim": int(extractor.outputs[0].shape[1]),
        "fine_tunable_layers": len(finetune.weighted_layers(extractor)),
    }


def summary(metadata: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """What a run records about its backbone (results, exported metadata)."""
    return {
        "name": metadata["name"],
        "version": metadata["version"],
        "model_uri": metadata["model_uri"],
        "model_sha256": metadata["model_sha256"],
        "input_shape": [wanted["height"], wanted["width"], wanted["channels"]],
        "resize_policy": wanted["resize_policy"],
    }


def compose(backbone_model, head_model, name: str = "transfer"):
    """One model taking uint8 pixels: the backbone's feature extractor, then the trained head."""
    import keras

    shape = tuple(int(v) for v in backbone_model.inputs[0].shape[1:])
    pixels = keras.Input(shape=shape, dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1.0, name="to_float")(pixels)  # uint8 -> float32, values kept
    outputs = head_model(feature_extractor(backbone_model)(x))
    return keras.Model(pixels, outputs, name=name)


def apply_backbone_input(args, s3=None) -> dict[str, Any]:
    """Set ``prepare_data``'s decoding (``image_height``, ``image_width``, ``channels``,
    ``resize_policy``) to the backbone's recorded input; returns :func:`summary` of it.

    Raises:
        BackboneRefused: as :func:`resolve_backbone` and :func:`backbone_input` (the DAG refused
            it already; a job run by hand is refused here).
    """
    if not args.models_uri:
        raise BackboneRefused("--backbone needs --models-uri (the registry holding it)")
    metadata = resolve_backbone(args.models_uri, args.backbone, s3)
    wanted = backbone_input(metadata)
    args.image_height, args.image_width, args.channels, args.resize_policy = (
        wanted["height"],
        wanted["width"],
        wanted["channels"],
        wanted["resize_policy"],
    )
    return summary(metadata, wanted)


def export_transfer(models_uri: str, model_name: str, best: dict[str, Any], results: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """Register the best head of a backbone run as one ``.keras`` model, backbone + head, taking uint8 pixels.

    The backbone and the head are loaded as any registered artifact (sha256-checked, safe mode);
    the composed file is checked against the registry's allowlist and loaded in safe mode before
    it is written. A fine-tuned trial (``takes_pixels`` in its record: :mod:`sparktf.finetune`)
    saved the composed model itself, with its trained backbone layers: that model is registered.
    ``metadata`` (the export's, with the ImageFolder's ``label_names``) gains the backbone (name,
    version, sha256), its input, ``resize_policy`` and the ``fine_tuned_layers`` (empty: frozen).
    """
    import os
    import tempfile

    from sparktf import applications

    backbone, fine_tune = results["backbone"], best.get("fine_tune") or {}
    with tempfile.TemporaryDirectory() as tmp:
        trained = registry.load_verified_model(best["model_uri"], best["model_sha256"])
        if best.get("takes_pixels"):
            model = trained  # fine-tuned: backbone + head already, its top layers trained
        else:
            model = compose(registry.load_verified_model(backbone["model_uri"], backbone["model_sha256"]), trained, name="transfer")
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        registry.check_layer_classes(path, f"model {model_name!r} (backbone {backbone['name']} v{backbone['version']} + head)")
        applications.load_safely(path)  # as inference will load it
        saved = os.path.join(tmp, "saved_model")
        model.export(saved, format="tf_saved_model", verbose=False)
        full = {
            **metadata,
            "family": "transfer",
            "input_shape": list(backbone["input_shape"]),
            "channels": int(backbone["input_shape"][2]),
            "input_dtype": "uint8",
            "resize_policy": backbone["resize_policy"],
            "num_classes": len(metadata["label_names"]),
            "backbone": {k: backbone[k] for k in ("name", "version", "model_uri", "model_sha256")},
            "head": {"model_uri": best["model_uri"], "model_sha256": best["model_sha256"]},
            "fine_tuned_layers": fine_tune["layers"] if fine_tune.get("kept") == "fine_tuned" else [],
        }
        return registry.write_version(models_uri, model_name, model_path=path, metadata=full, saved_model_dir=saved)
