"""Per-key windows counted once for the fleet, in the Redis replicas share (``state.redis_url``).

Each window of a key is a Redis hash under ``state.key("quota", name, window)``: one field per
bucket (its start, in Redis's own clock, so that replicas' clocks never disagree), with the
total, the oldest and the newest bucket beside them, and an expiry of a span and a step after
its last use. The semantics are ``quota.Window``'s, one script each: ``admit`` checks every
window of the key and counts the request in one step (one round trip per admitted request,
returning what the headers need); ``charge`` adds an answer's tokens.

This replica's own windows (``quota.Quotas``) count what it admits all along, and serve alone
while Redis does not answer: each replica then holds a key to the key's whole limit.
A key with no limit is counted here only (there is nothing to hold for the fleet).

Charges and the affinity table's records are written behind the answer (``WriteBehind``):
coalesced per key, bounded, and sent by one task in one pipeline.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .config import KeyConfig
from .quota import DAY, MINUTE, Figures, KeyUsage, Quotas, headers_of, over_limit, report_of
from .state import COMMAND_TIMEOUT, SharedState

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline
    from redis.commands.core import AsyncScript

# The key's windows in Redis, in the order of ``KeyUsage.limits``: (name, span, step).
WINDOWS = (
    ("requests", MINUTE, 1.0),
    ("tokens_minute", MINUTE, 1.0),
    ("tokens_day", DAY, MINUTE),
)
log = logging.getLogger("ollama_proxy.state")
K = TypeVar("K")
V = TypeVar("V")
MAX_PENDING = 10_000  # writes queued while the one before is under way; past it, dropped
BATCH = 256  # writes of one source in one pipeline (a round trip well within its timeout)

# A window's hash: fields "sum", "old" (no bucket starts before it), "new" (the newest bucket's
# start) and one per bucket. ``expire`` drops the buckets that ended a span ago (a bucket
# counts until a whole span after its end, as in quota.Window).
_WINDOW_LUA = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local function drop(key, s)
  local a = redis.call('HGET', key, s)
  if a then redis.call('HDEL', key, s) return tonumber(a) end
  return 0
end

local function expire(key, span, step, now)
  local sum = tonumber(redis.call('HGET', key, 'sum') or '0')
  if sum <= 0 then return 0 end
  local old = tonumber(redis.call('HGET', key, 'old'))
  local cutoff = now - span - step
  if old > cutoff then return sum end
  if (cutoff - old) / step > redis.call('HLEN', key) then
    old = math.huge  -- a long gap: look at the buckets there are, not at every step
    for _, f in ipairs(redis.call('HKEYS', key)) do
      local s = tonumber(f)
      if s then
        if s <= cutoff then sum = sum - drop(key, f) elseif s < old then old = s end
      end
    end
  else
    while old <= cutoff do
      sum = sum - drop(key, string.format('%d', old))
      old = old + step
    end
  end
  if sum <= 0 or old == math.huge then redis.call('DEL', key) return 0 end
  redis.call('HSET', key, 'sum', sum, 'old', string.format('%d', old))
  return sum
end

local function reset(key, span, step, now, sum)
  if sum <= 0 then return 0 end
  return tonumber(redis.call('HGET', key, 'new')) + step + span - now
end

-- Seconds until one more unit fits under limit: the oldest buckets leave first.
local function wait(key, span, step, now, sum, limit)
  local excess = sum + 1 - limit
  if limit < 0 or excess <= 0 then return 0 end
  local s = tonumber(redis.call('HGET', key, 'old'))
  local last = tonumber(redis.call('HGET', key, 'new'))
  while s <= last do
    excess = excess - tonumber(redis.call('HGET', key, string.format('%d', s)) or '0')
    if excess <= 0 then return s + step + span - now end
    s = s + step
  end
  return reset(key, span, step, now, sum)
end

local function add(key, span, step, now, amount)
  local start = string.format('%d', math.floor(now / step) * step)
  redis.call('HINCRBY', key, start, amount)
  redis.call('HINCRBY', key, 'sum', amount)
  redis.call('HSETNX', key, 'old', start)
  redis.call('HSET', key, 'new', start)
  redis.call('EXPIRE', key, span + step)
end
"""

