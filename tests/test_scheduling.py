"""Expected-finish scheduling: on plain pools with injected statistics and a clock the test
holds, then through simulated nodes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from proxy import estimate
from proxy.bodies import json_object
from proxy.config import NodeConfig, QueueConfig, RoutingConfig
from proxy.pool import Lease, Node, Pool, Want
from proxy.routing import charge_wait, reason_of, want_for
from proxy.telemetry import PROGRESS_EVENTS, Progress, Usage
from tests.conftest import Proxy, StartNodes, StartProxy, generations, metric, wait_until

LLAMA, QWEN = "llama3.2:latest", "qwen2.5:0.5b"
SETTINGS = RoutingConfig(spill_after=10, default_load_seconds=5, affinity_margin=2, min_gain=0.2)


def make_pool(*names: str, **node: Any) -> Pool:
    configs = [
        NodeConfig(url=f"http://{n}:1", name=n, max_concurrency=1, weight=1.0, **node)
        for n in names
    ]
    pool = Pool(configs, QueueConfig(max_size=10, timeout=5))
    pool.clock = lambda: 100.0  # frozen: a lease's expected end stays where it was
    return pool


def learned(node: Node, speed: float, tokens: float = 100, load: float | None = None) -> None:
    """As if the node had answered for LLAMA: its speed, the answers' length, a cold load."""
    node.models = {LLAMA, QWEN}
    node.tokens_per_second[LLAMA] = speed
    node.eval_tokens[LLAMA] = tokens
    if load is not None:
        node.load_seconds[LLAMA] = load


def resident(node: Node, *models: str) -> None:
    node.resident = {m: 1e12 for m in models}


def want(pool: Pool, **kwargs: Any) -> Want:
    settings = kwargs.pop("settings", SETTINGS)
    return want_for(pool, LLAMA, settings.spill_after, settings=settings, **kwargs)


def take(pool: Pool, w: Want) -> Lease:
    lease = pool.try_acquire(w)
    assert lease is not None
    return lease


async def test_the_fast_node_wins_after_a_short_wait() -> None:
    pool = make_pool("fast", "slow")
    fast, slow = pool.nodes["fast"], pool.nodes["slow"]
    learned(fast, speed=100)  # 1 s a request
    learned(slow, speed=10)  # 10 s a request
    resident(fast, LLAMA)
    resident(slow, LLAMA)
    first = take(pool, want(pool))
    assert first.node is fast and first.expected == 1.0
    waiting = asyncio.create_task(pool.acquire(want(pool)))
    await asyncio.sleep(0)
    assert not waiting.done() and slow.in_flight == 0  # 1 s + 1 s beats a free 10 s
    first.release()
    second = await waiting
    assert second.node is fast
    second.release()


async def test_nodes_within_a_tenth_of_each_other_share_the_work() -> None:
    """Learned speeds carry noise: a node measured 5 % faster must not take every request
    its slots hold while an equal one idles; one twice as fast does."""
    configs = [NodeConfig(url=f"http://{n}:1", name=n, max_concurrency=4, weight=1.0) for n in "ab"]
    pool = Pool(configs, QueueConfig(max_size=10, timeout=5))
    pool.clock = lambda: 100.0
    a, b = pool.nodes["a"], pool.nodes["b"]
    for node, speed in ((a, 100.0), (b, 95.0)):
        learned(node, speed)
        resident(node, LLAMA)
    leases = [take(pool, want(pool)) for _ in range(4)]
    assert (a.in_flight, b.in_flight) == (2, 2)
    for lease in leases:
        lease.release()
    learned(b, 50.0)
    leases = [take(pool, want(pool)) for _ in range(4)]
    assert (a.in_flight, b.in_flight) == (4, 0)
    for lease in leases:
        lease.release()


