"""Prepared datasets: Parquet shards of uint8 pixels plus a manifest, in object storage.

Layout under a prepared-data prefix::

    <prefix>/train/part-00000.parquet ...
    <prefix>/validation/part-00000.parquet ...
    <prefix>/test/part-00000.parquet ...
    <prefix>/manifest.json      written last: its presence means the data set is complete

Each row: ``id`` (source key, plus a record index for IDX files), ``label`` (int), ``split`` and
``pixels`` (``height * width * channels`` bytes, row-major).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np

from sparktf import storage

SPLITS = ("train", "validation", "test")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sparktf.prepared/v1"


def shard_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """Encode rows as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    table = pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "label": pa.array([int(r["label"]) for r in rows], pa.int32()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "pixels": pa.array([bytes(r["pixels"]) for r in rows], pa.binary()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def read_shard(uri: str, s3=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read one shard: ``(ids, pixels uint8 (n, h*w*c), labels int32 (n,))``."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri, s3)))
    ids = table.column("id").to_pylist()
    labels = table.column("label").to_numpy().astype(np.int32)
    blobs = table.column("pixels").to_pylist()
    pixels = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), -1) if blobs else np.zeros((0, 0), np.uint8)
    return ids, pixels, labels


def read_manifest(prepared_uri: str, s3=None) -> dict[str, Any]:
    """Read a prepared data set's manifest.

    Raises:
        FileNotFoundError: if the data set has no manifest (missing or not completely written).
    """
    manifest = storage.read_json_if_exists(storage.join_uri(prepared_uri, MANIFEST_NAME), s3)
    if manifest is None:
        raise FileNotFoundError(f"no prepared data set at {prepared_uri} (no {MANIFEST_NAME})")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{prepared_uri}: unknown manifest format {manifest.get('format')!r}")
    return manifest


def read_split(prepared_uri: str, split: str, manifest: dict[str, Any] | None = None, s3=None):
    """Load one split into memory: ``(x uint8 (n, h, w, c), y int32 (n,))``, ordered by id."""
    manifest = manifest or read_manifest(prepared_uri, s3)
    shape = tuple(manifest["image_shape"])
    all_ids, all_pixels, all_labels = [], [], []
    for shard in manifest["splits"][split]["shards"]:
        ids, pixels, labels = read_shard(storage.join_uri(prepared_uri, shard), s3)
        all_ids.extend(ids)
        all_pixels.append(pixels)
        all_labels.append(labels)
    if not all_ids:
        return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
    order = np.argsort(np.array(all_ids, dtype=object), kind="stable")
    x = np.concatenate(all_pixels)[order].reshape((-1, *shape))
    y = np.concatenate(all_labels)[order]
    return x, y


def prepared_size_bytes(manifest: dict[str, Any]) -> int:
    """Approximate in-memory size of all splits (pixels only)."""
    per_image = int(np.prod(manifest["image_shape"]))
    return sum(manifest["splits"][s]["count"] for s in SPLITS) * per_image


def load_arrays(prepared_uri: str, manifest: dict[str, Any] | None = None, s3=None) -> dict[str, Any]:
    """All three splits as arrays (``x_train, y_train, x_val, y_val, x_test, y_test``), plus
    ``input_shape`` and ``num_classes``."""
    manifest = manifest or read_manifest(prepared_uri, s3)
    data: dict[str, Any] = {"input_shape": tuple(manifest["image_shape"]), "num_classes": manifest["num_classes"]}
    for split, suffix in (("train", "train"), ("validation", "val"), ("test", "test")):
        data[f"x_{suffix}"], data[f"y_{suffix}"] = read_split(prepared_uri, split, manifest, s3)
    return data


_ARRAYS_CACHE: dict[str, dict[str, Any]] = {}


def cached_arrays(prepared_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """:func:`load_arrays`, kept for the life of this Python worker (one data set at a time).

    Used when the data set is too large to broadcast: each worker reads the shards once and reuses
    them for every trial it runs.
    """
    key = f"{prepared_uri}#{manifest['content_sha256']}"
    if key not in _ARRAYS_CACHE:
        _ARRAYS_CACHE.clear()
        _ARRAYS_CACHE[key] = load_arrays(prepared_uri, manifest)
    return _ARRAYS_CACHE[key]
