"""Bytes, headers and chunk timing pass through unchanged; bad input gets Ollama-shaped errors."""

from __future__ import annotations

import asyncio
import gzip
import io
import itertools
import json
import statistics
import time
from collections.abc import AsyncIterator
from datetime import datetime
from types import SimpleNamespace

import aiohttp
import ollama
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.sim import answer_tokens

from .conftest import BareNode, Proxy, StartNodes, StartProxy, generations

HI = [{"role": "user", "content": "hi"}]  # a chat with something to answer (no load request)

GZIPPED = gzip.compress(b'{"models":[]}' * 100)


class RawNode:
    """An upstream that answers fixed bytes and headers and records what it received."""

    def __init__(self) -> None:
        self.seen_headers: list[dict[str, str]] = []
        self.seen_bodies: list[bytes] = []
        self.seen_targets: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")
        self.url = ""
        self.name = "raw"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/api/version":  # the proxy's health check
            return web.json_response({"version": "0.12.6"})
        self.seen_headers.append(dict(request.headers))
        self.seen_targets.append(request.raw_path)
        self.seen_bodies.append(await request.read())
        if request.path == "/short":  # promises 100 bytes, sends 10 and hangs up
            short = web.StreamResponse(headers={"Content-Type": "application/json"})
            short.content_length = 100
            await short.prepare(request)
            await short.write(b'{"a":"1234')
            assert request.transport is not None
            request.transport.abort()
            return short
        if request.path == "/gzip":
            return web.Response(
                body=GZIPPED,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        response = web.StreamResponse(
            status=207,
            reason="Odd But Fine",
            headers={
                "Content-Type": "application/x-ndjson",
                "X-End-To-End": "kept",
                "Connection": "X-Hop-Reply",
                "X-Hop-Reply": "dropped",
                "Set-Cookie": "a=1",
                "X-Name": "Café ☕",  # not ASCII: must not be re-encoded on the way
            },
        )
        await response.prepare(request)
        for part in (b'{"a":1}\n', b'{"b":', b"2}\n", b"\x00\xff raw \r\n"):
            await response.write(part)
        await response.write_eof()
        return response


@pytest.fixture
async def raw_node() -> AsyncIterator[RawNode]:
    node = RawNode()
    await node.server.start_server()
    node.url = str(node.server.make_url("")).rstrip("/")
    yield node
    await node.server.close()


async def test_bytes_status_and_headers_unchanged(
    raw_node: RawNode, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([raw_node])  # type: ignore[list-item]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + "/api/experimental/thing?x=1",
            data=b"\x01 not json",
            headers={
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "1",
                "TE": "trailers",
                "Proxy-Authorization": "secret",
                "X-Client": "kept",
                "Authorization": "Bearer abc",
            },
        ) as resp,
    ):
        body = await resp.read()
        assert (resp.status, resp.reason) == (207, "Odd But Fine")
        assert body == b'{"a":1}\n{"b":2}\n\x00\xff raw \r\n'
        assert resp.headers["X-End-To-End"] == "kept"
        assert resp.headers["Set-Cookie"] == "a=1"
        assert resp.raw_headers[[k for k, _ in resp.raw_headers].index(b"X-Name")][1] == (
            "Café ☕".encode()
        )
        assert "X-Hop-Reply" not in resp.headers
    seen = raw_node.seen_headers[-1]
    assert raw_node.seen_bodies[-1] == b"\x01 not json"
    assert seen["X-Client"] == "kept" and seen["Authorization"] == "Bearer abc"
    assert "X-Hop" not in seen and "TE" not in seen and "Proxy-Authorization" not in seen
    assert seen["Host"] == raw_node.url.removeprefix("http://")


