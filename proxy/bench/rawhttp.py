"""A minimal keep-alive HTTP/1.1 client that counts NDJSON lines without parsing them.

The load generator must cost little next to what it measures: on a 2-core machine, an aiohttp
client reading 20,000 chunks a second (a task wake-up and a parser pass per chunk) was the
busiest process of the benchmark, and its event loop's lag showed up as time to first byte.
Here each read is one ``data_received`` call and one ``bytes.count``.

It knows just enough HTTP for the servers of the benchmark (the simulated node, the proxy,
nginx): the status line, ``Content-Length`` or chunked framing, ``Connection: close``. Body
lines are counted by their closing ``}\\n``: a compact JSON line holds no raw newline, and chunk
framing (``\\r\\n`` after a hex size or after the data) never follows a ``}``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

LINE_END = b"}\n"
CHUNKED_END = b"\r\n0\r\n\r\n"  # the last chunk's framing, preceded by the previous CRLF


@dataclass
class Response:
    status: int = 0
    lines: int = 0  # NDJSON lines in the body
    started: float = 0.0  # perf_counter() when the request was written
    first_byte: float = 0.0  # ... when the first byte of the response arrived
    ended: float = 0.0  # ... when its last byte arrived


class _Framing:
    """Where a response body ends: after ``remaining`` bytes, or (None) at the last chunk."""

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        length = headers.get("content-length")
        self.remaining = int(length) if length is not None else None
        self.keep_alive = headers.get("connection") != "close"
        self.tail = b"\r\n"  # the last bytes seen: CHUNKED_END may span two reads

    def feed(self, body: bytes) -> bool:
        """Take the next piece of the body; True once the body is complete."""
        if self.remaining is not None:
            self.remaining -= len(body)
            return self.remaining <= 0
        self.tail = (self.tail + body[-len(CHUNKED_END) :])[-len(CHUNKED_END) :]
        return self.tail == CHUNKED_END


class Connection(asyncio.Protocol):
    """One connection, one request at a time; ``closed`` once either side closed it."""

    def __init__(self) -> None:
        self.closed = False
        self._transport: asyncio.Transport | None = None
        self._done: asyncio.Future[Response] | None = None
        self._response = Response()
        self._head = b""
        self._framing: _Framing | None = None
        self._last_byte = b""  # for a "}" and a "\n" that arrive in two reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport, though uvloop's does not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("the server closed the connection"))

    async def request(self, raw: bytes) -> Response:
        assert self._transport is not None and not self.closed
        self._done = asyncio.get_running_loop().create_future()
        self._response = Response(started=time.perf_counter())
        self._head, self._framing, self._last_byte = b"", None, b""
        self._transport.write(raw)
        return await self._done

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        response = self._response
        if not response.first_byte:
            response.first_byte = time.perf_counter()
        if self._framing is None:
            data = self._read_head(data)
            if self._framing is None:
                return
        response.lines += data.count(LINE_END)
        if self._last_byte == b"}" and data[:1] == b"\n":
            response.lines += 1
        self._last_byte = data[-1:] or self._last_byte
        if self._framing.feed(data):
            self._finish()

    def _read_head(self, data: bytes) -> bytes:
        """Collect the status line and headers; return the body bytes that came with them."""
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return b""
        self._framing = _Framing(self._head[:end])
        self._response.status = self._framing.status
        return self._head[end + 4 :]

    def _finish(self) -> None:
        assert self._framing is not None and self._done is not None
        self._response.ended = time.perf_counter()
        if not self._framing.keep_alive:
            self.close()
        if not self._done.done():
            self._done.set_result(self._response)


class Client:
    """One client of a closed loop: a connection to ``url``, reopened when it was closed."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._connection: Connection | None = None

    async def post(self, path: str, body: bytes) -> Response:
        """POST a JSON body; raise ConnectionError or OSError when the exchange fails."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        if self._connection is None or self._connection.closed:
            loop = asyncio.get_running_loop()
            _, self._connection = await loop.create_connection(Connection, self.host, self.port)
        try:
            return await self._connection.request(head.encode() + body)
        except BaseException:
            self._connection.close()  # a half-read response leaves the connection unusable
            raise

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
