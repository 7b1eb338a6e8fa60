"""The front door: the listening socket's connections, and which server reads them.

Requests to be passed to a node (generate, chat, embeddings, show, the OpenAI paths, any
path the proxy does not answer itself) are nearly all a proxy does, and aiohttp's server costs
about as much CPU per request as the proxy's own work (its ``Request``, router and response
machinery). So each connection starts here: an asyncio protocol whose requests are split by
their head's Content-Length and parsed by httptools (llhttp, the parser aiohttp uses too), and
served straight into ``Forwarder.serve``; the fleet's merged listings too (``/api/tags``,
``/api/ps``, ``/api/version``, ``/v1/models``), so that a client mixing them with generations
on one kept-alive connection keeps it here.

Anything else, or anything unusual (a path aiohttp's router has a route for, such as admin,
metrics, pull or blobs; a chunked request body, ``Expect``, ``Upgrade``; a percent-encoded or
absolute target; a head that is too long or does not parse; a body over the limit) hands the
connection to aiohttp's server with every byte read so far: from then on aiohttp serves that
connection, with all its checks and answers. The front door never answers an edge case itself.

Requests on a connection are served one at a time, in order; a pipelined request waits
buffered (reading pauses past ``BUFFERED_MAX``). A client that leaves cancels its request,
as aiohttp's ``handler_cancellation`` does: the request path then closes the node's
connection, which stops the generation.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from functools import lru_cache

import httptools
from aiohttp import web

from .errors import error_response
from .forward import Forwarder, Relayed
from .incoming import Incoming

log = logging.getLogger("ollama_proxy")

HEAD_MAX = 8 * 1024  # longer heads (rare) go to aiohttp, which has its own limits
BUFFERED_MAX = 1024 * 1024  # bytes of pipelined requests held while one is served
KEEPALIVE_TIMEOUT = 75.0  # seconds an idle connection stays open; aiohttp's default
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_BARE_LF_END = re.compile(rb"\n\r?\n")  # a head's end without CRLFs: never ours to serve
_AIOHTTP_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})

Answer = Callable[[], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Routes:
    """What the front door serves itself; every other request goes to aiohttp's router."""

    answers: Mapping[str, Answer]  # GET and HEAD paths answered by the proxy itself
    aiohttp_paths: frozenset[str]  # paths aiohttp's router has a route of its own for
    aiohttp_prefixes: tuple[str, ...]  # ... and the beginnings of its variable paths

    @classmethod
    def of(cls, router: web.UrlDispatcher, answers: Mapping[str, Answer]) -> Routes:
        """From the router, so that a route added there is never shadowed by the front door.

        The catch-all route (``/{tail:.*}``, the forwarder's) is the one left out.
        """
        paths: set[str] = set()
        prefixes: list[str] = []
        for resource in router.resources():
            info = resource.get_info()
            if "path" in info:
                paths.add(info["path"])
            elif "formatter" in info and (prefix := info["formatter"].split("{")[0]) != "/":
                prefixes.append(prefix)
        return cls(answers, frozenset(paths), tuple(prefixes))

    def for_aiohttp(self, path: str) -> bool:
        return path in self.aiohttp_paths or path.startswith(self.aiohttp_prefixes)


class FrontDoor:
    """The protocol factory of the listening socket, and its open connections."""

    def __init__(
        self,
        forwarder: Forwarder,
        routes: Routes,
        aiohttp_server: Callable[[], asyncio.Protocol],
    ) -> None:
        self.forwarder = forwarder
        self.routes = routes
        self.aiohttp_server = aiohttp_server  # a new aiohttp connection handler per call
        self.connections: set[ClientConnection] = set()
        self.closing = False

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def shutdown(self) -> None:
        """No new requests: idle connections close now, busy ones after their answer."""
        self.closing = True
        for conn in list(self.connections):
            if conn.serving is None:
                conn.close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()


