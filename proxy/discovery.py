"""What each node holds: models on disk and models in memory, kept up to date.

Each node's ``/api/tags`` (on disk) and ``/api/ps`` (in memory, with ``expires_at``) are read
on a timer, after the node recovers, and after the proxy itself changed what it holds (a pull,
a create, a copy, a delete, or a cold load that may have pushed another model out). Between
two readings the proxy's own traffic keeps the picture current: a node that just answered for
a model holds it in memory.

A listing is taken for what is well formed in it: an entry without a model name is skipped, an
unreadable ``expires_at`` means the default keep-alive, and an answer that is no listing at all
leaves what the proxy knew of the node as it was. Each such shape is logged once per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from datetime import datetime
from typing import Any

import aiohttp

from .config import Config
from .errors import failure_text
from .models import normalize_model
from .pool import Node, Pool
from .supervision import Once, Tasks, every, for_each

log = logging.getLogger("ollama_proxy.discovery")

DEFAULT_KEEP_ALIVE = 300.0  # Ollama's OLLAMA_KEEP_ALIVE default: 5 minutes
# At most one recheck round (every node's /api/tags, for a model no node lists) starts per
# this many seconds, however many made-up names clients ask for.
RECHECK_INTERVAL = 1.0
MAX_LISTING_BYTES = 16 * 1024 * 1024  # /api/tags of thousands of models is well under 1 MiB


class Discovery:
    def __init__(
        self, pool: Pool, session: aiohttp.ClientSession, config: Config, tasks: Tasks
    ) -> None:
        self.pool = pool
        self.session = session
        self.tasks = tasks
        self._refreshing: set[Node] = set()
        self._reported = Once()  # failures and malformed shapes, each logged once per node
        self._recheck: asyncio.Event | None = None  # set when the latest recheck round ended
        self._recheck_after = 0.0  # monotonic time before which no new round starts
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.interval = config.discovery.interval
        self.timeout = aiohttp.ClientTimeout(total=config.discovery.timeout)
        self.recheck_timeout = config.discovery.recheck_timeout

    async def run(self) -> None:
        """Refresh every node's inventory each interval, until cancelled at shutdown."""
        await every(lambda: self.interval, self.refresh_all, "discovery")

    async def refresh_all(self) -> None:
        up = [n for n in self.pool.nodes.values() if n.up]
        await for_each(up, self.refresh, "discovery", self._reported)

    async def refresh(self, node: Node) -> None:
        tags, ps = await asyncio.gather(
            self.get_json(node, "/api/tags"), self.get_json(node, "/api/ps")
        )
        self.learn_models(node, tags)
        self.learn_resident(node, ps)

    def learn_models(self, node: Node, tags: Any) -> None:
        """Take what the node's ``/api/tags`` answer says is on its disk."""
        listed = self._listing(node, "/api/tags", tags)
        if listed is not None:
            node.models = {normalize_model(name) for name, _ in listed}
            node.digests = {
                normalize_model(name): digest
                for name, entry in listed
                if isinstance(digest := entry.get("digest"), str) and digest
            }

    def learn_resident(self, node: Node, ps: Any) -> None:
        """Take what the node's ``/api/ps`` answer says is in its memory, and until when."""
        listed = self._listing(node, "/api/ps", ps)
        if listed is not None:
            node.resident = {normalize_model(n): self._expiry(node, e) for n, e in listed}

    def _listing(
        self, node: Node, path: str, answer: Any
    ) -> list[tuple[str, dict[str, Any]]] | None:
        """(name, entry) of each well-formed entry; None when there is no listing to learn."""
        if answer is None:
            return None  # no answer: keep what was known
        items = answer.get("models") if isinstance(answer, dict) else None
        if not isinstance(items, list):
            self._malformed(node, path, "is not a model listing")
            return None
        listed = [(name, entry) for entry in items if (name := _name_of(entry))]
        if len(listed) < len(items):
            self._malformed(node, path, "has entries without a model name")
        return listed

    def _expiry(self, node: Node, entry: dict[str, Any]) -> float:
        expires = _timestamp(entry.get("expires_at"))
        if expires is None:
            self._malformed(node, "/api/ps", "has an expires_at that is not a time")
            return time.time() + DEFAULT_KEEP_ALIVE
        return expires

    def _malformed(self, node: Node, path: str, shape: str) -> None:
        if self._reported.first(node.name, path, shape):
            log.warning("node %s: its %s %s; that part is ignored", node.name, path, shape)

    async def refresh_for_missing(self, model_key: str) -> None:
        """Read every up node's ``/api/tags`` again, for a request whose model no node lists:
        one pulled on a node straight since the last round is then found, not a 404.

        Requests that miss meanwhile share the round under way; a new round starts at most
        once per ``RECHECK_INTERVAL``, and none waits longer than ``recheck_timeout`` (the
        round goes on without it, and the lists it reads are taken all the same).
        """
        done = self._recheck_round()
        if done is None:
            return
        log.debug("no node lists %s: reading their models again", model_key)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.recheck_timeout):
                await done.wait()

    def _recheck_round(self) -> asyncio.Event | None:
        """The round under way, or a new one; None when rechecks are off or the last round
        began too recently."""
        if self._recheck is not None and not self._recheck.is_set():
            return self._recheck
        now = time.monotonic()
        if self.recheck_timeout <= 0 or now < self._recheck_after:
            return None
        self._recheck_after = now + RECHECK_INTERVAL
        done = self._recheck = asyncio.Event()
        self.tasks.spawn(self._recheck_all(done), name="recheck models")
        return done

    async def _recheck_all(self, done: asyncio.Event) -> None:
        try:
            up = [n for n in self.pool.nodes.values() if n.up]
            await for_each(up, self._refresh_models, "discovery", self._reported)
        finally:
            done.set()

    async def _refresh_models(self, node: Node) -> None:
        self.learn_models(node, await self.get_json(node, "/api/tags"))

    def refresh_soon(self, node: Node) -> None:
        """Refresh one node in the background (at most one refresh per node at a time)."""
        if node not in self._refreshing:
            self._refreshing.add(node)
            self.tasks.spawn(self._refresh_alone(node), name=f"refresh {node.name}")

    async def _refresh_alone(self, node: Node) -> None:
        try:
            await for_each([node], self.refresh, "discovery", self._reported)
        finally:
            self._refreshing.discard(node)

    def served(self, node: Node, model: str) -> None:
        """The node just answered for ``model``: it has it, and holds it in memory."""
        if node.models is not None:
            node.models.add(model)
        node.resident[model] = time.time() + DEFAULT_KEEP_ALIVE

    async def get_json(self, node: Node, path: str, headers: dict[str, str] | None = None) -> Any:
        """A node's JSON answer to a GET (with ``headers``, the node's own by default), or
        None when it has none to give."""
        try:
            async with self.session.get(
                node.url + path, timeout=self.timeout, headers=headers or node.config.headers
            ) as resp:
                body = await _read_capped(resp, MAX_LISTING_BYTES) if resp.status == 200 else None
                return json.loads(body) if body is not None else None
        # RecursionError: JSON nested deeper than Python's parser goes is no listing either.
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            log.debug("%s %s failed: %s", node.name, path, failure_text(exc))
            return None

    def served_on_disk(self, node: Node, model: str) -> None:
        """The proxy just put ``model`` on the node's disk (pull, create, copy)."""
        if node.models is not None:
            node.models.add(model)
        node.digests.pop(model, None)  # it may be another model now: unknown until listed
        self.refresh_soon(node)


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The whole body, or None past ``cap`` bytes: a listing that large is not one."""
    body = bytearray()
    async for piece in resp.content.iter_any():
        body += piece
        if len(body) > cap:
            return None
    return bytes(body)


def entries(answer: Any, key: str) -> list[dict[str, Any]]:
    items = answer.get(key) if isinstance(answer, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _name_of(entry: object) -> str | None:
    """An entry's model name: Ollama sends both "model" and "name"; the first string wins."""
    if not isinstance(entry, dict):
        return None
    names = (entry.get(key) for key in ("model", "name"))
    return next((n for n in names if isinstance(n, str) and n.strip()), None)


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _timestamp(value: object) -> float | None:
    """Ollama's expires_at (RFC 3339, nanoseconds) as a wall-clock timestamp; None if none."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(_FRACTION.sub(r"\1", value)).timestamp()
    except (ValueError, OverflowError, OSError):  # not a time, or none the platform can hold
        return None
