"""The pool on plain objects: choose-and-count, caps, rotation, and the FIFO wait queue."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from proxy.config import NodeConfig, QueueConfig
from proxy.errors import Unavailable
from proxy.pool import Pool


def make_pool(*caps: int, max_size: int = 10, timeout: float = 5.0) -> Pool:
    nodes = [
        NodeConfig(url=f"http://n{i}:1", name=f"n{i}", max_concurrency=cap, weight=1.0)
        for i, cap in enumerate(caps)
    ]
    return Pool(nodes, QueueConfig(max_size=max_size, timeout=timeout))


def test_least_loaded_by_fraction_of_cap() -> None:
    pool = make_pool(2, 4)
    picks = [pool.try_acquire() for _ in range(6)]
    assert all(p is not None for p in picks)
    assert (pool.nodes["n0"].in_flight, pool.nodes["n1"].in_flight) == (2, 4)
    assert pool.try_acquire() is None  # both at cap


def test_equal_loads_rotate() -> None:
    pool = make_pool(10, 10, 10)
    names = Counter()
    for _ in range(30):
        lease = pool.try_acquire()
        assert lease is not None
        names[lease.node.name] += 1
        lease.release()
    assert set(names.values()) == {10}


def test_release_is_exactly_once() -> None:
    pool = make_pool(1)
    lease = pool.try_acquire()
    assert lease is not None
    lease.release()
    lease.release()
    assert pool.nodes["n0"].in_flight == 0


def test_down_and_draining_nodes_take_nothing() -> None:
    pool = make_pool(1, 1)
    pool.nodes["n0"].up = False
    pool.nodes["n1"].draining = True
    assert pool.try_acquire() is None
    assert pool.candidates() == []


async def test_queue_is_first_come_first_served() -> None:
    pool = make_pool(1)
    first = await pool.acquire()
    waiters = [asyncio.create_task(pool.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert pool.queue_depth == 3
    order = []
    lease = first
    for _ in waiters:
        lease.release()
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED, timeout=1)
        finished = [w for w in done if w not in order]
        assert len(finished) == 1
        order.append(finished[0])
        lease = finished[0].result()
    assert order == waiters
    lease.release()
    assert pool.nodes["n0"].in_flight == 0 and pool.queue_depth == 0


async def test_queue_full_is_503() -> None:
    pool = make_pool(1, max_size=1)
    held = await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    with pytest.raises(Unavailable) as caught:
        await pool.acquire()
    assert caught.value.reason == "full" and caught.value.retry_after is not None
    held.release()
    (await waiting).release()


async def test_queue_timeout_is_503() -> None:
    pool = make_pool(1, timeout=0.05)
    held = await pool.acquire()
    with pytest.raises(Unavailable) as caught:
        await pool.acquire()
    assert caught.value.reason == "timeout"
    assert pool.queue_depth == 0
    held.release()


async def test_cancelled_waiter_leaves_queue_at_once() -> None:
    pool = make_pool(1)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    assert pool.queue_depth == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.queue_depth == 0
    held.release()
    assert pool.nodes["n0"].in_flight == 0


async def test_slot_granted_as_waiter_leaves_goes_to_next() -> None:
    pool = make_pool(1)
    held = await pool.acquire()
    leaving = asyncio.create_task(pool.acquire())
    staying = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    held.release()  # grants the slot to `leaving`...
    leaving.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await leaving
    lease = await asyncio.wait_for(staying, 1)
    assert lease.node.in_flight == 1
    lease.release()
    assert pool.nodes["n0"].in_flight == 0


async def test_waiters_fail_when_every_node_goes_down() -> None:
    pool = make_pool(1)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    pool.nodes["n0"].up = False
    pool.changed()
    with pytest.raises(Unavailable) as caught:
        await waiter
    assert caught.value.reason == "no_node"
    held.release()


async def test_no_healthy_node_fails_fast() -> None:
    pool = make_pool(1)
    pool.nodes["n0"].up = False
    with pytest.raises(Unavailable):
        await pool.acquire()
