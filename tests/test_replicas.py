"""Several replicas, one fleet: a node's caps and a key's hold across replicas (leases in a
real Redis), a dead replica's slots come back, and Redis trouble is not an outage."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from proxy.config import parse_config
from proxy.fairshare import Tenant
from proxy.leases import RELEASE, RENEW, TAKE
from proxy.pool import Lease, Pool, Want
from proxy.sim import SimNode

from .conftest import (
    Proxy,
    RedisServer,
    StartNodes,
    StartProxy,
    metric,
    proxy_config_data,
    proxy_subprocess,
    wait_until,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:redis")


def generation(tokens: int = 8) -> dict[str, Any]:
    return {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": tokens}}


async def stream(
    session: aiohttp.ClientSession, url: str, tokens: int = 8, **kwargs: Any
) -> list[dict[str, Any]]:
    """A streamed generation, read to its end: every line, the last one done."""
    async with session.post(url + "/api/generate", json=generation(tokens), **kwargs) as r:
        assert r.status == 200, await r.text()
        lines = [json.loads(line) for line in (await r.read()).splitlines()]
    assert lines[-1]["done"] is True, lines[-1]
    return lines


async def replicas(
    start_proxy: StartProxy, node: SimNode, count: int, redis: RedisServer, **kwargs: Any
) -> list[Proxy]:
    """``count`` in-process replicas sharing ``redis``, each knowing of all the others."""
    state = {"redis_url": redis.url, "lease_ttl": 1.5, **kwargs.pop("state", {})}
    started = [await start_proxy([node], state=state, **kwargs) for _ in range(count)]
    slots = [p.runtime.forwarder.slots for p in started]
    await wait_until(
        lambda: all(s.shared and s.replicas == count for s in slots),
        timeout=5,
        what="every replica to share its slots and see the others",
    )
    return started


def spread(proxies: list[Proxy], count: int) -> Iterator[str]:
    for i in range(count):
        yield proxies[i % len(proxies)].url


# -- the Lua scripts, against the real Redis ------------------------------------------------


@pytest.fixture
async def client(redis: RedisServer) -> Any:
    client = Redis.from_url(redis.url)
    yield client
    await client.aclose()


async def test_a_lease_is_taken_only_under_every_cap(client: Redis) -> None:
    take = client.register_script(TAKE)
    assert await take(["node"], ["a", 10_000, 2]) == 0
    assert await take(["node"], ["b", 10_000, 2]) == 0
    assert await take(["node"], ["c", 10_000, 2]) == 1  # the node is at its cap
    assert await take(["other", "model"], ["d", 10_000, 5, 1]) == 0
    assert await take(["other", "model"], ["e", 10_000, 5, 1]) == 2  # its model is
    assert await client.zrange("other", 0, -1) == [b"d"]  # refused: counted nowhere
    assert await client.zrange("node", 0, -1) == [b"a", b"b"]


async def test_a_lease_expires_after_its_ttl(client: Redis) -> None:
    take = client.register_script(TAKE)
    assert await take(["node"], ["a", 200, 1]) == 0
    assert await take(["node"], ["b", 10_000, 1]) == 1
    started = time.monotonic()
    while await take(["node"], ["b", 10_000, 1]) != 0:
        await asyncio.sleep(0.02)
    assert 0.15 < time.monotonic() - started < 1
    assert await client.zrange("node", 0, -1) == [b"b"]
    assert 0 < await client.pttl("node") <= 10_000  # the set goes with its last lease


async def test_a_released_lease_frees_its_slot_and_says_so(client: Redis) -> None:
    take, release = client.register_script(TAKE), client.register_script(RELEASE)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("freed")
    assert await take(["node", "key"], ["a", 10_000, 2, 1]) == 0
    assert await release(["node", "key"], ["freed", "a", 2, "a", 1]) == 1  # the key was full
    assert await client.exists("node", "key") == 0
    message = None
    async with asyncio.timeout(2):
        while message is None:  # the first answer is the subscription's, passed over
            message = await pubsub.get_message(timeout=1)
    assert message["channel"] == b"freed"
    assert await take(["node", "key"], ["b", 10_000, 1, 1]) == 0
    assert await take(["node"], ["c", 10_000, 3]) == 0
    assert await release(["node"], ["freed", "c", 3]) == 0  # nothing was full: no message
    assert await pubsub.get_message(timeout=0.2) is None
    await pubsub.aclose()


async def test_renewal_keeps_leases_and_adds_back_lost_ones(client: Redis) -> None:
    take, renew = client.register_script(TAKE), client.register_script(RENEW)
    assert await take(["node"], ["a", 300, 2]) == 0
    assert await renew(["replicas", "node", "node"], [5_000, "r1", "a", "b"]) == 1
    assert await renew(["replicas"], [5_000, "r2"]) == 2  # another replica registered
    await asyncio.sleep(0.4)  # past the first ttl: renewed, both still counted
    assert await take(["node"], ["c", 10_000, 2]) == 1
    assert set(await client.zrange("node", 0, -1)) == {b"a", b"b"}
    assert await renew(["replicas"], [100, "r1"]) == 2
    await asyncio.sleep(0.15)
    assert await renew(["replicas"], [5_000, "r3"]) == 1  # r1's entry expired, r2's too


# -- replicas in front of one node ----------------------------------------------------------


async def test_three_replicas_hold_one_nodes_cap(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1, num_parallel=100, token_interval=0.005)
    proxies = await replicas(start_proxy, node, 3, redis, caps=[3])
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(*(stream(s, url) for url in spread(proxies, 60)))
    assert len(answers) == 60
    assert node.stats.completed == 60
    assert node.stats.max_active == 3  # never more, and the fleet's three were used
    refused = [
        metric(await p.metrics_text(), "ollama_proxy_lease_refusals_total", node=node.name)
        for p in proxies
    ]
    assert sum(refused) > 0  # the replicas' own caps let more through: Redis held them back


async def test_a_keys_cap_holds_across_replicas(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1, num_parallel=100, token_interval=0.005)
    secret = "sk-alice-secret"
    key = {
        "name": "alice",
        "key_sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "max_concurrency": 2,
    }
    auth = {"keys": [key]}
    proxies = await replicas(start_proxy, node, 3, redis, caps=[10], auth=auth)
    headers = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession() as s:
        calls = (stream(s, url, headers=headers) for url in spread(proxies, 24))
        await asyncio.gather(*calls)
    assert node.stats.completed == 24
    assert node.stats.max_active == 2


async def test_a_running_request_keeps_its_lease_past_the_ttl(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1, num_parallel=100, token_interval=0.1)
    first, second = await replicas(start_proxy, node, 2, redis, caps=[1], state={"lease_ttl": 1})
    async with aiohttp.ClientSession() as s:
        long = asyncio.create_task(stream(s, first.url, tokens=22))  # 2.2 s: two ttls
        await node.wait_for(lambda stats: stats.active == 1)
        short = asyncio.create_task(stream(s, second.url, tokens=1))
        await long
        assert not short.done()  # it waited the whole time: the lease was renewed
        await short
    assert node.stats.max_active == 1


async def test_a_lease_wait_ends_at_the_queues_timeout_from_arrival(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    """However late Redis refuses, the request waits queue.timeout in all, not that again."""
    [node] = await start_nodes(1, num_parallel=100, token_interval=0.1)
    queue = {"timeout": 0.6}
    first, second = await replicas(start_proxy, node, 2, redis, caps=[1], queue=queue)
    slots = second.runtime.forwarder.slots
    take = slots.take

    async def late_take(lease: Any) -> bool:  # a slow round trip, then (the node full) no
        await asyncio.sleep(0.4)
        return await take(lease)

    slots.take = late_take  # type: ignore[method-assign]
    async with aiohttp.ClientSession() as s:
        long = asyncio.create_task(stream(s, first.url, tokens=20))  # 2 s on the one slot
        await node.wait_for(lambda stats: stats.active == 1)
        started = time.monotonic()
        async with s.post(second.url + "/api/generate", json=generation(1)) as r:
            assert r.status == 503 and "Retry-After" in r.headers
        assert time.monotonic() - started < 0.9
        await long


async def test_a_killed_replicas_slots_return_within_the_lease_ttl(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer, tmp_path: Path
) -> None:
    [node] = await start_nodes(1, num_parallel=100, token_interval=0.05)
    state = {"redis_url": redis.url, "lease_ttl": 1}
    data = proxy_config_data([node], caps=[3], state=state, reload={"watch": False})
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump(data))
    survivor = await start_proxy([node], config_path=config)
    slots = survivor.runtime.forwarder.slots
    async with proxy_subprocess(config) as (doomed, process), aiohttp.ClientSession() as s:
        await wait_until(lambda: slots.shared, timeout=5, what="the survivor to share")
        running = asyncio.create_task(stream(s, survivor.url, tokens=50))  # 2.5 s
        await node.wait_for(lambda stats: stats.active == 1)
        cut = [asyncio.create_task(stream(s, doomed, tokens=200)) for _ in range(2)]
        await node.wait_for(lambda stats: stats.active == 3)
        waiting = [asyncio.create_task(stream(s, survivor.url, tokens=1)) for _ in range(2)]
        await wait_until(lambda: survivor.pool.queue_depth == 2, what="the survivor's queue")
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.gather(*waiting)
        assert time.monotonic() - killed < 1 + slots.recheck + 0.5
        assert not running.done()  # the survivor's own stream went on meanwhile
        await running
        await asyncio.gather(*cut, return_exceptions=True)
    assert node.stats.max_active == 3


async def test_redis_stopped_under_load_divides_the_caps_and_loses_nothing(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1, num_parallel=100, token_interval=0.005)
    proxies = await replicas(start_proxy, node, 3, redis, caps=[3])
    pools = [p.pool for p in proxies]
    stop = asyncio.Event()
    done: list[int] = []

    async def client(url: str) -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                done.append(len(await stream(s, url)))

    def served(more: int) -> Any:
        target = node.stats.completed + more
        return node.wait_for(lambda stats: stats.completed >= target, timeout=10)

    clients = [asyncio.create_task(client(url)) for url in spread(proxies, 12)]
    await served(10)
    assert node.stats.max_active <= 3

    redis.stop()
    await wait_until(
        lambda: not any(p.runtime.forwarder.slots.shared for p in proxies),
        timeout=5,
        what="every replica to serve on local state",
    )
    assert all(pool.nodes[node.name].elsewhere == 2 for pool in pools)  # 3 // 3 each
    await wait_until(
        lambda: all(pool.nodes[node.name].in_flight <= 1 for pool in pools),
        what="the requests admitted before to end",
    )
    node.reset_stats()
    await served(20)
    assert node.stats.max_active <= 3  # the divided caps' sum

    redis.start()
    await wait_until(
        lambda: all(p.runtime.forwarder.slots.divided == 1 for p in proxies),
        timeout=5,
        what="every replica to share whole caps again",
    )
    assert all(p.runtime.forwarder.slots.shared for p in proxies)
    node.reset_stats()
    await served(20)
    assert node.stats.max_active <= 3
    stop.set()
    await asyncio.gather(*clients)  # every request answered in full, none failed
    assert len(done) >= 50


# -- dividing the caps while Redis does not answer ------------------------------------------


def test_a_divided_cap_is_rounded_down_but_never_to_zero() -> None:
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "nodes": [
                {"url": "http://127.0.0.1:1", "name": "a", "max_concurrency": 5},
                {"url": "http://127.0.0.1:2", "name": "b", "max_concurrency": 2},
            ],
        }
    )
    pool = Pool(config.nodes, config.queue)
    pool.divide(2)
    assert [len(taken(pool, "a")), len(taken(pool, "b"))] == [2, 1]  # 5 // 2, 2 // 2
    pool.divide(3)  # a reload of caps, or another count of replicas: shares apply at once
    assert pool.nodes["a"].elsewhere == 4 and pool.nodes["b"].elsewhere == 1  # 1 and 1 left
    pool.divide(1)
    assert len(taken(pool, "a")) == 3  # whole again: 5, of which 2 were held


def taken(pool: Pool, name: str) -> list[Lease]:
    only = Want(eligible=lambda node: node.name == name)
    leases = []
    while (lease := pool.try_acquire(only)) is not None:
        leases.append(lease)
    return leases


async def test_a_model_cap_holds_across_replicas(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1, num_parallel=100, token_interval=0.005)
    caps = {"model_concurrency": {"llama3.2": 1}}
    proxies = await replicas(start_proxy, node, 2, redis, caps=[10], node_extra=caps)
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(stream(s, url) for url in spread(proxies, 10)))
    assert node.stats.completed == 10
    assert node.stats.max_active == 1


async def test_a_replica_that_starts_without_redis_divides_by_state_replicas(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1, num_parallel=100, token_interval=0.005)
    redis.stop()
    state = {"redis_url": redis.url, "lease_ttl": 1, "replicas": 3}
    proxy = await start_proxy([node], caps=[7], state=state)
    slots = proxy.runtime.forwarder.slots
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(stream(s, proxy.url) for _ in range(8)))
        assert node.stats.max_active == 2  # 7 // 3
        redis.start()  # only this replica comes: whole caps once lease_ttl has passed
        await wait_until(lambda: slots.shared, timeout=5, what="shared")
        assert slots.divided == 3
        await wait_until(lambda: slots.divided == 1, timeout=3, what="whole caps")
        node.reset_stats()
        await asyncio.gather(*(stream(s, proxy.url) for _ in range(14)))
    assert 2 < node.stats.max_active <= 7  # no longer divided


async def test_a_slot_refused_fleet_wide_does_not_spend_its_keys_turn() -> None:
    config = parse_config(
        {"listen": "127.0.0.1:0", "nodes": [{"url": "http://127.0.0.1:1", "name": "a"}]}
    )
    pool = Pool(config.nodes, config.queue)
    holder = pool.try_acquire()
    assert holder is not None
    alice, bob = Tenant("alice"), Tenant("bob")
    first, second = (asyncio.create_task(pool.acquire(tenant=alice)) for _ in range(2))
    await wait_until(lambda: pool.queue_depth == 2)
    bobs = asyncio.create_task(pool.acquire(tenant=bob))
    await wait_until(lambda: pool.queue_depth == 3)
    holder.release()
    lease = await first  # alice's turn: Redis says another replica holds the node's slot
    pool.full_elsewhere(lease.node)
    pool.refused(lease)
    again = asyncio.create_task(pool.acquire(tenant=alice))  # her request waits again
    await wait_until(lambda: pool.queue_depth == 3)
    pool.forget_elsewhere()  # freed elsewhere: alice's turn was not spent, hers comes first
    await wait_until(lambda: second.done() or bobs.done())
    assert second.done() and not bobs.done()
    (await second).release()
    (await bobs).release()
    (await again).release()


async def test_a_redis_that_hangs_costs_a_request_half_a_second_at_most(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1, token_interval=0.001)
    [proxy] = await replicas(start_proxy, node, 1, redis, caps=[4])
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)
    try:
        async with aiohttp.ClientSession() as s:
            started = time.monotonic()
            await asyncio.gather(*(stream(s, proxy.url) for _ in range(3)))
            assert time.monotonic() - started < 1.0
        assert not proxy.runtime.forwarder.slots.shared  # served on local state meanwhile
    finally:
        redis.process.send_signal(signal.SIGCONT)
    slots = proxy.runtime.forwarder.slots
    await wait_until(lambda: slots.shared and slots.divided == 1, timeout=5, what="shared")
