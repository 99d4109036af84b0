"""Object storage: the one way this package reads and writes objects.

Everything goes through boto3 against any S3-compatible endpoint. Credentials and endpoint come
from the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
profiles, instance roles). Spark's s3a connector is not used: executors read and write objects
themselves, which works on any Spark deployment without extra jars.

boto3 clients are not fork-safe, so :func:`s3_client` keeps one client per process id.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator

_CLIENTS: dict[tuple[int, str | None], Any] = {}
_CLIENTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key (or key prefix)."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, *parts: str) -> "S3Location":
        """Append path parts, with exactly one slash between them."""
        key = self.key.rstrip("/")
        for part in parts:
            part = part.strip("/")
            if part:
                key = f"{key}/{part}" if key else part
        return S3Location(self.bucket, key)

    def as_prefix(self) -> "S3Location":
        """The same location with a trailing slash, for listing a folder."""
        return S3Location(self.bucket, self.key.rstrip("/") + "/" if self.key else "")


def parse_uri(uri: str) -> S3Location:
    """Parse ``s3://bucket/key`` (``s3a://`` is accepted too) into an :class:`S3Location`.

    Raises:
        ValueError: if the URI is not an S3 URI or has no bucket.
    """
    for scheme in ("s3://", "s3a://"):
        if uri.startswith(scheme):
            rest = uri[len(scheme):]
            bucket, _, key = rest.partition("/")
            if not bucket:
                break
            return S3Location(bucket, key)
    raise ValueError(f"not an S3 URI (expected s3://bucket/key): {uri!r}")


def join_uri(uri: str, *parts: str) -> str:
    """Join path parts onto an S3 URI."""
    return parse_uri(uri).join(*parts).uri


def s3_client(endpoint_url: str | None = None):
    """Return this process's boto3 S3 client (created on first use, one per pid).

    Args:
        endpoint_url: overrides ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` for this client.
    """
    key = (os.getpid(), endpoint_url)
    client = _CLIENTS.get(key)
    if client is None:
        with _CLIENTS_LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    retries={"max_attempts": 5, "mode": "standard"},
                    max_pool_connections=64,
                    # Path-style addressing works with MinIO, moto and AWS alike.
                    s3={"addressing_style": "path"},
                )
                session = boto3.session.Session()
                client = session.client("s3", endpoint_url=endpoint_url, config=config)
                _CLIENTS[key] = client
    return client


def read_bytes(uri: str, client=None) -> bytes:
    """Read a whole object."""
    loc = parse_uri(uri)
    client = client or s3_client()
    return client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()


def write_bytes(uri: str, data: bytes, client=None, content_type: str | None = None) -> None:
    """Write a whole object (a single PUT: readers see the old or the new object, never a mix)."""
    loc = parse_uri(uri)
    client = client or s3_client()
    extra = {"ContentType": content_type} if content_type else {}
    client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **extra)


def read_json(uri: str, client=None) -> Any:
    return json.loads(read_bytes(uri, client).decode("utf-8"))


def write_json(uri: str, value: Any, client=None) -> None:
    data = json.dumps(value, indent=2, sort_keys=True, default=str).encode("utf-8")
    write_bytes(uri, data, client, content_type="application/json")


def exists(uri: str, client=None) -> bool:
    """True if the object exists."""
    from botocore.exceptions import ClientError

    loc = parse_uri(uri)
    client = client or s3_client()
    try:
        client.head_object(Bucket=loc.bucket, Key=loc.key)
        return True
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def read_json_if_exists(uri: str, client=None) -> Any | None:
    """The parsed JSON object, or None when it does not exist."""
    from botocore.exceptions import ClientError

    try:
        return read_json(uri, client)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def iter_objects(prefix_uri: str, client=None) -> Iterator[dict]:
    """Yield ``{"key", "size", "etag"}`` for every object under a prefix (recursively)."""
    loc = parse_uri(prefix_uri)
    client = client or s3_client()
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
        for obj in page.get("Contents", []):
            yield {"key": obj["Key"], "size": obj["Size"], "etag": obj.get("ETag", "").strip('"')}


def list_keys(prefix_uri: str, client=None) -> list[str]:
    """Sorted keys of every object under a prefix."""
    return sorted(obj["key"] for obj in iter_objects(prefix_uri, client))


def delete_prefix(prefix_uri: str, client=None) -> int:
    """Delete every object under a prefix; returns how many were deleted."""
    loc = parse_uri(prefix_uri)
    client = client or s3_client()
    keys = list_keys(prefix_uri, client)
    for start in range(0, len(keys), 1000):
        batch = keys[start:start + 1000]
        client.delete_objects(
            Bucket=loc.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
        )
    return len(keys)


def copy_object(src_uri: str, dst_uri: str, client=None) -> None:
    """Server-side copy of one object."""
    src, dst = parse_uri(src_uri), parse_uri(dst_uri)
    client = client or s3_client()
    client.copy_object(Bucket=dst.bucket, Key=dst.key, CopySource={"Bucket": src.bucket, "Key": src.key})


def upload_dir(local_dir: str, prefix_uri: str, client=None) -> list[str]:
    """Upload every file of a local directory tree under a prefix; returns the URIs written."""
    written = []
    for root, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            uri = join_uri(prefix_uri, rel)
            with open(path, "rb") as fh:
                write_bytes(uri, fh.read(), client)
            written.append(uri)
    return written


def download_prefix(prefix_uri: str, local_dir: str, client=None) -> None:
    """Download every object under a prefix into a local directory, keeping relative paths."""
    loc = parse_uri(prefix_uri).as_prefix()
    client = client or s3_client()
    for key in list_keys(loc.uri, client):
        rel = key[len(loc.key):]
        path = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(client.get_object(Bucket=loc.bucket, Key=key)["Body"].read())


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
