"""The fleet seen as one Ollama: merged listings and fan-out model management.

Listings (tags, ps, /v1/models, version) are asked of every healthy node at once and merged in
Ollama's own shapes. Management fans out: a pull goes to every healthy node (or the nodes
``placement`` names for that model) and streams one merged progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .api import BLOBS_PREFIX
from .auth import Key, may_see
from .bodies import field_named, model_of, read_bounded, required_json_object, whole_object
from .config import Config
from .discovery import Discovery, entries
from .errors import ProxyError, error_body, error_response, failure_text, go_quoted, shown
from .exchange import EXCHANGE, REQUEST_ID_HEADER
from .models import INVALID_MODEL_NAME, normalize_model, refused_name
from .pool import Node, Pool

log = logging.getLogger("ollama_proxy.fleet")

JSON_TYPE = "application/json; charset=utf-8"
NDJSON_TYPE = "application/x-ndjson"
BLOB_PIECE = 1024 * 1024
# A blob's digest as Ollama accepts it (its GetBlobsPath / manifest.BlobsPath): anything else
# is its 400 "invalid digest format".
DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Listing = Callable[[], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _Caller:
    """Who a fleet request answers: the client's Origin, so that the nodes' own
    OLLAMA_ORIGINS still judge a browser's pull or delete; the request's id, so that every
    node's log names the request the proxy's does; and its key, whose globs limit what the
    listings show. When tracing is on, the request's span is every node's parent."""

    origin: str | None = None
    request_id: str | None = None
    key: Key | None = None
    trace: tuple[tuple[str, str], ...] = ()  # traceparent (and tracestate) of the proxy's span

    @classmethod
    def of(cls, request: web.Request) -> _Caller:
        ex = request.get(EXCHANGE)
        request_id = ex.request_id if ex else request.headers.get(REQUEST_ID_HEADER)
        trace = tuple(ex.trace.context_headers().items()) if ex and ex.trace else ()
        return cls(request.headers.get("Origin"), request_id, ex.key if ex else None, trace)

    def headers(self) -> dict[str, str]:
        named = {"Origin": self.origin, REQUEST_ID_HEADER: self.request_id}
        return {name: value for name, value in [*named.items(), *self.trace] if value is not None}


# Set for the length of one fleet request; the tasks it starts copy it.
_caller: ContextVar[_Caller | None] = ContextVar("caller", default=None)


def _current_caller() -> _Caller:
    return _caller.get() or _Caller()  # outside a client's request: the proxy's own


@contextlib.contextmanager
def _acting_for(request: web.Request) -> Iterator[None]:
    token = _caller.set(_Caller.of(request))
    try:
        yield
    finally:
        _caller.reset(token)


def _answering_errors(handler: Handler) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        with _acting_for(request):
            try:
                return await handler(request)
            except ProxyError as exc:
                return exc.response(request.path)

    return answer


def _node_headers(node: Node, headers: dict[str, str] | None = None) -> dict[str, str]:
    """``headers``, the client's Origin and request id, and the node's own headers over all."""
    return {**(headers or {}), **_current_caller().headers(), **node.config.headers}


def _for_caller(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of a merged listing that the caller's key may use."""
    key = _current_caller().key
    return [entry for entry in models if may_see(key, _name(entry) or "")]


def _ignoring_request(listing: Listing) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await listing()

    return handler


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=compact(value), status=status, headers={"Content-Type": JSON_TYPE})


