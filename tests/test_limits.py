"""What one client can hold of the proxy: memory, descriptors and time, through the real server.

Each test plays one attack on raw sockets: pipelining without ever reading, idle connections
by the hundred under a low descriptor limit, a head or a body sent a byte at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import resource
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import ConfigError, parse_config
from proxy.discovery import Discovery
from proxy.health import Health
from proxy.pool import Pool
from proxy.serving import KEEPALIVE_TIMEOUT, default_max_client_connections
from proxy.sim import SimNode
from proxy.supervision import Tasks

from .conftest import (
    StartNodes,
    StartProxy,
    free_port,
    generations,
    metric,
    proxy_config,
    proxy_config_data,
    proxy_subprocess,
    wait_until,
)

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


# -- the real process ------------------------------------------------------------------------


def write_config(tmp_path: Path, nodes: list[SimNode], **top: Any) -> Path:
    data = proxy_config_data(nodes, **top)
    del data["listen"]  # the subprocess gets --listen
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.asynccontextmanager
async def proxy_with_descriptors(
    config: Path, limit: int
) -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    """``python -m proxy`` with its descriptor limit (RLIMIT_NOFILE) lowered to ``limit``."""
    port = free_port()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "--config", str(config)),
        *("--listen", f"127.0.0.1:{port}"),
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard)),
    )
    assert process.stderr is not None
    async with asyncio.timeout(20):
        async for line in process.stderr:
            if b"listening on" in line:
                break
    drain = asyncio.create_task(process.stderr.read())
    try:
        yield port, process
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 20)
        await drain


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match[1]) / 1024


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- raw HTTP/1.1 on one kept-alive connection ----------------------------------------------


class Raw:
    """One client connection, kept alive: a request written, its whole answer read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def ask(
        self, method: str, path: str, body: Any = None
    ) -> tuple[int, dict[str, str], bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n\r\n"
        self.writer.write(head.encode() + data)
        async with asyncio.timeout(5):
            return await read_answer(self.reader)

    def close(self) -> None:
        self.writer.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer with a Content-Length (every answer these tests ask for has one)."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def idle_connections_now(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that send nothing; those the kernel cannot queue stay in SYN."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """Idle connections, closed at the end (with any the caller added to the list)."""
    sockets = idle_connections_now(port, count)
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


# -- 1: a client that pipelines and never reads --------------------------------------------

TOKENS = 10_000  # a generation's answer is about 80 kB: the kernel's buffers hold few of them


def pipelined(count: int) -> bytes:
    """Generations, listings, unknown paths and unknown models, one after another."""
    generate = json.dumps({**GENERATE, "options": {"num_predict": TOKENS}}).encode()
    unknown = json.dumps({**GENERATE, "model": "no-such-model"}).encode()
    kinds = [
        b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
        % (len(generate), generate),
        b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /no/such/path HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
        % (len(unknown), unknown),
    ]
    return b"".join(kinds[i % len(kinds)] for i in range(count))


async def settled(count: Any, quiet: float = 0.5, bound: float = 15.0) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + bound
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "still growing"
        await asyncio.sleep(0.05)
        if (now := count()) != last:
            last, since = now, time.monotonic()
    return int(last)


async def test_a_client_that_pipelines_and_never_reads_holds_a_bounded_share(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    """aiohttp 3.14 already parses at most 32 pipelined requests ahead and answers one at a
    time, each answer waiting for the client's socket to drain before the next request
    starts: what the proxy holds is bounded by the kernel's buffers, not by what was sent.
    (This passed before any change here; the attack ran against an earlier server.)"""
    (node,) = await start_nodes(1, token_interval=0)
    requests = 2000
    async with proxy_subprocess(write_config(tmp_path, [node])) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        before = rss_mib(process.pid)
        seen_before = len(generations(node))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client reads nothing
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        with sock:
            await asyncio.wait_for(loop.sock_sendall(sock, pipelined(requests)), 10)
            forwarded = await settled(lambda: len(generations(node)) - seen_before)
            grown = rss_mib(process.pid) - before
            # 3 of every 4 requests reach the node when answered (tags, unknown path, and the
            # generation): far fewer did, and the proxy stopped there.
            assert forwarded < requests * 3 / 4 / 3
            assert grown < 30, f"RSS grew by {grown:.1f} MiB"
            # It is backpressure, not a wedge: reading resumes it.
            async with asyncio.timeout(5):
                while len(generations(node)) - seen_before <= forwarded:
                    await loop.sock_recv(sock, 1 << 16)


# -- 2: descriptors --------------------------------------------------------------------------

DESCRIPTOR_LIMIT = 200
IDLE = 260


async def test_idle_connections_cannot_take_the_descriptors_nodes_need(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    """With the default cap (sized from the descriptor limit), connections past it wait in the
    kernel's accept queue, and requests on accepted connections still reach the node."""
    (node,) = await start_nodes(1)
    config = write_config(tmp_path, [node])
    cap = default_max_client_connections(DESCRIPTOR_LIMIT)
    queued = 20  # ahead of the late one in the kernel's queue (it holds serving.BACKLOG)
    async with proxy_with_descriptors(config, DESCRIPTOR_LIMIT) as (port, process):
        client = await Raw.connect(port)
        assert (await client.ask("GET", "/"))[0] == 200  # accepted before the flood
        with idle_connections(port, cap - 1 + queued), idle_connections(port, 0) as more:
            late = await Raw.connect(port)  # past the cap: waits in the kernel's queue
            more.extend(idle_connections_now(port, IDLE - cap - queued))
            for _ in range(3):  # more than health_check.fall
                status, _, _ = await client.ask("POST", "/api/generate", GENERATE)
                assert status == 200
            late.writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(read_answer(late.reader), 0.3)
            assert open_descriptors(process.pid) < DESCRIPTOR_LIMIT - 32
        # The idle ones are gone: the one that waited is served.
        assert (await asyncio.wait_for(read_answer(late.reader), 5))[0] == 200
        text = (await client.ask("GET", "/metrics"))[2].decode()
        assert metric(text, "ollama_proxy_node_up", node=node.name) == 1
        late.close()
        client.close()


async def test_running_out_of_descriptors_is_the_proxys_503_not_the_nodes_failure(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    """A cap set too high for the limit: the proxy runs out of descriptors itself. A request
    that cannot connect to a node for that gets 503 with Retry-After, and the node is not
    blamed (no upstream error, never ejected)."""
    (node,) = await start_nodes(1)
    config = write_config(tmp_path, [node], limits={"max_client_connections": 1000})
    async with proxy_with_descriptors(config, DESCRIPTOR_LIMIT) as (port, process):
        client = await Raw.connect(port)
        assert (await client.ask("GET", "/"))[0] == 200  # answered by the proxy: no node yet
        with idle_connections(port, IDLE):
            await wait_until(
                lambda: open_descriptors(process.pid) >= DESCRIPTOR_LIMIT, what="all taken"
            )
            for _ in range(3):  # more than health_check.fall
                status, headers, body = await client.ask("POST", "/api/generate", GENERATE)
                assert status == 503, body
                assert "retry-after" in headers and b"resources" in body
            text = (await client.ask("GET", "/metrics"))[2].decode()
        assert metric(text, "ollama_proxy_resource_shortages_total") == 3
        assert metric(text, "ollama_proxy_node_up", node=node.name) == 1
        assert "ollama_proxy_upstream_errors_total{" not in text
        # Descriptors free again: the same connection is served by the node.
        await wait_until(lambda: open_descriptors(process.pid) < DESCRIPTOR_LIMIT - 100)
        assert (await client.ask("POST", "/api/generate", GENERATE))[0] == 200
        client.close()


async def test_a_health_check_the_proxy_could_not_make_is_no_failure(
    start_nodes: StartNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors, the proxy cannot check a node: that says nothing about the node."""
    (sim,) = await start_nodes(1)
    config = proxy_config([sim], health_check={"fall": 1})
    pool = Pool(config.nodes, config.queue)
    # A new connection per check, so that each one needs a descriptor.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = Tasks()
        health = Health(pool, session, config.health_check, Discovery(pool, session, config, tasks))
        node = pool.nodes[sim.name]
        await health.check(node)
        assert node.up
        loop = asyncio.get_running_loop()

        async def out_of_descriptors(*args: Any, sock: Any = None, **kwargs: Any) -> Any:
            if sock is not None:  # made by the connector before it asks the loop
                sock.close()
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(loop, "create_connection", out_of_descriptors)
        for _ in range(3):
            await health.check(node)
        assert node.up and node.check_failures_in_row == 0
        monkeypatch.undo()
        await tasks.aclose()


# -- 3: time to send a request ----------------------------------------------------------------

LIMITS = {"header_timeout": 0.4, "body_timeout": 0.4}


async def proxy_port(start_nodes: StartNodes, start_proxy: StartProxy, **limits: Any) -> int:
    nodes = await start_nodes(1)
    proxy = await start_proxy(nodes, limits={**LIMITS, **limits})
    return proxy.serving.port


async def closed_after(reader: asyncio.StreamReader, bound: float = 3.0) -> tuple[bytes, float]:
    """Everything the proxy sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    async with asyncio.timeout(bound):
        data = await reader.read()
    return data, time.monotonic() - started


async def trickle(writer: asyncio.StreamWriter, data: bytes, gap: float) -> None:
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await asyncio.sleep(gap)


async def test_a_head_sent_a_byte_at_a_time_gets_408_and_the_connection_closes(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    port = await proxy_port(start_nodes, start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sending = asyncio.create_task(
        trickle(writer, b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"x" * 200, 0.05)
    )
    data, took = await closed_after(reader)
    assert data.startswith(b"HTTP/1.1 408 ") and data.count(b"HTTP/1.1") == 1
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
    assert 0.3 < took < 1.5
    sending.cancel()
    writer.close()


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    port = await proxy_port(start_nodes, start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data, took = await closed_after(reader)
    assert data == b"" and 0.3 < took < 1.5
    writer.close()


async def test_idle_keep_alive_is_not_cut_short_by_the_head_timeout(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """After an answer, a connection may wait (aiohttp's keep-alive, 75 s) for its next
    request; the head's time starts with the next request's first byte."""
    nodes = await start_nodes(1)
    proxy = await start_proxy(nodes, limits=LIMITS)
    client = await Raw.connect(proxy.serving.port)
    assert (await client.ask("GET", "/"))[0] == 200
    await asyncio.sleep(1.0)  # more than twice the head timeout, idle
    assert (await client.ask("GET", "/"))[0] == 200
    (connection,) = proxy.serving.clients.values()
    assert connection.handler.keepalive_timeout == KEEPALIVE_TIMEOUT == 75
    client.writer.write(b"GET / HTTP/1.1\r\n")  # the next head, never finished
    data, took = await closed_after(client.reader)
    assert data.startswith(b"HTTP/1.1 408 ") and 0.3 < took < 1.5
    client.close()


async def test_a_head_pipelined_during_an_answer_and_left_unfinished_gets_408_after_it(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """The head's time starts when the answer before it ends. (A partial head that comes in
    the same read as the end of the request before it is not seen as one: aiohttp's keep-alive
    timeout bounds that connection instead.)"""
    nodes = await start_nodes(1, tokens=20, token_interval=0.02)
    proxy = await start_proxy(nodes, limits=LIMITS)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.serving.port)
    body = json.dumps(GENERATE).encode()
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    writer.write(body)
    await nodes[0].wait_for(lambda stats: stats.active == 1)
    writer.write(b"GET / HTTP/1.1\r\nHo")  # while the generation runs
    status, _, answer = await asyncio.wait_for(read_answer(reader), 5)
    assert status == 200 and json.loads(answer)["done"] is True
    data, took = await closed_after(reader)
    assert data.startswith(b"HTTP/1.1 408 ") and 0.3 < took < 1.5
    writer.close()


async def test_a_body_that_stalls_gets_408_and_the_connection_closes(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    port = await proxy_port(start_nodes, start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
    data, took = await closed_after(reader)
    assert data.startswith(b"HTTP/1.1 408 ") and b"body" in data
    assert 0.3 < took < 1.5
    writer.close()


async def test_a_slow_body_that_keeps_coming_is_served(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """Each piece comes within the body timeout, the whole takes longer than both timeouts:
    the head's timer stopped when the head was whole, the body's restarts at each piece."""
    nodes = await start_nodes(1)
    proxy = await start_proxy(nodes, limits=LIMITS)
    body = json.dumps(GENERATE).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.serving.port)
    head = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    writer.write(head)
    started = time.monotonic()
    for piece in (body[:10], body[10:20], body[20:]):
        await asyncio.sleep(0.3)
        writer.write(piece)
    status, _, answer = await asyncio.wait_for(read_answer(reader), 5)
    assert status == 200 and json.loads(answer)["done"] is True
    assert time.monotonic() - started > 0.8
    assert len(generations(nodes[0])) == 1
    writer.close()


def test_limits_are_checked_with_the_config() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "nodes": [{"url": "http://127.0.0.1:11434"}],
                "limits": {"max_client_connections": 0, "header_timeout": "soon"},
            }
        )
    assert caught.value.errors == [
        'limits.max_client_connections: must be "auto" or an integer of at least 1',
        "limits.header_timeout: must be a number",
    ]
    limits = parse_config({"nodes": [{"url": "http://127.0.0.1:11434"}]}).limits
    assert (limits.max_client_connections, limits.header_timeout, limits.body_timeout) == (
        None,
        30,
        60,
    )
