"""A client that leaves, at any moment, stops the node's work at once and frees its slot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.sim import SimNode

from .conftest import (
    BareNode,
    StartNodes,
    StartProxy,
    generations,
    pool_is_idle,
    proxy_subprocess,
    wait_until,
)

CANCEL_WITHIN = 0.2  # seconds from the client leaving to the node seeing it
GENERATE = {"model": "llama3.2", "prompt": "tell me a long story"}


async def leave_mid_stream(url: str, node: SimNode) -> None:
    """Read two chunks, then close the connection as a client that has had enough."""
    session = aiohttp.ClientSession()
    try:
        resp = await session.post(url + "/api/generate", json=GENERATE)
        await resp.content.readline()
        await resp.content.readline()
        assert node.stats.cancelled == 0
        resp.close()
    finally:
        await session.close()


async def leave_while_waiting(url: str, body: dict[str, object], started: asyncio.Event) -> None:
    """Send a request, then give up once ``started`` is set (the response not yet in)."""
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(url + "/api/generate", json=body))
        await started.wait()
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request


async def node_active(node: SimNode) -> asyncio.Event:
    event = asyncio.Event()

    async def watch() -> None:
        await node.wait_for(lambda s: s.active >= 1)
        event.set()

    asyncio.get_running_loop().create_task(watch())
    return event


async def assert_cancelled_quickly(node: SimNode) -> None:
    await node.wait_for(lambda s: s.cancelled == 1, timeout=CANCEL_WITHIN)
    assert node.stats.completed == 0


@pytest.fixture
async def slow_node(start_nodes: StartNodes) -> SimNode:
    (node,) = await start_nodes(1, tokens=200, token_interval=0.02)
    return node


async def test_leaving_mid_stream_cancels_the_node(
    slow_node: SimNode, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([slow_node])
    await leave_mid_stream(proxy.url, slow_node)
    await assert_cancelled_quickly(slow_node)
    await wait_until(lambda: pool_is_idle(proxy.pool))
    assert "ollama_proxy_client_disconnects_total 1.0" in await proxy.metrics_text()


async def test_leaving_a_non_streaming_request_cancels_the_node(
    slow_node: SimNode, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([slow_node])
    await leave_while_waiting(
        proxy.url, {**GENERATE, "stream": False}, await node_active(slow_node)
    )
    await assert_cancelled_quickly(slow_node)
    await wait_until(lambda: pool_is_idle(proxy.pool))


async def test_leaving_during_a_cold_load_cancels_the_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, load_delay=5.0)  # headers come only after the load
    proxy = await start_proxy([node])
    await leave_while_waiting(proxy.url, GENERATE, await node_active(node))
    await assert_cancelled_quickly(node)


async def test_leaving_the_queue_frees_its_place(
    slow_node: SimNode, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([slow_node], caps=[1])
    async with aiohttp.ClientSession() as session:
        holder = await session.post(proxy.url + "/api/generate", json=GENERATE)
        queued = asyncio.Event()
        waiter = asyncio.create_task(leave_while_waiting(proxy.url, GENERATE, queued))
        await wait_until(lambda: proxy.pool.queue_depth == 1)
        queued.set()
        await waiter
        await wait_until(lambda: proxy.pool.queue_depth == 0)
        assert len(generations(slow_node)) == 1  # the node never saw the one that left
        holder.close()
    await assert_cancelled_quickly(slow_node)


# -- the real entry point -------------------------------------------------------------------


@pytest.fixture
async def proxy_process(slow_node: SimNode, tmp_path: Path) -> AsyncIterator[str]:
    """``python -m proxy --config FILE``, as an operator runs it."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"nodes": [{"url": slow_node.url, "name": "slow"}]}))
    async with proxy_subprocess(config) as (url, _):
        yield url


async def test_real_entry_point_cancels_streams(slow_node: SimNode, proxy_process: str) -> None:
    await leave_mid_stream(proxy_process, slow_node)
    await assert_cancelled_quickly(slow_node)


async def test_real_entry_point_cancels_non_streaming(
    slow_node: SimNode, proxy_process: str
) -> None:
    body = {**GENERATE, "stream": False}
    await leave_while_waiting(proxy_process, body, await node_active(slow_node))
    await assert_cancelled_quickly(slow_node)


async def test_clients_leaving_at_any_moment_log_no_server_errors(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A client gone while its head or its end is written is a disconnect, not a crash."""
    (node,) = await start_nodes(1, tokens=3, token_interval=0)
    proxy = await start_proxy([node], caps=[50])
    host, port = proxy.url.removeprefix("http://").split(":")
    body = b'{"model": "llama3.2", "prompt": "short story"}'
    request = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )

    async def leave_after(read_bytes: int, reset: bool) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        if read_bytes:
            await reader.read(read_bytes)
        if reset:
            writer.transport.abort()
        else:
            writer.close()  # a FIN: aiohttp closes its side before it hears of the loss

    for _ in range(5):
        await asyncio.gather(
            *(leave_after(n, reset) for n in (0, 0, 1, 10, 100, 300) for reset in (True, False))
        )
    await wait_until(lambda: pool_is_idle(proxy.pool))
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, errors[0].getMessage()


class AnswersAsTheClientLeaves(BareNode):
    """Holds each POST until the test sends the answer, in the callback where the client
    hangs up: the proxy learns both in one turn of its loop."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: asyncio.Queue[tuple[asyncio.StreamWriter, asyncio.Future[None]]]
        self.asked = asyncio.Queue()

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        answered = asyncio.get_running_loop().create_future()
        await self.asked.put((writer, answered))
        await answered


async def test_client_leaving_as_the_node_answers_logs_no_server_error(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    node = AnswersAsTheClientLeaves()
    await node.start()
    proxy = await start_proxy([node])  # type: ignore[list-item]
    host, port = proxy.url.removeprefix("http://").split(":")
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    for _ in range(20):
        _, client = await asyncio.open_connection(host, int(port))
        client.write(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}")
        to_proxy, answered = await node.asked.get()
        client.close()  # a FIN: the proxy closes its side before it hears of the loss
        to_proxy.write(answer)
        answered.set_result(None)
    await wait_until(lambda: pool_is_idle(proxy.pool))
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, errors[0].getMessage()
