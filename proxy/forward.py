"""THE request path, top to bottom: read → admit → attempt (retry before the first byte) → relay.

Invariants kept here:
- Bytes pass unchanged: status, end-to-end headers and body as the node sent them; only
  hop-by-hop headers are dropped and ``Host`` is the node's.
- A slot is held from admission until the response ends or the client leaves, and released
  exactly once (``finally``).
- Nothing is retried once the node has answered, but for its 503 (busy). The client gets the
  head when the node's has come (a streamed body) or once the whole body has (a short one of
  known length, so that a node that breaks off gets the client a proper ``{"error"}``
  status). After the head, a broken node ends the client's stream with an error line and an
  unterminated body, so it cannot look complete.
- A client that leaves closes the upstream connection at once (Ollama stops generating when
  its connection closes) and is never blamed on the node.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web

from .accesslog import AccessLog
from .bodies import json_object, model_of
from .config import Config
from .discovery import Discovery
from .errors import (
    BadRequest,
    ProxyError,
    Unavailable,
    UpstreamError,
)
from .fleet import Fleet
from .health import Health
from .incoming import Incoming
from .metrics import Metrics, endpoint_label
from .models import is_unload_request, normalize_model
from .pool import Lease, Node, Pool
from .routing import availability, want_for
from .telemetry import TELEMETRY_PATHS, Usage, usage_from_tail
from .upstream import (
    Answer,
    ClientSide,
    Connection,
    Head,
    Upstreams,
    chunk_framed,
    request_bytes,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Inference: these take a slot on the node (a generation or an embedding on its GPU). The
# Ollama and OpenAI paths carry token counts; the Responses and Anthropic ones are counted
# as requests only.
INFERENCE_PATHS = TELEMETRY_PATHS | {"/v1/responses", "/v1/messages"}
# Answered by one node that has the model, taking no slot. (Pull, create, copy, delete and
# blobs fan out to the whole fleet: fleet.py.)
MODEL_INFO_PATHS = frozenset({"/api/show", "/api/push"})
MODEL_REQUIRED_PATHS = INFERENCE_PATHS | MODEL_INFO_PATHS
OPENAI_MODEL_PREFIX = "/v1/models/"
# A client that reads slower than the node writes: stop reading from the node above this many
# bytes waiting for the client, start again below the low mark.
CLIENT_BUFFER_HIGH = 256 * 1024
CLIENT_BUFFER_LOW = 64 * 1024
# Chunks kept for reading the final one; Ollama's final chunk may span several reads when a
# generate answer carries a long "context".
TAIL_CHUNKS = 16
# A node's answer with a Content-Length up to this size (a non-streamed generation, an
# embedding) is taken whole before the client gets its head: head and body then leave in one
# write, and a node that breaks off mid-body gets a 502 instead of a short body.
WHOLE_BODY_MAX = 1024 * 1024

# RFC 9110 §7.6.1: meaningful for one connection only; never forwarded, in either direction.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Written anew for the node (upstream.request_bytes): the node's host (Ollama on loopback
# answers 403 to any other) and the length of the body actually sent.
RESET_REQUEST_HEADERS = frozenset({b"host", b"content-length", b"expect"})


@dataclass
class Exchange:
    """What the proxy learned about one request; read by metrics and the access log."""

    method: str
    path: str
    body: bytes
    model: str | None = None  # as the client named it
    model_key: str | None = None  # normalised, when the request must go to a node that has it
    takes_slot: bool = False
    unload: bool = False  # `ollama stop`: goes to every node that has the model
    cold: bool = False  # sent to a node that did not hold the model in memory
    node: Node | None = None
    status: int = 0
    attempts: int = 0
    client_gone: bool = False
    request_id: str = ""
    client: str = ""
    started: float = field(default_factory=time.monotonic)
    queue_wait: float = 0.0
    first_byte: float | None = None
    usage: Usage | None = None


class Forwarder:
    def __init__(
        self,
        pool: Pool,
        health: Health,
        metrics: Metrics,
        discovery: Discovery,
        fleet: Fleet,
        config: Config,
    ) -> None:
        self.pool = pool
        self.discovery = discovery
        self.fleet = fleet
        self.upstreams = Upstreams(config.upstream.connect_timeout, config.upstream.idle_timeout)
        self.health = health
        self.metrics = metrics
        self.active = 0  # requests being handled now, for a graceful stop
        self.idle = asyncio.Event()
        self.idle.set()
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take new settings (at start and on reload); requests under way keep theirs."""
        self.max_attempts = config.upstream.max_attempts
        self.spill_after = config.routing.spill_after
        self.max_body_size = config.max_body_size
        # Generations last as long as they last: only silence (idle_timeout) is a failure.
        self.upstreams.configure(config.upstream.connect_timeout, config.upstream.idle_timeout)
        self.access_log = AccessLog(config.access_log)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every request through aiohttp that neither the fleet nor the admin paths answer."""
        return _for_aiohttp(await self.serve(Incoming.of(request)))

    async def serve(self, request: Incoming) -> Outcome:
        """One request to pass to a node, from either server (aiohttp's, the front door).

        The answer is either written already (``Relayed``) or the proxy's own to send.
        """
        return await self.observe(request, self._proxy)

    def observed(self, handler: Handler) -> Handler:
        """A fleet handler, counted, measured and logged like a proxied request."""

        async def observed_handler(request: web.Request) -> web.StreamResponse:
            outcome = await self.serve_own(Incoming.of(request), lambda: handler(request))
            return _for_aiohttp(outcome)

        return observed_handler

    async def serve_own(
        self, request: Incoming, answer: Callable[[], Awaitable[web.StreamResponse]]
    ) -> Outcome:
        """An answer of the proxy's own (a merged listing), counted, measured and logged."""

        async def serve(request: Incoming, ex: Exchange) -> Outcome:
            response = await answer()
            ex.status = response.status
            return response

        return await self.observe(request, serve)

    async def observe(
        self,
        request: Incoming,
        serve: Callable[[Incoming, Exchange], Awaitable[Outcome]],
    ) -> Outcome:
        """Run ``serve`` as one request: counted for the drain, then metrics and access log."""
        ex = Exchange(
            request.method,
            request.path,
            body=b"",
            request_id=request.header(b"x-request-id") or _new_request_id(),
            client=request.remote,
        )
        self.active += 1
        self.idle.clear()
        try:
            return await serve(request, ex)
        except ProxyError as exc:
            ex.status = exc.status
            self.metrics.proxy_error(exc)
            return exc.response()
        except asyncio.CancelledError:
            ex.client_gone = True  # not the node's fault: never counted against it
            raise
        except ConnectionError:
            if not request.client_left():
                raise
            # The client left while its head or its end was being written. aiohttp logs an
            # exception raised from here as a server error, with a traceback; a response
            # returned instead it fails to send, and ends the request quietly.
            ex.client_gone = True
            return web.Response()
        finally:
            self.metrics.request_done(ex, endpoint_label(request.path))
            self.access_log.record(ex)
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    async def _proxy(self, request: Incoming, ex: Exchange) -> Outcome:
        await self._read(request, ex)
        if ex.unload and ex.model_key is not None:
            self._check_model_available(ex.model_key, ex.model or ex.model_key)
            return await self.fleet.unload(request.path, ex.body, ex.model_key)
        return await self._forward(request, ex)

    # -- read -------------------------------------------------------------------------------

    async def _read(self, request: Incoming, ex: Exchange) -> None:
        """Buffer the body (bounded) and find its model."""
        ex.body = await request.read_body(self.max_body_size)
        payload = json_object(ex.body, strict=request.path in MODEL_REQUIRED_PATHS)
        ex.model = model_of(payload)
        if request.path.startswith(OPENAI_MODEL_PREFIX):
            ex.model = request.path.removeprefix(OPENAI_MODEL_PREFIX)
        if ex.model is None and request.path in MODEL_REQUIRED_PATHS:
            raise BadRequest("model is required")
        # A model loaded on several nodes must leave all of them, not the one that was asked.
        ex.unload = payload is not None and is_unload_request(request.path, payload)
        # Inference, including future POST paths that name a model (a new Ollama endpoint
        # must not slip past the caps).
        ex.takes_slot = not ex.unload and (
            request.path in INFERENCE_PATHS
            or (
                ex.model is not None
                and request.method == "POST"
                and request.path not in MODEL_INFO_PATHS
            )
        )
        if ex.model is not None and (
            ex.takes_slot
            or ex.unload
            or request.path in MODEL_INFO_PATHS
            or request.path.startswith(OPENAI_MODEL_PREFIX)
        ):
            ex.model_key = normalize_model(ex.model)

    # -- admit and attempt ------------------------------------------------------------------

    async def _forward(self, request: Incoming, ex: Exchange) -> Outcome:
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
                    # Back to the pool only after a clean end; otherwise closed, which is
                    # also what makes the node stop generating for a client that left.
                    upstream.conn.finish(reusable=upstream.complete)
            finally:
                lease.release()

    async def _attempt(
        self, request: Incoming, ex: Exchange, node: Node, tried: list[Node]
    ) -> Upstream | None:
        """The node's response headers, or None when the request should go to another node."""
        ex.node = node
        ex.attempts += 1
        try:
            upstream = await self._send(request, ex, node)
            ex.first_byte = time.monotonic()  # the node's status line and headers are in
        except UpstreamError as err:
            self.health.passive_failure(node, err.kind)
            self.metrics.upstream_error(node, err.kind)
            tried.append(node)
            if err.may_retry and self._may_retry(ex, tried):
                self.metrics.retry(err.kind)
                return None
            raise _gateway_error(node, err) from None
        if upstream.head.status == 503 and self._may_retry(ex, [*tried, node]):
            # Ollama's own queue is full: nothing was generated, another node may have room.
            upstream.conn.finish(reusable=False)
            tried.append(node)
            self.metrics.retry("node_busy")
            return None
        return upstream

    def _may_retry(self, ex: Exchange, tried: list[Node]) -> bool:
        """Attempts are left, and some node that has not failed this request could take it."""
        if ex.attempts >= self.max_attempts:
            return False
        others = want_for(self.pool, ex.model_key, spill_after=0, exclude=tried)
        return bool(self.pool.candidates(others))

    async def _admit(self, ex: Exchange, tried: list[Node]) -> Lease:
        """A slot for inference; for other requests a node with no slot counted."""
        if ex.model_key is not None:
            self._check_model_available(ex.model_key, ex.model or ex.model_key)
        want = want_for(self.pool, ex.model_key, self.spill_after, exclude=tried)
        if ex.takes_slot:
            queued_at = time.monotonic()
            lease = await self.pool.acquire(want)
            ex.queue_wait += time.monotonic() - queued_at
            self.metrics.queue_wait(time.monotonic() - queued_at)
        else:
            node = self.pool.any_node(want)
            if node is None:
                raise ProxyError(503, "no healthy node is available", retry_after=1)
            lease = Lease.unmetered(node)
        if ex.model_key is not None and ex.takes_slot and not lease.node.is_resident(ex.model_key):
            ex.cold = True
            self.metrics.cold_load(lease.node, ex.model_key)
        return lease

    def _check_model_available(self, model_key: str, named: str) -> None:
        """404 when no node has the model, 503 when only nodes that are down may have it."""
        where = availability(self.pool, model_key)
        if where == "down":
            raise Unavailable(f"model '{named}' is only on nodes that are down", retry_after=5)
        if where == "nowhere":
            raise ProxyError(404, f"model '{named}' not found, try pulling it first")

    async def _send(self, request: Incoming, ex: Exchange, node: Node) -> Upstream:
        """Send the request and wait for the node's status and headers."""
        connections = self.upstreams.to(node.url)
        raw = request_bytes(
            request.method,
            request.target,  # exactly as the client sent it (path and query)
            connections.host_header,
            _request_headers(request),
            ex.body,
        )
        while True:
            conn, reused = await connections.get()
            answer = conn.send(raw, body_expected=request.method != "HEAD")
            try:
                head = await answer.headers_done
            except UpstreamError as err:
                conn.finish(reusable=False)
                if reused and err.kind == "reset":
                    continue  # a kept-alive connection the node had closed: nothing was done
                raise
            except BaseException:
                conn.finish(reusable=False)  # the client left: closing stops the node
                raise
            return Upstream(conn, answer, head)

    # -- relay ------------------------------------------------------------------------------

    async def _relay(self, request: Incoming, ex: Exchange, upstream: Upstream) -> Relayed:
        """Pass the node's response through, each chunk as it arrives."""
        node = ex.node
        assert node is not None
        head = upstream.head
        if upstream.answer.body_expected and (head.content_length or 0) in _WHOLE_BODY_SIZES:
            return await self._relay_whole(request, ex, node, upstream)
        framing = _Framing.of(request, upstream)
        ex.status = head.status
        relay = _Relay(_client_transport(request), _response_head(head, framing), framing, upstream)
        try:
            await relay.run()  # the head goes out first: the commit point, no retry after it
        except UpstreamError as err:
            self.health.passive_failure(node, err.kind)
            self.metrics.upstream_error(node, err.kind)
            _break_stream(relay.transport, framing.chunked, head, node, err)
            return Relayed(head.status, keep_alive=False)
        relay.client.end()  # a body the node delimited by closing ends here, not with a chunk
        upstream.complete = True
        self._after_response(ex, node, head, relay.client.tail)
        return Relayed(head.status, keep_alive=framing.keep_alive)

    async def _relay_whole(
        self, request: Incoming, ex: Exchange, node: Node, upstream: Upstream
    ) -> Relayed:
        """A short answer of known length: taken whole, then sent with its head at once."""
        try:
            await upstream.answer.body_done  # the pieces wait in the answer
        except UpstreamError as err:
            self.health.passive_failure(node, err.kind)
            self.metrics.upstream_error(node, err.kind)
            raise _gateway_error(node, err) from None  # nothing was sent: a clean error
        upstream.complete = True
        head = upstream.head
        body = b"".join(upstream.answer.pending)
        ex.status = head.status
        self._after_response(ex, node, head, (body,))
        framing = _Framing.of(request, upstream)
        _client_transport(request).write(_response_head(head, framing) + body)
        return Relayed(head.status, keep_alive=framing.keep_alive)

    def _after_response(self, ex: Exchange, node: Node, head: Head, tail: Iterable[bytes]) -> None:
        """Once per request, after the last byte: health evidence and token telemetry."""
        if head.status >= 500 and head.status != 503:  # 503 is load, not a fault
            self.health.passive_failure(node, "status_5xx")
            self.metrics.upstream_error(node, "status_5xx")
        else:
            self.health.passive_success(node)
        if head.status == 200 and ex.path in TELEMETRY_PATHS:
            ex.usage = usage_from_tail(tail, _content_type(head))
        if head.status == 200 and ex.model_key is not None and ex.takes_slot:
            self.discovery.served(node, ex.model_key)
            if ex.usage is not None:
                node.record_usage(ex.model_key, ex.usage)
            if ex.cold:  # loading it may have pushed another model out of memory
                self.discovery.refresh_soon(node)


_REQUEST_ID_PREFIX = os.urandom(4).hex()  # tells this process's ids from another replica's
_request_numbers = itertools.count(1)


_WHOLE_BODY_SIZES = range(1, WHOLE_BODY_MAX + 1)


def _new_request_id() -> str:
    """Unique per process and cheap: a random prefix and a counter (uuid4 costs a syscall)."""
    return f"{_REQUEST_ID_PREFIX}-{next(_request_numbers):x}"


def _request_headers(request: Incoming) -> list[tuple[bytes, bytes]]:
    """The client's end-to-end headers, as it sent them."""
    named = _connection_tokens(v for k, v in request.raw_headers if k.lower() == b"connection")
    return [
        (k, v)
        for k, v in request.raw_headers
        if (lower := k.lower()) not in HOP_BY_HOP
        and lower not in RESET_REQUEST_HEADERS
        and lower not in named
    ]


def _connection_tokens(connection_values: Iterable[bytes]) -> set[bytes]:
    """Headers named in ``Connection`` are hop-by-hop too (RFC 9110 §7.6.1)."""
    tokens: set[bytes] = set()
    for value in connection_values:
        tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def _gateway_error(node: Node, err: UpstreamError) -> ProxyError:
    if err.kind == "timeout":
        return ProxyError(504, f"node {node.name} did not answer in time: {err.detail}")
    return ProxyError(502, f"node {node.name} failed: {err.detail}")


def _break_stream(
    transport: asyncio.Transport, chunked: bool, head: Head, node: Node, err: UpstreamError
) -> None:
    """The node failed mid-body: end the client's stream so that it cannot look complete.

    A streamed (chunked) body gets one more line in its own format, ``{"error": ...}`` for
    NDJSON or an SSE ``data:`` event, then the connection closes without the terminating
    chunk. A body with a Content-Length just closes short of its length.
    """
    message = f"node {node.name} failed mid-response: {err.detail}"
    if chunked:
        if _content_type(head) == "text/event-stream":
            event = {"error": {"message": message, "type": "api_error"}}
            line = b"data: " + json.dumps(event).encode() + b"\n\n"
        else:
            line = json.dumps({"error": message}).encode() + b"\n"
        transport.write(chunk_framed([line]))
    transport.close()  # flushes what was written, then FIN: never the last chunk


def _content_type(head: Head) -> str:
    for name, value in head.raw_headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower().decode("latin-1")
    return ""


@dataclass
class Upstream:
    """A node's answer under way: the connection, the answer, and its status and headers."""

    conn: Connection
    answer: Answer
    head: Head
    complete: bool = False  # the whole body was relayed: the connection may be reused


@dataclass(frozen=True)
class _Framing:
    """How the client's response is delimited, and whether its connection stays open."""

    chunked: bool  # the client gets chunks (the node's, or framed anew), then a last chunk
    keep_alive: bool

    @classmethod
    def of(cls, request: Incoming, upstream: Upstream) -> _Framing:
        head = upstream.head
        http11 = request.version >= (1, 1)
        chunked = head.has_body and head.content_length is None and http11
        # Without chunks or a length, only the connection's end can delimit the body.
        delimited = chunked or head.content_length is not None or not head.has_body
        return cls(chunked, request.keep_alive and http11 and delimited)


@dataclass(slots=True)
class Relayed:
    """An answer the request path wrote to the client's transport itself, head and body.

    The head is the node's, byte for byte (aiohttp's writer would add a ``Server`` header the
    node never sent), and goes out with the first body bytes, the last chunk with the last
    ones: a system call less for each.
    """

    status: int
    keep_alive: bool  # the client's connection may carry another request


Outcome = web.StreamResponse | Relayed  # the proxy's own answer to send, or one sent


def _for_aiohttp(outcome: Outcome) -> web.StreamResponse:
    return _Written(outcome) if isinstance(outcome, Relayed) else outcome


class _Written(web.StreamResponse):
    """A relayed answer as aiohttp's server takes it: it writes nothing more."""

    def __init__(self, relayed: Relayed) -> None:
        super().__init__(status=relayed.status)
        self._relayed_keep_alive = relayed.keep_alive

    @property
    def keep_alive(self) -> bool:
        return self._relayed_keep_alive

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def _client_transport(request: Incoming) -> asyncio.Transport:
    if request.client_left():
        raise ConnectionResetError("the client left")  # observe() ends the request quietly
    assert request.transport is not None  # client_left() said so
    return request.transport


def _response_head(head: Head, framing: _Framing) -> bytes:
    """The node's status line and end-to-end header lines as it sent them, and our framing."""
    named = _connection_tokens(v for k, v in head.raw_headers if k.lower() == b"connection")
    lines = [b"HTTP/1.1 %d %b\r\n" % (head.status, head.raw_reason)]
    for name, value in head.raw_headers:
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named:
            lines.append(b"%b: %b\r\n" % (name, value))
    if framing.chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if not framing.keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class _Relay:
    """Moves body bytes from the node's connection to the client's, from the read callback.

    The connection writes each read to the client in the callback that parsed it
    (``Connection.data_received``): no task switch per chunk. This waits for the end, and
    pauses the node while the client lags behind.
    """

    def __init__(
        self, transport: asyncio.Transport, head: bytes, framing: _Framing, upstream: Upstream
    ) -> None:
        self.transport = transport
        self.upstream = upstream
        self.client = ClientSide(
            transport,
            head,
            framing.chunked,
            deque(maxlen=TAIL_CHUNKS),
            CLIENT_BUFFER_HIGH,
            self._client_full,
        )
        self.resuming: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Until the node's answer has ended; raises the node's failure, if any."""
        self.upstream.conn.relay_to(self.client)
        try:
            await self.upstream.answer.body_done
        finally:
            if self.resuming is not None:
                self.resuming.cancel()

    def _client_full(self) -> None:
        if self.resuming is None:
            self.upstream.conn.pause()  # stop reading the node until the client catches up
            self.resuming = asyncio.ensure_future(self._resume_when_client_caught_up())

    async def _resume_when_client_caught_up(self) -> None:
        """A slow client: read from the node again once the client has taken most of it."""
        # aiohttp has no public way to await a drained transport outside its own writer; a
        # slow client is rare and a few milliseconds of polling cost nothing per chunk.
        while (  # noqa: ASYNC110
            self.transport.get_write_buffer_size() > CLIENT_BUFFER_LOW
            and not self.transport.is_closing()
        ):
            await asyncio.sleep(0.005)
        self.resuming = None
        self.upstream.conn.resume()
