"""Model registry in object storage: the only code that writes a version, moves or reads the
champion, verifies an artifact and loads a model.

Layout under ``<models-uri>/<name>/``::

    versions/<n>/_claim.json         written first and create-only (If-None-Match: *): whoever
                                     creates it owns number n, and nobody else writes under it
    versions/<n>/artifacts/<claim id>/model.keras
                                     the Keras artifact (its URI and sha256 are in metadata.json)
    versions/<n>/artifacts/<claim id>/saved_model/...
                                     TensorFlow SavedModel export, for serving (every file and its
                                     sha256 listed in metadata.json: see verify_saved_model)
    versions/<n>/metadata.json       written last, create-only: a version without it is incomplete
    champion.json                    {"version": n, ...}: moved by compare-and-swap (If-Match on
                                     the ETag read), one PUT, so readers see old or new

**Concurrent exports.** Two exports at once (a manual run next to the weekly one, a backfill)
never share a number: each claims ``n`` with a conditional create and takes ``n + 1`` when it
loses; a claimed version is never deleted or overwritten by another export. Only a later attempt
of the *same* export (same ``source_run`` and ``trial_id``) continues a claimed version that has
no metadata (the earlier attempt crashed), so exporting a run again keeps its number. Each claim
writes its artifacts under its own ``artifacts/<claim id>/``: an earlier attempt that was only
slow (a zombie) and goes on writing after the retry published cannot change the published files.

**The champion** moves only through :func:`promote`: read the pointer and its ETag, compare,
write only if the pointer is still the one read; when another export moved it in between, read
the new champion and compare again. :func:`make_champion` (a person's move, no comparison) goes
through the same loop; each round's decision is the pure :func:`decide_promotion`.

Models are loaded only after their recorded sha256 matches (streamed, never whole in memory),
only from ``.keras`` files, and with Keras safe mode on.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sparktf
from sparktf import storage

log = logging.getLogger("sparktf.registry")

METADATA_NAME = "metadata.json"
CLAIM_NAME = "_claim.json"
CHAMPION_NAME = "champion.json"
PROMOTION_METRICS = {"test_accuracy": "max", "test_loss": "min"}
MAX_CLAIM_ATTEMPTS = 100  # numbers tried before an export gives up claiming one
MAX_PROMOTION_ATTEMPTS = 5  # compare-and-swap rounds before an export gives up moving the champion
_VERSION_RE = re.compile(r"/versions/(\d+)/metadata\.json$")
_VERSION_FILE_RE = re.compile(r"(\d+)/(.+)$")
_NAME_RE = re.compile(sparktf.MODEL_NAME_PATTERN)
# What a version was made from: two attempts that agree on these made the same version (a retry
# adopts what an earlier attempt published; register_model reuses a run's version only for them).
REQUEST_KEYS = ("source_run", "trial_id", "source", "labels", "resize_policy")
# What a version was trained for and tested on; recorded in its metadata and in the champion
# pointer, and compared before two versions' scores are (:func:`comparable`).
LINEAGE_KEYS = ("label_names", "input_shape", "test_split_sha256", "manifest_sha256")

# Test-only: name -> callable(**info), called where two exports can interleave ("version_chosen":
# a number picked, not claimed yet; "claimed": claimed, no artifact written yet;
# "before_metadata": artifacts written, metadata not yet; "claim_checked": the claim is still
# this export's, its metadata.json not written yet;
# "champion_read": champion.json read, not yet replaced). Tests put a barrier there to make a
# race deterministic. Empty in production.
TEST_HOOKS: dict[str, Callable[..., None]] = {}


class ModelNotFound(FileNotFoundError):
    """No such model, version or champion."""


class ModelIntegrityError(ValueError):
    """An artifact whose bytes do not match its recorded sha256, or metadata that is unusable."""


class VersionConflict(RuntimeError):
    """A version number this export cannot own: claimed by another export, or taken over."""


def _hook(point: str, **info: Any) -> None:
    hook = TEST_HOOKS.get(point)
    if hook is not None:
        hook(**info)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def model_root(models_uri: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"model name must match {_NAME_RE.pattern}, got {name!r}")
    return storage.join_uri(models_uri, name)


def version_uri(models_uri: str, name: str, version: int) -> str:
    return storage.join_uri(model_root(models_uri, name), "versions", str(int(version)))


def claim_uri(models_uri: str, name: str, version: int) -> str:
    return storage.join_uri(version_uri(models_uri, name, version), CLAIM_NAME)


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


def _version_files(models_uri: str, name: str, s3=None) -> dict[int, set[str]]:
    """Version number -> the names of its files (relative to ``versions/<n>/``), complete or not."""
    prefix = storage.join_uri(model_root(models_uri, name), "versions") + "/"
    prefix_key = storage.parse_uri(prefix).key
    files: dict[int, set[str]] = {}
    for key in storage.list_keys(prefix, s3):
        if match := _VERSION_FILE_RE.match(key[len(prefix_key) :]):
            files.setdefault(int(match.group(1)), set()).add(match.group(2))
    return files


def find_run_version(models_uri: str, name: str, source_run: str, trial_id: str, s3=None) -> dict[str, Any] | None:
    """The newest complete version exported from this run's trial, or None."""
    matches = [m for m in list_versions(models_uri, name, s3) if m.get("source_run") == source_run and m.get("trial_id") == trial_id]
    return matches[-1] if matches else None


