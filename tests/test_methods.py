"""Methods a path does not take, odd HTTP versions and upgrade requests: answered by the proxy
in Ollama's shape, never sent on to a node."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import yarl

from .conftest import StartNodes, StartProxy, generations

LISTED = ["/", "/metrics", "/api/tags", "/api/ps", "/api/version", "/v1/models"]


async def raw_exchange(url: str, request: bytes, timeout: float = 3.0) -> bytes:
    """Everything the proxy sends back until it closes the connection (or AssertionError)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    try:
        async with asyncio.timeout(timeout):
            return await reader.read()
    except TimeoutError:
        raise AssertionError("the proxy left the connection open without answering") from None
    finally:
        writer.close()


@pytest.mark.parametrize("method", ["PUT", "DELETE", "TRACE", "PATCH", "POST"])
async def test_listed_paths_answer_405_to_other_methods(
    start_nodes: StartNodes, start_proxy: StartProxy, method: str
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session:
        for path in LISTED:
            async with session.request(method, proxy.url + path, data=b"{}") as resp:
                assert resp.status == 405, path
                assert resp.headers["Allow"] == "GET, HEAD"
                assert resp.content_type == "application/json"
                error = (await resp.json())["error"]  # OpenAI's shape on /v1/models
                assert method in (error["message"] if path.startswith("/v1/") else error)
    assert generations(node) == []  # not one went to the node


async def test_fleet_and_admin_paths_take_only_their_methods(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session:
        for method, path, allow in [
            ("GET", "/api/pull", "POST"),
            ("POST", "/api/delete", "DELETE"),
            ("GET", "/api/blobs/sha256:0", "HEAD, POST"),
            ("GET", "/-/reload", "POST"),
            ("PUT", "/-/healthy", "GET, HEAD"),
        ]:
            async with session.request(method, proxy.url + path) as resp:
                assert (resp.status, resp.headers["Allow"]) == (405, allow), path
                assert "error" in await resp.json()
    assert generations(node) == []


@pytest.mark.parametrize(
    "request_line",
    [b"POST /api/generate", b"POST /api/generate HTTP/0.9", b"POST /api/generate HTTP/2.0"],
)
async def test_http_0_9_and_2_0_request_lines_are_refused(
    start_nodes: StartNodes, start_proxy: StartProxy, request_line: bytes
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    body = json.dumps({"model": "llama3.2", "prompt": "hi"}).encode()
    head = b"%b\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (request_line, len(body))
    answer = await raw_exchange(proxy.url, head + body)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.endswith(b" 505 HTTP Version Not Supported")
    assert b"Content-Type: application/json" in rest
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert generations(node) == []


async def test_an_upgrade_request_does_not_leave_pipelined_requests_hanging(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """aiohttp's C parser drops what follows an h2c upgrade request in the same read: the
    proxy closes after answering it, so the client knows to send the rest again."""
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    upgrade = (
        b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    pipelined = (
        b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    answer = await raw_exchange(proxy.url, upgrade + pipelined)  # closed, not left open
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in answer
    assert answer.count(b"HTTP/1.1 ") == 1
    again = await raw_exchange(proxy.url, pipelined)  # sent again, as a client does
    assert again.count(b"HTTP/1.1 200 OK\r\n") == 2 and again.endswith(b"Ollama is running")


@pytest.mark.parametrize(
    "asks",
    [
        b"Connection: keep-alive\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n",  # a second line
        b"Connection: x-hop\r\nUpgrade: h2c\r\nconnection: TE, upgrade\r\n",
    ],
    ids=["keep-alive then upgrade", "upgrade among tokens on a later line"],
)
async def test_an_upgrade_asked_for_on_any_connection_line_closes_the_connection(
    start_nodes: StartNodes, start_proxy: StartProxy, asks: bytes
) -> None:
    """llhttp reads every Connection line for the upgrade token, so the request behind is
    dropped just the same (the fuzz found it on /v1/messages): the proxy closes here too."""
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    upgrade = b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n%bContent-Length: 2\r\n\r\n{}"
    pipelined = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answer = await raw_exchange(proxy.url, upgrade % asks + pipelined)  # closed, not left open
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")  # no model: Anthropic's 400
    assert b"\r\nConnection: close\r\n" in answer and answer.count(b"HTTP/1.1 ") == 1
    assert generations(node) == []


async def test_a_path_no_route_takes_gets_an_ollama_shaped_404(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/api/a%0Ab") as resp:  # a newline in the path
            assert resp.status == 404 and resp.content_type == "application/json"
            assert (await resp.json())["error"]


async def test_an_escaped_slash_routes_as_ollama_routes_it(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """Ollama's router matches the decoded path: ``/api%2Fpull`` is a pull on every node,
    ``/api%2Ftags`` the merged listing, not one node's answer."""
    (first,) = await start_nodes(1, models=["a:1"])
    (second,) = await start_nodes(1, models=["b:2"])
    proxy = await start_proxy([first, second])
    async with aiohttp.ClientSession() as session:
        at = yarl.URL(proxy.url + "/api%2Fpull", encoded=True)
        async with session.post(at, json={"model": "c:3", "stream": False}) as resp:
            assert resp.status == 200, await resp.text()
        at = yarl.URL(proxy.url + "/api%2Ftags", encoded=True)
        async with session.get(at) as resp:
            names = sorted(m["name"] for m in (await resp.json())["models"])
        at = yarl.URL(proxy.url + "/api%2Ftags", encoded=True)
        async with session.post(at) as resp:
            assert resp.status == 405  # the decoded path's methods, as Ollama's router
        at = yarl.URL(proxy.url + "/api%2Fblobs%2Fsha256:" + "0" * 64, encoded=True)
        async with session.head(at) as resp:
            assert resp.status == 400  # a path parameter aiohttp cannot hand on: refused
    for node in (first, second):
        assert [r.path for r in generations(node)] == ["/api/pull"]
    assert "a:1" in names and "b:2" in names and "c:3" in names
