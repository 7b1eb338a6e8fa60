"""``python -m proxy.bench --compare REV``: this checkout's proxy against REV's, side by side.

For telling whether a change made the proxy cheaper when the machine's own speed drifts by
more than the change (on a shared VM, from one minute to the next). Both proxies run in front
of the same nodes. Streams are paced by their tokens, so both proxies get theirs at the same
time, each from a load generator of its own, and a slow spell hits both. Embeddings go as
fast as a proxy answers, so run at once the faster proxy would finish first and the other run
alone: they take turns instead, A then B, then B then A. Each load runs ``rounds`` times; the
table gives each proxy's CPU per unit (median over the rounds) and the ratio in every round.
Nothing is pinned.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from .processes import PROJECT_ROOT, BenchError, Processes
from .report import render
from .scale import CHAT_MODEL, EMBED_MODEL, Scale
from .scenarios import Log
from .specs import EmbedLoad, EmbedOutcome, StreamLoad, StreamOutcome
from .stacks import Front, SimNodeSpec, run_load, start_proxy, start_sims

SHORT_STREAM_TOKENS = 10  # mostly per-request work, where a long stream is mostly per-chunk


async def _stream_cpu(procs: Processes, front: Front, scale: Scale, tokens: int) -> float:
    """µs of the front's CPU per chunk over half the usual streams (the other half is B's)."""
    load = StreamLoad(
        front.urls,
        max(1, scale.streams // 2),
        max(1, scale.stream_requests // 2),
        tokens,
        [CHAT_MODEL],
        front.pids,
        stagger=scale.stagger,
    )
    outcome = await run_load(procs, load, StreamOutcome, scale.load_timeout)
    if outcome.errors or not outcome.chunks:
        raise BenchError(f"{outcome.errors} failed streams through {front.name}")
    return outcome.cpu_seconds / outcome.chunks * 1e6


async def _embed_cpu(procs: Processes, front: Front, scale: Scale) -> float:
    """µs of the front's CPU per short /api/embed request."""
    clients, requests = max(1, scale.embed_clients // 2), max(1, scale.embed_requests // 2)
    load = EmbedLoad(front.urls, clients, requests, EMBED_MODEL, front.pids)
    outcome = await run_load(procs, load, EmbedOutcome, scale.load_timeout)
    if outcome.errors or not outcome.requests:
        raise BenchError(f"{outcome.errors} failed embed requests through {front.name}")
    return outcome.cpu_seconds / outcome.requests * 1e6


Measure = Callable[[Processes, Front], Awaitable[float]]  # µs of CPU per unit, for a front


@dataclass(frozen=True)
class _Load:
    name: str
    unit: str
    measure: Measure
    at_once: bool  # both proxies at the same time, or in turns


def _loads(scale: Scale) -> list[_Load]:
    """What is compared: long streams (per chunk), short ones (per request), embeddings."""

    def streams(tokens: int) -> Measure:
        return lambda procs, front: _stream_cpu(procs, front, scale, tokens)

    return [
        _Load(f"streams of {scale.tokens} tokens", "us/chunk", streams(scale.tokens), True),
        _Load(
            f"streams of {SHORT_STREAM_TOKENS} tokens",
            "us/chunk",
            streams(SHORT_STREAM_TOKENS),
            True,
        ),
        _Load(
            "short /api/embed requests",
            "us/request",
            lambda procs, front: _embed_cpu(procs, front, scale),
            False,
        ),
    ]


async def _round(
    procs: Processes, load: _Load, a: Front, b: Front, turn: int
) -> tuple[float, float]:
    if load.at_once:
        cpu_a, cpu_b = await asyncio.gather(load.measure(procs, a), load.measure(procs, b))
        return cpu_a, cpu_b
    if turn % 2:  # B first every other round
        cpu_b = await load.measure(procs, b)
        return await load.measure(procs, a), cpu_b
    cpu_a = await load.measure(procs, a)
    return cpu_a, await load.measure(procs, b)


async def compare(workdir: Path, rev: str, scale: Scale, log: Log) -> str:
    checkout = workdir / "compare-checkout"
    _git("worktree", "add", "--detach", str(checkout), rev)
    try:
        # ``python -m proxy`` in the checkout finds its package first, but without one it would
        # fall back to the installed one, this checkout's: a comparison with itself.
        if not (checkout / "proxy" / "__main__.py").exists():
            raise BenchError(f"{rev} has no proxy package to run")
        return await _compare(workdir, checkout, rev, scale, log)
    finally:
        _git("worktree", "remove", "--force", str(checkout))


async def _compare(workdir: Path, checkout: Path, rev: str, scale: Scale, log: Log) -> str:
    cap = scale.streams + scale.embed_clients
    node = SimNodeSpec(scale.token_interval, cap, (CHAT_MODEL, EMBED_MODEL))
    rows = []
    async with Processes(workdir) as procs:
        urls = await start_sims(procs, [node] * scale.nodes)
        caps = [cap] * len(urls)
        a = await start_proxy(procs, workdir, urls, caps)
        b = await start_proxy(procs, workdir, urls, caps, source=checkout)
        for load in _loads(scale):
            pairs = []
            for turn in range(scale.rounds):
                how = "both proxies at once" if load.at_once else "the proxies in turn"
                log(f"{load.name}, round {turn + 1} of {scale.rounds}: {how}")
                pairs.append(await _round(procs, load, a, b, turn))
            rows.append(_row(load.name, load.unit, pairs))
    title = (
        f"Compare: this checkout (A) against {rev} (B), side by side, {scale.rounds} rounds "
        "per load; CPU of each proxy per unit, median over the rounds."
    )
    headers = ["load", "unit", "A", "B", "A/B median", "A/B by round"]
    return f"{title}\n{render(headers, rows)}"


def _row(name: str, unit: str, pairs: list[tuple[float, float]]) -> list[str]:
    ratios = [a / b for a, b in pairs if b > 0]
    return [
        name,
        unit,
        f"{statistics.median(a for a, _ in pairs):.2f}",
        f"{statistics.median(b for _, b in pairs):.2f}",
        f"{statistics.median(ratios):.3f}" if ratios else "-",
        " ".join(f"{r:.3f}" for r in ratios),
    ]


def _git(*args: str) -> None:
    done = subprocess.run(
        ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {done.stderr.strip()}")
