"""Fair share on plain objects: weighted order between tenants, first come first served within
one, per-tenant caps, waiters that leave, and the fairness run on a virtual clock."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import statistics

import pytest

from proxy.config import NodeConfig, QueueConfig
from proxy.errors import RateLimited
from proxy.fairshare import OPEN, Tenant
from proxy.pool import Lease, Pool, Want

A, B, C = Tenant("a"), Tenant("b"), Tenant("c")


def make_pool(*caps: int, max_size: int = 1000) -> Pool:
    nodes = [
        NodeConfig(url=f"http://n{i}:1", name=f"n{i}", max_concurrency=cap, weight=1.0)
        for i, cap in enumerate(caps)
    ]
    return Pool(nodes, QueueConfig(max_size=max_size, timeout=30))


async def settle() -> None:
    """Let every task that can run do so (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Clients:
    """Waiting requests as tasks; ``served`` lists their labels in the order they got a slot."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.served: list[str] = []
        self.leases: list[Lease] = []
        self.tasks: dict[str, asyncio.Task[Lease]] = {}

    async def send(self, label: str, tenant: Tenant, want: Want | None = None) -> None:
        async def wait() -> Lease:
            lease = await self.pool.acquire(want or Want(), tenant=tenant)
            self.served.append(label)
            self.leases.append(lease)
            return lease

        self.tasks[label] = asyncio.create_task(wait())
        await settle()

    async def release_oldest(self, count: int = 1) -> None:
        for _ in range(count):
            self.leases.pop(0).release()
            await settle()

    async def finish(self) -> None:
        while self.leases:
            await self.release_oldest()
        assert self.pool.queue_depth == 0 and self.pool.tenants() == {}


async def fill(pool: Pool, clients: Clients, slots: int) -> None:
    for i in range(slots):
        await clients.send(f"held{i}", OPEN)
    clients.served.clear()


async def test_equal_weights_alternate_whoever_queued_first() -> None:
    pool = make_pool(1)
    clients = Clients(pool)
    await fill(pool, clients, 1)
    for i in range(20):
        await clients.send(f"a{i}", A)
    for i in range(5):
        await clients.send(f"b{i}", B)
    await clients.release_oldest(10)
    assert clients.served == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]
    await clients.finish()
    assert clients.served[10:] == [f"a{i}" for i in range(5, 20)]


@pytest.mark.parametrize("weights", [(1, 1), (1, 3), (2, 5)])
async def test_service_under_contention_is_in_the_weights_ratio(weights: tuple[int, int]) -> None:
    a, b = Tenant("a", weight=weights[0]), Tenant("b", weight=weights[1])
    pool = make_pool(2)
    clients = Clients(pool)
    await fill(pool, clients, 2)
    for i in range(60):
        await clients.send(f"a{i}", a)
        await clients.send(f"b{i}", b)
    rounds = 4
    await clients.release_oldest(rounds * sum(weights))
    firsts = [label[0] for label in clients.served]
    assert (firsts.count("a"), firsts.count("b")) == (rounds * weights[0], rounds * weights[1])
    for start in range(0, len(firsts), sum(weights)):  # smooth: every round in the ratio
        window = firsts[start : start + sum(weights)]
        assert window.count("a") == weights[0]
    await clients.finish()


async def test_one_request_waits_for_one_not_for_the_whole_backlog() -> None:
    pool = make_pool(2)
    clients = Clients(pool)
    await fill(pool, clients, 2)
    for i in range(500):
        await clients.send(f"a{i}", A)
    await clients.send("b", B)
    await clients.release_oldest(2)
    assert clients.served == ["a0", "b"]
    await clients.finish()


async def test_a_tenant_that_comes_back_is_not_owed_its_idle_time() -> None:
    pool = make_pool(1)
    clients = Clients(pool)
    await fill(pool, clients, 1)
    for i in range(10):
        await clients.send(f"a{i}", A)
    await clients.send("b0", B)
    await clients.release_oldest(6)  # b0 served early; A alone for a while after
    await clients.send("b1", B)
    await clients.send("b2", B)
    await clients.release_oldest(4)
    # b1 and b2 go in turn with A, not both at once as if B were owed the rounds it skipped.
    assert clients.served[6:] == ["b1", "a5", "b2", "a6"]
    await clients.finish()


async def test_cancelled_waiters_skew_nothing() -> None:
    pool = make_pool(1)
    clients = Clients(pool)
    await fill(pool, clients, 1)
    for i in range(6):
        await clients.send(f"a{i}", A)
        await clients.send(f"b{i}", B)
    for i in range(3):  # A's first three leave before their turn
        clients.tasks[f"a{i}"].cancel()
    await settle()
    assert pool.queue_depth == 9 and pool.tenants() == {"": (1, 0), "a": (0, 3), "b": (0, 6)}
    await clients.release_oldest(6)
    # A's head now came after B's, and A was charged nothing for those that left.
    assert clients.served == ["b0", "a3", "b1", "a4", "b2", "a5"]
    await clients.finish()


async def test_a_slot_granted_as_its_waiter_leaves_is_not_charged() -> None:
    pool = make_pool(1)
    clients = Clients(pool)
    await fill(pool, clients, 1)
    await clients.send("a0", A)
    await clients.send("a1", A)
    await clients.send("b0", B)
    clients.leases.pop(0).release()  # grants a0 ...
    clients.tasks["a0"].cancel()  # ... which leaves before it runs again: the slot goes on
    await settle()
    assert clients.served == ["a1"]  # A's turn was not used up by a0 (charged, b0 was next)
    await clients.finish()
    assert clients.served == ["a1", "b0"]


async def test_timed_out_waiter_leaves_its_tenant_as_it_was() -> None:
    pool = Pool(
        [NodeConfig(url="http://n0:1", name="n0", max_concurrency=1, weight=1.0)],
        QueueConfig(max_size=10, timeout=0.01),
    )
    held = await pool.acquire()
    results = await asyncio.gather(pool.acquire(tenant=A), return_exceptions=True)
    assert pool.tenants() == {"": (1, 0)} and pool.queue_depth == 0
    assert not isinstance(results[0], Lease)
    held.release()
    assert pool.tenants() == {}


async def test_a_tenant_at_its_cap_waits_and_does_not_block_others() -> None:
    capped = Tenant("a", max_concurrency=1)
    pool = make_pool(3)
    clients = Clients(pool)
    await fill(pool, clients, 2)
    await clients.send("a0", capped)
    clients.served.clear()
    for i in range(1, 4):
        await clients.send(f"a{i}", capped)
    await clients.send("b0", B)
    await clients.send("b1", B)
    assert pool.tenants()["a"] == (1, 3)
    await clients.release_oldest()  # one of OPEN's slots: A is at its cap, B takes it
    await clients.release_oldest()
    assert clients.served == ["b0", "b1"]
    assert pool.nodes["n0"].in_flight == 3
    clients.tasks["a0"].result().release()  # A's own lease: now its next may go
    clients.leases.remove(clients.tasks["a0"].result())
    await settle()
    assert clients.served == ["b0", "b1", "a1"]
    await clients.finish()


async def test_a_tenant_at_its_cap_queues_even_with_a_slot_free() -> None:
    capped = Tenant("a", max_concurrency=1)
    pool = make_pool(2)
    first = await pool.acquire(tenant=capped)
    second = asyncio.create_task(pool.acquire(tenant=capped))
    await settle()
    assert not second.done() and pool.nodes["n0"].in_flight == 1
    first.release()
    (await second).release()
    assert pool.tenants() == {}


async def test_past_max_queued_is_429_for_that_tenant_only() -> None:
    limited = Tenant("a", max_queued=2)
    pool = make_pool(1)
    clients = Clients(pool)
    await fill(pool, clients, 1)
    await clients.send("a0", limited)
    await clients.send("a1", limited)
    with pytest.raises(RateLimited) as caught:
        await pool.acquire(tenant=limited)
    assert caught.value.status == 429 and caught.value.reason == "concurrency"
    assert caught.value.retry_after == 1
    await clients.send("b0", B)
    assert pool.queue_depth == 3
    await clients.finish()


async def test_new_limits_of_a_key_apply_to_its_new_requests() -> None:
    pool = make_pool(4)
    held = [await pool.acquire(tenant=Tenant("a", max_concurrency=1))]
    waiting = asyncio.create_task(pool.acquire(tenant=Tenant("a", max_concurrency=1)))
    await settle()
    assert not waiting.done()
    held.append(await pool.acquire(tenant=Tenant("a", max_concurrency=3)))  # reloaded
    await settle()
    assert waiting.done()  # the raised cap lets the one waiting go too
    for lease in [*held, waiting.result()]:
        lease.release()
    assert pool.tenants() == {}


async def test_a_waiter_that_cannot_use_the_freed_node_keeps_its_place() -> None:
    pool = make_pool(1, 1)
    clients = Clients(pool)
    await fill(pool, clients, 2)
    only_n0 = Want(eligible=lambda n: n.name == "n0")
    await clients.send("a0", A, only_n0)  # first in turn, but only n0 will do
    await clients.send("b0", B)
    n1_lease = next(lease for lease in clients.leases if lease.node.name == "n1")
    n1_lease.release()
    clients.leases.remove(n1_lease)
    await settle()
    assert clients.served == ["b0"]  # n1 went to the one who could use it
    await clients.release_oldest()  # n0's lease
    assert clients.served == ["b0", "a0"]
    await clients.finish()


async def test_every_waiter_fails_when_every_node_goes_down() -> None:
    pool = make_pool(1)
    held = await pool.acquire()
    waiters = [asyncio.create_task(pool.acquire(tenant=t)) for t in (A, B, A, OPEN)]
    await settle()
    pool.nodes["n0"].up = False
    pool.changed()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [getattr(r, "reason", None) for r in results] == ["no_node"] * 4
    held.release()
    assert pool.queue_depth == 0 and pool.tenants() == {}


@pytest.mark.parametrize("seed", range(40))
async def test_random_interleavings_keep_the_books(seed: int) -> None:
    """Arrivals, cancellations and releases in a random order: no tenant past its cap, the
    pool's counts match the leases held, and nothing is left once everything ends."""
    rng = random.Random(seed)
    tenants = [
        Tenant(n, weight=rng.choice([1, 2, 3]), max_concurrency=rng.choice([None, 1, 2]))
        for n in "abcd"
    ]
    pool = make_pool(2, 3)
    tasks: list[asyncio.Task[Lease]] = []
    held: list[Lease] = []
    for _ in range(120):
        action = rng.random()
        if action < 0.5:
            tasks.append(asyncio.create_task(pool.acquire(tenant=rng.choice(tenants))))
        elif action < 0.6 and tasks:
            rng.choice(tasks).cancel()
        elif held:
            held.pop(rng.randrange(len(held))).release()
        await settle()
        held += [t.result() for t in tasks if t.done() and not t.cancelled()]
        tasks = [t for t in tasks if not t.done()]
        check_books(pool, held, tenants)
    for lease in held:
        lease.release()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert pool.queue_depth == 0 and pool.tenants() == {}
    assert all(n.in_flight == 0 for n in pool.nodes.values())


def check_books(pool: Pool, held: list[Lease], tenants: list[Tenant]) -> None:
    live = [lease for lease in held if not lease.released]
    assert sum(n.in_flight for n in pool.nodes.values()) == len(live)
    for tenant in tenants:
        holding = sum(1 for lease in live if lease.tenant == tenant)
        assert pool.tenants().get(tenant.name, (0, 0))[0] == holding
        if tenant.max_concurrency is not None:
            assert holding <= tenant.max_concurrency


# -- the fairness run, on a virtual clock -------------------------------------------------------

SERVICE = 1.0  # every request holds its slot this long (virtual seconds)


async def fairness_run(fair: bool) -> tuple[list[float], int]:
    """One node with 2 slots. A queues 100 requests; then B sends 10, one each service time.
    Returns B's waits and how many of A's requests were served. Without ``fair``, B's requests
    are A's tenant too: one queue, first come first served, as before fair share."""
    pool = make_pool(2)
    a, b = Tenant("a"), Tenant("b") if fair else Tenant("a")
    now = 0.0
    events: list[tuple[float, int, Lease | None]] = []  # (when, order, lease to release or None)
    order = itertools.count()
    served = {"a": 0, "b": 0}

    async def request(tenant: Tenant, who: str) -> float:
        lease = await pool.acquire(tenant=tenant)
        served[who] += 1
        heapq.heappush(events, (now + SERVICE, next(order), lease))
        return now

    a_requests = [asyncio.create_task(request(a, "a")) for _ in range(100)]
    await settle()
    for i in range(10):  # B's sends, as events: None
        heapq.heappush(events, (i * SERVICE, next(order), None))
    b_requests: list[tuple[float, asyncio.Task[float]]] = []
    while events:
        now, _, lease = heapq.heappop(events)
        if lease is None:
            b_requests.append((now, asyncio.create_task(request(b, "b"))))
        else:
            lease.release()
        await settle()
    assert all(task.done() for task in a_requests)
    return [task.result() - sent for sent, task in b_requests], served["a"]


async def test_fairness_run_another_tenant_waits_about_one_service_time() -> None:
    waits, a_served = await fairness_run(fair=True)
    assert a_served == 100
    assert statistics.median(waits) <= 2 * SERVICE and max(waits) <= 2 * SERVICE


async def test_fairness_run_in_one_queue_waits_for_the_backlog() -> None:
    waits, a_served = await fairness_run(fair=False)
    assert a_served == 100
    assert statistics.median(waits) >= 40 * SERVICE
