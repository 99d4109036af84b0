"""Predictions partitions: their layout, Parquet schema, atomic publish and the reader contract.

The light side of batch inference: the DAG and downstream readers import this (heavy modules such
as pyarrow are imported inside the functions that need them). What runs on executors is in
:mod:`sparktf.scoring`.

Layout under ``<predictions-uri>/<model-name>/`` (:func:`model_partition_uri`: predictions of
different models never share a partition)::

    <YYYY-MM-DD>/part-00000.parquet ...       one row per scored image
    <YYYY-MM-DD>/_errors/part-00000.parquet   one row per image set aside: key, reason, detail
    <YYYY-MM-DD>/_SUCCESS                     JSON manifest, written LAST (counts, model, files)
    _staging/<YYYY-MM-DD>/<attempt-id>/...    a job attempt's output before it is published

Reader contract: a partition exists only when its ``_SUCCESS`` manifest does. Read the manifest
first, then exactly the files it lists (:func:`read_predictions`). A re-run deletes ``_SUCCESS``
first, replaces the files and writes ``_SUCCESS`` last, so a reader that finds no manifest, or a
listed file missing, is looking at a partition being replaced and should retry later. Readers
that load the folder with Spark or pyarrow get the predictions only (``_``-prefixed paths are
ignored by both).
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sparktf import storage

MANIFEST_NAME = "_SUCCESS"
MANIFEST_FORMAT = "sparktf.predictions/v1"
ERRORS_DIR = "_errors"
STAGING_DIR = "_staging"
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # the registry's model names

# ---------------------------------------------------------------------------------------------
# Listing (driver or Airflow worker)
# ---------------------------------------------------------------------------------------------


def check_date(date: str) -> str:
    """``YYYY-MM-DD`` or ValueError (partition names are never built from anything else)."""
    import datetime as dt

    if not DATE_RE.match(str(date)):
        raise ValueError(f"partition date must be YYYY-MM-DD, got {date!r}")
    dt.date.fromisoformat(date)
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


def list_partition(incoming_uri: str, date: str, s3=None) -> list[dict]:
    """Every object of a date partition (nested folders included), sorted by key.

    Folder markers (keys ending in ``/``) are not images and are left out; everything else is
    listed, whatever its name or extension (content decides what it is when it is decoded).

    Returns:
        ``[{"key", "size", "etag"}]``.
    """
    prefix = partition_uri(incoming_uri, date)
    objects = [o for o in storage.iter_objects(prefix, s3) if not o["key"].endswith("/")]
    return sorted(objects, key=lambda o: o["key"])


def assign_keys(keys: list[str], num_tasks: int) -> list[list[str]]:
    """Deal sorted keys round-robin into ``num_tasks`` groups (deterministic, balanced)."""
    num_tasks = max(1, min(int(num_tasks), len(keys))) if keys else 1
    return [keys[i::num_tasks] for i in range(num_tasks)]


def plan_tasks(num_keys: int, slots: int, max_keys_per_task: int) -> int:
    """Number of Spark tasks: a multiple of the slots, each task at most ``max_keys_per_task``."""
    if num_keys <= 0:
        return 1
    slots = max(1, int(slots))
    rounds = -(-num_keys // (slots * max(1, int(max_keys_per_task))))
    return max(1, min(num_keys, slots * rounds))


# ---------------------------------------------------------------------------------------------
# Parquet parts
# ---------------------------------------------------------------------------------------------


def _schemas():
    import pyarrow as pa

    top = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))
    predictions = pa.schema([
        ("key", pa.string()), ("predicted_label", pa.string()), ("score", pa.float32()), ("top_k", top),
        ("model_name", pa.string()), ("model_version", pa.int32()), ("partition_date", pa.string()),
        ("processed_at", pa.timestamp("us", tz="UTC")),
    ])
    errors = pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                        ("partition_date", pa.string())])
    return predictions, errors


def predictions_parquet(rows: list[dict], *, model_name: str, model_version: int, partition_date: str,
                        processed_at) -> bytes:
    """One Parquet part of predictions (rows sorted by key; empty parts keep the schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, _ = _schemas()
    rows = sorted(rows, key=lambda r: r["key"])
    n = len(rows)
    table = pa.table({
        "key": [r["key"] for r in rows],
        "predicted_label": [r["predicted_label"] for r in rows],
        "score": [r["score"] for r in rows],
        "top_k": [r["top_k"] for r in rows],
        "model_name": [model_name] * n,
        "model_version": [int(model_version)] * n,
        "partition_date": [partition_date] * n,
        "processed_at": [processed_at] * n,
    }, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def errors_parquet(rows: list[dict], *, partition_date: str) -> bytes:
    """One Parquet part of images set aside: key, reason, detail (sorted by key)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, schema = _schemas()
    rows = sorted(rows, key=lambda r: r["key"])
    table = pa.table({"key": [r["key"] for r in rows], "reason": [r["reason"] for r in rows],
                      "detail": [r.get("detail", "") for r in rows],
                      "partition_date": [partition_date] * len(rows)}, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def read_parquet_rows(uri: str, s3=None) -> list[dict]:
    """All rows of one Parquet object as dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri, s3))).to_pylist()