def read_champion(models_uri: str, name: str, s3=None) -> dict[str, Any] | None:
    return storage.read_json_if_exists(champion_uri(models_uri, name), s3)


def read_champion_with_etag(models_uri: str, name: str, s3=None) -> tuple[dict[str, Any] | None, str | None]:
    """``(champion pointer, its ETag)``, or ``(None, None)`` when there is no champion."""
    return storage.read_json_with_etag(champion_uri(models_uri, name), s3)


def resolve(models_uri: str, name: str, version: int | str | None = None, s3=None) -> dict[str, Any]:
    """Metadata of a version: the champion when ``version`` is None/"champion", else that number.

    Raises:
        ModelNotFound: with a message that says what is missing and what to do.
        ModelIntegrityError: if the metadata lacks what a model needs to be served, or the
            champion pointer names another artifact than the version's metadata does.
    """
    pointer = None
    if version in (None, "", "champion"):
        pointer = read_champion(models_uri, name, s3)
        if pointer is None:
            raise ModelNotFound(f"model {name!r} has no champion at {champion_uri(models_uri, name)}: run the tuning DAG first, or name a version")
        version = pointer["version"]
    metadata_uri = storage.join_uri(version_uri(models_uri, name, int(version)), METADATA_NAME)
    metadata = storage.read_json_if_exists(metadata_uri, s3)
    if metadata is None:
        raise ModelNotFound(f"model {name!r} version {version} does not exist (no {metadata_uri})")
    missing = [k for k in ("version", "model_uri", "model_sha256", "input_shape", "label_names") if not metadata.get(k)]
    if missing:
        raise ModelIntegrityError(f"model {name!r} version {version} has unusable metadata (missing {missing})")
    if pointer is not None and (
        pointer.get("model_sha256") != metadata["model_sha256"] or pointer.get("model_uri", metadata["model_uri"]) != metadata["model_uri"]
    ):
        raise ModelIntegrityError(
            f"model {name!r}: {champion_uri(models_uri, name)} names version {version} with sha256 "
            f"{pointer.get('model_sha256') or '(none)'}, but {metadata_uri} records "
            f"{metadata['model_sha256']} for {metadata['model_uri']}: the pointer and the version "
            f"disagree (edited by hand?); pin a version, or let the tuning DAG move the champion again"
        )
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


def verify_saved_model(metadata: dict[str, Any], s3=None) -> int:
    """Check a version's SavedModel before it is served: every file its metadata lists is there
    with its recorded sha256 (streamed), and no file is there that the metadata does not list.

    Returns:
        The number of files checked.

    Raises:
        ModelIntegrityError: naming the first file that is missing, changed or not listed, or if
            the metadata lists no SavedModel.
    """
    prefix, files = metadata.get("saved_model_uri"), metadata.get("saved_model_files")
    label = f"model {metadata.get('name')!r} version {metadata.get('version')}"
    if not prefix or not files:
        raise ModelIntegrityError(f"{label} has no SavedModel file list in its metadata: export it again")
    listed = {f["path"]: f for f in files}
    prefix = storage.prefix_uri(prefix)
    prefix_key = storage.parse_uri(prefix).key
    stored = {key[len(prefix_key) :] for key in storage.list_keys(prefix, s3)}
    unlisted = sorted(stored - set(listed))
    if unlisted:
        raise ModelIntegrityError(f"{label}: {prefix} holds files its metadata does not list: {unlisted[:5]}")
    for path, entry in sorted(listed.items()):
        uri = storage.join_uri(prefix, path)
        if path not in stored:
            raise ModelIntegrityError(f"{label}: {uri} is listed in the metadata but missing")
        _check_sha(uri, storage.stream_sha256(uri, s3), entry.get("sha256", ""))
    return len(listed)


