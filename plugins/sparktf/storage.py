"""Object storage: the one module of this package that talks to S3.

Everything goes through boto3 against any S3-compatible endpoint (AWS, MinIO, moto). Nothing
else in the package creates a client or calls an S3 operation: callers name objects by URI and
get bytes, JSON, listings or a clear error back.

**Settings.** :class:`StorageSettings` holds the endpoint, region and credentials. A process uses
:func:`default_settings` (set once with :func:`configure`, e.g. by the Airflow side from the
``aws_default`` connection), else the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, profiles, instance roles).

**Timeouts and retries, set here once.** Every client has explicit connect and read timeouts and
botocore's standard retry mode for the request. botocore does not retry reading a response body,
so every read here (:func:`read_bytes`, :func:`stream_sha256`, :func:`download_file`) retries the
whole GET with exponential backoff on throttling, 5xx answers, connection resets and truncated
bodies, and raises :class:`TransientStorageError` when the object stays unreadable. A missing
object is never retried: it raises :class:`ObjectNotFound` at once. Nor is an answer that says the
caller, not the object, is wrong (expired or invalid credentials, a rejected signature, a KMS
refusal: :func:`is_caller_refused`): it raises :class:`CallerRefused`, which no caller may take
for a verdict on one object.

**Conditional writes.** :func:`write_bytes` can create only if absent (``If-None-Match: *``) or
replace only the version read before (``If-Match: <etag>``); a lost race raises
:class:`PreconditionFailed`. They are retried like every other call: a resend refused only
because its own first copy landed (the answer was lost) is recognised and counts as done. Before
the first conditional write to a bucket, the process checks that the store keeps the conditions
(:func:`check_conditional_writes`, once per workspace) and refuses to go on, naming the store, if it does not. ETags
are compared normalised (:func:`normal_etag`: weak ``W/"..."`` ETags work like strong ones).

boto3 clients are not fork-safe, so one client is kept per process id (and settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

log = logging.getLogger("sparktf.storage")
T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 60
REQUEST_MAX_ATTEMPTS = 5  # botocore's own retries of one request (status and connection errors)
READ_ATTEMPTS = 5  # whole GETs, body included, before an object counts as unreadable
BACKOFF_BASE_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 5.0
STREAM_CHUNK = 1 << 20

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION_CODES = {"412", "PreconditionFailed"}
# 409 ConditionalRequestConflict: another conditional write to the key was in progress; S3 says to
# send the request again (it is not an answer to the condition).
# Answers that say the caller is wrong, not one object: expired, invalid or refused credentials, a
# signature the store rejects, a disabled account, a missing bucket, a KMS key the caller may not
# use. Every later request fails the same way, so no object may be set aside for them.
_CALLER_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "InvalidToken",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "AuthorizationHeaderMalformed",
        "AuthorizationQueryParametersError",
        "MissingSecurityHeader",
        "InvalidSecurity",
        "RequestExpired",
        "AccountProblem",
        "AllAccessDisabled",
        "NotSignedUp",
        "NoSuchBucket",
        "InvalidBucketName",
    }
)
_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestTimeTooSkewed",
    "ConditionalRequestConflict",
}


class StorageError(RuntimeError):
    """A storage operation that failed; the message names the object."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (create) or changed since it was read (replace)."""


class TransientStorageError(StorageError):
    """The store kept failing (throttling, 5xx, resets) after every retry: try again later."""


class CallerRefused(StorageError):
    """The store refused the caller, not an object (credentials, signature, account, bucket, KMS key).

    Never a verdict on the object named: every other request would be refused the same way, so the
    task fails instead of setting objects aside.
    """


@dataclass(frozen=True)
class StorageSettings:
    """Where the store is and who we are; empty fields fall back to the standard AWS chain."""

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None

    def environment(self) -> dict[str, str]:
        """The standard AWS environment variables that give another process the same settings."""
        names = {
            "endpoint_url": "AWS_ENDPOINT_URL",
            "region_name": "AWS_DEFAULT_REGION",
            "aws_access_key_id": "AWS_ACCESS_KEY_ID",
            "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
            "aws_session_token": "AWS_SESSION_TOKEN",
        }
        return {names[k]: str(v) for k, v in asdict(self).items() if v}

    def __repr__(self) -> str:  # never print a secret
        return (
            f"StorageSettings(endpoint_url={self.endpoint_url!r}, region_name={self.region_name!r}, "
            f"credentials={'set' if self.aws_access_key_id else 'AWS chain'})"
        )


