"""Fake transports for protocol tests: every byte written is kept, every read is ours to cut.

Loopback never splits a write into several reads, so framing is proven here, on transports
whose reads the test chooses (as uvicorn's MockTransport and httpcore's scripted streams do).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import httptools


class FakeTransport(asyncio.Transport):
    """Keeps what the protocol writes; ``on_write`` sees each write as it happens."""

    def __init__(
        self, protocol: asyncio.Protocol, on_write: Callable[[bytes], None] | None = None
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.on_write = on_write
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += data
        if self.on_write is not None:
            self.on_write(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        self._lose()

    def _lose(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 11434)}.get(
            name, default
        )


def cuts(data: bytes, points: tuple[int, ...]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, each strictly inside ``data``)."""
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def every_split(data: bytes, *, pairs: bool) -> Iterator[list[bytes]]:
    """``data`` whole, cut at every single point, and (with ``pairs``) at every two points."""
    yield [data]
    for i in range(1, len(data)):
        yield cuts(data, (i,))
    if pairs:
        for i in range(1, len(data)):
            for j in range(i + 1, len(data)):
                yield cuts(data, (i, j))


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class StrictResponse:
    """A client's view of one response, parsed by llhttp as strictly as a client would."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.complete = False

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True
