"""The dashboard's one event stream, ``GET /-/events``: the fleet as one JSON snapshot, about
once a second and at once when the pool changes (a node up or down, a drain, a reload).

Cheap by construction: the request path only appends each ended request to a bounded ring
(``accesslog.Recent``); snapshots are built here, and only while someone is subscribed. The
nodes' part is ``/-/nodes``'s own (``admin.fleet_state``), the keys' ``/-/usage``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aiohttp import web

from proxy import __version__  # the package's, not a module (tests/test_imports.py)

from .accesslog import Finished, Recent
from .admin import Managed, fleet_state
from .pool import Node, Pool

TICK = 1.0  # seconds between two snapshots when nothing changes
MIN_GAP = 0.1  # seconds at least between two snapshots, however often the pool changes
REUSE_FOR = 0.5  # a snapshot this young (and no change since) serves every subscriber
WINDOW = 300.0  # seconds of ended requests that the latency figures and charts cover
BUCKET = 10.0  # seconds per point of the charts
RATE_WINDOW = 60.0  # the fleet's tokens per second: over the last minute
RECENT_SHOWN = 30  # the last requests listed
STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx in front: pass each event on at once
}


class Watched(Managed, Protocol):
    """What the event stream reads of the running proxy: the admin paths' view, and the
    ring of requests that ended."""

    @property
    def recent(self) -> Recent: ...


class Events:
    """The subscribers of ``/-/events`` and the snapshots they are sent."""

    def __init__(self, runtime: Watched) -> None:
        self.runtime = runtime
        self.subscribers: set[asyncio.Event] = set()  # one wake-up per open stream
        self.closing = False
        self._generation = 0  # counts the pool's changes: a cached snapshot older is stale
        self._cached: tuple[float, int, bytes] = (-math.inf, -1, b"")
        runtime.pool.on_change.append(self.changed)

    def changed(self) -> None:
        """The pool changed: every stream sends a snapshot now (at most every MIN_GAP)."""
        self._generation += 1
        for wake in self.subscribers:
            wake.set()

    def close(self) -> None:
        """At shutdown: every stream ends, so that the server's own wait does not."""
        self.closing = True
        self.changed()

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=STREAM_HEADERS)
        await response.prepare(request)
        wake = asyncio.Event()
        self.subscribers.add(wake)
        try:
            while not self.closing:
                wake.clear()
                await response.write(await self.event())
                await asyncio.sleep(MIN_GAP)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), TICK - MIN_GAP)
            await response.write_eof()
        except ConnectionError:
            pass  # the page went away; aiohttp cancels the handler when it notices first
        finally:
            self.subscribers.discard(wake)
        return response

    async def event(self) -> bytes:
        """One ``snapshot`` event, shared by the streams that ask within REUSE_FOR."""
        now = time.monotonic()
        built, generation, data = self._cached
        if now - built < REUSE_FOR and generation == self._generation:
            return data
        usage = (await self.runtime.quotas.report())["keys"]  # the fleet's, when shared
        body = json.dumps(snapshot(self.runtime, time.time(), usage), separators=(",", ":"))
        data = b"event: snapshot\ndata: " + body.encode() + b"\n\n"
        self._cached = (now, self._generation, data)
        return data


