"""A node's credentials: never in its URL (where metrics, logs and /-/nodes would show them),
given as ``nodes[].headers`` instead and sent with every kind of request to that node."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import ConfigError, parse_config

from .conftest import StartNodes, StartProxy, wait_until

NODE_TOKEN = "Bearer node-t0ken"
CLIENT_TOKEN = "Bearer client-t0ken"


def config_errors(node: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"nodes": [node]})
    return caught.value.errors


async def test_check_refuses_credentials_in_a_node_url(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"nodes": [{"url": "http://user:pa55@127.0.0.1:11434"}]}))
    check = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "--config", str(config), "--check"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(check.communicate(), 20)
    assert check.returncode == 2
    assert err.decode().splitlines() == [
        f"{config}: nodes[0].url: must not hold credentials (user:password@); "
        "put them in nodes[0].headers"
    ]
    assert b"pa55" not in out + err


@pytest.mark.parametrize(
    "url", ["http://user:pa55@10.0.0.5:11434", "http://user@10.0.0.5", "https://:pa55@h:1"]
)
def test_every_spelling_of_credentials_is_refused(url: str) -> None:
    (error,) = config_errors({"url": url})
    assert error.startswith("nodes[0].url: must not hold credentials") and "pa55" not in error


def test_node_headers_are_checked() -> None:
    headers = {
        "Host": "elsewhere",
        "content-length": "3",
        "Connection": "close",
        "Transfer-Encoding": "chunked",
        "Proxy-Authorization": "Basic eA==",
        "Authorization": "Bearer a\r\nX-Injected: 1",
        "authorization": "Bearer b",
        "Bad Name": "x",
        "X-Number": 5,
        "X-Fine": "yes",
    }
    errors = config_errors({"url": "http://10.0.0.5:11434", "headers": headers})
    assert [e.split(":")[0] for e in errors] == [
        f"nodes[0].headers.{name}" for name in headers if name != "X-Fine"
    ]
    assert "CR, LF" in errors[5] and "twice" in errors[6] and "must be a string" in errors[8]
    config = parse_config({"nodes": [{"url": "http://h:1", "headers": {"X-Fine": "yes"}}]})
    assert config.nodes[0].headers == {"X-Fine": "yes"}
    assert "yes" not in repr(config)  # a config printed anywhere shows no credential


async def test_a_nodes_headers_go_with_every_kind_of_request(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    (node,) = await start_nodes(1, tokens=3)
    proxy = await start_proxy([node], node_extra={"headers": {"Authorization": NODE_TOKEN}})
    client = {"Authorization": CLIENT_TOKEN}
    blob = b"layer bytes"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    async with aiohttp.ClientSession(headers=client) as session:
        generate = {"model": "llama3.2", "prompt": "hi", "stream": False}
        for method, path, body in [
            ("POST", "/api/generate", generate),  # proxied, taking a slot
            ("POST", "/api/show", {"model": "llama3.2"}),  # proxied, no slot
            ("GET", "/api/tags", None),  # merged listings
            ("GET", "/api/ps", None),
            ("GET", "/api/version", None),
            ("POST", "/api/pull", {"model": "qwen2.5:0.5b", "stream": False}),  # fan-out
            ("POST", "/api/copy", {"source": "llama3.2", "destination": "copied"}),
            ("DELETE", "/api/delete", {"model": "copied"}),
        ]:
            async with session.request(method, proxy.url + path, json=body) as resp:
                assert resp.status == 200, (path, await resp.text())
        async with session.head(proxy.url + "/api/blobs/" + digest) as resp:
            assert resp.status == 404
        async with session.post(proxy.url + "/api/blobs/" + digest, data=io.BytesIO(blob)) as resp:
            assert resp.status == 201
        proxy.runtime.discovery.refresh_soon(proxy.pool.nodes[node.name])
        await proxy.runtime.health.check_all()
        await wait_until(lambda: [r.path for r in node.stats.requests].count("/api/ps") >= 3)
        async with session.get(proxy.url + "/-/nodes") as resp:
            state = await resp.text()
        metrics = await proxy.metrics_text()
    seen = {(r.method, r.path) for r in node.stats.requests}
    assert {("GET", "/api/version"), ("GET", "/api/tags"), ("GET", "/api/ps")} <= seen
    assert {
        ("POST", "/api/generate"),
        ("POST", "/api/pull"),
        ("POST", "/api/blobs/" + digest),
    } <= seen
    assert {("HEAD", "/api/blobs/" + digest), ("DELETE", "/api/delete")} <= seen
    assert [r for r in node.stats.requests if r.headers.get("Authorization") != NODE_TOKEN] == []
    shown = [state, metrics, *(r.getMessage() for r in caplog.records)]
    assert not [text for text in shown if "node-t0ken" in text]


class GatedNode:
    """A node behind a check of its bearer token, on a bare socket (every header line as it
    came): 401 unless the request carries exactly one Authorization, the node's."""

    def __init__(self) -> None:
        self.name = "gated"
        self.url = ""
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                self.heads.append(head)
                given = re.findall(rb"(?i)\r\nauthorization: *([^\r]*)", head)
                ok = given == [NODE_TOKEN.encode()]
                body = b'{"version":"0.12.6","models":[]}' if ok else b'{"error":"unauthorized"}'
                status = b"200 OK" if ok else b"401 Unauthorized"
                writer.write(
                    b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
                )
        writer.close()


async def test_a_gated_node_gets_its_token_in_place_of_the_clients(
    start_proxy: StartProxy,
) -> None:
    gate = GatedNode()
    await gate.start()
    try:
        own = {"headers": {"Authorization": NODE_TOKEN}}
        proxy = await start_proxy([gate], node_extra=own)  # type: ignore[list-item]
        assert proxy.pool.nodes["gated"].up  # its first health check passed the gate
        headers = [("Authorization", CLIENT_TOKEN), ("AUTHORIZATION", CLIENT_TOKEN)]
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "hi"}  # no model: to any node (this one lists none)
            async with session.post(proxy.url + "/api/other", json=body, headers=headers) as resp:
                assert resp.status == 200  # proxied: the gate let it through
            async with session.get(proxy.url + "/api/tags", headers=headers) as resp:
                assert resp.status == 200
        paths = [head.split(b" ")[1] for head in gate.heads]
        assert {b"/api/version", b"/api/tags", b"/api/ps", b"/api/other"} <= set(paths)
        assert not [head for head in gate.heads if b"client-t0ken" in head]
    finally:
        await gate.stop()