# The object classes a loaded .keras file may name: what our families (sparktf.models) and the stock
# networks (sparktf.applications) save, found by scanning their config.json. Nothing else is loaded.
_KERAS_LAYERS = frozenset(
    (
        "Activation",
        "Add",
        "AveragePooling2D",
        "BatchNormalization",
        "Concatenate",
        "Conv2D",
        "Dense",
        "DepthwiseConv2D",
        "Dropout",
        "Flatten",
        "GlobalAveragePooling2D",
        "InputLayer",
        "MaxPooling2D",
        "Multiply",
        "Normalization",
        "RandomRotation",
        "RandomTranslation",
        "ReLU",
        "Rescaling",
        "Reshape",
        "Resizing",
        "SeparableConv2D",
        "ZeroPadding2D",
    )
)
ALLOWED_CLASSES = frozenset(
    {("keras.layers", name) for name in _KERAS_LAYERS}
    | {("keras.initializers", name) for name in ("Constant", "GlorotUniform", "Ones", "VarianceScaling", "Zeros")}
    | {("keras.regularizers", "L2")}  # a backbone head's weight penalty (sparktf.models.build_head)
    | {
        ("keras.optimizers", "Adam"),
        ("keras.optimizers", "SGD"),
        ("keras", "DTypePolicy"),
        ("keras.src.models.functional", "Functional"),
        ("keras.src.ops.numpy", "Add"),
        ("keras.src.ops.numpy", "Multiply"),
        ("keras.src.applications.inception_resnet_v2", "CustomScaleLayer"),
        (None, "__keras_tensor__"),
    }
)
MAX_CONFIG_BYTES = 64 * 1024 * 1024


def _classes_in(node: Any):
    if isinstance(node, dict):
        if "class_name" in node:
            yield node.get("module"), node.get("class_name"), node.get("registered_name")
        for value in node.values():
            yield from _classes_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from _classes_in(value)


def check_layer_classes(path: str, label: str) -> None:
    """Refuse a ``.keras`` file whose ``config.json`` names a class outside :data:`ALLOWED_CLASSES`
    (read before Keras deserialises anything: safe mode is not trusted to refuse all code).

    Raises:
        ModelIntegrityError: naming the first class refused, or if the archive is unreadable.
    """
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            if archive.getinfo("config.json").file_size > MAX_CONFIG_BYTES:
                raise ModelIntegrityError(f"{label}: config.json is larger than {MAX_CONFIG_BYTES} bytes")
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise ModelIntegrityError(f"{label}: not a readable .keras archive ({err})") from None
    for module, class_name, registered in _classes_in(config):
        if (module, class_name) not in ALLOWED_CLASSES or registered not in (None, class_name):
            raise ModelIntegrityError(
                f"{label}: refused to load class {module}.{class_name} "
                f"(registered as {registered!r}): not on the registry's allowlist of layer classes"
            )


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
        check_layer_classes(path, model_uri)
        return keras.saving.load_model(path, safe_mode=True, compile=False)


def load_version_model(metadata: dict[str, Any], s3=None):
    """The Keras model of a resolved version (sha256-checked, safe mode)."""
    return load_verified_model(metadata["model_uri"], metadata["model_sha256"], s3)


# ---------------------------------------------------------------------------------------------
# Claiming and writing a version
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionClaim:
    """A version number this export owns (its ``_claim.json`` names ``claimant``)."""

    version: int
    claimant: str
    took_over_from: str | None = None

    @property
    def claim_id(self) -> str:
        """The claimant's random part: the folder its artifacts go to."""
        return self.claimant.rsplit(":", 1)[-1]


