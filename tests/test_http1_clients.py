"""HTTP/1.1 as clients speak it, through the proxy's one server (aiohttp's).

On raw sockets, so that the bytes, the order of answers and the connection's life are what is
asserted.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop

from proxy.app import make_app
from proxy.serving import serve
from proxy.sim import SimNode, SimSettings

from .conftest import Proxy, StartNodes, StartProxy, generations, proxy_config


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


async def read_response(reader: asyncio.StreamReader, *, to_head: bool = False) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    body = b""
    if to_head:
        pass
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int(await reader.readuntil(b"\r\n"), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        assert await reader.readexactly(2) == b"\r\n"
    else:
        body = await reader.read()  # delimited by the connection's end
    return Response(int(status_line.split()[1]), headers, body)


def post(path: str, payload: object, *, extra: bytes = b"") -> bytes:
    body = json.dumps(payload).encode()
    return (
        b"POST %b HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%b\r\n%b" % (path.encode(), len(body), extra, body)
    )


def chunked_post(path: str, payload: object) -> bytes:
    body = json.dumps(payload).encode()
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:5], body[5:]))
    return (
        b"POST %b HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n%b0\r\n\r\n"
        % (
            path.encode(),
            chunks,
        )
    )


def get(path: str, method: bytes = b"GET") -> bytes:
    return b"%b %b HTTP/1.1\r\nHost: localhost\r\n\r\n" % (method, path.encode())


GENERATE = {"model": "llama3.2", "prompt": "hi"}


async def connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.serving.port)


async def through_proxy(
    start_nodes: StartNodes, start_proxy: StartProxy, tokens: int, **proxy_settings: Any
) -> tuple[SimNode, Proxy, asyncio.StreamReader, asyncio.StreamWriter]:
    """A node answering ``tokens`` tokens at once, a proxy in front of it, a socket to it."""
    node, *_ = await start_nodes(1, tokens=tokens, token_interval=0.001)
    proxy = await start_proxy([node], **proxy_settings)
    return (node, proxy, *await connect(proxy))


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> Response:
    writer.write(request)
    return await read_response(reader, to_head=request.startswith(b"HEAD"))


async def test_one_connection_carries_every_kind_of_request(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    node, _proxy, reader, writer = await through_proxy(start_nodes, start_proxy, 5)
    streamed = await exchange(reader, writer, post("/api/generate", GENERATE))
    assert streamed.status == 200 and streamed.headers["transfer-encoding"] == "chunked"
    assert b'"done":true' in streamed.body.splitlines()[-1]
    tags = await exchange(reader, writer, get("/api/tags"))
    assert tags.status == 200 and tags.headers["date"].endswith(" GMT")
    assert "llama3.2:latest" in [m["name"] for m in json.loads(tags.body)["models"]]
    head = await exchange(reader, writer, get("/api/version", b"HEAD"))
    assert head.status == 200 and int(head.headers["content-length"]) > 0  # and no body read
    missing = await exchange(reader, writer, post("/api/chat", {"model": "nope", "messages": []}))
    assert missing.status == 404 and "not found" in json.loads(missing.body)["error"]
    embedded = await exchange(reader, writer, post("/api/embed", {**GENERATE, "input": "x"}))
    assert embedded.status == 200 and "embeddings" in json.loads(embedded.body)
    metrics = await exchange(reader, writer, get("/metrics"))
    assert metrics.status == 200 and b"ollama_proxy_requests_total" in metrics.body
    again = await exchange(reader, writer, post("/api/generate", GENERATE))
    assert again.status == 200
    assert [r.path for r in generations(node)] == ["/api/generate", "/api/embed", "/api/generate"]
    writer.close()


async def test_pipelined_requests_are_answered_in_order(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    node, _proxy, reader, writer = await through_proxy(start_nodes, start_proxy, 3)
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    writer.write(
        post("/api/chat", {**chat, "stream": False})
        + post("/api/generate", {**GENERATE, "stream": False})
        + get("/api/ps")
    )
    first, second, third = [await read_response(reader) for _ in range(3)]
    assert "message" in json.loads(first.body) and "response" in json.loads(second.body)
    assert "models" in json.loads(third.body)
    assert [r.path for r in generations(node)] == ["/api/chat", "/api/generate"]
    writer.close()


async def test_a_request_in_small_pieces(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    node, _proxy, reader, writer = await through_proxy(start_nodes, start_proxy, 2)
    request = post("/api/generate", GENERATE)
    for i in range(0, len(request), 7):
        writer.write(request[i : i + 7])
        await writer.drain()
        await asyncio.sleep(0)  # let each piece arrive on its own
    assert (await read_response(reader)).status == 200
    assert generations(node)[0].json == GENERATE
    writer.close()


async def test_a_large_body_in_many_reads(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    node, _proxy, reader, writer = await through_proxy(start_nodes, start_proxy, 2)
    payload = {**GENERATE, "prompt": "x" * 3_000_000}  # a long document, or an image
    request = post("/api/generate", payload)
    for i in range(0, len(request), 65536):
        writer.write(request[i : i + 65536])
        await writer.drain()
    assert (await read_response(reader)).status == 200
    assert generations(node)[0].json == payload
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(chunked_post("/api/generate", GENERATE), 200, id="chunked-body"),
        pytest.param(  # a percent-encoded target: aiohttp decodes it
            post("/api/%67enerate", GENERATE), 200, id="percent-encoded"
        ),
        pytest.param(post("/api/generate", {**GENERATE, "pad": "x" * 300}), 413, id="too-large"),
        pytest.param(b"POST /api/generate HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, id="bad"),
        pytest.param(b"POST /api/generate HTTP/1.1\nContent-Length: 2\n\n{}", 400, id="bare-LF"),
    ],
)
async def test_edge_cases_of_framing(
    start_nodes: StartNodes, start_proxy: StartProxy, request_bytes: bytes, status: int
) -> None:
    node, _proxy, reader, writer = await through_proxy(
        start_nodes, start_proxy, 2, max_body_size=200
    )
    response = await exchange(reader, writer, request_bytes)
    assert response.status == status
    if status == 200:
        assert generations(node)[0].json == GENERATE
    else:
        assert status == 400 or "error" in json.loads(response.body)
    writer.close()


async def test_expect_continue_is_answered(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    _node, _proxy, reader, writer = await through_proxy(start_nodes, start_proxy, 2)
    request = post("/api/generate", GENERATE, extra=b"Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n")  # the body only once the server asks for it
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (await exchange(reader, writer, body)).status == 200
    writer.close()


async def test_http10_client_gets_a_body_ended_by_close(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    _node, _proxy, reader, writer = await through_proxy(start_nodes, start_proxy, 3)
    request = post("/api/generate", GENERATE).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    response = await exchange(reader, writer, request)
    assert response.status == 200 and "transfer-encoding" not in response.headers
    assert b'"done":true' in response.body  # read to the connection's end: the proxy closed it
    writer.close()


async def test_stop_accepting_closes_idle_connections_and_finishes_streams(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    node, *_ = await start_nodes(1, tokens=20, token_interval=0.01)
    proxy = await start_proxy([node])
    idle_reader, idle_writer = await connect(proxy)
    assert (await exchange(idle_reader, idle_writer, get("/api/version"))).status == 200
    busy_reader, busy_writer = await connect(proxy)
    busy_writer.write(post("/api/generate", GENERATE))
    await node.wait_for(lambda stats: stats.active == 1)
    await proxy.serving.stop_accepting()
    async with asyncio.timeout(5):
        assert await idle_reader.read() == b""  # closed at once
    streamed = await read_response(busy_reader)
    assert streamed.body.count(b"\n") == 21 and b'"done":true' in streamed.body  # all of it
    assert await busy_reader.read() == b""  # then closed
    idle_writer.close()
    busy_writer.close()


def test_on_uvloop() -> None:
    """The proxy runs on uvloop (the tests on asyncio's loop): the node connections' and
    aiohttp's transports must behave there as on asyncio's."""

    async def scenario() -> None:
        node = SimNode(SimSettings(resident=["llama3.2:latest"], tokens=2, token_interval=0))
        await node.start()
        serving = await serve(make_app(proxy_config([node])), "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", serving.port)
            for request in (post("/api/generate", GENERATE), get("/metrics"), get("/api/ps")):
                assert (await exchange(reader, writer, request)).status == 200
            assert [r.path for r in generations(node)] == ["/api/generate"]
            writer.close()
        finally:
            await serving.close()
            await node.stop()

    uvloop.run(scenario())
