"""The connection to a node, at the level of bytes: one HTTP/1.1 exchange at a time.

aiohttp's client costs about 20 µs of Python per streamed chunk (a StreamReader, a future and
a timer per read). Here each read from the node is parsed by httptools (C) and handed, in the
same callback, to a ``sink`` that writes it to the client: no task switch, no copy of the
body into a buffer. Flow control runs both ways: a slow client pauses reading from the node.

Per read, the only Python frames are ``data_received`` and the sink: httptools hands body
pieces and chunk boundaries to C callables (``list.append``). A read that holds whole chunks
of a chunked body, and nothing else, is marked as such, so that the relay can pass the node's
chunked framing on as it is instead of framing the pieces anew.

Connections are kept alive and reused per node. The idle timeout is checked lazily (one timer
per timeout period, not one per chunk).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from .errors import UpstreamError

# Per read from the node: the bytes as read, the body pieces httptools parsed from them, and
# whether those bytes are exactly whole chunks of a chunked body (nothing of the head, of a
# chunk begun or finished in another read, or of the last chunk).
Sink = Callable[[bytes, list[bytes], bool], None]


@dataclass
class Head:
    """The node's status line and headers."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True


@dataclass
class Answer:
    """One request's answer as it arrives: its head, then the end of its body."""

    headers_done: asyncio.Future[Head]
    body_done: asyncio.Future[None]
    head: Head | None = None
    body_expected: bool = True
    pending: list[bytes] = field(default_factory=list)  # body pieces before a sink is attached


