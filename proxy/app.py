"""make_app(config): the running proxy's pieces, their lifetimes, the routes, and reload."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from . import admin, cors, dashboard
from .accesslog import MALFORMED_REQUESTS, Recent
from .api import FORWARDED_ROUTES
from .auth import Auth, mode_of, startup_notice
from .config import Config, ConfigError, load_config
from .discovery import Discovery
from .errors import ProxyError, error_response, family_of, shown
from .events import Events
from .fleet import Fleet
from .forward import Forwarder, expect_continue, tag_response
from .health import Health
from .metrics import Metrics
from .pool import Pool
from .reload import FileWatch
from .shared_limits import SharedQuotas
from .state import SharedState
from .supervision import Tasks, every

log = logging.getLogger("ollama_proxy")

OLLAMA_ROOT_TEXT = "Ollama is running"
HTTP_VERSIONS = frozenset({aiohttp.HttpVersion10, aiohttp.HttpVersion11})


class Runtime:
    """The running proxy: its current config, live state, and the pieces that serve it."""

    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.pool = Pool(config.nodes, config.queue)
        self.state = SharedState(config.state)  # Redis shared with other replicas, if any
        self.metrics = Metrics(self.pool, self.state)
        self.shutting_down = False
        self.cors = cors.Policy.of(config.cors.origins)
        # Listening on loopback guards Host against DNS rebinding; listen changes only at a
        # restart, so this is decided once.
        self.guards_host = cors.listens_on_loopback(config.listen_host)
        self._session = _upstream_session()
        self.tasks = Tasks()  # everything running in the background, ended by aclose
        self.discovery = Discovery(self.pool, self._session, config, self.tasks)
        self.fleet = Fleet(self.pool, self._session, self.discovery, config)
        self.health = Health(self.pool, self._session, config.health_check, self.discovery)
        self.forwarder = Forwarder(
            self.pool, self.health, self.metrics, self.discovery, self.fleet, config, self.state
        )
        self.events = Events(self)  # the dashboard's stream; builds nothing until subscribed

    @property
    def auth(self) -> Auth:
        return self.forwarder.auth

    @property
    def quotas(self) -> SharedQuotas:
        return self.forwarder.shared_quotas

    @property
    def recent(self) -> Recent:
        return self.forwarder.recent

    def reload(self) -> list[str]:
        """Read the config file again; apply it only if all of it is valid. Returns errors."""
        if self.config_path is None:
            return ["the proxy was not started from a config file"]
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            for line in exc.errors:
                log.error("config reload rejected, old config still serving: %s", line)
            self.metrics.config_reload("failure")
            return exc.errors
        self.apply(config)
        self.metrics.config_reload("success")
        log.info("config reloaded: %d nodes", len(config.nodes))
        return []

    def apply(self, config: Config) -> None:
        if (config.listen_host, config.listen_port) != (
            self.config.listen_host,
            self.config.listen_port,
        ):
            log.warning("listen changed in the config: it takes effect at the next restart")
        if config.state != self.config.state:
            log.warning("state changed in the config: it takes effect at the next restart")
        if self.auth.mode != mode_of(config):
            log.log(*startup_notice(config))
        self.config = config
        self.cors = cors.Policy.of(config.cors.origins)
        added = self.pool.reconfigure(config.nodes, config.queue)
        self.health.configure(config.health_check)
        self.discovery.configure(config)
        self.fleet.configure(config)
        self.forwarder.configure(config)
        if added:  # they join once they pass a check: check them now
            self.tasks.spawn(self.health.check_nodes(added), name="checks of added nodes")

    def start_loops(self) -> None:
        if self.state.configured:
            self.tasks.spawn(self.state.run(), name="shared state")
            self.tasks.spawn(self.forwarder.writes.run(), name="shared state writes")
            self.tasks.spawn(self.forwarder.slots.run(), name="slot leases")
        self.tasks.spawn(self.health.run(), name="health-checks")
        self.tasks.spawn(self.discovery.run(), name="discovery")
        if self.config_path is not None and self.config.reload.watch:
            self.tasks.spawn(self._watch_config(self.config_path), name="reload")

    async def _watch_config(self, path: Path) -> None:
        watches = {p: FileWatch(p) for p in [path, *self._files_named(path)]}

        async def look() -> None:
            # The keys file is part of the config: a change to it alone reloads it too.
            watched = [path, *self._files_named(path)]
            watches.update({p: FileWatch(p) for p in watched if p not in watches})
            if [p for p in watched if watches[p].changed()]:  # every file looked at
                self.reload()

        await every(lambda: self.config.reload.poll_interval, look, "config file watch")

    def _files_named(self, path: Path) -> list[Path]:
        keys_file = self.config.auth.keys_file
        return [path.parent / keys_file] if keys_file else []

    async def aclose(self) -> None:
        await self.tasks.aclose()  # first: checks and refreshes use the session
        self.forwarder.upstreams.close()
        await self._session.close()
        await self.forwarder.slots.aclose()
        await self.state.aclose()
        if self.forwarder.tracing is not None:  # the last spans exported, off the loop
            await asyncio.to_thread(self.forwarder.tracing.shutdown)


RUNTIME = web.AppKey("runtime", Runtime)
CATCH_ALL = web.AppKey("catch_all", web.AbstractResource)  # its route sends the rest on


def make_app(config: Config, config_path: Path | None = None) -> web.Application:
    """The proxy as an aiohttp application; serve it with ``handler_cancellation=True``."""
    # Bodies are read and limited by the forwarder itself (max_body_size, reloadable).
    app = web.Application(
        client_max_size=2**62,
        middlewares=[_every_request_first, _browser_rules, _decoded_path_routes],
    )
    logging.getLogger("aiohttp.server").addFilter(MALFORMED_REQUESTS)
    runtime = app[RUNTIME] = Runtime(config, config_path)
    app.cleanup_ctx.append(_lifetime)
    app.on_shutdown.append(_end_event_streams)
    app.on_response_prepare.append(_close_after_upgrade_request)
    app.on_response_prepare.append(tag_response)
    app.on_response_prepare.append(_cors_headers)
    # Every route gets expect_continue: aiohttp's own logs a client that left as an error.
    app.router.add_get("/", _root, expect_handler=expect_continue)  # also answers HEAD
    app.router.add_get("/metrics", _metrics, expect_handler=expect_continue)
    dashboard.add_routes(app.router, runtime, runtime.events, expect_continue)
    admin.add_routes(app.router, runtime, expect_continue)
    runtime.fleet.add_routes(
        app.router, wrap=runtime.forwarder.observed, expect_handler=expect_continue
    )
    _route_ollama_paths(app.router, runtime)
    _other_methods_not_allowed(app.router, runtime)
    catch_all = app.router.add_route(
        "*", "/{tail:.*}", runtime.forwarder.handle, expect_handler=expect_continue
    )
    assert catch_all.resource is not None  # a route added to a router has its resource
    app[CATCH_ALL] = catch_all.resource
    return app


def _route_ollama_paths(router: web.UrlDispatcher, runtime: Runtime) -> None:
    """Ollama's paths that go to a node, each with the methods Ollama takes on it, so that
    ``_other_methods_not_allowed`` refuses the others, as Ollama's router does."""
    for path, methods in FORWARDED_ROUTES.items():
        for method in methods:
            router.add_route(method, path, runtime.forwarder.handle, expect_handler=expect_continue)


