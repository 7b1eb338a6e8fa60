"""Caps hold, the queue goes to whichever node frees first, and overload is a clean 503."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from proxy.sim import SimNode

from .conftest import Proxy, StartNodes, StartProxy, generations, wait_until

GENERATE = {"model": "llama3.2", "prompt": "x"}


async def generate(session: aiohttp.ClientSession, base_url: str) -> tuple[int, list[dict]]:
    """A streaming generate, read to the end; (status, chunks)."""
    async with session.post(base_url + "/api/generate", json=GENERATE) as resp:
        if resp.status != 200:
            return resp.status, [await resp.json()]
        return resp.status, [json.loads(line) async for line in resp.content]


def complete(chunks: list[dict]) -> bool:
    return bool(chunks) and chunks[-1].get("done") is True and "error" not in chunks[-1]


async def test_caps_hold_under_a_burst(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    # The nodes would take 10 at once; the proxy must never send more than their caps.
    nodes = await start_nodes(2, num_parallel=10, tokens=5, token_interval=0.01)
    proxy = await start_proxy(nodes, caps=[2, 3])
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(generate(session, proxy.url) for _ in range(30)))
    assert all(status == 200 and complete(chunks) for status, chunks in results)
    assert [n.stats.max_active for n in nodes] == [2, 3]
    assert sum(len(generations(n)) for n in nodes) == 30


async def timed_generate(session: aiohttp.ClientSession, url: str) -> float:
    started = time.monotonic()
    status, chunks = await generate(session, url)
    assert status == 200 and complete(chunks)
    return time.monotonic() - started


async def test_queue_favours_the_fast_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (fast,) = await start_nodes(1, num_parallel=2, tokens=10, token_interval=0.005)
    (slow,) = await start_nodes(1, num_parallel=2, tokens=10, token_interval=0.05)
    proxy = await start_proxy([fast, slow], caps=[2, 2])
    requests = 24
    async with aiohttp.ClientSession() as session:
        # Round robin, as a proxy without a queue of its own does: every other request waits in
        # the slow node's own queue, even while the fast node is idle.
        urls = [(fast.url, slow.url)[i % 2] for i in range(requests)]
        round_robin = await asyncio.gather(*(timed_generate(session, u) for u in urls))
        fast.reset_stats()
        slow.reset_stats()
        proxied = await asyncio.gather(
            *(timed_generate(session, proxy.url) for _ in range(requests))
        )
    assert len(generations(fast)) > 2 * len(generations(slow))
    assert max(proxied) < max(round_robin)
    # The caps hold; the slow node may take fewer at once (once its probe showed it slow).
    assert fast.stats.max_active == 2 and 1 <= slow.stats.max_active <= 2


async def error_of(resp: aiohttp.ClientResponse) -> str:
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert list(body) == ["error"]
    return str(body["error"])


async def start_holding(session: aiohttp.ClientSession, proxy: Proxy, node: SimNode) -> list:
    """Fill the node's only slot with a long stream (headers in: it holds the slot)."""
    resp = await session.post(proxy.url + "/api/generate", json=GENERATE)
    assert resp.status == 200
    return [resp]


async def test_queue_full_is_503_with_retry_after(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, tokens=20, token_interval=0.01)
    proxy = await start_proxy([node], caps=[1], queue={"max_size": 2})
    async with aiohttp.ClientSession() as session:
        (holder,) = await start_holding(session, proxy, node)
        queued = [asyncio.create_task(generate(session, proxy.url)) for _ in range(2)]
        await wait_until(lambda: proxy.pool.queue_depth == 2)
        async with session.get(proxy.url + "/-/nodes") as state:
            assert (await state.json())["nodes"][0]["queued_for_it"] == 2
        async with session.post(proxy.url + "/api/generate", json=GENERATE) as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) >= 1
            assert "queue is full" in await error_of(resp)
        async for _ in holder.content:
            pass
        holder.release()
        for status, chunks in await asyncio.gather(*queued):
            assert status == 200 and complete(chunks)
    assert len(generations(node)) == 3
    metrics = await proxy.metrics_text()
    assert 'ollama_proxy_queue_rejected_total{reason="full"} 1.0' in metrics


async def test_queue_timeout_is_503_with_retry_after(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, tokens=40, token_interval=0.02)
    proxy = await start_proxy([node], caps=[1], queue={"timeout": 0.2})
    async with aiohttp.ClientSession() as session:
        (holder,) = await start_holding(session, proxy, node)
        started = time.monotonic()
        async with session.post(proxy.url + "/api/generate", json=GENERATE) as resp:
            waited = time.monotonic() - started
            assert resp.status == 503 and "Retry-After" in resp.headers
            assert "timed out waiting" in await error_of(resp)
        assert 0.15 < waited < 0.7
        chunks = [json.loads(line) async for line in holder.content]
        holder.release()
        assert complete(chunks)
    metrics = await proxy.metrics_text()
    assert 'ollama_proxy_queue_rejected_total{reason="timeout"} 1.0' in metrics


async def test_metrics_exposes_the_documented_names(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(await start_nodes(1))
    async with aiohttp.ClientSession() as session:
        await generate(session, proxy.url)
    text = await proxy.metrics_text()
    for name in (
        "ollama_proxy_requests_total",
        "ollama_proxy_in_flight",
        "ollama_proxy_node_up",
        "ollama_proxy_queue_depth",
        "ollama_proxy_queue_rejected_total",
        "ollama_proxy_retries_total",
        "ollama_proxy_client_disconnects_total",
        "ollama_proxy_upstream_errors_total",
        "ollama_proxy_time_to_first_byte_seconds_bucket",
        "ollama_proxy_request_duration_seconds_bucket",
    ):
        assert f"\n# TYPE {name.removesuffix('_bucket')} " in text, name
    assert 'ollama_proxy_requests_total{code="200",endpoint="/api/generate",node="sim0"} 1.0' in (
        text
    )
    assert 'le="2560.0"' in text  # buckets reach tens of minutes
