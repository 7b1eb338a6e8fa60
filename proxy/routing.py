"""Which nodes may serve a request, and which serves it best: the model-aware policy.

Read-only over node state; the pool applies the ``Want`` built here in one synchronous step.

For a model-bound request:
- only nodes that have the model on disk are eligible (a node whose list is not known yet may
  have it), but not one where loading it may push out of memory a model that requests are
  using (``estimate.evicts_busy``) while another node could serve it without, until the
  request has waited ``routing.spill_after``;
- among them the pool prefers the node of earliest expected finish (``estimate.py``: the wait
  for a slot, a cold load, the generation), the conversation's own node (``preferred``) with
  ``routing.affinity_margin`` seconds of credit; a free slot elsewhere is passed over for it
  only when waiting saves more than ``routing.min_gain`` of that slot's time, and never past
  ``routing.spill_after``; a node whose speed for the model is unknown takes one request (a
  probe) until it shows it (``estimate.probing``);
- the time requests waited is charged to the idle nodes that could have loaded the model
  meanwhile (``charge_wait``), as the rent that pays their load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Literal

from . import estimate
from .config import RoutingConfig
from .pool import Node, Pool, Want

log = logging.getLogger("ollama_proxy.routing")

RESIDENT, ON_DISK, UNKNOWN = 0, 1, 2
Availability = Literal["up", "down", "unknown", "nowhere"]
Reason = Literal["affinity", "fastest", "spill", "only_choice"]
REASONS: tuple[Reason, ...] = ("affinity", "fastest", "spill", "only_choice")
DEFAULTS = RoutingConfig(spill_after=10)
# Shorter waits are no queue's: charged as rent, a million requests that found a slot free
# would pay for a load none waited for.
WAITED_SECONDS = 0.001


def want_for(
    pool: Pool,
    model: str | None,
    spill_after: float,
    exclude: Iterable[Node] = (),
    preferred: str | None = None,
    *,
    settings: RoutingConfig = DEFAULTS,
    tokens: int | None = None,
) -> Want:
    """What a request for ``model`` (normalised; None: any node) may use; ``preferred`` names
    the node its conversation was last served by; ``tokens``, the completion length it asks
    for at most, when it names one."""
    excluded = frozenset(exclude)
    if model is None:
        return Want(exclude=excluded, preferred=preferred)
    loop = asyncio.get_running_loop()
    spill_at = loop.time() + spill_after
    expected = estimate.expected_tokens(pool.nodes.values(), model, tokens)

    def rank(node: Node) -> int:
        if node.models is None:
            return UNKNOWN
        return RESIDENT if node.is_resident(model) else ON_DISK

    def fits(node: Node) -> bool:
        """May serve it without pushing a model in use out of memory."""
        return node.has_model(model) and not estimate.evicts_busy(node, model, pool.clock())

    def eligible(node: Node) -> bool:
        if not node.has_model(model):
            return False
        if loop.time() >= spill_at or fits(node):
            return True
        # Held back for a node that fits; with none, holding back saves no load, only time.
        others = (n for n in pool.nodes.values() if n is not node and n not in excluded)
        return not any(n.takes_new and fits(n) for n in others)

    def finish(node: Node, ahead: int) -> float:
        peers = list(pool.nodes.values())
        default_load = settings.default_load_seconds
        return estimate.finish_seconds(
            node, peers, model, expected, ahead, pool.clock(), default_load
        )

    def impatient() -> bool:
        return loop.time() >= spill_at

    def held(node: Node) -> bool:
        return estimate.probing(node, model, pool.clock())

    return Want(
        model,
        eligible,
        rank,
        excluded,
        recheck_at=spill_at,
        preferred=preferred,
        finish=finish,
        credit=settings.affinity_margin,
        min_gain=settings.min_gain,
        impatient=impatient,
        held=held,
        profile=(model, expected, excluded, preferred),
    )


def charge_wait(pool: Pool, want: Want, served: Node, waited: float) -> None:
    """A request waited ``waited`` seconds for a slot and is served on ``served``: each
    other candidate that must load its model, with a slot free and nothing busy to push out,
    could have loaded it meanwhile, and is charged that wait as the load's rent. Once the rent
    covers the load (less the wait it saves), the load is paid (``estimate.service_seconds``):
    waiting goes on no longer than loading would have taken, so a fleet under a queue that
    lasts uses its idle nodes, and a short burst does not load them (ski rental's rule).
    The node served, if it had to load the model, owes nothing now."""
    model = want.model
    if model is None:
        return
    now = pool.clock()
    if not served.is_resident(model):
        served.rent.pop(model, None)
    if waited < WAITED_SECONDS:  # it found a slot free: a wait of the choosing step alone
        return
    for node in pool.candidates(want):
        if node is served or not estimate.loading(node, model) or not node.has_slot_for(model):
            continue
        if not estimate.evicts_busy(node, model, now):
            estimate.charge_rent(node, model, waited, now)


def reason_of(pool: Pool, want: Want, node: Node) -> Reason:
    """Why the request went to ``node`` (``ollama_proxy_routing_decisions_total``):
    only_choice (no other candidate), affinity (its conversation's node), spill (the node must
    load the model while another candidate holds it), else fastest."""
    candidates = pool.candidates(want)
    if len(candidates) <= 1:
        return "only_choice"
    if want.preferred is not None and node.name == want.preferred:
        return "affinity"
    model = want.model
    cold = model is not None and not node.is_resident(model)
    if cold and any(n.is_resident(model or "") for n in candidates if n is not node):
        return "spill"
    return "fastest"


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
    """At debug level, one line per admitted request: where it went, why, among what, and
    each candidate's expected finish now (seconds, for a request first in line)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    candidates = pool.candidates(want)
    log.debug(
        "route id=%s model=%s node=%s why=%s reason=%s candidates=%s finish_s=%s queue_s=%.4f",
        request_id,
        want.model or "-",
        node.name,
        _why(pool, want, node),
        reason_of(pool, want, node),
        ",".join(n.name for n in candidates) or "-",
        _finishes(want, candidates),
        queue_wait,
    )


def _finishes(want: Want, candidates: list[Node]) -> str:
    if want.finish is None:
        return "-"
    return ",".join(f"{n.name}:{want.finish(n, 0):.3f}" for n in candidates) or "-"


def _why(pool: Pool, want: Want, node: Node) -> str:
    """resident (holds the model), on_disk (none in service holds it), spill (others hold it:
    loading it here finishes sooner, or the request waited past routing.spill_after), unknown
    (its list is not known yet), or any (no model)."""
    model = want.model
    if model is None:
        return "any"
    if node.models is None:
        return "unknown"
    if node.is_resident(model):
        return "resident"
    others = (n for n in pool.nodes.values() if n.takes_new and n not in want.exclude)
    return "spill" if any(n.is_resident(model) for n in others) else "on_disk"