# ---------------------------------------------------------------------------------------------
# Atomic publish (driver) and the reader side
# ---------------------------------------------------------------------------------------------


def staging_uri(predictions_uri: str, date: str, attempt_id: str | None = None) -> str:
    """``<predictions>/_staging/<date>/[<attempt-id>/]``."""
    root = storage.join_uri(predictions_uri, STAGING_DIR, check_date(date))
    if attempt_id is not None:
        if not re.match(r"^[A-Za-z0-9_.=-]+$", attempt_id):
            raise ValueError(f"attempt id must be path-safe, got {attempt_id!r}")
        root = storage.join_uri(root, attempt_id)
    return storage.prefix_uri(root)


def publish_partition(staged_uri: str, final_uri: str, files: list[str], manifest: dict[str, Any],
                      s3=None) -> str:
    """Replace the partition at ``final_uri`` with the staged files; ``_SUCCESS`` is written last.

    Order: delete the old ``_SUCCESS`` (readers stop trusting the old partition), delete the old
    partition's files, server-side copy every staged file, write the new ``_SUCCESS`` (one PUT).
    The caller removes the staging area afterwards.

    Returns:
        The ``_SUCCESS`` URI.
    """
    final_uri = storage.prefix_uri(final_uri)
    success = storage.join_uri(final_uri, MANIFEST_NAME)
    storage.delete_object(success, s3)
    storage.delete_prefix(final_uri, s3)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda rel: storage.copy_object(storage.join_uri(staged_uri, rel),
                                                      storage.join_uri(final_uri, rel), s3), files))
    storage.write_json(success, manifest, s3)
    return success


def read_published(partition: str, s3=None) -> dict[str, Any] | None:
    """The ``_SUCCESS`` manifest of a published partition, or None (not published / being replaced)."""
    return storage.read_json_if_exists(storage.join_uri(partition, MANIFEST_NAME), s3)


def read_predictions(partition: str, s3=None) -> tuple[list[dict], list[dict]]:
    """``(predictions, errors)`` rows of a published partition, read from the files its manifest lists.

    Raises:
        FileNotFoundError: if the partition has no ``_SUCCESS`` (not published, or being replaced).
    """
    manifest = read_published(partition, s3)
    if manifest is None:
        raise FileNotFoundError(f"no published predictions at {partition} (no {MANIFEST_NAME})")
    predictions, errors = [], []
    for rel in manifest["files"]["predictions"]:
        predictions.extend(read_parquet_rows(storage.join_uri(partition, rel), s3))
    for rel in manifest["files"]["errors"]:
        errors.extend(read_parquet_rows(storage.join_uri(partition, rel), s3))
    return predictions, errors
