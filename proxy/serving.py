"""Listening: the front door on the socket, aiohttp's server behind it, and the stop."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .app import RUNTIME
from .frontdoor import FrontDoor, Routes


class Serving:
    """The proxy accepting connections: started by ``serve``, then ``drain`` and ``close``."""

    def __init__(self, runner: web.AppRunner, door: FrontDoor, server: asyncio.Server) -> None:
        self.runner = runner
        self.door = door
        self.server = server

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        """No new connections, and no new requests on open ones; requests in flight go on."""
        self.server.close()
        self.door.shutdown()
        if self.runner.server is not None:
            self.runner.server.pre_shutdown()

    async def close(self) -> None:
        """Close every connection, then the application (its tasks and node connections)."""
        self.server.close()
        self.door.close_all()
        await self.runner.cleanup()


async def serve(app: web.Application, host: str, port: int, *, reuse_port: bool = False) -> Serving:
    """Start the application (its start-up checks), then listen on ``host:port``."""
    runner = web.AppRunner(
        app,
        # Without this aiohttp notices a departed client only at its next write, so a
        # non-streaming generation would keep its GPU busy to the end for nobody. (The front
        # door does the same for its own requests.)
        handler_cancellation=True,
        access_log=None,  # the proxy writes its own, with node, model and tokens
        shutdown_timeout=1.0,  # the drain is where requests get their time
    )
    await runner.setup()
    assert runner.server is not None  # made by setup()
    runtime = app[RUNTIME]
    routes = Routes.of(app.router, answers=runtime.fleet.listings)
    door = FrontDoor(runtime.forwarder, routes, runner.server)
    try:
        server = await asyncio.get_running_loop().create_server(
            door, host, port, reuse_address=True, reuse_port=reuse_port
        )
    except BaseException:
        await runner.cleanup()
        raise
    return Serving(runner, door, server)
