"""What a request will cost on a node: pure functions over live node state.

A request's *expected finish* on a node, in seconds from now, is

    wait for a slot  +  a cold load, if the node must load the model  +  generation

- **Wait.** Each slot frees when the request on it ends: a request admitted at ``started``
  with an expected duration ``expected`` ends at ``started + expected``; one that has run past
  that is expected to run on for as long again as it has overrun (it is a long one), and never
  less than a tenth of its expected duration. A free slot frees at 0. With the ``c`` slots'
  free times sorted, ``f[0] ≤ … ≤ f[c-1]``, and ``ahead`` requests to be served on the node
  before this one, each taking this request's service time ``D``, the request starts at
  ``f[ahead % c] + (ahead // c) * D`` (exact while every ``f`` is below ``D``: the slots then
  take turns).
- **Load.** None when the model is in memory. When a request in flight there is loading it,
  none either, but the request cannot start before that load is expected to end. Otherwise
  the node's own observed ``load_duration`` of it; else the other nodes' observed loads of it,
  scaled by how much slower this node generates than each (when both have been seen
  generating some model); else ``routing.default_load_seconds``.
- **Generation.** The expected completion tokens (the request's ``num_predict``,
  ``max_tokens``, ``max_completion_tokens`` or ``max_output_tokens``; else the mean
  ``eval_count`` seen for the model; else ``DEFAULT_TOKENS``) over the node's observed tokens
  per second for the model (from final chunks, or before its first from a stream's progress).
  A node never seen generating the model gets the median speed of the nodes that were (a
  neutral prior: it is neither shunned nor favoured, so it gets tried, one probe at a time:
  ``probing``), or ``DEFAULT_TOKENS_PER_SECOND`` when none was. A node's own speed is drawn
  toward that prior as it goes unused (``SPEED_HALF_LIFE``), so a node slow once is tried
  again.
- **Rent.** A load's expected time, less what requests waited while the node could have
  loaded it (``Node.rent``): once the queue has waited as long as the load takes, it is paid.

- **Overhead** (what a request held its slot beyond load and generation) is learned, shown in
  /-/nodes, and left out: measured on the proxy's side it carries the proxy's own noise, and a
  node it made look slower got no request to correct it (a restarted or added node starved).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from statistics import fmean, median
from typing import Any

from .pool import Node

DEFAULT_TOKENS = 256  # completion tokens expected of a model never seen answering
DEFAULT_TOKENS_PER_SECOND = 30.0  # speed expected of a model never seen generating anywhere
IN_USE_SECONDS = 60.0  # a model given a request this recently is in use, in flight or not
PROBE_SECONDS = 1.0  # an unknown node's probe holds it back at most this long (``probing``)
SPEED_HALF_LIFE = 300.0  # seconds unused over which a node's own speed weighs half
RENT_HALF_LIFE = 60.0  # seconds over which a load's rent (``Node.rent``) halves
OVERRUN_FLOOR = 0.1  # a request past its expected end still holds its slot this fraction longer
# Fields that bound a generation's length, by API family: Ollama's options, OpenAI's chat
# (old and new names), OpenAI's responses, Anthropic's messages (max_tokens too).
_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def requested_tokens(payload: dict[str, Any] | None) -> int | None:
    """The completion length the request asks for at most, when it names one (> 0)."""
    if payload is None:
        return None
    values = [_num_predict(payload.get("options"))]
    values += [payload.get(name) for name in _LIMIT_FIELDS]
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None  # Ollama's -1 (no limit) and -2 (fill the context) say nothing


def _num_predict(options: object) -> object:
    """Ollama's ``options.num_predict``. ``bodies.json_object`` gives a nested object as its
    members in order, and Go fills the options map so that the last key wins."""
    if isinstance(options, dict):
        return options.get("num_predict")
    if not isinstance(options, list):
        return None
    found = [m[1] for m in options if isinstance(m, tuple) and m[:1] == ("num_predict",)]
    return found[-1] if found else None


def expected_tokens(peers: Iterable[Node], model: str, requested: int | None) -> float:
    if requested is not None:
        return float(requested)
    seen = [n.eval_tokens[model] for n in peers if model in n.eval_tokens]
    return fmean(seen) if seen else float(DEFAULT_TOKENS)


def tokens_per_second(
    node: Node, peers: Iterable[Node], model: str, now: float | None = None
) -> float:
    """The node's speed for the model: its own, drawn toward the fleet's as it goes unused
    (given ``now``); the fleet's (the other nodes' median) when it has none."""
    own = node.tokens_per_second.get(model)
    prior = fleet_speed(node, peers, model)
    if not own:
        return prior if prior is not None else DEFAULT_TOKENS_PER_SECOND
    last = node.last_used.get(model)
    if prior is None or now is None or last is None or now <= last:
        return own
    kept = math.pow(0.5, (now - last) / SPEED_HALF_LIFE)  # seconds per token, blended
    return 1.0 / (kept / own + (1.0 - kept) / prior)


def fleet_speed(node: Node, peers: Iterable[Node], model: str) -> float | None:
    """The median of the other nodes' speeds for the model, None when none has one."""
    seen = [
        n.tokens_per_second[model]
        for n in peers
        if n is not node and n.tokens_per_second.get(model)
    ]
    return median(seen) if seen else None


def probing(node: Node, model: str, now: float) -> bool:
    """The node holds the model and has a request of it under way, but has never shown its
    speed for it (no final chunk, no stream's progress yet): that request is its probe, and
    it takes no other of the model until the probe shows it, or for at most PROBE_SECONDS,
    so an unknown node is neither flooded nor starved. A node that must load the model
    first is not held: the requests behind a load wait for it, and the estimate counts that.
    """
    if model in node.tokens_per_second or model in node.answered or not node.is_resident(model):
        return False
    started = [lease.started for lease in node.leases if lease.model == model]
    return bool(started) and now - min(started) < PROBE_SECONDS


