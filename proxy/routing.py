"""Which nodes may serve a request, and in what order: the model-aware policy.

Read-only over node state; the pool applies the ``Want`` built here in one synchronous step.

For a model-bound request:
- only nodes that have the model on disk are eligible (a node whose list is not known yet is a
  last resort);
- among them, nodes that hold the model in memory come first, so it is not loaded twice;
- a node that would have to load it is used at once only when no eligible node holds it in
  memory; otherwise only after the request has waited ``routing.spill_after`` seconds for a
  slot on one that does (a cold load costs seconds to minutes of GPU time, a queue wait is
  usually shorter).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Literal

from .pool import Node, Pool, Want

log = logging.getLogger("ollama_proxy.routing")

RESIDENT, ON_DISK, UNKNOWN = 0, 1, 2
Availability = Literal["up", "down", "unknown", "nowhere"]


def want_for(
    pool: Pool,
    model: str | None,
    spill_after: float,
    exclude: Iterable[Node] = (),
    preferred: str | None = None,
) -> Want:
    """What a request for ``model`` (normalised; None: any node) may use; ``preferred`` names
    the node its conversation was last served by (not used yet)."""
    excluded = frozenset(exclude)
    if model is None:
        return Want(exclude=excluded, preferred=preferred)
    loop = asyncio.get_running_loop()
    spill_at = loop.time() + spill_after

    def rank(node: Node) -> int:
        if node.models is None:
            return UNKNOWN
        return RESIDENT if node.is_resident(model) else ON_DISK

    def eligible(node: Node) -> bool:
        if not node.has_model(model):
            return False
        if node.is_resident(model) or loop.time() >= spill_at:
            return True
        return not any(
            n.is_resident(model) for n in pool.nodes.values() if n.takes_new and n not in excluded
        )

    return Want(model, eligible, rank, excluded, recheck_at=spill_at, preferred=preferred)


def availability(pool: Pool, model: str) -> Availability:
    """Where ``model`` can be served: "up", "down" (listed by nodes that are out of service
    now), "unknown" (no node in service may have it, and nodes out of service never listed
    their models: never reachable, they may or may not have it), or "nowhere" (every node
    listed its models: a real 404).
    """
    if any(n.has_model(model) for n in pool.nodes.values() if n.takes_new):
        return "up"
    if any(n.models is not None and model in n.models for n in pool.nodes.values()):
        return "down"
    if any(n.models is None for n in pool.nodes.values()):
        return "unknown"
    return "nowhere"


def log_decision(pool: Pool, want: Want, node: Node, request_id: str, queue_wait: float) -> None:
    """At debug level, one line per admitted request: where it went, why, and among what."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    candidates = [n.name for n in pool.candidates(want)]
    log.debug(
        "route id=%s model=%s node=%s why=%s candidates=%s queue_s=%.4f",
        request_id,
        want.model or "-",
        node.name,
        _why(pool, want, node),
        ",".join(candidates) or "-",
        queue_wait,
    )


def _why(pool: Pool, want: Want, node: Node) -> str:
    """resident (holds the model), on_disk (none in service holds it), spill (others hold it,
    but the request waited past routing.spill_after), unknown (its list is not known yet), or
    any (no model)."""
    model = want.model
    if model is None:
        return "any"
    if node.models is None:
        return "unknown"
    if node.is_resident(model):
        return "resident"
    others = (n for n in pool.nodes.values() if n.takes_new and n not in want.exclude)
    return "spill" if any(n.is_resident(model) for n in others) else "on_disk"