async def test_a_queue_spreads_once_the_fast_node_is_spoken_for() -> None:
    pool = make_pool("fast", "slow")
    fast, slow = pool.nodes["fast"], pool.nodes["slow"]
    learned(fast, speed=100)  # 1 s
    learned(slow, speed=33)  # 3 s
    resident(fast, LLAMA)
    resident(slow, LLAMA)
    held = take(pool, want(pool))
    first = asyncio.create_task(pool.acquire(want(pool)))  # 2 s on fast beats 3 s
    await asyncio.sleep(0)
    second = asyncio.create_task(pool.acquire(want(pool)))  # behind it: 3 s, so slow
    lease = await asyncio.wait_for(second, 1)
    assert lease.node is slow and not first.done()
    held.release()
    assert (await first).node is fast
    for done in (lease, first.result()):
        done.release()


async def test_a_cold_idle_node_is_used_when_the_wait_would_be_long() -> None:
    pool = make_pool("warm", "cold")
    warm, cold = pool.nodes["warm"], pool.nodes["cold"]
    learned(warm, speed=10)  # 10 s a request
    learned(cold, speed=10, load=1)
    resident(warm, LLAMA)
    held = take(pool, want(pool))
    assert held.node is warm
    w = want(pool)
    spilled = take(pool, w)  # 1 s load + 10 s beats 10 s wait + 10 s: at once, not at 10 s
    assert spilled.node is cold and spilled.expected == 11.0
    assert reason_of(pool, w, cold) == "spill"
    spilled.release()
    held.release()


async def test_a_request_behind_a_load_waits_for_it_but_pays_it_once() -> None:
    pool = make_pool("cold")
    cold = pool.nodes["cold"]
    cold.config = NodeConfig(url=cold.url, name="cold", max_concurrency=2, weight=1.0)
    learned(cold, speed=10, load=4)
    loading = take(pool, want(pool))  # 4 s load + 10 s
    assert loading.expected == 14.0
    w = want(pool)
    assert w.finish is not None and w.finish(cold, 0) == 14.0  # a free slot, but the load first
    loading.release()


async def test_a_cold_node_is_not_used_when_loading_would_evict_a_busy_model() -> None:
    pool = make_pool("warm", "cold")
    warm, cold = pool.nodes["warm"], pool.nodes["cold"]
    learned(warm, speed=10)
    learned(cold, speed=10, load=1)
    resident(warm, LLAMA)
    resident(cold, QWEN)
    cold.config = NodeConfig(url=cold.url, name="cold", max_concurrency=2, weight=1.0)
    qwen = take(pool, want_for(pool, QWEN, 10, settings=SETTINGS))  # QWEN in use on cold
    assert qwen.node is cold and estimate.evicts_busy(cold, LLAMA, pool.clock())
    held = take(pool, want(pool))
    assert held.node is warm
    waiting = asyncio.create_task(pool.acquire(want(pool)))
    await asyncio.sleep(0)
    assert not waiting.done() and cold.model_in_flight.get(LLAMA, 0) == 0
    held.release()
    lease = await waiting
    assert lease.node is warm
    lease.release()
    # Told it holds two models at once, the node may load LLAMA beside the busy QWEN.
    cold.config = NodeConfig(
        url=cold.url, name="cold", max_concurrency=2, weight=1.0, max_loaded_models=2
    )
    held = take(pool, want(pool))
    assert take(pool, want(pool)).node is cold
    held.release()
    qwen.release()
    for lease in list(cold.leases):
        lease.release()


async def test_a_model_used_a_moment_ago_is_in_use_though_idle() -> None:
    pool = make_pool("warm", "cold")
    warm, cold = pool.nodes["warm"], pool.nodes["cold"]
    learned(warm, speed=10)
    learned(cold, speed=10, load=1)
    resident(warm, LLAMA)
    resident(cold, QWEN)
    take(pool, want_for(pool, QWEN, 10, settings=SETTINGS)).release()  # served, now idle
    held = take(pool, want(pool))
    assert held.node is warm
    assert pool.try_acquire(want(pool)) is None  # loading LLAMA would push QWEN out
    pool.clock = lambda: 100.0 + estimate.IN_USE_SECONDS
    spilled = take(pool, want(pool))  # a minute idle: no longer in use
    assert spilled.node is cold
    spilled.release()
    held.release()