def snapshot(runtime: Watched, now: float, usage: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole picture at wall-clock time ``now``, with the keys' ``usage``."""
    entries = list(runtime.recent.entries)
    finished = [e for e in entries if e.at > now - WINDOW]
    return {
        "at": round(now, 3),
        "proxy": {
            "version": __version__,
            "auth": runtime.auth.mode,
            "shutting_down": runtime.shutting_down,
        },
        "nodes": nodes(runtime.pool, finished),
        "queue": queue(runtime.pool),
        "traffic": traffic(finished, now),
        "recent": [request_row(e) for e in reversed(entries[-RECENT_SHOWN:])],
        "usage": usage,
    }


def nodes(pool: Pool, finished: Sequence[Finished]) -> list[dict[str, Any]]:
    """``/-/nodes``'s state of each node, with when its models in memory expire and how its
    requests of the last WINDOW ended."""
    states = fleet_state(pool)["nodes"]
    return [
        {**state, "resident_until": _resident_until(node), **_outcomes(node, finished)}
        for state, node in zip(states, pool.all_nodes(), strict=True)
    ]


def _resident_until(node: Node) -> dict[str, float]:
    now = time.time()
    return {m: round(expires, 3) for m, expires in node.resident.items() if expires > now}


def _outcomes(node: Node, finished: Sequence[Finished]) -> dict[str, int]:
    statuses = [e.status for e in finished if e.node == node.name]
    return {"requests": len(statuses), "errors": sum(1 for s in statuses if s >= 500)}


def queue(pool: Pool) -> dict[str, Any]:
    """The queue's depth, and each key's slots held and requests waiting ("" is no key)."""
    tenants = pool.tenants()
    return {
        "depth": pool.queue_depth,
        "by_key": {name: {"holding": h, "waiting": w} for name, (h, w) in tenants.items()},
    }


def traffic(finished: Sequence[Finished], now: float) -> dict[str, Any]:
    """Latencies over the last WINDOW, the fleet's tokens per second, and the charts' points."""
    recent = [e for e in finished if e.at > now - RATE_WINDOW]
    return {
        "window_seconds": WINDOW,
        "requests": len(finished),
        "queue_wait": _percentiles([e.queue_s for e in finished if e.takes_slot]),
        "ttfb": _percentiles([e.ttfb_s for e in finished if e.ttfb_s is not None]),
        "tokens_per_second": round(_tokens(recent) / RATE_WINDOW, 2),
        "series": series(finished, now),
    }


def series(finished: Sequence[Finished], now: float) -> list[dict[str, Any]]:
    """One point per BUCKET seconds of wall-clock time (aligned, so points stay put as time
    passes), oldest first; the last one is the bucket under way."""
    last = math.floor(now / BUCKET)
    first = last - int(WINDOW / BUCKET) + 1
    buckets: dict[int, list[Finished]] = {b: [] for b in range(first, last + 1)}
    for e in finished:
        buckets.get(math.floor(e.at / BUCKET), []).append(e)
    return [_point(b, ended, min(BUCKET, now - b * BUCKET)) for b, ended in buckets.items()]


def _point(bucket: int, ended: list[Finished], span: float) -> dict[str, Any]:
    ttfb = _percentiles([e.ttfb_s for e in ended if e.ttfb_s is not None])
    wait = _percentiles([e.queue_s for e in ended if e.takes_slot])
    return {
        "at": bucket * BUCKET,
        "requests": len(ended),
        "tokens_per_second": round(_tokens(ended) / max(span, 1.0), 2),
        "ttfb_p50": ttfb["p50"],
        "ttfb_p99": ttfb["p99"],
        "queue_p50": wait["p50"],
        "queue_p99": wait["p99"],
    }


def _tokens(ended: Sequence[Finished]) -> int:
    return sum(e.tokens_out or 0 for e in ended)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50 and p99, None of no values."""
    if not values:
        return {"p50": None, "p99": None}
    values.sort()
    return {"p50": round(_rank(values, 0.5), 4), "p99": round(_rank(values, 0.99), 4)}


def _rank(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def request_row(e: Finished) -> dict[str, Any]:
    return {
        "at": round(e.at, 3),
        "method": e.method,
        "path": e.path,
        "model": e.model,
        "key": e.key,
        "node": e.node,
        "status": e.status,
        "queue_s": round(e.queue_s, 4),
        "ttfb_s": round(e.ttfb_s, 4) if e.ttfb_s is not None else None,
        "duration_s": round(e.duration_s, 4),
        "tokens_in": e.tokens_in,
        "tokens_out": e.tokens_out,
    }