class Fleet:
    def __init__(
        self,
        pool: Pool,
        session: aiohttp.ClientSession,
        discovery: Discovery,
        config: Config,
    ) -> None:
        self.pool = pool
        self.session = session
        self.discovery = discovery
        self.configure(config)

    def configure(self, config: Config) -> None:
        # Pulls and uploads last as long as they last; only silence is a failure.
        self.transfer_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=config.upstream.connect_timeout,
            sock_read=config.upstream.idle_timeout,
        )
        self.placement = config.placement
        self.max_body_size = config.max_body_size

    @property
    def listings(self) -> dict[str, Listing]:
        """GET (and HEAD) paths answered from every node's answer, needing nothing of the
        request."""
        return {
            "/api/tags": self.tags,
            "/api/ps": self.ps,
            "/v1/models": self.openai_models,
            "/api/version": self.version,
        }

    def add_routes(
        self,
        router: web.UrlDispatcher,
        wrap: Callable[[Handler], Handler],
        expect_handler: Callable[[web.Request], Awaitable[None]],
    ) -> None:
        """Route the fleet's paths; ``wrap`` adds the request accounting every path has."""
        routes: list[tuple[str, str, Handler]] = [
            ("GET", path, _ignoring_request(listing)) for path, listing in self.listings.items()
        ]
        routes += [
            ("POST", "/api/pull", self.pull),
            ("POST", "/api/create", self.create),
            ("DELETE", "/api/delete", self.delete),
            ("POST", "/api/copy", self.copy),
            ("HEAD", "/api/blobs/{digest}", self.blob_exists),
            ("POST", "/api/blobs/{digest}", self.blob_upload),
        ]
        for method, path, handler in routes:
            router.add_route(
                method, path, wrap(_answering_errors(handler)), expect_handler=expect_handler
            )
            if method == "GET":
                head = wrap(_answering_errors(handler))
                router.add_route("HEAD", path, head, expect_handler=expect_handler)

    # -- merged listings --------------------------------------------------------------------

    def _healthy(self) -> list[Node]:
        nodes = [n for n in self.pool.nodes.values() if n.takes_new]
        if not nodes:
            raise ProxyError(503, "no healthy node is available", retry_after=1)
        return nodes

    async def _ask_all(self, path: str) -> list[tuple[Node, Any]]:
        nodes = self._healthy()
        asks = (self.discovery.get_json(n, path, _node_headers(n)) for n in nodes)
        answers = await asyncio.gather(*asks)
        return [(n, a) for n, a in zip(nodes, answers, strict=True) if a is not None]

    async def tags(self) -> web.StreamResponse:
        answers = await self._ask_all("/api/tags")
        for node, answer in answers:
            self.discovery.learn_models(node, answer)
        models = _union((entries(a, "models") for _, a in answers), "model", "name")
        return json_response({"models": _for_caller(models)})

    async def ps(self) -> web.StreamResponse:
        answers = await self._ask_all("/api/ps")
        models = _union((entries(a, "models") for _, a in answers), "model", "name")
        return json_response({"models": _for_caller(models)})

    async def openai_models(self) -> web.StreamResponse:
        answers = await self._ask_all("/v1/models")
        data = _union((entries(a, "data") for _, a in answers), "id")
        return json_response({"object": "list", "data": _for_caller(data)})

    async def version(self) -> web.StreamResponse:
        answers = await self._ask_all("/api/version")
        versions = [v for _, a in answers if isinstance(v := _field(a, "version"), str)]
        if not versions:
            return error_response(502, "no healthy node reported its version")
        return json_response({"version": min(versions, key=_version_key)})

    # -- fan-out management -----------------------------------------------------------------

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body, model = await _model_body(request, self.max_body_size)
        targets = self._pull_targets(model)
        result = await self._fan_out_progress(request, body, targets, "/api/pull", "pull")
        for node in result.succeeded:
            self.discovery.served_on_disk(node, model)
        return result.response

    async def create(self, request: web.Request) -> web.StreamResponse:
        body, model = await _model_body(request, self.max_body_size)
        targets = self._healthy()
        result = await self._fan_out_progress(request, body, targets, "/api/create", "create")
        for node in result.succeeded:
            self.discovery.served_on_disk(node, model)
        return result.response

    def _pull_targets(self, model: str) -> list[Node]:
        healthy = self._healthy()
        named = self.placement.get(model)
        if named is None:
            return healthy
        targets = [n for n in healthy if n.name in named]
        if not targets:
            raise ProxyError(503, f"none of the nodes placed for {model!r} is up", retry_after=5)
        return targets

    async def delete(self, request: web.Request) -> web.StreamResponse:
        body = await read_bounded(request, self.max_body_size)
        named = model_of(required_json_object(body))  # as the client spelt it
        if named is None:
            raise ProxyError(400, "model is required")
        if refused_name(named):
            raise ProxyError(400, f"name {go_quoted(shown(named))} is invalid")  # Ollama's words
        model = normalize_model(named)
        missing = f"model '{shown(named)}' not found"  # Ollama's words for a delete
        holders = await self._holders(model)
        if not holders:
            return error_response(404, missing)
        outcomes = await self._send_all(holders, "DELETE", "/api/delete", body)
        for node, status, _ in outcomes:
            if status in (200, 404) and node.models is not None:
                node.models.discard(model)
                node.resident.pop(model, None)
        return _summarise(outcomes, "delete", ok=(200,), gone=404, missing=missing)

    async def copy(self, request: web.Request) -> web.StreamResponse:
        body = await read_bounded(request, self.max_body_size)
        payload = required_json_object(body)
        source = payload.get("source")
        destination = payload.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str):
            raise ProxyError(400, "source and destination are required")
        for role, name in (("source", source), ("destination", destination)):
            if refused_name(name):
                raise ProxyError(
                    400, f"{role} {go_quoted(shown(name))} is invalid"
                )  # Ollama's words
        missing = f"model {go_quoted(shown(source))} not found"  # Ollama's words for a copy
        holders = await self._holders(normalize_model(source))
        if not holders:
            return error_response(404, missing)
        outcomes = await self._send_all(holders, "POST", "/api/copy", body)
        for node, status, _ in outcomes:
            if status == 200:  # its digest too is unknown until the node lists it again
                self.discovery.served_on_disk(node, normalize_model(destination))
        return _summarise(outcomes, "copy", ok=(200,), gone=404, missing=missing)

    async def _holders(self, model: str) -> list[Node]:
        """The healthy nodes that have ``model``; before there are none, their lists read
        again (a model pulled on a node straight since discovery last looked)."""
        holders = [n for n in self._healthy() if n.has_model(model)]
        if not holders:
            await self.discovery.refresh_for_missing(model)
            holders = [n for n in self._healthy() if n.has_model(model)]
        return holders

    async def unload(self, request: web.Request, body: bytes, model: str) -> web.StreamResponse:
        """``ollama stop``: unload the model on every node that has it; one node's answer."""
        holders = [n for n in self._healthy() if n.has_model(model)]
        with _acting_for(request):
            outcomes = await self._send_all(holders, "POST", request.path, body)
        for node, status, _ in outcomes:
            if status == 200:
                node.resident.pop(model, None)
        _, status, answer = next((o for o in outcomes if o[1] == 200), outcomes[0])
        return web.Response(status=status, body=answer, headers={"Content-Type": JSON_TYPE})

    async def blob_exists(self, request: web.Request) -> web.StreamResponse:
        """200 only when every healthy node has the blob, so a client uploads it otherwise."""
        path = _blob_path(request)
        nodes = self._healthy()
        outcomes = await self._send_all(nodes, "HEAD", path, b"")
        every = all(status == 200 for _, status, _ in outcomes)
        return web.Response(status=200 if every else 404)

    async def blob_upload(self, request: web.Request) -> web.StreamResponse:
        """Stream one upload to every healthy node at once; the body is never held whole."""
        path = _blob_path(request)
        nodes = self._healthy()
        queues = [asyncio.Queue[bytes | None](maxsize=4) for _ in nodes]

        async def pump() -> None:
            async for piece in request.content.iter_chunked(BLOB_PIECE):
                for q in queues:  # the slowest node sets the pace: memory stays bounded
                    await q.put(piece)
            for q in queues:
                await q.put(None)

        headers = {}
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        sends = [
            self._send(n, "POST", path, _drain(q), headers=headers)
            for n, q in zip(nodes, queues, strict=True)
        ]
        pumping = asyncio.ensure_future(pump())
        try:
            outcomes = await asyncio.gather(*sends)
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
        return _summarise(outcomes, "blob upload", ok=(200, 201), status_on_success=201)

    async def _send_all(
        self, nodes: list[Node], method: str, path: str, body: bytes
    ) -> list[tuple[Node, int, bytes]]:
        return list(await asyncio.gather(*(self._send(n, method, path, body) for n in nodes)))

    async def _send(
        self,
        node: Node,
        method: str,
        path: str,
        data: Any,
        *,
        headers: dict[str, str] | None = None,
    ) -> tuple[Node, int, bytes]:
        """(node, status, body); status 502 with the failure when the node did not answer."""
        try:
            async with self.session.request(
                method,
                node.url + path,
                data=data or None,
                headers=_node_headers(node, headers),
                timeout=self.transfer_timeout,
            ) as resp:
                return node, resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return node, 502, error_body(failure_text(exc))

    # -- merged progress (pull, create) -----------------------------------------------------

    async def _fan_out_progress(
        self, request: web.Request, body: bytes, nodes: list[Node], path: str, what: str
    ) -> _Outcome:
        streaming = required_json_object(body).get("stream", True) is not False
        upstream_body = _streamed(body)
        merger = _ProgressMerger(nodes)
        lines: asyncio.Queue[tuple[Node, dict[str, Any] | None]] = asyncio.Queue()
        tasks = [
            asyncio.ensure_future(self._progress(n, path, upstream_body, lines)) for n in nodes
        ]
        response = None
        try:
            if streaming:
                response = web.StreamResponse(headers={"Content-Type": NDJSON_TYPE})
                await response.prepare(request)
            async for merged in merger.run(lines):
                if response is not None:
                    await response.write(compact(merged) + b"\n")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        final = merger.final(what)
        if response is not None:
            await response.write(compact(final) + b"\n")
            await response.write_eof()
            return _Outcome(response, merger.succeeded)
        status = 200 if "error" not in final else 500
        return _Outcome(json_response(final, status), merger.succeeded)

    async def _progress(
        self,
        node: Node,
        path: str,
        body: bytes,
        lines: asyncio.Queue[tuple[Node, dict[str, Any] | None]],
    ) -> None:
        """Feed one node's progress lines to the merger; ``None`` marks its end."""
        try:
            async with self.session.post(
                node.url + path,
                data=body,
                headers=_node_headers(node),
                timeout=self.transfer_timeout,
            ) as resp:
                if resp.status != 200:
                    text = (await resp.read()).decode(errors="replace")
                    await lines.put((node, {"error": _error_text(text, resp.status)}))
                    return
                async for line in resp.content:
                    if line.strip():
                        await lines.put((node, _json_line(line)))
        except (aiohttp.ClientError, TimeoutError) as exc:
            await lines.put((node, {"error": failure_text(exc)}))
        finally:
            await lines.put((node, None))


