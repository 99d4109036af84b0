"""Test and benchmark harness: one place for the local S3 server, a local Spark, ports and waits,
landing MNIST and images, and registering a small model.

Used by the pytest fixtures (``tests/conftest.py``), the benchmarks (``bench/``) and the embedded
stack's scripts. Part of the development package ``sparktf_dev``, never of the library. Everything
listens on 127.0.0.1 only. The repository (for ``data/demo``, ``dags/`` and ``scripts/``) is
``$SPARKTF_REPO`` when set, else the checkout this file sits in.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparktf import storage

ROOT = Path(os.environ.get("SPARKTF_REPO") or Path(__file__).resolve().parents[2])  # devtools/sparktf_dev/ in a checkout
DEMO_MNIST_DIR = ROOT / "data" / "demo" / "mnist"
# The local S3 server accepts any key pair: placeholders, not secrets.
TEST_ACCESS_KEY = "local-access-key"
TEST_SECRET_KEY = "local-secret-key"
LABEL_NAMES = [str(d) for d in range(10)]
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# ---------------------------------------------------------------------------------------------
# Ports, waits, processes
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 30.0, interval: float = 0.2, process: subprocess.Popen | None = None) -> None:
    """Poll ``ready()`` until it is true, with a deadline (never sleep and hope).

    Raises:
        RuntimeError: if ``process`` exits first. TimeoutError: at the deadline.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited early (code {process.returncode})")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready within {timeout} s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its children; SIGKILL if needed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# S3 server and local Spark
# ---------------------------------------------------------------------------------------------