class RequestHead:
    """One request's line and headers, from httptools' callbacks; then what serves it."""

    __slots__ = ("answer", "content_length", "headers", "incoming", "size", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.size = 0  # bytes of the head, blank line included
        self.content_length = 0
        self.incoming: Incoming | None = None  # the request for the request path, body aside
        self.answer: Answer | None = None  # the proxy's own answer, else the forwarder

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


class ClientConnection(asyncio.Protocol):
    """One client connection, until it closes or goes to aiohttp."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer: bytes | bytearray = b""  # read, not yet served
        self.head: RequestHead | None = None  # of the request being read
        self.serving: asyncio.Task[None] | None = None
        self.reading_paused = False
        self.last_activity = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self.peer = ""

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # As aiohttp's server: a vanished peer is noticed. (TCP_NODELAY, so that tokens
            # leave at once, both asyncio's and uvloop's transports set themselves.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self.door.connections.add(self)
        self.door.forwarder.metrics.client_connections.inc()
        self._idle_timer = self.loop.call_at(
            self.last_activity + KEEPALIVE_TIMEOUT, self._close_if_idle
        )

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if not self.buffer:
            self.buffer = data  # the usual case: a whole request in one read, not copied
        elif isinstance(self.buffer, bytearray):
            self.buffer += data
        else:  # a request in several reads (a large body): grown in place, not copied each time
            self.buffer = bytearray(self.buffer) + data
        if self.serving is None:
            self._take_request()
        elif len(self.buffer) > BUFFERED_MAX and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining faster than it is served
            self.reading_paused = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.connections.discard(self)
        self._cancel_idle_timer()
        if self.serving is not None:
            self.serving.cancel()  # the client left: stop its request (and the node) now

    # -- requests ---------------------------------------------------------------------------

    def _take_request(self) -> None:
        """Serve the next request once all of it is here; give aiohttp anything else."""
        if self.door.closing:
            return  # draining: nothing new starts; the connection closes when idle
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > HEAD_MAX or _BARE_LF_END.search(self.buffer):
                    self._hand_off()  # too long, or ended by bare LFs: aiohttp answers 400
                return
            self.head = self._parse_head(bytes(self.buffer[: end + 4]))
            if self.head is None:
                self._hand_off()
                return
        head = self.head
        end_of_body = head.size + head.content_length
        if len(self.buffer) < end_of_body:
            return  # the rest of the body is on its way
        incoming = head.incoming
        assert incoming is not None  # _parse_head made it
        incoming.body = bytes(self.buffer[head.size : end_of_body])
        self.buffer = bytes(self.buffer[end_of_body:])
        self.head = None
        self.serving = self.loop.create_task(self._serve(incoming, head.answer))

    def _parse_head(self, raw: bytes) -> RequestHead | None:
        """The head of a request the front door serves, or None: aiohttp's to serve."""
        head = RequestHead()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(raw)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        target = head.url
        if not target.startswith(b"/") or b"%" in target or b"#" in target or not target.isascii():
            return None  # aiohttp decodes and normalises such targets: its request
        path = target.partition(b"?")[0].decode()
        method = parser.get_method().decode()
        version = _VERSIONS.get(parser.get_http_version())
        lengths = 0
        for name, value in head.headers:
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit():
                    return None
                head.content_length = int(value)
                lengths += 1
            elif lower in _AIOHTTP_HEADERS:
                return None
        if version is None or lengths > 1:
            return None
        if method in ("GET", "HEAD") and path in self.door.routes.answers:
            if head.content_length:
                return None
            head.answer = self.door.routes.answers[path]
        elif self.door.routes.for_aiohttp(path):
            return None
        if head.content_length > self.door.forwarder.max_body_size:
            return None  # aiohttp answers 413, as the request path would
        head.size = len(raw)
        head.incoming = Incoming(
            method,
            path,
            target.decode(),
            head.headers,
            version,
            parser.should_keep_alive(),
            self.peer,
            self.transport,
        )
        return head

    async def _serve(self, incoming: Incoming, answer: Answer | None) -> None:
        forwarder = self.door.forwarder
        try:
            if answer is None:
                response = await forwarder.serve(incoming)
            else:
                response = await forwarder.serve_own(incoming, answer)
            keep_alive = incoming.keep_alive
        except asyncio.CancelledError:
            return  # the client left (connection_lost)
        except Exception:
            log.exception("error handling request")
            response, keep_alive = error_response(500, "internal proxy error"), False
        finally:
            self.serving = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if isinstance(response, Relayed):
            keep_alive = response.keep_alive  # head and body went out already
        else:
            # The proxy's own answer (an error, a listing, an unload).
            transport.write(_serialised(response, incoming.method, keep_alive=keep_alive))
        if not keep_alive or self.door.closing:
            transport.close()
            return
        self.last_activity = self.loop.time()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        if self.buffer:
            self._take_request()  # a pipelined request

    def _hand_off(self) -> None:
        """aiohttp serves this connection from now on, from its first unserved byte."""
        transport = self.transport
        assert transport is not None
        self.door.connections.discard(self)
        self._cancel_idle_timer()
        self.door.forwarder.metrics.connections_to_aiohttp.inc()
        handler = self.door.aiohttp_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        buffered, self.buffer = self.buffer, b""
        if buffered:
            handler.data_received(bytes(buffered))
        if self.reading_paused:
            transport.resume_reading()

    # -- keep-alive -------------------------------------------------------------------------

    def _close_if_idle(self) -> None:
        """Close a connection idle for KEEPALIVE_TIMEOUT; one timer, moved on lazily."""
        deadline = self.last_activity + KEEPALIVE_TIMEOUT
        if self.serving is not None or self.loop.time() < deadline:
            self._idle_timer = self.loop.call_at(
                max(deadline, self.loop.time() + 1.0), self._close_if_idle
            )
            return
        self._idle_timer = None
        self.close()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _serialised(response: web.StreamResponse, method: str, *, keep_alive: bool) -> bytes:
    """The proxy's own short answer, framed as aiohttp would (less its Server header)."""
    assert isinstance(response, web.Response)  # the proxy's own answers are whole
    body = response.body if isinstance(response.body, bytes) else b""
    lines = [
        b"HTTP/1.1 %d %b\r\n" % (response.status, response.reason.encode("latin-1")),
        b"Date: %b\r\n" % _http_date(int(time.time())),  # RFC 9110 §6.6.1: from a clock
    ]
    for name, value in response.headers.items():
        if name.lower() not in ("content-length", "connection", "transfer-encoding", "date"):
            lines.append(b"%b: %b\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    lines.append(b"Content-Length: %d\r\n" % len(body))
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    return b"".join(lines) + b"\r\n" + (b"" if method == "HEAD" else body)


@lru_cache(maxsize=1)
def _http_date(second: int) -> bytes:
    return formatdate(second, usegmt=True).encode()