async def test_the_only_node_loads_a_model_beside_one_in_use() -> None:
    pool = make_pool("only")
    only = pool.nodes["only"]
    learned(only, speed=10, load=1)
    resident(only, QWEN)
    take(pool, want_for(pool, QWEN, 10, settings=SETTINGS)).release()  # served, now idle
    assert estimate.evicts_busy(only, LLAMA, pool.clock())
    # No node could take it without pushing a busy model out: holding it back saves no load.
    lease = await asyncio.wait_for(pool.acquire(want(pool)), 1)
    assert lease.node is only
    lease.release()


async def test_a_model_busy_everywhere_is_loaded_beside_one_in_use() -> None:
    pool = make_pool("a", "b")
    a, b = pool.nodes["a"], pool.nodes["b"]
    for node in (a, b):
        learned(node, speed=10, load=1)
        resident(node, QWEN)
        node.config = NodeConfig(url=node.url, name=node.name, max_concurrency=2, weight=1.0)
    busy = [take(pool, want_for(pool, QWEN, 10, settings=SETTINGS)) for _ in range(2)]
    assert {lease.node for lease in busy} == {a, b}
    lease = await asyncio.wait_for(pool.acquire(want(pool)), 1)
    assert lease.node in (a, b)
    for held in (lease, *busy):
        held.release()


async def test_the_conversations_node_wins_within_the_margin() -> None:
    pool = make_pool("a", "b")
    learned(pool.nodes["a"], speed=100)  # 1 s
    learned(pool.nodes["b"], speed=50)  # 2 s: 1 s behind, within 2 s
    resident(pool.nodes["a"], LLAMA)
    resident(pool.nodes["b"], LLAMA)
    w = want(pool, preferred="b")
    lease = take(pool, w)
    assert lease.node.name == "b" and reason_of(pool, w, lease.node) == "affinity"
    lease.release()
    assert take(pool, want(pool)).node.name == "a"  # without affinity: the faster


async def test_affinity_yields_to_load_past_its_margin() -> None:
    pool = make_pool("a", "b")
    learned(pool.nodes["a"], speed=100)  # 1 s
    learned(pool.nodes["b"], speed=100)
    resident(pool.nodes["a"], LLAMA)
    resident(pool.nodes["b"], LLAMA)
    busy = take(pool, want(pool, tokens=500))  # 5 s on one of them
    other = "a" if busy.node.name == "b" else "b"
    lease = take(pool, want(pool, preferred=busy.node.name))  # 5 + 1 s vs 1 s: 4 s behind
    assert lease.node.name == other
    lease.release()
    busy.release()


async def test_a_node_with_no_statistics_gets_tried() -> None:
    pool = make_pool("known", "new")
    known, new = pool.nodes["known"], pool.nodes["new"]
    learned(known, speed=100)
    new.models = {LLAMA}
    resident(known, LLAMA)
    resident(new, LLAMA)
    assert estimate.tokens_per_second(new, [known, new], LLAMA) == 100  # the others' mean
    held = take(pool, want(pool))
    assert held.node is known  # equal, and it was the less loaded or the turn's
    tried = take(pool, want(pool))
    assert tried.node is new
    tried.release()
    held.release()


async def test_spill_after_still_bounds_the_wait() -> None:
    pool = make_pool("fast", "slow")
    fast, slow = pool.nodes["fast"], pool.nodes["slow"]
    learned(fast, speed=100)
    learned(slow, speed=1)  # 100 s: waiting for fast is always better
    resident(fast, LLAMA)
    resident(slow, LLAMA)
    settings = RoutingConfig(spill_after=0.05)
    held = take(pool, want(pool, settings=settings))
    waiting = asyncio.create_task(pool.acquire(want(pool, settings=settings)))
    lease = await asyncio.wait_for(waiting, 2)  # fast never frees: spill_after ends the wait
    assert lease.node is slow
    lease.release()
    held.release()


def resident_pool(*names: str, slots: int = 1) -> Pool:
    """Nodes holding LLAMA, with ``slots`` each, nothing learned yet."""
    pool = make_pool(*names)
    for node in pool.nodes.values():
        node.config = NodeConfig(url=node.url, name=node.name, max_concurrency=slots, weight=1.0)
        node.models = {LLAMA}
        resident(node, LLAMA)
    return pool


