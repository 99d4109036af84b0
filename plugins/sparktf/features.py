"""Backbone features, computed once on Spark and reused: shards plus a manifest keyed by hashes.

For a run with a ``backbone`` the tuning job first turns every prepared image of every split into
the backbone's pooled features (:func:`featurize`): one Spark task per prepared shard, the model
loaded once per Python worker (:func:`sparktf.scoring.cached_model`: sha256-checked, safe mode),
called once per batch. Layout, under ``<features-uri>/<backbone sha256>-<data sha256>/`` (the
first 16 hex digits of each; the manifest records both whole)::

    train/part-00000.parquet ...   id, label, features (float32 bytes), in the prepared shard's order
    validation/... test/...
    features.json                  written last: its presence means the features are complete

A re-run, a cleared run or a second grid over the same prepared data (its ``content_sha256``) and
the same backbone version (its artifact's sha256) finds the manifest and featurizes nothing; a
changed backbone or changed data has another key. Trials then read the features as they read
prepared arrays (:func:`load_features`, broadcast when they fit, else per worker from shards).
"""

from __future__ import annotations

import argparse
import io
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from sparktf import backbones, dataset, job, knobs, storage

log = job.log

MANIFEST_NAME = "features.json"
MANIFEST_FORMAT = "sparktf.features/v1"
HEAD_FAMILY = "head"  # the model family of a backbone run's trials (sparktf.models.build_head)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The tuning job's flags for a backbone run."""
    parser.add_argument("--models-uri", default="", help="S3 prefix of the model registry holding --backbone")
    parser.add_argument("--features-uri", default="", help="S3 prefix where backbone features are kept (keyed by backbone and data)")
    parser.add_argument("--featurize-batch-size", type=int, default=64, help="images per backbone call when featurizing")


def features_location(features_root: str, backbone_sha256: str, content_sha256: str) -> str:
    """The features' prefix for one backbone version and one prepared data set."""
    return storage.join_uri(features_root, f"{backbone_sha256[:16]}-{content_sha256[:16]}") + "/"


def reusable_manifest(features_uri: str, backbone_sha256: str, content_sha256: str, s3=None) -> dict[str, Any] | None:
    """The complete features at ``features_uri`` for exactly this backbone and data, or None."""
    found = storage.read_json_if_exists(storage.join_uri(features_uri, MANIFEST_NAME), s3)
    if not found or found.get("format") != MANIFEST_FORMAT:
        return None
    if found.get("backbone", {}).get("model_sha256") != backbone_sha256 or found.get("content_sha256") != content_sha256:
        return None  # a key prefix collision: never reuse features of another backbone or data set
    return found


# ---------------------------------------------------------------------------------------------
# Executors: one prepared shard in, one features shard out
# ---------------------------------------------------------------------------------------------

_EXTRACTORS: dict[str, Any] = {}
_EXTRACTOR_LOCK = threading.Lock()


def cached_extractor(model_uri: str, model_sha256: str):
    """This worker's feature extractor of a backbone (the model loaded once, the extractor built once)."""
    from sparktf import scoring

    model, _ = scoring.cached_model(model_uri, model_sha256)
    with _EXTRACTOR_LOCK:
        if model_sha256 not in _EXTRACTORS:
            _EXTRACTORS.clear()
            _EXTRACTORS[model_sha256] = backbones.feature_extractor(model)
        return _EXTRACTORS[model_sha256]


