"""``python -m proxy.bench.fairness``: another tenant's wait behind one tenant's backlog.

The pool alone, on the real event loop and its timers: one node with 2 slots, and every
request holds its slot for a fixed service time (a lease released by a timer, where a real
node would generate). Tenant A queues 100 requests at once; then tenant B sends 10, one each
service time. Measured: B's waits (from its request to its slot), with fair share, and with
every request as one tenant, which is first come first served, the order before fair share.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from ..config import NodeConfig, QueueConfig
from ..fairshare import Tenant
from ..pool import Pool
from .report import percentile, render

SLOTS = 2


async def run(*, fair: bool, service: float, backlog: int = 100, sends: int = 10) -> list[float]:
    """B's waits in seconds; returns once every request of A and B has been served."""
    node = NodeConfig(url="http://sim:1", name="sim", max_concurrency=SLOTS, weight=1.0)
    pool = Pool([node], QueueConfig(max_size=backlog + sends, timeout=3600))
    a = Tenant("a")
    b = Tenant("b") if fair else a
    loop = asyncio.get_running_loop()

    async def request(tenant: Tenant) -> float:
        sent = time.monotonic()
        lease = await pool.acquire(tenant=tenant)
        waited = time.monotonic() - sent
        loop.call_later(service, lease.release)
        return waited

    backlogged = [asyncio.create_task(request(a)) for _ in range(backlog)]
    await asyncio.sleep(0)  # A's requests are all queued before B's first
    waits = []
    for _ in range(sends):
        waits.append(asyncio.create_task(request(b)))
        await asyncio.sleep(service)
    await asyncio.gather(*backlogged)
    return list(await asyncio.gather(*waits))


async def measure(service: float) -> list[list[str]]:
    rows = []
    for label, fair in (("fair share", True), ("one queue (FIFO)", False)):
        waits = await run(fair=fair, service=service)
        rows.append(
            [
                label,
                f"{percentile(waits, 50) / service:.2f}",
                f"{percentile(waits, 90) / service:.2f}",
                f"{max(waits) / service:.2f}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m proxy.bench.fairness")
    parser.add_argument("--service", type=float, default=0.05, help="seconds a request holds")
    args = parser.parse_args()
    rows = asyncio.run(measure(args.service))
    print(f"B's wait, in service times ({args.service * 1000:g} ms), 1 node with {SLOTS} slots")
    print(render(["order", "median", "p90", "max"], rows))


if __name__ == "__main__":
    main()
