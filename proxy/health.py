"""Is a node fit for traffic? Active probes on a timer, and passive evidence from real traffic.

The two kinds of evidence are counted apart (Caddy keeps its active checker's counts apart from
request failures too). ``fall`` consecutive failed checks take a node down and ``rise``
consecutive passed checks bring it back; ``fall`` consecutive failed requests eject it for a
while, however its checks go. Were they counted together, a node failing every generation
while answering ``/api/version`` would stay in forever (each passed check would wipe the
count), and two failed requests plus one failed check would take out a node that is fine.

Failed requests alone never take out the last node that is up (nginx and Envoy do the same): a
fleet emptied by a burst of errors would answer nothing at all; active checks, which probe the
node itself, may.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import aiohttp

from .config import HealthCheckConfig
from .discovery import Discovery
from .errors import FailureKind, failure_text, is_shortage
from .pool import Node, Pool
from .supervision import Once, every, for_each

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
        self._reported = Once()  # checks that failed unexpectedly, each logged once per node

    async def run(self) -> None:
        """Probe every node each interval, until cancelled at shutdown."""
        await every(lambda: self.config.interval, self.check_all, "health checks")

    def configure(self, config: HealthCheckConfig) -> None:
        self.config = config  # the running loop reads it at its next turn

    async def check_all(self) -> None:
        await self.check_nodes(list(self.pool.nodes.values()))

    async def check_nodes(self, nodes: list[Node]) -> None:
        """Check these nodes at once; one node's unexpected failure ends only its own check."""
        await for_each(nodes, self.check, "health check", self._reported)

    async def check(self, node: Node) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        try:
            probe = node.url + PROBE_PATH
            async with self.session.get(
                probe, timeout=timeout, headers=node.config.headers
            ) as resp:
                body = await resp.read()
                ok, reason = resp.status == 200, f"health check answered {resp.status}"
            if ok:
                node.version = _version_of(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if is_shortage(exc):  # the proxy's own shortage says nothing about the node
                log.warning("health check of %s not made: %s", node.name, exc)
                return
            ok, reason = False, f"health check failed: {failure_text(exc)}"
        self._record_check(node, ok, reason)

    def _record_check(self, node: Node, ok: bool, reason: str) -> None:
        first = not node.checked  # the first check decides at once
        node.checked = True
        if ok:
            self._check_passed(node, first)
        else:
            self._check_failed(node, first, reason)

    def _check_passed(self, node: Node, first: bool) -> None:
        node.check_passes_in_row += 1
        node.check_failures_in_row = 0
        ejected = time.monotonic() < node.ejected_until
        risen = first or node.check_passes_in_row >= self.config.rise
        if not node.up and not ejected and risen:
            self._set_up(node, True, "health checks pass")

    def _check_failed(self, node: Node, first: bool, reason: str) -> None:
        node.check_passes_in_row = 0
        node.check_failures_in_row += 1
        node.record_error(reason)
        if node.up and (first or node.check_failures_in_row >= self.config.fall):
            self._set_up(node, False, reason)

    def passive_failure(self, node: Node, kind: FailureKind) -> None:
        node.request_failures_in_row += 1
        node.record_error(f"request failed: {kind}")
        fallen = node.request_failures_in_row >= self.config.fall
        if node.up and fallen and self._others_up(node):
            self._eject(node)

    def _others_up(self, node: Node) -> bool:
        return any(n.up for n in self.pool.nodes.values() if n is not node)

    def _eject(self, node: Node) -> None:
        """Out for a while even if its checks pass: they may, while its generations fail."""
        hold = min(self.config.ejection_time * 2**node.ejections, self.config.max_ejection_time)
        node.ejections += 1
        node.request_failures_in_row = 0  # back in, it gets ``fall`` new chances (as in Envoy)
        node.ejected_until = time.monotonic() + hold
        self._set_up(node, False, f"{node.last_error}; out for at least {hold:g}s")

    def passive_success(self, node: Node) -> None:
        node.request_failures_in_row = 0  # only a request served well ends a run of failures
        node.ejections = 0  # it serves again: the next ejection starts short

    def _set_up(self, node: Node, up: bool, reason: str) -> None:
        node.up = up
        log.warning("node %s is %s: %s", node.name, "up" if up else "down", reason)
        if up:  # it may have changed while away: learn what it holds before using it
            self.discovery.refresh_soon(node)
        self.pool.changed()


def _version_of(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, RecursionError):  # too deeply nested is no version
        value = json.loads(body)
        if isinstance(value, dict) and isinstance(value.get("version"), str):
            return str(value["version"])
    return None