def rent_seconds(node: Node, model: str, now: float) -> float:
    """The seconds requests for the model waited while this node could have loaded it
    (``Node.rent``), halved every RENT_HALF_LIFE since last charged."""
    seconds, at = node.rent.get(model, (0.0, now))
    return seconds * math.pow(0.5, max(0.0, now - at) / RENT_HALF_LIFE)


def charge_rent(node: Node, model: str, seconds: float, now: float) -> None:
    node.rent[model] = (rent_seconds(node, model, now) + seconds, now)


def revised_expected(started: float, now: float, done: float, total: float, speed: float) -> float:
    """A request's expected hold of its slot, once its stream shows its speed: the time so
    far and the tokens left at that speed."""
    return (now - started) + max(0.0, total - done) / speed


def loading(node: Node, model: str) -> bool:
    """The node must load the model first: not in memory, and no request there loading it."""
    return not node.is_resident(model) and not node.model_in_flight.get(model)


def load_seconds(node: Node, peers: Iterable[Node], model: str, default: float) -> float:
    own = node.load_seconds.get(model)
    if own is not None:
        return own
    scaled = [
        n.load_seconds[model] * slowness(node, n)
        for n in peers
        if n is not node and model in n.load_seconds
    ]
    return fmean(scaled) if scaled else default


def slowness(node: Node, other: Node) -> float:
    """How many times slower ``node`` generates than ``other``, over the models both were
    seen generating; 1 when there are none."""
    ratios = [
        other.tokens_per_second[m] / speed
        for m, speed in node.tokens_per_second.items()
        if speed > 0 and other.tokens_per_second.get(m)
    ]
    return fmean(ratios) if ratios else 1.0


def service_seconds(
    node: Node,
    peers: list[Node],
    model: str,
    tokens: float,
    default_load: float,
    now: float | None = None,
) -> float:
    """A slot's time for this request once it starts: a cold load if any, less the rent the
    queue paid for it (given ``now``), then generating."""
    load = 0.0
    if loading(node, model):
        load = load_seconds(node, peers, model, default_load)
        if now is not None:
            load = max(0.0, load - rent_seconds(node, model, now))
    # The learned overhead (``Node.overhead_seconds``) is left out: measured on the proxy's
    # side, it carries the proxy's own noise (a first connection, a loaded machine), and a
    # node it makes look slower gets no request to correct it, so it would starve.
    return load + tokens / tokens_per_second(node, peers, model, now)


def slot_free_times(node: Node, model: str, now: float) -> list[float]:
    """When each slot this model may use frees, in seconds from now, soonest first."""
    cap = node.config.max_concurrency
    leases = list(node.leases)
    model_cap = node.config.model_concurrency.get(model)
    if model_cap is not None and model_cap < cap:
        cap = model_cap  # its own slots: freed by its own requests only
        leases = [lease for lease in leases if lease.model == model]
    times = sorted(_remaining(lease.started, lease.expected, now) for lease in leases)
    times = [0.0] * max(0, cap - len(times)) + times
    return times[len(times) - cap :] if cap > 0 else [0.0]


def _remaining(started: float, expected: float, now: float) -> float:
    end = started + expected
    return max(end - now, now - end, OVERRUN_FLOOR * expected)


def first_free_seconds(node: Node, now: float) -> float:
    """Until one of the node's slots frees, for a request no model's cap holds back."""
    return slot_free_times(node, "", now)[0]


def wait_seconds(free_times: list[float], ahead: int, service: float) -> float:
    slots = len(free_times)
    return free_times[ahead % slots] + (ahead // slots) * service


def finish_seconds(
    node: Node,
    peers: list[Node],
    model: str,
    tokens: float,
    ahead: int,
    now: float,
    default_load: float,
) -> float:
    """Expected seconds from now until this request ends on ``node``, with ``ahead``
    requests to be served there before it."""
    service = service_seconds(node, peers, model, tokens, default_load, now)
    wait = wait_seconds(slot_free_times(node, model, now), ahead, service)
    return max(wait, _load_left(node, peers, model, now, default_load)) + service


def _load_left(node: Node, peers: list[Node], model: str, now: float, default: float) -> float:
    """While a request there is loading the model, until it is loaded (a free slot waits)."""
    if node.is_resident(model) or not node.model_in_flight.get(model):
        return 0.0
    load = load_seconds(node, peers, model, default)
    first = min((lease.started for lease in node.leases if lease.model == model), default=now)
    return max(0.0, first + load - now)


def evicts_busy(node: Node, model: str, now: float) -> bool:
    """Loading ``model`` may push out of memory a model that requests are using there: one
    with requests in flight, or given one within ``IN_USE_SECONDS`` (a model idle for a
    moment between requests is still in use, and evicting it means loading it back).

    Ollama unloads idle models first, so with ``max_loaded_models`` known, loading evicts one
    in use only when more must go than are idle. Unknown, any other model in memory or in use
    may be pushed out (memory decides, and the proxy does not know it).
    """
    if not loading(node, model):
        return False
    in_use = {m for m in node.model_in_flight if m != model and _in_use(node, m, now)}
    in_use |= {m for m in node.resident_models() if m != model and _in_use(node, m, now)}
    if not in_use:
        return False
    others = in_use | {m for m in node.resident_models() if m != model}
    capacity = node.config.max_loaded_models
    if capacity is None:
        return True
    return len(others) + 1 - capacity > len(others) - len(in_use)


def _in_use(node: Node, model: str, now: float) -> bool:
    if node.model_in_flight.get(model):
        return True
    last = node.last_used.get(model)
    return last is not None and now - last < IN_USE_SECONDS