_DEFAULT_SETTINGS = StorageSettings()
_CLIENTS: dict[tuple[int, StorageSettings], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def configure(settings: StorageSettings) -> None:
    """Make ``settings`` this process's default (used by every call without an explicit client)."""
    global _DEFAULT_SETTINGS
    _DEFAULT_SETTINGS = settings


def default_settings() -> StorageSettings:
    return _DEFAULT_SETTINGS


def client(settings: StorageSettings | None = None):
    """This process's boto3 S3 client for ``settings`` (created on first use, one per pid)."""
    settings = settings or _DEFAULT_SETTINGS
    key = (os.getpid(), settings)
    found = _CLIENTS.get(key)
    if found is None:
        with _CLIENTS_LOCK:
            found = _CLIENTS.get(key)
            if found is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    read_timeout=READ_TIMEOUT_SECONDS,
                    retries={"max_attempts": REQUEST_MAX_ATTEMPTS, "mode": "standard"},
                    max_pool_connections=64,
                    # Path-style addressing works with MinIO, moto and AWS alike.
                    s3={"addressing_style": "path"},
                )
                kwargs = {k: v for k, v in asdict(settings).items() if v}
                found = boto3.session.Session().client("s3", config=config, **kwargs)
                _CLIENTS[key] = found
    return found


# ---------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key (or key prefix)."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, *parts: str) -> S3Location:
        """Append path parts, with exactly one slash between them."""
        key = self.key.rstrip("/")
        for part in parts:
            part = part.strip("/")
            if part:
                key = f"{key}/{part}" if key else part
        return S3Location(self.bucket, key)

    def as_prefix(self) -> S3Location:
        """The same location with a trailing slash, for listing a folder."""
        return S3Location(self.bucket, self.key.rstrip("/") + "/" if self.key else "")


def parse_uri(uri: str) -> S3Location:
    """Parse ``s3://bucket/key`` (``s3a://`` is accepted too) into an :class:`S3Location`.

    Raises:
        ValueError: if the URI is not an S3 URI or has no bucket.
    """
    for scheme in ("s3://", "s3a://"):
        if uri.startswith(scheme):
            bucket, _, key = uri[len(scheme) :].partition("/")
            if not bucket:
                break
            return S3Location(bucket, key)
    raise ValueError(f"not an S3 URI (expected s3://bucket/key): {uri!r}")


def join_uri(uri: str, *parts: str) -> str:
    """Join path parts onto an S3 URI."""
    return parse_uri(uri).join(*parts).uri


def prefix_uri(uri: str) -> str:
    """The URI with exactly one trailing slash (a folder to list)."""
    return parse_uri(uri).as_prefix().uri


def object_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


# ---------------------------------------------------------------------------------------------
# Error classification and retries
# ---------------------------------------------------------------------------------------------


def _error_code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(code or status or "")
    return None


def _error_message(err: BaseException) -> str:
    response = getattr(err, "response", None)
    return str(response.get("Error", {}).get("Message") or "") if isinstance(response, dict) else ""


def is_not_found(err: BaseException) -> bool:
    return _error_code(err) in _NOT_FOUND_CODES


def is_caller_refused(err: BaseException) -> bool:
    """True when the error says the caller is wrong, not the object: expired or invalid
    credentials, a rejected signature, a disabled account, a missing bucket, a KMS refusal
    (``KMS.*`` codes, or ``AccessDenied`` whose message names KMS), or no credentials at all.

    A plain ``AccessDenied`` (a policy refusing one key) or ``NoSuchKey`` is about the object.
    """
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)) or type(err).__name__ in (
        "CredentialRetrievalError",
        "TokenRetrievalError",
        "UnauthorizedSSOTokenError",
        "SSOTokenLoadError",
    ):
        return True
    code = _error_code(err) or ""
    if code in _CALLER_CODES or code.upper().startswith("KMS"):
        return True
    return code in ("AccessDenied", "403", "AccessDeniedException") and "kms" in _error_message(err).lower()


