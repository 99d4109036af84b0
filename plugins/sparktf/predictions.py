"""Predictions partitions: their layout, Parquet schema, publish protocol and the reader contract.

The light side of batch inference: the DAG and downstream readers import this (heavy modules such
as pyarrow are imported inside the functions that need them). What runs on executors is in
:mod:`sparktf.scoring`; the incoming side (listing a date's images, dealing their keys to tasks)
is :mod:`sparktf.incoming`.

This docstring is the one description of the publish protocol and the reader contract; the
README, the nightly DAG and the job link here.

Layout under ``<predictions-uri>/<model-name>/`` (:func:`model_partition_uri`: predictions of
different models never share a partition)::

    <YYYY-MM-DD>/part-<publish-id>-00000.parquet ...      one row per scored image
    <YYYY-MM-DD>/_errors/part-<publish-id>-00000.parquet  one row per image set aside: key, reason, detail
    <YYYY-MM-DD>/_SUCCESS                                 JSON manifest: counts, model, and every
                                                          file with its size, ETag and rows
    _staging/<YYYY-MM-DD>/<publish-id>/_ATTEMPT           an attempt in flight (written first)
    _staging/<YYYY-MM-DD>/<publish-id>/part-00000-<task attempt>.parquet ...
                                                          its output before it is published (one
                                                          name per Spark task attempt)

A publish id is the job attempt's id plus a random suffix: no two attempts ever write the same
file name, so publishing never overwrites a file that a manifest lists.

**Publish protocol** (:func:`begin_attempt`, :func:`publish_partition`, :func:`end_attempt`):

1. The attempt writes its ``_ATTEMPT`` marker, then reads ``_SUCCESS`` and its ETag: the version
   it may replace.
2. Its tasks stage the parts; the driver copies them into the partition under the attempt's own
   names (the published files stay untouched).
3. It switches ``_SUCCESS`` with one conditional PUT: ``If-Match`` the ETag read in step 1
   (``If-None-Match: *`` if there was none). If another run published the date in between, the
   switch is refused: **the first run to publish wins**. The other removes its copies and fails
   with :class:`PublishConflict`. A run only ever replaces a partition it has seen.
4. The winner deletes the files its manifest does not list, except those of attempts still in
   flight (a fresh ``_ATTEMPT`` marker), then its staging.

A re-run that would replace a partition with one scoring fewer than half as many images is
refused before it changes anything (:func:`shrink_refusal`), unless explicitly allowed.

**Reader contract.** A date is published once its ``_SUCCESS`` exists. From then on it always
exists (a re-run replaces it with one PUT, never deletes it) and always lists a complete set of
files from one run. Read ``_SUCCESS`` first, then exactly the files it lists
(:func:`read_predictions`, or :func:`listed_file_uris` for Spark or pyarrow). Listed files are
never modified, and deleted only after a newer ``_SUCCESS`` replaced the one listing them: a
reader that finds a listed file missing re-reads ``_SUCCESS`` and starts over
(:func:`read_predictions` does). Loading the folder as a whole (a glob over
``<date>/*.parquet``) is not safe while a re-run or an overlapping run is in progress, or after
an attempt died mid-publish: it can see two runs' files at once.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import sparktf
from sparktf import storage

log = logging.getLogger("sparktf.predictions")

MANIFEST_NAME = "_SUCCESS"
MANIFEST_FORMAT = "sparktf.predictions/v2"
ERRORS_DIR = "_errors"
STAGING_DIR = "_staging"
ATTEMPT_MARKER = "_ATTEMPT"
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MODEL_NAME_RE = re.compile(sparktf.MODEL_NAME_PATTERN)  # the registry's model names
_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9_.=-]+$")
_PART_RE = re.compile(r"^part-(?P<publish_id>[A-Za-z0-9_.=-]+)-(?P<index>\d{5})\.parquet$")
# An attempt whose marker is older than this is dead (the DAG's job timeout is 3 hours): its
# staging and its unpublished files may be removed by the next run of the date.
STALE_ATTEMPT_SECONDS = 12 * 3600
# A re-run may not replace a partition with one that scores fewer than this share of its images.
MIN_SHARE_KEPT = 0.5


class PublishConflict(RuntimeError):
    """Another run published the date after this attempt started: its output stays, ours is dropped."""


@dataclass(frozen=True)
class Attempt:
    """One job attempt at publishing a date: its ids, its staging area, the version it may replace."""

    predictions_uri: str
    date: str
    publish_id: str
    attempt_id: str
    staged_uri: str
    previous: dict[str, Any] | None  # the _SUCCESS manifest when the attempt started (None: unpublished)
    previous_etag: str | None


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def check_date(date: str) -> str:
    """``YYYY-MM-DD`` or ValueError (partition names are never built from anything else)."""
    import datetime as dt

    if not DATE_RE.match(str(date)):
        raise ValueError(f"partition date must be YYYY-MM-DD, got {date!r}")
    try:
        dt.date.fromisoformat(date)
    except ValueError as err:
        raise ValueError(f"partition date {date!r} is not a day of the calendar ({err})") from None
    return date


def partition_uri(root_uri: str, date: str) -> str:
    """``<root>/<date>/`` (with the trailing slash: ``2026-11-2`` never matches ``2026-11-20``)."""
    return storage.prefix_uri(storage.join_uri(root_uri, check_date(date)))


def model_output_uri(root_uri: str, model_name: str) -> str:
    """``<root>/<model_name>``: where one model's partitions (and their staging) live."""
    if not MODEL_NAME_RE.match(str(model_name)):
        raise ValueError(f"model name must match {MODEL_NAME_RE.pattern}, got {model_name!r}")
    return storage.join_uri(root_uri, model_name)


