"""Connections to the nodes: one HTTP/1.1 exchange at a time, parsed by httptools (llhttp).

A connection only parses. What httptools reports (the head, body pieces, the message's end)
goes to the answer's sink (``answer.Answer``), given by the request path with each request;
the connection never writes to a client. Its state is explicit (as httpcore's): NEW until its
first request, ACTIVE while an exchange is under way, IDLE in its node's pool, CLOSED. It
goes back to the pool only when the parser saw the whole answer, the node's framing allows
another request, and the request itself was fully written.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from .config import (
    DEFAULT_CLIENT_TIMEOUT,
    DEFAULT_IDLE_CONNECTION_TIMEOUT,
    DEFAULT_MAX_IDLE_CONNECTIONS,
)
from .errors import Unavailable, UpstreamError, failure_text, is_shortage
from .http1 import Head


class Sink(Protocol):
    """Where a connection puts what it parsed of one answer."""

    def head_received(self, head: Head) -> None: ...

    def body_received(self, data: bytes) -> None: ...

    def ended(self) -> None: ...

    def failed(self, error: UpstreamError) -> None: ...

    def client_progressed(self) -> bool:
        """Whether the client took bytes since the last look, or none wait for it."""
        ...

    def client_stalled(self) -> None:
        """The client took nothing for ``client_timeout``: drop it (its fault, not the node's)."""
        ...


class State(enum.Enum):
    NEW = "new"  # connected, never used
    ACTIVE = "active"  # a request sent, its answer not yet over
    IDLE = "idle"  # kept alive in the node's pool
    CLOSED = "closed"


class Connection(asyncio.Protocol):
    def __init__(self, pool: NodeConnections) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.state = State.NEW
        self.transport: asyncio.Transport | None = None
        self.sink: Sink | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: Head | None = None
        self.message_complete = False
        self.unsolicited = False  # the node sent more than one answer
        self.paused = False  # by the request path: the client is behind
        # Since when the client has taken nothing, as far as the timer looked (the bytes
        # waiting for it did not move); reset whenever they are seen to move or be none.
        self.client_idle_since = 0.0
        self._informational = False
        self.last_activity = 0.0
        self._body_expected = True
        self._idle_timer: asyncio.TimerHandle | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._raw_reason = b""
        self._pieces: list[bytes] = []
        self.on_body = self._pieces.append  # called by httptools per piece: a C callable

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.state is not State.ACTIVE:  # bytes nobody asked for: the node is confused
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._hand_over_pieces()
            self._fail(UpstreamError("broken", f"invalid HTTP from node: {exc}"))
            self.close()
            return
        except httptools.HttpParserUpgrade:  # pragma: no cover - Ollama never upgrades
            self._fail(UpstreamError("broken", "node tried to upgrade the connection"))
            self.close()
            return
        self._hand_over_pieces()

    def connection_lost(self, exc: Exception | None) -> None:
        was_active = self.state is State.ACTIVE
        self.state = State.CLOSED
        self._cancel_idle_timer()
        self.pool.forget(self)
        if not was_active or self.message_complete:
            return
        head = self.head
        if head is None:
            self._fail(UpstreamError("reset", "connection closed before the node answered"))
        elif head.content_length is None and not self._chunked(head):
            self._end()  # a body delimited by the connection's end (an HTTP/1.0 node)
        else:
            self._fail(UpstreamError("broken", "node closed the connection mid-response"))

    # -- httptools callbacks ----------------------------------------------------------------

    # Kept as bytes: they are what the client gets, and the few the proxy reads (length,
    # framing, content type) are ASCII.
    def on_status(self, status: bytes) -> None:
        self._raw_reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_message_begin(self) -> None:
        if self.message_complete:  # a second answer to one request: trust neither
            self.sink = None
            self.unsolicited = True

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() < 200:  # 1xx: informational, the answer follows
            self._raw_headers, self._raw_reason = [], b""
            self._informational = True
            return
        head = Head(
            status=self.parser.get_status_code(),
            raw_reason=self._raw_reason,
            raw_headers=self._raw_headers,
            keep_alive=self.parser.should_keep_alive(),
        )
        for name, value in head.raw_headers:
            if name.lower() == b"content-length":
                head.content_length = int(value.strip())  # llhttp allows digits only, once
        head.has_body = self._body_expected and head.status not in (204, 304)
        self.head = head
        if self.sink is not None:
            self.sink.head_received(head)
        if not head.has_body:
            # A HEAD answer's Content-Length is not a body, but the parser would wait for
            # one: the answer ends here, and the connection is not used again (the parser
            # never says it is complete).
            self._end()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._hand_over_pieces()  # the last ones came in the read that ended the message
        self.message_complete = True
        self._end()

    # -- use --------------------------------------------------------------------------------

    def send(self, request: bytes, sink: Sink, *, body_expected: bool) -> None:
        """Write one request; what comes back goes to ``sink``."""
        assert self.transport is not None and self.state in (State.NEW, State.IDLE)
        self.state = State.ACTIVE
        self.sink = sink
        self.parser = httptools.HttpResponseParser(self)
        self.head = None
        self.message_complete = self.unsolicited = self._informational = False
        self._body_expected = body_expected
        self._raw_headers = []
        self._raw_reason = b""
        self.last_activity = self.client_idle_since = self.loop.time()
        self.transport.write(request)
        if self._idle_timer is None:  # else the one armed before looks again when it fires
            self._look_at(self.last_activity + self.pool.idle_timeout)

    def finish(self) -> None:
        """The exchange is over: back to the pool if it may carry another, else closed."""
        if self.state is not State.ACTIVE:
            return
        self.sink = None
        if self.reusable:
            self.resume_reading()
            self.state = State.IDLE
            self.pool.give_back(self)
        else:
            self.close()

    @property
    def reusable(self) -> bool:
        """The parser saw the whole answer, the node keeps the connection, and the request
        left entirely (a node may answer before it has read all of a request)."""
        return (
            self.message_complete
            and not self.unsolicited
            and self.head is not None
            and self.head.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
            and self.transport.get_write_buffer_size() == 0
        )

    def pause_reading(self) -> None:
        if self.transport is not None and self.state is State.ACTIVE:
            self.paused = True
            self.client_idle_since = self.loop.time()  # the sink noted the client's backlog
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.paused and self.state is not State.CLOSED:
            self.paused = False
            self.last_activity = self.loop.time()  # the pause was the client's, not the node's
            self.transport.resume_reading()

    def close(self) -> None:
        """Close now: for a node, a closed connection is the signal to stop generating."""
        self.state = State.CLOSED
        self._cancel_idle_timer()
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    # -- to the sink ------------------------------------------------------------------------

    def _hand_over_pieces(self) -> None:
        pieces = self._pieces
        if pieces and self.sink is not None:
            self.sink.body_received(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        pieces.clear()

    def _end(self) -> None:
        if self.sink is not None:
            self.sink.ended()

    def _fail(self, error: UpstreamError) -> None:
        if self.sink is not None:
            self.sink.failed(error)

    @staticmethod
    def _chunked(head: Head) -> bool:
        return any(
            name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
            for name, value in head.raw_headers
        )

    # -- timeouts ---------------------------------------------------------------------------

    # One timer per connection, armed by its first request and kept across the ones after
    # (a timer armed and cancelled per request costs more than the rest of the exchange's
    # bookkeeping). When it fires during an exchange it looks at the client (have the bytes
    # waiting for it not moved for client_timeout?) and, while the proxy reads the node, at
    # the node (silent for idle_timeout?); in the pool, at whether the connection has been
    # unused for idle_connection_timeout. It never sleeps longer than the shorter of the
    # last two, so a connection given back, or a client that stops, just after a look is
    # still seen in time, without a timer armed per pause or per return.

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.state is State.IDLE:
            self._check_expiry()
        elif self.state is State.ACTIVE:
            self._check_exchange()

    def _check_exchange(self) -> None:
        now = self.loop.time()
        if self.sink is None or self.sink.client_progressed():
            self.client_idle_since = now
        deadline = self.client_idle_since + self.pool.client_timeout
        if now >= deadline:
            self._drop_client()
            return
        if not (self.paused or self.message_complete):  # we read the node: its silence counts
            silent_until = self.last_activity + self.pool.idle_timeout
            if now >= silent_until:
                timeout = self.pool.idle_timeout
                self._fail(UpstreamError("timeout", f"no bytes from the node for {timeout:g}s"))
                self.close()
                return
            deadline = min(deadline, silent_until)
        self._look_at(deadline)

    def _drop_client(self) -> None:
        """The client took nothing for client_timeout: its fault, never the node's."""
        sink, self.sink = self.sink, None
        self.close()  # the node stops generating for a client that takes nothing
        if sink is not None:  # always: without a sink there is no client to judge
            sink.client_stalled()

    def _check_expiry(self) -> None:
        """In the pool: closed once unused for idle_connection_timeout since the node's last
        bytes (the node may drop it about then, and a stale one costs a retry)."""
        deadline = self.last_activity + self.pool.idle_expiry
        if self.loop.time() < deadline:
            self._look_at(deadline)
        else:
            self.close()

    def _look_at(self, deadline: float) -> None:
        deadline = min(deadline, self.loop.time() + self.pool.longest_sleep)
        self._idle_timer = self.loop.call_at(deadline, self._idle_check)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class NodeConnections:
    """Kept-alive connections to one node."""

    def __init__(
        self,
        url: str,
        connect_timeout: float,
        idle_timeout: float,
        *,
        client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
        max_idle: int = DEFAULT_MAX_IDLE_CONNECTIONS,
        idle_expiry: float = DEFAULT_IDLE_CONNECTION_TIMEOUT,
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.https = parts.scheme == "https"
        self.port = parts.port or (443 if self.https else 80)
        self.host_header = parts.netloc
        self.base_path = parts.path.rstrip("/")  # an Ollama behind another proxy's sub-path
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.client_timeout = client_timeout
        self.max_idle = max_idle  # kept-alive connections at most; the oldest go first
        self.idle_expiry = idle_expiry  # one unused this long since the node's last bytes closes
        self.idle: list[Connection] = []  # oldest first; the newest is used first
        self.retired = False  # the node left the config: connections close when done
        self.tls = ssl.create_default_context() if self.https else None

    @property
    def longest_sleep(self) -> float:
        """How long a connection's timer may sleep and still see every deadline on time."""
        return min(self.client_timeout, self.idle_expiry)

    async def get(self) -> tuple[Connection, bool]:
        """A connection and whether it was reused (a reused one may have gone stale)."""
        while self.idle:
            conn = self.idle.pop()
            if conn.state is State.IDLE:
                return conn, True
        return await self._connect(), False

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, protocol = await loop.create_connection(
                    lambda: Connection(self), self.host, self.port, ssl=self.tls
                )
        except TimeoutError:
            timeout = self.connect_timeout
            raise UpstreamError("connect", f"connect timed out after {timeout:g}s") from None
        except OSError as exc:
            if is_shortage(exc):  # the proxy's own shortage: the node was not even asked
                raise Unavailable(
                    f"the proxy is short of resources to reach a node: {exc.strerror or exc}",
                    reason="resources",
                ) from None
            raise UpstreamError("connect", failure_text(exc)) from None
        protocol.transport = transport  # uvloop may call connection_made only later
        return protocol

    def give_back(self, conn: Connection) -> None:
        if self.retired:
            conn.close()
            return
        self.idle.append(conn)
        if len(self.idle) > self.max_idle:
            self.idle[0].close()  # the oldest: the likeliest to have gone stale

    def forget(self, conn: Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def close_all(self) -> None:
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()


class Upstreams:
    """Connections to every node, created on first use; limits from the current config."""

    def __init__(self, connect_timeout: float, idle_timeout: float) -> None:
        self.by_url: dict[str, NodeConnections] = {}
        self.configure(connect_timeout, idle_timeout)

    def configure(
        self,
        connect_timeout: float,
        idle_timeout: float,
        urls: frozenset[str] | None = None,
        *,
        client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
        max_idle: int = DEFAULT_MAX_IDLE_CONNECTIONS,
        idle_expiry: float = DEFAULT_IDLE_CONNECTION_TIMEOUT,
    ) -> None:
        """New limits; with ``urls``, the nodes that are left (others' idle ones close)."""
        self.connect_timeout, self.idle_timeout = connect_timeout, idle_timeout
        self.client_timeout, self.max_idle, self.idle_expiry = client_timeout, max_idle, idle_expiry
        for url, node in list(self.by_url.items()):
            self._apply(node)
            if urls is not None and url not in urls:
                node.retired = True
                node.close_all()
                del self.by_url[url]

    def to(self, url: str) -> NodeConnections:
        node = self.by_url.get(url)
        if node is None:
            node = self.by_url[url] = NodeConnections(url, self.connect_timeout, self.idle_timeout)
            self._apply(node)
        return node

    def _apply(self, node: NodeConnections) -> None:
        node.connect_timeout, node.idle_timeout = self.connect_timeout, self.idle_timeout
        node.client_timeout, node.max_idle = self.client_timeout, self.max_idle
        node.idle_expiry = self.idle_expiry

    def close(self) -> None:
        for node in self.by_url.values():
            node.retired = True
            node.close_all()
