"""The Redis that replicas share (``state.redis_url``), and whether it answers now.

Slots, per-key windows, conversation affinity and the response cache keep their shared part
in it when it is set, and fall back to this process's own state while it does not answer.
This module holds only the connection and its health; what is kept in Redis, and what each
piece guarantees with and without it, belong to the module that keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from .config import StateConfig

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("ollama_proxy.state")

# A command that takes longer is taken for Redis trouble: a request never waits on Redis for
# longer than this before its replica falls back to local state.
COMMAND_TIMEOUT = 0.5
RETRY_INTERVAL = 0.5  # between pings while Redis does not answer
CHECK_INTERVAL = 1.0  # between pings while it does, so an idle replica notices it go too


def replica_name() -> str:
    """This process among the replicas: its host, its pid, and a random part for restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def shown_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class SharedState:
    """The connection to the shared Redis, or nothing when ``state.redis_url`` is empty.

    ``client`` is set when a Redis is configured; ``up`` says whether its last command
    answered. A piece that gets a ``RedisError`` (or a timeout) calls ``failed``, then serves
    from local state; the watch loop (``run``) pings until Redis answers again and then calls
    each ``on_change`` listener, as ``failed`` does when it goes.
    """

    def __init__(self, config: StateConfig, replica: str | None = None) -> None:
        self.config = config
        self.replica = replica or replica_name()
        self.client: Redis | None = None
        self.up = False
        self._listeners: list[Callable[[bool], None]] = []
        self._went_down = asyncio.Event()

    @property
    def configured(self) -> bool:
        return bool(self.config.redis_url)

    @property
    def shared(self) -> bool:
        """True while state is kept in Redis: configured, and answering."""
        return self.client is not None and self.up

    def key(self, *parts: str) -> str:
        """A Redis key under ``state.key_prefix``: ``prefix:part:part``."""
        return ":".join((self.config.key_prefix, *parts))

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(up)`` whenever Redis stops or starts answering."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Connect, and find out whether Redis answers (serving starts either way)."""
        if not self.configured:
            return
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.client = Redis.from_url(
            self.config.redis_url,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            health_check_interval=0,
            # One retry at once, on a new connection (one kept from before a restart of Redis
            # fails once); redis-py's default retries ten times with backoff, seconds in all.
            retry=Retry(NoBackoff(), 1),
        )
        where = shown_url(self.config.redis_url)
        if await self._answers():
            log.info("shared state: in Redis at %s, as replica %s", where, self.replica)
            self._set(True)
        else:
            log.warning("shared state: Redis at %s does not answer; serving on local state", where)

    def failed(self, exc: BaseException) -> None:
        """A command failed: serve from local state until Redis answers again."""
        if self.up:
            log.warning("shared state: Redis stopped answering (%s); serving on local state", exc)
            self._set(False)

    async def run(self) -> None:
        """Ping Redis: say when it stops answering, and when it answers again."""
        while True:
            if self.up:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._went_down.wait(), CHECK_INTERVAL)
                if self.up and not await self._answers():
                    self.failed(ConnectionError("no answer to PING"))
                continue
            await asyncio.sleep(RETRY_INTERVAL)
            if await self._answers():
                log.info("shared state: Redis answers again; state is shared")
                # Idle connections from before would each fail once, each a false alarm.
                assert self.client is not None
                await self.client.connection_pool.disconnect(inuse_connections=False)
                self._set(True)

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def _answers(self) -> bool:
        assert self.client is not None
        from redis.exceptions import RedisError

        try:
            return bool(await self.client.ping())
        except (TimeoutError, RedisError, OSError):
            return False

    def _set(self, up: bool) -> None:
        self.up = up
        if up:
            self._went_down.clear()
        else:
            self._went_down.set()
        for listener in self._listeners:
            listener(up)


__all__ = ["COMMAND_TIMEOUT", "SharedState", "replica_name"]