async def test_compressed_body_is_not_decompressed(
    raw_node: RawNode, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([raw_node])  # type: ignore[list-item]
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(proxy.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == GZIPPED
    assert raw_node.seen_headers[-1]["Accept-Encoding"] == "gzip"


async def test_root_answers_like_ollama(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(await start_nodes(1))
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/") as resp:
            assert await resp.text() == "Ollama is running"
        async with session.head(proxy.url + "/") as resp:
            assert resp.status == 200


async def test_unknown_paths_pass_through(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/api/status") as resp:
        assert resp.status == 404
        assert await resp.text() == "404 page not found"
    assert generations(node)[-1].path == "/api/status"


async def test_chunks_arrive_at_the_node_cadence(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(await start_nodes(1, tokens=6, token_interval=0.1))
    arrivals = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}) as r,
    ):
        async for line in r.content:
            arrivals.append((time.time(), json.loads(line)))
    tokens = [(t, chunk) for t, chunk in arrivals if not chunk["done"]]
    assert len(tokens) == 6
    # Each chunk is passed on as it comes (the node stamps when it wrote it), never held back
    # to be batched with the next one, which comes 100 ms later.
    lags = [t - datetime.fromisoformat(chunk["created_at"]).timestamp() for t, chunk in tokens]
    assert max(lags) < 0.05, lags
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(tokens)]
    assert 0.08 < statistics.median(gaps) < 0.15, gaps


async def post_json(proxy: Proxy, path: str, data: bytes) -> tuple[int, dict[str, object]]:
    body = io.BytesIO(data) if len(data) > 1024 * 1024 else data  # as aiohttp advises
    async with aiohttp.ClientSession() as session, session.post(proxy.url + path, data=body) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/api/generate", b"{not json", 400, "invalid JSON in request body"),
        ("/api/chat", b"", 400, "missing request body"),
        ("/api/chat", b"[1, 2]", 400, "request body must be a JSON object"),
        ("/api/generate", b'{"prompt": "hi"}', 400, "model is required"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "model is required"),
        ("/api/embed", b'{"model": "", "input": "x"}', 400, "model is required"),
    ],
)
async def test_bad_input_is_an_ollama_error(
    start_nodes: StartNodes,
    start_proxy: StartProxy,
    path: str,
    body: bytes,
    status: int,
    message: str,
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    got_status, got = await post_json(proxy, path, body)
    assert got_status == status
    if path.startswith("/v1/"):  # OpenAI-shaped, as Ollama's OpenAI layer answers
        assert list(got) == ["error"] and isinstance(got["error"], dict)
        assert got["error"]["type"] == "invalid_request_error"
        assert str(got["error"]["message"]).startswith(message)
    else:
        assert list(got) == ["error"] and str(got["error"]).startswith(message)
    assert all(r.path != path for r in node.stats.requests)


async def test_body_over_limit_is_413(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], max_body_size=4096)
    big = json.dumps({"model": "llama3.2", "prompt": "x" * 5000}).encode()
    status, got = await post_json(proxy, "/api/generate", big)
    assert status == 413 and "larger than" in str(got["error"])
    # Just under the limit passes; also when sent chunked, with no Content-Length.
    small = json.dumps({"model": "llama3.2", "prompt": "x" * 3000, "stream": False}).encode()
    assert (await post_json(proxy, "/api/generate", small))[0] == 200

    async def chunks() -> AsyncIterator[bytes]:
        yield big

    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/api/generate", data=chunks()) as r,
    ):
        assert r.status == 413


async def test_default_limit_takes_large_images(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    image = "A" * (20 * 1024 * 1024)  # 20 MiB of base64: far over aiohttp's 1 MiB default
    body = json.dumps({"model": "llama3.2", "prompt": "x", "images": [image], "stream": False})
    status, _ = await post_json(proxy, "/api/generate", body.encode())
    assert status == 200
    assert len(generations(node)[-1].body) == len(body)


async def test_node_dying_mid_stream_cannot_look_complete(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, tokens=10, fault="die", fault_after_tokens=2)
    proxy = await start_proxy([node])
    lines = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}
        ) as resp,
    ):
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                lines.append(json.loads(line))
    assert [chunk.get("response") for chunk in lines[:2]] == answer_tokens("x", 2)
    assert "error" in lines[-1] and "sim0" in lines[-1]["error"]
    client = ollama.AsyncClient(host=proxy.url)
    try:
        with pytest.raises(ollama.ResponseError, match="failed mid-response"):
            async for _ in await client.generate("llama3.2", "x", stream=True):
                pass
    finally:
        await client.close()


async def test_node_stalling_mid_stream_times_out_as_an_error(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, tokens=10, fault="stall", fault_after_tokens=1)
    proxy = await start_proxy([node], upstream={"idle_timeout": 0.3})
    lines = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/api/chat", json={"model": "llama3.2", "messages": HI}) as resp,
    ):
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                lines.append(json.loads(line))
    assert "error" in lines[-1]
    await node.wait_for(lambda s: s.cancelled == 1)  # the stalled request was closed


async def test_a_kept_alive_connection_times_out_its_next_answer_too(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """The idle timer is armed once per node connection and kept across its requests."""
    (node,) = await start_nodes(1, tokens=3, token_interval=0.001, fault_after_tokens=1)
    proxy = await start_proxy([node], upstream={"idle_timeout": 0.3})
    chat = {"model": "llama3.2", "messages": HI}
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/chat", json=chat) as resp:
            assert b'"done":true' in await resp.read()
        kept = proxy.runtime.forwarder.upstreams.to(node.url).idle
        assert len(kept) == 1  # the next request goes over this connection
        node.settings.fault = "stall"  # the next answer stops after a token
        lines = []
        async with session.post(proxy.url + "/api/chat", json=chat) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for line in resp.content:
                    lines.append(json.loads(line))
    assert "error" in lines[-1] and "no bytes from the node" in lines[-1]["error"]
    await node.wait_for(lambda s: s.cancelled == 1)


async def test_sse_stream_broken_gets_an_sse_error_event(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, tokens=10, fault="die", fault_after_tokens=2)
    proxy = await start_proxy([node])
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True}
    received = b""
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/chat/completions", json=body) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
    last_event = received.strip().split(b"\n\n")[-1]
    assert last_event.startswith(b"data: ") and b'"error"' in last_event
    assert b"[DONE]" not in received


