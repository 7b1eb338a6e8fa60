"""Background work, kept and supervised: one node's bad answer never ends a loop.

Every task the proxy starts outside a request lives in a ``Tasks`` set: kept, so that nothing
collects it halfway; watched, so that its failure is logged rather than lost; and cancelled and
awaited by ``aclose`` at shutdown, so that none is left pending when the event loop ends.

``every`` runs a loop's body once per interval until the loop is cancelled, and ``for_each``
does one thing to every node at once. Neither lets an unexpected exception end the work: it is
logged with its traceback the first time it is seen (by where it was raised, and for which
node), at debug level after that, so a node that answers badly every round floods nothing.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable
from typing import Any

from .pool import Node

log = logging.getLogger("ollama_proxy.supervision")


class Once:
    """Remembers what was reported already."""

    def __init__(self) -> None:
        self._seen: set[Hashable] = set()

    def first(self, *key: Hashable) -> bool:
        """True the first time ``key`` is seen, False after that."""
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


class Tasks:
    """The proxy's background tasks: each kept until it ends, all ended by ``aclose``."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        if self._closed:  # shutting down: a late request's refresh is not worth starting
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._running.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    async def aclose(self) -> None:
        self._closed = True
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def every(
    interval: Callable[[], float], body: Callable[[], Awaitable[None]], what: str
) -> None:
    """Wait ``interval()`` seconds (read each round: reloadable), run ``body``; until cancelled."""
    reported = Once()
    while True:
        await asyncio.sleep(interval())
        try:
            await body()
        except Exception as exc:
            _report(reported, exc, what)


async def for_each(
    nodes: Iterable[Node], action: Callable[[Node], Awaitable[None]], what: str, reported: Once
) -> None:
    """``action`` on every node at once; one node's failure is logged and ends only its own."""

    async def guarded(node: Node) -> None:
        try:
            await action(node)
        except Exception as exc:
            _report(reported, exc, f"{what} of node {node.name}", node.name)

    await asyncio.gather(*(guarded(node) for node in nodes))


def _report(reported: Once, exc: Exception, what: str, *key: Hashable) -> None:
    if reported.first(*key, *_raised_at(exc)):
        log.error("%s failed; it goes on as usual", what, exc_info=exc)
    else:
        log.debug("%s failed again: %s: %s", what, type(exc).__name__, exc)


def _raised_at(exc: Exception) -> tuple[str, str, int]:
    """The exception's type and the line that raised it: the same bug, whatever its message."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return type(exc).__qualname__, last.filename if last else "", (last.lineno or 0) if last else 0
