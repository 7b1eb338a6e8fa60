"""The node's models on disk (settings.models) and in memory (settings.resident): cold loads
shared by concurrent requests, and eviction of the least recently used to stay within
max_loaded. A model leaving memory takes its slots' KV caches with it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Iterator

from aiohttp import web

from ..models import display_name, normalize_model
from .settings import LiveNode
from .slots import PrefixCaches


class ModelMemory:
    """Which models the node has and holds in memory; the lists live in the node's settings."""

    def __init__(self, node: LiveNode) -> None:
        self._node = node
        self._loads: dict[str, asyncio.Task[None]] = {}  # cold loads in progress, by model
        # For max_loaded: generations in progress per model, and when each model was last used
        # (a tick of _use_clock; a model never used since it became resident counts as 0).
        self._users: Counter[str] = Counter()
        self._last_used: dict[str, int] = {}
        self._use_clock = itertools.count(1)
        self.caches = PrefixCaches(lambda: node.settings.num_parallel)

    # ---- on disk

    def has(self, name: str) -> bool:
        wanted = normalize_model(name)
        return any(normalize_model(model) == wanted for model in self._node.settings.models)

    def add(self, name: str) -> None:
        if not self.has(name):
            self._node.settings.models.append(display_name(name))

    def remove(self, name: str) -> None:
        settings = self._node.settings
        wanted = normalize_model(name)
        settings.models[:] = [m for m in settings.models if normalize_model(m) != wanted]
        settings.resident[:] = [m for m in settings.resident if normalize_model(m) != wanted]
        self._last_used.pop(wanted, None)
        self.caches.clear(wanted)

    # ---- in memory

    def is_resident(self, name: str) -> bool:
        wanted = normalize_model(name)
        return any(normalize_model(model) == wanted for model in self._node.settings.resident)

    def unload(self, name: str) -> None:
        """What ``ollama stop`` asks for: out of memory now, no generation, no slot."""
        settings = self._node.settings
        wanted = normalize_model(name)
        settings.resident[:] = [m for m in settings.resident if normalize_model(m) != wanted]
        self.caches.clear(wanted)
        self._node.changed()

    async def ensure_loaded(self, name: str) -> int:
        """Make the model resident; return the ns spent waiting for a cold load.

        Concurrent requests for the same cold model share one load, and the load goes on
        when they are cancelled (as in Ollama, whose scheduler finishes loading a model even
        when nobody waits for it any more).
        """
        if self.is_resident(name):
            return 0
        key = normalize_model(name)
        load = self._loads.get(key)
        if load is None:
            load = asyncio.create_task(self._load(name))
            self._loads[key] = load
            self._node.stats.cold_loads += 1
            self._node.changed()
        started = time.monotonic_ns()
        await asyncio.shield(load)
        return time.monotonic_ns() - started

    async def cancel_loads(self, _app: web.Application) -> None:
        for task in self._loads.values():
            task.cancel()
        self._loads.clear()

    async def _load(self, name: str) -> None:
        key = normalize_model(name)
        try:
            await asyncio.sleep(self._node.settings.load_delay)
            if not self.is_resident(key):
                self._node.settings.resident.append(display_name(name))
            self._touch(key)  # the newest in memory, even if every waiter has gone
            self._evict_over_limit()
            self._node.changed()
        finally:
            self._loads.pop(key, None)

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[None]:
        """Mark a model in use for the body (from its load to the last token): never evicted
        meanwhile, and the most recently used when it ends."""
        key = normalize_model(name)
        self._users[key] += 1
        self._touch(key)
        try:
            yield
        finally:
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]
            self._touch(key)
            self._evict_over_limit()  # room may have been waiting for this model to go idle

    def _touch(self, key: str) -> None:
        self._last_used[key] = next(self._use_clock)

    def _evict_over_limit(self) -> None:
        """Unload least recently used idle models until at most max_loaded are in memory."""
        limit = self._node.settings.max_loaded
        resident = self._node.settings.resident
        evicted = False
        while limit > 0 and len(resident) > limit:
            idle = [m for m in resident if normalize_model(m) not in self._users]
            if not idle:
                break  # every model is busy: the first to go idle is evicted then
            # min() keeps the first of equals: among models never used, the first listed.
            victim = min(idle, key=lambda m: self._last_used.get(normalize_model(m), 0))
            resident.remove(victim)
            self._last_used.pop(normalize_model(victim), None)
            self.caches.clear(normalize_model(victim))
            self._node.stats.evictions += 1
            evicted = True
        if evicted:
            self._node.changed()
