"""The scenarios: each starts its own stack, runs the load generator against each front, and
stops everything before the next one starts, so no scenario measures another's leftovers."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .cores import Cores, pinned
from .costs import CostRow, measure_costs
from .processes import Processes
from .scale import CHAT_MODEL, EMBED_MODEL, OTHER_CHAT_MODEL, Scale
from .specs import (
    EmbedLoad,
    EmbedOutcome,
    HoldLoad,
    HoldOutcome,
    StreamLoad,
    StreamOutcome,
    pooled,
)
from .stacks import (
    POLICY_LABELS,
    Front,
    Policy,
    SimNodeSpec,
    cold_load_counter,
    run_load,
    start_bare_relay,
    start_front,
    start_nginx,
    start_proxy,
    start_sims,
)

Log = Callable[[str], None]
# Streams being opened at a time: below the listen backlogs (aiohttp 128, nginx 511), so that
# no SYN is dropped and retried a second later.
HOLD_OPEN_AT_ONCE = 100


def log_progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


@dataclass
class Column:
    """One front's figures in the relay table."""

    watched: bool  # whether it has processes of its own to measure (direct access has none)
    stream: StreamOutcome | None = None
    latency: StreamOutcome | None = None  # the light load's streams: time to first byte only
    embed: EmbedOutcome | None = None
    hold: HoldOutcome | None = None


@dataclass
class SchedulingRow:
    outcome: StreamOutcome
    cold_loads: int


@dataclass
class Results:
    relay: dict[str, Column] = field(default_factory=dict)  # by front: direct, proxy, nginx
    scheduling: dict[str, SchedulingRow] = field(default_factory=dict)  # by policy label
    costs: dict[str, dict[str, CostRow]] = field(default_factory=dict)  # issue 16's, by name


# --------------------------------------------------------------------------- relay


@dataclass(frozen=True)
class Others:
    """The fronts measured beside direct access and the proxy."""

    nginx: bool  # nginx least_conn (and round robin in the scheduling table), when installed
    floor: bool = False  # the bare relay (--floor)


async def _fronts(
    procs: Processes, workdir: Path, urls: list[str], cap: int, others: Others, scale: Scale
) -> list[Front]:
    """Direct access, the proxy, and the others asked for."""
    fronts = [Front("direct", urls)]
    fronts.append(await start_proxy(procs, workdir, urls, [cap] * len(urls)))
    if others.floor:
        fronts.append(await start_bare_relay(procs, urls))
    if others.nginx:
        streams = scale.hold_streams
        fronts.append(await start_nginx(procs, workdir, urls, "least_conn", streams=streams))
    return fronts


async def measure_relay(
    workdir: Path, scale: Scale, others: Others, scenarios: set[str], log: Log, cores: Cores
) -> dict[str, Column]:
    """Streams (CPU per chunk, time to first byte), time to first byte again at a light load,
    and embeddings, through each front."""
    cap = scale.streams + scale.embed_clients  # room for every client: nothing queues
    node = SimNodeSpec(scale.token_interval, cap, (CHAT_MODEL, EMBED_MODEL))
    async with Processes(workdir) as procs:
        urls = await start_sims(procs, [node] * scale.nodes)
        fronts = await _fronts(procs, workdir, urls, cap, others, scale)
        columns = {front.name: Column(watched=bool(front.pids)) for front in fronts}
        if "stream" in scenarios:
            await _measure_streams(procs, fronts, columns, scale, log, cores)
        if "embed" in scenarios:
            for front in fronts:
                log(f"{scale.embed_requests} embed requests through {front.name}")
                load = EmbedLoad(
                    front.urls, scale.embed_clients, scale.embed_requests, EMBED_MODEL, front.pids
                )
                columns[front.name].embed = await run_load(
                    procs, load, EmbedOutcome, scale.load_timeout
                )
    return columns


async def _measure_streams(
    procs: Processes,
    fronts: list[Front],
    columns: dict[str, Column],
    scale: Scale,
    log: Log,
    cores: Cores,
) -> None:
    """The issue's streams, then the light load's, with the fronts alone on their core."""
    front_pids = {pid for front in fronts for pid in front.pids}
    other_pids = [pid for pid in procs.pids if pid not in front_pids]
    with pinned(cores, front_pids, other_pids):
        what = f"{scale.streams} concurrent streams"
        total = scale.stream_requests
        streams = await _interleaved(procs, fronts, _stream_load, total, scale, what, log)
        for name, outcome in streams.items():
            columns[name].stream = outcome
        if scale.latency_streams > 0:
            what = f"time to first byte at {scale.latency_streams} streams"
            total = scale.latency_requests
            light = await _interleaved(procs, fronts, _latency_load, total, scale, what, log)
            for name, outcome in light.items():
                columns[name].latency = outcome


StreamLoadOf = Callable[[Front, Scale, int], StreamLoad]  # a front's load of so many streams


async def _interleaved(
    procs: Processes,
    fronts: list[Front],
    load_of: StreamLoadOf,
    total: int,
    scale: Scale,
    what: str,
    log: Log,
) -> dict[str, StreamOutcome]:
    """``total`` streams per front, measured in ``scale.rounds`` rounds that take the fronts in
    turn (each round starting one front further), and pooled: whatever slows the machine for a
    while slows every front alike, instead of the one that happened to be measured then."""
    parts: dict[str, list[StreamOutcome]] = {front.name: [] for front in fronts}
    shares = _shares(total, scale.rounds)
    for index, requests in enumerate(shares):
        turn = index % len(fronts)
        for front in fronts[turn:] + fronts[:turn]:
            log(f"{what} through {front.name} (round {index + 1} of {len(shares)})")
            load = load_of(front, scale, requests)
            parts[front.name].append(await run_load(procs, load, StreamOutcome, scale.load_timeout))
    return {name: pooled(outcomes) for name, outcomes in parts.items()}


