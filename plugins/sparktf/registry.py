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
the new champion and compare again. The promotion rule (:func:`is_better`) lives here too.

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

# Test-only: name -> callable(**info), called where two exports can interleave ("version_chosen":
# a number picked, not claimed yet; "claimed": claimed, no artifact written yet;
# "before_metadata": artifacts written, metadata not yet;
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
        if match := _VERSION_FILE_RE.match(key[len(prefix_key):]):
            files.setdefault(int(match.group(1)), set()).add(match.group(2))
    return files


def find_run_version(models_uri: str, name: str, source_run: str, trial_id: str, s3=None) -> dict[str, Any] | None:
    """The newest complete version exported from this run's trial, or None."""
    matches = [m for m in list_versions(models_uri, name, s3)
               if m.get("source_run") == source_run and m.get("trial_id") == trial_id]
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
    if pointer is not None and (pointer.get("model_sha256") != metadata["model_sha256"]
                                or pointer.get("model_uri", metadata["model_uri"]) != metadata["model_uri"]):
        raise ModelIntegrityError(
            f"model {name!r}: {champion_uri(models_uri, name)} names version {version} with sha256 "
            f"{pointer.get('model_sha256') or '(none)'}, but {metadata_uri} records "
            f"{metadata['model_sha256']} for {metadata['model_uri']}: the pointer and the version "
            f"disagree (edited by hand?); pin a version, or let the tuning DAG move the champion again")
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
    stored = {key[len(prefix_key):] for key in storage.list_keys(prefix, s3)}
    unlisted = sorted(stored - set(listed))
    if unlisted:
        raise ModelIntegrityError(f"{label}: {prefix} holds files its metadata does not list: {unlisted[:5]}")
    for path, entry in sorted(listed.items()):
        uri = storage.join_uri(prefix, path)
        if path not in stored:
            raise ModelIntegrityError(f"{label}: {uri} is listed in the metadata but missing")
        _check_sha(uri, storage.stream_sha256(uri, s3), entry.get("sha256", ""))
    return len(listed)


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


def claim_version(models_uri: str, name: str, *, source_run: str | None = None, trial_id: str | None = None,
                  version: int | None = None, s3=None) -> VersionClaim:
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
            log.warning("model %s v%d: continuing the unfinished export of run %s (claim of %s)",
                        name, number, source_run, claim.get("claimant"))
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


def write_version(models_uri: str, name: str, *, model_path: str, metadata: dict[str, Any],
                  saved_model_dir: str | None = None, version: int | None = None, s3=None) -> dict[str, Any]:
    """Register a local ``.keras`` file (and optionally a SavedModel folder) as a new version.

    Claims a number first (:func:`claim_version`, using ``metadata``'s ``source_run`` and
    ``trial_id``), writes the artifacts under it, and ``metadata.json`` last and only if absent.
    ``metadata`` is completed with the name, number, URIs, sha256s and the SavedModel's file
    list.

    Returns:
        The version's full metadata.

    Raises:
        VersionConflict: the claim was taken over while the artifacts were written (this export
            is a zombie of one that was retried), or ``version`` is taken.
    """
    claim = claim_version(models_uri, name, source_run=metadata.get("source_run"),
                          trial_id=metadata.get("trial_id"), version=version, s3=s3)
    _hook("claimed", version=claim.version, claimant=claim.claimant)
    base = version_uri(models_uri, name, claim.version)
    artifacts = storage.join_uri(base, "artifacts", claim.claim_id)
    with open(model_path, "rb") as fh:
        blob = fh.read()
    model_uri = storage.join_uri(artifacts, "model.keras")
    storage.write_bytes(model_uri, blob, s3)
    full = {**metadata, "name": name, "version": claim.version, "uri": base + "/", "model_uri": model_uri,
            "model_sha256": storage.sha256_hex(blob), "claimant": claim.claimant}
    if saved_model_dir is not None:
        saved_uri = storage.join_uri(artifacts, "saved_model") + "/"
        full["saved_model_uri"] = saved_uri
        full["saved_model_files"] = storage.upload_dir(saved_model_dir, saved_uri, s3)
    _hook("before_metadata", version=claim.version, claimant=claim.claimant)
    current = storage.read_json_if_exists(claim_uri(models_uri, name, claim.version), s3) or {}
    if current.get("claimant") != claim.claimant:
        raise VersionConflict(f"model {name!r} version {claim.version} was taken over by "
                              f"{current.get('claimant')} while {claim.claimant} wrote it; not publishing")
    try:
        storage.write_json(storage.join_uri(base, METADATA_NAME), full, s3, if_none_match=True)
    except storage.PreconditionFailed:
        raise VersionConflict(f"model {name!r} version {claim.version} was completed by another export "
                              f"while {claim.claimant} wrote it") from None
    return full


# ---------------------------------------------------------------------------------------------
# Moving the champion
# ---------------------------------------------------------------------------------------------


