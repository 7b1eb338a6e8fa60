"""Is a node fit for traffic? Active probes on a timer, and passive evidence from real traffic.

Thresholds keep one blip from ejecting or restoring a node: ``fall`` consecutive failures take
it out, ``rise`` consecutive passed checks bring it back. Passive failures alone never take out
the last node that is up (nginx and Envoy do the same): a fleet emptied by a burst of errors
would answer nothing at all; active checks, which probe the node itself, may.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp

from .config import HealthCheckConfig
from .discovery import Discovery
from .pool import Node, Pool

log = logging.getLogger("ollama_proxy.health")

PROBE_PATH = "/api/version"  # cheap: answered without touching a model


class Health:
    def __init__(
        self,
        pool: Pool,
        session: aiohttp.ClientSession,
        config: HealthCheckConfig,
        discovery: Discovery,
    ) -> None:
        self.pool = pool
        self.session = session
        self.config = config
        self.discovery = discovery

    async def run(self) -> None:
        """Probe every node each interval, forever (cancelled on shutdown)."""
        while True:
            await asyncio.sleep(self.config.interval)
            await self.check_all()

    def configure(self, config: HealthCheckConfig) -> None:
        self.config = config  # the running loop reads it at its next turn

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(node) for node in list(self.pool.nodes.values())))

    async def check(self, node: Node) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        try:
            async with self.session.get(node.url + PROBE_PATH, timeout=timeout) as resp:
                body = await resp.read()
                ok, reason = resp.status == 200, f"health check answered {resp.status}"
            if ok:
                node.version = _version_of(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, reason = False, f"health check failed: {exc or type(exc).__name__}"
        self._record_check(node, ok, reason)

    def _record_check(self, node: Node, ok: bool, reason: str) -> None:
        first = not node.checked
        node.checked = True
        if ok:
            node.passes_in_row += 1
            node.failures_in_row = 0
            ejected = time.monotonic() < node.ejected_until
            if not node.up and not ejected and (first or node.passes_in_row >= self.config.rise):
                self._set_up(node, True, "health checks pass")
        else:
            node.passes_in_row = 0
            node.failures_in_row += 1
            node.record_error(reason)
            if node.up and (first or node.failures_in_row >= self.config.fall):
                self._set_up(node, False, reason)

    def passive_failure(self, node: Node, kind: str) -> None:
        node.passes_in_row = 0
        node.failures_in_row += 1
        node.record_error(f"request failed: {kind}")
        others_up = any(n.up for n in self.pool.nodes.values() if n is not node)
        if node.up and others_up and node.failures_in_row >= self.config.fall:
            self._eject(node)

    def _eject(self, node: Node) -> None:
        """Out for a while even if its checks pass: they may, while its generations fail."""
        hold = min(self.config.ejection_time * 2**node.ejections, self.config.max_ejection_time)
        node.ejections += 1
        node.ejected_until = time.monotonic() + hold
        self._set_up(node, False, f"{node.last_error}; out for at least {hold:g}s")

    def passive_success(self, node: Node) -> None:
        node.failures_in_row = 0
        node.ejections = 0  # it serves again: the next ejection starts short

    def _set_up(self, node: Node, up: bool, reason: str) -> None:
        node.up = up
        log.warning("node %s is %s: %s", node.name, "up" if up else "down", reason)
        if up:  # it may have changed while away: learn what it holds before using it
            self.discovery.refresh_soon(node)
        self.pool.changed()


def _version_of(body: bytes) -> str | None:
    with contextlib.suppress(ValueError):
        value = json.loads(body)
        if isinstance(value, dict) and isinstance(value.get("version"), str):
            return str(value["version"])
    return None