@dataclass
class _Outcome:
    response: web.StreamResponse
    succeeded: list[Node]


@dataclass
class _NodeProgress:
    """What one node's progress lines have said so far."""

    statuses: set[str] = field(default_factory=set)  # plain steps ("writing manifest")
    layers: dict[str, int] = field(default_factory=dict)  # bytes completed per digest
    in_layers: bool = False  # it has sent a layer's progress
    past_layers: bool = False  # and a plain step after that: its layers are all there
    done: bool = False  # it said success
    failed: bool = False


@dataclass
class _ProgressMerger:
    """Many nodes' NDJSON progress as one Ollama's, for the bars of the ollama CLI and Open
    WebUI: one sequence of steps, each shown once every node still running has reached it; a
    layer's lines only once every node is at the layers, its ``total`` the layer's size from
    its first line on, its ``completed`` the least any running node has, sent only when it
    grows. A node that fails leaves the merge (the others go on) and is named in the error
    that ends the stream in place of success."""

    nodes: list[Node]
    errors: dict[str, str] = field(default_factory=dict)
    succeeded: list[Node] = field(default_factory=list)
    _state: dict[str, _NodeProgress] = field(default_factory=dict)
    _totals: dict[str, int] = field(default_factory=dict)  # per digest, from its first line
    _labels: dict[str, str] = field(default_factory=dict)  # its status ("pulling 4c4b…")
    _shown: dict[str, int] = field(default_factory=dict)  # completed last sent per digest
    # Steps seen and not sent yet, in the order first seen; True for one that a node sent
    # after its layers (the layers' last progress goes before it).
    _pending: dict[str, bool] = field(default_factory=dict)
    _sent: set[str] = field(default_factory=set)

    async def run(
        self, lines: asyncio.Queue[tuple[Node, dict[str, Any] | None]]
    ) -> AsyncIterator[dict[str, Any]]:
        self._state = {node.name: _NodeProgress() for node in self.nodes}
        running = len(self.nodes)
        while running:
            node, line = await lines.get()
            if line is None:
                running -= 1
                if node not in self.succeeded:
                    self.errors.setdefault(node.name, "ended without success")
                    self._state[node.name].failed = True
            else:
                self._take(node, line)
            for merged in self._advance():
                yield merged

    def _take(self, node: Node, line: dict[str, Any]) -> None:
        state = self._state[node.name]
        status = str(line.get("status", ""))
        digest = line.get("digest")
        if "error" in line:
            self.errors[node.name] = str(line["error"])
            state.failed = True
        elif status == "success":
            self.succeeded.append(node)
            state.done = True
        elif isinstance(digest, str) and digest:
            state.in_layers = True
            if (total := _int(line.get("total"))) > 0:
                self._totals.setdefault(digest, total)
                self._labels.setdefault(digest, status)
            completed = _int(line.get("completed"))
            state.layers[digest] = max(completed, state.layers.get(digest, 0))
        elif status:
            state.past_layers = state.in_layers
            state.statuses.add(status)
            if status not in self._sent:
                self._pending.setdefault(status, state.in_layers)

    def _advance(self) -> list[dict[str, Any]]:
        """The merged lines the last change allows, steps and layers in order."""
        running = [s for s in self._state.values() if not s.failed]
        if not running:
            return []
        merged: list[dict[str, Any]] = []
        for status, after_layers in list(self._pending.items()):
            if status not in self._pending:  # dropped below, behind a later step
                continue
            if not all(s.done or status in s.statuses for s in running):
                continue
            if after_layers:
                merged += self._layer_lines(running)
            merged.append({"status": status})
            self._sent.add(status)
            for earlier in list(self._pending)[: list(self._pending).index(status) + 1]:
                del self._pending[earlier]  # a step left behind is never shown out of order
        return merged + self._layer_lines(running)

    def _layer_lines(self, running: list[_NodeProgress]) -> list[dict[str, Any]]:
        if not all(s.done or s.in_layers for s in running):
            return []
        lines = []
        for digest, total in self._totals.items():
            completed = min(_completed(s, digest, total) for s in running)
            if digest in self._shown and completed <= self._shown[digest]:
                continue
            self._shown[digest] = completed
            label = self._labels[digest]
            lines.append(
                {"status": label, "digest": digest, "total": total, "completed": completed}
            )
        return lines

    def final(self, what: str) -> dict[str, Any]:
        if not self.errors and len(self.succeeded) == len(self.nodes):
            return {"status": "success"}
        failed = "; ".join(f"{name}: {error}" for name, error in sorted(self.errors.items()))
        return {
            "error": f"{what} failed on {len(self.errors)} of {len(self.nodes)} nodes: {failed}"
        }


