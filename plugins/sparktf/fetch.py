"""Fetch + decode: the one bounded pool of concurrent GETs and image decodes, for data
preparation and batch inference alike.

Objects are read through :mod:`sparktf.storage` (retries with backoff, body included) and decoded
with :func:`sparktf.images.decode_image`. Results come back in input order, with at most
``window`` objects in flight or waiting, so memory stays bounded whatever the number of keys.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sparktf import storage

DETAIL_CHARS = 300


def fetch_decoded(
    bucket: str,
    keys: Iterable[str],
    *,
    height: int,
    width: int,
    channels: int,
    max_pixels: int,
    fetch_threads: int = 16,
    window: int | None = None,
    s3=None,
    sizes: Mapping[str, int] | None = None,
    max_bytes: int | None = None,
    resize_policy: str = "resize",
) -> Iterator[tuple[str, Any, str | None, str | None]]:
    """Fetch and decode objects concurrently; yield ``(key, array | None, reason, detail)`` in key order.

    ``resize_policy`` is :func:`sparktf.images.decode_image`'s (``resize`` for digits, the
    default; ``center_crop`` for photos).

    An image that cannot be used gets :class:`sparktf.images.ImageRejected`'s reason; an object
    that vanished after it was listed gets ``missing``; one the store refuses to serve (e.g.
    access denied on that key) gets ``unreadable``. With ``max_bytes``, an object whose listed size
    (``sizes``) is larger gets ``too_large`` without being fetched (and so does one that grew
    past it after listing).

    Raises:
        storage.TransientStorageError: an object stayed unreadable through every retry. That is
            the store's problem, not the image's: the task fails (and Spark retries it) rather
            than setting a good image aside.
        storage.CallerRefused: the store refused the caller (expired credentials, a rejected
            signature, a KMS denial): every image would be "unreadable", so the task fails.
    """
    s3 = s3 or storage.client()
    threads = max(1, int(fetch_threads))
    window = max(threads, int(window or threads * 4))
    decode = {"height": height, "width": width, "channels": channels, "max_pixels": max_pixels, "resize_policy": resize_policy}

    def work(key: str):
        return _fetch_one(bucket, key, s3, listed=(sizes or {}).get(key), max_bytes=max_bytes, decode=decode)

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


def _fetch_one(
    bucket: str, key: str, s3, *, listed: int | None, max_bytes: int | None, decode: dict[str, Any]
) -> tuple[str, Any, str | None, str | None]:
    """Fetch and decode one object: ``(key, array | None, reason, detail)`` (see :func:`fetch_decoded`)."""
    from sparktf.images import ImageRejected, decode_image

    if max_bytes is not None and listed is not None and listed > max_bytes:
        return key, None, "too_large", f"{listed} bytes listed, over the {max_bytes}-byte cap (not fetched)"
    try:
        data = storage.read_bytes(storage.object_uri(bucket, key), s3)
    except storage.ObjectNotFound:
        return key, None, "missing", "listed, then gone before it was read"
    except (storage.TransientStorageError, storage.CallerRefused):
        raise  # the store's or the caller's trouble, never the image's
    except Exception as err:  # noqa: BLE001 - the store refused this one object
        return key, None, "unreadable", f"{type(err).__name__}: {err}"[:DETAIL_CHARS]
    if max_bytes is not None and len(data) > max_bytes:
        return key, None, "too_large", f"{len(data)} bytes, over the {max_bytes}-byte cap"
    try:
        return key, decode_image(data, **decode), None, None
    except ImageRejected as rejected:
        return key, None, rejected.reason, rejected.detail[:DETAIL_CHARS]
    except Exception as err:  # noqa: BLE001 - a decoder bug is this image's problem only
        return key, None, "corrupt", f"{type(err).__name__}: {err}"[:DETAIL_CHARS]
