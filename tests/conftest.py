"""Shared fixtures: simulated Ollama nodes and a proxy in front of them, all on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import RUNTIME, Runtime, make_app
from proxy.config import Config, load_config, parse_config
from proxy.pool import Pool
from proxy.serving import Serving, serve
from proxy.sim import SimNode, SimRequest, SimSettings


@dataclass
class Proxy:
    url: str
    app: web.Application
    serving: Serving

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    @property
    def pool(self) -> Pool:
        return self.runtime.pool

    async def metrics_text(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as r:
            return await r.text()


StartNodes = Callable[..., Awaitable[list[SimNode]]]
StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_nodes() -> AsyncIterator[StartNodes]:
    """``await start_nodes(n, **settings)``: n simulated nodes, stopped after the test."""
    started: list[SimNode] = []

    async def start(count: int = 1, **settings: Any) -> list[SimNode]:
        # A fleet in its steady state: the chat model is loaded everywhere, so plain load
        # balancing applies. Model-aware tests set ``resident`` themselves.
        settings.setdefault("resident", ["llama3.2:latest"])
        nodes = []
        for _ in range(count):
            node = SimNode(SimSettings(**settings), name=f"sim{len(started)}")
            await node.start()
            started.append(node)
            nodes.append(node)
        return nodes

    yield start
    for node in started:
        await node.stop()


def proxy_config(nodes: list[SimNode], **kwargs: Any) -> Config:
    return parse_config(proxy_config_data(nodes, **kwargs))


def proxy_config_data(
    nodes: list[SimNode],
    caps: list[int] | None = None,
    node_extra: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A config for tests: fast health checks; ``top`` keys override or extend sections."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "nodes": [
            {
                "url": n.url,
                "name": n.name,
                "max_concurrency": caps[i] if caps else 4,
                **(node_extra or {}),
            }
            for i, n in enumerate(nodes)
        ],
        "health_check": {
            "interval": 0.2,
            "timeout": 0.5,
            "rise": 1,
            "fall": 2,
            "ejection_time": 0.3,
        },
    }
    for key, value in top.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """``await start_proxy(nodes, caps=[...], queue={...})``: a proxy in front of them.

    After the test every slot must be back and the queue empty: a leak fails the test.
    """
    servers: list[tuple[Serving, web.Application]] = []
    bare_nodes: list[BareNode] = []

    async def start(nodes: list[SimNode], config_path: Path | None = None, **kwargs: Any) -> Proxy:
        """From ``config_path`` when given (reloads watch it), else from the arguments."""
        bare_nodes.extend(n for n in nodes if isinstance(n, BareNode))
        config = load_config(config_path) if config_path else proxy_config(nodes, **kwargs)
        app = make_app(config, config_path)
        serving = await serve(app, "127.0.0.1", 0)  # as the proxy serves: front door first
        servers.append((serving, app))
        return Proxy(f"http://127.0.0.1:{serving.port}", app, serving)

    yield start
    for serving, app in servers:
        await wait_until(lambda app=app: pool_is_idle(app[RUNTIME].pool), what="slots released")
        await serving.close()
    for node in bare_nodes:
        if node.server is not None:
            node.server.close()
            await node.server.wait_closed()


class BareNode:
    """A node on a bare socket, for what aiohttp's server would not send: answers health checks
    and discovery, and every POST with ``answer``. Stopped by ``start_proxy``'s teardown."""

    HELLO = b'{"version": "0.12.6", "models": []}'  # a version for checks, no models

    def __init__(self) -> None:
        self.name = "bare"
        self.url = ""
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if head.startswith(b"POST"):
                    await self.answer(writer)
                else:
                    hello = self.HELLO
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(hello))
                    writer.write(hello)
        writer.close()


PROXY_OWN_PATHS = frozenset({"/api/version", "/api/tags", "/api/ps"})  # checks, discovery


def generations(node: SimNode) -> list[SimRequest]:
    """The requests a node saw, less the proxy's own health checks and discovery."""
    return [r for r in node.stats.requests if r.path not in PROXY_OWN_PATHS]


def pool_is_idle(pool: Pool) -> bool:
    return pool.queue_depth == 0 and all(n.in_flight == 0 for n in pool.nodes.values())


async def wait_until(condition: Callable[[], bool], timeout: float = 3.0, what: str = "") -> None:
    """For state with no event of its own (the proxy's counters); nodes have ``wait_for``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def proxy_subprocess(
    config: Path,
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """``python -m proxy --config FILE`` on a free port; yields (url, process)."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "--config", str(config)),
        *("--listen", f"127.0.0.1:{port}"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    async with asyncio.timeout(20):
        async for line in process.stderr:  # synchronise on the proxy saying it listens
            if b"listening on" in line:
                break
    drain = asyncio.create_task(process.stderr.read())  # a full pipe would block the proxy
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 20)
        await drain


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text, 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match[1]) if match else 0.0


class RedisServer:
    """A real ``redis-server`` on loopback, nothing saved to disk; stop and start keep the port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None, "already running"
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill it: clients see connections refused (as a crashed Redis); its data is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            assert sock.recv(64).startswith(b"+OK")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A fresh Redis for each test module; each test gets it empty (see ``redis_url``)."""
    if shutil.which("redis-server") is None:
        pytest.skip(
            "redis-server is not installed (Debian's redis-server package; .ci/run installs it)"
        )
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The module's Redis, running and empty."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server
