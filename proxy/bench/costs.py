"""Issue 16's scheduling scenarios, where what a request costs depends on the node: unequal
nodes, idle capacity that must load the model first, and conversations whose history a slot's
KV cache may hold. Each runs the proxy, nginx least_conn and nginx round robin in turn on the
same simulated nodes, reset between them (models unloaded, which empties the slots' caches,
and loaded again where they were at the start), each front started fresh for its run."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .processes import Processes
from .scale import CHAT_MODEL, Scale
from .specs import ChatLoad, ChatOutcome, StreamLoad, StreamOutcome
from .stacks import (
    POLICY_LABELS,
    Front,
    Policy,
    SimNodeSpec,
    reset_model,
    run_load,
    sim_stats,
    start_front,
    start_sims,
)

COST_SCENARIOS = (
    "unequal",
    "unequal-light",
    "unequal-heavy",
    "unequal-open",
    "idle",
    "chats",
    "chats-paused",
)
# Left out of a run unless asked for by name: its three fronts take half a minute more.
ON_REQUEST = ("unequal-open",)
Log = Callable[[str], None]


@dataclass
class CostRow:
    """One front's run of one scenario, with what the nodes counted meanwhile."""

    requests: int
    errors: int
    ttfb: list[float]  # seconds to the first byte (streams) or line (chats), successful only
    latency: list[float]  # seconds to the end, successful only
    cold_loads: list[int]  # per node
    cached_chars: int = 0  # prompt characters found in a slot's KV cache, over every node
    computed_chars: int = 0  # prompt characters prefilled
    follow_ups: int = 0  # chat turns after a chat's first, as the nodes recorded them
    changed_node: int = 0  # of those, turns served by another node than the turn before


@dataclass(frozen=True)
class Fleet:
    nodes: list[SimNodeSpec]
    clients: int  # concurrent clients (or chats): room for nginx's connections
    load: Callable[[Front], StreamLoad | ChatLoad] = field(compare=False)


def unequal_fleet(scale: Scale, clients: int | None = None) -> Fleet:
    """Three speeds, the model in memory on each: who takes a request a slow node would
    finish later than a fast one after waiting for its slot? ``clients``: the closed loop's
    size, ``scale.unequal_clients`` by default."""
    nodes = [
        SimNodeSpec(interval, scale.unequal_parallel, (CHAT_MODEL,))
        for interval in scale.unequal_intervals
    ]
    size = clients or scale.unequal_clients

    def load(front: Front) -> StreamLoad:
        return _streams(front, size, scale.unequal_requests, scale.unequal_tokens)

    return Fleet(nodes, size, load)


def unequal_open_fleet(scale: Scale) -> Fleet:
    """The same nodes and streams, sent at a fixed rate whatever the front's latency (an open
    loop): there latency is not tied to throughput as in a closed loop, by Little's law."""
    fleet = unequal_fleet(scale, scale.unequal_open_in_flight)

    def load(front: Front) -> StreamLoad:
        return replace(
            _streams(front, fleet.clients, scale.unequal_requests, scale.unequal_tokens),
            rate=scale.unequal_open_rate,
            time_limit=scale.load_timeout / 2,  # within run_load's limit: the late ones fail
        )

    return Fleet(fleet.nodes, fleet.clients, load)


def unequal_clients(name: str, scale: Scale) -> int:
    """The closed loop's size of each unequal-nodes scenario."""
    sizes = {
        "unequal-light": scale.unequal_light_clients,
        "unequal-heavy": scale.unequal_heavy_clients,
    }
    return sizes.get(name, scale.unequal_clients)


def idle_fleet(scale: Scale) -> Fleet:
    """The first node holds the model, the others have it on disk and load it quickly."""
    nodes = [
        SimNodeSpec(
            scale.idle_interval,
            scale.idle_parallel,
            (CHAT_MODEL,) if index == 0 else (),
            load_delay=scale.idle_load_delay,
        )
        for index in range(scale.idle_nodes)
    ]

    def load(front: Front) -> StreamLoad:
        return _streams(front, scale.idle_clients, scale.idle_requests, scale.idle_tokens)

    return Fleet(nodes, scale.idle_clients, load)


def chat_fleet(scale: Scale, pause: float = 0.0) -> Fleet:
    """Equal nodes holding the model, whose slots keep the prompts they processed."""
    node = SimNodeSpec(
        scale.chat_interval,
        scale.chat_parallel,
        (CHAT_MODEL,),
        prefill_per_token=scale.prefill_per_token,
    )

    def load(front: Front) -> ChatLoad:
        return ChatLoad(
            front.urls,
            scale.chats,
            scale.chat_turns,
            scale.chat_tokens,
            scale.chat_user_chars,
            CHAT_MODEL,
            pause=pause,
        )

    return Fleet([node] * scale.chat_nodes, scale.chats, load)


