"""Listening: aiohttp's server on the socket, and the stop."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Handler


class Serving:
    """The proxy accepting connections: started by ``serve``, then ``stop_accepting`` and
    ``close``."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        # Client connections with a request being answered: the others are idle.
        self.busy: dict[asyncio.BaseTransport, int] = {}

    @web.middleware
    async def count_busy(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is None:
            return await handler(request)
        self.busy[transport] = self.busy.get(transport, 0) + 1
        try:
            return await handler(request)
        finally:
            if self.busy[transport] == 1:
                del self.busy[transport]
            else:
                self.busy[transport] -= 1

    @property
    def port(self) -> int:
        assert self.runner is not None
        return int(self.runner.addresses[0][1])

    async def stop_accepting(self) -> None:
        """No new connections, and no new requests on open ones; requests in flight go on.

        aiohttp's ``pre_shutdown`` makes busy connections close once their answer is out,
        but leaves idle ones open, where a client's next request would wait unanswered until
        the end: those are closed here.
        """
        assert self.runner is not None and self.site is not None
        await self.site.stop()
        server = self.runner.server
        if server is None:
            return
        await asyncio.sleep(0)  # requests already read start their handlers (are busy)
        server.pre_shutdown()
        for connection in server.connections:
            if connection.transport is not None and connection.transport not in self.busy:
                connection.force_close()

    async def close(self) -> None:
        """Close every connection, then the application (its tasks and node connections)."""
        if self.runner is not None:
            await self.runner.cleanup()


async def serve(app: web.Application, host: str, port: int, *, reuse_port: bool = False) -> Serving:
    """Start the application (its start-up checks), then listen on ``host:port``."""
    serving = Serving()
    app.middlewares.append(serving.count_busy)
    runner = serving.runner = web.AppRunner(
        app,
        # Without this aiohttp notices a departed client only at its next write, so a
        # non-streaming generation would keep its GPU busy to the end for nobody.
        handler_cancellation=True,
        access_log=None,  # the proxy writes its own, with node, model and tokens
        shutdown_timeout=1.0,  # the drain is where requests get their time
    )
    await runner.setup()
    site = serving.site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return serving
