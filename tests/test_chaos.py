"""Many requests, clients leaving at random moments, nodes failing: nothing leaks, no cap breaks."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp

from .conftest import StartNodes, StartProxy, metric, pool_is_idle, wait_until

GENERATE = {"model": "llama3.2", "prompt": "x"}


async def one_client(session: aiohttp.ClientSession, url: str, rng: random.Random) -> str:
    """A request that may be abandoned at any point; returns how it ended."""
    stream = rng.random() < 0.7
    body = {**GENERATE, "stream": stream}
    leave_after = rng.choice([None, None, 0.0, 0.02, 0.1, 0.3, 0.6])
    request = asyncio.ensure_future(_complete(session, url, body))
    if leave_after is None:
        return await request
    await asyncio.sleep(leave_after)
    request.cancel()
    try:
        return await request
    except asyncio.CancelledError:
        return "left"


async def leaves_mid_stream(session: aiohttp.ClientSession, url: str) -> str:
    """A client that leaves once its stream has begun on a node: a cancellation that must
    reach the node, whatever the timing of the random ones."""
    async with session.post(url + "/api/generate", json=GENERATE) as resp:
        if resp.status != 200:
            return f"status {resp.status}"
        await resp.content.readline()
    return "left"


async def _complete(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> str:
    lines = []
    async with session.post(url + "/api/generate", json=body) as resp:
        if resp.status != 200:
            return f"status {resp.status}"
        try:
            async for line in resp.content:
                lines.append(json.loads(line))
        except aiohttp.ClientPayloadError:
            # Broken off: acceptable only after an error line, never silently cut.
            return "error line" if lines and "error" in lines[-1] else "cut short"
    return "done" if lines and lines[-1].get("done") is True else "ended without done"


async def test_random_departures_and_failures_leave_nothing_behind(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    rng = random.Random(7)
    nodes = await start_nodes(3, num_parallel=8, tokens=20, token_interval=0.01)
    nodes[2].settings.fault = "die"
    nodes[2].settings.fault_after_tokens = 3
    proxy = await start_proxy(nodes, caps=[2, 3, 2], queue={"max_size": 200, "timeout": 30})
    async with aiohttp.ClientSession() as session:
        clients = [one_client(session, proxy.url, rng) for _ in range(100)]
        clients += [leaves_mid_stream(session, proxy.url) for _ in range(5)]
        outcomes = await asyncio.gather(*clients)
    await wait_until(lambda: pool_is_idle(proxy.pool), what="every slot back, queue empty")
    await asyncio.gather(*(n.wait_for(lambda s: s.active == 0 and s.queued == 0) for n in nodes))
    # Caps held at every moment, whatever left or failed.
    assert all(n.stats.max_active <= cap for n, cap in zip(nodes, [2, 3, 2], strict=True))
    kinds = set(outcomes)
    assert "done" in kinds and "left" in kinds
    # A request either completed, was left by its client, or ended visibly broken: never a
    # clean end that lacks the final chunk.
    assert kinds <= {"done", "left", "error line", "status 502"}, kinds
    # The healthy nodes did real work and saw clients leave; the dying one was blamed.
    assert all(n.stats.completed > 0 for n in nodes[:2])
    assert sum(n.stats.cancelled for n in nodes) > 0
    errors = metric(
        await proxy.metrics_text(), "ollama_proxy_upstream_errors_total", node="sim2", kind="broken"
    )
    assert errors > 0
