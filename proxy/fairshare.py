"""Who a request is for, as the queue sees it, and the order in which tenants' waiters are served.

The order is start-time fair queueing (Goyal, Vin and Cheng, SIGCOMM 1996) with one tag per
tenant rather than per request, as Linux's CFS keeps one ``vruntime`` per task: each tenant
with requests waiting has a *start tag*, the virtual time at which its next request is due.
The waiter served next is the first (in arrival order) of the tenant with the lowest tag; being
served adds ``1 / weight`` to that tenant's tag. A tenant that starts waiting begins at the
virtual time, the tag of the last request served, so it is neither owed for the time it sent
nothing nor behind those that sent a lot: its first request goes after at most one request of
each tenant already waiting.

Why this and not deficit round robin: DRR's quantum is meant for known costs (a packet's
length), and a generation's cost is not known until it ends; with a cost of one per request
DRR becomes weighted round robin, which serves a weight of 3 as bursts of three, and needs
whole-number weights. Tags charge only when a request is served, so a waiter that leaves
(cancelled, timed out) changes no tag at all, and tags need no per-request state to undo.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

W = TypeVar("W")


@dataclass(frozen=True)
class Tenant:
    """A client key's share of the slots: its weight when keys compete, the slots it may hold
    at once fleet-wide and how many of its requests may wait (None: no limit of its own)."""

    name: str
    weight: float = 1.0
    max_concurrency: int | None = None
    max_queued: int | None = None


# Requests without a key (an open proxy) share the slots as one tenant of their own.
OPEN = Tenant("")


@dataclass(eq=False)
class _Share(Generic[W]):
    """One tenant's live state: kept while it has requests waiting or holding slots."""

    tenant: Tenant  # as its newest request gave it: a reload's new limits apply at once
    start: float  # virtual time at which its next request is due (its start tag)
    waiting: deque[tuple[int, W]] = field(default_factory=deque)  # (arrival number, waiter)
    in_flight: int = 0  # slots its requests hold now


class FairQueue(Generic[W]):
    """Waiters by tenant, first come first served within one, weighted fair between them."""

    def __init__(self) -> None:
        self._shares: dict[str, _Share[W]] = {}
        self._virtual_time = 0.0  # the start tag of the last request served
        self._arrivals = itertools.count()
        self._waiting = 0
        # With several replicas (``leases.py``): tenant name → slots counted as the other
        # replicas' (the whole cap while Redis last said it holds them all), and the replicas
        # each cap is divided among while Redis does not answer.
        self.elsewhere: dict[str, int] = {}
        self.replicas = 1

    def __len__(self) -> int:
        return self._waiting

    def waiters(self) -> Iterator[W]:
        for share in self._shares.values():
            yield from (waiter for _, waiter in share.waiting)

    def counts(self) -> dict[str, tuple[int, int]]:
        """Tenant name → (slots held, requests waiting), for tenants that have either."""
        return {name: (s.in_flight, len(s.waiting)) for name, s in self._shares.items()}

    def may_queue(self, tenant: Tenant) -> bool:
        share = self._shares.get(tenant.name)
        queued = len(share.waiting) if share is not None else 0
        return tenant.max_queued is None or queued < tenant.max_queued

    def may_hold(self, tenant: Tenant) -> bool:
        """Below its own cap of slots (the cap its newest request gave)."""
        if tenant.max_concurrency is None:
            return True
        share = self._shares.get(tenant.name)
        return not self._at_cap(tenant, share.in_flight if share is not None else 0)

    def _at_cap(self, tenant: Tenant, in_flight: int) -> bool:
        cap = tenant.max_concurrency
        if cap is None:
            return False
        if self.replicas > 1:  # never 0: every replica keeps serving the key
            cap = max(1, cap // self.replicas)
        return in_flight + self.elsewhere.get(tenant.name, 0) >= cap

    def push(self, tenant: Tenant, waiter: W) -> None:
        share = self._share(tenant)
        if not share.waiting:  # starts waiting: due now, not owed its idle time
            share.start = max(share.start, self._virtual_time)
        share.waiting.append((next(self._arrivals), waiter))
        self._waiting += 1

    def remove(self, tenant: Tenant, waiter: W) -> None:
        share = self._shares[tenant.name]
        for i, (_, queued) in enumerate(share.waiting):
            if queued is waiter:
                del share.waiting[i]
                self._waiting -= 1
                break
        self._forget_if_idle(share)

    def in_turn(self) -> Iterator[W]:
        """Waiters in the order they are to be served: of tenants below their cap, by start
        tag (then by arrival), each tenant's first come first. Lazy, over the live queues:
        push, remove or serve none while it runs (serving one changes the order anyway)."""
        shares = [
            s
            for s in self._shares.values()
            if s.waiting and not self._at_cap(s.tenant, s.in_flight)
        ]
        shares.sort(key=lambda s: (s.start, s.waiting[0][0]))
        for share in shares:
            for _, waiter in share.waiting:
                yield waiter

    def holding(self, tenant: Tenant) -> None:
        """A slot taken without waiting: counted, not charged (nobody was waiting)."""
        self._share(tenant).in_flight += 1

    def served(self, tenant: Tenant) -> None:
        """One of its waiters got a slot: it holds one more, and is due later."""
        share = self._shares[tenant.name]
        share.in_flight += 1
        self._virtual_time = max(self._virtual_time, share.start)
        share.start += 1 / share.tenant.weight

    def refund(self, tenant: Tenant) -> None:
        """A slot granted in the same instant its waiter left: as if never served."""
        share = self._shares.get(tenant.name)
        if share is not None:
            share.start -= 1 / share.tenant.weight

    def released(self, tenant: Tenant) -> None:
        share = self._shares.get(tenant.name)
        if share is not None:
            share.in_flight -= 1
            self._forget_if_idle(share)

    def _share(self, tenant: Tenant) -> _Share[W]:
        share = self._shares.get(tenant.name)
        if share is None:
            share = self._shares[tenant.name] = _Share(tenant, self._virtual_time)
        share.tenant = tenant
        return share

    def _forget_if_idle(self, share: _Share[W]) -> None:
        if not share.waiting and share.in_flight <= 0:
            del self._shares[share.tenant.name]
