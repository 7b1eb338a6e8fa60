"""Slots across replicas: a node's caps, its models' and a key's, held fleet-wide in Redis.

The pool chooses a node and counts the request on it locally, in one synchronous step, as
without Redis. With ``state.redis_url`` set, the request then takes a *lease*: one Lua script
(``TAKE``) drops expired leases and adds this one to the node's sorted set (and its model's,
and its key's, where they have a cap) only if each set holds fewer than its cap, all in one
step. Members are lease ids scored by their expiry in Redis's own clock (``TIME``), so replicas'
clocks never matter. When Redis refuses, the local count is given back, the node (model, key)
is marked full here (``Pool.full_elsewhere``) and the request waits in the pool's queue as for
any full node, in fair order; a slot freed anywhere in a set that was full is published on
``prefix:freed``, and the marks are forgotten on each message, and every ``recheck`` seconds
in case one was missed or a dead replica's leases expired (which nobody announces).

Leases are renewed in one batch per replica every ``lease_ttl / 3`` (with this replica's entry
in the registry, ``prefix:replicas``, which tells each replica how many there are), released
in batches by a script that also publishes, and expire ``lease_ttl`` after a replica's last
renewal when it dies.

While Redis does not answer, each replica serves on its share of every cap (``Pool.divide``:
the cap divided by the replicas it last knew of, rounded down, at least 1). When Redis answers
again, the requests running then are registered as leases again, whatever the caps, before
new leases are taken there, so the counts are right; no request is dropped either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import StateConfig
from .pool import Lease, Pool
from .state import COMMAND_TIMEOUT, SharedState

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

log = logging.getLogger("ollama_proxy.leases")

# KEYS: the sorted sets to count the lease in; ARGV: the lease id, its ttl in ms, then each
# set's cap. 0 when taken, else the position of the first set at its cap (nothing added).
TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
    return i
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', key, ARGV[2])
end
return 0
"""

# KEYS[1]: the replica registry; KEYS[i] for i > 1: a sorted set holding lease ARGV[i + 1].
# ARGV[1]: the ttl in ms, ARGV[2]: this replica. Every lease (re)added with a new expiry,
# whatever the caps: it is running. Answers how many replicas are registered.
RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expiry = now + tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], expiry, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], expiry, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
"""

# KEYS[i]: a sorted set holding lease ARGV[2i], of cap ARGV[2i + 1]; ARGV[1]: the channel
# told of freed slots, only when a set that was full is not any more (only then may another
# replica have been refused a lease). Answers how many such sets there were.
RELEASE = """
local freed = 0
for i, key in ipairs(KEYS) do
  local full = redis.call('ZCARD', key) >= tonumber(ARGV[2 * i + 1])
  if redis.call('ZREM', key, ARGV[2 * i]) == 1 and full then
    freed = freed + 1
  end
end
if freed > 0 then
  redis.call('PUBLISH', ARGV[1], freed)
