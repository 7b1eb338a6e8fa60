"""Bounds on what clients can hold: slots, queued bodies, requests that take no slot, and the
kept-alive connections to each node; and a client's fault is never held against a node."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.answer import Answer
from proxy.upstream import Connection, NodeConnections, State

from .conftest import StartNodes, StartProxy, generations, metric, proxy_subprocess, wait_until
from .fakes import FakeTransport

GENERATE = b'{"model": "llama3.2", "prompt": "a very long story"}'
REQUEST = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%b" % (
    len(GENERATE),
    GENERATE,
)


async def never_reading_client(url: str) -> asyncio.StreamWriter:
    """A client that sends a generation and reads nothing of its answer, ever."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills soon: no huge buffers
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(REQUEST)
    return writer


class CountingNode:
    """A node on aiohttp's server: floods every generation with big lines as fast as they are
    taken, holds every other request (but its checks and listings) until ``release`` is set,
    and counts what it serves at once and the streams that were closed on it."""

    LINE = b'{"response":"' + b"x" * 65536 + b'","done":false}\n'
    LISTINGS: ClassVar[dict[str, object]] = {
        "/api/version": {"version": "0.12.6"},
        "/api/tags": {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]},
        "/api/ps": {"models": []},
    }

    def __init__(self) -> None:
        self.name = "counting"
        self.url = ""
        self.streams = 0  # generations being streamed now
        self.closed = 0  # generations whose connection the proxy closed
        self.held = 0  # other requests being served now
        self.max_held = 0
        self.release = asyncio.Event()
        self.runner = web.AppRunner(
            web.Application(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        self.runner.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path in self.LISTINGS:
            return web.json_response(self.LISTINGS[request.path])
        if request.path == "/api/generate":
            return await self.flood(request)
        self.held += 1
        self.max_held = max(self.max_held, self.held)
        try:
            await self.release.wait()
        finally:
            self.held -= 1
        return web.json_response({"path": request.path})

    async def flood(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        self.streams += 1
        try:
            while True:
                await response.write(self.LINE)  # waits while the proxy does not read
        except (asyncio.CancelledError, ConnectionError):
            self.closed += 1
            raise
        finally:
            self.streams -= 1


@pytest.fixture
async def counting_node() -> AsyncIterator[CountingNode]:
    node = CountingNode()
    await node.start()
    yield node
    node.release.set()
    await node.runner.cleanup()


@pytest.fixture
async def scrape() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        return await response.text()


# -- a client that takes nothing ------------------------------------------------------------


async def test_clients_that_never_read_are_dropped_and_not_held_against_the_node(
    counting_node: CountingNode, tmp_path: Path, scrape: aiohttp.ClientSession
) -> None:
    """Each used to hold its slot, and the node's GPU, until it left."""
    clients = 6
    node = counting_node
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "nodes": [{"url": node.url, "name": "n", "max_concurrency": clients}],
                "upstream": {"client_timeout": 0.5, "idle_timeout": 2},
                "health_check": {"interval": 0.2, "fall": 2, "rise": 1},
            }
        )
    )
    async with proxy_subprocess(config) as (url, _):
        writers = [await never_reading_client(url) for _ in range(clients)]
        await wait_until(lambda: node.streams + node.closed == clients, what="all streaming")
        # Dropped once they took nothing for client_timeout; the node saw its connections
        # close (Ollama stops generating when they do).
        await wait_until(lambda: node.closed == clients, timeout=10, what="streams closed")
        metrics = await get_text(scrape, url + "/metrics")
        nodes = await (await scrape.get(url + "/-/nodes")).json()
        for writer in writers:
            writer.transport.abort()
    assert metric(metrics, "ollama_proxy_in_flight", node="n") == 0
    assert metric(metrics, "ollama_proxy_client_timeouts_total") == clients
    code = {"node": "n", "endpoint": "/api/generate", "code": "499"}
    assert metric(metrics, "ollama_proxy_requests_total", **code) == clients
    assert "ollama_proxy_upstream_errors_total{" not in metrics  # nothing against the node
    assert nodes["nodes"][0]["up"] and nodes["nodes"][0]["recent_errors"] == []


