"""Failing nodes: requests go elsewhere, node_up follows the thresholds, and nodes come back."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from proxy.discovery import Discovery
from proxy.health import Health
from proxy.pool import Pool
from proxy.sim import SimNode
from proxy.supervision import Tasks

from .conftest import Proxy, StartNodes, StartProxy, generations, metric, proxy_config

GENERATE = {"model": "llama3.2", "prompt": "x"}


async def generate_ok(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.post(url + "/api/generate", json=GENERATE) as resp:
        if resp.status != 200:
            return False
        chunks = [json.loads(line) async for line in resp.content]
        return chunks[-1].get("done") is True and "error" not in chunks[-1]


async def node_up(proxy: Proxy, node: SimNode) -> float:
    return metric(await proxy.metrics_text(), "ollama_proxy_node_up", node=node.name)


async def wait_node_up(proxy: Proxy, node: SimNode, value: float) -> None:
    async with asyncio.timeout(3):
        while await node_up(proxy, node) != value:
            await asyncio.sleep(0.02)  # the metric is scraped, as Prometheus would


async def test_refusing_node_costs_no_request(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    good, bad = await start_nodes(2)
    proxy = await start_proxy([good, bad])
    await bad.refuse()  # the proxy still believes it is up
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(generate_ok(session, proxy.url) for _ in range(10)))
    assert all(results)
    text = await proxy.metrics_text()
    assert metric(text, "ollama_proxy_retries_total", reason="connect") >= 1
    assert metric(text, "ollama_proxy_upstream_errors_total", node=bad.name, kind="connect") >= 1
    await wait_node_up(proxy, bad, 0)  # passive failures (fall=2) or the next active check
    await bad.start()
    await wait_node_up(proxy, bad, 1)
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(generate_ok(session, proxy.url) for _ in range(4)))
    assert len(generations(bad)) >= 1  # back in rotation


async def test_busy_node_is_retried_elsewhere(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    good, busy = await start_nodes(2)
    busy.settings.fault = "busy"
    proxy = await start_proxy([good, busy])
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(generate_ok(session, proxy.url) for _ in range(10)))
    assert all(results)
    assert busy.stats.busy_rejections >= 1
    text = await proxy.metrics_text()
    assert metric(text, "ollama_proxy_retries_total", reason="node_busy") == (
        busy.stats.busy_rejections
    )
    assert await node_up(proxy, busy) == 1  # busy is load, not a fault


async def test_only_node_busy_passes_its_503_through(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (busy,) = await start_nodes(1, fault="busy")
    proxy = await start_proxy([busy])
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/generate", json=GENERATE) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"].startswith("server busy")


async def test_node_killed_during_a_run(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    a, b = await start_nodes(2, tokens=4, token_interval=0.01)
    proxy = await start_proxy([a, b])
    async with aiohttp.ClientSession() as session:
        assert all(await asyncio.gather(*(generate_ok(session, proxy.url) for _ in range(6))))
        await a.stop()  # killed between requests: every later request must still succeed
        after_kill = await asyncio.gather(*(generate_ok(session, proxy.url) for _ in range(12)))
        assert all(after_kill)
        await wait_node_up(proxy, a, 0)
        await a.start()
        await wait_node_up(proxy, a, 1)
        a.reset_stats()
        # Which node the scheduler prefers is its own business (see test_scheduling); that the
        # node that came back serves again is this test's: with the other one draining, it must.
        proxy.pool.nodes[b.name].draining = True
        proxy.pool.changed()
        assert all(await asyncio.gather(*(generate_ok(session, proxy.url) for _ in range(6))))
    assert len(generations(a)) >= 1


async def test_failing_health_checks_take_a_node_out_and_back(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    a, b = await start_nodes(2)
    proxy = await start_proxy([a, b])
    a.settings.health_fail = True
    await wait_node_up(proxy, a, 0)
    a.reset_stats()
    async with aiohttp.ClientSession() as session:
        assert all(await asyncio.gather(*(generate_ok(session, proxy.url) for _ in range(6))))
    assert generations(a) == []  # a down node gets no traffic
    a.settings.health_fail = False
    await wait_node_up(proxy, a, 1)


async def test_passive_failures_never_empty_the_fleet(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, fault="error500")
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.post(proxy.url + "/api/generate", json=GENERATE) as resp:
                assert resp.status == 500  # the node's own error, passed through
    assert await node_up(proxy, node) == 1


async def test_read_timeout_is_not_retried(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    # The node got the request and may be generating: sending it elsewhere would double the work.
    nodes = await start_nodes(2, first_token_delay=2.0)
    proxy = await start_proxy(nodes, upstream={"idle_timeout": 0.2})
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/generate", json=GENERATE) as resp:
            assert resp.status == 504
            assert "did not answer in time" in (await resp.json())["error"]
    assert sum(len(generations(n)) for n in nodes) == 1
    await asyncio.gather(*(n.wait_for(lambda s: s.active == 0) for n in nodes))


async def test_node_failing_requests_stays_out_despite_passing_checks(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    good, broken = await start_nodes(2)
    broken.settings.fault = "error500"  # its /api/version still answers 200
    proxy = await start_proxy([good, broken], health_check={"ejection_time": 0.6})
    async with aiohttp.ClientSession() as session:
        while await node_up(proxy, broken) == 1:  # requests until it is taken out
            async with session.post(proxy.url + "/api/generate", json=GENERATE) as resp:
                await resp.read()
        out_at = asyncio.get_running_loop().time()
        await asyncio.sleep(0.4)  # two passing checks (interval 0.2, rise 1) in this time
        assert await node_up(proxy, broken) == 0
        await wait_node_up(proxy, broken, 1)  # back once the ejection time is over
        assert asyncio.get_running_loop().time() - out_at >= 0.55


@contextlib.asynccontextmanager
async def checker(nodes: list[SimNode], **health_check: Any) -> AsyncIterator[Health]:
    """The proxy's health keeping without its timer: each check and failure is the test's."""
    config = proxy_config(nodes, health_check=health_check)
    pool = Pool(config.nodes, config.queue)
    async with aiohttp.ClientSession() as session:
        tasks = Tasks()  # the refreshes of nodes that come up
        yield Health(pool, session, config.health_check, Discovery(pool, session, config, tasks))
        await tasks.aclose()


async def test_failing_requests_eject_a_node_despite_a_passed_check_between_each(
    start_nodes: StartNodes,
) -> None:
    good, broken = await start_nodes(2)
    async with checker([good, broken], fall=3, ejection_time=30) as health:
        node = health.pool.nodes[broken.name]
        out_after = []
        for attempt in range(1, 201):  # 200 failed generations, a passed check after each
            health.passive_failure(node, "status_5xx")
            if not node.up:
                out_after.append(attempt)
            await health.check(node)  # its /api/version answers 200 every time
        assert out_after[0] == 3  # fall=3 failed requests in a row, whatever the checks said
        assert not node.up and node.ejections == 1  # ejected once, kept out by the hold


async def test_failed_requests_and_a_failed_check_are_not_added_up(
    start_nodes: StartNodes,
) -> None:
    sim, other = await start_nodes(2)
    async with checker([sim, other], fall=3) as health:
        node = health.pool.nodes[sim.name]
        await health.check(node)  # the first check decides at once: up
        health.passive_failure(node, "connect")
        health.passive_failure(node, "connect")
        sim.settings.health_fail = True
        await health.check(node)
        assert node.up  # two of one kind and one of the other are not three of either
        await health.check(node)
        await health.check(node)
        assert not node.up  # three failed checks in a row are
        assert node.ejections == 0  # taken down by its checks, not ejected


async def test_only_a_request_served_well_ends_a_run_of_request_failures(
    start_nodes: StartNodes,
) -> None:
    sim, other = await start_nodes(2)
    async with checker([sim, other], fall=2) as health:
        node = health.pool.nodes[sim.name]
        health.passive_failure(node, "status_5xx")
        health.passive_success(node)
        health.passive_failure(node, "status_5xx")
        assert node.up  # the success in between ended the first run
        health.passive_failure(node, "status_5xx")
        assert not node.up
