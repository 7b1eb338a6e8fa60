"""The response cache: embedding answers replayed for the same request to the same model.

An answer is kept under its path, the model's digest on the nodes that would serve it (so a
model re-pulled or re-created replays none of its old answers: the key names another digest)
and the request body's meaning as canonical JSON (sorted keys, no whitespace). Only complete
200 answers are kept, byte for byte with their Content-Type. In this process by default (an
LRU bounded by ``cache.max_bytes``), in Redis when the replicas share one (each entry with
``cache.ttl`` as its expiry; Redis's ``maxmemory`` bounds them there). While Redis does not
answer, each replica keeps its own until it does.

A model whose nodes do not agree on one digest (one re-pulled before the others, one whose
listing has none yet) is not cached at all: an answer kept then could be replayed for the
other model. Generations are never cached: Ollama does not promise the same output twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from multidict import CIMultiDictProxy

from .config import CacheConfig
from .http1 import Head
from .pool import Node
from .state import SharedState
from .supervision import Once, Tasks

log = logging.getLogger("ollama_proxy.cache")

CACHED_PATHS = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})
# An answer larger than this is relayed as usual and not kept: gathering it would hold that
# much per request, and a batch that large is seldom sent twice.
ENTRY_MAX = 8 * 1024 * 1024
Result = Literal["hit", "miss", "bypass", "no_digest"]
RESULTS: tuple[Result, ...] = ("hit", "miss", "bypass", "no_digest")


@dataclass(frozen=True)
class Entry:
    """A node's answer as kept: replayed with its status, Content-Type and body."""

    status: int
    content_type: str
    body: bytes

    def encode(self) -> bytes:
        return b"%d %s\n" % (self.status, self.content_type.encode("latin-1")) + self.body

    @classmethod
    def decode(cls, value: bytes) -> Entry | None:
        line, sep, body = value.partition(b"\n")
        status, _, content_type = line.decode("latin-1").partition(" ")
        return cls(int(status), content_type, body) if sep and status.isdigit() else None


@dataclass
class Lookup:
    """What the cache made of one request: its result, and where its answer is to be kept
    (``key`` None: it is not kept)."""

    result: Result
    key: str | None = None
    model: str = ""
    digest: str = ""
    entry: Entry | None = None  # the answer to replay, on a hit

    @property
    def header(self) -> str:
        """``X-Cache`` on the answer: hit, miss, or bypass (not looked up)."""
        return self.result if self.result in ("hit", "miss") else "bypass"


def model_digest(nodes: Iterable[Node], model: str) -> str | Literal[False] | None:
    """The model's digest on the nodes that may serve it now; None when they do not agree
    on one (or one has none); False when no node in service has it (no cache question)."""
    digests = {n.digests.get(model) for n in nodes if n.takes_new and n.has_model(model)}
    if not digests:
        return False
    return digests.pop() if len(digests) == 1 else None


def request_key(path: str, digest: str, body: bytes) -> str | None:
    """The key of a request's answer; None for a body that is no JSON object."""
    try:
        value = json.loads(body.decode("utf-8", "replace"))  # invalid UTF-8 read as Go does
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    canonical = json.dumps(
        value, sort_keys=True, separators=(",", ":")
    )  # ASCII: no surrogate fails
    return hashlib.sha256(f"{path}\0{digest}\0{canonical}".encode()).hexdigest()


def client_directive(headers: CIMultiDictProxy[str]) -> str:
    """``no-store``, ``no-cache`` or "" from the client's ``Cache-Control`` (``Pragma:
    no-cache`` when it sends none, as RFC 9111 reads it)."""
    values = headers.getall("Cache-Control", [])
    if not values and headers.get("Pragma", "").strip().lower() == "no-cache":
        return "no-cache"
    directives = {d.split("=", 1)[0].strip().lower() for v in values for d in v.split(",")}
    return next((d for d in ("no-store", "no-cache") if d in directives), "")


def raw_content_type(head: Head) -> str:
    """The node's Content-Type exactly as it sent it."""
    for name, value in head.raw_headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return ""


class Gathered(deque[bytes]):
    """An answer's pieces as they are relayed: all of them while they hold at most ``limit``
    bytes, only the last ``tail`` after (the request path reads the tail for telemetry)."""

    def __init__(self, limit: int, tail: int) -> None:
        super().__init__()
        self.size = 0
        self.limit = limit
        self.tail = tail
        self.whole = True

    def append(self, piece: bytes) -> None:
        super().append(piece)
        self.size += len(piece)
        if self.size > self.limit:
            self.whole = False
            while len(self) > self.tail:
                self.popleft()