def model_partition_uri(root_uri: str, model_name: str, date: str) -> str:
    """``<root>/<model_name>/<date>/``: one model's predictions of one day."""
    return partition_uri(model_output_uri(root_uri, model_name), date)


# ---------------------------------------------------------------------------------------------
# Parquet parts
# ---------------------------------------------------------------------------------------------


def _schemas():
    import pyarrow as pa

    top = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))
    predictions = pa.schema(
        [
            ("key", pa.string()),
            ("predicted_label", pa.string()),
            ("score", pa.float32()),
            ("top_k", top),
            ("model_name", pa.string()),
            ("model_version", pa.int32()),
            ("partition_date", pa.string()),
            ("processed_at", pa.timestamp("us", tz="UTC")),
        ]
    )
    errors = pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("partition_date", pa.string())])
    return predictions, errors


def predictions_parquet(rows: list[dict], *, model_name: str, model_version: int, partition_date: str, processed_at) -> bytes:
    """One Parquet part of predictions (rows sorted by key; empty parts keep the schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, _ = _schemas()
    rows = sorted(rows, key=lambda r: r["key"])
    n = len(rows)
    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "predicted_label": [r["predicted_label"] for r in rows],
            "score": [r["score"] for r in rows],
            "top_k": [r["top_k"] for r in rows],
            "model_name": [model_name] * n,
            "model_version": [int(model_version)] * n,
            "partition_date": [partition_date] * n,
            "processed_at": [processed_at] * n,
        },
        schema=schema,
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def errors_parquet(rows: list[dict], *, partition_date: str) -> bytes:
    """One Parquet part of images set aside: key, reason, detail (sorted by key)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, schema = _schemas()
    rows = sorted(rows, key=lambda r: r["key"])
    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "reason": [r["reason"] for r in rows],
            "detail": [r.get("detail", "") for r in rows],
            "partition_date": [partition_date] * len(rows),
        },
        schema=schema,
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Publishing (driver): attempt ids, staging, the conditional switch, the clean-up
# ---------------------------------------------------------------------------------------------


def new_publish_id(attempt_id: str) -> str:
    """The attempt id (path-safe) plus a random suffix: unique even when an attempt id is reused
    (e.g. the same run id and try number after a metadata reset)."""
    if not _SAFE_ID_RE.match(attempt_id or ""):
        raise ValueError(f"attempt id must be path-safe, got {attempt_id!r}")
    return f"{attempt_id}-{uuid.uuid4().hex[:8]}"


def staging_uri(predictions_uri: str, date: str, publish_id: str | None = None) -> str:
    """``<predictions>/_staging/<date>/[<publish-id>/]``."""
    root = storage.join_uri(predictions_uri, STAGING_DIR, check_date(date))
    if publish_id is not None:
        if not _SAFE_ID_RE.match(publish_id):
            raise ValueError(f"publish id must be path-safe, got {publish_id!r}")
        root = storage.join_uri(root, publish_id)
    return storage.prefix_uri(root)


def part_name(publish_id: str, index: int, *, errors: bool = False) -> str:
    """A published part's name relative to the partition: ``[_errors/]part-<publish-id>-<index>.parquet``."""
    name = f"part-{publish_id}-{int(index):05d}.parquet"
    return f"{ERRORS_DIR}/{name}" if errors else name


def publisher_of(name: str) -> str | None:
    """The publish id in a published part's name, or None for any other name."""
    match = _PART_RE.match(name.rsplit("/", 1)[-1])
    return match.group("publish_id") if match else None


