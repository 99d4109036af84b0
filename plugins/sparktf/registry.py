"""Model registry in object storage: the only code that writes a version, moves or reads the
champion, verifies an artifact and loads a model.

Layout under ``<models-uri>/<name>/``::

    versions/<n>/model.keras        the Keras artifact (its sha256 is in metadata.json)
    versions/<n>/saved_model/...     TensorFlow SavedModel export, for serving (files + sha256s
                                     listed in metadata.json)
    versions/<n>/metadata.json       written last: a version without it is incomplete
    champion.json                    {"version": n, ...}: one PUT, so readers see old or new

Models are loaded only after their recorded sha256 matches (streamed, never whole in memory),
only from ``.keras`` files, and with Keras safe mode on. The promotion rule lives here too.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from sparktf import storage

METADATA_NAME = "metadata.json"
CHAMPION_NAME = "champion.json"
PROMOTION_METRICS = {"test_accuracy": "max", "test_loss": "min"}
_VERSION_RE = re.compile(r"/versions/(\d+)/metadata\.json$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ModelNotFound(FileNotFoundError):
    """No such model, version or champion."""


class ModelIntegrityError(ValueError):
    """An artifact whose bytes do not match its recorded sha256, or metadata that is unusable."""


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def model_root(models_uri: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"model name must match {_NAME_RE.pattern}, got {name!r}")
    return storage.join_uri(models_uri, name)


def version_uri(models_uri: str, name: str, version: int) -> str:
    return storage.join_uri(model_root(models_uri, name), "versions", str(int(version)))


def champion_uri(models_uri: str, name: str) -> str:
    return storage.join_uri(model_root(models_uri, name), CHAMPION_NAME)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def list_versions(models_uri: str, name: str, s3=None) -> list[dict[str, Any]]:
    """Metadata of every complete version, oldest first."""
    prefix = storage.join_uri(model_root(models_uri, name), "versions") + "/"
    bucket = storage.parse_uri(prefix).bucket
    found = []
    for key in storage.list_keys(prefix, s3):
        if _VERSION_RE.search("/" + key):
            found.append(storage.read_json(storage.object_uri(bucket, key), s3))
    return sorted(found, key=lambda m: m["version"])


def next_version(models_uri: str, name: str, s3=None) -> int:
    """One more than the highest version number used so far (complete or not)."""
    prefix = storage.join_uri(model_root(models_uri, name), "versions") + "/"
    numbers = [int(m.group(1)) for key in storage.list_keys(prefix, s3)
               if (m := re.search(r"versions/(\d+)/", key))]
    return max(numbers, default=0) + 1


def read_champion(models_uri: str, name: str, s3=None) -> dict[str, Any] | None:
    return storage.read_json_if_exists(champion_uri(models_uri, name), s3)


def resolve(models_uri: str, name: str, version: int | str | None = None, s3=None) -> dict[str, Any]:
    """Metadata of a version: the champion when ``version`` is None/"champion", else that number.

    Raises:
        ModelNotFound: with a message that says what is missing and what to do.
        ModelIntegrityError: if the metadata lacks what a model needs to be served.
    """
    if version in (None, "", "champion"):
        pointer = read_champion(models_uri, name, s3)
        if pointer is None:
            raise ModelNotFound(f"model {name!r} has no champion at {champion_uri(models_uri, name)}: "
                                f"run the tuning DAG first, or name a version")
        version = pointer["version"]
    metadata_uri = storage.join_uri(version_uri(models_uri, name, int(version)), METADATA_NAME)
    metadata = storage.read_json_if_exists(metadata_uri, s3)
    if metadata is None:
        raise ModelNotFound(f"model {name!r} version {version} does not exist (no {metadata_uri})")
    missing = [k for k in ("version", "model_uri", "model_sha256", "input_shape", "label_names") if not metadata.get(k)]
    if missing:
        raise ModelIntegrityError(f"model {name!r} version {version} has unusable metadata (missing {missing})")
    return metadata


# ---------------------------------------------------------------------------------------------
# Verifying and loading
# ---------------------------------------------------------------------------------------------


def verify_artifact(uri: str, expected_sha256: str, s3=None) -> None:
    """Check an artifact's sha256 by streaming it (never whole in memory).

    Raises:
        ModelNotFound: if the artifact does not exist.
        ModelIntegrityError: if its bytes do not match ``expected_sha256``.
    """
    try:
        actual = storage.stream_sha256(uri, s3)
    except storage.ObjectNotFound:
        raise ModelNotFound(f"{uri} does not exist") from None
    _check_sha(uri, actual, expected_sha256)


def _check_sha(uri: str, actual: str, expected: str) -> None:
    if not expected or actual != expected:
        raise ModelIntegrityError(f"{uri}: sha256 {actual} does not match the recorded {expected or '(none)'}")


def load_verified_model(model_uri: str, expected_sha256: str, s3=None, *, keep_at: str | None = None):
    """Download a ``.keras`` artifact (streamed to a local file), check its sha256, and load it in
    Keras safe mode.

    Args:
        keep_at: a local path to download to and leave in place (for re-uploading it); by
            default a temporary file, removed after loading.

    Raises:
        ModelNotFound: if the artifact does not exist.
        ModelIntegrityError: if the file is not ``.keras`` or its bytes do not match.
    """
    if not model_uri.endswith(".keras"):
        raise ModelIntegrityError(f"{model_uri}: only .keras artifacts are loaded")
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        path = keep_at or os.path.join(tmp, "model.keras")
        try:
            actual = storage.download_file(model_uri, path, s3)
        except storage.ObjectNotFound:
            raise ModelNotFound(f"{model_uri} does not exist") from None
        _check_sha(model_uri, actual, expected_sha256)
        return keras.saving.load_model(path, safe_mode=True, compile=False)


def load_version_model(metadata: dict[str, Any], s3=None):
    """The Keras model of a resolved version (sha256-checked, safe mode)."""
    return load_verified_model(metadata["model_uri"], metadata["model_sha256"], s3)


# ---------------------------------------------------------------------------------------------
# Writing a version and moving the champion
# ---------------------------------------------------------------------------------------------


def write_version(models_uri: str, name: str, *, model_path: str, metadata: dict[str, Any],
                  saved_model_dir: str | None = None, version: int | None = None, s3=None) -> dict[str, Any]:
    """Register a local ``.keras`` file (and optionally a SavedModel folder) as a new version.

    The artifacts are written first and ``metadata.json`` last (a version without it is
    incomplete). ``metadata`` is completed with the name, number, URIs and sha256s.

    Returns:
        The version's full metadata.
    """
    version = version or next_version(models_uri, name, s3)
    base = version_uri(models_uri, name, version)
    storage.delete_prefix(base + "/", s3)  # a half-written attempt of this number is replaced
    with open(model_path, "rb") as fh:
        blob = fh.read()
    model_uri = storage.join_uri(base, "model.keras")
    storage.write_bytes(model_uri, blob, s3)
    full = {**metadata, "name": name, "version": int(version), "uri": base + "/",
            "model_uri": model_uri, "model_sha256": storage.sha256_hex(blob)}
    if saved_model_dir is not None:
        saved_uri = storage.join_uri(base, "saved_model") + "/"
        full["saved_model_uri"] = saved_uri
        full["saved_model_files"] = storage.upload_dir(saved_model_dir, saved_uri, s3)
    storage.write_json(storage.join_uri(base, METADATA_NAME), full, s3)
    return full


def champion_pointer(metadata: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``champion.json`` document naming a version."""
    return {"name": metadata["name"], "version": metadata["version"], "model_uri": metadata["model_uri"],
            "model_sha256": metadata["model_sha256"], "metrics": metadata.get("metrics"),
            "manifest_sha256": metadata.get("manifest_sha256"), **extra}


def set_champion(models_uri: str, name: str, pointer: dict[str, Any], s3=None) -> None:
    """Move the champion pointer (a single PUT: atomic for readers)."""
    storage.write_json(champion_uri(models_uri, name), pointer, s3)


def is_better(new: float, old: float, metric: str, min_improvement: float) -> bool:
    """The promotion rule: strictly better than the champion by more than ``min_improvement``."""
    if PROMOTION_METRICS[metric] == "max":
        return new > old + min_improvement
    return new < old - min_improvement
