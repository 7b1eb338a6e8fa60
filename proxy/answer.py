"""A node's answer as the request path reads it, fed by the node's connection.

The connection (``upstream.Connection``) only parses: it hands this sink the head, the body
pieces httptools reported and the message's end, or a failure. The request path awaits them
here and writes to the client itself. Between the two sits a bounded buffer: past
``high_water`` bytes not yet taken (a client that reads slower than the node writes), the
node's connection stops being read until the request path has taken them.

The connection's timer also asks it about the client: bytes waiting for the client (its
socket's backlog) that did not move for ``upstream.client_timeout`` mean a client that takes
nothing (nginx's send_timeout). It is dropped: the slot is freed and the node stops
generating, and it is the client's doing, never the node's.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .errors import UpstreamError
from .http1 import Head


class Flow(Protocol):
    """The node's side of flow control: stop and restart reading its connection."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Client(Protocol):
    """The client's side: the bytes waiting to reach it, and dropping it."""

    def get_write_buffer_size(self) -> int: ...

    def abort(self) -> None: ...


class Answer:
    """One answer under way: its head, its body as it arrives, its end or failure."""

    def __init__(self, flow: Flow, high_water: int, client: Client | None = None) -> None:
        self._flow = flow
        self._client = client
        self._client_backlog = 0  # bytes waiting for the client when last looked at
        self.client_dropped = False  # it took nothing for client_timeout
        self._high_water = high_water
        self._head: asyncio.Future[Head] = asyncio.get_running_loop().create_future()
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._ended = False
        self._error: UpstreamError | ConnectionError | None = None
        self._wakeup: asyncio.Future[None] | None = None

    # -- fed by the connection ---------------------------------------------------------------

    def head_received(self, head: Head) -> None:
        if not self._head.done():
            self._head.set_result(head)

    def body_received(self, data: bytes) -> None:
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered > self._high_water and not self._paused:
            self._paused = True
            self._look_at_client()
            self._flow.pause_reading()
        self._wake()

    def ended(self) -> None:
        self._ended = True
        self._wake()

    def failed(self, error: UpstreamError) -> None:
        if self._ended or self._error is not None:
            return
        self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved here; the request path sees it too
        self._wake()

    def client_progressed(self) -> bool:
        """The client took bytes since the last look, or none wait for it: a backlog that
        moved (it shrinks as the client reads, grows as the request path writes) or is empty.
        One that stayed put is a client that took nothing. No client known: nothing to judge
        it by. The pause noted the backlog too: the request path is then writing to it."""
        if self._client is None:
            return True
        before = self._client_backlog
        backlog = self._look_at_client()
        return backlog == 0 or backlog != before

    def client_stalled(self) -> None:
        self.client_dropped = True
        self._error = ConnectionResetError("the client took nothing of its answer in time")
        if self._client is not None:
            self._client.abort()  # aiohttp cancels the handler: the request path unwinds
        self._wake()

    def _look_at_client(self) -> int:
        if self._client is not None:
            self._client_backlog = self._client.get_write_buffer_size()
        return self._client_backlog

    # -- read by the request path ------------------------------------------------------------

    async def head(self) -> Head:
        return await self._head

    async def read(self) -> bytes:
        """The body bytes that came since the last read, b"" once the body has ended.

        A failure is raised once every byte that came before it has been read.
        """
        while not self._pieces:
            if self._ended:
                return b""
            if self._error is not None:
                raise self._error
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces = []
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._flow.resume_reading()
        return data

    async def read_all(self) -> bytes:
        """The whole body, once it has ended; the failure if it did not."""
        parts = []
        while data := await self.read():
            parts.append(data)
        return b"".join(parts)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