class FakeClient:
    """A client socket's backlog, as the test says it is."""

    def __init__(self, backlog: int) -> None:
        self.backlog = backlog
        self.looks = 0
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        self.looks += 1
        return self.backlog

    def abort(self) -> None:
        self.aborted = True


def answer_under_way(client: FakeClient, client_timeout: float, stage: str) -> Connection:
    """A node's answer under way: more came than the buffer holds, so the node is not read
    ("paused"); some came and more is to come ("streaming"); or all of it came ("ended")."""
    pool = NodeConnections("http://node:11434", 1, 60, client_timeout=client_timeout)
    conn = Connection(pool)
    conn.connection_made(FakeTransport(conn))
    answer = Answer(conn, high_water=10 if stage == "paused" else 1000, client=client)
    conn.send(b"POST /api/generate HTTP/1.1\r\n\r\n", answer, body_expected=True)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    end = b"0\r\n\r\n" if stage == "ended" else b""
    conn.data_received(head + b"64\r\n" + b"x" * 100 + b"\r\n" + end)
    assert (conn.paused, conn.message_complete) == (stage == "paused", stage == "ended")
    return conn


@pytest.mark.parametrize("stage", ["paused", "streaming", "ended"])
async def test_a_client_that_reads_slowly_is_kept_one_that_stops_is_dropped(stage: str) -> None:
    """Taking bytes, however slowly, is not taking nothing (nginx's send_timeout); bytes
    waiting for the client that do not move are, whether the node still sends or not."""
    client = FakeClient(backlog=100_000)
    conn = answer_under_way(client, client_timeout=0.05, stage=stage)
    answer = conn.sink
    assert isinstance(answer, Answer)
    for _ in range(4):  # each look finds fewer bytes waiting: the client reads
        looks = client.looks
        client.backlog -= 1000
        await wait_until(lambda looks=looks: client.looks > looks)
        assert not client.aborted and conn.state is State.ACTIVE
    await wait_until(lambda: client.aborted)  # it stopped: dropped after client_timeout
    assert conn.state is State.CLOSED and answer.client_dropped
    if stage != "ended":
        with pytest.raises(ConnectionResetError):
            await answer.read_all()


async def test_a_client_with_nothing_waiting_for_it_is_never_dropped() -> None:
    """A node that thinks for a long time before its first token: the client waits too."""
    client = FakeClient(backlog=0)
    conn = answer_under_way(client, client_timeout=0.02, stage="streaming")
    await wait_until(lambda: client.looks >= 5)
    assert not client.aborted and conn.state is State.ACTIVE
    conn.close()


# -- bodies held by the queue ---------------------------------------------------------------


def generate_body(size: int) -> dict[str, object]:
    """A generation whose JSON body is ``size`` bytes (about: the prompt pads it)."""
    prompt = "x" * (size - 80)
    return {"model": "llama3.2", "prompt": prompt, "stream": False, "options": {"num_predict": 3}}