def claim_version(
    models_uri: str, name: str, *, source_run: str | None = None, trial_id: str | None = None, version: int | None = None, s3=None
) -> VersionClaim:
    """Own a version number by creating its ``_claim.json`` only if absent (``If-None-Match: *``).

    Without ``version``: a claim of the same ``source_run`` and ``trial_id`` whose version has no
    metadata (an earlier attempt of this export that died) is taken over (compare-and-swap on
    that claim); otherwise the next number is claimed, and ``n + 1`` when another export
    claimed ``n`` first. Nothing is deleted or overwritten.

    Raises:
        VersionConflict: ``version`` was given and is taken, or no number could be claimed.
    """
    claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    document = {"claimant": claimant, "source_run": source_run, "trial_id": trial_id, "claimed_at": _now()}
    if version is not None:
        number = int(version)
        if storage.has_objects(version_uri(models_uri, name, number) + "/", s3):
            raise VersionConflict(f"model {name!r} version {number} already exists or is being written")
        try:
            storage.write_json(claim_uri(models_uri, name, number), document, s3, if_none_match=True)
        except storage.PreconditionFailed:
            raise VersionConflict(f"model {name!r} version {number} was claimed by another export") from None
        return VersionClaim(number, claimant)

    files = _version_files(models_uri, name, s3)
    if source_run:
        for number, names in sorted(files.items()):
            if CLAIM_NAME not in names or METADATA_NAME in names:
                continue
            uri = claim_uri(models_uri, name, number)
            claim, etag = storage.read_json_with_etag(uri, s3)
            if not claim or (claim.get("source_run"), claim.get("trial_id")) != (source_run, trial_id) or not etag:
                continue
            try:
                storage.write_json(uri, {**document, "took_over_from": claim.get("claimant")}, s3, if_match=etag)
            except storage.PreconditionFailed:
                continue  # another attempt of this export took it over first
            log.warning("model %s v%d: continuing the unfinished export of run %s (claim of %s)", name, number, source_run, claim.get("claimant"))
            return VersionClaim(number, claimant, claim.get("claimant"))

    number = max(files, default=0) + 1
    for _ in range(MAX_CLAIM_ATTEMPTS):
        _hook("version_chosen", version=number, claimant=claimant)
        try:
            storage.write_json(claim_uri(models_uri, name, number), document, s3, if_none_match=True)
            return VersionClaim(number, claimant)
        except storage.PreconditionFailed:
            log.info("model %s v%d was claimed by another export first: trying v%d", name, number, number + 1)
            number += 1
    raise VersionConflict(f"model {name!r}: no free version number after {MAX_CLAIM_ATTEMPTS} tries")


def write_version(
    models_uri: str, name: str, *, model_path: str, metadata: dict[str, Any], saved_model_dir: str | None = None, version: int | None = None, s3=None
) -> dict[str, Any]:
    """Register a local ``.keras`` file (and optionally a SavedModel folder) as a new version.

    Claims a number first (:func:`claim_version`, using ``metadata``'s ``source_run`` and
    ``trial_id``), writes the artifacts under it, and ``metadata.json`` last and only if absent.
    ``metadata`` is completed with the name, number, URIs, sha256s and the SavedModel's file
    list.

    Returns:
        The version's full metadata.

    Raises:
        VersionConflict: the claim was taken over while the artifacts were written (this export
            is a zombie of one that was retried), ``version`` is taken, or another request
            completed the version first (an earlier attempt of the same request is adopted).
    """
    claim = claim_version(models_uri, name, source_run=metadata.get("source_run"), trial_id=metadata.get("trial_id"), version=version, s3=s3)
    _hook("claimed", version=claim.version, claimant=claim.claimant)
    base = version_uri(models_uri, name, claim.version)
    artifacts = storage.join_uri(base, "artifacts", claim.claim_id)
    with open(model_path, "rb") as fh:
        blob = fh.read()
    model_uri = storage.join_uri(artifacts, "model.keras")
    storage.write_bytes(model_uri, blob, s3)
    full = {
        **metadata,
        "name": name,
        "version": claim.version,
        "uri": base + "/",
        "model_uri": model_uri,
        "model_sha256": storage.sha256_hex(blob),
        "claimant": claim.claimant,
    }
    if saved_model_dir is not None:
        saved_uri = storage.join_uri(artifacts, "saved_model") + "/"
        full["saved_model_uri"] = saved_uri
        full["saved_model_files"] = storage.upload_dir(saved_model_dir, saved_uri, s3)
    _hook("before_metadata", version=claim.version, claimant=claim.claimant)
    return _publish(models_uri, name, claim, full, s3)