# KEYS: the key's windows; ARGV: span, step, limit (-1: none) for each. Every window is checked,
# and the request counted in the first when all have room. Returns the index (1-based) of the
# first full window (0: admitted), its wait, then used and reset of each window.
_ADMIT = (
    _WINDOW_LUA
    + """
local now = clock()
local sums, full, waited = {}, 0, 0
for i, key in ipairs(KEYS) do
  local span, step, limit = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  sums[i] = expire(key, span, step, now)
  if full == 0 then
    waited = wait(key, span, step, now, sums[i], limit)
    if waited > 0 then full = i end
  end
end
if full == 0 then
  add(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now, 1)
  sums[1] = sums[1] + 1
end
local out = {full, tostring(waited)}
for i, key in ipairs(KEYS) do
  out[#out+1] = sums[i]
  out[#out+1] = tostring(reset(key, tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), now, sums[i]))
end
return out
"""
)

# KEYS: windows; ARGV: amount, then span and step for each. Adds amount to every window.
_CHARGE = (
    _WINDOW_LUA
    + """
local now = clock()
for i, key in ipairs(KEYS) do
  local span, step = tonumber(ARGV[2*i]), tonumber(ARGV[2*i+1])
  expire(key, span, step, now)
  add(key, span, step, now, tonumber(ARGV[1]))
end
"""
)

# KEYS: windows; ARGV: span and step for each. Returns used and reset of each.
_PEEK = (
    _WINDOW_LUA
    + """
local now = clock()
local out = {}
for i, key in ipairs(KEYS) do
  local span, step = tonumber(ARGV[2*i-1]), tonumber(ARGV[2*i])
  local sum = expire(key, span, step, now)
  out[#out+1] = sum
  out[#out+1] = tostring(reset(key, span, step, now, sum))
end
return out
"""
)


class WriteBehind:
    """Redis writes no request waits for, sent by one task (``run``) in one pipeline each
    round trip. Each source queues its own writes (coalesced by key, at most ``MAX_PENDING``)
    and, when called with a pipeline, moves them into it."""

    def __init__(self, state: SharedState) -> None:
        self.state = state
        self._sources: list[Callable[[Pipeline], None]] = []
        self._wake = asyncio.Event()
        self.busy = False  # a pipeline is being sent, or writes wait for one

    def source(self, take: Callable[[Pipeline], None]) -> None:
        self._sources.append(take)

    def wake(self) -> None:
        self.busy = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._send()
            except Exception:  # a bug here must not end the writes for good
                log.exception("shared state: writing to Redis failed")
            self.busy = self._wake.is_set()

    async def _send(self) -> None:
        if self.state.client is None:
            return
        pipe = self.state.client.pipeline(transaction=False)
        for take in self._sources:
            take(pipe)
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await pipe.execute()
        except failures() as exc:
            self.state.failed(exc)  # what was queued is lost to the fleet's state


