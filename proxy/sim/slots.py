"""Admission to generation: the node's parallel slots and the bounded queue before them, and
each slot's KV cache (the prompt it last processed)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class QueueFullError(Exception):
    pass


class SlotGate:
    """FIFO admission: capacity() generations at once, at most queue_limit() waiting.

    Both limits are read on every call so that tests can change them on a running node. A
    released slot is handed straight to the oldest waiter, so late arrivals cannot overtake.
    """

    def __init__(
        self,
        capacity: Callable[[], int],
        queue_limit: Callable[[], int],
        on_change: Callable[[], None],
    ) -> None:
        self._capacity = capacity
        self._queue_limit = queue_limit
        self._on_change = on_change
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.active = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if not self._waiters and self.active < self._capacity():
            self.active += 1
            self._on_change()
            return
        if len(self._waiters) >= self._queue_limit():
            raise QueueFullError
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._admit_waiters()  # capacity may have been raised since the last release
        self._on_change()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # we were handed a slot just as we were cancelled: pass it on
            else:
                self._forget(waiter)
            raise

    def release(self) -> None:
        self.active -= 1
        self._admit_waiters()
        self._on_change()

    def _admit_waiters(self) -> None:
        while self._waiters and self.active < self._capacity():
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter is skipped, not admitted
                waiter.set_result(None)
                self.active += 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):  # release() may have popped it already
            self._waiters.remove(waiter)
        self._on_change()


@dataclass
class Ticket:
    """A generation's claim on a slot; node_died tells a fault apart from a client leaving."""

    node_died: bool = False


class Slot:
    """One parallel slot of a loaded model: the text its KV cache holds, as llama.cpp keeps
    each slot's last sequence (prompt and reply) until another request overwrites it."""

    def __init__(self, pool: ModelSlots) -> None:
        self.cached = ""
        self.last_used = 0  # a tick of PrefixCaches' clock; 0 for never
        self.pool = pool  # the model's slots it belongs to (gone from PrefixCaches once cleared)


class ModelSlots:
    """A model's slots; the free ones grouped by the text they hold, least recently used first,
    so that choosing costs one comparison per distinct text, not one per slot (the benchmark's
    nodes have thousands of slots holding the same few prompts)."""

    def __init__(self) -> None:
        self.every: list[Slot] = []
        self.free: dict[str, deque[Slot]] = {}

    def add(self) -> None:
        slot = Slot(self)
        self.every.append(slot)
        self.free.setdefault("", deque()).appendleft(slot)  # never used: the least recently

    def take_best(self, prompt: str) -> Slot:
        """The free slot with the longest prefix of the prompt, the least recently used among
        equals."""

        def rank(text: str) -> tuple[int, int]:
            return shared_prefix(text, prompt), -self.free[text][0].last_used

        text = max(self.free, key=rank)
        slots = self.free[text]
        slot = slots.popleft()
        if not slots:
            del self.free[text]
        return slot


@dataclass
class Held:
    """A request's slot and how much of its prompt (in characters) the slot already held."""

    slot: Slot
    cached: int
    computed: int


class PrefixCaches:
    """Per loaded model, ``slots_per_model()`` slots (OLLAMA_NUM_PARALLEL), each remembering
    what it last processed. A request takes the free slot whose cache shares the longest
    prefix with its prompt (the least recently used among equals, as Ollama's runner does),
    and only the rest of the prompt is prefilled. Unloading a model drops its slots."""

    def __init__(self, slots_per_model: Callable[[], int]) -> None:
        self._per_model = slots_per_model
        self._models: dict[str, ModelSlots] = {}  # by normalised model name
        self._clock = itertools.count(1)

    def take(self, model: str, prompt: str) -> Held:
        pool = self._models.setdefault(model, ModelSlots())
        while len(pool.every) < self._per_model():
            pool.add()
        if not pool.free:  # num_parallel lowered while generations run: one slot more
            pool.add()
        slot = pool.take_best(prompt)
        # Even a prompt cached whole has its last token evaluated again (llama.cpp does).
        cached = min(shared_prefix(slot.cached, prompt), max(0, len(prompt) - 1))
        slot.cached = prompt[:cached]  # the rest is overwritten from here
        return Held(slot, cached, len(prompt) - cached)

    def release(self, held: Held) -> None:
        slot = held.slot
        slot.last_used = next(self._clock)
        slot.pool.free.setdefault(slot.cached, deque()).append(slot)

    def clear(self, model: str) -> None:
        self._models.pop(model, None)

    def cached_texts(self, model: str) -> list[str]:
        """What each slot of the model holds now (for tests)."""
        pool = self._models.get(model)
        return [slot.cached for slot in pool.every] if pool is not None else []


def shared_prefix(a: str, b: str) -> int:
    """How many leading characters two texts share (by bisection: slices compare in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low