def champion_pointer(metadata: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``champion.json`` document naming a version."""
    return {"name": metadata["name"], "version": metadata["version"], "model_uri": metadata["model_uri"],
            "model_sha256": metadata["model_sha256"], "metrics": metadata.get("metrics"),
            "manifest_sha256": metadata.get("manifest_sha256"), **extra}


def set_champion(models_uri: str, name: str, pointer: dict[str, Any], s3=None, *,
                 if_match: str | None = None, if_none_match: bool = False) -> str:
    """Write the champion pointer (one PUT: atomic for readers); returns its ETag.

    Unconditional by default (an operator's manual move); :func:`promote` passes the ETag it read
    (``if_match``), or ``if_none_match`` when there was no champion.

    Raises:
        storage.PreconditionFailed: the pointer changed since it was read.
    """
    return storage.write_json(champion_uri(models_uri, name), pointer, s3, if_match=if_match,
                              if_none_match=if_none_match)


def _champion_for_swap(models_uri: str, name: str, s3=None) -> tuple[dict[str, Any] | None, str | None]:
    """The champion pointer and the ETag a compare-and-swap needs; refuses a pointer without one
    (an unconditional write would then silently replace whatever is there)."""
    pointer, etag = read_champion_with_etag(models_uri, name, s3)
    if pointer is not None and not etag:
        raise storage.StorageError(f"{champion_uri(models_uri, name)} came back without an ETag: "
                                   f"the store cannot move the champion safely")
    return pointer, etag


def make_champion(models_uri: str, name: str, metadata: dict[str, Any], *, reason: str,
                  source_run: str | None = None, max_attempts: int = MAX_PROMOTION_ATTEMPTS, s3=None) -> Promotion:
    """Make a version the champion because a person asked for it (no comparison), by the same
    compare-and-swap as :func:`promote`: the pointer is replaced only if it is still the one read,
    so a concurrent move is never silently overwritten with a stale ``promoted_over``.
    """
    last = None
    for attempt in range(1, max_attempts + 1):
        pointer, etag = _champion_for_swap(models_uri, name, s3)
        current = pointer["version"] if pointer else None
        last = current
        if current is not None and int(current) == int(metadata["version"]):
            return Promotion(False, "already the champion", current, None, attempt)
        new_pointer = champion_pointer(metadata, source_run=source_run, promoted_over=current,
                                       promotion_reason=reason, promoted_at=_now())
        try:
            set_champion(models_uri, name, new_pointer, s3, if_match=etag, if_none_match=etag is None)
            return Promotion(True, reason, int(metadata["version"]), None, attempt)
        except storage.PreconditionFailed:
            log.warning("model %s: champion.json changed while v%s was being made champion; reading it again",
                        name, metadata["version"])
    return Promotion(False, f"gave up after {max_attempts} attempts: champion.json changed every time "
                            f"(last seen v{last}); trigger again to promote", last, None, max_attempts)


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


def promote(models_uri: str, name: str, metadata: dict[str, Any], *, metric: str, min_improvement: float,
            score_champion: Callable[[dict[str, Any]], tuple[float, str]], source_run: str | None = None,
            max_attempts: int = MAX_PROMOTION_ATTEMPTS, s3=None) -> Promotion:
    """Make ``metadata``'s version the champion if it beats the current one, by compare-and-swap.

    Reads ``champion.json`` and its ETag, compares (:func:`is_better`), and writes the new pointer
    only if ``champion.json`` is still the one read (``If-Match``; ``If-None-Match: *`` when there
    was none). When another export moved the champion in between, the new champion is read and
    compared again; after ``max_attempts`` rounds the export gives up and says so.

    Args:
        metadata: the version's metadata (with ``metrics[metric]``).
        score_champion: champion pointer -> ``(its score, how it was obtained)``, e.g. its
            recorded score or a re-evaluation on this version's test set.
        source_run: recorded in the pointer.

    Returns:
        The decision and its reason.
    """
    new_score = float(metadata["metrics"][metric])
    first_seen: Any = "unread"
    conflicts = 0
    last_pointer: dict[str, Any] | None = None
    for attempt in range(1, max_attempts + 1):
        pointer, etag = _champion_for_swap(models_uri, name, s3)
        last_pointer = pointer
        _hook("champion_read", version=metadata["version"], champion=pointer, attempt=attempt)
        current = pointer["version"] if pointer else None
        if first_seen == "unread":
            first_seen = current
        note = (f"; compared again after champion.json changed during the comparison "
                f"({conflicts} time{'s' if conflicts > 1 else ''}: v{first_seen} -> v{current})"
                if conflicts else "")
        if pointer is None:
            reason, champion_score = "no champion yet", None
        elif int(pointer["version"]) == int(metadata["version"]):
            return Promotion(False, "already the champion" + note, current, new_score, attempt)
        else:
            champion_score, how = score_champion(pointer)
            better = is_better(new_score, champion_score, metric, min_improvement)
            reason = (f"{metric} {new_score:.5f} {'beats' if better else 'does not beat'} champion "
                      f"v{pointer['version']} {champion_score:.5f} ({how}, min improvement {min_improvement})")
            if not better:
                return Promotion(False, reason + note, current, champion_score, attempt)
        new_pointer = champion_pointer(metadata, source_run=source_run, promoted_over=current,
                                       promotion_reason=reason + note, promoted_at=_now())
        try:
            set_champion(models_uri, name, new_pointer, s3, if_match=etag, if_none_match=etag is None)
            return Promotion(True, reason + note, int(metadata["version"]), champion_score, attempt)
        except storage.PreconditionFailed:
            conflicts += 1
            log.warning("model %s: champion.json changed while v%s was compared with v%s; reading it again",
                        name, metadata["version"], current)
    last = last_pointer["version"] if last_pointer else None
    return Promotion(False, f"gave up after {max_attempts} attempts: champion.json changed every time "
                            f"between reading and replacing it (last seen v{last}); export again to compare",
                     last, None, max_attempts)
