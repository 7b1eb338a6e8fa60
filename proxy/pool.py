"""Live node state and admission: who may take a request now, and who waits.

Nothing here awaits except a waiter in ``acquire``: choosing a node and counting the request on
it happen in one synchronous step, so two requests can never both see the last free slot. A
slot is given back exactly once, by ``Lease.release``, and handed straight to the first waiter
that can use it (first come, first served; a waiter that cannot use that node keeps its place).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .config import NodeConfig, QueueConfig
from .errors import Unavailable
from .telemetry import Usage

Eligible = Callable[["Node"], bool]
SPEED_SMOOTHING = 0.2  # weight of the newest answer in the moving average of tokens/s


def _any_node(node: Node) -> bool:
    return True


@dataclass(eq=False)
class Node:
    """One upstream: its current config and its live state, which survives reloads."""

    config: NodeConfig
    in_flight: int = 0  # requests holding a slot on this node now
    up: bool = True
    draining: bool = False  # takes no new requests; finishes what it has
    removed: bool = False  # gone from the config; kept until its last request ends
    checked: bool = False  # has had at least one active health check
    failures_in_row: int = 0  # consecutive failed checks or passive failures
    passes_in_row: int = 0  # consecutive passed checks
    recent_errors: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=10))
    # Per model, from the final chunks of its answers: generation speed (a moving average of
    # tokens per second) and the last model load time.
    tokens_per_second: dict[str, float] = field(default_factory=dict)
    resident_models: set[str] = field(default_factory=set)  # loaded in its memory, we believe
    load_seconds: dict[str, float] = field(default_factory=dict)

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
    def has_free_slot(self) -> bool:
        return self.in_flight < self.config.max_concurrency

    @property
    def load(self) -> float:
        return self.in_flight / (self.config.max_concurrency * self.config.weight)

    @property
    def last_error(self) -> str:
        return self.recent_errors[-1][1] if self.recent_errors else ""

    def record_error(self, message: str) -> None:
        self.recent_errors.append((time.time(), message))

    def record_usage(self, model: str, usage: Usage) -> None:
        speed = usage.tokens_per_second
        if speed is not None:
            previous = self.tokens_per_second.get(model, speed)
            self.tokens_per_second[model] = previous + SPEED_SMOOTHING * (speed - previous)
        if usage.load_seconds is not None:
            self.load_seconds[model] = usage.load_seconds


class Lease:
    """A slot on a node, held by one request; ``release`` is idempotent."""

    __slots__ = ("_pool", "node", "released")

    def __init__(self, pool: Pool | None, node: Node) -> None:
        self._pool = pool
        self.node = node
        self.released = False

    @classmethod
    def unmetered(cls, node: Node) -> Lease:
        """For a request that takes no slot: the same handle, nothing to give back."""
        return cls(None, node)

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self._pool is not None:
                self._pool._give_back(self.node)


@dataclass(eq=False)
class _Waiter:
    eligible: Eligible
    exclude: frozenset[Node]
    future: asyncio.Future[Lease] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Pool:
    def __init__(self, nodes: Iterable[NodeConfig], queue: QueueConfig) -> None:
        self.nodes: dict[str, Node] = {n.name: Node(n) for n in nodes}
        # Removed by a reload but still finishing requests: no new ones, still in metrics.
        self.retiring: list[Node] = []
        self.queue_config = queue
        self._waiters: deque[_Waiter] = deque()
        self._turn = itertools.count()  # rotates among equally loaded nodes

    # -- choosing ---------------------------------------------------------------------------

    def candidates(
        self, eligible: Eligible = _any_node, exclude: Iterable[Node] = ()
    ) -> list[Node]:
        """Nodes that take new requests and pass ``eligible``, ignoring their load."""
        skip = set(exclude)
        return [n for n in self.nodes.values() if n.takes_new and n not in skip and eligible(n)]

    def least_loaded(self, nodes: list[Node]) -> Node | None:
        """The node with the lowest load; ties rotate so equal nodes share the work."""
        if not nodes:
            return None
        lowest = min(n.load for n in nodes)
        tied = [n for n in nodes if n.load == lowest]
        return tied[next(self._turn) % len(tied)]

    def try_acquire(
        self, eligible: Eligible = _any_node, exclude: Iterable[Node] = ()
    ) -> Lease | None:
        """Choose and count in one step; None when every candidate is at its cap."""
        free = [n for n in self.candidates(eligible, exclude) if n.has_free_slot]
        node = self.least_loaded(free)
        if node is None:
            return None
        node.in_flight += 1
        return Lease(self, node)

    # -- waiting ----------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    async def acquire(self, eligible: Eligible = _any_node, exclude: Iterable[Node] = ()) -> Lease:
        """A slot now, or after waiting in the queue; raises Unavailable (503) otherwise."""
        excluded = frozenset(exclude)
        if not self._waiters:  # nobody ahead: no need to queue
            lease = self.try_acquire(eligible, excluded)
            if lease is not None:
                return lease
        if not self.candidates(eligible, excluded):
            raise Unavailable("no healthy node can serve this request", reason="no_node")
        if len(self._waiters) >= self.queue_config.max_size:
            raise Unavailable("the proxy's queue is full, please try again", reason="full")
        return await self._wait(_Waiter(eligible, excluded))

    async def _wait(self, waiter: _Waiter) -> Lease:
        self._waiters.append(waiter)
        self._dispatch()
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

    def _abandon(self, waiter: _Waiter) -> None:
        """Leave the queue at once; a slot granted in the same instant goes to the next."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            fut.result().release()
        else:
            fut.cancel()

    def _dispatch(self) -> None:
        """Hand free slots to waiters in arrival order; fail waiters no node can ever serve."""
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            lease = self.try_acquire(waiter.eligible, waiter.exclude)
            if lease is not None:
                self._waiters.remove(waiter)
                waiter.future.set_result(lease)
            elif not self.candidates(waiter.eligible, waiter.exclude):
                self._waiters.remove(waiter)
                waiter.future.set_exception(
                    Unavailable("no healthy node can serve this request", reason="no_node")
                )
            if not any(n.takes_new and n.has_free_slot for n in self.nodes.values()):
                break

    def _give_back(self, node: Node) -> None:
        node.in_flight -= 1
        if node.removed and node.in_flight == 0 and node in self.retiring:
            self.retiring.remove(node)
        self._dispatch()

    def all_nodes(self) -> list[Node]:
        return [*self.nodes.values(), *self.retiring]

    def reconfigure(self, configs: Iterable[NodeConfig], queue: QueueConfig) -> list[Node]:
        """Swap in a new node list; return the added nodes (down until their first check).

        A node that stays (same name and URL) keeps its health and in-flight count and takes
        its new cap at once. A removed node takes nothing new and retires when its last
        request ends.
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
                if node.in_flight:
                    self.retiring.append(node)
        self.nodes = kept
        self._dispatch()
        return added

    def changed(self) -> None:
        """Call after health, drain or config changes: waiters may now be served or failed."""
        self._dispatch()

    def any_node(self, eligible: Eligible = _any_node, exclude: Iterable[Node] = ()) -> Node | None:
        """A node for a request that takes no slot (listings, management): least loaded."""
        return self.least_loaded(self.candidates(eligible, exclude))