def _shares(total: int, rounds: int) -> list[int]:
    """``total`` in ``rounds`` near-equal parts, none empty."""
    rounds = max(1, min(rounds, total))
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


def _stream_load(front: Front, scale: Scale, requests: int) -> StreamLoad:
    """The issue's streams, 100 at a time by default."""
    return _streams(front, scale, requests, scale.streams, scale.tokens)


def _latency_load(front: Front, scale: Scale, requests: int) -> StreamLoad:
    """Few short streams: the front idles between requests, so a new one waits for nothing
    but the front's own work (and the same machine's cost for direct access)."""
    return _streams(front, scale, requests, scale.latency_streams, scale.latency_tokens)


def _streams(
    front: Front, scale: Scale, requests: int, concurrency: int, tokens: int
) -> StreamLoad:
    return StreamLoad(
        urls=front.urls,
        concurrency=concurrency,
        requests=requests,
        tokens=tokens,
        models=[CHAT_MODEL],
        watch_pids=front.pids,
        stagger=scale.stagger * tokens * scale.token_interval,
    )


async def measure_hold(workdir: Path, scale: Scale, others: Others, log: Log) -> dict[str, Column]:
    """Many concurrent open streams: does each front hold them all, and in how much memory."""
    cap = scale.hold_streams  # any node may get them all
    node = SimNodeSpec(scale.hold_token_interval, cap, (CHAT_MODEL,))
    columns: dict[str, Column] = {}
    async with Processes(workdir) as procs:
        urls = await start_sims(procs, [node] * scale.nodes)
        for front in await _fronts(procs, workdir, urls, cap, others, scale):
            log(f"{scale.hold_streams} held streams through {front.name}")
            load = HoldLoad(
                front.urls,
                scale.hold_streams,
                HOLD_OPEN_AT_ONCE,
                scale.hold_seconds,
                CHAT_MODEL,
                front.pids,
            )
            hold = await run_load(procs, load, HoldOutcome, scale.load_timeout)
            columns[front.name] = Column(watched=bool(front.pids), hold=hold)
    return columns


# --------------------------------------------------------------------------- scheduling


async def _scheduling_front(
    procs: Processes, workdir: Path, urls: list[str], policy: Policy, scale: Scale
) -> Front:
    caps = [scale.sched_parallel] * len(urls)
    return await start_front(procs, workdir, urls, policy, caps, scale.sched_clients)


def _scheduling_nodes(scale: Scale) -> list[SimNodeSpec]:
    """A fast node and a slow one, each holding a different model in memory, with room for
    ``scale.sched_max_loaded`` models: loading the other one evicts it once it is idle."""
    return [
        SimNodeSpec(
            interval,
            scale.sched_parallel,
            (model,),
            load_delay=scale.load_delay,
            max_loaded=scale.sched_max_loaded,
        )
        for interval, model in (
            (scale.fast_interval, CHAT_MODEL),
            (scale.slow_interval, OTHER_CHAT_MODEL),
        )
    ]


async def _schedule(workdir: Path, scale: Scale, policy: Policy) -> SchedulingRow:
    """One policy on fresh nodes, each with its own model in memory again: what another policy
    left loaded would change the cold loads of the next."""
    async with Processes(workdir) as procs:
        urls = await start_sims(procs, _scheduling_nodes(scale))
        front = await _scheduling_front(procs, workdir, urls, policy, scale)
        before = await asyncio.gather(*(cold_load_counter(url) for url in urls))
        load = StreamLoad(
            urls=front.urls,
            concurrency=scale.sched_clients,
            requests=scale.sched_requests,
            tokens=scale.sched_tokens,
            models=[CHAT_MODEL, OTHER_CHAT_MODEL],
            watch_pids=front.pids,
            warmup=False,  # a warm-up would pay the cold loads this table is about
        )
        outcome = await run_load(procs, load, StreamOutcome, scale.load_timeout)
        after = await asyncio.gather(*(cold_load_counter(url) for url in urls))
    return SchedulingRow(outcome, sum(after) - sum(before))


async def measure_scheduling(
    workdir: Path, scale: Scale, nginx: bool, log: Log
) -> dict[str, SchedulingRow]:
    """Unequal nodes, each holding a different model: latency and cold loads per policy."""
    policies: list[Policy] = ["proxy", "least_conn", "round_robin"] if nginx else ["proxy"]
    rows: dict[str, SchedulingRow] = {}
    for policy in policies:
        log(f"scheduling through {POLICY_LABELS[policy]}")
        rows[POLICY_LABELS[policy]] = await _schedule(workdir, scale, policy)
    return rows


# --------------------------------------------------------------------------- all of it


async def measure_all(
    workdir: Path, scale: Scale, others: Others, scenarios: set[str], log: Log, cores: Cores
) -> Results:
    results = Results()
    if scenarios & {"stream", "embed"}:
        results.relay = await measure_relay(workdir, scale, others, scenarios, log, cores)
    if "hold" in scenarios:
        for name, held in (await measure_hold(workdir, scale, others, log)).items():
            results.relay.setdefault(name, held).hold = held.hold
    if "sched" in scenarios:
        results.scheduling = await measure_scheduling(workdir, scale, others.nginx, log)
    results.costs = await measure_costs(workdir, scale, others.nginx, scenarios, log)
    return results
