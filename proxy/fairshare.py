"""Who a request is for, as the queue sees it: fair share between keys (tenants issue)."""

from __future__ import annotations

from dataclasses import dataclass


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