async def test_an_unmeasured_node_gets_one_probe_until_it_shows_its_speed() -> None:
    pool = resident_pool("known", "new", slots=2)
    known, new = pool.nodes["known"], pool.nodes["new"]
    learned(known, speed=100)  # 1 s a request; new gets the fleet's speed as its prior
    first = [take(pool, want(pool)) for _ in range(2)]
    assert sorted(lease.node.name for lease in first) == ["known", "new"]  # its share: a probe
    assert estimate.probing(new, LLAMA, pool.clock())
    first.append(take(pool, want(pool)))
    assert first[-1].node is known  # not new's free slot while its probe runs
    waiting = asyncio.create_task(pool.acquire(want(pool)))
    await asyncio.sleep(0)
    assert not waiting.done() and new.in_flight == 1  # nor now: it waits for the probe
    assert new.record_progress(LLAMA, 100.0)  # the probe's stream shows its speed
    pool.changed()
    assert (await asyncio.wait_for(waiting, 1)).node is new
    for lease in [*first, waiting.result()]:
        lease.release()


async def test_a_probe_holds_its_node_back_for_a_bounded_time() -> None:
    pool = resident_pool("known", "new", slots=2)
    known, new = pool.nodes["known"], pool.nodes["new"]
    learned(known, speed=100)
    held = [take(pool, want(pool)) for _ in range(3)]
    assert estimate.probing(new, LLAMA, pool.clock()) and known.in_flight == 2
    assert pool.try_acquire(want(pool)) is None
    pool.clock = lambda: 100.0 + estimate.PROBE_SECONDS  # a probe that shows nothing (no stream)
    assert not estimate.probing(new, LLAMA, pool.clock())
    assert take(pool, want(pool)).node is new  # the node is not starved for it
    for lease in [*held, *new.leases]:
        lease.release()


