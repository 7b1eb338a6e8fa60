"""The connection to a node, at the level of bytes: one HTTP/1.1 exchange at a time.

aiohttp's client costs about 20 µs of Python per streamed chunk (a StreamReader, a future and
a timer per read). Here each read from the node is parsed by httptools (C) and its body
pieces are written to the client's transport in the same callback: no task switch, no copy
of the body into a buffer. Flow control runs both ways: a slow client pauses reading from the
node.

Per read, the only Python frame is ``data_received``: httptools hands body pieces and chunk
boundaries to C callables (``list.append``, ``itertools.count``). A read that holds whole
chunks of a chunked body, and nothing else, goes to the client as the node framed it.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from .errors import UpstreamError


@dataclass(slots=True)
class ClientSide:
    """Where a node's body goes as it arrives: the client's transport, after the response
    head, framed as the client's response is (chunked or not); the last pieces kept for the
    token counts in the final one, and what to do when the client falls ``high_water`` bytes
    behind."""

    transport: asyncio.WriteTransport
    head: bytes  # the response head, written with the first body bytes
    chunked: bool  # framed chunk by chunk, and ended with the last chunk after the node's end
    tail: deque[bytes]
    high_water: int
    on_full: Callable[[], None]
    ended: bool = False  # the last chunk went out (chunked only)

    def end(self) -> None:
        """Send the last chunk, unless it went out with the last piece."""
        if self.chunked and not self.ended and not self.transport.is_closing():
            self.transport.write(LAST_CHUNK)
        self.ended = True


@dataclass
class Head:
    """The node's status line and headers."""

    status: int
    raw_reason: bytes = b""  # the status line's reason and the header lines, as sent
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    has_body: bool = True  # not for HEAD, 1xx, 204, 304


@dataclass
class Answer:
    """One request's answer as it arrives: its head, then the end of its body."""

    headers_done: asyncio.Future[Head]
    body_done: asyncio.Future[None]
    head: Head | None = None
    body_expected: bool = True
    pending: list[bytes] = field(default_factory=list)  # body pieces before the relay begins


