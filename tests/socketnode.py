"""A node on a bare asyncio socket on 127.0.0.1, for answers aiohttp's server would never
send and for recording every byte the proxy sends. Subclasses answer each connection."""

from __future__ import annotations

import asyncio


class SocketNode:
    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()  # one per connection, until it ends
        self.address = ""  # host:port, once started
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        self.url = f"http://{self.address}"

    async def stop(self) -> None:
        """Once the proxy has gone, each connection ends on its own: its handler too."""
        if self.server is not None:
            self.server.close()
            self.closing()
            await self.server.wait_closed()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=5)

    def closing(self) -> None:
        """Before waiting for the connections to end: close what the proxy would not."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)
        await self.handle(reader, writer)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
