"""Batch inference on executors: cached model, concurrent fetch + decode, batched scoring, top-k,
Parquet parts, and the atomic publish of a predictions partition.

Used by ``jobs/batch_inference.py`` (and its benchmark). Heavy modules (TensorFlow, Pillow,
pyarrow, boto3) are imported inside the functions that need them, so the Airflow side can import
the light parts (:func:`list_partition`, :func:`read_published`, the layout helpers) cheaply.

Predictions layout under ``<predictions-uri>/``::

    <YYYY-MM-DD>/part-00000.parquet ...       one row per scored image (PREDICTION_COLUMNS)
    <YYYY-MM-DD>/_errors/part-00000.parquet   one row per image set aside: key, reason, detail
    <YYYY-MM-DD>/_SUCCESS                     JSON manifest, written LAST (counts, model, files)
    _staging/<YYYY-MM-DD>/<attempt-id>/...    a job attempt's output before it is published

Reader contract: a partition exists only when its ``_SUCCESS`` manifest does. Read the manifest
first, then exactly the files it lists (:func:`read_published`). A re-run deletes ``_SUCCESS``
first, replaces the files and writes ``_SUCCESS`` last, so a reader that finds no manifest, or a
listed file missing, is looking at a partition being replaced and should retry later. Readers
that load the folder with Spark or pyarrow get the predictions only (``_``-prefixed paths are
ignored by both).
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

from sparktf import storage

MANIFEST_NAME = "_SUCCESS"
MANIFEST_FORMAT = "sparktf.predictions/v1"
ERRORS_DIR = "_errors"
STAGING_DIR = "_staging"
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
PREDICTION_COLUMNS = ("key", "predicted_label", "score", "top_k", "model_name", "model_version",
                      "partition_date", "processed_at")
ERROR_COLUMNS = ("key", "reason", "detail", "partition_date")

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
    return storage.parse_uri(storage.join_uri(root_uri, check_date(date))).as_prefix().uri


def list_partition(incoming_uri: str, date: str, client=None) -> list[dict]:
    """Every object of a date partition (nested folders included), sorted by key.

    Folder markers (keys ending in ``/``) are not images and are left out; everything else is
    listed, whatever its name or extension (content decides what it is when it is decoded).

    Returns:
        ``[{"key", "size", "etag"}]``.
    """
    prefix = partition_uri(incoming_uri, date)
    objects = [o for o in storage.iter_objects(prefix, client) if not o["key"].endswith("/")]
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
# Model: loaded once per Python worker, reused by every task and batch it runs
# ---------------------------------------------------------------------------------------------

_MODEL_CACHE: dict[tuple[str, str], Any] = {}
_MODEL_LOCK = threading.Lock()
_LOADS = Counter()  # model loads in this process, by (uri, sha256)


def cached_model(model_uri: str, model_sha256: str, cpus: int | None = None):
    """This worker's copy of a model, loaded (sha256-checked, safe mode) on first use only.

    TensorFlow's threads are pinned to the task's cores before the first load. One model is kept
    per worker: asking for another version replaces it.

    Returns:
        ``(model, loaded_now)``.
    """
    key = (model_uri, model_sha256)
    with _MODEL_LOCK:
        model = _MODEL_CACHE.get(key)
        if model is not None:
            return model, False
        from sparktf import registry, runtime

        runtime.pin_threads(cpus if cpus is not None else runtime.task_cpus())
        model = registry.load_verified_model(model_uri, model_sha256)
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model
        _LOADS[key] += 1
        return model, True


def model_loads() -> int:
    """How many times this process has loaded a model (for tests and stats)."""
    return sum(_LOADS.values())


def predict_batch(model, batch) -> "Any":
    """Class probabilities for a uint8 batch ``(n, h, w, c)``: one model call, no ``predict``.

    ``model.predict`` builds a new data pipeline (and leaks memory) on every call; calling the
    model directly runs the forward pass only.
    """
    import numpy as np

    return np.asarray(model(batch, training=False), dtype=np.float32)


def top_k(probabilities, k: int) -> tuple[Any, Any]:
    """Indices and scores of the ``k`` best classes per row, best first (ties: lower index first)."""
    import numpy as np

    probabilities = np.asarray(probabilities, dtype=np.float32)
    k = max(1, min(int(k), probabilities.shape[1]))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=1)


# ---------------------------------------------------------------------------------------------
# Fetch + decode: a bounded pool of GETs per task, order preserved
# ---------------------------------------------------------------------------------------------


def fetch_decoded(bucket: str, keys: Iterable[str], *, height: int, width: int, channels: int,
                  max_pixels: int, fetch_threads: int = 16, window: int | None = None,
                  client=None) -> Iterator[tuple[str, Any, str | None, str | None]]:
    """Fetch and decode objects concurrently; yield ``(key, array | None, reason, detail)`` in key order.

    At most ``window`` objects are in flight or waiting (bounded memory whatever the partition
    size). Fetch failures get reason ``unreadable``; images that cannot be used get
    :class:`sparktf.images.ImageRejected`'s reason.
    """
    from sparktf.images import ImageRejected, decode_image

    client = client or storage.s3_client()
    threads = max(1, int(fetch_threads))
    window = max(threads, int(window or threads * 4))

    def work(key: str):
        try:
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:  # noqa: BLE001 - one unreadable object never fails the task
            return key, None, "unreadable", f"{type(err).__name__}: {err}"[:300]
        try:
            return key, decode_image(data, height=height, width=width, channels=channels,
                                     max_pixels=max_pixels), None, None
        except ImageRejected as rejected:
            return key, None, rejected.reason, rejected.detail[:300]
        except Exception as err:  # noqa: BLE001 - a decoder bug is this image's problem only
            return key, None, "corrupt", f"{type(err).__name__}: {err}"[:300]

    pending: deque = deque()
    key_iter = iter(keys)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch") as pool:
        for key in key_iter:
            pending.append(pool.submit(work, key))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            following = next(key_iter, None)
            if following is not None:
                pending.append(pool.submit(work, following))
            yield result


# ---------------------------------------------------------------------------------------------
# Scoring one task's keys
# ---------------------------------------------------------------------------------------------


def score_keys(bucket: str, keys: list[str], *, model_uri: str, model_sha256: str, label_names: list[str],
               input_shape: tuple[int, int, int], batch_size: int = 256, fetch_threads: int = 16,
               max_pixels: int = 40_000_000, k: int = 5, cpus: int | None = None) -> dict[str, Any]:
    """Score objects: fetch + decode concurrently, then one model call per batch.

    Returns:
        ``{"predictions": [{key, predicted_label, score, top_k}], "errors": [{key, reason, detail}],
        "stats": {...}}``. Every key is in exactly one of the two lists. The model is loaded only
        if there is at least one image to score.
    """
    import numpy as np

    height, width, channels = (int(v) for v in input_shape)
    labels = [str(n) for n in label_names]
    predictions: list[dict] = []
    errors: list[dict] = []
    stats = {"keys": len(keys), "model_loaded_now": False, "model_seconds": 0.0, "batches": 0,
             "pid": os.getpid()}
    started = time.perf_counter()
    batch_keys: list[str] = []
    batch_arrays: list = []
    model = None

    def flush() -> None:
        nonlocal model
        if not batch_keys:
            return
        if model is None:
            model, stats["model_loaded_now"] = cached_model(model_uri, model_sha256, cpus)
        t0 = time.perf_counter()
        probabilities = predict_batch(model, np.stack(batch_arrays))
        stats["model_seconds"] += time.perf_counter() - t0
        stats["batches"] += 1
        if probabilities.shape != (len(batch_keys), len(labels)):
            raise ValueError(f"model output {probabilities.shape} does not match {len(batch_keys)} images "
                             f"x {len(labels)} labels")
        order, scores = top_k(probabilities, k)
        for row, key in enumerate(batch_keys):
            predictions.append({
                "key": key, "predicted_label": labels[order[row, 0]], "score": float(scores[row, 0]),
                "top_k": [{"label": labels[c], "score": float(s)} for c, s in zip(order[row], scores[row])],
            })
        batch_keys.clear()
        batch_arrays.clear()

    window = int(batch_size) + 2 * max(1, int(fetch_threads))
    for key, array, reason, detail in fetch_decoded(bucket, keys, height=height, width=width, channels=channels,
                                                    max_pixels=max_pixels, fetch_threads=fetch_threads,
                                                    window=window):
        if array is None:
            errors.append({"key": key, "reason": reason, "detail": detail or ""})
            continue
        batch_keys.append(key)
        batch_arrays.append(array)
        if len(batch_keys) >= batch_size:
            flush()
    flush()
    stats["seconds"] = time.perf_counter() - started
    stats["model_loads_in_worker"] = model_loads()
    return {"predictions": predictions, "errors": errors, "stats": stats}


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


def read_parquet_rows(uri: str, client=None) -> list[dict]:
    """All rows of one Parquet object as dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri, client))).to_pylist()


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
    return storage.parse_uri(root).as_prefix().uri


