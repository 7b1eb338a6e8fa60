"""THE request path, top to bottom: read → admit → attempt (retry before the first byte) → relay.

Invariants kept here:
- Bytes pass unchanged: status, end-to-end headers and body as the node sent them; only
  hop-by-hop headers are dropped and ``Host`` is the node's.
- A slot is held from admission until the response ends or the client leaves, and released
  exactly once (``finally``).
- The commit point is ``response.prepare``: before it a failure may be retried on another node
  or answered with a proper ``{"error"}`` status; after it, never retried, and a broken node
  ends the client's stream with an error line and an unterminated body, so it cannot look
  complete.
- A client that leaves closes the upstream connection at once (Ollama stops generating when
  its connection closes) and is never blamed on the node.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .errors import BadRequest, BodyTooLarge, ProxyError, UpstreamError, upstream_error
from .health import Health
from .metrics import Metrics, endpoint_label
from .pool import Lease, Node, Pool

# Inference: these take a slot on the node (a generation or an embedding on its GPU).
INFERENCE_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    }
)
# Bound to one model but cheap or long-running management: they take no slot.
MODEL_MANAGEMENT_PATHS = frozenset(
    {"/api/show", "/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy"}
)
MODEL_REQUIRED_PATHS = INFERENCE_PATHS | {"/api/show"}
# Large uploads (model files): streamed to the node, never buffered, never retried.
STREAMED_BODY_PREFIX = "/api/blobs/"

LARGE_BODY = 1024 * 1024

# RFC 9110 §7.6.1: meaningful for one connection only; never forwarded, in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Set again by aiohttp for the node: the node's host (Ollama on loopback answers 403 to any
# other) and the length of the body actually sent.
RESET_REQUEST_HEADERS = frozenset({"host", "content-length", "expect"})


@dataclass
class Exchange:
    """What the proxy learned about one request; read by metrics and the access log."""

    method: str
    path: str
    body: bytes | None  # None when the body is streamed
    model: str | None = None
    takes_slot: bool = False
    node: Node | None = None
    status: int = 0
    attempts: int = 0
    client_gone: bool = False
    started: float = field(default_factory=time.monotonic)
    first_byte: float | None = None


class Forwarder:
    def __init__(
        self,
        pool: Pool,
        health: Health,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        *,
        max_attempts: int,
        max_body_size: int,
    ) -> None:
        self.pool = pool
        self.health = health
        self.metrics = metrics
        self.session = session
        self.max_attempts = max_attempts
        self.max_body_size = max_body_size

    async def handle(self, request: web.Request) -> web.StreamResponse:
        exchange = Exchange(request.method, request.path, body=None)
        try:
            await self._read(request, exchange)
            return await self._forward(request, exchange)
        except ProxyError as exc:
            exchange.status = exc.status
            self.metrics.proxy_error(exc)
            return exc.response()
        except (asyncio.CancelledError, ConnectionError):
            exchange.client_gone = True
            exchange.status = 499
            raise
        finally:
            self.metrics.request_done(exchange, endpoint_label(request.path))

    # -- read -------------------------------------------------------------------------------

    async def _read(self, request: web.Request, ex: Exchange) -> None:
        """Buffer the body (bounded) and find its model; streamed uploads stay unread."""
        if request.path.startswith(STREAMED_BODY_PREFIX):
            return
        if request.content_length is not None and request.content_length > self.max_body_size:
            raise BodyTooLarge(self.max_body_size)
        try:
            ex.body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(self.max_body_size) from None
        payload = _json_object(ex.body, strict=request.path in MODEL_REQUIRED_PATHS)
        ex.model = _model_of(payload)
        if ex.model is None and request.path in MODEL_REQUIRED_PATHS:
            raise BadRequest("model is required")
        ex.takes_slot = request.path in INFERENCE_PATHS or (
            ex.model is not None
            and request.method == "POST"
            and request.path not in MODEL_MANAGEMENT_PATHS
            and not request.path.startswith("/api/")
        )

    # -- admit and attempt ------------------------------------------------------------------

    async def _forward(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        tried: list[Node] = []  # nodes that failed this request, not to be chosen again
        while True:
            lease = await self._admit(ex, tried)
            try:
                upstream = await self._attempt(request, ex, lease.node, tried)
                if upstream is None:
                    continue  # retry on another node; the finally gives this slot back first
                try:
                    return await self._relay(request, ex, upstream)
                finally:
                    upstream.close()  # a no-op once the body was read to its end
            finally:
                lease.release()

    async def _attempt(
        self, request: web.Request, ex: Exchange, node: Node, tried: list[Node]
    ) -> aiohttp.ClientResponse | None:
        """The node's response headers, or None when the request should go to another node."""
        ex.node = node
        ex.attempts += 1
        may_retry = (
            ex.body is not None  # a streamed body cannot be sent twice
            and ex.attempts < self.max_attempts
            and bool(self.pool.candidates(exclude=[*tried, node]))
        )
        try:
            upstream = await self._send(request, ex, node)
        except UpstreamError as err:
            self.health.passive_failure(node, err.kind)
            self.metrics.upstream_error(node, err.kind)
            tried.append(node)
            if err.may_retry and may_retry:
                self.metrics.retry(err.kind)
                return None
            raise _gateway_error(node, err) from None
        if upstream.status == 503 and may_retry:
            # Ollama's own queue is full: nothing was generated, another node may have room.
            upstream.close()
            tried.append(node)
            self.metrics.retry("node_busy")
            return None
        return upstream

    async def _admit(self, ex: Exchange, tried: list[Node]) -> Lease:
        """A slot for inference; for other requests a node with no slot counted."""
        if ex.takes_slot:
            queued_at = time.monotonic()
            lease = await self.pool.acquire(exclude=tried)
            self.metrics.queue_wait(time.monotonic() - queued_at)
            return lease
        node = self.pool.any_node(exclude=tried)
        if node is None:
            raise ProxyError(503, "no healthy node is available", retry_after=1)
        return Lease.unmetered(node)

    async def _send(self, request: web.Request, ex: Exchange, node: Node) -> aiohttp.ClientResponse:
        """Send the request and wait for the node's status and headers."""
        data: Any = request.content if ex.body is None else (ex.body or None)
        if ex.body is not None and len(ex.body) > LARGE_BODY:
            data = io.BytesIO(ex.body)  # written in pieces: one big write would stall the loop
        try:
            return await self.session.request(
                request.method,
                node.url + request.path_qs,
                headers=_request_headers(request),
                data=data,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_error(exc, before_response=True) from None

    # -- relay ------------------------------------------------------------------------------

    async def _relay(
        self, request: web.Request, ex: Exchange, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Pass the node's response through, each chunk as it arrives."""
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        _copy_end_to_end(upstream.headers, response.headers)
        ex.status = upstream.status
        await response.prepare(request)  # the commit point: no retry after this
        reader = upstream.content
        while True:
            try:
                chunk = await reader.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                err = upstream_error(exc, before_response=False)
                assert ex.node is not None
                self.health.passive_failure(ex.node, err.kind)
                self.metrics.upstream_error(ex.node, err.kind)
                await _break_stream(request, response, upstream, ex.node, err)
                return response
            if not chunk:
                break
            if ex.first_byte is None:
                ex.first_byte = time.monotonic()
            await response.write(chunk)
        if ex.node is not None and upstream.status < 500:
            self.health.passive_success(ex.node)
        elif ex.node is not None and upstream.status != 503:
            self.health.passive_failure(ex.node, "status_5xx")
        await response.write_eof()
        return response


def _json_object(body: bytes, *, strict: bool) -> dict[str, Any] | None:
    """The body as a JSON object; on a model endpoint anything else is a 400."""
    if not body:
        if strict:
            raise BadRequest("missing request body")  # Ollama's own words
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        if strict:
            raise BadRequest(f"invalid JSON in request body: {exc}") from None
        return None
    if isinstance(payload, dict):
        return payload
    if strict:
        raise BadRequest("request body must be a JSON object")
    return None


def _model_of(payload: dict[str, Any] | None) -> str | None:
    if payload is None:
        return None
    model = payload.get("model") or payload.get("name")  # "name": Ollama's legacy spelling
    return model if isinstance(model, str) and model else None


def _request_headers(request: web.Request) -> dict[str, str]:
    named = _connection_tokens(request.headers)
    return {
        k: v
        for k, v in request.headers.items()
        if (lower := k.lower()) not in HOP_BY_HOP
        and lower not in RESET_REQUEST_HEADERS
        and lower not in named
    }


def _copy_end_to_end(source: Any, target: Any) -> None:
    named = _connection_tokens(source)
    for key, value in source.items():
        lower = key.lower()
        if lower not in HOP_BY_HOP and lower not in named:
            target.add(key, value)


def _connection_tokens(headers: Any) -> set[str]:
    """Headers named in ``Connection`` are hop-by-hop too (RFC 9110 §7.6.1)."""
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(","))
    return tokens


def _gateway_error(node: Node, err: UpstreamError) -> ProxyError:
    if err.kind == "timeout":
        return ProxyError(504, f"node {node.name} did not answer in time: {err.detail}")
    return ProxyError(502, f"node {node.name} failed: {err.detail}")


async def _break_stream(
    request: web.Request,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    node: Node,
    err: UpstreamError,
) -> None:
    """The node failed mid-body: end the client's stream so that it cannot look complete.

    A streamed (chunked) body gets one more line in its own format, ``{"error": ...}`` for
    NDJSON or an SSE ``data:`` event, then the connection closes without the terminating
    chunk. A body with a Content-Length just closes short of its length.
    """
    message = f"node {node.name} failed mid-response: {err.detail}"
    upstream.close()
    if "Content-Length" not in response.headers:
        if response.content_type == "text/event-stream":
            event = {"error": {"message": message, "type": "api_error"}}
            line = b"data: " + json.dumps(event).encode() + b"\n\n"
        else:
            line = json.dumps({"error": message}).encode() + b"\n"
        await response.write(line)
    transport = request.transport
    if transport is not None:
        transport.close()  # flushes what was written, then FIN: never the final chunk
