"""SimNode: one simulated Ollama server, its lifecycle, its app and the handlers of its
listings and model management (generations live in generation.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ..models import display_name, normalize_model
from .catalog import (
    create_steps,
    model_entry,
    openai_model_entry,
    pull_steps,
    push_steps,
    resident_entry,
    show_body,
)
from .faults import drop_connection
from .generation import Generation
from .memory import ModelMemory
from .plans import flag
from .settings import SimRequest, SimSettings, SimStats
from .slots import SlotGate
from .wire import (
    NDJSON,
    ApiError,
    LazyStream,
    error_body,
    go_not_found,
    iso,
    json_object,
    json_response,
    model_field,
    multipart_form,
    ndjson,
    parse_json,
)

# Ollama accepts large bodies (base64 images, long chat histories); aiohttp's default is 1 MiB.
MAX_BODY_BYTES = 256 * 1024 * 1024
KEEP_ALIVE = timedelta(minutes=5)
# The simulator's own observation endpoint: never recorded in stats.requests, never faulted.
STATS_PATH = "/-/sim/stats"


class SimNode:
    """One simulated Ollama server. See the package docstring."""

    def __init__(self, settings: SimSettings | None = None, *, name: str = "sim") -> None:
        self.settings = settings if settings is not None else SimSettings()
        self.name = name
        self.stats = SimStats()
        self.url = ""
        self.port: int | None = None  # remembered across stop()/start()
        self._runner: web.AppRunner | None = None
        self._stats_changed = asyncio.Event()
        self._gate = SlotGate(
            lambda: self.settings.num_parallel, lambda: self.settings.max_queue, self._sync_gate
        )
        self._memory = ModelMemory(self)
        self._generation = Generation(self, self._gate, self._memory)
        self._blobs: set[str] = set()
        self._started_at = datetime.now(UTC)
        self.app = self._build_app()

    # ---- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen (again) and return the URL; port 0 means the remembered port, else a free one."""
        if self._runner is not None:
            return self.url
        runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port or self.port or 0).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        """Stop listening and drop every connection at once, like a killed process."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()  # stop accepting before dropping, so nothing slips in between
        if runner.server is not None:
            for connection in runner.server.connections:
                if connection.transport is not None:
                    connection.transport.abort()
        await runner.cleanup()

    async def refuse(self) -> None:
        """Refuse connections from now on (the port stays remembered: start() re-binds it)."""
        await self.stop()

    # ---- observation

    def peers(self) -> set[tuple[str, int]]:
        """The client addresses of the connections open now."""
        if self._runner is None or self._runner.server is None:
            return set()
        return {
            connection.transport.get_extra_info("peername")[:2]
            for connection in self._runner.server.connections
            if connection.transport is not None
        }

    async def wait_for(
        self,
        predicate: Callable[[SimStats], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - part of the interface tests are written against
    ) -> None:
        """Return once predicate(stats) holds; woken by every stats change, not by polling."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.stats):
                    await self._stats_changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{self.name}: condition not reached within {timeout}s; {self._summary()}"
            ) from None

    def reset_stats(self) -> None:
        """Start counting afresh; generations in progress stay counted as active or queued."""
        active, queued = self._gate.active, self._gate.queued
        self.stats = SimStats(active=active, max_active=active, queued=queued)
        self.changed()

    def changed(self) -> None:
        # Wake every wait_for(): each waits on the event current when it last checked.
        self._stats_changed.set()
        self._stats_changed = asyncio.Event()

    def _summary(self) -> str:
        counters = {key: value for key, value in vars(self.stats).items() if key != "requests"}
        return f"stats {counters}, {len(self.stats.requests)} requests"

    def _sync_gate(self) -> None:
        self.stats.active = self._gate.active
        self.stats.queued = self._gate.queued
        self.stats.max_active = max(self.stats.max_active, self._gate.active)
        self.changed()

    # ---- app and middleware

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._front_door], client_max_size=MAX_BODY_BYTES)
        app.add_routes(self._routes())
        app.on_cleanup.append(self._memory.cancel_loads)
        return app

    def _routes(self) -> list[web.RouteDef]:
        generation = self._generation
        return [
            web.get("/", self._root),
            web.get("/api/version", self._version),
            web.get("/api/tags", self._tags),
            web.get("/api/ps", self._ps),
            web.post("/api/show", self._show),
            web.post("/api/generate", generation.generate),
            web.post("/api/chat", generation.chat),
            web.post("/api/embed", generation.embed),
            web.post("/api/embeddings", generation.embeddings),
            web.post("/api/pull", self._pull),
            web.post("/api/push", self._push),
            web.post("/api/create", self._create),
            web.post("/api/copy", self._copy),
            web.delete("/api/delete", self._delete),
            web.head("/api/blobs/{digest}", self._blob_exists),
            web.post("/api/blobs/{digest}", self._blob_upload),
            web.post("/v1/chat/completions", generation.openai_chat),
            web.post("/v1/completions", generation.openai_completions),
            web.post("/v1/embeddings", generation.openai_embeddings),
            web.post("/v1/responses", generation.openai_responses),
            web.post("/v1/messages", generation.anthropic_messages),
            web.post("/v1/audio/transcriptions", generation.transcription),
            web.get("/v1/models", self._openai_models),
            web.get("/v1/models/{model:.+}", self._openai_model),
            web.get(STATS_PATH, self._sim_stats),
        ]

    @web.middleware
    async def _front_door(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == STATS_PATH:  # the harness looking on, not a request to the node
            return await handler(request)
        await self._record(request)
        if self.settings.fault == "refuse":
            await drop_connection(request)  # the nearest a live listener gets to refusing
        try:
            return await handler(request)
        except ApiError as error:
            body = error_body(request.path, error.status, error.message)
            return json_response(body, error.status)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return go_not_found()
        except ConnectionError:
            if request.transport is not None and not request.transport.is_closing():
                raise
            return web.Response()  # the client left mid-write: Ollama logs no error for that

    async def _record(self, request: web.Request) -> None:
        body = await request.read()
        if not self.settings.record_requests:
            return
        payload, read = parse_json(body)
        model = None
        if read is not None:
            named = read.get("model", read.get("name"))
            model = named if isinstance(named, str) else None
        elif request.content_type == "multipart/form-data":  # a transcription's form
            with contextlib.suppress(ApiError):
                form = multipart_form(body, request.headers.get("Content-Type", ""))
                model = form.values.get("model")
        headers = dict(request.headers)
        entry = SimRequest(request.method, request.path, headers, body, payload, model)
        self.stats.requests.append(entry)
        self.changed()

    # ---- health and listings

    async def _root(self, _request: web.Request) -> web.StreamResponse:
        if self.settings.health_fail:
            return web.Response(text="Ollama is not healthy (simulated)", status=500)
        return web.Response(text="Ollama is running")

    async def _version(self, _request: web.Request) -> web.StreamResponse:
        if self.settings.health_fail:
            raise ApiError(500, "health check failure (simulated)")
        return json_response({"version": self.settings.version})

    async def _tags(self, _request: web.Request) -> web.StreamResponse:
        modified_at = iso(self._started_at)
        revisions = self.settings.revisions
        models = [
            model_entry(name, modified_at, revisions.get(normalize_model(name), 0))
            for name in self.settings.models
        ]
        return json_response({"models": models})

    async def _ps(self, _request: web.Request) -> web.StreamResponse:
        expires_at = iso(datetime.now(UTC) + KEEP_ALIVE)
        revisions = self.settings.revisions
        models = [
            resident_entry(name, expires_at, revisions.get(normalize_model(name), 0))
            for name in self.settings.resident
        ]
        return json_response({"models": models})

    async def _show(self, request: web.Request) -> web.StreamResponse:
        name = model_field(await json_object(request), "model", "name")
        if not self._memory.has(name):
            raise ApiError(404, f"model '{name}' not found")
        return json_response(show_body(name, iso(self._started_at)))

    async def _openai_models(self, _request: web.Request) -> web.StreamResponse:
        created = int(self._started_at.timestamp())
        models = self.settings.models
        data = [openai_model_entry(display_name(m), created) for m in models]
        return json_response({"object": "list", "data": data})

    async def _openai_model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        if not self._memory.has(name):
            raise ApiError(404, f'model "{name}" not found, try pulling it first')
        created = int(self._started_at.timestamp())
        return json_response(openai_model_entry(name, created))  # the id as asked, like Ollama

    async def _sim_stats(self, _request: web.Request) -> web.StreamResponse:
        counters = {key: value for key, value in vars(self.stats).items() if key != "requests"}
        resident = [display_name(name) for name in self.settings.resident]
        return json_response({**counters, "resident": resident})

    # ---- model management

    async def _progress(
        self, request: web.Request, body: dict[str, Any], steps: list[dict[str, Any]]
    ) -> web.StreamResponse:
        """NDJSON progress steps (pull, push, create), or only the outcome when not streaming."""
        if not flag(body.get("stream"), True):
            await asyncio.sleep(self.settings.pull_interval * (len(steps) - 1))
            return json_response(steps[-1])
        stream = LazyStream(request, NDJSON)
        for step in steps[:-1]:
            await stream.send(ndjson(step))
            await asyncio.sleep(self.settings.pull_interval)
        return await stream.finish(ndjson(steps[-1]))

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        name = model_field(body, "model", "name")
        steps = pull_steps(name)
        self._memory.add(name)
        return await self._progress(request, body, steps)

    async def _push(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        name = model_field(body, "model", "name")
        if not self._memory.has(name):
            raise ApiError(404, f"model '{name}' not found")
        return await self._progress(request, body, push_steps(name))

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        name = model_field(body, "model", "name")
        self._memory.add(name)
        key = normalize_model(name)  # a new manifest, so a new digest (Ollama's is its hash)
        self.settings.revisions[key] = self.settings.revisions.get(key, 0) + 1
        return await self._progress(request, body, create_steps())

    async def _copy(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str):
            raise ApiError(400, "source and destination are required")
        if not self._memory.has(source):
            raise ApiError(404, f"model '{source}' not found")
        self._memory.add(destination)
        return web.Response(status=200)

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        name = model_field(await json_object(request), "model", "name")
        if not self._memory.has(name):
            raise ApiError(404, f"model '{name}' not found")
        self._memory.remove(name)
        return web.Response(status=200)

    async def _blob_exists(self, request: web.Request) -> web.StreamResponse:
        found = request.match_info["digest"] in self._blobs
        return web.Response(status=200 if found else 404)

    async def _blob_upload(self, request: web.Request) -> web.StreamResponse:
        self._blobs.add(request.match_info["digest"])
        return web.Response(status=201)