def _completed(state: _NodeProgress, digest: str, total: int) -> int:
    """How much of a layer a node has: all of it once it is past its layers."""
    if state.done or state.past_layers:
        return total
    return min(state.layers.get(digest, 0), total)


def _summarise(
    outcomes: list[tuple[Node, int, bytes]],
    what: str,
    *,
    ok: tuple[int, ...],
    gone: int | None = None,
    missing: str = "",
    status_on_success: int = 200,
) -> web.Response:
    """One answer for a fan-out: success when every node did it (or never had it); 404 with
    ``missing`` when every node answered ``gone``."""
    failed = [(n, s, b) for n, s, b in outcomes if s not in ok and s != gone]
    if failed:
        reasons = "; ".join(
            f"{n.name}: {_error_text(b.decode(errors='replace'), s)}" for n, s, b in failed
        )
        return error_response(
            500, f"{what} failed on {len(failed)} of {len(outcomes)} nodes: {reasons}"
        )
    if all(s == gone for _, s, _ in outcomes):
        return error_response(404, missing)
    return web.Response(status=status_on_success)


def _blob_path(request: web.Request) -> str:
    """The nodes' path for the blob, built from its digest once checked, never from the
    client's path: decoded, its escapes (``%2F``, ``%3F``) would reach any path on every node."""
    digest = request.match_info["digest"]
    if not DIGEST.fullmatch(digest):
        raise ProxyError(400, "invalid digest format")  # Ollama's words
    return BLOBS_PREFIX + digest


