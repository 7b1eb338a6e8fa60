"""make_app(config): wires the pieces together, owns their lifetimes, and lists the routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from .config import Config
from .forward import Forwarder
from .health import Health
from .metrics import Metrics
from .pool import Pool

POOL = web.AppKey("pool", Pool)
HEALTH = web.AppKey("health", Health)
METRICS = web.AppKey("metrics", Metrics)
FORWARDER = web.AppKey("forwarder", Forwarder)

OLLAMA_ROOT_TEXT = "Ollama is running"


def make_app(config: Config) -> web.Application:
    """The proxy as an aiohttp application; serve it with ``handler_cancellation=True``."""
    # Bodies larger than aiohttp's 1 MiB default are normal here (images, long histories);
    # the proxy answers 413 itself above max_body_size.
    app = web.Application(client_max_size=config.max_body_size)
    app[POOL] = pool = Pool(config.nodes, config.queue)
    app[METRICS] = Metrics(pool)
    app.cleanup_ctx.append(_lifetime(config))
    app.router.add_get("/", _root)  # also answers HEAD
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/-/healthy", _healthy)
    app.router.add_get("/-/ready", _ready)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


def _lifetime(config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        session = _upstream_session(config)
        health = app[HEALTH] = Health(app[POOL], session, config.health_check)
        app[FORWARDER] = Forwarder(
            app[POOL],
            health,
            app[METRICS],
            session,
            max_attempts=config.upstream.max_attempts,
            max_body_size=config.max_body_size,
        )
        await health.check_all()  # know who is up before the first request
        checker = asyncio.create_task(health.run(), name="health-checks")
        yield
        checker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checker
        await session.close()

    return lifetime


def _upstream_session(config: Config) -> aiohttp.ClientSession:
    timeouts = aiohttp.ClientTimeout(
        total=None,  # generations last as long as they last; only silence is a failure
        sock_connect=config.upstream.connect_timeout,
        sock_read=config.upstream.idle_timeout,
    )
    return aiohttp.ClientSession(
        # limit=0: no hidden connection queue; admission is the pool's job.
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        timeout=timeouts,
        auto_decompress=False,  # bytes pass unchanged
        cookie_jar=aiohttp.DummyCookieJar(),  # never mix one client's cookies into another's
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,
    )


async def _root(request: web.Request) -> web.Response:
    return web.Response(text=OLLAMA_ROOT_TEXT)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def _healthy(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    up = [n.name for n in request.app[POOL].nodes.values() if n.takes_new]
    return web.json_response({"ready": bool(up), "nodes_up": up}, status=200 if up else 503)


async def _forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER].handle(request)