def publish_partition(staged_uri: str, final_uri: str, files: list[str], manifest: dict[str, Any],
                      client=None) -> str:
    """Replace the partition at ``final_uri`` with the staged files; ``_SUCCESS`` is written last.

    Order: delete the old ``_SUCCESS`` (readers stop trusting the old partition), delete the old
    partition's files, server-side copy every staged file, write the new ``_SUCCESS`` (one PUT).
    The caller removes the staging area afterwards.

    Returns:
        The ``_SUCCESS`` URI.
    """
    client = client or storage.s3_client()
    final_uri = storage.parse_uri(final_uri).as_prefix().uri
    success = storage.join_uri(final_uri, MANIFEST_NAME)
    loc = storage.parse_uri(success)
    client.delete_object(Bucket=loc.bucket, Key=loc.key)
    storage.delete_prefix(final_uri, client)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda rel: storage.copy_object(storage.join_uri(staged_uri, rel),
                                                      storage.join_uri(final_uri, rel), client), files))
    storage.write_json(success, manifest, client)
    return success


def read_published(partition: str, client=None) -> dict[str, Any] | None:
    """The ``_SUCCESS`` manifest of a published partition, or None (not published / being replaced)."""
    return storage.read_json_if_exists(storage.join_uri(partition, MANIFEST_NAME), client)


def read_predictions(partition: str, client=None) -> tuple[list[dict], list[dict]]:
    """``(predictions, errors)`` rows of a published partition, read from the files its manifest lists.

    Raises:
        FileNotFoundError: if the partition has no ``_SUCCESS`` (not published, or being replaced).
    """
    manifest = read_published(partition, client)
    if manifest is None:
        raise FileNotFoundError(f"no published predictions at {partition} (no {MANIFEST_NAME})")
    predictions, errors = [], []
    for rel in manifest["files"]["predictions"]:
        predictions.extend(read_parquet_rows(storage.join_uri(partition, rel), client))
    for rel in manifest["files"]["errors"]:
        errors.extend(read_parquet_rows(storage.join_uri(partition, rel), client))
    return predictions, errors
