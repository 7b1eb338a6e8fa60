"""The conversation → node table shared by the replicas, in Redis (``state.redis_url``).

A turn's node is recorded as ``SET state.key("affinity", key) node PX ttl`` (written behind
the answer, coalesced and bounded by ``shared_limits.WriteBehind``), and a turn that has a key
to look up asks Redis (one GET) before the pool chooses, so any replica sends turn N+1 where
turn N went. This replica's own table (``affinity.Affinity``) records every turn too: it
answers when Redis does not, or has no entry yet (a record still being written). A node
name another replica recorded that is not in this replica's config is ignored.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .affinity import Affinity
from .shared_limits import MAX_PENDING, WriteBehind, failures, taken
from .state import COMMAND_TIMEOUT, SharedState

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline


class SharedAffinity:
    def __init__(self, affinity: Affinity, state: SharedState, writes: WriteBehind) -> None:
        self.affinity = affinity
        self.state = state
        self._records: dict[bytes, str] = {}  # not yet sent: conversation key → node
        self._writes = writes
        writes.source(self._take)

    def _key(self, key: bytes) -> str:
        return self.state.key("affinity", key.hex())

    async def lookup(self, key: bytes) -> str | None:
        """The node that served the conversation last, by any replica (Redis's entry), else
        by this one; None when that node is not in this replica's config."""
        assert self.state.client is not None
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                node = await self.state.client.get(self._key(key))
        except failures() as exc:
            self.state.failed(exc)
            return self.affinity.lookup(key)
        if node is None:
            return self.affinity.lookup(key)
        name = node if isinstance(node, str) else node.decode("utf-8", "replace")
        return name if self.affinity.knows(name) else None

    def record(self, key: bytes, node: str) -> None:
        """In this replica's table, and queued for Redis's while it answers."""
        self.affinity.record(key, node)
        if not self.state.shared or self.affinity.entries <= 0 or self.affinity.ttl <= 0:
            return
        if key in self._records or len(self._records) < MAX_PENDING:
            self._records[key] = node
            self._writes.wake()

    def _take(self, pipe: Pipeline) -> None:
        ttl_ms = max(1, int(self.affinity.ttl * 1000))
        for key, node in taken(self._records, self._writes):
            pipe.set(self._key(key), node, px=ttl_ms)
