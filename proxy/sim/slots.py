"""Admission to generation: the node's parallel slots and the bounded queue before them."""

from __future__ import annotations

import asyncio
import contextlib
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