async def test_a_blind_fleet_probes_each_node_once_then_waits_for_the_first_speed() -> None:
    pool = resident_pool("a", "b", "c", slots=4)
    probes = [take(pool, want(pool)) for _ in range(3)]
    assert {lease.node.name for lease in probes} == {"a", "b", "c"}
    waiting = [asyncio.create_task(pool.acquire(want(pool))) for _ in range(6)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)  # no node is measured: none is flooded
    pool.nodes["a"].record_progress(LLAMA, 500.0)  # a is fast; b and c take its speed as prior
    pool.changed()
    await asyncio.wait(waiting, timeout=1, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(0)
    assert {task.result().node.name for task in waiting if task.done()} == {"a"}
    assert len([task for task in waiting if task.done()]) == 3  # a's free slots
    for task in waiting:
        task.cancel()
    for lease in probes + [t.result() for t in waiting if t.done() and not t.cancelled()]:
        lease.release()


async def test_a_once_slow_node_is_tried_again_after_going_unused() -> None:
    pool = resident_pool("fast", "slow")
    fast, slow = pool.nodes["fast"], pool.nodes["slow"]
    learned(fast, speed=100)  # 1 s
    learned(slow, speed=10)  # 10 s, when it was last measured
    fast.last_used[LLAMA] = slow.last_used[LLAMA] = 100.0
    held = take(pool, want(pool))
    assert held.node is fast
    assert pool.try_acquire(want(pool)) is None  # 1 s wait + 1 s beats 10 s
    later = 100.0 + 10 * estimate.SPEED_HALF_LIFE  # slow unused all along: its figure decays
    pool.clock = lambda: later
    fast.last_used[LLAMA] = later  # fast is in use
    assert estimate.tokens_per_second(slow, [fast, slow], LLAMA, later) > 90
    tried = take(pool, want(pool))
    assert tried.node is slow
    slow.record_usage(LLAMA, Usage(1, 100, 10.0, None))  # still slow: its figure says so again
    assert estimate.tokens_per_second(slow, [fast, slow], LLAMA, later) == pytest.approx(10)
    tried.release()
    held.release()


async def test_an_idle_node_loads_once_the_queue_has_waited_its_load() -> None:
    pool = make_pool("warm", "cold")
    warm, cold = pool.nodes["warm"], pool.nodes["cold"]
    learned(warm, speed=10)  # 10 s a request
    learned(cold, speed=10, load=30)  # 30 s + 10 s: never sooner than waiting for warm
    resident(warm, LLAMA)
    held = take(pool, want(pool))
    assert pool.try_acquire(want(pool)) is None
    served = want(pool)
    for _ in range(1000):
        charge_wait(pool, served, warm, 0.0001)  # requests that found a slot: no queue
    assert cold.rent == {}
    charge_wait(pool, served, warm, 12.0)  # requests waited 12 s while cold could have loaded
    assert pool.try_acquire(want(pool)) is None  # 18 s of load left + 10 s: still later
    charge_wait(pool, served, warm, 10.0)  # 22 s: 8 s + 10 s beats 10 s + 10 s
    spilled = take(pool, want(pool))
    assert spilled.node is cold
    charge_wait(pool, served, cold, 0.0)  # the load is under way: its rent is paid
    assert cold.rent == {}
    spilled.release()
    held.release()


async def test_no_rent_is_charged_where_loading_would_evict_a_busy_model() -> None:
    pool = make_pool("warm", "cold")
    warm, cold = pool.nodes["warm"], pool.nodes["cold"]
    learned(warm, speed=10)
    learned(cold, speed=10, load=1)
    resident(warm, LLAMA)
    resident(cold, QWEN)
    take(pool, want_for(pool, QWEN, 10, settings=SETTINGS)).release()  # QWEN in use there
    held = take(pool, want(pool))
    charge_wait(pool, want(pool), warm, 100.0)
    assert cold.rent == {} and pool.try_acquire(want(pool)) is None
    held.release()


def test_a_stream_shows_its_speed_after_a_few_events() -> None:
    progress = Progress("application/x-ndjson")
    assert not progress.feed(b'{"response":"a"}\n', 10.0)  # the first read: prompt evaluation
    for i in range(1, PROGRESS_EVENTS):
        assert not progress.feed(b'{"response":"b"}\n', 10.0 + i * 0.01)
    assert progress.feed(b'{"response":"c"}\n{"response":"d"}\n', 10.0 + PROGRESS_EVENTS * 0.01)
    assert progress.rate == pytest.approx((PROGRESS_EVENTS + 1) / (PROGRESS_EVENTS * 0.01))
    events = Progress("text/event-stream")
    events.feed(b"data: {}\n\n", 0.0)
    assert not events.feed(b"data: {}\n\n", 0.1)
    assert events.feed(b"data: {}\n\n", 1.0) and events.rate == 2.0  # slow: by time


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "text/event-stream"])
def test_a_streams_events_are_counted_wherever_its_reads_split(content_type: str) -> None:
    event = b"data: {}\n\n" if content_type == "text/event-stream" else b'{"response":"a"}\n'
    stream = event * 3
    for cut in range(1, len(stream)):
        for second in range(cut + 1, len(stream)):
            progress = Progress(content_type)
            progress.feed(b"first read", 0.0)
            for piece in (stream[:cut], stream[cut:second], stream[second:]):
                progress.feed(piece, 1.0)
            assert progress.events == 3, (cut, second)


def test_a_node_learns_its_overhead_and_only_cold_loads() -> None:
    node = make_pool("n").nodes["n"]
    usage = Usage(prompt_tokens=5, completion_tokens=50, eval_seconds=0.5, load_seconds=0.002)
    node.record_usage(LLAMA, usage, held=0.7)  # warm: its 2 ms load_duration is no load
    assert node.load_seconds == {} and round(node.overhead_seconds[LLAMA], 6) == 0.2
    cold = Usage(prompt_tokens=5, completion_tokens=50, eval_seconds=0.5, load_seconds=1.0)
    node.record_usage(LLAMA, cold, cold=True, held=1.7)
    assert node.load_seconds == {LLAMA: 1.0} and node.eval_tokens == {LLAMA: 50}
    assert node.tokens_per_second == {LLAMA: 100}