class Connection(asyncio.Protocol):
    def __init__(self, pool: NodeConnections) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: Answer | None = None
        self.client: ClientSide | None = None
        self.closed = False
        self.last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._raw_header_items: list[tuple[bytes, bytes]] = []
        self._status_reason = b""
        # httptools calls these per piece and per chunk: C callables, no Python frame.
        self._pieces: list[bytes] = []
        self.on_body = self._pieces.append
        self._count_chunk_boundaries()
        self._chunked_body = False  # in the body of a chunked answer
        self._between_chunks = False  # ... and the last read ended between two chunks

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        """Parse a read; pass its body pieces to the client in the same callback.

        A read that begins and ends between two chunks of a chunked body holds whole chunks
        only: written as the node framed them. Any other read (the head, a chunk begun or
        finished in another read, the last chunk) has its pieces framed anew.
        """
        self.last_activity = self.loop.time()
        began_between_chunks = self._between_chunks
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
        # Both counters step once here, so equal values mean as many chunks ended as began.
        self._between_chunks = self._chunked_body and next(self._chunks_begun) == next(
            self._chunks_ended
        )
        pieces = self._pieces
        client = self.client
        if client is None:
            if pieces and self.answer is not None:
                self.answer.pending.extend(pieces)
        elif pieces or self._ended_here(client):
            client.tail.extend(pieces)
            out = client.transport
            if not out.is_closing():  # else the client left: its handler closes this connection
                if not client.chunked:
                    out.writelines(pieces)
                elif began_between_chunks and self._between_chunks:
                    out.write(data)  # whole chunks, as the node framed them
                elif self._ended_here(client):
                    out.write(chunk_framed(pieces) + LAST_CHUNK)
                    client.ended = True
                else:
                    out.write(chunk_framed(pieces))
                if out.get_write_buffer_size() > client.high_water:
                    client.on_full()
        pieces.clear()

    def _ended_here(self, client: ClientSide) -> bool:
        """The body has just ended, and the client's framing has an end of its own to send."""
        ex = self.answer
        return (
            client.chunked
            and ex is not None
            and ex.body_done.done()
            and not ex.body_done.cancelled()
            and ex.body_done.exception() is None
        )

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

    # Kept as bytes: they are what the client gets, and the few the proxy reads (length,
    # framing, content type) are ASCII.
    def on_status(self, status: bytes) -> None:
        self._status_reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_header_items.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.answer
        if ex is None:
            return
        head = Head(
            status=self.parser.get_status_code(),
            raw_reason=self._status_reason,
            raw_headers=self._raw_header_items,
            keep_alive=self.parser.should_keep_alive(),
        )
        for name, value in head.raw_headers:
            lower = name.lower()
            if lower == b"content-length" and value.strip().isdigit():
                head.content_length = int(value)
            elif lower == b"transfer-encoding" and b"chunked" in value.lower():
                head.chunked = True
        ex.head = head
        self._chunked_body = head.chunked  # the next read begins between chunks, or in one
        head.has_body = ex.body_expected and head.status not in (204, 304) and head.status >= 200
        if not head.has_body:
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
        self._count_chunk_boundaries()
        self.parser = httptools.HttpResponseParser(self)  # takes the callbacks as they are now
        self._raw_header_items = []
        self._status_reason = b""
        self._chunked_body = self._between_chunks = False
        self.last_activity = self.loop.time()
        self.transport.write(request)
        if self._idle_timer is None:  # else the one armed before looks again when it fires
            self._idle_timer = self.loop.call_at(
                self.last_activity + self.pool.idle_timeout, self._idle_check
            )
        return self.answer

    def relay_to(self, client: ClientSide) -> None:
        """From now on body pieces go to ``client`` as they arrive (pending ones first)."""
        self.client = client
        ex = self.answer
        pending: list[bytes] = []
        if ex is not None:
            pending, ex.pending = ex.pending, []
        client.tail.extend(pending)
        if client.transport.is_closing():
            return
        if not client.chunked:
            client.transport.write(client.head + b"".join(pending))
        elif self._ended_here(client):  # the whole body came with the head
            client.transport.write(client.head + chunk_framed(pending) + LAST_CHUNK)
            client.ended = True
        else:
            client.transport.write(client.head + chunk_framed(pending))

    def _count_chunk_boundaries(self) -> None:
        self._chunks_begun = itertools.count()
        self._chunks_ended = itertools.count()
        self.on_chunk_header = self._chunks_begun.__next__
        self.on_chunk_complete = self._chunks_ended.__next__

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
        self.client = None
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

    # One timer per connection, armed by the first request and kept across the ones after
    # (a timer armed and cancelled per request costs more than the rest of the exchange's
    # bookkeeping): when it fires it looks at the time of the last bytes, and at whether an
    # answer is awaited at all.

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.answer is None:  # kept alive in the pool: nothing awaited, nothing to time
            return
        deadline = self.last_activity + self.pool.idle_timeout
        if self.loop.time() < deadline:  # bytes came since: look again at the new deadline
            self._idle_timer = self.loop.call_at(deadline, self._idle_check)
            return
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


LAST_CHUNK = b"0\r\n\r\n"


def chunk_framed(pieces: list[bytes]) -> bytes:
    return b"".join([b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces])


def request_bytes(
    method: str, target: str, host: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    """An HTTP/1.1 request: the client's end-to-end headers as it sent them, the node's Host,
    the body."""
    # The target as the client sent it (aiohttp decoded it as UTF-8, keeping any other bytes).
    line = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("utf-8", "surrogateescape")
    lines = [line, *[b"%b: %b\r\n" % header for header in headers]]
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines += (b"\r\n", body)
    return b"".join(lines)
