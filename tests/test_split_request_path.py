"""The whole request path on fake transports: aiohttp's server reads the client's request, the
proxy relays the node's answer, and the client's bytes are parsed as strictly as a client
would, for every split of the node's reads and of the client's request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from proxy.app import RUNTIME, make_app
from proxy.config import parse_config
from proxy.upstream import Connection, NodeConnections

from .fakes import FakeTransport, StrictResponse, chunked, every_split
from .test_split_reads import ANSWERS

NODE_URL = "http://127.0.0.1:9"  # never connected to: the node's connection is a fake
BODY = json.dumps({"model": "m", "prompt": "hi"}).encode()
REQUEST = (
    b"POST /api/generate?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
)
CHUNKED_REQUEST = (
    b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    + chunked(BODY[:10], BODY[10:])
)


@dataclass
class FakeNode:
    """Answers every request written to it with ``answer``, in the reads ``reads`` says."""

    reads: list[bytes]
    requests: list[bytes]
    connections: int = 0
    last: Connection | None = None

    def connect(self, pool: NodeConnections) -> Connection:
        self.connections += 1
        conn = self.last = Connection(pool)
        conn.connection_made(FakeTransport(conn, on_write=lambda data: self._answer(conn, data)))
        return conn

    def _answer(self, conn: Connection, request: bytes) -> None:
        self.requests.append(request)
        loop = asyncio.get_running_loop()
        for data in self.reads:  # one callback each: each is a read of its own
            loop.call_soon(conn.data_received, data)


class Harness:
    def __init__(self, runner: web.AppRunner, node: FakeNode) -> None:
        self.runner = runner
        self.node = node

    async def exchange(self, reads: list[bytes]) -> tuple[StrictResponse, FakeTransport]:
        """One connection from a client that writes its request in ``reads``."""
        assert self.runner.server is not None
        protocol = self.runner.server()
        response = StrictResponse()
        transport = FakeTransport(protocol, on_write=response.feed)
        protocol.connection_made(transport)
        for data in reads:
            protocol.data_received(data)
            await asyncio.sleep(0)  # a read of its own
        async with asyncio.timeout(2):
            while not response.complete and not transport.closed:
                await asyncio.sleep(0)
        transport.close()
        return response, transport


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    config = parse_config(
        {
            "nodes": [{"url": NODE_URL, "name": "n", "max_concurrency": 1}],
            "health_check": {"interval": 3600},
            "discovery": {"interval": 3600},
        }
    )
    app = make_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()  # its first check finds the node down: make it up, with the model
    runtime = app[RUNTIME]
    node = runtime.pool.nodes["n"]
    node.up, node.models, node.checked = True, {"m:latest"}, True
    fake = FakeNode(reads=[], requests=[])
    runtime.forwarder.upstreams.to(NODE_URL)._connect = (  # type: ignore[method-assign]
        lambda: _connected(fake, runtime.forwarder.upstreams.to(NODE_URL))
    )
    yield Harness(runner, fake)
    await runner.cleanup()


async def _connected(node: FakeNode, pool: NodeConnections) -> Connection:
    return node.connect(pool)


@pytest.mark.parametrize("kind", ANSWERS)
async def test_every_split_of_the_nodes_answer_reaches_the_client_intact(
    harness: Harness, kind: str
) -> None:
    answer, payload = ANSWERS[kind]
    for reads in every_split(answer, pairs=False):
        harness.node.reads = reads
        response, _transport = await harness.exchange([REQUEST])
        assert response.complete and response.status == 200, reads
        assert bytes(response.body) == payload, reads
        chunked_reply = response.headers.get(b"transfer-encoding") == b"chunked"
        assert chunked_reply == (kind != "length"), reads
    assert harness.node.connections == 1  # one node connection, kept alive throughout


@pytest.mark.parametrize("request_bytes", [REQUEST, CHUNKED_REQUEST], ids=["length", "chunked"])
async def test_every_split_of_the_clients_request_reaches_the_node_intact(
    harness: Harness, request_bytes: bytes
) -> None:
    harness.node.reads = [ANSWERS["ndjson"][0]]
    count = 0
    for reads in every_split(request_bytes, pairs=False):
        response, _ = await harness.exchange(reads)
        assert response.complete and bytes(response.body) == ANSWERS["ndjson"][1], reads
        sent = harness.node.requests[-1]
        head, _, body = sent.partition(b"\r\n\r\n")
        assert body == BODY, reads
        assert b"Content-Length: %d\r\n" % len(BODY) in head + b"\r\n"
        assert b"transfer-encoding" not in head.lower()
        count += 1
    assert len(harness.node.requests) == count


async def test_every_pair_of_splits_of_the_clients_request(harness: Harness) -> None:
    harness.node.reads = [ANSWERS["length"][0]]
    for reads in every_split(REQUEST, pairs=True):
        response, _ = await harness.exchange(reads)
        assert response.complete, reads
        assert harness.node.requests[-1].endswith(b"\r\n\r\n" + BODY), reads


async def test_a_client_that_stops_reading_pauses_the_node(harness: Harness) -> None:
    """Flow control by the transports' callbacks: the client's ``pause_writing`` holds the
    relay, which stops reading the node; ``resume_writing`` lets both go on."""
    piece = b"x" * 16384
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    harness.node.reads = [head, *[b"4000\r\n" + piece + b"\r\n"] * 64, b"0\r\n\r\n"]
    assert harness.runner.server is not None
    protocol = harness.runner.server()
    response = StrictResponse()
    client = FakeTransport(protocol, on_write=response.feed)
    protocol.connection_made(client)
    protocol.pause_writing()  # the client's socket buffer is full
    protocol.data_received(REQUEST)
    async with asyncio.timeout(2):
        while harness.node.last is None:
            await asyncio.sleep(0)
    node_transport = harness.node.last.transport
    assert isinstance(node_transport, FakeTransport)
    async with asyncio.timeout(2):
        while node_transport.reading:
            await asyncio.sleep(0)
    assert len(response.body) < 512 * 1024  # held back, not all taken into the proxy
    protocol.resume_writing()
    async with asyncio.timeout(2):
        while not response.complete:
            await asyncio.sleep(0)
    assert bytes(response.body) == piece * 64 and node_transport.reading
    client.close()


async def test_a_request_reaches_the_node_within_two_loop_turns(harness: Harness) -> None:
    """Under load every loop turn relays other streams' chunks, so each turn a new request
    waits for is time added to its first byte: aiohttp's server takes two (its connection
    loop wakes up, then the handler's task starts; one on Python 3.12+, whose tasks start
    eagerly), and the proxy's own path none more while the node's connection is kept alive."""
    harness.node.reads = [ANSWERS["length"][0]]
    await harness.exchange([REQUEST])  # the node's connection is now kept alive
    loop = asyncio.get_running_loop()
    turns = 0
    sent_at: list[int] = []

    def tick() -> None:  # runs once per loop turn
        nonlocal turns
        turns += 1
        if not sent_at:
            loop.call_soon(tick)

    original = harness.node._answer

    def answer(conn: Connection, request: bytes) -> None:
        sent_at.append(turns)
        original(conn, request)

    harness.node._answer = answer  # type: ignore[method-assign]
    loop.call_soon(tick)
    await asyncio.sleep(0)  # the first tick has run: turns counts from here
    arrived_at = turns
    response, _ = await harness.exchange([REQUEST])
    assert response.complete
    assert sent_at[0] - arrived_at <= 2, sent_at[0] - arrived_at
