"""A fault-injecting HTTP proxy in front of an S3 server: test and benchmark support only.

Production code never imports this module (a test checks it, and the ``--py-files`` zip leaves it
out). Tests point the storage layer, Spark's Python workers or an Airflow connection at
:attr:`FaultProxy.endpoint` instead of the S3 server's, and the proxy forwards every request to
the server, except that, for a bounded share of requests, it

* answers ``500 InternalError`` or ``503 SlowDown`` itself (S3 XML error bodies; the server never
  sees the request),
* forwards the request, then resets the connection half-way through the response body (for a
  response without a body: before any byte of it, an answer lost after the server acted),
* or adds latency before forwarding, or (a :class:`FaultRule` of kind ``hold``) holds a request until
  the test releases it.

**Deterministic.** Whether a request is faulted depends only on the seed, the request (method,
path, query, copy source) and how many times that same request was seen before, never on thread
timing: the same workload gets the same faults on every run. **Retries always get through:** the
same request is never faulted more than ``max_consecutive`` (2) times in a row, so a client that
tries three times always succeeds.

:class:`FaultRule` adds targeted, non-random faults (e.g. "every copy into this prefix fails",
"the store refuses these deletes") that ignore that bound: they are for tests of what happens
when the store keeps failing, or when it answers with a given S3 error code (``ExpiredToken``
after N reads: credentials that expire part-way). Two modes imitate stores that break promises:
``ignore_conditions`` drops ``If-None-Match``/``If-Match`` before forwarding, ``weak_etags``
answers ``W/"..."`` ETags.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from xml.sax.saxutils import escape

from sparktf import storage

KINDS = ("internal", "slowdown", "reset", "latency", "access_denied", "conflict", "delete_errors", "error", "hold")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect", "content-length"}
_ERRORS = {
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "access_denied": (403, "Forbidden", "AccessDenied", "Access Denied"),
    "conflict": (409, "Conflict", "ConditionalRequestConflict", "A conflicting operation occurred. If using PutObject you can retry the request."),
}


@dataclass(frozen=True)
class FaultRule:
    """A targeted fault: every matching request (or the first ``times``) gets ``kind``.

    Args:
        kind: ``internal``, ``slowdown``, ``reset``, ``latency``, ``access_denied`` (403, not
            forwarded), ``conflict`` (409 ConditionalRequestConflict, not forwarded: S3's answer
            while another conditional write to the key is in progress) or ``delete_errors`` (a
            DeleteObjects answered 200 with every key in ``Errors``, nothing deleted) or ``error``
            (an S3 error answer with ``code``, ``status`` and ``message``, not forwarded: e.g.
            ``ExpiredToken`` to make credentials expire part-way through a job) or ``hold`` (the
            request, body received, waits until ``released`` is set, then is forwarded, or answered
            as an ``error`` when the rule has a ``code``: a barrier for a test, e.g. a write still in
            flight while the job fails).
        method: HTTP method to match (``GET``, ``PUT``, ``POST``, ...), or any.
        key: regular expression searched in the object key (the path after the bucket), or any.
        query: substring of the raw query string (e.g. ``"delete"``, ``"list-type"``), or any.
        copy: True: only CopyObject requests; False: never them; None: either.
        times: how many matching requests to fault; None: all of them.
        after: let this many matching requests through first (e.g. credentials that expire after
            the first objects of a job were read).
        code, status, message: the ``error`` kind's S3 error code, HTTP status and message.
    """

    kind: str
    method: str | None = None
    key: str | None = None
    query: str | None = None
    copy: bool | None = None
    times: int | None = None
    after: int = 0
    code: str | None = None
    status: int = 403
    message: str = "The store refused the request"
    released: threading.Event | None = None
    hold_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")
        takes_code = self.kind in ("error", "hold")  # hold: the error answered once released
        if (self.code is not None and not takes_code) or (self.kind == "error" and self.code is None):
            raise ValueError("the error kind needs a code, and only it and hold take one")
        if (self.kind == "hold") != (self.released is not None):
            raise ValueError("the hold kind needs a released event, and only it takes one")

    def error_answer(self) -> tuple[int, str, str, str]:
        """``(status, reason, code, message)`` of the S3 error answer this rule gives."""
        if self.code is not None:
            return self.status, http.client.responses.get(self.status, "Error"), str(self.code), self.message
        return _ERRORS[self.kind]

    def matches(self, method: str, key: str, query: str, is_copy: bool) -> bool:
        return (
            (self.method is None or self.method == method)
            and (self.key is None or re.search(self.key, key) is not None)
            and (self.query is None or self.query in query)
            and (self.copy is None or self.copy == is_copy)
        )


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that injects S3 faults; a context manager.

    Args:
        upstream: the S3 server's endpoint (``http://127.0.0.1:port``).
        seed: fixes which requests are faulted.
        internal, slowdown, reset, latency: share of requests (0..1) answered 500, answered 503,
            reset mid-body, delayed. Their sum must be at most 1.
        latency_seconds: range of an added delay.
        max_consecutive: never fault the same request more than this many times in a row.
        rules: targeted faults, checked before the random ones.
        ignore_conditions: drop ``If-None-Match`` / ``If-Match`` before forwarding (a store that
            ignores conditional writes: every conditional PUT succeeds).
        weak_etags: answer every ``ETag`` header as a weak one (``W/"..."``), as some stores and
            proxies do.
    """

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        internal: float = 0.0,
        slowdown: float = 0.0,
        reset: float = 0.0,
        latency: float = 0.0,
        latency_seconds: tuple[float, float] = (0.02, 0.2),
        max_consecutive: int = 2,
        rules: tuple[FaultRule, ...] | list[FaultRule] = (),
        ignore_conditions: bool = False,
        weak_etags: bool = False,
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.seed = seed
        self.latency_seconds = latency_seconds
        self.max_consecutive = max_consecutive
        self.ignore_conditions = ignore_conditions
        self.weak_etags = weak_etags
        self._lock = threading.Lock()
        self._rules: list[list[Any]] = []  # [rule, remaining, matches still to let through]
        self._seen: Counter = Counter()
        self._streak: Counter = Counter()
        self.faults: Counter = Counter()  # injected faults by kind
        self.requests = 0
        self.requested: Counter = Counter()  # (method, object key) -> requests seen
        self.longest_streak = 0
        self.set_rates(internal=internal, slowdown=slowdown, reset=reset, latency=latency)
        for rule in rules:
            self.add_rule(rule)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # -- configuration -----------------------------------------------------------------------

    def set_rates(self, *, internal: float = 0.0, slowdown: float = 0.0, reset: float = 0.0, latency: float = 0.0) -> None:
        """Replace the random fault shares (all zero: a transparent proxy)."""
        rates = {"internal": internal, "slowdown": slowdown, "reset": reset, "latency": latency}
        if any(v < 0 for v in rates.values()) or sum(rates.values()) > 1:
            raise ValueError(f"fault shares must be >= 0 and sum to at most 1, got {rates}")
        with self._lock:
            self._rates = rates

    def add_rule(self, rule: FaultRule) -> None:
        with self._lock:
            self._rules.append([rule, rule.times, rule.after])

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def settings(self, base: storage.StorageSettings) -> storage.StorageSettings:
        """``base`` (credentials, region) with the endpoint replaced by this proxy's."""
        return dataclasses.replace(base, endpoint_url=self.endpoint)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        server.daemon_threads = True
        server.fault_proxy = self  # type: ignore[attr-defined]
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- decisions ---------------------------------------------------------------------------

    def decide(self, method: str, path: str, query: str, copy_source: str | None) -> tuple[str | None, float]:
        """The fault for one request (None: forward untouched) and the delay to add first."""
        rule, delay = self.decide_rule(method, path, query, copy_source)
        return (rule if rule is None or isinstance(rule, str) else rule.kind), delay

    def decide_rule(self, method: str, path: str, query: str, copy_source: str | None) -> tuple[FaultRule | str | None, float]:
        """As :meth:`decide`, with the matching :class:`FaultRule` instead of its kind."""
        key = path.lstrip("/").partition("/")[2]
        identity = f"{method} {path}?{query} <{copy_source or ''}>"
        key = urllib.parse.unquote(key)
        with self._lock:
            self.requests += 1
            self.requested[(method, key)] += 1
            for entry in self._rules:
                rule, remaining, skip = entry
                if remaining != 0 and rule.matches(method, key, query, copy_source is not None):
                    if skip > 0:
                        entry[2] = skip - 1
                        continue
                    if remaining is not None:
                        entry[1] = remaining - 1
                    self.faults[rule.kind] += 1
                    return rule, self._delay(identity, -1) if rule.kind == "latency" else 0.0
            return self._random_kind(identity)

    def _random_kind(self, identity: str) -> tuple[str | None, float]:
        """The random fault (by the shares of :meth:`set_rates`) of one request; the lock is held."""
        seen = self._seen[identity]
        self._seen[identity] += 1
        draw = _uniform(self.seed, identity, seen, "kind")
        kind = None
        threshold = 0.0
        for name in ("internal", "slowdown", "reset", "latency"):
            threshold += self._rates[name]
            if draw < threshold:
                kind = name
                break
        if kind in ("internal", "slowdown", "reset") and self._streak[identity] >= self.max_consecutive:
            kind = None  # this request already failed max_consecutive times in a row: let it through
        if kind in ("internal", "slowdown", "reset"):
            self._streak[identity] += 1
            self.longest_streak = max(self.longest_streak, self._streak[identity])
        else:
            self._streak[identity] = 0
        if kind is not None:
            self.faults[kind] += 1
        return kind, self._delay(identity, seen) if kind == "latency" else 0.0

    def _delay(self, identity: str, seen: int) -> float:
        low, high = self.latency_seconds
        return low + (high - low) * _uniform(self.seed, identity, seen, "delay")

    def forward(
        self, connection: http.client.HTTPConnection | None, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[http.client.HTTPConnection, int, str, list[tuple[str, str]], bytes]:
        """Send one request upstream (reusing ``connection``); the answer, read whole."""
        for attempt in range(2):
            if connection is None:
                connection = http.client.HTTPConnection(*self.upstream, timeout=120)
            try:
                connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    connection.putheader(name, value)
                connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
                response = connection.getresponse()
                data = response.read()
                return connection, response.status, response.reason, response.getheaders(), data
            except (http.client.HTTPException, ConnectionError):
                # The upstream closed an idle keep-alive connection: reconnect once.
                connection.close()
                connection = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _uniform(seed: int, identity: str, seen: int, purpose: str) -> float:
    digest = hashlib.sha256(f"{seed}|{purpose}|{identity}|{seen}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _error_body(code: str, message: str, resource: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}</Message>'
        f"<Resource>{escape(resource)}</Resource><RequestId>fault-proxy</RequestId></Error>"
    ).encode()


def _delete_errors_body(request_body: bytes) -> bytes:
    keys = re.findall(rb"<Key>(.*?)</Key>", request_body, flags=re.S)
    errors = "".join(f"<Error><Key>{k.decode()}</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>" for k in keys)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{errors}</DeleteResult>').encode()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered for us

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def finish(self) -> None:
        upstream = getattr(self, "_upstream", None)
        if upstream is not None:
            upstream.close()
        with contextlib.suppress(OSError):
            super().finish()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, *, content_length: str | None = None, cut: bool = False
    ) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{name}: {value}" for name, value in headers if name.lower() not in _HOP_BY_HOP]
        lines.append(f"Content-Length: {content_length if content_length is not None else len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if cut:
            # Headers promise the whole body; half of it arrives, then a reset (RST, not FIN).
            if body and self.command != "HEAD":
                self.wfile.write(head + body[: len(body) // 2])
                self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.close()
            return
        self.wfile.write(head + (b"" if self.command == "HEAD" else body))

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.fault_proxy  # type: ignore[attr-defined]
        body = self._read_body()
        path, _, query = self.path.partition("?")
        rule, delay = proxy.decide_rule(self.command, path, query, self.headers.get("x-amz-copy-source"))
        kind = rule.kind if isinstance(rule, FaultRule) else rule
        if delay:
            time.sleep(delay)
        if kind == "hold":
            rule.released.wait(rule.hold_timeout)
        if kind in _ERRORS or kind == "error" or (kind == "hold" and rule.code is not None):
            status, reason, code, message = rule.error_answer() if isinstance(rule, FaultRule) else _ERRORS[kind]
            payload = b"" if self.command == "HEAD" else _error_body(code, message, path)
            self._send(status, reason, [("Content-Type", "application/xml")], payload)
            return
        if kind == "delete_errors" and self.command == "POST" and "delete" in query:
            self._send(200, "OK", [("Content-Type", "application/xml")], _delete_errors_body(body))
            return
        dropped = _HOP_BY_HOP | ({"if-none-match", "if-match"} if proxy.ignore_conditions else set())
        headers = [(name, value) for name, value in self.headers.items() if name.lower() not in dropped]
        try:
            self._upstream, status, reason, answer_headers, data = proxy.forward(
                getattr(self, "_upstream", None), self.command, self.path, headers, body
            )
        except (OSError, http.client.HTTPException) as err:
            self._send(502, "Bad Gateway", [("Content-Type", "text/plain")], f"upstream failed: {err}".encode())
            return
        upstream_length = next((v for k, v in answer_headers if k.lower() == "content-length"), None)
        if proxy.weak_etags:
            answer_headers = [(k, f"W/{v}" if k.lower() == "etag" and not v.startswith("W/") else v) for k, v in answer_headers]
        self._send(status, reason, answer_headers, data, content_length=upstream_length if self.command == "HEAD" else None, cut=kind == "reset")


@contextlib.contextmanager
def route_storage(settings: storage.StorageSettings, spark=None) -> Iterator[None]:
    """Send this process's storage calls, and those of ``spark``'s Python workers, to ``settings``.

    The workers get the settings as the standard AWS variables through the SparkContext's
    environment (new Python workers start with it); both are restored on exit.
    """
    previous = storage.default_settings()
    environment = spark.sparkContext.environment if spark is not None else None
    saved = dict(environment) if environment is not None else None
    storage.configure(settings)
    if environment is not None:
        environment.update(settings.environment())
    try:
        yield
    finally:
        storage.configure(previous)
        if environment is not None:
            environment.clear()
            environment.update(saved)