FLEETS: dict[str, Callable[[Scale], Fleet]] = {
    "unequal": unequal_fleet,
    # Fewer clients, and more, than the fast node's slots and a few: where both targets can
    # hold, and where neither can (docs/performance.md, "After the scheduler").
    "unequal-light": lambda scale: unequal_fleet(scale, unequal_clients("unequal-light", scale)),
    "unequal-heavy": lambda scale: unequal_fleet(scale, unequal_clients("unequal-heavy", scale)),
    "unequal-open": unequal_open_fleet,
    "idle": idle_fleet,
    "chats": chat_fleet,
    # With users' pauses between turns, others' turns arrive meanwhile: without them a
    # closed loop hands each chat's next turn to the node it just freed, by least_conn too.
    "chats-paused": lambda scale: chat_fleet(scale, scale.chat_pause),
}


def _streams(front: Front, clients: int, requests: int, tokens: int) -> StreamLoad:
    return StreamLoad(
        urls=front.urls,
        concurrency=clients,
        requests=requests,
        tokens=tokens,
        models=[CHAT_MODEL],
        watch_pids=front.pids,
        warmup=False,  # a warm-up would pay the cold loads these tables count
    )


async def measure_costs(
    workdir: Path, scale: Scale, nginx: bool, scenarios: set[str], log: Log
) -> dict[str, dict[str, CostRow]]:
    """Each scenario asked for, by name, then by front."""
    policies: list[Policy] = ["proxy", "least_conn", "round_robin"] if nginx else ["proxy"]
    tables: dict[str, dict[str, CostRow]] = {}
    for name in COST_SCENARIOS:
        if name in scenarios:
            fleet = FLEETS[name](scale)
            tables[name] = await _measure_fleet(workdir, scale, fleet, policies, name, log)
    return tables


async def _measure_fleet(
    workdir: Path, scale: Scale, fleet: Fleet, policies: list[Policy], name: str, log: Log
) -> dict[str, CostRow]:
    rows: dict[str, CostRow] = {}
    caps = [node.num_parallel for node in fleet.nodes]
    async with Processes(workdir) as procs:
        urls = await start_sims(procs, fleet.nodes)
        for index, policy in enumerate(policies):
            if index:
                await _reset(urls, fleet.nodes)
            log(f"{name} through {POLICY_LABELS[policy]}")
            front = await start_front(procs, workdir, urls, policy, caps, fleet.clients)
            before = await asyncio.gather(*(sim_stats(url) for url in urls))
            outcome = await _run(procs, fleet.load(front), scale)
            after = await asyncio.gather(*(sim_stats(url) for url in urls))
            if front.child is not None:
                await procs.stop(front.child)
            rows[POLICY_LABELS[policy]] = cost_row(outcome, before, after)
    return rows


async def _run(
    procs: Processes, load: StreamLoad | ChatLoad, scale: Scale
) -> StreamOutcome | ChatOutcome:
    if isinstance(load, ChatLoad):
        return await run_load(procs, load, ChatOutcome, scale.load_timeout)
    return await run_load(procs, load, StreamOutcome, scale.load_timeout)


async def _reset(urls: list[str], nodes: list[SimNodeSpec]) -> None:
    await asyncio.gather(
        *(
            reset_model(url, CHAT_MODEL, resident=CHAT_MODEL in node.resident)
            for url, node in zip(urls, nodes, strict=True)
        )
    )


def cost_row(
    outcome: StreamOutcome | ChatOutcome, before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> CostRow:
    """The outcome, and what the nodes' counters say happened between the two readings."""

    def added(key: str) -> list[int]:
        return [int(a[key]) - int(b[key]) for b, a in zip(before, after, strict=True)]

    pairs = zip(before, after, strict=True)
    turns = [_added_turns(b["chat_turns"], a["chat_turns"]) for b, a in pairs]
    follow_ups, changed = changed_turns(turns)
    return CostRow(
        requests=outcome.requests,
        errors=outcome.errors,
        ttfb=outcome.ttfb,
        latency=outcome.latency,
        cold_loads=added("cold_loads"),
        cached_chars=sum(added("prompt_cached_total")),
        computed_chars=sum(added("prompt_computed_total")),
        follow_ups=follow_ups,
        changed_node=changed,
    )


def _added_turns(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: count - before.get(key, 0) for key, count in after.items()}


def changed_turns(turns_by_node: list[dict[str, int]]) -> tuple[int, int]:
    """Follow-up turns, and how many of them another node served than the turn before, from
    each node's chat turns served ("conversation/length": count)."""
    served: dict[str, dict[int, int]] = {}  # conversation -> length -> node
    for node, turns in enumerate(turns_by_node):
        for key, count in turns.items():
            if count > 0:
                conversation, _, length = key.rpartition("/")
                served.setdefault(conversation, {}).setdefault(int(length), node)
    follow_ups = changed = 0
    for by_length in served.values():
        nodes = [by_length[length] for length in sorted(by_length)]
        follow_ups += len(nodes) - 1
        changed += sum(a != b for a, b in itertools.pairwise(nodes))
    return follow_ups, changed