def extract(extractor, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of uint8 images ``(n, h, w, c)``: one model call per batch (no ``predict``), float32."""
    out = [np.asarray(extractor(pixels[start : start + batch_size], training=False), dtype=np.float32) for start in range(0, len(pixels), batch_size)]
    dim = int(extractor.outputs[0].shape[-1])
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def features_bytes(ids: list[str], labels: np.ndarray, values: np.ndarray) -> bytes:
    """One features shard as Parquet: ``id``, ``label``, ``features`` (float32 bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "label": pa.array(labels.astype(np.int32), pa.int32()),
            "features": pa.array([row.tobytes() for row in values.astype(np.float32)], pa.binary()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def featurize_shards(
    shards: Iterator[tuple[str, str]], *, prepared_uri: str, features_uri: str, image_shape: list[int], backbone: dict, batch_size: int
):
    """Executor side: featurize each ``(split, shard)`` of the partition; yields ``{split, shard, count, dim}``."""
    from sparktf import executor

    executor.pin_threads(executor.task_cpus())
    s3 = storage.client()
    extractor = cached_extractor(backbone["model_uri"], backbone["model_sha256"])
    for split, shard in shards:
        ids, pixels, labels = dataset.read_shard(storage.join_uri(prepared_uri, shard), s3)
        values = extract(extractor, pixels.reshape((-1, *image_shape)), batch_size)
        storage.write_bytes(storage.join_uri(features_uri, shard), features_bytes(ids, labels, values), s3)
        yield {"split": split, "shard": shard, "count": len(ids), "dim": int(values.shape[1])}


# ---------------------------------------------------------------------------------------------
# Driver: featurize (or reuse), then load
# ---------------------------------------------------------------------------------------------


def featurize(spark, *, prepared_uri: str, manifest: dict[str, Any], backbone: dict[str, Any], features_root: str, batch_size: int = 64):
    """The features of every prepared image for ``backbone`` (:func:`sparktf.backbones.check_backbone`'s summary).

    Returns:
        ``(features_uri, features manifest, images featurized now)``: 0 when reused.

    Raises:
        ValueError: the data was prepared at another input than the backbone takes.
    """
    if list(manifest["image_shape"]) != list(backbone["input_shape"]):
        raise ValueError(
            f"{prepared_uri} was prepared at {manifest['image_shape']}, the backbone takes {backbone['input_shape']}: "
            f"run prepare_data with --backbone {backbone['name']}@{backbone['version']}"
        )
    content = manifest["content_sha256"]
    features_uri = features_location(features_root, backbone["model_sha256"], content)
    found = reusable_manifest(features_uri, backbone["model_sha256"], content)
    if found is not None:
        return features_uri, found, 0
    shards = [(split, shard) for split in dataset.SPLITS for shard in manifest["splits"][split]["shards"]]
    sc = spark.sparkContext
    sc.setJobDescription(f"featurize: {len(shards)} shards with {backbone['name']} v{backbone['version']}")
    shape, size = list(manifest["image_shape"]), int(batch_size)
    written = (
        sc.parallelize(shards, max(1, len(shards)))
        .mapPartitions(
            lambda part: featurize_shards(
                part, prepared_uri=prepared_uri, features_uri=features_uri, image_shape=shape, backbone=backbone, batch_size=size
            )
        )
        .collect()
    )
    found = features_manifest(manifest, backbone, written)
    storage.write_json(storage.join_uri(features_uri, MANIFEST_NAME), found)
    return features_uri, found, sum(w["count"] for w in written)


def features_manifest(manifest: dict[str, Any], backbone: dict[str, Any], written: list[dict]) -> dict[str, Any]:
    """The features' manifest (pure): what they were computed from and where each split's shards are."""
    dims = {w["dim"] for w in written if w["count"]}
    return {
        "format": MANIFEST_FORMAT,
        "backbone": {k: backbone[k] for k in ("name", "version", "model_uri", "model_sha256", "input_shape", "resize_policy")},
        "content_sha256": manifest["content_sha256"],
        "feature_dim": dims.pop() if len(dims) == 1 else backbone.get("feature_dim"),
        "label_names": manifest["label_names"],
        "num_classes": manifest["num_classes"],
        "splits": {
            s: {"count": sum(w["count"] for w in written if w["split"] == s), "shards": sorted(w["shard"] for w in written if w["split"] == s)}
            for s in dataset.SPLITS
        },
        "images": sum(w["count"] for w in written),
    }


def read_features_split(features_uri: str, split: str, found: dict[str, Any], s3=None) -> tuple[np.ndarray, np.ndarray]:
    """One split's ``(features float32 (n, d), labels int32 (n,))``, ordered by id as :func:`sparktf.dataset.read_split`."""
    import pyarrow.parquet as pq

    dim = int(found["feature_dim"])
    ids: list[str] = []
    values, labels = [], []
    for shard in found["splits"][split]["shards"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join_uri(features_uri, shard), s3)))
        ids += table.column("id").to_pylist()
        labels.append(table.column("label").to_numpy().astype(np.int32))
        values.append(np.frombuffer(b"".join(table.column("features").to_pylist()), np.float32).reshape(-1, dim))
    if not ids:
        return np.zeros((0, dim), np.float32), np.zeros((0,), np.int32)
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    return np.concatenate(values)[order], np.concatenate(labels)[order]


def load_features(features_uri: str, found: dict[str, Any], s3=None) -> dict[str, Any]:
    """Every split's features as a trial's data (``x_train ... y_test``, ``input_shape`` = ``(d,)``, ``num_classes``)."""
    data: dict[str, Any] = {"input_shape": (int(found["feature_dim"]),), "num_classes": found["num_classes"]}
    for split, suffix in (("train", "train"), ("validation", "val"), ("test", "test")):
        data[f"x_{suffix}"], data[f"y_{suffix}"] = read_features_split(features_uri, split, found, s3)
    return data


def features_size_bytes(found: dict[str, Any]) -> int:
    return sum(found["splits"][s]["count"] for s in dataset.SPLITS) * int(found["feature_dim"]) * 4


_FEATURES_CACHE: dict[str, dict[str, Any]] = {}


def task_data(data_source: tuple[str, Any]) -> dict[str, Any]:
    """What a trial's task trains on, from the job's ``(kind, payload)``: a broadcast, feature shards
    (:func:`cached_features`) or prepared shards (:func:`sparktf.dataset.cached_arrays`)."""
    kind, payload = data_source
    if kind == "broadcast":
        return payload.value
    if kind == "feature_shards":
        return cached_features(*payload)
    if kind == "features_and_images":  # fine-tuning trials: the heads' features, the images and the backbone to train through
        features_source, images_source, backbone = payload
        return {**task_data(features_source), "images": task_data(images_source), "backbone": backbone}
    return dataset.cached_arrays(*payload)


def cached_features(features_uri: str, found: dict[str, Any]) -> dict[str, Any]:
    """:func:`load_features`, kept for the life of this Python worker (too large to broadcast)."""
    if features_uri not in _FEATURES_CACHE:
        _FEATURES_CACHE.clear()
        _FEATURES_CACHE[features_uri] = load_features(features_uri, found)
    return _FEATURES_CACHE[features_uri]


# ---------------------------------------------------------------------------------------------
# The tuning job's hooks (jobs/tune.py): nothing changes without --backbone
# ---------------------------------------------------------------------------------------------


def prepare_transfer(spark, args: argparse.Namespace, manifest: dict[str, Any], ship_images=None) -> dict[str, Any] | None:
    """With ``--backbone``: check it, featurize (or reuse), and make the trials heads on features.

    Sets ``args.model_family`` to :data:`HEAD_FAMILY` and ``args.augment`` to 0 (features are
    computed once: there is nothing to augment) and records the backbone's sha256 for the trial
    fingerprint (:func:`fingerprint_fields`).

    Args:
        ship_images: ``() -> data_source`` of the prepared images (:func:`sparktf.jobs.tune.ship_data`),
            called only when a trial fine-tunes the backbone (``fine_tune_layers`` > 0).

    Returns:
        None without a backbone; else ``{backbone, features_uri, featurized, images, feature_dim, data_source}``
        (``data_source`` as :func:`sparktf.jobs.tune.ship_data`'s: broadcast when it fits, else shards;
        ``features_and_images`` when a trial fine-tunes).
    """
    if not args.backbone:
        return None
    if not args.models_uri or not args.features_uri:
        raise ValueError("--backbone needs --models-uri (the registry holding it) and --features-uri (where features are kept)")
    problems = knobs.head_problems({"backbone": args.backbone, "fine_tune_layers": args.fine_tune_layers, "search_strategy": args.search_strategy})
    if problems:
        raise ValueError("; ".join(problems))
    backbone = backbones.check_backbone(args.models_uri, args.backbone)
    features_uri, found, featurized = featurize(
        spark,
        prepared_uri=args.prepared_uri,
        manifest=manifest,
        backbone=backbone,
        features_root=args.features_uri,
        batch_size=args.featurize_batch_size,
    )
    log.info(
        "backbone %s v%s: %d images featurized now, %d features each at %s",
        backbone["name"],
        backbone["version"],
        featurized,
        found["feature_dim"],
        features_uri,
    )
    args.model_family, args.augment, args.backbone_sha256 = HEAD_FAMILY, 0.0, backbone["model_sha256"]
    size_mb = features_size_bytes(found) / 1e6
    if size_mb <= args.broadcast_max_mb:
        data_source: tuple[str, Any] = ("broadcast", spark.sparkContext.broadcast(load_features(features_uri, found)))
    else:
        data_source = ("feature_shards", (features_uri, found))
    log.info("features %.1f MB: %s to executors", size_mb, data_source[0])
    if any(getattr(args, "fine_tune_layers", None) or []) and ship_images is not None:
        reference = {k: backbone[k] for k in ("name", "version", "model_uri", "model_sha256")}
        data_source = ("features_and_images", (data_source, ship_images(), reference))
    return {
        "backbone": backbone,
        "features_uri": features_uri,
        "featurized": featurized,
        "images": found["images"],
        "feature_dim": found["feature_dim"],
        "data_source": data_source,
    }


def fingerprint_fields(args: argparse.Namespace) -> dict[str, Any]:
    """What a backbone adds to a trial's fingerprint (nothing without one: from-scratch ids stay)."""
    sha = getattr(args, "backbone_sha256", None)
    return {"backbone_sha256": sha} if sha else {}


def results_fields(transfer: dict[str, Any] | None) -> dict[str, Any]:
    """What a backbone run adds to ``results.json`` (what the export composes its model from)."""
    if transfer is None:
        return {}
    features = {k: transfer[k] for k in ("features_uri", "featurized", "images", "feature_dim")}
    return {"backbone": transfer["backbone"], "features": {**features, "reused": transfer["featurized"] == 0}}


def summary_fields(transfer: dict[str, Any] | None) -> dict[str, Any]:
    """What a backbone run adds to the job's XCom result: the backbone and how many images were featurized now."""
    if transfer is None:
        return {}
    backbone = transfer["backbone"]
    return {
        "backbone": f"{backbone['name']}@{backbone['version']}",
        "featurized": transfer["featurized"],
        "features_reused": transfer["featurized"] == 0,
        "features_uri": transfer["features_uri"],
    }