class SharedQuotas:
    """The fleet's windows of each key in Redis, over this replica's ``Quotas``."""

    def __init__(self, quotas: Quotas, state: SharedState, writes: WriteBehind) -> None:
        self.quotas = quotas
        self.state = state
        self._charges: dict[str, int] = {}  # tokens not yet sent, by key name
        self._writes = writes
        writes.source(self._take_charges)
        self._script: AsyncScript | None = None  # registered once Redis is connected
        self._refused: dict[str, Refusal] = {}  # keys found full, until their window has room

    def _admit(self) -> AsyncScript:
        if self._script is None:
            assert self.state.client is not None
            self._script = self.state.client.register_script(_ADMIT)
        return self._script

    def _keys(self, name: str) -> list[str]:
        return [self.state.key("quota", name, window) for window, _, _ in WINDOWS]

    async def admit(self, name: str) -> dict[str, str]:
        """``Quotas.admit``, counted for the fleet: one round trip; this replica's own windows
        when Redis does not answer."""
        usage = self.quotas.keys.get(name)
        if usage is None or not usage.limited:
            return self.quotas.admit(name)
        if (refused := self._refused.get(name)) is not None:
            refused.check(usage.config)
            del self._refused[name]
        limits = [-1 if limit is None else limit for _, _, limit in usage.limits()]
        args = [
            a
            for (_, span, step), limit in zip(WINDOWS, limits, strict=True)
            for a in (span, step, limit)
        ]
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                full, wait, *seen = await self._admit()(keys=self._keys(name), args=args)
        except failures() as exc:
            self.state.failed(exc)
            return self.quotas.admit(name)
        figures = _figures(seen)
        if full:
            what = usage.limits()[int(full) - 1][0]
            self._refused[name] = Refusal(
                usage.config, what, float(wait), figures, time.monotonic()
            )
            raise over_limit(usage.config, what, float(wait), figures)
        self.quotas.count(name)
        return headers_of(usage.config, figures)

    def charge(self, name: str, prompt: int, completion: int) -> None:
        """``Quotas.charge``, and the tokens queued for the fleet's windows."""
        self.quotas.charge(name, prompt, completion)
        if not self.state.shared:
            return
        usage = self.quotas.keys.get(name)
        tokens = prompt + completion
        if usage is None or not usage.limited or tokens <= 0:
            return
        if name in self._charges or len(self._charges) < MAX_PENDING:
            self._charges[name] = self._charges.get(name, 0) + tokens
            self._writes.wake()

    def _take_charges(self, pipe: Pipeline) -> None:
        for name, tokens in taken(self._charges, self._writes):
            args = [tokens, *(a for _, span, step in WINDOWS[1:] for a in (span, step))]
            pipe.eval(_CHARGE, 2, *self._keys(name)[1:], *args)  # EVAL: no NOSCRIPT to redo

    async def report(self) -> dict[str, Any]:
        """GET /-/usage: with Redis answering, the fleet's windows of each key that has limits
        (``"shared": true``); this replica's own for the others, or when Redis does not."""
        local = self.quotas.report()
        limited = [u for u in self.quotas.keys.values() if u.limited]
        if not self.state.shared or not limited:
            return local | {"shared": False}
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                seen = await self._peek_all(limited)
        except failures() as exc:
            self.state.failed(exc)
            return local | {"shared": False}
        shared = {
            u.config.name: report_of(u, figures) for u, figures in zip(limited, seen, strict=True)
        }
        keys = [shared.get(entry["name"], entry) for entry in local["keys"]]
        return {"keys": keys, "shared": True}

    async def _peek_all(self, limited: list[KeyUsage]) -> list[list[Figures]]:
        assert self.state.client is not None
        pipe = self.state.client.pipeline(transaction=False)
        args = [a for _, span, step in WINDOWS for a in (span, step)]
        for usage in limited:
            pipe.eval(_PEEK, len(WINDOWS), *self._keys(usage.config.name), *args)
        return [_figures(seen) for seen in await pipe.execute()]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A key found over a window, refused here without asking Redis again until the window
    has room: a refused request counts nothing, so only time (and more tokens charged) moves
    that moment, and only later. Spares Redis the clients that retry before Retry-After."""

    config: KeyConfig
    what: str
    wait: float
    figures: list[Figures]
    at: float

    def check(self, config: KeyConfig) -> None:
        """Raise the 429, as of now, while the window is full (and the key's limits are the
        ones it was found over: a reload may have raised them)."""
        elapsed = time.monotonic() - self.at
        if config is self.config and elapsed < self.wait:
            figures = [(used, max(0.0, reset - elapsed)) for used, reset in self.figures]
            raise over_limit(config, self.what, self.wait - elapsed, figures)


def taken(pending: dict[K, V], writes: WriteBehind) -> list[tuple[K, V]]:
    """Up to ``BATCH`` of the pending writes, out of ``pending``; the writer is woken again
    for the rest."""
    batch = [(key, pending[key]) for key in itertools.islice(pending, BATCH)]
    for key, _ in batch:
        del pending[key]
    if pending:
        writes.wake()
    return batch


def _figures(seen: list[Any]) -> list[Figures]:
    """Used and reset of each window, as the scripts return them (pairs, flat)."""
    return [(int(seen[i]), max(0.0, float(seen[i + 1]))) for i in range(0, len(seen), 2)]


@functools.cache
def failures() -> tuple[type[BaseException], ...]:
    """What a Redis command raises when Redis is in trouble. Called in ``except`` clauses,
    which evaluate it only once something was raised: redis-py is imported only when a Redis
    is configured."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)
