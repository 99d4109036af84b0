"""Model registry in object storage: numbered versions and an atomically moved champion pointer.

Layout under ``<models-uri>/<name>/``::

    versions/<n>/model.keras        the Keras artifact (its sha256 is in metadata.json)
    versions/<n>/saved_model/...     TensorFlow SavedModel export, for serving
    versions/<n>/metadata.json       written last: a version without it is incomplete
    champion.json                    {"version": n, ...}: one PUT, so readers see old or new

Models are loaded only after their recorded sha256 matches, and with Keras safe mode on.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from sparktf import storage

_VERSION_RE = re.compile(r"/versions/(\d+)/metadata\.json$")


class ModelNotFound(FileNotFoundError):
    """No such model, version or champion."""


class ModelIntegrityError(ValueError):
    """An artifact whose bytes do not match its recorded sha256."""


def model_root(models_uri: str, name: str) -> str:
    return storage.join_uri(models_uri, name)


def version_uri(models_uri: str, name: str, version: int) -> str:
    return storage.join_uri(model_root(models_uri, name), "versions", str(version))


def champion_uri(models_uri: str, name: str) -> str:
    return storage.join_uri(model_root(models_uri, name), "champion.json")


def list_versions(models_uri: str, name: str, client=None) -> list[dict[str, Any]]:
    """Metadata of every complete version, oldest first."""
    prefix = storage.join_uri(model_root(models_uri, name), "versions") + "/"
    bucket = storage.parse_uri(prefix).bucket
    found = []
    for key in storage.list_keys(prefix, client):
        match = _VERSION_RE.search("/" + key)
        if match:
            found.append(storage.read_json(f"s3://{bucket}/{key}", client))
    return sorted(found, key=lambda m: m["version"])


def next_version(models_uri: str, name: str, client=None) -> int:
    """One more than the highest version number used so far (complete or not)."""
    prefix = storage.join_uri(model_root(models_uri, name), "versions") + "/"
    numbers = [int(m.group(1)) for key in storage.list_keys(prefix, client)
               if (m := re.search(r"versions/(\d+)/", key))]
    return max(numbers, default=0) + 1


def read_champion(models_uri: str, name: str, client=None) -> dict[str, Any] | None:
    return storage.read_json_if_exists(champion_uri(models_uri, name), client)


def set_champion(models_uri: str, name: str, pointer: dict[str, Any], client=None) -> None:
    """Move the champion pointer (a single PUT: atomic for readers)."""
    storage.write_json(champion_uri(models_uri, name), pointer, client)


def resolve(models_uri: str, name: str, version: int | str | None = None, client=None) -> dict[str, Any]:
    """Metadata of a version: the champion when ``version`` is None/"champion", else that number.

    Raises:
        ModelNotFound: with a message that says what is missing.
    """
    if version in (None, "", "champion"):
        pointer = read_champion(models_uri, name, client)
        if pointer is None:
            raise ModelNotFound(f"model {name!r} has no champion at {champion_uri(models_uri, name)}: "
                                f"run the tuning DAG first, or name a version")
        version = pointer["version"]
    metadata_uri = storage.join_uri(version_uri(models_uri, name, int(version)), "metadata.json")
    metadata = storage.read_json_if_exists(metadata_uri, client)
    if metadata is None:
        raise ModelNotFound(f"model {name!r} version {version} does not exist (no {metadata_uri})")
    return metadata


def load_verified_model(model_uri: str, expected_sha256: str, client=None):
    """Download a ``.keras`` artifact, check its sha256, and load it in Keras safe mode.

    Raises:
        ModelIntegrityError: if the bytes do not match ``expected_sha256``.
    """
    import keras

    blob = storage.read_bytes(model_uri, client)
    actual = storage.sha256_hex(blob)
    if not expected_sha256 or actual != expected_sha256:
        raise ModelIntegrityError(f"{model_uri}: sha256 {actual} does not match the recorded {expected_sha256}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as fh:
            fh.write(blob)
        return keras.saving.load_model(path, safe_mode=True, compile=False)