def listed_files(manifest: dict[str, Any]) -> list[str]:
    """Every file a manifest lists (predictions, then errors), relative to the partition."""
    files = manifest.get("files") or {}
    return list(files.get("predictions", [])) + list(files.get("errors", []))


def begin_attempt(predictions_uri: str, date: str, attempt_id: str, s3=None, **info: Any) -> Attempt:
    """Start publishing a date: write the attempt's in-flight marker, then read what it may replace.

    The order matters: a run whose cleanup lists this attempt's files after this point also sees
    its marker (and leaves them), and any run that publishes after the read below is one this
    attempt has not seen, so this attempt's switch will be refused.
    """
    location = storage.parse_uri(storage.join_uri(predictions_uri, ATTEMPT_MARKER))
    storage.check_conditional_writes(location.bucket, s3, location.key)  # step 3 relies on it
    publish_id = new_publish_id(attempt_id)
    staged = staging_uri(predictions_uri, date, publish_id)
    storage.write_json(
        storage.join_uri(staged, ATTEMPT_MARKER),
        {"publish_id": publish_id, "attempt_id": attempt_id, "date": date, "started_at": dt.datetime.now(dt.UTC).isoformat(), **info},
        s3,
    )
    success = storage.join_uri(partition_uri(predictions_uri, date), MANIFEST_NAME)
    previous, etag = storage.read_json_with_etag(success, s3)
    return Attempt(
        predictions_uri=predictions_uri,
        date=date,
        publish_id=publish_id,
        attempt_id=attempt_id,
        staged_uri=staged,
        previous=previous,
        previous_etag=etag,
    )


def end_attempt(attempt: Attempt, s3=None) -> None:
    """Remove the attempt's staging area and marker (after its publish settled, won, lost or failed)."""
    storage.delete_prefix(attempt.staged_uri, s3)


def shrink_refusal(previous: dict[str, Any] | None, images: int, *, allow_shrink: bool) -> str | None:
    """Why replacing the published ``previous`` partition with one of ``images`` scored images is
    refused, or None when it may go ahead.

    "Much smaller" is fewer than half the images the published partition scored (an empty
    listing included): typically a re-run after the incoming objects expired or moved.
    """
    if allow_shrink or not previous:
        return None
    before = int(previous.get("scored") or 0)
    if before == 0 or images >= before * MIN_SHARE_KEPT:
        return None
    return (
        f"refusing to replace the predictions of {previous.get('date')} ({before} images scored by attempt "
        f"{previous.get('attempt_id')}) with {images}: fewer than {MIN_SHARE_KEPT:.0%} of them. The incoming "
        f"images may have expired or moved; check the source, or allow it with the allow_shrink Param "
        f"(--allow-shrink)"
    )


def publish_partition(attempt: Attempt, staged_files: list[dict[str, Any]], manifest: dict[str, Any], s3=None) -> dict[str, Any]:
    """Publish an attempt's staged parts as its date's partition (steps 2 to 4 of the protocol).

    Args:
        staged_files: one ``{"name", "kind", "index", "rows", "size"}`` per staged part (``name``
            relative to the staging folder; ``kind``: ``predictions`` or ``errors``).
        manifest: the manifest's content; ``publish_id``, ``files``, ``objects`` and ``replaces``
            are added here.

    Returns:
        The manifest as published.

    Raises:
        PublishConflict: another run published the date after this attempt started. This
            attempt's copies were removed; the partition is that run's, untouched.
        storage.StorageError: a copy failed (the published partition is untouched), or the
            partition was published but the previous output could not be removed.
    """
    final = partition_uri(attempt.predictions_uri, attempt.date)
    ordered = sorted(staged_files, key=lambda f: (f["kind"] != "predictions", f["index"]))
    targets = {f["name"]: part_name(attempt.publish_id, f["index"], errors=f["kind"] == "errors") for f in ordered}
    copied: list[str] = []
    objects = _copy_staged(attempt, ordered, targets, copied, s3)
    manifest = _full_manifest(attempt, manifest, ordered, targets, objects)
    won, current = _switch(attempt, manifest, s3)
    if not won:
        _discard(final, copied, s3)
        current = current or {}
        raise PublishConflict(
            f"{attempt.date} was published by another run (attempt {current.get('attempt_id')}, model version "
            f"{current.get('model_version')}, processed_at {current.get('processed_at')}) while attempt "
            f"{attempt.attempt_id} was running. The first run to publish wins: its partition is kept and this "
            f"run's output was discarded. Run this date again to replace it."
        )
    try:
        remove_unlisted(attempt, s3)
    except storage.StorageError as err:
        raise storage.StorageError(
            f"{final} was published by attempt {attempt.attempt_id}, but the files of the output it replaced could not all be removed: {err}"
        ) from err
    return manifest