def same_request(published: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether a published version was made for the same request as ``mine`` (:data:`REQUEST_KEYS`)."""
    return all(published.get(key) == mine.get(key) for key in REQUEST_KEYS)


def _publish(models_uri: str, name: str, claim: VersionClaim, full: dict[str, Any], s3=None) -> dict[str, Any]:
    """Write ``metadata.json`` last and create-only, if the claim is still this export's.

    When another attempt of the same request published the version first (a zombie that read its
    claim just before this retry took it over), its complete version is adopted once its
    artifacts check out, instead of failing the retry.
    """
    current = storage.read_json_if_exists(claim_uri(models_uri, name, claim.version), s3) or {}
    if current.get("claimant") != claim.claimant:
        raise VersionConflict(
            f"model {name!r} version {claim.version} was taken over by {current.get('claimant')} while {claim.claimant} wrote it; not publishing"
        )
    _hook("claim_checked", version=claim.version, claimant=claim.claimant)
    metadata_uri = storage.join_uri(version_uri(models_uri, name, claim.version), METADATA_NAME)
    try:
        storage.write_json(metadata_uri, full, s3, if_none_match=True)
        return full
    except storage.PreconditionFailed:
        published = storage.read_json(metadata_uri, s3)
    if not same_request(published, full):
        raise VersionConflict(
            f"model {name!r} version {claim.version} was completed by another export ({published.get('claimant')}) while {claim.claimant} wrote it"
        )
    verify_artifact(published["model_uri"], published["model_sha256"], s3)
    if published.get("saved_model_files"):
        verify_saved_model(published, s3)
    log.warning(
        "model %s v%d: an earlier attempt of this export (%s) published it first; adopting it", name, claim.version, published.get("claimant")
    )
    return published


# ---------------------------------------------------------------------------------------------
# Moving the champion
# ---------------------------------------------------------------------------------------------


def champion_pointer(metadata: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``champion.json`` document naming a version, with its lineage (:data:`LINEAGE_KEYS`)."""
    return {
        "name": metadata["name"],
        "version": metadata["version"],
        "model_uri": metadata["model_uri"],
        "model_sha256": metadata["model_sha256"],
        "metrics": metadata.get("metrics"),
        **{key: metadata.get(key) for key in LINEAGE_KEYS},
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Like for like: what a champion can be compared with
# ---------------------------------------------------------------------------------------------


def _labels_text(labels: list[str] | None) -> str:
    if not labels:
        return "(not recorded)"
    shown = ", ".join(repr(str(label)[:24]) for label in labels[:5])
    return f"[{shown}{', …' if len(labels) > 5 else ''}] ({len(labels)} labels)"


def champion_lineage(models_uri: str, name: str, pointer: dict[str, Any], s3=None) -> dict[str, Any]:
    """The champion's lineage: its pointer's, completed from its version's metadata when the
    pointer was written before the lineage was recorded in it."""
    if all(pointer.get(key) for key in ("label_names", "input_shape")):
        return pointer
    try:
        metadata = resolve(models_uri, name, int(pointer["version"]), s3)
    except (ModelNotFound, ModelIntegrityError) as err:
        log.warning("model %s: champion v%s has no readable metadata (%s)", name, pointer.get("version"), err)
        return pointer
    return {**{key: metadata.get(key) for key in LINEAGE_KEYS}, **{k: v for k, v in pointer.items() if v is not None}}


def comparable(new: dict[str, Any], champion: dict[str, Any]) -> tuple[bool, str]:
    """Whether the champion's recorded test score can be compared with the new version's (pure).

    Only like with like: the same label names in the same order, the same input shape, and the
    same test split (its content hash, or for versions exported before it was recorded, the whole
    prepared data set's). A champion is never re-scored on another test split: nothing proves that
    split holds no image the champion was trained on.

    Args:
        new, champion: version metadata or champion pointers (their :data:`LINEAGE_KEYS`).

    Returns:
        ``(True, how the scores compare)`` or ``(False, why not, in plain words)``.
    """
    who = f"the champion v{champion.get('version')}"
    if list(champion.get("label_names") or []) != list(new.get("label_names") or []):
        return False, (
            f"{who} was trained on labels {_labels_text(champion.get('label_names'))}, this model on {_labels_text(new.get('label_names'))}"
        )
    if list(champion.get("input_shape") or []) != list(new.get("input_shape") or []):
        return False, f"{who} takes inputs of shape {champion.get('input_shape')}, this model {new.get('input_shape')}"
    if new.get("test_split_sha256") and champion.get("test_split_sha256") == new["test_split_sha256"]:
        return True, "recorded on the same test split"
    if new.get("manifest_sha256") and champion.get("manifest_sha256") == new["manifest_sha256"]:
        return True, "recorded on the same test set"
    if champion.get("test_split_sha256"):
        why = f"{who} was tested on another test split"
    else:
        why = f"{who} records no test-split identity (exported before it was recorded) and was prepared from other data"
    return False, f"{why}: scoring it on this run's test split could count images it was trained on"


def set_champion(models_uri: str, name: str, pointer: dict[str, Any], s3=None, *, if_match: str | None = None, if_none_match: bool = False) -> str:
    """Write the champion pointer (one PUT: atomic for readers); returns its ETag.

    Unconditional by default (an operator's manual move); :func:`promote` passes the ETag it read
    (``if_match``), or ``if_none_match`` when there was no champion.

    Raises:
        storage.PreconditionFailed: the pointer changed since it was read.
    """
    return storage.write_json(champion_uri(models_uri, name), pointer, s3, if_match=if_match, if_none_match=if_none_match)


def _champion_for_swap(models_uri: str, name: str, s3=None) -> tuple[dict[str, Any] | None, str | None]:
    """The champion pointer and the ETag a compare-and-swap needs; refuses a pointer without one
    (an unconditional write would then silently replace whatever is there)."""
    pointer, etag = read_champion_with_etag(models_uri, name, s3)
    if pointer is not None and not etag:
        raise storage.StorageError(f"{champion_uri(models_uri, name)} came back without an ETag: the store cannot move the champion safely")
    return pointer, etag


def is_better(new: float, old: float, metric: str, min_improvement: float) -> bool:
    """The promotion rule: strictly better than the champion by more than ``min_improvement``."""
    if PROMOTION_METRICS[metric] == "max":
        return new > old + min_improvement
    return new < old - min_improvement


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` decided, and why (the export job's XCom carries it)."""

    promoted: bool
    reason: str
    champion_version: int | None  # the champion once decided (None: there is none)
    champion_score: float | None  # the score compared with (None: there was no champion)
    attempts: int  # compare-and-swap rounds (more than 1: another export moved the champion meanwhile)


@dataclass(frozen=True)
class PromotionRule:
    """How a compare-and-swap round decides.

    Attributes:
        metric, min_improvement: compare the new version's ``metrics[metric]`` with the champion's
            score (:func:`is_better`).
        replace: a reason to make the version the champion without comparing (a person asked for
            it); None compares.
    """

    metric: str = "test_accuracy"
    min_improvement: float = 0.0
    replace: str | None = None


@dataclass(frozen=True)
class Verdict:
    """One round's decision on the pointer just read: write the new one or not, and why."""

    replace: bool
    reason: str
    champion_score: float | None = None


def needs_champion_score(version: int, champion: dict[str, Any] | None, rule: PromotionRule) -> bool:
    """Whether :func:`decide_promotion` needs the champion's score for this pointer."""
    return rule.replace is None and champion is not None and int(champion["version"]) != int(version)


def decide_promotion(
    version: int,
    champion: dict[str, Any] | None,
    rule: PromotionRule,
    *,
    new_score: float | None = None,
    scored: tuple[float | None, str] | None = None,
) -> Verdict:
    """The pure decision of one compare-and-swap round.

    Args:
        version: the version to promote.
        champion: the champion pointer read (None: there is none).
        rule: compare, or replace without comparing.
        new_score: the version's ``metrics[rule.metric]`` (when comparing).
        scored: ``(the champion's score, how it was obtained)``, or ``(None, why it cannot be
            compared)``; needed when :func:`needs_champion_score` says so.
    """
    if champion is not None and int(champion["version"]) == int(version):
        return Verdict(False, "already the champion", new_score if rule.replace is None else None)
    if rule.replace is not None:
        return Verdict(True, rule.replace)
    if champion is None:
        return Verdict(True, "no champion yet")
    if scored is None:
        raise ValueError("comparing with a champion needs its score")
    score, how = scored
    if score is None:
        return Verdict(False, f"not compared with champion v{champion['version']}: {how}")
    better = is_better(float(new_score), score, rule.metric, rule.min_improvement)
    return Verdict(
        better,
        f"{rule.metric} {new_score:.5f} {'beats' if better else 'does not beat'} champion "
        f"v{champion['version']} {score:.5f} ({how}, min improvement {rule.min_improvement})",
        score,
    )


def _conflict_note(conflicts: int, first_seen: Any, current: Any) -> str:
    if not conflicts:
        return ""
    return (
        f"; compared again after champion.json changed during the comparison "
        f"({conflicts} time{'s' if conflicts > 1 else ''}: v{first_seen} -> v{current})"
    )


def _swap_champion(
    models_uri: str,
    name: str,
    metadata: dict[str, Any],
    rule: PromotionRule,
    *,
    score_champion: Callable[[dict[str, Any]], tuple[float | None, str]] | None,
    source_run: str | None,
    max_attempts: int,
    pointer_extra: dict[str, Any] | None = None,
    s3=None,
) -> Promotion:
    """The one compare-and-swap loop: read the pointer and its ETag, decide
    (:func:`decide_promotion`), write only if the pointer is still the one read; on a conflict read
    it again and decide again, at most ``max_attempts`` rounds. ``pointer_extra`` goes into the
    new pointer (who approved the move)."""
    version = int(metadata["version"])
    new_score = float(metadata["metrics"][rule.metric]) if rule.replace is None else None
    first_seen: Any = "unread"
    conflicts, last = 0, None
    for attempt in range(1, max_attempts + 1):
        pointer, etag = _champion_for_swap(models_uri, name, s3)
        _hook("champion_read", version=version, champion=pointer, attempt=attempt)
        last = current = pointer["version"] if pointer else None
        first_seen = current if first_seen == "unread" else first_seen
        scored = score_champion(pointer) if needs_champion_score(version, pointer, rule) else None
        verdict = decide_promotion(version, pointer, rule, new_score=new_score, scored=scored)
        reason = verdict.reason + _conflict_note(conflicts, first_seen, current)
        if not verdict.replace:
            return Promotion(False, reason, current, verdict.champion_score, attempt)
        new_pointer = champion_pointer(
            metadata, source_run=source_run, promoted_over=current, promotion_reason=reason, promoted_at=_now(), **(pointer_extra or {})
        )
        try:
            set_champion(models_uri, name, new_pointer, s3, if_match=etag, if_none_match=etag is None)
            return Promotion(True, reason, version, verdict.champion_score, attempt)
        except storage.PreconditionFailed:
            conflicts += 1
            log.warning("model %s: champion.json changed while v%s was compared with v%s; reading it again", name, version, current)
    return Promotion(
        False,
        f"gave up after {max_attempts} attempts: champion.json changed every time "
        f"between reading and replacing it (last seen v{last}); try again to promote",
        last,
        None,
        max_attempts,
    )


def make_champion(
    models_uri: str,
    name: str,
    metadata: dict[str, Any],
    *,
    reason: str,
    source_run: str | None = None,
    max_attempts: int = MAX_PROMOTION_ATTEMPTS,
    s3=None,
) -> Promotion:
    """Make a version the champion because a person asked for it (no comparison), by the same
    compare-and-swap as :func:`promote`: the pointer is replaced only if it is still the one read,
    so a concurrent move is never silently overwritten with a stale ``promoted_over``.
    """
    return _swap_champion(
        models_uri, name, metadata, PromotionRule(replace=reason), score_champion=None, source_run=source_run, max_attempts=max_attempts, s3=s3
    )


def promote(
    models_uri: str,
    name: str,
    metadata: dict[str, Any],
    *,
    metric: str,
    min_improvement: float,
    score_champion: Callable[[dict[str, Any]], tuple[float | None, str]],
    source_run: str | None = None,
    max_attempts: int = MAX_PROMOTION_ATTEMPTS,
    s3=None,
) -> Promotion:
    """Make ``metadata``'s version the champion if it beats the current one, by compare-and-swap.

    Reads ``champion.json`` and its ETag, compares (:func:`decide_promotion`), and writes the new
    pointer only if ``champion.json`` is still the one read (``If-Match``; ``If-None-Match: *`` when
    there was none). When another export moved the champion in between, the new champion is read
    and compared again; after ``max_attempts`` rounds the export gives up and says so.

    Args:
        metadata: the version's metadata (with ``metrics[metric]``).
        score_champion: champion pointer -> ``(its score, how it was obtained)``, e.g. its
            recorded score on the same test split, or ``(None, why it cannot be compared)``.
        source_run: recorded in the pointer.

    Returns:
        The decision and its reason.
    """
    return _swap_champion(
        models_uri,
        name,
        metadata,
        PromotionRule(metric, min_improvement),
        score_champion=score_champion,
        source_run=source_run,
        max_attempts=max_attempts,
        s3=s3,
    )


# ---------------------------------------------------------------------------------------------
# The tuning pipeline's champion decision (export_best_model, and promote_approved after a person)
# ---------------------------------------------------------------------------------------------

NEW_LINEAGE_HINT = "start a new lineage with a new model_name, or trigger with champion_policy 'replace'"
REPLACE_REASON = "champion_policy 'replace': made the champion without comparing"


def recorded_champion_score(
    champion: dict[str, Any], metadata: dict[str, Any], metric: str, *, models_uri: str, model_name: str, s3=None
) -> tuple[float | None, str]:
    """The champion's recorded ``metric`` when it can be compared like for like with this version
    (:func:`comparable`), else ``(None, why not, and what to do)``."""
    lineage = champion_lineage(models_uri, model_name, champion, s3)
    ok, how = comparable(metadata, lineage)
    recorded = (champion.get("metrics") or {}).get(metric)
    if ok and recorded is None:
        ok, how = False, f"the champion v{champion['version']} records no {metric}"
    if not ok:
        return None, f"{how}; {NEW_LINEAGE_HINT}"
    return float(recorded), how


def preview_promotion(
    models_uri: str,
    name: str,
    metadata: dict[str, Any],
    rule: PromotionRule,
    *,
    score_champion: Callable[[dict[str, Any]], tuple[float | None, str]] | None = None,
    s3=None,
) -> Promotion:
    """What one compare-and-swap round would decide against the champion now, writing nothing.

    ``promoted`` here means *would be promoted*; ``attempts`` is 0. A person's approval (tuning
    Param ``promotion`` = ``approve``) is asked for only when it is True, and the move itself
    decides again when the person approves (:func:`champion_decision`).
    """
    pointer = read_champion(models_uri, name, s3)
    version = int(metadata["version"])
    new_score = float(metadata["metrics"][rule.metric]) if rule.replace is None else None
    scored = score_champion(pointer) if score_champion is not None and needs_champion_score(version, pointer, rule) else None
    verdict = decide_promotion(version, pointer, rule, new_score=new_score, scored=scored)
    return Promotion(verdict.replace, verdict.reason, pointer["version"] if pointer else None, verdict.champion_score, 0)


def champion_decision(
    models_uri: str,
    name: str,
    metadata: dict[str, Any],
    *,
    champion_policy: str,
    metric: str,
    min_improvement: float,
    source_run: str | None,
    dry_run: bool = False,
    pointer_extra: dict[str, Any] | None = None,
    s3=None,
) -> Promotion:
    """The tuning pipeline's champion move for a version: compared like for like with the champion's
    recorded score (``champion_policy`` compare), or made the champion without comparing (replace),
    by the one compare-and-swap (:func:`promote`, :func:`make_champion`).

    Args:
        dry_run: decide against the champion now and write nothing (:func:`preview_promotion`).
        pointer_extra: recorded in the new champion pointer (e.g. who approved the move).
    """
    if champion_policy == "replace":
        rule, score = PromotionRule(replace=REPLACE_REASON), None
    else:

        def score(champion: dict[str, Any]) -> tuple[float | None, str]:
            return recorded_champion_score(champion, metadata, metric, models_uri=models_uri, model_name=name, s3=s3)

        rule = PromotionRule(metric, min_improvement)
    if dry_run:
        return preview_promotion(models_uri, name, metadata, rule, score_champion=score, s3=s3)
    return _swap_champion(
        models_uri,
        name,
        metadata,
        rule,
        score_champion=score,
        source_run=source_run,
        max_attempts=MAX_PROMOTION_ATTEMPTS,
        pointer_extra=pointer_extra,
        s3=s3,
    )