class Connection(asyncio.Protocol):
    def __init__(self, pool: NodeConnections) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: Answer | None = None
        self.sink: Sink | None = None
        self.closed = False
        self.last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._header_items: list[tuple[str, str]] = []
        self._status_reason = ""
        # httptools calls these per piece and per chunk: C callables, no Python frame.
        self._pieces: list[bytes] = []
        self.on_body = self._pieces.append
        self._chunk_marks: list[int] = []  # +1 per chunk begun, -1 per chunk finished
        self.on_chunk_header = functools.partial(self._chunk_marks.append, 1)
        self.on_chunk_complete = functools.partial(self._chunk_marks.append, -1)
        self._chunked_body = False  # in the body of a chunked answer
        self._open_chunks = 0  # chunks begun and not finished

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        starts_between_chunks = self._chunked_body and self._open_chunks == 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("broken", f"invalid HTTP from node: {exc}"))
            self.close()
            return
        except httptools.HttpParserUpgrade:  # pragma: no cover - Ollama never upgrades
            self._fail(UpstreamError("broken", "node tried to upgrade the connection"))
            self.close()
            return
        marks = self._chunk_marks
        if marks:
            self._open_chunks += sum(marks)
            marks.clear()
        pieces = self._pieces
        if not pieces:
            return
        if self.sink is not None:
            whole_chunks = (
                starts_between_chunks and self._open_chunks == 0 and self._chunked_body
            )  # the last chunk ends the body (on_message_complete): never whole
            self.sink(data, pieces, whole_chunks)
        elif self.answer is not None:
            self.answer.pending.extend(pieces)
        pieces.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle_timer()
        self.pool.forget(self)
        ex = self.answer
        if ex is None:
            return
        if not ex.headers_done.done():
            self._fail(UpstreamError("reset", "connection closed before the node answered"))
        elif not ex.body_done.done():
            if ex.head is not None and ex.head.content_length is None and not ex.head.chunked:
                ex.body_done.set_result(None)  # a body delimited by the connection's end
            else:
                self._fail(UpstreamError("broken", "node closed the connection mid-response"))

    def pause_writing(self) -> None:  # requests are small; nothing to do
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ----------------------------------------------------------------

    # Decoded as UTF-8 because aiohttp encodes response headers as UTF-8: ASCII and UTF-8
    # values reach the client as the node sent them (Ollama's are ASCII).
    def on_status(self, status: bytes) -> None:
        self._status_reason = status.decode("utf-8", "replace")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_items.append(
            (name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
        )

    def on_headers_complete(self) -> None:
        ex = self.answer
        if ex is None:
            return
        head = Head(
            status=self.parser.get_status_code(),
            reason=self._status_reason,
            headers=self._header_items,
            keep_alive=self.parser.should_keep_alive(),
        )
        for name, value in head.headers:
            lower = name.lower()
            if lower == "content-length" and value.strip().isdigit():
                head.content_length = int(value)
            elif lower == "transfer-encoding" and "chunked" in value.lower():
                head.chunked = True
        ex.head = head
        self._chunked_body = head.chunked
        has_body = ex.body_expected and head.status not in (204, 304) and head.status >= 200
        if not has_body:
            ex.body_done.set_result(None)  # a HEAD answer: its Content-Length is not a body
            head.keep_alive = False  # the parser would wait for that body: do not reuse
        if not ex.headers_done.done():
            ex.headers_done.set_result(head)

    def on_message_complete(self) -> None:
        self._chunked_body = False
        ex = self.answer
        if ex is not None and not ex.body_done.done():
            ex.body_done.set_result(None)

    # -- use --------------------------------------------------------------------------------

    def send(self, request: bytes, *, body_expected: bool) -> Answer:
        assert self.transport is not None
        self.answer = Answer(
            self.loop.create_future(), self.loop.create_future(), body_expected=body_expected
        )
        self.parser = httptools.HttpResponseParser(self)
        self._header_items = []
        self._chunked_body = False
        self._open_chunks = 0
        self.last_activity = self.loop.time()
        self.transport.write(request)
        self._arm_idle_timer()
        return self.answer

    def attach(self, sink: Sink) -> None:
        """From now on body bytes go to ``sink`` as they arrive (pending ones first)."""
        self.sink = sink
        ex = self.answer
        if ex is not None and ex.pending:
            pending, ex.pending = ex.pending, []
            sink(b"", pending, False)

    def finish(self, *, reusable: bool) -> None:
        """The exchange is over: back to the pool when clean, else closed."""
        head = self.answer.head if self.answer is not None else None
        clean = (
            reusable
            and head is not None
            and head.keep_alive
            and self.answer is not None
            and self.answer.body_done.done()
            and not self.closed
        )
        self.answer = None
        self.sink = None
        self._cancel_idle_timer()
        if clean:
            self.pool.give_back(self)
        else:
            self.close()

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close now: for a node, a closed connection is the signal to stop generating."""
        self.closed = True
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: UpstreamError) -> None:
        ex = self.answer
        if ex is None:
            return
        for fut in (ex.headers_done, ex.body_done):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved here; the waiter sees it too

    # -- idle timeout -----------------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        self._idle_timer = self.loop.call_at(
            self.last_activity + self.pool.idle_timeout, self._idle_check
        )

    def _idle_check(self) -> None:
        deadline = self.last_activity + self.pool.idle_timeout
        if self.loop.time() < deadline:  # bytes came since: look again at the new deadline
            self._idle_timer = self.loop.call_at(deadline, self._idle_check)
            return
        self._idle_timer = None
        timeout = self.pool.idle_timeout
        self._fail(UpstreamError("timeout", f"no bytes from the node for {timeout:g}s"))
        self.close()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class NodeConnections:
    """Kept-alive connections to one node."""

    def __init__(self, url: str, connect_timeout: float, idle_timeout: float) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.https = parts.scheme == "https"
        self.port = parts.port or (443 if self.https else 80)
        self.host_header = parts.netloc
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.idle: list[Connection] = []
        self.tls = ssl.create_default_context() if self.https else None

    async def get(self) -> tuple[Connection, bool]:
        """A connection and whether it was reused (a reused one may have gone stale)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
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
            raise UpstreamError("connect", str(exc) or type(exc).__name__) from None
        protocol.transport = transport  # uvloop may call connection_made only later
        return protocol

    def give_back(self, conn: Connection) -> None:
        self.idle.append(conn)

    def forget(self, conn: Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class Upstreams:
    """Connections to every node, created on first use; timeouts from the current config."""

    def __init__(self, connect_timeout: float, idle_timeout: float) -> None:
        self.by_url: dict[str, NodeConnections] = {}
        self.configure(connect_timeout, idle_timeout)

    def configure(self, connect_timeout: float, idle_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        for node in self.by_url.values():
            node.connect_timeout, node.idle_timeout = connect_timeout, idle_timeout

    def to(self, url: str) -> NodeConnections:
        node = self.by_url.get(url)
        if node is None:
            node = self.by_url[url] = NodeConnections(url, self.connect_timeout, self.idle_timeout)
        return node

    def close(self) -> None:
        for node in self.by_url.values():
            node.close_all()


def request_bytes(
    method: str, target: str, host: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    """An HTTP/1.1 request: the client's end-to-end headers, the node's Host, the body."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {len(body)}")
    # Header bytes as the client sent them (aiohttp decoded them as UTF-8, keeping any others).
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
