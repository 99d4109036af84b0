"""Batch inference on executors: the one per-partition entry point and what it is made of.

:func:`score_partition` is what the inference job maps over its Spark partitions: fetch + decode
a group of keys (:mod:`sparktf.fetch`), call the model once per batch (loaded once per Python
worker, sha256-checked, safe mode), keep the top-k labels, encode the rows as Parquet and stage
them for publishing. The layout, the publish and the reader side are in :mod:`sparktf.predictions`.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from sparktf import executor, fetch, predictions, registry, storage

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
        executor.pin_threads(cpus if cpus is not None else executor.task_cpus())
        model = registry.load_verified_model(model_uri, model_sha256)
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model
        _LOADS[key] += 1
        return model, True


def model_loads() -> int:
    """How many times this process has loaded a model (for tests and stats)."""
    return sum(_LOADS.values())


def predict_batch(model, batch) -> Any:
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


def prediction_rows(keys: list[str], probabilities, labels: list[str], k: int) -> list[dict[str, Any]]:
    """One row per key of a batch: the best label, its score and the top ``k``.

    Raises:
        ValueError: the model's output is not one row of ``len(labels)`` scores per key.
    """
    if probabilities.shape != (len(keys), len(labels)):
        raise ValueError(f"model output {probabilities.shape} does not match {len(keys)} images x {len(labels)} labels")
    order, scores = top_k(probabilities, k)
    return [
        {
            "key": key,
            "predicted_label": labels[order[row, 0]],
            "score": float(scores[row, 0]),
            "top_k": [{"label": labels[c], "score": float(s)} for c, s in zip(order[row], scores[row])],
        }
        for row, key in enumerate(keys)
    ]


# ---------------------------------------------------------------------------------------------
# Scoring one task's keys
# ---------------------------------------------------------------------------------------------


def score_keys(
    bucket: str,
    keys: list[str],
    *,
    model_uri: str,
    model_sha256: str,
    label_names: list[str],
    input_shape: tuple[int, int, int],
    batch_size: int = 256,
    fetch_threads: int = 16,
    max_pixels: int = 40_000_000,
    k: int = 5,
    cpus: int | None = None,
    sizes: dict[str, int] | None = None,
    max_image_bytes: int | None = None,
    resize_policy: str = "resize",
) -> dict[str, Any]:
    """Score objects: fetch + decode concurrently, then one model call per batch.

    ``resize_policy`` is how images reach ``input_shape`` (:data:`sparktf.images.RESIZE_POLICIES`:
    ``resize`` for digits, the default; ``center_crop`` for photos).

    Objects whose listed size (``sizes``) is over ``max_image_bytes`` are set aside as
    ``too_large`` without being fetched. An object the store keeps failing to serve raises
    :class:`sparktf.storage.TransientStorageError` (the task fails and Spark retries it): the
    store's trouble is never recorded as a bad image.

    Returns:
        ``{"predictions": [{key, predicted_label, score, top_k}], "errors": [{key, reason, detail}],
        "stats": {...}}``. Every key is in exactly one of the two lists. The model is loaded only
        if there is at least one image to score.
    """
    height, width, channels = (int(v) for v in input_shape)
    labels = [str(n) for n in label_names]
    errors: list[dict] = []
    stats = {"keys": len(keys), "model_loaded_now": False, "model_seconds": 0.0, "batches": 0, "pid": os.getpid()}
    retries_before = storage.retries_so_far()
    started = time.perf_counter()
    window = int(batch_size) + 2 * max(1, int(fetch_threads))
    decoded = fetch.fetch_decoded(
        bucket,
        keys,
        height=height,
        width=width,
        channels=channels,
        max_pixels=max_pixels,
        fetch_threads=fetch_threads,
        window=window,
        sizes=sizes,
        max_bytes=max_image_bytes,
        resize_policy=resize_policy,
    )
    predictions = _score_batches(_batches(decoded, int(batch_size), errors), (model_uri, model_sha256, cpus), labels, k, stats)
    stats["seconds"] = time.perf_counter() - started
    stats["model_loads_in_worker"] = model_loads()
    stats["storage_retries"] = storage.retries_so_far() - retries_before
    return {"predictions": predictions, "errors": errors, "stats": stats}


def _score_batches(
    batches: Iterator[tuple[list[str], list]], model_ref: tuple[str, str, int | None], labels: list[str], k: int, stats: dict
) -> list[dict]:
    """Top-``k`` rows for every batch: one model call each; the model is loaded at the first batch.

    ``model_ref`` is ``(model_uri, model_sha256, cpus)`` for :func:`cached_model`; ``stats`` gains
    ``model_loaded_now``, ``model_seconds`` and ``batches``.
    """
    import numpy as np

    rows: list[dict] = []
    model = None
    for batch_keys, batch_arrays in batches:
        if model is None:
            model, stats["model_loaded_now"] = cached_model(*model_ref)
        t0 = time.perf_counter()
        probabilities = predict_batch(model, np.stack(batch_arrays))
        stats["model_seconds"] += time.perf_counter() - t0
        stats["batches"] += 1
        rows.extend(prediction_rows(batch_keys, probabilities, labels, k))
    return rows


def _batches(decoded: Iterator[tuple], batch_size: int, errors: list[dict]) -> Iterator[tuple[list[str], list]]:
    """``(keys, arrays)`` batches of the decoded images; the keys set aside go to ``errors``."""
    keys: list[str] = []
    arrays: list = []
    for key, array, reason, detail in decoded:
        if array is None:
            errors.append({"key": key, "reason": reason, "detail": detail or ""})
            continue
        keys.append(key)
        arrays.append(array)
        if len(keys) >= batch_size:
            yield keys, arrays
            keys, arrays = [], []
    if keys:
        yield keys, arrays


# ---------------------------------------------------------------------------------------------
# One Spark partition: score a group of keys and stage its Parquet parts
# ---------------------------------------------------------------------------------------------


def score_partition(
    index: int,
    keys: list[str],
    *,
    bucket: str,
    staged_uri: str,
    model: dict[str, Any],
    partition_date: str,
    processed_at: dt.datetime,
    batch_size: int,
    fetch_threads: int,
    max_pixels: int,
    top: int,
    sizes: dict[str, int] | None = None,
    max_image_bytes: int | None = None,
    resize_policy: str | None = None,
) -> dict[str, Any]:
    """Score one group of keys and write its predictions and errors parts under ``staged_uri``.

    Args:
        index: the group's number (names its part files, with the task attempt: :func:`staged_part_names`).
        model: the resolved version's metadata (``name``, ``version``, ``model_uri``,
            ``model_sha256``, ``label_names``, ``input_shape``, and ``resize_policy`` for
            models registered with one: a version without it is decoded the old way, ``resize``).
        sizes: the listed size of each key (for ``max_image_bytes``).
        resize_policy: overrides the version's ``resize_policy`` (None: the version decides).

    Returns:
        The task's summary: part names and sizes, counts, label and reason histograms, a sample
        of errors, timing stats and the executor it ran on.
    """
    scored = score_keys(
        bucket,
        keys,
        model_uri=model["model_uri"],
        model_sha256=model["model_sha256"],
        label_names=model["label_names"],
        input_shape=tuple(model["input_shape"]),
        batch_size=batch_size,
        fetch_threads=fetch_threads,
        max_pixels=max_pixels,
        k=top,
        cpus=executor.task_cpus(),
        sizes=sizes,
        max_image_bytes=max_image_bytes,
        resize_policy=resize_policy or model.get("resize_policy") or "resize",
    )
    identity = executor.executor_identity()
    name, error_name = staged_part_names(index, f"{int(identity.get('attempt', 0))}-{uuid.uuid4().hex[:12]}")
    s3 = storage.client()
    predictions_data = predictions.predictions_parquet(
        scored["predictions"], model_name=model["name"], model_version=model["version"], partition_date=partition_date, processed_at=processed_at
    )
    errors_data = predictions.errors_parquet(scored["errors"], partition_date=partition_date)
    storage.write_bytes(storage.join_uri(staged_uri, name), predictions_data, s3)
    storage.write_bytes(storage.join_uri(staged_uri, error_name), errors_data, s3)
    return partition_summary(index, (name, len(predictions_data)), (error_name, len(errors_data)), scored, identity)


def partition_summary(
    index: int, part: tuple[str, int], errors_part: tuple[str, int], scored: dict[str, Any], identity: dict[str, Any]
) -> dict[str, Any]:
    """What one task reports to the driver: its staged parts (name, size), counts, histograms, a sample of errors.

    Args:
        index: the group's number.
        part: the staged predictions part's name and size in bytes; ``errors_part`` the same for its errors twin.
        scored: :func:`score_keys`'s result.
        identity: :func:`sparktf.executor.executor_identity` of the task.
    """
    return {
        "index": index,
        "file": part[0],
        "errors_file": errors_part[0],
        "file_size": part[1],
        "errors_size": errors_part[1],
        "scored": len(scored["predictions"]),
        "set_aside": len(scored["errors"]),
        "labels": dict(Counter(p["predicted_label"] for p in scored["predictions"])),
        "reasons": dict(Counter(e["reason"] for e in scored["errors"])),
        "errors": scored["errors"][:50],
        "stats": scored["stats"],
        "executor": str(identity.get("executor_id", "driver")),
    }


def staged_part_names(index: int, attempt_token: str) -> tuple[str, str]:
    """A task attempt's staged parts: ``part-<index>-<attempt>.parquet`` and its ``_errors/`` twin.

    ``attempt_token`` (the Spark attempt number and a random suffix) makes them unique per task
    attempt, so a speculative or zombie attempt of the same task writes its own files and can never
    overwrite the parts the winning attempt reported (the publish copies exactly those names).
    """
    name = f"part-{index:05d}-{attempt_token}.parquet"
    return name, f"{predictions.ERRORS_DIR}/{name}"