def _other_methods_not_allowed(router: web.UrlDispatcher, runtime: Runtime) -> None:
    """A path the proxy answers itself takes only its methods: any other gets 405 here,
    instead of falling through to the catch-all and on to a node. (A browser's preflight
    never gets this far: ``_browser_rules`` answers it.)"""
    for resource in router.resources():
        methods = {route.method for route in resource}
        if isinstance(resource, web.Resource) and "*" not in methods:  # "*": admin's 404
            refuse = runtime.forwarder.observed(_not_allowed(methods))
            resource.add_route("*", refuse, expect_handler=expect_continue)


def _not_allowed(methods: set[str]) -> Handler:
    allow = ", ".join(sorted(methods))

    async def refuse(request: web.Request) -> web.StreamResponse:
        message = f"method {request.method} not allowed (allowed: {allow})"
        family = family_of(request.path)
        return error_response(405, message, headers={"Allow": allow}, family=family)

    return refuse


@web.middleware
async def _every_request_first(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request first: only HTTP/1.0 and 1.1 are served, and aiohttp's own answers
    (its 404 for a path no route takes) come in the shape of the path's API family."""
    if request.version not in HTTP_VERSIONS:
        # HTTP/0.9 (``GET /`` and no version) or a made-up HTTP/2.0 request line: llhttp
        # accepts both, and the answer would carry that version in its status line.
        message = "only HTTP/1.0 and HTTP/1.1 are served here"
        response = error_response(505, message, family=family_of(request.path))
        response.force_close()
        return response
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        family = family_of(request.path)
        return error_response(exc.status, exc.reason.lower(), headers=allow, family=family)


@web.middleware
async def _decoded_path_routes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Ollama's router (gin, UseRawPath false) matches the decoded path: ``/api%2Fpull`` is
    ``/api/pull`` there, a pull on every node. aiohttp matches with ``%2F`` still escaped, so
    such a request fell to the catch-all and went to one node. Here it goes to the decoded
    path's handler; the request is the client's, so forwarded it keeps the client's escapes."""
    if request.match_info.route.resource is not request.app[CATCH_ALL] or not (
        request.path.startswith(("/api/", "/v1/")) and request.rel_url.path_safe != request.path
    ):
        return await handler(request)
    decoded = request.clone(rel_url=URL.build(path=request.path, encoded=False))
    match = await request.app.router.resolve(decoded)
    if match.route.resource is request.app[CATCH_ALL]:
        return await handler(request)
    if dict(match) and match.handler != request.app[RUNTIME].forwarder.handle:
        # A handler that reads a path parameter (a blob's digest) would read the catch-all's:
        # aiohttp's public API sets no match_info on a request.
        refusal = ProxyError(400, "an escaped slash is not taken in this path: send it as /")
        return await request.app[RUNTIME].forwarder.observed(_raising(refusal))(request)
    return await match.handler(request)


@web.middleware
async def _browser_rules(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests from web pages, judged as Ollama judges them (``cors.py``) before any node
    sees them: refused (403) so that a page the user visits cannot pull, delete or generate,
    or a preflight answered here (204). Counted and logged like every request."""
    runtime = request.app[RUNTIME]
    if (refusal := _browser_refusal(request, runtime)) is not None:
        return await runtime.forwarder.observed(_raising(refusal))(request)
    if request.method == "OPTIONS" and _allowed_origin(request) is not None:
        return await runtime.forwarder.observed(_preflight)(request)
    return await handler(request)


def _browser_refusal(request: web.Request, runtime: Runtime) -> ProxyError | None:
    """A ``Host`` a proxy on loopback does not answer (DNS rebinding), or an origin not
    allowed; None for a request without ``Origin`` or from the page's own origin."""
    host = request.headers.get("Host", "")
    if runtime.guards_host and not _local_host(host):
        return ProxyError(403, f"host {shown(host)!r} is not allowed: the proxy is on loopback")
    origin = request.headers.get("Origin")
    if cors.is_cross_origin(origin, host) and not runtime.cors.allows(origin or ""):
        return ProxyError(403, f"origin {shown(origin or '')!r} is not allowed (cors.origins)")
    return None


def _allowed_origin(request: web.Request) -> str | None:
    """The request's ``Origin`` when it is a CORS request (another origin's) and allowed."""
    origin = request.headers.get("Origin")
    if origin is None or not cors.is_cross_origin(origin, request.headers.get("Host", "")):
        return None
    return origin if request.app[RUNTIME].cors.allows(origin) else None


def _raising(exc: ProxyError) -> Handler:
    async def refuse(request: web.Request) -> web.StreamResponse:
        raise exc

    return refuse


async def _preflight(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)  # its headers: _cors_headers, as every answer's


# Cached: a client names the same Host on every request, and parsing it as an address costs
# more than the rest of the request's checks (an address that becomes, or stops being, one of
# the machine's own is seen after a restart).
@functools.lru_cache(maxsize=1024)
def _local_host(host: str) -> bool:
    return cors.host_allowed(host, socket.gethostname(), _is_local_ip)


def _is_local_ip(address: cors.IPAddress) -> bool:
    """One of this machine's own addresses (Ollama lists its interfaces): only those bind."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, proxied or the proxy's own, carries the proxy's CORS headers only: a
    node's (it saw the client's Origin) are dropped, so none carries two Allow-Origins.
    A request without ``Origin`` is no browser's: nothing to do (Ollama sends none then)."""
    if "Origin" not in request.headers:
        return
    for name in {n for n in response.headers if cors.is_cors_header(n)}:
        response.headers.popall(name)
    if (origin := _allowed_origin(request)) is None:
        return
    policy = request.app[RUNTIME].cors
    if request.method == "OPTIONS":
        headers = cors.preflight_headers(policy, origin)
    else:
        headers = cors.answer_headers(policy, origin)
    if (vary := headers.pop("Vary", None)) is not None:
        existing = ", ".join(response.headers.popall("Vary", []))
        headers["Vary"] = cors.merged_vary(existing, vary)
    response.headers.update(headers)


async def _close_after_upgrade_request(request: web.Request, response: web.StreamResponse) -> None:
    """Close the connection after answering a request that asked for an upgrade (h2c).

    The proxy upgrades nothing, and aiohttp's C parser (llhttp pauses on such a request)
    drops the bytes that came after it in the same read: requests pipelined behind it
    would never be answered, on a connection left open. Closed with ``Connection: close``,
    the client knows to send them again on a new connection (RFC 9112 §9.3.2). Any
    ``Upgrade`` line is enough: llhttp also needs an ``upgrade`` token on some Connection
    line, any of them, and closing without one costs a reconnect, not a hang.
    """
    if "Upgrade" in request.headers:
        response.force_close()
        response.headers["Connection"] = "close"


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    await runtime.state.start()
    await runtime.health.check_all()  # know who is up, and what they hold, before serving
    await runtime.discovery.refresh_all()
    runtime.start_loops()
    yield
    await runtime.aclose()


async def _end_event_streams(app: web.Application) -> None:
    """aiohttp's shutdown runs this before it waits for handlers: the dashboard's streams,
    which would never end by themselves, end now."""
    app[RUNTIME].events.close()


def _upstream_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        # limit=0: no hidden connection queue; admission is the pool's job.
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None),  # every call sets its own
        auto_decompress=False,  # bytes pass unchanged
        cookie_jar=aiohttp.DummyCookieJar(),  # never mix one client's cookies into another's
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,
    )


async def _root(request: web.Request) -> web.Response:
    return web.Response(text=OLLAMA_ROOT_TEXT)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


__all__ = ["RUNTIME", "Runtime", "make_app"]
