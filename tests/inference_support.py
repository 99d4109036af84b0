"""Helpers for the inference tests: a tiny registered model and image partitions of every kind.

The model is trained once per test process (``sparktf.trials.train_trial``, the tuning job's own
trial code, on the shipped demo digits) and registered with the registry's layout: the
``.keras`` file, ``metadata.json`` (with ``model_sha256``, ``input_shape``, ``label_names``) and
``champion.json``.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from sparktf import registry, storage

LABEL_NAMES = [str(d) for d in range(10)]
_TRAINED: dict[str, dict] = {}


def train_tiny_model(work_uri: str, mnist_subset) -> dict:
    """Train a small ``mlp`` on 2,000 demo digits (a few seconds); the trial record (once per process)."""
    if "record" not in _TRAINED:
        from sparktf import trials

        train_x, train_y, test_x, test_y = mnist_subset
        data = {
            "x_train": train_x[:2000, :, :, None], "y_train": train_y[:2000].astype(np.int32),
            "x_val": train_x[2000:2500, :, :, None], "y_val": train_y[2000:2500].astype(np.int32),
            "x_test": test_x[:500, :, :, None], "y_test": test_y[:500].astype(np.int32),
            "input_shape": (28, 28, 1), "num_classes": 10,
        }
        trial = {"trial_id": "tiny-mlp", "params": {"learning_rate": 0.003, "hidden_units": 64, "batch_size": 64,
                                                    "dropout": 0.1, "optimizer": "adam"}}
        record = trials.train_trial(trial, data, family="mlp", epochs=3, patience=3,
                                    trials_uri=storage.join_uri(work_uri, "trials"), seed=7)
        assert record["status"] == "ok", record
        _TRAINED["record"] = record
    return _TRAINED["record"]


def register_model(models_uri: str, name: str, record: dict, version: int = 1, champion: bool = True) -> dict:
    """Register a trained trial as ``version`` (the layout export_model writes), optionally champion."""
    base = registry.version_uri(models_uri, name, version)
    model_uri = storage.join_uri(base, "model.keras")
    storage.copy_object(record["model_uri"], model_uri)
    metadata = {
        "name": name, "version": version, "uri": base + "/", "model_uri": model_uri,
        "model_sha256": record["model_sha256"], "family": record["family"], "params": record["params"],
        "trial_id": record["trial_id"],
        "metrics": {k: record[k] for k in ("val_accuracy", "val_loss", "test_accuracy", "test_loss")},
        "input_shape": [28, 28, 1], "label_names": LABEL_NAMES,
    }
    storage.write_json(storage.join_uri(base, "metadata.json"), metadata)
    if champion:
        registry.set_champion(models_uri, name, {"name": name, "version": version, "model_uri": model_uri,
                                                 "model_sha256": record["model_sha256"],
                                                 "metrics": metadata["metrics"]})
    return metadata


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def encode(img, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _variant(digit: np.ndarray, n: int) -> tuple[bytes, str]:
    """One of many (mode, size, format) encodings of a digit, and the file extension to use."""
    from PIL import Image

    img = Image.fromarray(digit)
    variants = [
        lambda: (encode(img, "PNG"), ".png"),                                              # L, PNG
        lambda: (encode(img.convert("RGB"), "JPEG", quality=95), ".jpg"),                  # RGB, JPEG
        lambda: (encode(Image.fromarray(np.stack([digit] * 4, axis=2), "RGBA"), "PNG"), ".png"),  # RGBA
        lambda: (encode(img.convert("P"), "GIF"), ".gif"),                                 # P, GIF
        lambda: (encode(Image.fromarray(digit.astype(np.uint16) * 257), "TIFF"), ".tif"),  # I;16, TIFF
        lambda: (encode(img.convert("1"), "BMP"), ".bmp"),                                 # 1, BMP
        lambda: (encode(img.convert("RGB"), "WEBP", lossless=True), ".webp"),              # RGB, WEBP
        lambda: (encode(img.resize((84, 84), Image.Resampling.BILINEAR), "PNG"), ".png"),  # larger
        lambda: (encode(img.resize((112, 70), Image.Resampling.BILINEAR).convert("RGB"), "TIFF"), ".tiff"),
        lambda: (encode(img, "PNG"), ".jpg"),                                              # PNG named .jpg
    ]
    return variants[n % len(variants)]()


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    from PIL import Image

    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def bad_files(digit: np.ndarray) -> dict[str, tuple[bytes, set[str]]]:
    """Relative name -> (bytes, acceptable reasons) for files that must be set aside."""
    from PIL import Image

    png = encode(Image.fromarray(digit), "PNG")
    rng = np.random.default_rng(3)
    return {
        "broken/truncated.png": (png[: len(png) // 2], {"truncated", "corrupt"}),
        "broken/empty.png": (b"", {"empty"}),
        "broken/random.bin": (bytes(rng.integers(0, 256, 2048, dtype=np.uint8)), {"not_an_image"}),
        "notes.txt": (b"scanner log: 12 pages\n", {"not_an_image"}),
        "error page.html": (b"<html><body>503 Service Unavailable</body></html>", {"not_an_image"}),
        "bomb.png": (png_bomb(), {"too_large"}),
        "looks-like-a-digit.png": (b"<!DOCTYPE html><html>moved</html>", {"not_an_image"}),
        "données/çassé ü.jpg": (b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
                                {"corrupt", "truncated", "not_an_image"}),
    }


def valid_name(n: int, ext: str) -> str:
    """Nested folders, spaces and non-ASCII characters in some of the names."""
    if n % 7 == 3:
        return f"scans/numéro {n:03d} – été{ext}"
    if n % 7 == 5:
        return f"相机/数字_{n:03d}{ext}"
    return f"cam-{n % 3}/batch {n // 10}/img_{n:03d}{ext}"


def land_partition(incoming_uri: str, date: str, images: np.ndarray, labels: np.ndarray, *,
                   with_bad: bool = True, client=None) -> dict[str, dict]:
    """Upload images (in many encodings) plus, optionally, bad files under ``<incoming>/<date>/``.

    Returns:
        key -> ``{"bytes", "label"}`` for valid images, ``{"bytes", "reasons"}`` for bad ones.
    """
    client = client or storage.s3_client()
    prefix = storage.join_uri(incoming_uri, date)
    bucket = storage.parse_uri(prefix).bucket
    landed: dict[str, dict] = {}
    for n, (digit, label) in enumerate(zip(images, labels)):
        data, ext = _variant(digit, n)
        uri = storage.join_uri(prefix, valid_name(n, ext))
        storage.write_bytes(uri, data, client)
        landed[storage.parse_uri(uri).key] = {"bytes": data, "label": str(int(label))}
    if with_bad:
        for name, (data, reasons) in bad_files(images[0]).items():
            uri = storage.join_uri(prefix, name)
            storage.write_bytes(uri, data, client)
            landed[storage.parse_uri(uri).key] = {"bytes": data, "reasons": reasons}
    assert all(k.startswith(storage.parse_uri(prefix).key + "/") for k in landed) and bucket
    return landed
