"""Admin paths under /-/ (never under /api or /v1): probes, node state, reload, drain."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from . import estimate
from .auth import Auth, KeyRefused
from .config import Config
from .errors import error_response, shown
from .pool import Node, Pool
from .shared_limits import SharedQuotas

Handler = Any


class Managed(Protocol):
    """What the admin paths see of the running proxy (``app.Runtime``), and no more."""

    config: Config
    pool: Pool
    shutting_down: bool

    @property
    def auth(self) -> Auth: ...

    @property
    def quotas(self) -> SharedQuotas: ...

    def reload(self) -> list[str]: ...


def add_routes(
    router: web.UrlDispatcher,
    runtime: Managed,
    expect: Callable[[web.Request], Awaitable[None]],
) -> None:
    admin = _Admin(runtime)
    router.add_get("/-/healthy", admin.healthy, expect_handler=expect)
    router.add_get("/-/ready", admin.ready, expect_handler=expect)
    router.add_get("/-/nodes", admin.guarded(admin.nodes), expect_handler=expect)
    router.add_post("/-/reload", admin.guarded(admin.reload), expect_handler=expect)
    router.add_get("/-/usage", admin.guarded(admin.usage), expect_handler=expect)
    router.add_post("/-/nodes/{name}/drain", admin.guarded(admin.drain), expect_handler=expect)
    router.add_post("/-/nodes/{name}/ready", admin.guarded(admin.undrain), expect_handler=expect)
    router.add_route("*", "/-/{tail:.*}", admin.not_found, expect_handler=expect)


class _Admin:
    def __init__(self, runtime: Managed) -> None:
        self.runtime = runtime

    def guarded(self, handler: Handler) -> Handler:
        return guarded(self.runtime, handler)

    async def healthy(self, request: web.Request) -> web.Response:
        """The process is alive and serving HTTP (liveness)."""
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """Send traffic here: not shutting down and at least one node up (readiness)."""
        up = [n.name for n in self.runtime.pool.nodes.values() if n.takes_new]
        ready = bool(up) and not self.runtime.shutting_down
        body = {"ready": ready, "shutting_down": self.runtime.shutting_down, "nodes_up": up}
        return web.json_response(body, status=200 if ready else 503)

    async def nodes(self, request: web.Request) -> web.Response:
        return web.json_response(fleet_state(self.runtime.pool))

    async def reload(self, request: web.Request) -> web.Response:
        errors = self.runtime.reload()
        if errors:
            return web.json_response(
                {"error": "config rejected; the old config keeps serving", "errors": errors},
                status=400,
            )
        return web.json_response({"status": "reloaded", "nodes": len(self.runtime.pool.nodes)})

    async def usage(self, request: web.Request) -> web.Response:
        """Each key's totals since the start and its rate windows now."""
        return web.json_response(await self.runtime.quotas.report())

    async def drain(self, request: web.Request) -> web.Response:
        return self._set_draining(request, True)

    async def undrain(self, request: web.Request) -> web.Response:
        return self._set_draining(request, False)

    def _set_draining(self, request: web.Request, draining: bool) -> web.Response:
        node = self.runtime.pool.nodes.get(request.match_info["name"])
        if node is None:
            return error_response(404, f"no node named {shown(request.match_info['name'])!r}")
        node.draining = draining
        self.runtime.pool.changed()
        return web.json_response(node_state(node))

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(404, f"no admin path {shown(request.path)}")


def guarded(runtime: Managed, handler: Handler) -> Handler:
    """Require admin.token or a key with ``admin`` (auth.Auth.check_admin says when)."""

    async def check(request: web.Request) -> web.StreamResponse:
        try:
            runtime.auth.check_admin(request.headers, request.remote)
        except KeyRefused as refused:
            return refused.response(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    return check


def fleet_state(pool: Pool) -> dict[str, Any]:
    """``GET /-/nodes``: the queue's depth and each node's state."""
    return {
        "queue_depth": pool.queue_depth,
        "nodes": [
            {**node_state(n), "queued_for_it": pool.waiting_for(n)} for n in pool.all_nodes()
        ],
    }


def node_state(node: Node) -> dict[str, Any]:
    state = "removed" if node.removed else "draining" if node.draining else "ready"
    return {
        "name": node.name,
        "url": node.url,
        "up": node.up,
        "state": state,
        "in_flight": node.in_flight,
        "max_concurrency": node.config.max_concurrency,
        "weight": node.config.weight,
        "models": sorted(node.models) if node.models is not None else None,
        "resident_models": node.resident_models(),
        "version": node.version,
        "tokens_per_second": {m: round(v, 2) for m, v in node.tokens_per_second.items()},
        "load_seconds": {m: round(v, 3) for m, v in node.load_seconds.items()},
        "eval_count": {m: round(v, 1) for m, v in node.eval_tokens.items()},
        "max_loaded_models": node.config.max_loaded_models,
        "expected_wait_seconds": round(estimate.first_free_seconds(node, time.monotonic()), 3),
        "recent_errors": [
            {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), "error": message}
            for t, message in node.recent_errors
        ],
    }
