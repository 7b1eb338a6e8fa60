"""A client's request as the request path reads it, whichever server took it.

Two servers hand requests to ``forward.Forwarder``: the front door (frontdoor.py, httptools,
for inference POSTs) with the body already read, and aiohttp's (everything else) with the body
still to be read. This is all the request path needs of either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from .bodies import read_bounded
from .errors import BodyTooLarge


@dataclass(slots=True)
class Incoming:
    method: str
    path: str  # decoded, without the query
    target: str  # path and query exactly as the client sent them
    raw_headers: Sequence[tuple[bytes, bytes]]  # names and values as the client sent them
    version: tuple[int, int]
    keep_alive: bool  # the client's framing lets its connection carry another request
    remote: str
    transport: asyncio.Transport | None  # the client's connection
    body: bytes | None = None  # None: still on the wire (aiohttp's request reads it)
    aiohttp_request: web.Request | None = None

    @classmethod
    def of(cls, request: web.Request) -> Incoming:
        return cls(
            request.method,
            request.path,
            request.raw_path,
            request.raw_headers,
            request.version,
            request.keep_alive,
            request.remote or "",
            request.transport,
            aiohttp_request=request,
        )

    async def read_body(self, limit: int) -> bytes:
        """The whole body, or 413 when it is larger than ``limit``."""
        if self.body is None:
            assert self.aiohttp_request is not None  # only the front door reads bodies itself
            return await read_bounded(self.aiohttp_request, limit)
        if len(self.body) > limit:
            raise BodyTooLarge(limit)
        return self.body

    def header(self, lower_name: bytes) -> str | None:
        """The first value of a header, by its name in lower case."""
        for name, value in self.raw_headers:
            if name.lower() == lower_name:
                return value.decode("utf-8", "surrogateescape")
        return None

    def client_left(self) -> bool:
        return self.transport is None or self.transport.is_closing()
