"""One node's bad answer ends nothing: not the start-up, not a loop; and shutdown ends every task.

The odd nodes here are small aiohttp apps that answer GETs with whatever the test sets, so a
listing can be malformed in ways no real Ollama (and no simulated node) would send.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import proxy
from proxy.app import RUNTIME, make_app
from proxy.serving import serve

from .conftest import StartNodes, StartProxy, generations, proxy_config, wait_until

GENERATE = {"model": "llama3.2", "prompt": "x", "stream": False}
DEEP = b"[" * 100_000  # valid JSON so far, and too deep for Python's parser: RecursionError
GOOD = {
    "/api/version": {"version": "0.12.6"},
    "/api/tags": {"models": [{"name": "tinyllama:latest", "model": "tinyllama:latest"}]},
    "/api/ps": {"models": []},
}


class OddNode:
    """Answers each GET path with ``answers[path]`` (JSON, or bytes as they are); counts asks."""

    def __init__(self, name: str, answers: dict[str, Any]) -> None:
        self.name = name
        self.url = ""
        self.answers = {**GOOD, **answers}
        self.asked: collections.Counter[str] = collections.Counter()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._answer)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _answer(self, request: web.Request) -> web.Response:
        self.asked[request.path] += 1
        if request.path not in self.answers:
            return web.json_response({"error": "not found"}, status=404)
        answer = self.answers[request.path]
        return web.Response(body=answer if isinstance(answer, bytes) else json.dumps(answer))

    async def asked_again(self, path: str, times: int = 2) -> None:
        """Until ``path`` was asked ``times`` more: a round that began after now has ended."""
        target = self.asked[path] + times
        await wait_until(lambda: self.asked[path] >= target, what=f"{path} asked again")


StartOdd = Callable[..., Awaitable[OddNode]]


@pytest.fixture
async def start_odd() -> AsyncIterator[StartOdd]:
    started: list[OddNode] = []

    async def start(name: str, **answers: Any) -> OddNode:
        node = OddNode(name, {f"/api/{path}": answer for path, answer in answers.items()})
        await node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        assert node.runner is not None
        await node.runner.cleanup()


async def generate_status(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/api/generate", json=GENERATE) as resp:
            await resp.read()
            return resp.status


async def test_malformed_listings_at_start_up_keep_their_well_formed_parts(
    start_nodes: StartNodes,
    start_proxy: StartProxy,
    start_odd: StartOdd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (sim,) = await start_nodes(1)
    odd = await start_odd(
        "odd",
        version=["0.12.6"],  # answered 200: it passes its checks
        tags={"models": [{"model": 5}, 7, {"name": "tinyllama"}, {"model": [1], "name": "qwen"}]},
        ps={"models": [{"model": 5}, "x", {"model": "tinyllama", "expires_at": 7}]},
    )
    # Not listings at all: what the node holds stays unknown, as before its first answer.
    odder = await start_odd("odder", version=DEEP, tags=DEEP, ps={"models": 5})
    proxy = await start_proxy([sim, odd, odder], discovery={"interval": 0.05})
    nodes = proxy.pool.nodes
    assert nodes["odd"].models == {"tinyllama:latest", "qwen:latest"}
    assert nodes["odd"].resident_models() == ["tinyllama:latest"]  # expiry: the default
    assert nodes["odder"].models is None and nodes["odder"].resident == {}
    assert nodes["odder"].up and nodes["odder"].version is None  # it answered 200
    assert await generate_status(proxy.url) == 200
    assert len(generations(sim)) == 1  # llama3.2 only on the simulated node
    async with aiohttp.ClientSession() as session:  # the fleet's version: the nodes that say
        async with session.get(proxy.url + "/api/version") as resp:
            assert (resp.status, await resp.json()) == (200, {"version": "0.12.6"})
    await odd.asked_again("/api/ps", times=3)  # more rounds, no more warnings
    warned = [r.getMessage() for r in caplog.records if r.name == "ollama_proxy.discovery"]
    assert len(warned) == len(set(warned)) == 4, warned  # once per node and shape
    assert not [r for r in caplog.records if r.exc_info]  # nothing unexpected


async def test_loops_go_on_after_a_node_answered_malformed_ones(
    start_nodes: StartNodes, start_proxy: StartProxy, start_odd: StartOdd
) -> None:
    (sim,) = await start_nodes(1)
    odd = await start_odd("odd")
    proxy = await start_proxy([sim, odd], discovery={"interval": 0.05})
    node = proxy.pool.nodes["odd"]
    assert node.models == {"tinyllama:latest"} and node.version == "0.12.6"
    odd.answers.update({"/api/version": DEEP, "/api/ps": {"models": [{"model": 5}]}})
    await odd.asked_again("/api/ps")
    await odd.asked_again("/api/version")
    odd.answers.update(
        {
            "/api/version": {"version": "0.13.0"},
            "/api/tags": {"models": [{"name": "qwen2.5:0.5b"}]},
            "/api/ps": {"models": [{"name": "qwen2.5:0.5b", "expires_at": "2999-01-01T00:00:00Z"}]},
        }
    )
    await wait_until(lambda: node.models == {"qwen2.5:0.5b"}, what="the next good listing")
    await wait_until(lambda: node.version == "0.13.0", what="the next good check")
    assert node.resident_models() == ["qwen2.5:0.5b"]
    assert await generate_status(proxy.url) == 200


class SilentNode:
    """Takes connections and never answers: a health check of it waits for its timeout."""

    def __init__(self) -> None:
        self.name = "silent"
        self.url = ""
        self.connections: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(writer)
        await reader.read()  # until the proxy hangs up

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.connections:
            writer.close()
        await self.server.wait_closed()


def pending_proxy_tasks() -> list[asyncio.Task[Any]]:
    """Unfinished tasks running the proxy's own coroutines (not the simulated nodes')."""
    package = Path(proxy.__file__).parent

    def ours(task: asyncio.Task[Any]) -> bool:
        code = getattr(task.get_coro(), "cr_code", None)
        where = Path(code.co_filename) if code is not None else None
        return where is not None and where.parent == package  # not proxy/sim: the nodes

    return [t for t in asyncio.all_tasks() if not t.done() and ours(t)]


async def test_every_task_the_proxy_started_is_done_after_its_cleanup(
    start_nodes: StartNodes,
) -> None:
    (sim,) = await start_nodes(1)
    silent = SilentNode()
    await silent.start()
    slow_checks = {"timeout": 30, "interval": 0.05}
    app = make_app(proxy_config([sim], health_check=slow_checks))
    serving = await serve(app, "127.0.0.1", 0)
    app[RUNTIME].apply(proxy_config([sim, silent], health_check=slow_checks))
    await wait_until(lambda: len(silent.connections) >= 2, what="checks of the added node")
    app[RUNTIME].discovery.refresh_soon(app[RUNTIME].pool.nodes[sim.name])
    assert pending_proxy_tasks()  # loops, and checks waiting for the silent node
    await serving.close()
    assert pending_proxy_tasks() == []
    await silent.stop()