async def test_queued_bodies_have_a_budget_past_which_requests_get_503(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """512 queued requests of 64 MiB each could hold 32 GiB; the bytes queued are bounded."""
    (node,) = await start_nodes(1, tokens=500, token_interval=0.01)
    proxy = await start_proxy([node], caps=[1], queue={"max_body_bytes": 10_000})
    async with aiohttp.ClientSession() as session:
        streamed = {**generate_body(100), "stream": True, "options": {}}
        holder = await session.post(proxy.url + "/api/generate", json=streamed)
        fits = asyncio.create_task(
            session.post(proxy.url + "/api/generate", json=generate_body(6000))
        )
        await wait_until(lambda: proxy.pool.queue_depth == 1, what="a request queued")
        async with session.post(proxy.url + "/api/generate", json=generate_body(6000)) as over:
            assert over.status == 503 and over.headers["Retry-After"] == "1"
            assert "too many request bytes" in (await over.json())["error"]
        assert proxy.pool.queued_body_bytes >= 6000
        holder.close()  # its slot goes to the request that fitted
        async with await fits as served:
            assert served.status == 200 and (await served.json())["done"]
    assert len(generations(node)) == 2  # the node never saw the one over the budget
    assert proxy.pool.queued_body_bytes == 0
    text = await proxy.metrics_text()
    assert metric(text, "ollama_proxy_queue_rejected_total", reason="body_bytes") == 1
    assert metric(text, "ollama_proxy_queue_body_bytes") == 0


# -- requests that take no slot -------------------------------------------------------------


async def test_requests_that_take_no_slot_are_capped_per_node(
    counting_node: CountingNode, start_proxy: StartProxy
) -> None:
    """They used to reach a node with no count at all: 325 at once on a node capped at 2."""
    node = counting_node
    proxy = await start_proxy([node], caps=[2], queue={"max_other_per_node": 3})  # type: ignore[list-item]
    await wait_until(lambda: proxy.pool.nodes[node.name].models is not None, what="listed")
    kinds = [
        ("GET", "/api/experimental/unknown", None),  # a path the proxy does not know
        ("POST", "/api/experimental/thing", {}),  # a POST that names no model
        ("POST", "/api/show", {"model": "llama3.2"}),  # model information: takes no slot
    ]
    async with aiohttp.ClientSession() as session:

        async def ask(method: str, path: str, body: object) -> int:
            async with session.request(method, proxy.url + path, json=body) as response:
                await response.read()
                return response.status

        asking = [asyncio.create_task(ask(*kinds[i % 3])) for i in range(30)]
        await wait_until(lambda: node.held == 3 and proxy.pool.queue_depth == 27, what="queued")
        text = await proxy.metrics_text()
        assert metric(text, "ollama_proxy_other_in_flight", node=node.name) == 3
        node.release.set()
        assert await asyncio.gather(*asking) == [200] * 30
    assert node.max_held == 3
    assert proxy.pool.nodes[node.name].other_in_flight == 0


# -- kept-alive connections to the nodes ----------------------------------------------------

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def served(pool: NodeConnections) -> tuple[Connection, FakeTransport]:
    """A connection that carried one whole answer, given back to its pool."""
    conn = Connection(pool)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    conn.send(b"GET / HTTP/1.1\r\n\r\n", Answer(conn, 1024), body_expected=True)
    conn.data_received(ANSWER)
    conn.finish()
    return conn, transport


async def test_at_most_max_idle_connections_are_kept_the_oldest_close_first() -> None:
    pool = NodeConnections("http://node:11434", 1, 60, max_idle=2)
    conns = [served(pool) for _ in range(4)]
    assert pool.idle == [conns[2][0], conns[3][0]]
    assert [transport.closed for _, transport in conns] == [True, True, False, False]
    assert conns[0][0].state is State.CLOSED
    conn, reused = await pool.get()
    assert (conn, reused) == (conns[3][0], True)  # the newest first: least likely stale
    conn.close()


async def test_idle_connections_close_after_idle_connection_timeout(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """A kept-alive connection is closed once unused for the timeout, on the node's side too
    (a reload already closes those of the nodes it removed)."""
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], upstream={"idle_connection_timeout": 0.3})
    async with aiohttp.ClientSession() as session:
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        async with session.post(proxy.url + "/api/generate", json=body) as response:
            assert response.status == 200
    (conn,) = proxy.runtime.forwarder.upstreams.to(node.url).idle
    assert conn.transport is not None
    ours = conn.transport.get_extra_info("sockname")[:2]
    assert ours in node.peers()
    await wait_until(lambda: ours not in node.peers(), what="the node saw it close")
    assert conn.state is State.CLOSED and proxy.runtime.forwarder.upstreams.to(node.url).idle == []
