"""The proxy's own failure types and the Ollama-shaped bodies clients see for them.

The request path decides on these types, never on a library's exception tree: upstream.py
raises ``UpstreamError`` with its kind.
"""

from __future__ import annotations

import errno
import json
import os
import ssl
from typing import Literal

import aiohttp
from aiohttp import web

# How a node failed to answer (UpstreamError); a 5xx answer is a failure too, for health.
UpstreamKind = Literal["connect", "reset", "timeout", "broken"]
FailureKind = UpstreamKind | Literal["status_5xx"]
# Why the proxy answered 503 without trying a node ("resources": it ran out of its own).
RejectReason = Literal["no_node", "full", "body_bytes", "timeout", "resources", "unspecified"]
# The proxy's own shortages, of descriptors (its own or the system's) or of buffer memory:
# never a node's failure.
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Why a request was sent again: a node failure that nothing was generated for (``may_retry``),
# or a busy node.
RetryReason = UpstreamKind | Literal["node_busy"]


# The API a request speaks, which decides the shape of the proxy's own errors: the SDKs of
# each read their message from a different place.
ApiFamily = Literal["ollama", "openai", "anthropic"]


def family_of(path: str) -> ApiFamily:
    """Ollama's OpenAI layer answers under /v1, its Anthropic layer on /v1/messages."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    return "ollama"


class ProxyError(Exception):
    """A failure answered by the proxy itself, in the shape of the request's API family.

    ``kind`` overrides the error type the status implies (OpenAI and Anthropic shapes), and
    ``code`` fills OpenAI's ``code`` (``"invalid_api_key"``, ``"rate_limit_exceeded"``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
        kind: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        self.kind = kind
        self.code = code

    def response(self, path: str = "/") -> web.Response:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return error_response(
            self.status,
            self.message,
            headers=headers or None,
            family=family_of(path),
            kind=self.kind,
            code=self.code,
        )


class BadRequest(ProxyError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class BodyTooLarge(ProxyError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the proxy's limit of {limit} bytes")


class Unavailable(ProxyError):
    """503: no node can take the request now; the client may retry after ``retry_after``."""

    def __init__(
        self, message: str, *, retry_after: int = 1, reason: RejectReason = "unspecified"
    ) -> None:
        super().__init__(503, message, retry_after=retry_after)
        self.reason = reason


# Why a client's key was refused (tenants): label values of ollama_proxy_key_rejections_total.
RejectionReason = Literal["unauthorized", "forbidden", "rate", "tokens", "concurrency"]


class RateLimited(ProxyError):
    """429: the client's key is over one of its limits; it may retry after ``retry_after``.

    ``headers`` carries the remaining budget (``X-RateLimit-*``) where one is known."""

    def __init__(
        self,
        message: str,
        *,
        reason: RejectionReason,
        retry_after: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            429,
            message,
            retry_after=retry_after,
            headers=headers,
            code="rate_limit_exceeded",
        )
        self.reason: RejectionReason = reason


class UpstreamError(Exception):
    """A node failed to answer; ``kind`` says how (for metrics, retries and logs)."""

    def __init__(self, kind: UpstreamKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind: UpstreamKind = kind
        self.detail = detail

    @property
    def may_retry(self) -> bool:
        """Safe to send elsewhere: the node refused, or dropped the connection before it
        answered (a stale keep-alive connection, a crash), so nothing reached the client and
        the node is not generating for it. A timeout may mean the node is still working."""
        return self.kind in ("connect", "reset")


def is_shortage(exc: BaseException) -> bool:
    """The proxy ran out of descriptors or buffers (an aiohttp connector error is an OSError
    with the errno of the one it wraps)."""
    return isinstance(exc, OSError) and exc.errno in SHORTAGE_ERRNOS


def failure_text(exc: BaseException) -> str:
    """A failure in words: a connection's from its errno (``cannot connect to host:port:
    Connection refused``), not aiohttp's text for it, which names an ``ssl`` setting even for
    an http:// node; a TLS failure as it is."""
    tls = isinstance(exc, ssl.SSLError | aiohttp.ClientSSLError)
    if not isinstance(exc, OSError) or tls or not exc.errno or exc.errno < 0:
        return str(exc) or type(exc).__name__
    words = os.strerror(exc.errno)
    if isinstance(exc, aiohttp.ClientConnectorError):
        host = f"[{exc.host}]" if ":" in exc.host else exc.host  # IPv6, as a URL writes it
        return f"cannot connect to {host}:{exc.port}: {words}"
    return words


# The error type each status implies, as Ollama's OpenAI layer names them (400 and 404; the
# rest as the OpenAI API does) and as Anthropic's API does.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# Anthropic's names are OpenAI's but for two statuses of its own.
_ANTHROPIC_TYPES = {**_OPENAI_TYPES, 413: "request_too_large", 503: "overloaded_error"}


def error_body(
    message: str,
    status: int = 500,
    family: ApiFamily = "ollama",
    *,
    kind: str | None = None,
    code: str | None = None,
) -> bytes:
    """The body of an error in ``family``'s shape: ``{"error": message}`` for Ollama's own
    API, ``{"error": {"message", "type", "param", "code"}}`` for OpenAI's, ``{"type":
    "error", "error": {"type", "message"}}`` for Anthropic's."""
    body: object
    if family == "openai":
        error_type = kind or _OPENAI_TYPES.get(status, "api_error")
        body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    elif family == "anthropic":
        error_type = kind or _ANTHROPIC_TYPES.get(status, "api_error")
        body = {"type": "error", "error": {"type": error_type, "message": message}}
    else:
        body = {"error": message}
    return json.dumps(body, separators=(",", ":")).encode()


def stream_error(message: str, family: ApiFamily, *, event_stream: bool) -> bytes:
    """The last event of a stream a node broke off, in the stream's own format: Anthropic's
    ``event: error`` (its SDK reads only named events), OpenAI's ``data:`` line with an
    error object (its SDK raises on one), or an NDJSON ``{"error": ...}`` line (Ollama's own,
    which its clients raise on)."""
    if not event_stream:
        return error_body(message, 502) + b"\n"
    if family == "anthropic":
        return b"event: error\ndata: " + error_body(message, 502, "anthropic") + b"\n\n"
    return b"data: " + error_body(message, 502, "openai") + b"\n\n"


def error_response(
    status: int,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    family: ApiFamily = "ollama",
    kind: str | None = None,
    code: str | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(message, status, family, kind=kind, code=code),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


# Characters of a client-supplied name (a model, a path) that a message or a log field quotes:
# an 8 MiB model name must not come back as an 8 MiB error body or log line.
SHOWN_MAX = 200


def go_quoted(text: str) -> str:
    """``text`` as Go's ``%q`` quotes it in Ollama's messages (``model "x" not found``): in
    double quotes, with quotes, backslashes and control characters escaped."""
    return json.dumps(text, ensure_ascii=False)


def shown(text: str, limit: int = SHOWN_MAX) -> str:
    """``text`` as a message quotes it: cut after ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text.encode('utf-8', 'replace'))} bytes)"