def is_transient(err: BaseException) -> bool:
    """Throttling, 5xx, timeouts, resets and truncated bodies: worth another try."""
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from botocore.exceptions import (
        HTTPClientError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(
        err,
        (
            BotoConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
            Urllib3Error,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return True
    code = _error_code(err)
    return code is not None and (code in _TRANSIENT_CODES or code.startswith("5"))


def _backoff(attempt: int) -> None:
    delay = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * (2**attempt))
    time.sleep(delay * (0.5 + random.random() / 2))


_RETRIES = {"count": 0}  # retried attempts in this process (transient failures that were retried)


def retries_so_far() -> int:
    """How many attempts this process has retried after a transient failure (for job statistics)."""
    return _RETRIES["count"]


def retrying(what: str, operation: Callable[[], T], attempts: int = READ_ATTEMPTS) -> T:
    """Run ``operation`` until it succeeds, retrying transient failures with backoff.

    Raises:
        ObjectNotFound: at once, if the object does not exist.
        CallerRefused: at once, if the store refused the caller (:func:`is_caller_refused`).
        TransientStorageError: if every attempt failed transiently.
    """
    for attempt in range(attempts):
        try:
            return operation()
        except Exception as err:
            if is_not_found(err):
                raise ObjectNotFound(f"{what}: no such object") from None
            if is_caller_refused(err):
                raise CallerRefused(
                    f"{what}: the store refused the caller, not this object ({type(err).__name__}: {err}). Check the "
                    f"credentials, their expiry and the KMS key policy; nothing was set aside for it"
                ) from err
            if not is_transient(err):
                raise
            if attempt + 1 == attempts:
                raise TransientStorageError(f"{what}: still failing after {attempts} attempts ({type(err).__name__}: {err})") from err
            _RETRIES["count"] += 1  # a race between threads only blurs a statistic
            log.warning("%s: %s, retrying (attempt %d of %d)", what, type(err).__name__, attempt + 2, attempts)
            _backoff(attempt)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_bytes(uri: str, s3=None) -> bytes:
    """Read a whole object (the GET and its body retried together)."""
    loc = parse_uri(uri)
    s3 = s3 or client()
    return retrying(f"GET {uri}", lambda: s3.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read())


def read_json(uri: str, s3=None) -> Any:
    return json.loads(read_bytes(uri, s3).decode("utf-8"))


def read_json_if_exists(uri: str, s3=None) -> Any | None:
    """The parsed JSON object, or None when it does not exist."""
    try:
        return read_json(uri, s3)
    except ObjectNotFound:
        return None


def read_json_with_etag(uri: str, s3=None) -> tuple[Any | None, str | None]:
    """``(parsed JSON, ETag)`` of an object, or ``(None, None)`` when it does not exist.

    The ETag is what :func:`write_bytes` needs to replace exactly this version (``if_match``).
    """
    loc = parse_uri(uri)
    s3 = s3 or client()

    def get():
        response = s3.get_object(Bucket=loc.bucket, Key=loc.key)
        return json.loads(response["Body"].read().decode("utf-8")), normal_etag(response.get("ETag"))

    try:
        return retrying(f"GET {uri}", get)
    except ObjectNotFound:
        return None, None


def stream_sha256(uri: str, s3=None, sink: Callable[[bytes], None] | None = None, restart: Callable[[], None] | None = None) -> str:
    """sha256 of an object read in chunks (never whole in memory); chunks also go to ``sink``.

    A failure mid-body restarts the read from the beginning (``restart`` is called first, so a
    sink writing a file can truncate it).
    """
    loc = parse_uri(uri)
    s3 = s3 or client()

    def read() -> str:
        if restart is not None:
            restart()
        digest = hashlib.sha256()
        body = s3.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
        for chunk in body.iter_chunks(STREAM_CHUNK):
            digest.update(chunk)
            if sink is not None:
                sink(chunk)
        return digest.hexdigest()

    return retrying(f"GET {uri}", read)


def open_object(uri: str, s3=None, *, if_match: str | None = None) -> tuple[int, Iterator[bytes]]:
    """``(length, chunks)`` of an object streamed from one GET (never whole in memory).

    The GET is retried until its body starts; a failure after that raises from the iterator
    (the caller has already passed the first bytes on). ``if_match`` reads only the version with
    that ETag (e.g. the one a HEAD checked).

    Raises:
        ObjectNotFound: the object does not exist.
        PreconditionFailed: the object is no longer the version ``if_match`` names.
    """
    loc = parse_uri(uri)
    s3 = s3 or client()
    extra = {"IfMatch": f'"{normal_etag(if_match)}"'} if if_match else {}
    try:
        response = retrying(f"GET {uri}", lambda: s3.get_object(Bucket=loc.bucket, Key=loc.key, **extra))
    except Exception as err:
        if _error_code(err) in _PRECONDITION_CODES:
            raise PreconditionFailed(f"GET {uri}: the object changed since it was checked") from None
        raise
    body = response["Body"]

    def chunks() -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(STREAM_CHUNK)
        finally:
            body.close()

    return int(response.get("ContentLength", 0)), chunks()


def download_file(uri: str, path: str, s3=None) -> str:
    """Download an object to a local file (streamed); returns its sha256."""
    with open(path, "wb") as fh:

        def restart() -> None:
            fh.seek(0)
            fh.truncate()

        return stream_sha256(uri, s3, sink=fh.write, restart=restart)


def head(uri: str, s3=None) -> dict[str, Any] | None:
    """``{"size", "etag", "last_modified"}`` of an object, or None when it does not exist."""
    loc = parse_uri(uri)
    s3 = s3 or client()
    try:
        response = retrying(f"HEAD {uri}", lambda: s3.head_object(Bucket=loc.bucket, Key=loc.key))
    except ObjectNotFound:
        return None
    return {"size": int(response.get("ContentLength", 0)), "etag": normal_etag(response.get("ETag")), "last_modified": response.get("LastModified")}


def iter_objects(prefix: str, s3=None) -> Iterator[dict]:
    """Yield ``{"key", "size", "etag", "last_modified"}`` for every object under a prefix (recursively),
    in key order (``last_modified``: the store's clock, a timezone-aware datetime)."""
    loc = parse_uri(prefix)
    s3 = s3 or client()
    token = None
    while True:
        kwargs = {"Bucket": loc.bucket, "Prefix": loc.key}
        if token:
            kwargs["ContinuationToken"] = token
        page = retrying(f"LIST {prefix}", lambda kw=kwargs: s3.list_objects_v2(**kw))
        for obj in page.get("Contents", []):
            yield {"key": obj["Key"], "size": int(obj["Size"]), "etag": normal_etag(obj.get("ETag")), "last_modified": obj.get("LastModified")}
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


def list_keys(prefix: str, s3=None) -> list[str]:
    """Sorted keys of every object under a prefix."""
    return sorted(obj["key"] for obj in iter_objects(prefix, s3))


def has_objects(prefix: str, s3=None) -> bool:
    """True if at least one object exists under the prefix (one small LIST)."""
    loc = parse_uri(prefix)
    s3 = s3 or client()
    page = retrying(f"LIST {prefix}", lambda: s3.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1))
    return bool(page.get("KeyCount"))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def normal_etag(value: str | None) -> str:
    """An ETag as this package stores and compares it: no quotes, no weak marker (``W/"abc"`` -> ``abc``).

    Some stores and proxies answer weak ETags; S3 compares ``If-Match`` against the strong value,
    so every ETag read is normalised here and sent back quoted.
    """
    text = (value or "").strip()
    if text[:2] in ("W/", "w/"):
        text = text[2:]
    return text.strip('"')


PROBE_KEY = "runs/_store-check/conditional-writes"
"""Where the check writes, under the workspace: ``runs/`` is writable by every role that writes."""
WORKSPACE_FOLDERS = ("runs", "models", "predictions", "datasets", "incoming")
_PROBE_BODY = b"sparktf checks here that the store refuses writes whose If-None-Match / If-Match fails\n"
_WRONG_ETAG = '"00000000000000000000000000000000"'
_CHECKED: set[tuple[str, str, str]] = set()
_CHECK_LOCK = threading.Lock()


class ConditionalWritesIgnored(StorageError):
    """The store accepts writes whose condition fails: every compare-and-swap would be last-writer-wins."""


def probe_key(key: str) -> str:
    """The check's object for a write to ``key``: :data:`PROBE_KEY` under the key's workspace.

    The workspace is what comes before the key's first workspace folder (``runs/``, ``models/``,
    ...): ``ws/models/m/champion.json`` -> ``ws/runs/_store-check/conditional-writes``. A key
    outside any workspace folder is checked at the bucket's root ``runs/``.
    """
    parts = key.split("/")[:-1]
    for i, part in enumerate(parts):
        if part in WORKSPACE_FOLDERS:
            return "/".join([*parts[:i], PROBE_KEY])
    return PROBE_KEY


def check_conditional_writes(bucket: str, s3=None, key: str = "") -> None:
    """Check, once per process, endpoint and workspace, that the store keeps conditional writes.

    On the probe object :func:`probe_key` (``<workspace>/runs/_store-check/...``, a place every
    role that writes may write; ``key`` is the object about to be written): a create with ``If-None-Match: *`` must be refused
    (it exists), a replace with ``If-Match`` of a wrong ETag must be refused, and one with its own
    ETag must succeed. :func:`write_bytes` calls this before its first conditional write, so the
    version claim, the champion swap and the ``_SUCCESS`` switch never run on a store (or a proxy)
    that would turn them into last-writer-wins.

    Raises:
        ConditionalWritesIgnored: the store broke one of the three; the message names it.
    """
    s3 = s3 or client()
    endpoint = str(getattr(getattr(s3, "meta", None), "endpoint_url", None) or "the default AWS endpoint")
    probe = probe_key(key)
    if (endpoint, bucket, probe) in _CHECKED:
        return
    with _CHECK_LOCK:
        if (endpoint, bucket, probe) in _CHECKED:
            return
        broken = _probe_conditional_writes(bucket, probe, s3)
        if broken:
            raise ConditionalWritesIgnored(
                f"the store at {endpoint} (bucket {bucket}) {broken}: the model version claim, the champion swap and "
                f"the predictions' _SUCCESS switch would silently become last-writer-wins, so nothing is written. "
                f"Use a store that honours If-None-Match and If-Match on PUT (AWS S3, MinIO), or remove the proxy "
                f"that drops them"
            )
        _CHECKED.add((endpoint, bucket, probe))


def _probe_conditional_writes(bucket: str, key: str, s3) -> str | None:
    """What the store got wrong on the probe object ``key`` (None: it kept every condition)."""
    uri = object_uri(bucket, key)

    def put(**condition: str) -> str:
        return normal_etag(s3.put_object(Bucket=bucket, Key=key, Body=_PROBE_BODY, **condition).get("ETag"))

    etag = retrying(f"PUT {uri}", put)
    for condition, wrong in (
        ({"IfNoneMatch": "*"}, "accepted a create (If-None-Match: *) of an existing object"),
        ({"IfMatch": _WRONG_ETAG}, "accepted a replace whose If-Match names another ETag"),
    ):
        outcome = _probe_outcome(uri, lambda c=condition: put(**c))
        if outcome != "refused":
            return wrong if outcome == "accepted" else f"does not implement conditional writes ({outcome})"
    if etag and _probe_outcome(uri, lambda: put(IfMatch=f'"{etag}"')) != "accepted":
        return f"refused a replace whose If-Match names the object's own ETag ({etag})"
    return None


def _probe_outcome(uri: str, operation: Callable[[], Any]) -> str:
    """``accepted``, ``refused`` (412), or the error code of a store that does not know the header."""
    try:
        retrying(f"PUT {uri} (conditional-write probe)", operation)
    except Exception as err:
        code = _error_code(err)
        if code in _PRECONDITION_CODES:
            return "refused"
        if code in ("NotImplemented", "501", "InvalidArgument"):
            return code
        raise
    return "accepted"


def write_bytes(uri: str, data: bytes, s3=None, content_type: str | None = None, *, if_none_match: bool = False, if_match: str | None = None) -> str:
    """Write a whole object with one PUT (readers see the old or the new object, never a mix).

    Args:
        if_none_match: create only if no object exists at ``uri`` (``If-None-Match: *``).
        if_match: replace only the version with this ETag (compare-and-swap).

    Returns:
        The new object's ETag.

    A conditional PUT is retried like any other: a PUT resent after its answer was lost (the
    store acted, then the connection broke; botocore resends on its own too) meets its own first
    copy and is refused. So a refusal is checked: if the object now holds exactly ``data``, the
    write was ours and succeeded. (Every conditional document of this package names its writer
    or its time, so another writer's bytes are never identical.)

    Raises:
        PreconditionFailed: the condition did not hold (someone else wrote first, or the object
            ``if_match`` names was deleted).
    """
    loc = parse_uri(uri)
    s3 = s3 or client()
    extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
    if if_none_match:
        extra["IfNoneMatch"] = "*"
    if if_match:
        extra["IfMatch"] = f'"{normal_etag(if_match)}"'
    conditional = if_none_match or bool(if_match)
    if conditional:
        check_conditional_writes(loc.bucket, s3, loc.key)

    def put() -> str:
        return normal_etag(s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **extra).get("ETag"))

    try:
        return retrying(f"PUT {uri}", put)
    except Exception as err:
        # If-Match on an object deleted since it was read answers 404: the same lost race.
        refused = _error_code(err) in _PRECONDITION_CODES or (bool(if_match) and (is_not_found(err) or isinstance(err, ObjectNotFound)))
        if not (conditional and refused):
            raise
        etag = _etag_if_holding(loc, data, s3)
        if etag is not None:
            log.info("PUT %s: refused on a resend, but the object holds exactly this write: it was ours", uri)
            return etag
        condition = "If-None-Match: *" if if_none_match else f"If-Match: {if_match}"
        raise PreconditionFailed(f"PUT {uri} ({condition}): the object was written by someone else") from None


