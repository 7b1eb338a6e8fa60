"""Two replicas sharing Redis against one proxy without: ``python -m proxy.bench.replicas``.

What the leases cost (``leases.py``: one Lua script before a slotted request is sent, renewals
and releases batched in the background): time to first byte, p50 and p99, at a light load
(``--light`` concurrent streams of 10 tokens) where nothing queues and a request waits for
nothing but the fronts' own work, and chunks relayed per second with the fronts' CPU per chunk
(every replica's, and Redis's) at a heavier one (``--streams`` concurrent streams of 100
tokens). One simulated node with room for every stream, so no request waits for a slot;
clients alternate between the replicas. Rounds take the setups in turn. ``--baseline DIR``
adds one proxy run from another checkout without Redis (``git archive main | tar -x -C DIR``),
to show one process without Redis is no slower than before. Last, the lease's round trip
alone, in this process: ``Slots.take`` and ``give_back`` in a loop against the same Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import parse_config
from ..leases import Slots
from ..pool import Pool
from ..state import SharedState
from .processes import PROJECT_ROOT, BenchError, Child, Processes, free_ports, wait_ready
from .report import percentile
from .scale import CHAT_MODEL
from .specs import StreamLoad, StreamOutcome, pooled
from .stacks import SimNodeSpec, run_load, start_sims

TOKEN_INTERVAL = 0.005
CAP = 1000  # slots on the node: nothing waits for one


@dataclass
class Setup:
    name: str
    urls: list[str]
    pids: list[int]
    light: list[StreamOutcome] = field(default_factory=list)
    heavy: list[StreamOutcome] = field(default_factory=list)
    take: list[float] = field(default_factory=list)  # a lease's round trip alone, seconds


async def start_redis(procs: Processes) -> tuple[str, Child]:
    (port,) = free_ports(1)
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    child = await procs.start("redis", [*argv, "--appendonly", "no"])
    deadline = time.monotonic() + 10
    while not _redis_answers(port):
        if time.monotonic() > deadline:
            raise BenchError("redis-server did not start")
        await asyncio.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", child


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def start_replica(
    procs: Processes, workdir: Path, node: str, redis_url: str, source: Path = PROJECT_ROOT
) -> tuple[str, int]:
    (port,) = free_ports(1)
    config: dict[str, object] = {
        "listen": f"127.0.0.1:{port}",
        "nodes": [{"url": node, "name": "sim0", "max_concurrency": CAP}],
    }
    if redis_url:
        config["state"] = {"redis_url": redis_url}
    path = workdir / f"proxy-{port}.yaml"
    path.write_text(json.dumps(config))
    args = ["-m", "proxy", "--config", str(path), "--log-level", "warning"]
    child = await procs.start_python("proxy", args, cwd=source)
    url = f"http://127.0.0.1:{port}"
    await wait_ready(child, url + "/-/ready")
    return url, child.pid


def load(setup: Setup, concurrency: int, requests: int, tokens: int) -> StreamLoad:
    return StreamLoad(
        urls=setup.urls,
        concurrency=concurrency,
        requests=requests,
        tokens=tokens,
        models=[CHAT_MODEL],
        watch_pids=setup.pids,
        stagger=tokens * TOKEN_INTERVAL,
    )


async def measure(args: argparse.Namespace, workdir: Path) -> list[Setup]:
    async with Processes(workdir) as procs:
        spec = SimNodeSpec(TOKEN_INTERVAL, CAP, (CHAT_MODEL,), max_queue=CAP)
        [node] = await start_sims(procs, [spec])
        redis_url, redis = await start_redis(procs)
        setups = []
        if args.baseline:
            url, pid = await start_replica(procs, workdir, node, "", args.baseline)
            setups.append(Setup("one, before (baseline)", [url], [pid]))
        url, pid = await start_replica(procs, workdir, node, "")
        setups.append(Setup("one, no Redis", [url], [pid]))
        url, pid = await start_replica(procs, workdir, node, redis_url)
        setups.append(Setup("one + Redis", [url], [pid, redis.pid]))
        pair = [await start_replica(procs, workdir, node, redis_url) for _ in range(2)]
        urls, pids = [u for u, _ in pair], [p for _, p in pair]
        setups.append(Setup("two + Redis", urls, [*pids, redis.pid]))
        for _ in range(args.rounds):
            for setup in setups:
                light = load(setup, args.light, args.requests // args.rounds, 10)
                setup.light.append(await run_load(procs, light, StreamOutcome, 300))
                heavy = load(setup, args.streams, args.streams * 4 // args.rounds, 100)
                setup.heavy.append(await run_load(procs, heavy, StreamOutcome, 300))
        setups[-1].take = await lease_round_trips(redis_url, args.requests)
        return setups


async def lease_round_trips(redis_url: str, count: int) -> list[float]:
    """Seconds each ``Slots.take`` took, one at a time, releases in the background."""
    node = {"url": "http://127.0.0.1:9", "name": "bench", "max_concurrency": CAP}
    config = parse_config(
        {"listen": "127.0.0.1:0", "nodes": [node], "state": {"redis_url": redis_url}}
    )
    pool, state = Pool(config.nodes, config.queue), SharedState(config.state)
    slots = Slots(pool, state, config.state)
    await state.start()
    for _ in range(500):  # the first renewal registers this replica, then leases are shared
        if slots.shared:
            break
        await asyncio.sleep(0.01)
    times = []
    for _ in range(count):
        lease = pool.try_acquire()
        assert lease is not None
        started = time.perf_counter()
        if not await slots.take(lease):
            raise BenchError("Redis refused a lease")
        times.append(time.perf_counter() - started)
        lease.release()
        slots.give_back(lease)
    await slots.aclose()
    await state.aclose()
    return times


def report(setups: list[Setup]) -> str:
    rows = [
        "| | TTFB p50 | TTFB p99 | added p50 | chunks/s | CPU µs/chunk | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    base = percentile(pooled(setups[-3].light).ttfb, 50)
    for setup in setups:
        light, heavy = pooled(setup.light), pooled(setup.heavy)
        p50, p99 = percentile(light.ttfb, 50), percentile(light.ttfb, 99)
        rate = heavy.chunks / heavy.wall_seconds
        cpu = heavy.cpu_seconds / heavy.chunks * 1e6
        errors = light.errors + heavy.errors
        rows.append(
            f"| {setup.name} | {p50 * 1e3:.2f} ms | {p99 * 1e3:.2f} ms | "
            f"{(p50 - base) * 1e3:+.2f} ms | {rate:,.0f} | {cpu:.1f} | {errors} |"
        )
    take = setups[-1].take
    rows.append(
        f"\nA lease's round trip alone (Slots.take), {len(take)} in a row: "
        f"p50 {percentile(take, 50) * 1e3:.2f} ms, p99 {percentile(take, 99) * 1e3:.2f} ms"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m proxy.bench.replicas", description=__doc__)
    parser.add_argument("--requests", type=int, default=1500, help="light-load streams")
    parser.add_argument("--light", type=int, default=10, help="light-load concurrency")
    parser.add_argument("--streams", type=int, default=100, help="heavy-load concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout's proxy, no Redis")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        print(report(asyncio.run(measure(args, Path(workdir)))))


if __name__ == "__main__":
    main()