class LocalCache:
    """Entries in this process: least recently used out first, past ``max_bytes`` of answers."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()
        self.bytes = 0

    def get(self, key: str, now: float) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[1]

    def put(self, key: str, entry: Entry, expires: float, max_bytes: int) -> None:
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (expires, entry)
        self.bytes += len(entry.body)
        self.bound(max_bytes)

    def bound(self, max_bytes: int) -> None:
        while self.bytes > max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: str) -> None:
        _, entry = self._entries.pop(key)
        self.bytes -= len(entry.body)


class SharedFigure:
    """What this replica put in Redis and has not expired yet, for the bytes metric: Redis
    alone knows what the fleet holds, and evicts past its ``maxmemory`` without telling."""

    def __init__(self) -> None:
        self._added: deque[list[float]] = deque()  # [expiry second, bytes], oldest first
        self.bytes = 0

    def add(self, size: int, expires: float, max_bytes: int) -> None:
        second = float(int(expires))
        if self._added and self._added[-1][0] == second:
            self._added[-1][1] += size
        else:
            self._added.append([second, size])
        self.bytes += size
        while self.bytes > max_bytes and self._added:  # beyond it, Redis will have evicted
            self.bytes -= int(self._added.popleft()[1])

    def value(self, now: float) -> int:
        while self._added and self._added[0][0] <= now:
            self.bytes -= int(self._added.popleft()[1])
        return self.bytes

    def clear(self) -> None:
        self._added.clear()
        self.bytes = 0


class ResponseCache:
    """The cache the request path asks before admission and fills after a complete answer."""

    def __init__(
        self,
        config: CacheConfig,
        state: SharedState,
        tasks: Tasks,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.tasks = tasks
        self.clock = clock
        self.local = LocalCache()
        self.shared = SharedFigure()
        self._reported = Once()
        self.configure(config)
        state.on_change(self._state_changed)

    def configure(self, config: CacheConfig) -> None:
        self.max_bytes = config.max_bytes
        self.ttl = config.ttl
        self.on = config.max_bytes > 0 and config.ttl > 0
        self.local.bound(self.max_bytes if self.on else 0)

    def held_bytes(self) -> int:
        """The bytes of answers this replica holds, and put in Redis that have not expired."""
        return self.local.bytes + self.shared.value(self.clock())

    async def lookup(
        self,
        path: str,
        headers: CIMultiDictProxy[str],
        body: bytes,
        model: str,
        nodes: Iterable[Node],
    ) -> Lookup | None:
        """The request's lookup, with the answer to replay on a hit; None when the cache has
        nothing to say about it (no node in service has the model, or no JSON object)."""
        digest = model_digest(nodes, model)
        if digest is False:
            return None
        if digest is None:
            return Lookup("no_digest")
        key = request_key(path, digest, body)
        if key is None:
            return None
        directive = client_directive(headers)
        if directive:  # no-cache: the answer is kept all the same; no-store: not even that
            return Lookup("bypass", key if directive == "no-cache" else None, model, digest)
        entry = await self._get(key)
        if entry is not None:
            return Lookup("hit", None, model, digest, entry)
        return Lookup("miss", key, model, digest)

    def gathering(self, lookup: Lookup | None, tail: int) -> Gathered | None:
        """Where a streamed answer's pieces are gathered when it is to be kept."""
        if lookup is None or lookup.key is None:
            return None
        return Gathered(min(ENTRY_MAX, self.max_bytes), tail)

    def store(self, lookup: Lookup, node: Node, head: Head, pieces: Iterable[bytes]) -> None:
        """Keep a complete 200 answer, when the node that gave it holds the model the key
        names (its digest may have changed since the lookup)."""
        if lookup.key is None or head.status != 200 or not self.on:
            return
        if node.digests.get(lookup.model) != lookup.digest:
            return
        if isinstance(pieces, Gathered) and not pieces.whole:
            return
        body = b"".join(pieces)
        if len(body) > min(ENTRY_MAX, self.max_bytes):
            return
        entry = Entry(head.status, raw_content_type(head), body)
        if self.state.shared:
            self.tasks.spawn(self._put_shared(lookup.key, entry), name="cache store")
        else:
            self.local.put(lookup.key, entry, self.clock() + self.ttl, self.max_bytes)

    async def _get(self, key: str) -> Entry | None:
        if not self.state.shared:
            return self.local.get(key, self.clock())
        from redis.exceptions import RedisError, ResponseError

        assert self.state.client is not None
        try:
            value = await self.state.client.get(self.state.key("cache", key))
        except ResponseError as exc:  # Redis answered, with an error: not an outage
            self._refused(exc)
            return None
        except (RedisError, OSError, TimeoutError) as exc:
            self.state.failed(exc)
            return None
        return Entry.decode(value) if isinstance(value, bytes) else None

    async def _put_shared(self, key: str, entry: Entry) -> None:
        from redis.exceptions import RedisError, ResponseError

        assert self.state.client is not None
        ttl_ms = max(1, int(self.ttl * 1000))
        try:
            await self.state.client.set(self.state.key("cache", key), entry.encode(), px=ttl_ms)
        except ResponseError as exc:  # out of memory under `noeviction`, say: only not kept
            self._refused(exc)
            return
        except (RedisError, OSError, TimeoutError) as exc:
            self.state.failed(exc)
            return
        self.shared.add(len(entry.body), self.clock() + self.ttl, self.max_bytes)

    def _refused(self, exc: Exception) -> None:
        if self._reported.first(str(exc).split(" ", 1)[0]):  # by its kind (OOM, WRONGTYPE)
            log.warning("response cache: Redis refused a command (%s); not cached", exc)

    def _state_changed(self, up: bool) -> None:
        """What was kept here while Redis did not answer is dropped once it does again: Redis
        holds the fleet's entries, and this memory is better free."""
        if up:
            self.local.clear()
        else:
            self.shared.clear()


__all__ = [
    "CACHED_PATHS",
    "RESULTS",
    "Entry",
    "Gathered",
    "Lookup",
    "ResponseCache",
    "client_directive",
    "model_digest",
    "request_key",
]