def _etag_if_holding(loc: S3Location, data: bytes, s3) -> str | None:
    """The object's ETag if its bytes are exactly ``data``, else None (also when it is missing)."""

    def get() -> tuple[bytes, str]:
        response = s3.get_object(Bucket=loc.bucket, Key=loc.key)
        return response["Body"].read(), normal_etag(response.get("ETag"))

    try:
        body, etag = retrying(f"GET {loc.uri}", get)
    except ObjectNotFound:
        return None
    return etag if body == data else None


def write_json(uri: str, value: Any, s3=None, **conditions: Any) -> str:
    """Write a JSON document (sorted keys, indented); conditions as for :func:`write_bytes`."""
    data = json.dumps(value, indent=2, sort_keys=True, default=str).encode("utf-8")
    return write_bytes(uri, data, s3, content_type="application/json", **conditions)


def copy_object(src_uri: str, dst_uri: str, s3=None) -> str:
    """Server-side copy of one object; returns the copy's ETag."""
    src, dst = parse_uri(src_uri), parse_uri(dst_uri)
    s3 = s3 or client()
    response = retrying(
        f"COPY {src_uri} -> {dst_uri}", lambda: s3.copy_object(Bucket=dst.bucket, Key=dst.key, CopySource={"Bucket": src.bucket, "Key": src.key})
    )
    return normal_etag(response.get("CopyObjectResult", {}).get("ETag"))