async def test_node_breaking_off_a_short_answer_is_502_json(
    raw_node: RawNode, start_proxy: StartProxy
) -> None:
    """An answer of known length is taken whole before the client sees it: a node that
    breaks off mid-body gets the client a clean error, never a short body."""
    proxy = await start_proxy([raw_node])  # type: ignore[list-item]
    status, got = await post_json(proxy, "/short", b"{}")
    assert status == 502 and "closed the connection mid-response" in str(got["error"])


async def test_node_unreachable_is_502_json(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    await node.refuse()
    status, got = await post_json(proxy, "/api/generate", b'{"model":"llama3.2"}')
    assert status == 502 and "sim0" in str(got["error"])


async def test_head_passes_through(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session:
        async with session.head(proxy.url + "/api/blobs/sha256:" + "ef" * 32) as resp:
            assert resp.status == 404
        assert generations(node)[-1].method == "HEAD"


async def test_blob_upload_is_streamed_to_the_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], max_body_size=1024)  # blobs are not bound by it
    blob = bytes(range(256)) * 4096  # 1 MiB, binary

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(blob), 65536):
            yield blob[start : start + 65536]

    url = proxy.url + "/api/blobs/sha256:" + "ab" * 32
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=pieces()) as resp:
            assert resp.status == 201
        async with session.head(url) as resp:
            assert resp.status == 200
    assert generations(node)[-2].body == blob


async def test_request_target_is_passed_as_sent(raw_node: RawNode, start_proxy: StartProxy) -> None:
    proxy = await start_proxy([raw_node])  # type: ignore[list-item]
    target = "/api/experimental/a%2Fb%20c?q=x%26y&z=%E2%9C%93"
    async with aiohttp.ClientSession() as session:
        async with session.get(yarl.URL(proxy.url + target, encoded=True)) as resp:
            await resp.read()
    assert raw_node.seen_targets[-1] == target


class FloodNode(RawNode):
    """Streams ``total`` bytes as fast as the proxy takes them, counting what it got out."""

    total = 192 * 1024 * 1024  # beyond what loopback socket buffers can hold (32 MiB here)
    piece = b"x" * 65536

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != "/flood":  # health checks and model discovery
            return web.json_response({"version": "0.12.6", "models": []})
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        while self.sent < self.total:
            await response.write(self.piece)  # waits while the proxy is not reading
            self.sent += len(self.piece)
        await response.write_eof()
        return response


async def test_slow_client_pauses_the_node_instead_of_buffering(
    start_proxy: StartProxy,
) -> None:
    node = FloodNode()
    await node.server.start_server()
    node.url = str(node.server.make_url("")).rstrip("/")
    try:
        proxy = await start_proxy([node])  # type: ignore[list-item]
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/flood") as resp:
                # The client reads nothing for a while: the node must be held back, not
                # drained into the proxy's memory.
                previous = -1
                while node.sent != previous:
                    previous = node.sent
                    await asyncio.sleep(0.2)
                assert node.sent < node.total * 2 // 3
                received = 0
                async for chunk in resp.content.iter_any():
                    received += len(chunk)
        assert received == node.total == node.sent
    finally:
        await node.server.close()


class ScriptedNode(BareNode):
    """To a POST, a chunked body sent in the given pieces, each only once the client has
    received ``after`` the last."""

    def __init__(self, script: list[tuple[bytes, bytes]]) -> None:
        super().__init__()
        self.script = script  # (bytes to send, what the client must hold before the next)
        self.client_got = b""
        self.client_progress = asyncio.Condition()

    async def received(self, data: bytes) -> None:
        async with self.client_progress:
            self.client_got += data
            self.client_progress.notify_all()

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        for n, (piece, after) in enumerate(self.script, 1):
            writer.write(piece)
            if not after and n < len(self.script):  # nothing the client could show: give
                await writer.drain()  # the proxy time to read it alone, or loopback would
                await asyncio.sleep(0.02)  # hand it over with the next piece
            async with self.client_progress:
                await self.client_progress.wait_for(lambda a=after: a in self.client_got)


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def through_proxy(start_proxy: StartProxy, node: ScriptedNode) -> tuple[bytes, bytes]:
    """The response head and body the client gets, as bytes, for a node's scripted answer."""
    await node.start()
    proxy = await start_proxy([node])  # type: ignore[list-item]
    reader, writer = await asyncio.open_connection(*yarl.URL(proxy.url).raw_authority.split(":"))
    writer.write(
        b"POST /api/experimental/chunks HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}"
    )
    while data := await reader.read(65536):
        await node.received(data)
    writer.close()
    head, _, body = node.client_got.partition(b"\r\n\r\n")
    return head, body