def test_expected_tokens_come_from_the_request_first() -> None:
    assert estimate.requested_tokens({"options": {"num_predict": 64}}) == 64
    body = b'{"model": "m", "options": {"num_predict": 8, "num_predict": 64}}'
    assert estimate.requested_tokens(json_object(body, strict=True)) == 64  # as Go reads it
    assert estimate.requested_tokens(json_object(b'{"max_tokens": 9}', strict=True)) == 9
    assert estimate.requested_tokens({"max_tokens": 32}) == 32
    assert estimate.requested_tokens({"max_completion_tokens": 16}) == 16
    assert estimate.requested_tokens({"options": {"num_predict": -1}}) is None
    assert estimate.requested_tokens({"max_tokens": True}) is None


# -- through simulated nodes ----------------------------------------------------------------


async def generate(proxy: Proxy, tokens: int) -> int:
    body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": tokens}}
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/generate", json=body) as resp:
            await resp.read()
            return resp.status


async def test_sim_a_slow_nodes_free_slot_is_not_taken(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ollama_proxy.routing")
    (fast,) = await start_nodes(1, token_interval=0.002)
    (slow,) = await start_nodes(1, token_interval=0.05)
    proxy = await start_proxy([fast, slow], caps=[1, 1])
    nodes = proxy.pool.nodes
    await wait_until(lambda: all(n.is_resident(LLAMA) for n in nodes.values()))
    nodes[fast.name].tokens_per_second[LLAMA] = 500.0  # as learned from earlier answers
    nodes[slow.name].tokens_per_second[LLAMA] = 20.0
    statuses = await asyncio.gather(*(generate(proxy, 20) for _ in range(3)))
    assert statuses == [200, 200, 200]
    assert len(generations(fast)) == 3 and generations(slow) == []  # 3 of 0.04 s before 1 of 1 s
    text = await proxy.metrics_text()
    assert metric(text, "ollama_proxy_routing_decisions_total", reason="fastest") == 3
    line = next(r.message for r in caplog.records if r.name == "ollama_proxy.routing")
    assert f"reason=fastest candidates={fast.name},{slow.name} finish_s={fast.name}:" in line


async def test_sim_an_idle_node_loads_the_model_rather_than_wait(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (warm,) = await start_nodes(1, token_interval=0.05)
    (cold,) = await start_nodes(1, resident=[], load_delay=0.05)
    proxy = await start_proxy([warm, cold], caps=[1, 1], routing={"default_load_seconds": 0.1})
    nodes = proxy.pool.nodes
    await wait_until(lambda: nodes[warm.name].is_resident(LLAMA))
    await wait_until(lambda: nodes[cold.name].models is not None)
    statuses = await asyncio.gather(generate(proxy, 20), generate(proxy, 20))  # 1 s each
    assert statuses == [200, 200]
    assert cold.stats.cold_loads == 1  # at once, not after spill_after's 10 s
    text = await proxy.metrics_text()
    assert metric(text, "ollama_proxy_routing_decisions_total", reason="spill") == 1
    assert metric(text, "ollama_proxy_node_expected_wait_seconds", node=cold.name) == 0
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/-/nodes") as resp:
            shown = {n["name"]: n for n in (await resp.json())["nodes"]}
    learned_there = shown[cold.name]  # from its cold answer: speed, load, length
    assert learned_there["load_seconds"][LLAMA] > 0 and learned_there["eval_count"][LLAMA] == 20
    assert learned_there["tokens_per_second"][LLAMA] > 0
    assert shown[warm.name]["load_seconds"] == {}  # a warm answer's load_duration is no load


async def test_sim_a_nodes_speed_is_learned_from_its_stream_before_it_ends(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, token_interval=0.02)
    proxy = await start_proxy([node])
    learned_node = proxy.pool.nodes[node.name]
    await wait_until(lambda: learned_node.is_resident(LLAMA))
    body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 100}}  # 2 s
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/generate", json=body) as resp:
            await wait_until(lambda: LLAMA in learned_node.tokens_per_second)
            (lease,) = learned_node.leases  # still streaming: no final chunk yet
            assert LLAMA not in learned_node.answered
            assert 25 < learned_node.tokens_per_second[LLAMA] < 60  # 50 a second, roughly
            assert 1.5 < lease.expected < 3  # its slot's end revised from that speed
            await resp.read()
    assert LLAMA in learned_node.answered
