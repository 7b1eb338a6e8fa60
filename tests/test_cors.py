"""Browser apps: the proxy answers CORS preflights itself, with Ollama's default origins and
``cors.origins``; refuses other origins and, listening on loopback, other Hosts (403, before any
node); every answer carries the proxy's CORS headers only; fan-outs carry the client's Origin."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import socket
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy import cors
from proxy.config import ConfigError, parse_config

from .conftest import (
    BareNode,
    SimNode,
    StartNodes,
    StartProxy,
    generations,
    proxy_subprocess,
)

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
EXTRA = "https://chat.example.com"
ALLOWED = ["http://localhost:3000", "vscode-webview://1ab2c3d4e5", "tauri://localhost", EXTRA]
REFUSED = "https://evil.example"
# What a browser asks before POSTing JSON with a key, as the SDKs do.
ASKED_HEADERS = "content-type,authorization,x-api-key,anthropic-version,x-stainless-os"


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": ASKED_HEADERS,
    }


def never_local(address: cors.IPAddress) -> bool:
    return False


# -- the policy, as Ollama's ------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost",
        "http://localhost:3000",
        "https://localhost:8443",
        "http://127.0.0.1:5173",
        "https://0.0.0.0",
        "app://obsidian.md",
        "file://",
        "tauri://localhost",
        "vscode-webview://1ab2c3d4e5",
        "vscode-file://vscode-app",
    ],
)
def test_ollamas_default_origins_are_allowed(origin: str) -> None:
    assert cors.Policy.of().allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://localhost.evil.example",
        "http://127.0.0.2:3000",
        "chrome-extension://abcdef",
        "null",
        "http://[::1]:3000",  # not among Ollama's defaults either
    ],
)
def test_other_origins_are_not(origin: str) -> None:
    assert not cors.Policy.of().allows(origin)


def test_configured_origins_extend_the_defaults_with_one_wildcard_each() -> None:
    policy = cors.Policy.of([EXTRA, "chrome-extension://*", "https://*.corp.example"])
    assert policy.allows(EXTRA) and policy.allows("chrome-extension://abcdef")
    assert policy.allows("https://wiki.corp.example") and policy.allows("http://localhost:1")
    assert not policy.allows("https://chat.example.com.evil") and not policy.allows(REFUSED)
    assert cors.Policy.of(["*"]).allows(REFUSED)


def test_any_origin_is_answered_with_a_star_and_no_vary() -> None:
    policy = cors.Policy.of(["*"])
    assert cors.answer_headers(policy, REFUSED)["Access-Control-Allow-Origin"] == "*"
    assert "Vary" not in cors.answer_headers(policy, REFUSED)
    assert "Vary" not in cors.preflight_headers(policy, REFUSED)


def test_the_config_refuses_what_ollama_refuses_to_start_with() -> None:
    nodes = [{"url": "http://127.0.0.1:1"}]
    config = parse_config({"nodes": nodes, "cors": {"origins": [" HTTPS://Chat.Example.com "]}})
    assert config.cors.origins == (EXTRA,)
    bad = ["https://*.a.*", "vscode-webview://abc", 5, ""]
    with pytest.raises(ConfigError) as caught:
        parse_config({"nodes": nodes, "cors": {"origins": bad}})
    assert [e.split(":")[0] for e in caught.value.errors] == [
        f"cors.origins[{i}]" for i in range(4)
    ]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost:11434", True),
        ("LOCALHOST", True),
        ("", True),  # HTTP/1.0 without Host
        ("127.0.0.1:11434", True),
        ("127.9.9.9", True),
        ("[::1]:11434", True),
        ("0.0.0.0:11434", True),
        ("192.168.1.20:11434", True),
        ("10.1.2.3", True),
        ("[fd00::1]:1", True),
        ("app.localhost:3000", True),
        ("printer.local", True),
        ("gpu.internal:11434", True),
        ("box:11434", True),  # the machine's own name
        ("evil.example:11434", False),
        ("localhost.evil.example", False),
        ("8.8.8.8:11434", False),
        ("169.254.1.1", False),  # Go's IsPrivate is RFC 1918 only
        ("ollama-proxy:11434", False),
    ],
)
def test_the_host_rule_is_ollamas(host: str, allowed: bool) -> None:
    assert cors.host_allowed(host, "box", never_local) is allowed


def test_an_address_of_the_machine_itself_is_a_local_host() -> None:
    mine = ipaddress.ip_address("203.0.113.7")
    assert cors.host_allowed("203.0.113.7:11434", "box", lambda a: a == mine)
    assert not cors.host_allowed("203.0.113.8:11434", "box", lambda a: a == mine)


@pytest.mark.parametrize(
    ("listen", "guarded"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)],
)
def test_only_a_proxy_on_loopback_guards_host(listen: str, guarded: bool) -> None:
    assert cors.listens_on_loopback(listen) is guarded


# -- a browser's flow through the proxy --------------------------------------------------------


def browser_requests(node: SimNode) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in generations(node)]


async def test_a_browser_preflights_then_streams_a_chat_from_each_allowed_origin(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], cors={"origins": [EXTRA]})
    async with aiohttp.ClientSession() as session:
        for origin in ALLOWED:
            async with session.options(proxy.url + "/api/chat", headers=preflight(origin)) as resp:
                assert resp.status == 204, origin
                assert resp.headers.getall("Access-Control-Allow-Origin") == [origin]
                allowed = resp.headers["Access-Control-Allow-Headers"].lower().split(",")
                assert set(ASKED_HEADERS.split(",")) <= set(allowed)
                assert "POST" in resp.headers["Access-Control-Allow-Methods"].split(",")
            stream = {**CHAT, "stream": True}
            headers = {"Origin": origin, "Authorization": "Bearer k"}
            async with session.post(proxy.url + "/api/chat", json=stream, headers=headers) as resp:
                assert resp.status == 200
                assert resp.headers.getall("Access-Control-Allow-Origin") == [origin]
                assert "Origin" in resp.headers["Vary"]
                lines = [json.loads(line) async for line in resp.content if line.strip()]
            assert lines[-1]["done"] and "".join(p["message"]["content"] for p in lines)
    assert browser_requests(node) == [("POST", "/api/chat")] * len(ALLOWED)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/generate"),
        ("POST", "/api/embed"),
        ("POST", "/api/show"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/messages"),
        ("GET", "/api/tags"),
        ("POST", "/api/pull"),
        ("DELETE", "/api/delete"),
        ("GET", "/metrics"),
        ("GET", "/-/nodes"),
    ],
)
async def test_every_preflight_is_the_proxys_to_answer(
    start_nodes: StartNodes, start_proxy: StartProxy, method: str, path: str
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    origin = "http://localhost:3000"
    async with aiohttp.ClientSession() as session:
        async with session.options(proxy.url + path, headers=preflight(origin, method)) as resp:
            assert resp.status == 204
            assert await resp.read() == b""
            assert resp.headers["Access-Control-Allow-Origin"] == origin
            assert resp.headers["Access-Control-Max-Age"] == "43200"
    assert [r for r in node.stats.requests if r.method == "OPTIONS"] == []


async def test_a_refused_origin_reaches_no_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    headers = {"Origin": REFUSED}
    async with aiohttp.ClientSession() as session:
        async with session.options(proxy.url + "/api/pull", headers=preflight(REFUSED)) as resp:
            assert resp.status == 403
        for method, path, body in [
            ("DELETE", "/api/delete", {"model": "llama3.2"}),
            ("POST", "/api/pull", {"model": "llama3.2"}),
            ("POST", "/api/chat", CHAT),
        ]:
            async with session.request(method, proxy.url + path, json=body, headers=headers) as r:
                assert r.status == 403, path
                assert "not allowed" in (await r.json())["error"]
                assert "Access-Control-Allow-Origin" not in r.headers
        async with session.post(
            proxy.url + "/v1/chat/completions", json=CHAT, headers=headers
        ) as r:
            assert r.status == 403
            assert (await r.json())["error"]["type"] == "permission_error"
        metrics = await (await session.get(proxy.url + "/metrics")).text()
    assert browser_requests(node) == []
    assert 'code="403"' in metrics  # counted and logged as requests


async def test_requests_without_origin_and_same_origin_pages_pass_as_before(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    own_origin = {"Origin": proxy.url}  # a page the proxy's host serves, calling it
    async with aiohttp.ClientSession() as session:
        for headers in ({}, own_origin):
            async with session.post(proxy.url + "/api/chat", json=CHAT, headers=headers) as r:
                assert r.status == 200
                assert "Access-Control-Allow-Origin" not in r.headers
    assert browser_requests(node) == [("POST", "/api/chat")] * 2


async def test_the_merged_listing_carries_allow_origin(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes)
    origin = "tauri://localhost"
    async with aiohttp.ClientSession() as session:
        for path in ("/api/tags", "/api/ps", "/v1/models", "/api/version"):
            async with session.get(proxy.url + path, headers={"Origin": origin}) as resp:
                assert resp.status == 200
                assert resp.headers.getall("Access-Control-Allow-Origin") == [origin], path
                assert resp.headers["Access-Control-Expose-Headers"] == "X-Request-Id,Retry-After"


class CorsNode(BareNode):
    """A node with Ollama's own CORS headers on its answers (it saw the client's Origin)."""

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        body = b'{"ok":true}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Access-Control-Allow-Origin: http://localhost:3000\r\n"
            b"access-control-allow-credentials: true\r\n"
            b"Vary: Origin\r\nVary: Accept-Encoding\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )


async def test_a_nodes_own_cors_headers_are_replaced_by_the_proxys(
    start_proxy: StartProxy,
) -> None:
    node = CorsNode()
    await node.start()
    proxy = await start_proxy([node], cors={"origins": [EXTRA]})
    async with aiohttp.ClientSession() as session:
        headers = {"Origin": EXTRA}
        async with session.post(proxy.url + "/api/x", json={}, headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers.getall("Access-Control-Allow-Origin") == [EXTRA]
            assert "Access-Control-Allow-Credentials" not in resp.headers
            assert resp.headers.getall("Vary") == ["Origin, Accept-Encoding"]


async def test_fleet_requests_carry_the_clients_origin_to_the_nodes(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes)
    origin = "http://localhost:3000"
    headers = {"Origin": origin}
    async with aiohttp.ClientSession() as session:
        pull = {"model": "qwen2.5:0.5b", "stream": False}
        async with session.post(proxy.url + "/api/pull", json=pull, headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == origin
        copy = {"source": "llama3.2", "destination": "mine"}
        async with session.post(proxy.url + "/api/copy", json=copy, headers=headers) as resp:
            assert resp.status == 200
        deleted = {"model": "mine"}
        async with session.delete(proxy.url + "/api/delete", json=deleted, headers=headers) as r:
            assert r.status == 200
        async with session.get(proxy.url + "/api/tags", headers=headers) as resp:
            assert resp.status == 200
    for node in nodes:
        seen = {
            (r.method, r.path) for r in node.stats.requests if r.headers.get("Origin") == origin
        }
        assert {("POST", "/api/pull"), ("POST", "/api/copy"), ("DELETE", "/api/delete")} <= seen
        assert ("GET", "/api/tags") in seen


async def test_a_proxy_on_loopback_refuses_a_host_that_is_not_local(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])  # listens on 127.0.0.1
    async with aiohttp.ClientSession() as session:
        # DNS rebinding: evil.example now resolves to 127.0.0.1, and the page is same-origin.
        rebound = {"Host": "evil.example:11434", "Origin": "http://evil.example:11434"}
        async with session.post(proxy.url + "/api/pull", json=CHAT, headers=rebound) as resp:
            assert resp.status == 403
            assert "host" in (await resp.json())["error"]
        for host in ("localhost:11434", "app.localhost", "127.0.0.1"):
            async with session.get(proxy.url + "/api/tags", headers={"Host": host}) as resp:
                assert resp.status == 200, host
    assert browser_requests(node) == []


async def test_a_proxy_on_every_address_takes_any_host(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], listen="0.0.0.0:0")
    async with aiohttp.ClientSession() as session:
        headers = {"Host": "ollama.example.com"}
        async with session.post(proxy.url + "/api/chat", json=CHAT, headers=headers) as resp:
            assert resp.status == 200


async def test_the_real_process_answers_preflights_and_guards_host(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"nodes": [{"url": node.url, "name": "n"}]}))
    async with proxy_subprocess(config) as (url, _), aiohttp.ClientSession() as session:
        origin = "vscode-webview://1ab2c3d4e5"
        async with session.options(url + "/api/chat", headers=preflight(origin)) as resp:
            assert (resp.status, resp.headers["Access-Control-Allow-Origin"]) == (204, origin)
        async with session.get(url + "/api/tags", headers={"Host": "evil.example"}) as resp:
            assert resp.status == 403
        async with session.get(url + "/api/tags", headers={"Origin": REFUSED}) as resp:
            assert resp.status == 403
    assert browser_requests(node) == []


# -- a real browser ----------------------------------------------------------------------------

# Run in the page: a streamed chat read with fetch(), as a browser app reads it.
FETCH_CHAT = """async ([url, chat]) => {
    const response = await fetch(url, {
        method: "POST",
        headers: {"Content-Type": "application/json", "Authorization": "Bearer k"},
        body: JSON.stringify(chat),
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    for (let part = await reader.read(); !part.done; part = await reader.read()) {
        text += part.value;
    }
    const lines = text.split("\\n").filter(Boolean).map((line) => JSON.parse(line));
    return lines.map((line) => line.message.content).join("");
}"""
STREAMED_CHAT = {**CHAT, "stream": True}


async def test_chromium_streams_a_chat_from_an_allowed_page_and_not_from_another(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("chromium is not installed (Debian's package; .ci/run installs it)")
    async_api = pytest.importorskip("playwright.async_api")
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    sock = bound_socket()
    port = sock.getsockname()[1]
    pages = web.Application()
    pages.router.add_get("/", blank_page)
    runner = web.AppRunner(pages)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    # evil.test is this machine too, for the browser only: a page on an origin not allowed.
    args = ["--no-sandbox", "--host-resolver-rules=MAP evil.test 127.0.0.1"]
    try:
        async with async_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=executable, args=args)
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/")
            text = await page.evaluate(FETCH_CHAT, [proxy.url + "/api/chat", STREAMED_CHAT])
            assert text.strip()
            await page.goto(f"http://evil.test:{port}/")
            with pytest.raises(async_api.Error, match="Failed to fetch"):
                await page.evaluate(FETCH_CHAT, [proxy.url + "/api/chat", STREAMED_CHAT])
            await browser.close()
    finally:
        await runner.cleanup()
    assert browser_requests(node) == [("POST", "/api/chat")]  # the refused page's never came
    async with aiohttp.ClientSession() as session:
        metrics = await (await session.get(proxy.url + "/metrics")).text()
    assert 'code="403"' in metrics  # its preflight, refused by the proxy


async def blank_page(request: web.Request) -> web.Response:
    return web.Response(text="<!doctype html><title>app</title>", content_type="text/html")


def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock
