"""Live node state and admission: who may take a request now, and who waits.

Nothing here awaits except a waiter in ``acquire``: choosing a node and counting the request on
it happen in one synchronous step, so two requests can never both see the last free slot. A
slot is given back exactly once, by ``Lease.release``, and handed straight to the next waiter
that can use it and is best served there: waiters are served by tenant in weighted fair order
(``fairshare.py``), first come first served within one tenant; a waiter that cannot use that
node keeps its place, and so does one whose tenant holds all the slots it may
(``Tenant.max_concurrency``), and one that expects to finish sooner on a busy node (it then
counts as ahead of the later waiters there, so they spread over the other nodes). Fairness
decides which waiter, the estimate which node. Requests that take no slot wait in a queue of
their own, first come first served.

What a request may use, and how its nodes compare, is a ``Want``, built by the routing policy
(``routing.py``); the pool only applies it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from .config import NodeConfig, QueueConfig
from .errors import RateLimited, Unavailable
from .fairshare import OPEN, FairQueue, Tenant
from .telemetry import Usage

SPEED_SMOOTHING = 0.2  # weight of the newest answer in the moving averages
RECHECK_SECONDS = 0.1  # while a free slot is passed over, how often waiters look again
# Expected finishes within this fraction of the best are equal (the least loaded goes first).
EQUAL_COST = 0.1
PLAN_LIMIT = 64  # waiters one dispatch walk plans onto busy nodes before it stops


@dataclass(eq=False)
class Node:
    """One upstream: its current config and its live state, which survives reloads."""

    config: NodeConfig
    in_flight: int = 0  # requests holding a slot on this node now
    # Requests that take no slot (model information, unknown paths) on this node now: capped
    # apart (queue.max_other_per_node), so they neither wait behind generations nor flood it.
    other_in_flight: int = 0
    model_in_flight: dict[str, int] = field(default_factory=dict)  # the same, per model
    up: bool = True
    draining: bool = False  # takes no new requests; finishes what it has
    removed: bool = False  # gone from the config; kept until its last request ends
    checked: bool = False  # has had at least one active health check
    # Active and passive evidence are counted apart (as Caddy's hosts do): a passing check says
    # nothing of the generations failing meanwhile, and a failed request is not a failed check.
    check_passes_in_row: int = 0
    check_failures_in_row: int = 0
    request_failures_in_row: int = 0  # reset by a request served well, and by an ejection
    ejections: int = 0  # times in a row failing requests took it out
    ejected_until: float = 0.0  # monotonic time before which passing checks cannot restore it
    recent_errors: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=10))
    # What the node holds: models on disk (None until first listed) and models in memory
    # with the wall-clock time they expire (from /api/ps, and from its own answers).
    models: set[str] | None = None
    resident: dict[str, float] = field(default_factory=dict)
    # Each listed model's digest (from /api/tags): the response cache's key names it, so a
    # model re-pulled or re-created there replays none of its old answers.
    digests: dict[str, str] = field(default_factory=dict)
    version: str | None = None
    # Per model, from the final chunks of its answers: generation speed (a moving average of
    # tokens per second) and the last model load time.
    tokens_per_second: dict[str, float] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)  # cold loads only
    eval_tokens: dict[str, float] = field(default_factory=dict)  # mean eval_count
    # What a request's time on the node takes beyond load and generation (prompt evaluation,
    # the first token, relaying, a node slower than it reports): a moving average, seconds.
    overhead_seconds: dict[str, float] = field(default_factory=dict)
    # Slot leases held now, with when each started and how long it was expected to take:
    # when this node's slots free (``estimate.py``).
    leases: set[Lease] = field(default_factory=set)
    # Slots counted as the other replicas' (``leases.py``; 0 without Redis): the whole cap
    # while Redis last said the node is full fleet-wide, their shares while it does not answer.
    elsewhere: int = 0
    model_elsewhere: dict[str, int] = field(default_factory=dict)  # the same, per model
    last_used: dict[str, float] = field(default_factory=dict)  # model → its last slot's start
    # Models it has answered (a final chunk, or a 200 without one): its figures for them are
    # its own; a speed from a stream's progress before that is provisional.
    answered: set[str] = field(default_factory=set)
    # Per model it must load: the seconds requests for it waited in the queue while this node
    # could have loaded it, decayed, and when last charged (the load's "rent", estimate.py).
    rent: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def takes_new(self) -> bool:
        return self.up and not self.draining and not self.removed

    @property
    def busy(self) -> bool:
        """Some request is on this node now, with a slot or without."""
        return bool(self.in_flight or self.other_in_flight)

    @property
    def load(self) -> float:
        return self.in_flight / (self.config.max_concurrency * self.config.weight)

    def has_slot_for(self, model: str | None) -> bool:
        if self.in_flight + self.elsewhere >= self.config.max_concurrency:
            return False
        cap = self.config.model_concurrency.get(model) if model else None
        if cap is None:
            return True
        model = model or ""
        return self.model_in_flight.get(model, 0) + self.model_elsewhere.get(model, 0) < cap

    def has_model(self, model: str) -> bool:
        """On disk here, or not yet known (a node not listed yet may have anything)."""
        return self.models is None or model in self.models

    def is_resident(self, model: str) -> bool:
        expires = self.resident.get(model)
        return expires is not None and expires > time.time()

    def resident_models(self) -> list[str]:
        now = time.time()
        return sorted(m for m, expires in self.resident.items() if expires > now)

    @property
    def last_error(self) -> str:
        return self.recent_errors[-1][1] if self.recent_errors else ""

    def record_error(self, message: str) -> None:
        self.recent_errors.append((time.time(), message))

    def record_usage(
        self, model: str, usage: Usage, cold: bool = False, held: float | None = None
    ) -> None:
        """Learn from a final chunk; ``cold``: the model was loaded for it (Ollama reports
        a few milliseconds of load_duration on every answer, a load only on a cold one);
        ``held``: the seconds its request held the slot."""
        if usage.tokens_per_second is not None:
            if model not in self.answered:  # the node's own report replaces a provisional one
                self.tokens_per_second.pop(model, None)
            _smooth(self.tokens_per_second, model, usage.tokens_per_second)
        self.answered.add(model)
        if usage.completion_tokens > 0:
            _smooth(self.eval_tokens, model, usage.completion_tokens)
        load = usage.load_seconds if cold and usage.load_seconds is not None else 0.0
        if cold and usage.load_seconds is not None:
            _smooth(self.load_seconds, model, usage.load_seconds)
        if held is not None and usage.eval_seconds > 0:
            _smooth(self.overhead_seconds, model, max(0.0, held - load - usage.eval_seconds))

    def record_progress(self, model: str, tokens_per_second: float) -> bool:
        """A speed read from a stream under way; taken while the node has not answered
        for the model yet (a final chunk's own figures are exact). True when taken."""
        if model in self.answered or tokens_per_second <= 0:
            return False
        self.tokens_per_second[model] = tokens_per_second
        return True


def _smooth(averages: dict[str, float], model: str, value: float) -> None:
    """A moving average: the newest value weighs SPEED_SMOOTHING."""
    previous = averages.get(model, value)
    averages[model] = previous + SPEED_SMOOTHING * (value - previous)


def _any_node(node: Node) -> bool:
    return True


def _same_rank(node: Node) -> int:
    return 0


def _never() -> bool:
    return False


def _not_held(node: Node) -> bool:
    return False


@dataclass(frozen=True, eq=False)
class Want:
    """What one request needs of a node, and how to tell the node that serves it best."""

    model: str | None = None  # counted against per-model caps
    eligible: Callable[[Node], bool] = _any_node  # may this node serve it at all?
    rank: Callable[[Node], int] = _same_rank  # lower first among equal finishes
    exclude: frozenset[Node] = frozenset()  # nodes that already failed this request
    # When ``eligible`` may start to accept more nodes without any slot being freed.
    recheck_at: float | None = None  # loop time
    # The node that served this conversation's last turn (scheduling: conversation affinity),
    # by name; None when the request is not a known conversation's.
    preferred: str | None = None
    # Expected seconds until the request would end on a node, with so many requests to be
    # served there before it (``estimate.py``); None: least loaded first.
    finish: Callable[[Node, int], float] | None = None
    credit: float = 0.0  # seconds taken off the preferred node's finish (affinity)
    min_gain: float = 0.0  # a free slot is passed over only to finish this fraction sooner
    impatient: Callable[[], bool] = _never  # waited long enough: the best free slot now
    # A node that takes no more such requests for now though it has a free slot (its probe
    # is under way, ``estimate.probing``); it stays a candidate, and one to wait for.
    held: Callable[[Node], bool] = _not_held
    # Wants of equal profile see the same candidates (once equally impatient) and finishes at
    # one instant: eligibility and estimate depend on nothing else. None: none is equal.
    profile: object = None

    def without(self, nodes: Iterable[Node]) -> Want:
        return replace(self, exclude=frozenset(nodes))


ANY = Want()


class Lease:
    """A place on a node, held by one request: a slot, or for a request that takes none one
    of the node's places for those (``slot`` False); ``release`` is idempotent."""

    __slots__ = (
        "_pool",
        "charged",
        "expected",
        "model",
        "node",
        "released",
        "slot",
        "started",
        "tenant",
    )

    def __init__(
        self,
        pool: Pool,
        node: Node,
        model: str | None = None,
        slot: bool = True,
        tenant: Tenant | None = None,  # counted against its max_concurrency while held
        expected: float = 0.0,  # seconds it is expected to hold the slot
    ) -> None:
        self._pool = pool
        self.node = node
        self.model = model
        self.slot = slot
        self.tenant = tenant
        self.released = False
        self.charged = False  # its tenant's fair-share tag was moved on for it (it waited)
        self.started = pool.clock()
        self.expected = expected

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._pool._give_back(self)


@dataclass(frozen=True)
class _Choice:
    node: Node | None  # take a slot here now
    target: Node | None  # where it would finish first (it waits for this one otherwise)
    passed_over: bool = False  # a free slot it could take, declined for a busy node


class _Walk:
    """Candidates and expected finishes, worked out once per ``Want.profile`` (and node and
    requests ahead) while one dispatch walks the queue: state does not change meanwhile."""

    def __init__(self) -> None:
        self._nodes: dict[tuple[object, bool], tuple[list[Node], list[Node]]] = {}
        self._finish: dict[tuple[object, Node, int], float] = {}

    def nodes(self, want: Want, pool: Pool) -> tuple[list[Node], list[Node]]:
        """The candidates, and those of them with a free slot for the request that are not
        held back (``Want.held``; never the only candidate, nor for an impatient request)."""
        impatient = want.impatient()
        key = (want.profile, impatient)  # past its wait, more nodes may be eligible
        found = self._nodes.get(key)
        if found is None or want.profile is None:
            nodes = pool.candidates(want)
            free = [n for n in nodes if n.has_slot_for(want.model)]
            if len(nodes) > 1 and not impatient:  # with one node, holding back gains nothing
                free = [n for n in free if not want.held(n)]
            found = self._nodes[key] = nodes, free
        return found

    def held(self, want: Want, pool: Pool) -> bool:
        """Some candidate has a free slot for the request but is held back for now."""
        nodes, free = self.nodes(want, pool)
        return any(n not in free and n.has_slot_for(want.model) for n in nodes)

    def finish(self, want: Want, node: Node, ahead: int) -> float:
        assert want.finish is not None
        key = (want.profile, node, ahead)
        value = self._finish.get(key)
        if value is None or want.profile is None:
            value = self._finish[key] = want.finish(node, ahead)
        return value


@dataclass(eq=False)
class _Waiter:
    want: Want
    body_bytes: int  # the request's body, held while it waits
    slot: bool  # waits for a slot, or for a place for a request that takes none
    tenant: Tenant = OPEN
    queued: bool = False  # in its queue (its future may be cancelled before it leaves)
    future: asyncio.Future[Lease] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Pool:
    def __init__(self, nodes: Iterable[NodeConfig], queue: QueueConfig) -> None:
        self.nodes: dict[str, Node] = {n.name: Node(n) for n in nodes}
        # Removed by a reload but still finishing requests: no new ones, still in metrics.
        self.retiring: list[Node] = []
        self.queue_config = queue
        self._waiters: FairQueue[_Waiter] = FairQueue()  # for slots, by tenant
        self._other_waiters: deque[_Waiter] = deque()  # for requests that take no slot
        self.queued_body_bytes = 0  # bodies held by the waiters, against max_body_bytes
        self._turn = itertools.count()  # rotates among equally loaded nodes
        self.clock: Callable[[], float] = time.monotonic  # for leases' ages and estimates
        self._recheck: asyncio.TimerHandle | None = None  # passed-over slots looked at again
        self.on_change: list[Callable[[], None]] = []  # told of each changed() (the dashboard)
        self.replicas = 1  # each cap divided among so many replicas (Redis down: leases.py)

    def all_nodes(self) -> list[Node]:
        return [*self.nodes.values(), *self.retiring]

    # -- choosing ---------------------------------------------------------------------------

    def candidates(self, want: Want = ANY) -> list[Node]:
        """Nodes that take new requests and may serve ``want``, whatever their load."""
        return [
            n
            for n in self.nodes.values()
            if n.takes_new and n not in want.exclude and want.eligible(n)
        ]

    def best(self, nodes: list[Node], want: Want = ANY) -> Node | None:
        """The best-ranked, least-loaded node; ties rotate so equal nodes share the work."""
        return self._lowest(nodes, want, {})

    def _lowest(self, nodes: list[Node], want: Want, cost: dict[Node, float]) -> Node | None:
        """The lowest cost, then rank, then load; ties rotate. Costs within EQUAL_COST of the
        lowest are ties: learned speeds carry noise, and equal nodes must share the work
        rather than one of them take all that its slots hold."""
        if cost and len(nodes) > 1:
            lowest_cost = min(cost[n] for n in nodes)
            bound = lowest_cost + EQUAL_COST * max(lowest_cost, 0.0) + 1e-6
            nodes = [n for n in nodes if cost[n] <= bound]
        if len(nodes) <= 1:
            return nodes[0] if nodes else None
        keys = [(want.rank(n), n.load) for n in nodes]
        lowest = min(keys)
        tied = [n for n, key in zip(nodes, keys, strict=True) if key == lowest]
        return tied[next(self._turn) % len(tied)]

    def try_acquire(
        self, want: Want = ANY, slot: bool = True, claims: dict[Node, int] | None = None
    ) -> Lease | None:
        """Choose and count in one step; None when every candidate is at its cap, or when the
        request had better wait for a busy node (``_choose``). ``claims``: requests ahead of
        this one that wait for each node."""
        if not slot:
            return self._try_other(want)
        node = self._choose(want, claims or {}).node
        return None if node is None else self._count(node, want)

    def _count(self, node: Node, want: Want) -> Lease:
        expected = want.finish(node, 0) if want.finish is not None else 0.0
        node.in_flight += 1
        if want.model is not None:
            node.model_in_flight[want.model] = node.model_in_flight.get(want.model, 0) + 1
        lease = Lease(self, node, want.model, expected=expected)
        node.leases.add(lease)
        if want.model is not None:
            node.last_used[want.model] = lease.started
        return lease

    def _choose(self, want: Want, claims: dict[Node, int], walk: _Walk | None = None) -> _Choice:
        """Where the request goes now, if anywhere, and the node it would finish on first.

        Without an estimate: the best-ranked, least-loaded node with a free slot. With one:
        the node of lowest expected finish (the preferred node's less ``want.credit``) when it
        has a free slot; else the best free one, unless waiting for the best saves more than
        ``want.min_gain`` of the free one's time and the request is not ``want.impatient``.
        A node ``want.held`` back (an unknown node's probe under way) counts as busy.
        ``walk``: what was worked out for waiters of the same ``Want.profile`` in this walk.
        """
        walk = walk if walk is not None and want.profile is not None else _Walk()
        nodes, free = walk.nodes(want, self)
        if want.finish is None:
            return _Choice(self.best(free, want), None)
        finish = {n: walk.finish(want, n, claims.get(n, 0)) for n in nodes}
        cost = {
            n: t - (want.credit if n.name == want.preferred else 0.0) for n, t in finish.items()
        }
        target = self._lowest(nodes, want, cost)
        if target is None or target in free:
            return _Choice(target, target)
        pick = self._lowest(free, want, cost)
        if pick is None:  # held back nodes are looked at again, as their holds end with time
            return _Choice(None, target, passed_over=walk.held(want, self))
        if want.impatient() or cost[pick] - cost[target] <= want.min_gain * finish[pick]:
            return _Choice(pick, target)
        return _Choice(None, target, passed_over=True)

    def _try_other(self, want: Want) -> Lease | None:
        cap = self.queue_config.max_other_per_node
        node = self.best([n for n in self.candidates(want) if n.other_in_flight < cap], want)
        if node is None:
            return None
        node.other_in_flight += 1
        return Lease(self, node, slot=False)

    def _has_room(self, slot: bool) -> bool:
        """Some node takes requests and has a place of this kind free."""
        cap = self.queue_config.max_other_per_node
        if slot:
            return any(n.takes_new and n.has_slot_for(None) for n in self.nodes.values())
        return any(n.takes_new and n.other_in_flight < cap for n in self.nodes.values())

    # -- waiting ----------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiters) + len(self._other_waiters)

    def waiting_for(self, node: Node) -> int:
        """Queued requests this node could take (for /-/nodes; not on the request path)."""
        waiters = (*self._waiters.waiters(), *self._other_waiters)
        return sum(1 for w in waiters if node not in w.want.exclude and w.want.eligible(node))

    def tenants(self) -> dict[str, tuple[int, int]]:
        """Tenant name → (slots it holds, its requests waiting for one), while either is not
        zero."""
        return self._waiters.counts()

    async def acquire(
        self, want: Want = ANY, body_bytes: int = 0, *, slot: bool = True, tenant: Tenant = OPEN
    ) -> Lease:
        """A slot now, or after waiting in the queue; raises Unavailable (503) otherwise, or
        RateLimited (429) when ``tenant`` already has ``max_queued`` requests waiting.

        ``body_bytes``, the request's body, counts against ``queue.max_body_bytes`` while
        it waits: a request that would take the queued bodies past it is not queued. With
        ``slot`` False, a place for a request that takes no slot, from a queue of its own
        (and not counted for the tenant).
        """
        if not self._queue(slot) and (not slot or self._waiters.may_hold(tenant)):
            lease = self.try_acquire(want, slot)  # nobody ahead: no need to queue
            if lease is not None:
                return self._holding(lease, tenant)
        if not self.candidates(want):
            raise Unavailable("no healthy node can serve this request", reason="no_node")
        if slot and not self._waiters.may_queue(tenant):
            raise RateLimited(
                "too many of this key's requests are waiting, please try again",
                reason="concurrency",
                retry_after=1,
            )
        if self.queue_depth >= self.queue_config.max_size:
            raise Unavailable("the proxy's queue is full, please try again", reason="full")
        if self.queued_body_bytes + body_bytes > self.queue_config.max_body_bytes:
            raise Unavailable(
                "the proxy's queue holds too many request bytes, please try again",
                reason="body_bytes",
            )
        return await self._wait(_Waiter(want, body_bytes, slot, tenant))

    def _queue(self, slot: bool) -> FairQueue[_Waiter] | deque[_Waiter]:
        return self._waiters if slot else self._other_waiters

    def _holding(self, lease: Lease, tenant: Tenant) -> Lease:
        if lease.slot:
            lease.tenant = tenant
            self._waiters.holding(tenant)
        return lease

    async def _wait(self, waiter: _Waiter) -> Lease:
        if waiter.slot:
            self._waiters.push(waiter.tenant, waiter)
        else:
            self._other_waiters.append(waiter)
        waiter.queued = True
        self.queued_body_bytes += waiter.body_bytes
        self._dispatch()
        recheck = None
        if waiter.want.recheck_at is not None:
            recheck = asyncio.get_running_loop().call_at(waiter.want.recheck_at, self._dispatch)
        try:
            async with asyncio.timeout(self.queue_config.timeout):
                return await waiter.future
        except TimeoutError:
            self._abandon(waiter)
            raise Unavailable(
                "timed out waiting for a free node, please try again",
                retry_after=max(1, round(self.queue_config.timeout / 10)),
                reason="timeout",
            ) from None
        except BaseException:  # the client left (cancelled) or no node can serve it
            self._abandon(waiter)
            raise
        finally:
            if recheck is not None:
                recheck.cancel()

    def _abandon(self, waiter: _Waiter) -> None:
        """Leave the queue at once; a slot granted in the same instant goes to the next, and
        its tenant is not charged for it."""
        if waiter.queued:
            self._leave(waiter)
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            if waiter.slot:
                self._waiters.refund(waiter.tenant)
            fut.result().release()
        else:
            fut.cancel()

    def _dispatch(self) -> None:
        """Hand free places to waiters: slots in fair order, other places in arrival order."""
        self._dispatch_slots()
        self._dispatch_others()

    def _dispatch_slots(self) -> None:
        while self._has_room(slot=True) and self._grant_next():
            pass

    def _grant_next(self) -> bool:
        """A free slot to the first waiter in fair order that can use one and is best served
        there. The others keep their places (their Want cannot use the free node, or they
        finish sooner by waiting for a busy one, which then counts them as ahead of the next
        waiters), or fail when no node can serve them at all. False when none took one."""
        unservable: list[_Waiter] = []
        granted = None
        claims: dict[Node, int] = {}
        walk = _Walk()  # nothing changes during the walk: what one waiter learned, others use
        passed_over = False
        for waiter in self._waiters.in_turn():
            if waiter.future.done():
                continue  # cancelled, leaving
            choice = self._choose(waiter.want, claims, walk)
            if choice.node is not None:
                granted = waiter, self._count(choice.node, waiter.want)
                break
            if choice.target is not None:
                claims[choice.target] = claims.get(choice.target, 0) + 1
                if sum(claims.values()) >= PLAN_LIMIT:
                    break  # deeper waiters would wait longer still: served as these go
            passed_over |= choice.passed_over
            if not walk.nodes(waiter.want, self)[0]:
                unservable.append(waiter)
        for waiter in unservable:  # once the walk is over: it leaves the queues alone
            self._fail_if_unservable(waiter)
        if granted is None:
            if passed_over:
                self._recheck_soon()
            return False
        waiter, lease = granted
        lease.tenant = waiter.tenant
        lease.charged = True
        self._waiters.served(waiter.tenant)  # first: its share is kept while it holds one
        self._leave(waiter)
        waiter.future.set_result(lease)
        return True

    def _recheck_soon(self) -> None:
        """A free slot was passed over for a busy node: look again shortly, as estimates move
        with time (a request that runs past its expected end is expected to run on)."""
        if self._recheck is None or self._recheck.cancelled():
            loop = asyncio.get_running_loop()
            self._recheck = loop.call_later(RECHECK_SECONDS, self._rechecked)

    def _rechecked(self) -> None:
        self._recheck = None
        self._dispatch()

    def _dispatch_others(self) -> None:
        for waiter in list(self._other_waiters):
            if waiter.future.done():
                continue
            lease = self.try_acquire(waiter.want, slot=False)
            if lease is not None:
                self._leave(waiter)
                waiter.future.set_result(lease)
            else:
                self._fail_if_unservable(waiter)
            if not self._has_room(slot=False):
                break

    def _fail_unservable(self) -> None:
        """Fail every waiter that no node taking requests could serve now."""
        for waiter in [*self._waiters.waiters(), *self._other_waiters]:
            if not waiter.future.done():
                self._fail_if_unservable(waiter)

    def _fail_if_unservable(self, waiter: _Waiter) -> None:
        if not self.candidates(waiter.want):
            self._leave(waiter)
            waiter.future.set_exception(
                Unavailable("no healthy node can serve this request", reason="no_node")
            )

    def _leave(self, waiter: _Waiter) -> None:
        if waiter.slot:
            self._waiters.remove(waiter.tenant, waiter)
        else:
            self._other_waiters.remove(waiter)
        waiter.queued = False
        self.queued_body_bytes -= waiter.body_bytes

    def _give_back(self, lease: Lease) -> None:
        node = lease.node
        if not lease.slot:
            node.other_in_flight -= 1
        else:
            node.in_flight -= 1
            node.leases.discard(lease)
            if lease.model is not None:
                node.model_in_flight[lease.model] -= 1
            if lease.tenant is not None:
                self._waiters.released(lease.tenant)
        if node.removed and not node.busy and node in self.retiring:
            self.retiring.remove(node)
        self._dispatch()

    def changed(self) -> None:
        """Call after health, drain or config changes: waiters may now be served or failed."""
        self._fail_unservable()
        self._dispatch()
        for listener in self.on_change:
            listener()

    def reconfigure(self, configs: Iterable[NodeConfig], queue: QueueConfig) -> list[Node]:
        """Swap in a new node list; return the added nodes (down until their first check).

        A node that stays (same name and URL) keeps its health, in-flight count and model
        inventory and takes its new caps at once. A removed node takes nothing new and
        retires when its last request ends.
        """
        self.queue_config = queue
        kept: dict[str, Node] = {}
        added: list[Node] = []
        for config in configs:
            node = self.nodes.get(config.name)
            if node is not None and node.url == config.url:
                node.config = config
            else:
                node = Node(config, up=False)
                added.append(node)
            kept[config.name] = node
        for node in self.nodes.values():
            if kept.get(node.name) is not node:
                node.removed = True
                if node.busy:
                    self.retiring.append(node)
        self.nodes = kept
        if self.replicas > 1:  # the new caps divided as the old ones were
            for node in kept.values():
                _divide(node, self.replicas)
        self.changed()
        return added

    # -- other replicas (``leases.py``) -----------------------------------------------------

    def full_elsewhere(
        self, node: Node, model: str | None = None, tenant: Tenant | None = None
    ) -> None:
        """Redis refused a slot: the node (its model, when given, or the tenant) is full
        fleet-wide. Its waiters keep waiting until ``forget_elsewhere``."""
        if tenant is not None:
            self._waiters.elsewhere[tenant.name] = tenant.max_concurrency or 0
        elif model is not None:
            node.model_elsewhere[model] = node.config.model_concurrency.get(model, 0)
        else:
            node.elsewhere = node.config.max_concurrency

    def refused(self, lease: Lease) -> None:
        """Redis refused the slot fleet-wide: given back, its tenant not charged for it (its
        request waits again, its key's turn not spent)."""
        if lease.charged and lease.tenant is not None:
            self._waiters.refund(lease.tenant)
        lease.release()

    def forget_elsewhere(self) -> None:
        """A slot freed somewhere in the fleet: what was full may not be; waiters try again
        (within this replica's share of each cap, while caps are divided)."""
        for node in self.all_nodes():
            _divide(node, self.replicas)
        self._waiters.elsewhere.clear()
        self.changed()

    def divide(self, replicas: int) -> None:
        """Serve on this replica's share of every cap (node, model, tenant): the cap divided
        by ``replicas``, rounded down, at least 1; 1: whole caps again, no marks."""
        self.replicas = self._waiters.replicas = replicas
        self._waiters.elsewhere.clear()
        for node in self.all_nodes():
            _divide(node, replicas)
        self.changed()


def _others_share(cap: int, replicas: int) -> int:
    """Of ``cap``, the slots left to the other replicas: this one keeps cap // replicas, at
    least 1 (so every replica serves, and the fleet stays under the cap whenever it is at
    least the number of replicas)."""
    return cap - max(1, cap // replicas) if replicas > 1 else 0


def _divide(node: Node, replicas: int) -> None:
    node.elsewhere = _others_share(node.config.max_concurrency, replicas)
    caps = node.config.model_concurrency.items()
    node.model_elsewhere = {m: _others_share(cap, replicas) for m, cap in caps if replicas > 1}