def _copy_staged(attempt: Attempt, ordered: list[dict[str, Any]], targets: dict[str, str], copied: list[str], s3) -> dict[str, dict[str, Any]]:
    """Copy the staged parts into the partition under their published names (step 2); on any
    failure remove the copies made so far and raise. ``copied`` collects the names copied."""
    final = partition_uri(attempt.predictions_uri, attempt.date)

    def copy(staged: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        target = targets[staged["name"]]
        etag = storage.copy_object(storage.join_uri(attempt.staged_uri, staged["name"]), storage.join_uri(final, target), s3)
        copied.append(target)
        return target, {"size": int(staged["size"]), "etag": etag, "rows": int(staged["rows"])}

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(pool.map(copy, ordered))
    except BaseException:
        _discard(final, copied, s3)
        raise


def _full_manifest(
    attempt: Attempt, manifest: dict[str, Any], ordered: list[dict[str, Any]], targets: dict[str, str], objects: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The ``_SUCCESS`` document: the job's manifest plus the attempt, the files, their objects and
    the version it replaces."""
    previous = attempt.previous
    return {
        **manifest,
        "publish_id": attempt.publish_id,
        "attempt_id": attempt.attempt_id,
        "files": {
            "predictions": [targets[f["name"]] for f in ordered if f["kind"] == "predictions"],
            "errors": [targets[f["name"]] for f in ordered if f["kind"] == "errors"],
        },
        "objects": objects,
        "replaces": None
        if previous is None
        else {
            "publish_id": previous.get("publish_id"),
            "attempt_id": previous.get("attempt_id"),
            "etag": attempt.previous_etag,
            "scored": previous.get("scored"),
        },
    }


def _switch(attempt: Attempt, manifest: dict[str, Any], s3) -> tuple[bool, dict[str, Any] | None]:
    """Replace ``_SUCCESS`` only if it is still the version the attempt read at its start.

    Returns:
        ``(won, the manifest now in place)``.
    """
    success = storage.join_uri(partition_uri(attempt.predictions_uri, attempt.date), MANIFEST_NAME)
    condition = {"if_match": attempt.previous_etag} if attempt.previous_etag else {"if_none_match": True}
    try:
        # Retried on transient errors; a resend that meets its own first copy counts as a win.
        storage.write_json(success, manifest, s3, **condition)
        return True, manifest
    except storage.PreconditionFailed:
        current = storage.read_json_if_exists(success, s3)
        if current is not None and current.get("publish_id") == attempt.publish_id:
            return True, current  # ours after all (it was replaced by nothing newer)
        return False, current


def remove_unlisted(attempt: Attempt, s3=None, stale_after: float | None = None) -> int:
    """Delete what the partition's current manifest does not list, except the files of attempts
    still in flight; delete the staging of dead attempts. Returns how many files were deleted.

    The order of the three reads makes this safe next to any number of concurrent attempts: the
    partition is listed first, then the in-flight markers, then ``_SUCCESS``. A file listed in
    the first step belongs to an attempt whose marker existed then (it is written before any
    copy); if that marker is gone by the second step, the attempt had settled, so if it won,
    ``_SUCCESS`` read in the third step lists the file (or something newer replaced it).
    """
    final = partition_uri(attempt.predictions_uri, attempt.date)
    location = storage.parse_uri(final)
    present = [o["key"] for o in storage.iter_objects(final, s3)]
    in_flight = _live_attempts(attempt, s3, STALE_ATTEMPT_SECONDS if stale_after is None else stale_after)
    current = storage.read_json_if_exists(storage.join_uri(final, MANIFEST_NAME), s3) or {}
    keep = set(listed_files(current)) | {MANIFEST_NAME}
    doomed = [key for key in present if key[len(location.key) :] not in keep and publisher_of(key[len(location.key) :]) not in in_flight]
    if doomed:
        log.info("removing %d files of %s that the manifest of %s does not list", len(doomed), final, current.get("attempt_id"))
        storage.delete_keys(location.bucket, doomed, s3)
    return len(doomed)


def _live_attempts(attempt: Attempt, s3, stale_after: float) -> set[str]:
    """Publish ids of the other attempts in flight for the date; dead attempts' staging is deleted.

    An attempt is in flight while its marker exists and is younger than ``stale_after`` seconds
    by the store's clock (compared with the newest file of this attempt's own staging, so
    machine clocks never matter). A staging folder without a marker (a late write of a settled attempt) is never in
    flight and is removed once it is that old.
    """
    root = staging_uri(attempt.predictions_uri, attempt.date)
    location = storage.parse_uri(root)
    folders: dict[str, list[dict]] = {}
    for obj in storage.iter_objects(root, s3):
        folders.setdefault(obj["key"][len(location.key) :].split("/", 1)[0], []).append(obj)
    own = folders.get(attempt.publish_id, [])
    clock = max((o["last_modified"] for o in own if o["last_modified"] is not None), default=None)
    live: set[str] = set()
    dead: list[str] = []
    for publish_id, objects in folders.items():
        if publish_id == attempt.publish_id:
            continue
        marker_key = f"{location.key}{publish_id}/{ATTEMPT_MARKER}"
        marker = next((o for o in objects if o["key"] == marker_key), None)
        stamps = [o["last_modified"] for o in ([marker] if marker else objects) if o["last_modified"] is not None]
        age = (clock - max(stamps)).total_seconds() if clock is not None and stamps else 0.0
        if age >= stale_after:
            dead.extend(o["key"] for o in objects)
        elif marker is not None:
            live.add(publish_id)
    if dead:
        log.info("removing the staging of %d dead attempts under %s", len({k.split("/")[-2] for k in dead}), root)
        storage.delete_keys(location.bucket, dead, s3)
    return live


def _discard(final: str, names: list[str], s3) -> None:
    """Best-effort removal of an attempt's own copies that never became current (a later run's
    clean-up removes whatever is left)."""
    if not names:
        return
    location = storage.parse_uri(final)
    try:
        storage.delete_keys(location.bucket, [location.key + name for name in names], s3)
    except Exception as err:  # noqa: BLE001 - the original failure is the one to report
        log.error("could not remove %d unpublished files under %s (a later run removes them): %s", len(names), final, err)


# ---------------------------------------------------------------------------------------------
# The reader side
# ---------------------------------------------------------------------------------------------


def read_published(partition: str, s3=None) -> dict[str, Any] | None:
    """The ``_SUCCESS`` manifest of a published partition, or None (never published)."""
    return storage.read_json_if_exists(storage.join_uri(partition, MANIFEST_NAME), s3)


def listed_file_uris(partition: str, manifest: dict[str, Any], kind: str = "predictions") -> list[str]:
    """URIs of the files a manifest lists, e.g. for ``spark.read.parquet(*uris)`` (``kind``:
    ``predictions`` or ``errors``)."""
    return [storage.join_uri(partition, rel) for rel in manifest["files"][kind]]


def read_predictions(partition: str, s3=None, attempts: int = 3) -> tuple[list[dict], list[dict]]:
    """``(predictions, errors)`` rows of a published partition, read from the files its manifest lists.

    If a listed file is gone because a re-run replaced the partition meanwhile, the new manifest
    is read and the read starts over.

    Raises:
        FileNotFoundError: if the partition was never published (no ``_SUCCESS``).
        storage.StorageError: a listed file is missing or has another size under an unchanged
            manifest (the partition was damaged), or the partition kept changing.
    """
    success = storage.join_uri(partition, MANIFEST_NAME)
    for _ in range(attempts):
        manifest, etag = storage.read_json_with_etag(success, s3)
        if manifest is None:
            raise FileNotFoundError(f"no published predictions at {partition} (no {MANIFEST_NAME})")
        try:
            rows = {
                kind: [row for rel in manifest["files"][kind] for row in _read_listed(partition, rel, manifest, s3)]
                for kind in ("predictions", "errors")
            }
            return rows["predictions"], rows["errors"]
        except storage.ObjectNotFound as err:
            _, now = storage.read_json_with_etag(success, s3)
            if now == etag:
                raise storage.StorageError(f"{partition}: a file its {MANIFEST_NAME} lists is missing ({err})") from None
            log.info("%s was replaced while it was read: reading the new version", partition)
    raise storage.StorageError(f"{partition} was replaced {attempts} times while it was read")


def _read_listed(partition: str, rel: str, manifest: dict[str, Any], s3) -> list[dict]:
    import pyarrow.parquet as pq

    data = storage.read_bytes(storage.join_uri(partition, rel), s3)
    expected = (manifest.get("objects") or {}).get(rel, {}).get("size")
    if expected is not None and len(data) != int(expected):
        raise storage.StorageError(f"{partition}{rel}: {len(data)} bytes, its manifest says {expected}")
    return pq.read_table(io.BytesIO(data)).to_pylist()