def _streamed(body: bytes) -> bytes:
    """The body asking the nodes for progress lines, whatever the client asked: they are
    merged, and a node that says nothing until the end would look silent."""
    kept = {k: v for k, v in whole_object(body).items() if field_named(k) != "stream"}
    return compact({**kept, "stream": True})


async def _drain(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (piece := await queue.get()) is not None:
        yield piece


async def _model_body(request: web.Request, limit: int) -> tuple[bytes, str]:
    body = await read_bounded(request, limit)
    model = model_of(required_json_object(body))
    if model is None:
        raise ProxyError(400, "model is required")
    if refused_name(model):
        raise ProxyError(400, INVALID_MODEL_NAME)
    return body, normalize_model(model)


def _json_line(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return {"error": f"unreadable progress line: {line[:100]!r}"}
    return value if isinstance(value, dict) else {"error": "unexpected progress line"}


def _error_text(body: str, status: int) -> str:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return f"status {status}: {body.strip()[:200]}"
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return str(value["error"])
    return f"status {status}"


def _union(lists: Any, *keys: str) -> list[dict[str, Any]]:
    """Entries of several nodes' lists, each once (by the first of ``keys`` it has)."""
    seen: set[str] = set()
    merged = []
    for node_entries in lists:
        for entry in node_entries:
            key = _name(entry, keys)
            if key is not None and normalize_model(key) not in seen:
                seen.add(normalize_model(key))
                merged.append(entry)
    return merged


def _name(entry: dict[str, Any], keys: tuple[str, ...] = ("model", "name", "id")) -> str | None:
    """A listing entry's model name, by the first of ``keys`` it has."""
    return next((str(entry[k]) for k in keys if k in entry), None)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("-")[0])[:3])


def _field(answer: Any, key: str) -> Any:
    """``answer[key]`` when the answer is a JSON object with that key, else None."""
    return answer.get(key) if isinstance(answer, dict) else None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


__all__ = ["Fleet"]