async def test_reads_cut_anywhere_are_framed_anew_from_what_the_parser_saw(
    start_proxy: StartProxy,
) -> None:
    """The node's chunk framing is never passed on: a read that ends inside a chunk-size line
    (the ``a`` of ``a\r\n``) used to be forwarded as if it held whole chunks."""
    node = ScriptedNode(
        [
            (CHUNKED_HEAD + b'8\r\n{"a":1}\n\r\n', b'{"a":1}'),
            (b"a", b""),  # the size line of the next chunk, cut after its first digit
            (b'\r\n{"bb":22}\n\r\n', b'{"bb":22}'),
            (b"0\r\n\r\n", b""),
        ]
    )
    status_and_headers, body = await through_proxy(start_proxy, node)
    assert status_and_headers.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked" in status_and_headers
    assert dechunk(body) == b'{"a":1}\n{"bb":22}\n'


async def test_whole_body_with_the_head_ends_properly(start_proxy: StartProxy) -> None:
    node = ScriptedNode([(CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n\r\n", b"")])
    _, body = await through_proxy(start_proxy, node)
    assert dechunk(body) == b"hello"


class ClosingNode(ScriptedNode):
    """Ends its answer by closing the connection, as HTTP/1.0 servers do."""

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        await super().answer(writer)
        writer.close()


async def test_body_ended_by_the_node_closing_gets_a_last_chunk(start_proxy: StartProxy) -> None:
    """No length, no chunks: the node's end of connection ends the body; the client's chunked
    answer must still end, or it would wait for ever on a kept-alive connection."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n"
    node = ClosingNode([(head + b'{"a":1}\n', b'{"a":1}'), (b'{"b":2}\n', b'{"b":2}')])
    head_got, body = await through_proxy(start_proxy, node)
    assert b"Transfer-Encoding: chunked" in head_got
    assert dechunk(body) == b'{"a":1}\n{"b":2}\n'


async def test_length_beside_chunks_is_a_bad_gateway(start_proxy: StartProxy) -> None:
    """Both a length and chunks (RFC 9112 6.3: a smuggling risk): llhttp refuses the answer,
    and the client gets a 502 rather than a body framed two ways."""
    head = CHUNKED_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Length: 99\r\n\r\n")
    node = ScriptedNode([(head + b"5\r\nhello\r\n0\r\n\r\n", b"")])
    head_got, body = await through_proxy(start_proxy, node)
    assert head_got.startswith(b"HTTP/1.1 502")
    assert b"invalid HTTP from node" in body


def dechunk(body: bytes) -> bytes:
    """Strictly: every chunk complete, the last one there, nothing after it."""
    content = b""
    while True:
        size_line, crlf, body = body.partition(b"\r\n")
        assert crlf, "chunk size line cut off"
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", "bytes after the last chunk"
            return content
        assert body[size : size + 2] == b"\r\n", "chunk data cut off"
        content, body = content + body[:size], body[size + 2 :]


async def test_http10_client_gets_the_stream_delimited_by_the_connection_end(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """HTTP/1.0 has no chunks: the body is sent as it is and the connection's end closes it."""
    (node,) = await start_nodes(1, tokens=5)
    proxy = await start_proxy([node])
    body = b'{"model": "llama3.2", "prompt": "x"}'
    reader, writer = await asyncio.open_connection(*yarl.URL(proxy.url).raw_authority.split(":"))
    writer.write(b"POST /api/generate HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    answer = await reader.read()  # to the end of the connection
    writer.close()
    head, _, ndjson = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    assert b"Transfer-Encoding" not in head
    lines = [json.loads(line) for line in ndjson.splitlines()]
    assert [line["done"] for line in lines] == [False] * 5 + [True]


async def test_a_node_at_a_sub_path_gets_it_before_every_path(start_proxy: StartProxy) -> None:
    """docs/configuration.md: a path in ``nodes[].url`` goes before every request's path."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.raw_path)
        return web.json_response({"version": "0.12.6", "models": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        node = SimpleNamespace(name="behind", url=str(server.make_url("/ollama")))
        proxy = await start_proxy([node])  # type: ignore[list-item]
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/api/experimental/x?y=1") as resp:
                assert resp.status == 200
        assert "/ollama/api/experimental/x?y=1" in seen
        assert "/ollama/api/version" in seen  # the health checks knew it already
    finally:
        await server.close()