end
return freed
"""

NODE, MODEL, KEY = "node", "model", "key"  # what a lease's sorted sets count
RETRY_INTERVAL = 0.5  # while Redis does not answer, how often the listener looks again
RECHECK_MAX = 1.0  # seconds between re-checks of full marks, at most (lease_ttl / 4 if less)


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


@dataclass(eq=False, slots=True)
class _Held:
    """A lease as Redis knows it: its id, and the sorted sets it is counted in."""

    id: str
    keys: list[str]
    caps: list[int]
    kinds: list[str]  # NODE, MODEL or KEY, for each of ``keys``
    registered: bool = False  # in Redis (taken there, or renewed since)


class Slots:
    """This replica's leases: taken in Redis while it answers, counted locally otherwise."""

    def __init__(self, pool: Pool, state: SharedState, config: StateConfig) -> None:
        self.pool = pool
        self.state = state
        self.configured = state.configured
        self.shared = False  # leases are taken in Redis now (it answers; running ones are in)
        self.held: dict[Lease, _Held] = {}  # every slot held here, while Redis is configured
        self.replicas = config.replicas  # as last seen in the registry (at start: the config)
        self.divided = config.replicas  # the caps are divided by so many here now (1: whole)
        self._ttl = config.lease_ttl
        self._ids = itertools.count()
        self._freed = 0  # wake-ups seen: a refusal answered across one is not trusted
        self._marked = False  # something is marked full here (since the last wake-up)
        self._unreleased: list[_Held] = []  # given back here, to be removed from Redis
        self._flushing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._scripts: tuple[AsyncScript, AsyncScript, AsyncScript] | None = None
        if self.configured:
            state.on_change(self._changed)
            pool.divide(self.divided)  # until Redis answers

    @property
    def recheck(self) -> float:
        return min(RECHECK_MAX, self._ttl / 4)

    # -- the request path -------------------------------------------------------------------

    async def take(self, lease: Lease) -> bool:
        """Count the lease fleet-wide. False when Redis refuses it: the lease is then given
        back here and what was full is marked so, for the request to wait in the queue."""
        held = self.held[lease] = self._describe(lease)
        if not self.shared:
            return True  # local state: registered when Redis answers again
        assert self._scripts is not None
        freed = self._freed
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                full = await self._scripts[0](held.keys, [held.id, self._ttl_ms, *held.caps])
        except _redis_errors() as exc:
            self.state.failed(exc)  # served on local state from now; this one is counted here
            held.registered = True  # it may have reached Redis: removed there when it ends
            return True
        except BaseException:  # the client left: maybe taken in Redis, so released there too
            held.registered = True
            lease.release()
            self.give_back(lease)
            raise
        if int(full) == 0:
            held.registered = True
            return True
        del self.held[lease]
        if freed == self._freed:  # else a slot freed meanwhile: try again at once
            self._mark(lease, held.kinds[int(full) - 1])
        self.pool.refused(lease)
        return False

    def give_back(self, lease: Lease) -> None:
        """After ``lease.release()``: removed from Redis too (in a batch, in the background)."""
        held = self.held.pop(lease, None)
        if held is not None and held.registered:
            self._unreleased.append(held)
            self._flush_soon()

    def _describe(self, lease: Lease) -> _Held:
        node = lease.node
        held = _Held(f"{self.state.replica}:{next(self._ids)}", [], [], [])
        self._count_in(held, NODE, self.state.key("slots", node.name), node.config.max_concurrency)
        model_cap = node.config.model_concurrency.get(lease.model) if lease.model else None
        if model_cap is not None and lease.model is not None:
            self._count_in(
                held, MODEL, self.state.key("model-slots", node.name, lease.model), model_cap
            )
        tenant = lease.tenant
        if tenant is not None and tenant.max_concurrency is not None:
            self._count_in(
                held, KEY, self.state.key("key-slots", tenant.name), tenant.max_concurrency
            )
        return held

    @staticmethod
    def _count_in(held: _Held, kind: str, key: str, cap: int) -> None:
        held.kinds.append(kind)
        held.keys.append(key)
        held.caps.append(cap)

    def _mark(self, lease: Lease, kind: str) -> None:
        self._marked = True
        if kind == KEY:
            self.pool.full_elsewhere(lease.node, tenant=lease.tenant)
        else:
            self.pool.full_elsewhere(lease.node, model=lease.model if kind == MODEL else None)

    @property
    def _ttl_ms(self) -> int:
        return int(self._ttl * 1000)

    # -- Redis coming and going -------------------------------------------------------------

    def _changed(self, up: bool) -> None:
        if up:
            self._spawn(self._rejoin())
            return
        self.shared = False
        self.divided = max(self.divided, self.replicas)  # still divided: as it was
        log.warning(
            "slots: Redis does not answer; each cap divided among the %d replicas last seen",
            self.divided,
        )
        self.pool.divide(self.divided)

    async def _rejoin(self) -> None:
        """Register every running request, then take leases in Redis again; whole caps
        once every replica it divided them with is back (each registers its running requests
        in the same step as itself), or after lease_ttl (one that is not back is dead, and
        its leases would have expired)."""
        for _ in range(3):  # slots taken while a renewal ran are registered by the next
            if not await self._renew():
                return
            if all(h.registered for h in self.held.values()):
                break
        if not self.state.up or self.shared:
            return
        self.shared = True
        self._flush_soon()
        deadline = asyncio.get_running_loop().time() + self._ttl
        while self.replicas < self.divided and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(self.recheck)
            if not self.shared or not await self._renew():
                return
        self.divided = 1
        self.pool.divide(1)
        log.info("slots: whole caps shared in Redis (%d replicas seen)", self.replicas)

    def _register_scripts(self) -> tuple[AsyncScript, AsyncScript, AsyncScript]:
        if self._scripts is None:
            client = self.state.client
            assert client is not None
            scripts = (client.register_script(s) for s in (TAKE, RENEW, RELEASE))
            self._scripts = tuple(scripts)  # type: ignore[assignment]
        assert self._scripts is not None
        return self._scripts

    async def _renew(self) -> bool:
        """Every lease held here given a new expiry (added if Redis lost it), and this replica
        its place in the registry, in one script. False when Redis failed."""
        held = list(self.held.values())
        keys = [self.state.key("replicas")]
        args: list[str | int] = [self._ttl_ms, self.state.replica]
        for lease in held:
            keys += lease.keys
            args += [lease.id] * len(lease.keys)
        try:
            self.replicas = max(1, int(await self._register_scripts()[1](keys, args)))
        except _redis_errors() as exc:
            self.state.failed(exc)
            return False
        for lease in held:
            lease.registered = True
        return True

    def _flush_soon(self) -> None:
        if self._unreleased and self.shared and not self._flushing:
            self._flushing = True
            self._spawn(self._flush())

    async def _flush(self) -> None:
        """Remove the leases given back here from Redis, in batches, telling the others."""
        try:
            while self._unreleased and self.shared:
                batch, self._unreleased = self._unreleased, []
                keys: list[str] = []
                args: list[str | int] = [self.state.key("freed")]
                for lease in batch:
                    keys += lease.keys
                    for cap in lease.caps:
                        args += [lease.id, cap]
                try:
                    await self._register_scripts()[2](keys, args)
                except _redis_errors() as exc:
                    self._unreleased[:0] = batch  # removed when Redis answers again
                    self.state.failed(exc)
        finally:
            self._flushing = False

    # -- background -------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew leases every lease_ttl / 3; wake waiters when slots free elsewhere."""
        await asyncio.gather(self._renewing(), self._listening())

    async def _renewing(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            if self.shared:
                try:
                    await self._renew()
                except Exception:  # nor leases left to expire under running requests
                    log.exception("slots: renewing leases failed")

    async def _listening(self) -> None:
        while True:
            if not self.shared:
                await asyncio.sleep(RETRY_INTERVAL)
                continue
            try:
                await self._listen()
            except _redis_errors() as exc:
                self.state.failed(exc)
            except Exception:  # a bug must not leave waiters unwoken for good
                log.exception("slots: listening for freed slots failed; listening again")
                await asyncio.sleep(RETRY_INTERVAL)

    async def _listen(self) -> None:
        """Until Redis fails: each message on ``prefix:freed``, and every ``recheck`` seconds
        without one, forgets the full marks (the waiters try again)."""
        assert self.state.client is not None
        loop = asyncio.get_running_loop()
        pubsub = self.state.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.state.key("freed"))
            self._woken()  # anything freed before it listened
            recheck_at = loop.time() + self.recheck
            while self.shared:
                wait = max(0.0, recheck_at - loop.time())
                message = await pubsub.get_message(timeout=wait)
                if message is not None or loop.time() >= recheck_at:
                    self._woken()
                if loop.time() >= recheck_at:
                    recheck_at = loop.time() + self.recheck
        finally:
            with contextlib.suppress(*_redis_errors()):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _woken(self) -> None:
        self._freed += 1
        if self._marked:  # else nothing waits for a slot elsewhere
            self._marked = False
            self.pool.forget_elsewhere()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Give the last releases a moment to reach Redis, and leave the registry."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=COMMAND_TIMEOUT)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.shared and self.state.client is not None:
            with contextlib.suppress(*_redis_errors()):
                await self.state.client.zrem(self.state.key("replicas"), self.state.replica)


__all__ = ["KEY", "MODEL", "NODE", "RELEASE", "RENEW", "TAKE", "Slots"]
