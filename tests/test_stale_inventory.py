"""A model pulled on a node behind the proxy's back is found on the first request, not a 404;
made-up names cost the nodes a bounded number of /api/tags."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import ollama

from proxy.sim import SimNode

from .conftest import BareNode, Proxy, StartNodes, StartProxy, generations

SLOW_DISCOVERY = {"interval": 3600}  # no timed refresh during a test: only the rechecks


def tags_asked(node: SimNode) -> int:
    return sum(1 for r in node.stats.requests if r.path == "/api/tags")


async def post(proxy: Proxy, path: str, body: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + path, json=body) as resp:
            await resp.read()
            return resp.status


async def test_a_model_pulled_behind_the_proxys_back_is_served_at_once(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], discovery=SLOW_DISCOVERY)
    node.settings.models.append("fresh:1b")  # `ollama pull fresh:1b` on the node itself
    client = ollama.AsyncClient(host=proxy.url)
    try:
        shown = await client.show("fresh:1b")  # what `ollama run` asks first
        assert shown.modelfile
        answer = await client.generate(model="fresh:1b", prompt="hi")
        assert answer.response
    finally:
        await client.close()
    assert [r.model for r in generations(node)] == ["fresh:1b", "fresh:1b"]


async def test_a_fleet_delete_finds_a_model_pulled_behind_its_back(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], discovery=SLOW_DISCOVERY)
    node.settings.models.append("fresh:1b")
    assert await post(proxy, "/api/copy", {"source": "fresh:1b", "destination": "b:1b"}) == 200
    async with aiohttp.ClientSession() as session:
        async with session.delete(proxy.url + "/api/delete", json={"model": "fresh:1b"}) as resp:
            assert resp.status == 200, await resp.text()
    assert "fresh:1b" not in node.settings.models


async def test_made_up_names_cost_a_bounded_number_of_listings(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes, discovery=SLOW_DISCOVERY)
    before = [tags_asked(n) for n in nodes]
    started = time.monotonic()
    # 500 at once share one round; 500 one after another start at most one round a second.
    concurrent = [post(proxy, "/api/generate", {"model": f"made-up-{i}"}) for i in range(500)]
    assert set(await asyncio.gather(*concurrent)) == {404}
    async with aiohttp.ClientSession() as session:
        for i in range(500):
            body = {"model": f"other-{i}", "prompt": "x"}
            async with session.post(proxy.url + "/api/chat", json=body) as resp:
                assert resp.status == 404
    rounds_allowed = 1 + int(time.monotonic() - started) + 1  # RECHECK_INTERVAL is 1 s
    for node, had in zip(nodes, before, strict=True):
        assert 1 <= tags_asked(node) - had <= rounds_allowed, node.name
        assert generations(node) == []


async def test_concurrent_misses_share_one_round(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], discovery=SLOW_DISCOVERY)
    before = tags_asked(node)
    bodies = [{"model": f"made-up-{i}", "prompt": "x"} for i in range(50)]
    statuses = await asyncio.gather(*(post(proxy, "/api/generate", b) for b in bodies))
    assert statuses == [404] * 50
    assert tags_asked(node) - before == 1


class StallingNode(BareNode):
    """Answers checks and listings at once, until ``stall`` is set: then /api/tags hangs."""

    def __init__(self) -> None:
        super().__init__()
        self.stall = False
        self.release = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.stall and head.startswith(b"GET /api/tags"):
                    await self.release.wait()
                hello = self.HELLO
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(hello))
                writer.write(hello)
        writer.close()


async def test_a_node_slow_to_list_delays_a_404_by_at_most_the_recheck_timeout(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (fast,) = await start_nodes(1)
    slow = StallingNode()
    await slow.start()
    recheck_timeout = 0.3
    discovery = {**SLOW_DISCOVERY, "recheck_timeout": recheck_timeout}
    proxy = await start_proxy([fast, slow], discovery=discovery)
    slow.stall = True
    started = time.monotonic()
    try:
        assert await post(proxy, "/api/generate", {"model": "nowhere:1b"}) == 404
        waited = time.monotonic() - started
    finally:
        slow.release.set()
    assert recheck_timeout * 0.9 <= waited < recheck_timeout + 1.0