class S3Server:
    """A moto S3 server on 127.0.0.1; a context manager.

    On start it makes the standard AWS variables point at it (inherited by Spark's Python workers
    and subprocesses) and makes it this process's storage default.
    """

    def __init__(self, port: int | None = None, log_path: str | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(tempfile.gettempdir(), f"sparktf-moto-{self.port}.log")
        self.process: subprocess.Popen | None = None

    def is_up(self) -> bool:
        try:
            return http_ok(self.endpoint + "/moto-api/")
        except OSError:
            return False

    def start(self, *, set_environment: bool = True) -> S3Server:
        server = Path(sys.executable).with_name("moto_server")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log, start_new_session=True)
        try:
            wait_until(self.is_up, f"S3 server at {self.endpoint}", 30, process=self.process)
        except Exception:
            self.stop()
            raise
        if set_environment:
            os.environ.update(self.settings().environment())
            storage.configure(self.settings())
        return self

    def settings(self) -> storage.StorageSettings:
        return storage.StorageSettings(
            endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY
        )

    def connection_json(self) -> str:
        """The ``aws_default`` connection (as ``AIRFLOW_CONN_AWS_DEFAULT``) for this server."""
        return json.dumps(
            {
                "conn_type": "aws",
                "login": TEST_ACCESS_KEY,
                "password": TEST_SECRET_KEY,
                "extra": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            }
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def local_spark(slots: int = 2, app_name: str = "sparktf-local", conf: dict[str, str] | None = None):
    """A local SparkSession with ``slots`` task slots, UI off, no task retries, on loopback."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    from sparktf.job import quiet_py4j

    quiet_py4j()
    builder = (
        SparkSession.builder.master(f"local[{int(slots)}]")
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", str(max(2, 2 * slots)))
        .config("spark.python.worker.reuse", "true")
        .config("spark.task.maxFailures", "1")
        .config("spark.ui.showConsoleProgress", "false")
    )
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------


def read_mnist(source: Path = DEMO_MNIST_DIR) -> tuple[Any, Any, Any, Any]:
    """``(train_x, train_y, test_x, test_y)`` uint8 arrays from a folder of MNIST ``.gz`` IDX files."""
    from sparktf import idx

    def load(name: str):
        path = Path(source) / f"{name}.gz"
        if not path.exists():
            raise FileNotFoundError(f"MNIST IDX file {path} not found")
        return idx.parse_idx(gzip.decompress(path.read_bytes()))

    (train_images, train_labels), (test_images, test_labels) = MNIST_FILES["train"], MNIST_FILES["t10k"]
    return load(train_images), load(train_labels), load(test_images), load(test_labels)


def upload_mnist(prefix: str, arrays: tuple[Any, Any, Any, Any], *, train_limit: int | None = None, test_limit: int | None = None) -> dict[str, int]:
    """Upload MNIST arrays as gzipped IDX pairs (``train-*`` and ``t10k-*``) under ``prefix``.

    Returns:
        Images uploaded per pair, ``{"train": n, "t10k": m}``.
    """
    from sparktf import idx

    train_x, train_y, test_x, test_y = arrays
    counts = {}
    for stem, (x, y), limit in (("train", (train_x, train_y), train_limit), ("t10k", (test_x, test_y), test_limit)):
        x, y = x[:limit], y[:limit]
        images_name, labels_name = MNIST_FILES[stem]
        storage.write_bytes(storage.join_uri(prefix, images_name + ".gz"), gzip.compress(idx.encode_idx(x), 1))
        storage.write_bytes(storage.join_uri(prefix, labels_name + ".gz"), gzip.compress(idx.encode_idx(y), 1))
        counts[stem] = len(y)
    return counts


def upload_files(local_dir: Path, prefix: str, suffix: str = "") -> list[str]:
    """Upload the files of a folder (not recursive) whose names end with ``suffix``; their URIs."""
    written = []
    for path in sorted(Path(local_dir).iterdir()):
        if path.is_file() and path.name.endswith(suffix):
            uri = storage.join_uri(prefix, path.name)
            storage.write_bytes(uri, path.read_bytes())
            written.append(uri)
    return written


# ---------------------------------------------------------------------------------------------
# A small registered model
# ---------------------------------------------------------------------------------------------

_TRAINED: dict[str, dict] = {}


def train_tiny_model(work_uri: str, mnist: tuple[Any, Any, Any, Any]) -> dict:
    """Train a small ``mlp`` on 2,000 digits (a few seconds) with the tuning job's own trial code;
    the trial record (trained once per process)."""
    if "record" not in _TRAINED:
        import numpy as np

        from sparktf import trials

        train_x, train_y, test_x, test_y = mnist
        data = {
            "x_train": train_x[:2000, :, :, None],
            "y_train": train_y[:2000].astype(np.int32),
            "x_val": train_x[2000:2500, :, :, None],
            "y_val": train_y[2000:2500].astype(np.int32),
            "x_test": test_x[:500, :, :, None],
            "y_test": test_y[:500].astype(np.int32),
            "input_shape": (28, 28, 1),
            "num_classes": 10,
        }
        trial = {
            "trial_id": "tiny-mlp",
            "params": {"learning_rate": 0.003, "hidden_units": 64, "batch_size": 64, "dropout": 0.1, "optimizer": "adam"},
        }
        record = trials.train_trial(trial, data, family="mlp", epochs=3, patience=3, trials_uri=storage.join_uri(work_uri, "trials"), seed=7)
        if record["status"] != "ok":
            raise RuntimeError(f"the tiny model did not train: {record}")
        _TRAINED["record"] = record
    return _TRAINED["record"]


def register_trial(models_uri: str, name: str, record: dict, *, version: int | None = None, champion: bool = True) -> dict:
    """Register a trained trial's ``.keras`` file as a version of ``name`` (optionally champion)."""
    from sparktf import registry

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        sha = storage.download_file(record["model_uri"], path)
        if sha != record["model_sha256"]:
            raise ValueError(f"{record['model_uri']} does not match its trial record")
        metadata = registry.write_version(
            models_uri,
            name,
            model_path=path,
            version=version,
            metadata={
                "family": record["family"],
                "params": record["params"],
                "trial_id": record["trial_id"],
                "metrics": {k: record[k] for k in ("val_accuracy", "val_loss", "test_accuracy", "test_loss")},
                "input_shape": [28, 28, 1],
                "label_names": LABEL_NAMES,
            },
        )
    if champion:
        registry.set_champion(models_uri, name, registry.champion_pointer(metadata))
    return metadata


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def encode(img, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def image_variant(digit, n: int) -> tuple[bytes, str]:
    """One of many (mode, size, format) encodings of a digit, and the file extension to use."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(digit)
    variants = [
        lambda: (encode(img, "PNG"), ".png"),  # L, PNG
        lambda: (encode(img.convert("RGB"), "JPEG", quality=95), ".jpg"),  # RGB, JPEG
        lambda: (encode(Image.fromarray(np.stack([digit] * 4, axis=2), "RGBA"), "PNG"), ".png"),  # RGBA
        lambda: (encode(img.convert("P"), "GIF"), ".gif"),  # P, GIF
        lambda: (encode(Image.fromarray(digit.astype(np.uint16) * 257), "TIFF"), ".tif"),  # I;16, TIFF
        lambda: (encode(img.convert("1"), "BMP"), ".bmp"),  # 1, BMP
        lambda: (encode(img.convert("RGB"), "WEBP", lossless=True), ".webp"),  # RGB, WEBP
        lambda: (encode(img.resize((84, 84), Image.Resampling.BILINEAR), "PNG"), ".png"),  # larger
        lambda: (encode(img.resize((112, 70), Image.Resampling.BILINEAR).convert("RGB"), "TIFF"), ".tiff"),
        lambda: (encode(img, "PNG"), ".jpg"),  # PNG named .jpg
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


def bad_files(digit) -> dict[str, tuple[bytes, set[str]]]:
    """Relative name -> (bytes, acceptable reasons) for files that must be set aside."""
    import numpy as np
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
        "données/çassé ü.jpg": (b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)), {"corrupt", "truncated", "not_an_image"}),
    }


def valid_name(n: int, ext: str) -> str:
    """Nested folders, spaces and non-ASCII characters in some of the names."""
    if n % 7 == 3:
        return f"scans/numéro {n:03d} – été{ext}"  # noqa: RUF001 - the en dash is one of the non-ASCII characters
    if n % 7 == 5:
        return f"相机/数字_{n:03d}{ext}"
    return f"cam-{n % 3}/batch {n // 10}/img_{n:03d}{ext}"


def land_partition(incoming_uri: str, date: str, images, labels, *, with_bad: bool = True) -> dict[str, dict]:
    """Upload images (in many encodings) plus, optionally, bad files under ``<incoming>/<date>/``.

    Returns:
        key -> ``{"bytes", "label"}`` for valid images, ``{"bytes", "reasons"}`` for bad ones.
    """
    prefix = storage.join_uri(incoming_uri, date)
    landed: dict[str, dict] = {}
    for n, (digit, label) in enumerate(zip(images, labels)):
        data, ext = image_variant(digit, n)
        uri = storage.join_uri(prefix, valid_name(n, ext))
        storage.write_bytes(uri, data)
        landed[storage.parse_uri(uri).key] = {"bytes": data, "label": str(int(label))}
    if with_bad:
        for name, (data, reasons) in bad_files(images[0]).items():
            uri = storage.join_uri(prefix, name)
            storage.write_bytes(uri, data)
            landed[storage.parse_uri(uri).key] = {"bytes": data, "reasons": reasons}
    return landed


# ---------------------------------------------------------------------------------------------
# Photos and stock networks (no pretrained weights can be downloaded: tests make their own)
# ---------------------------------------------------------------------------------------------


def photo(seed: int, width: int, height: int):
    """A synthetic RGB photo (a PIL image): a colour gradient, a few filled shapes and grain,
    different for every seed, so that a network gives every photo its own scores."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(width // 8, width // 2 + 2)), y0 + int(rng.integers(height // 8, height // 2 + 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    grain = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + grain, 0, 255).astype(np.uint8), "RGB")


def exif_rotated_jpeg(img, orientation: int = 6) -> bytes:
    """A JPEG whose pixels are stored sideways with an EXIF Orientation tag (as phones write them)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def photo_files() -> dict[str, tuple[bytes, str]]:
    """Relative name -> (bytes, what it exercises): JPEG and PNG among others, 100x80 to 1600x1200,
    alpha, palette, CMYK, 16-bit, EXIF-rotated, and a PNG named ``.jpg``."""
    import numpy as np
    from PIL import Image

    rgba = photo(4, 400, 300).convert("RGBA")
    alpha = np.zeros((300, 400), dtype=np.uint8)
    alpha[60:240, 80:320] = 255  # an opaque cut-out on a transparent page
    rgba.putalpha(Image.fromarray(alpha, "L"))
    gray16 = (np.asarray(photo(7, 300, 200).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "trip/landscape 1600x1200.jpg": (encode(photo(1, 1600, 1200), "JPEG", quality=92), "JPEG 1600x1200"),
        "trip/portrait.jpg": (encode(photo(2, 480, 640), "JPEG", quality=85), "JPEG portrait 480x640"),
        "tiny/small.png": (encode(photo(3, 100, 80), "PNG"), "PNG 100x80"),
        "shop/cut-out.png": (encode(rgba, "PNG"), "RGBA PNG with transparency"),
        "print/cmyk.jpg": (encode(photo(5, 640, 480).convert("CMYK"), "JPEG", quality=90), "CMYK JPEG"),
        "web/palette.png": (
            encode(photo(6, 320, 240).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0),
            "palette PNG with a transparent index",
        ),
        "scans/gray16.png": (encode(Image.fromarray(gray16), "PNG"), "16-bit grayscale PNG"),
        "phone/IMG_0001.jpg": (exif_rotated_jpeg(photo(8, 800, 600)), "JPEG with EXIF orientation 6"),
        "web/photo.webp": (encode(photo(9, 500, 500), "WEBP", quality=90), "WEBP 500x500"),
        "misnamed/really-a-png.jpg": (encode(photo(10, 256, 256), "PNG"), "PNG named .jpg"),
    }


def bad_photo_files() -> dict[str, tuple[bytes, set[str]]]:
    """Relative name -> (bytes, acceptable reasons) for files among photos that must be set aside."""
    jpeg = encode(photo(11, 640, 480), "JPEG", quality=90)
    return {
        "broken/cut-short.jpg": (jpeg[: len(jpeg) // 3], {"truncated", "corrupt"}),
        "broken/empty.jpg": (b"", {"empty"}),
        "broken/notes.txt": (b"holiday list: sunscreen, snorkel\n", {"not_an_image"}),
        "broken/bomb.png": (png_bomb(), {"too_large"}),
    }


def land_photos(incoming_uri: str, date: str, *, with_bad: bool = True) -> dict[str, dict]:
    """Upload :func:`photo_files` (and :func:`bad_photo_files`) under ``<incoming>/<date>/``.

    Returns:
        key -> ``{"bytes", "kind"}`` for photos, ``{"bytes", "reasons"}`` for bad files.
    """
    prefix = storage.join_uri(incoming_uri, date)
    landed: dict[str, dict] = {}
    for name, (data, kind) in photo_files().items():
        uri = storage.join_uri(prefix, name)
        storage.write_bytes(uri, data)
        landed[storage.parse_uri(uri).key] = {"bytes": data, "kind": kind}
    if with_bad:
        for name, (data, reasons) in bad_photo_files().items():
            uri = storage.join_uri(prefix, name)
            storage.write_bytes(uri, data)
            landed[storage.parse_uri(uri).key] = {"bytes": data, "reasons": reasons}
    return landed


def application_weights(name: str, path: str, *, seed: int = 0, sharpen: float = 1.0) -> str:
    """Save weights that fit ``keras.applications.<name>(weights=None)`` to ``path`` (a
    ``.weights.h5`` file), as a user would save the ImageNet ones.

    An untrained network with fresh batch-norm statistics maps every photo to almost the same
    scores, which would make the top 5 a matter of rounding. So the seeded initial weights are
    calibrated first: one forward pass in training mode over a few synthetic photos with momentum 0
    sets every batch-norm layer's statistics to what the photos produce (as training would), and
    the classifier's kernel is multiplied by ``sharpen``. Each photo then gets its own, clearly
    ranked classes.
    """
    import keras
    import numpy as np

    from sparktf.applications import application

    spec = application(name)
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, spec.name)(weights=None)
    side = spec.size
    batch = np.stack([np.asarray(photo(1000 + i, side, side), dtype=np.float32) for i in range(8)])
    if spec.preprocessing == "inception":
        batch = batch / 127.5 - 1.0
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(batch, training=True)
    for layer in norms:
        layer.momentum = 0.99
    classifier = next(layer for layer in reversed(model.layers) if getattr(layer, "kernel", None) is not None)
    classifier.kernel.assign(classifier.kernel * sharpen)
    model.save_weights(path)
    return path


# ---------------------------------------------------------------------------------------------
# Jobs and DAG runs
# ---------------------------------------------------------------------------------------------


def prepare(spark, input_uri: str, output_uri: str, *extra_args: str) -> dict[str, Any]:
    """Run the prepare_data job's ``run`` on ``input_uri``; returns the job result."""
    from sparktf.jobs import prepare_data

    args = prepare_data.parse_args(["--input-uri", input_uri, "--output-uri", output_uri, *extra_args])
    return prepare_data.run(spark, args)


def run_dag(
    env: dict[str, str],
    out_dir: Path,
    dag_id: str,
    conf: dict | None = None,
    logical_date: str | None = None,
    timeout: int = 1200,
    run_after: str | None = None,
) -> tuple[int, dict | None, str]:
    """Run a DAG with ``scripts/run_dag.py``; returns (exit code, summary or None, combined output)."""
    out_file = Path(out_dir) / f"{dag_id}-summary.json"
    command = [sys.executable, str(ROOT / "scripts" / "run_dag.py"), dag_id, "--conf", json.dumps(conf or {}), "--json-out", str(out_file)]
    if logical_date:
        command += ["--logical-date", logical_date]
    if run_after:  # the same run_after is the same run (its run id), run again
        command += ["--run-after", run_after]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    summary = json.loads(out_file.read_text()) if out_file.exists() else None
    return proc.returncode, summary, proc.stdout + proc.stderr


def asset_events(env: dict[str, str], asset_name: str) -> list[dict]:
    """The extras of every event of an Asset in the metadata DB of ``env`` (read in a subprocess)."""
    query = (
        "import json\n"
        "from airflow.models.asset import AssetEvent, AssetModel\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    rows = s.query(AssetModel.name, AssetEvent.extra).join(AssetModel, AssetEvent.asset_id == AssetModel.id)\n"
        "    print(json.dumps([[n, e] for n, e in rows.all()], default=str))\n"
    )
    out = subprocess.run([sys.executable, "-c", query], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"reading Asset events failed: {out.stderr[-2000:]}")
    return [extra for name, extra in json.loads(out.stdout.strip().splitlines()[-1]) if name == asset_name]


def batch_inference_argv(
    ws: str, date: str, *extra: str, models_uri: str | None = None, model_name: str = "digits", processed_at: str = "2026-11-21T02:30:00+00:00"
) -> list[str]:
    """The batch_inference job's command line for a workspace ``ws`` (incoming/, predictions/, models/) and a date."""
    return [
        "--incoming-uri",
        ws + "/incoming/",
        "--output-uri",
        ws + "/predictions/",
        "--date",
        date,
        "--models-uri",
        models_uri or ws + "/models/",
        "--model-name",
        model_name,
        "--processed-at",
        processed_at,
        *extra,
    ]


# ---------------------------------------------------------------------------------------------
# DAG tests: parse, Params, rendering (no metadata DB)
# ---------------------------------------------------------------------------------------------


def load_dag(dag_id: str, dags_dir: Path | None = None):
    """Parse ``dags/<dag_id>.py`` alone (no metadata DB: ``DagBag.get_dag`` would query it)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(dags_dir or ROOT / "dags") / f"{dag_id}.py"))
    if bag.import_errors:
        raise AssertionError(f"{dag_id} does not parse: {bag.import_errors}")
    return bag.dags[dag_id]


def crash_test_env(crash_match: str) -> dict[str, str]:
    """The environment of a spark-submit test whose matching trial kills its own Python worker
    (``sparktf.trials.CRASH_TEST_ENV``; test-only): this interpreter for the workers, the package on the path."""
    import sparktf
    from sparktf import trials

    plugins = str(Path(sparktf.__file__).resolve().parents[1])
    return {
        **os.environ,
        trials.CRASH_TEST_ENV: crash_match,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(p for p in (plugins, os.environ.get("PYTHONPATH")) if p),
    }


# Tasks a default run skips: no person's approval asked (promotion auto), no MLflow configured.
SKIPPED_BY_DEFAULT = frozenset({"approve_promotion", "promote_approved", "mlflow"})


def not_green(summary: dict[str, Any]) -> dict[str, str]:
    """The tasks of a :func:`run_dag` summary that did not succeed, but for those a default run skips."""
    states = {task: info["state"] for task, info in summary["tasks"].items()}
    return {task: state for task, state in states.items() if state != "success" and not (task in SKIPPED_BY_DEFAULT and state == "skipped")}


def params_with(dag, change: dict[str, Any]):
    """The DAG's Params with some values changed, as a ParamsDict to ``validate()`` (what a trigger checks)."""
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamsDict

    values = {key: change.get(key, dag.params[key]) for key in dag.params}
    return ParamsDict({key: Param(value, **dag.params.get_param(key).schema) for key, value in values.items()})


def rendered_task(
    dag,
    task_id: str,
    conf: dict[str, Any] | None = None,
    *,
    xcoms: dict[tuple[str, str], Any] | None = None,
    run_id: str = "manual__2026-11-24T10:00:00+00:00",
    run_after: str = "2026-11-24T10:00:00+00:00",
):
    """A copy of a task with its templated fields rendered by Airflow, in the context of a manual run.

    The context is Airflow's own (``RuntimeTaskInstance.get_template_context`` of a run triggered
    with ``conf``: Params validated and merged as on a real trigger, the DAG's filters); only the
    XComs come from ``xcoms`` (``(task_id, key) -> value``) instead of the API server.
    """
    import copy
    import uuid

    import pendulum
    from airflow.sdk.api.datamodels._generated import DagRun, TIRunContext
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    pulled = dict(xcoms or {})

    class OfflineTaskInstance(RuntimeTaskInstance):
        def xcom_pull(self, task_ids=None, dag_id=None, key="return_value", **_kwargs):
            return pulled.get((task_ids, key))

    when = pendulum.parse(run_after)
    run = DagRun(
        dag_id=dag.dag_id,
        run_id=run_id,
        logical_date=when,
        data_interval_start=when,
        data_interval_end=when,
        run_after=when,
        start_date=when,
        end_date=None,
        run_type="manual",
        state="running",
        conf=conf or {},
        consumed_asset_events=[],
        partition_key=None,
    )
    # Copies: merging a run's conf into the Params updates the DAG's and the task's Param objects in place.
    task = copy.copy(dag.get_task(task_id))
    task.params = copy.deepcopy(task.params)
    ti = OfflineTaskInstance.model_construct(
        id=uuid.uuid4(),
        task_id=task_id,
        dag_id=dag.dag_id,
        run_id=run_id,
        try_number=1,
        map_index=-1,
        dag_version_id=uuid.uuid4(),
        task=task,
        start_date=when,
        max_tries=task.retries,
        _ti_context_from_server=TIRunContext(dag_run=run, max_tries=task.retries),
    )
    original_params = dag.params
    dag.params = copy.deepcopy(original_params)
    try:
        task.render_template_fields(ti.get_template_context())
    finally:
        dag.params = original_params
    return task