def upload_dir(local_dir: str, prefix: str, s3=None) -> list[dict[str, Any]]:
    """Upload every file of a local tree under a prefix.

    Returns:
        ``[{"path": relative path, "size", "sha256"}]`` for every file, sorted by path.
    """
    written = []
    for root, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as fh:
                data = fh.read()
            write_bytes(join_uri(prefix, rel), data, s3)
            written.append({"path": rel, "size": len(data), "sha256": sha256_hex(data)})
    return sorted(written, key=lambda f: f["path"])


def delete_object(uri: str, s3=None) -> None:
    """Delete one object (no error if it does not exist)."""
    loc = parse_uri(uri)
    s3 = s3 or client()
    retrying(f"DELETE {uri}", lambda: s3.delete_object(Bucket=loc.bucket, Key=loc.key))


def delete_keys(bucket: str, keys: list[str], s3=None) -> int:
    """Delete objects by key, 1,000 per request; returns how many were deleted.

    Raises:
        StorageError: if the store reports any key it could not delete (``Errors`` of the answer).
    """
    s3 = s3 or client()
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]
        response = retrying(
            f"DELETE {len(batch)} objects in s3://{bucket}",
            lambda b=batch: s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in b], "Quiet": True}),
        )
        errors = response.get("Errors") or []
        if errors:
            sample = ", ".join(f"{e.get('Key')}: {e.get('Code')}" for e in errors[:5])
            raise StorageError(f"could not delete {len(errors)} objects in s3://{bucket} ({sample})")
    return len(keys)


def delete_prefix(prefix: str, s3=None) -> int:
    """Delete every object under a prefix; returns how many were deleted."""
    s3 = s3 or client()
    return delete_keys(parse_uri(prefix).bucket, list_keys(prefix, s3), s3)


def create_bucket(name: str, s3=None) -> None:
    """Create a bucket if it does not exist yet (local stacks and tests)."""
    s3 = s3 or client()
    try:
        s3.head_bucket(Bucket=name)
    except Exception as err:
        if not is_not_found(err) and _error_code(err) not in ("NoSuchBucket",):
            raise
        s3.create_bucket(Bucket=name)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
