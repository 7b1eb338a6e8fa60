"""The proxy and Ollama read every request the same way: blob digests as Ollama validates them.

Each test asserts on what the nodes saw: what a node runs must be what the proxy routed,
capped and counted.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import pytest
import yarl

from proxy.sim import SimNode

from .conftest import Proxy, StartNodes, StartProxy, generations

DIGEST = "sha256:" + "ab" * 32
WELL_FORMED_BLOB = re.compile(r"/api/blobs/sha256[:-][0-9a-fA-F]{64}")
GENERATE = {"prompt": "why is the sky blue?", "stream": False}


async def send(
    proxy: Proxy, method: str, target: str, body: bytes = b""
) -> tuple[int, dict[str, Any] | None]:
    """The status and JSON answer for ``target`` sent exactly as written (escapes kept)."""
    url = yarl.URL(proxy.url + target, encoded=True)
    async with aiohttp.ClientSession() as session, session.request(method, url, data=body) as r:
        raw = await r.read()
        if not raw or r.content_type != "application/json":
            return r.status, None
        return r.status, json.loads(raw)


def seen(nodes: list[SimNode]) -> list[tuple[str, str]]:
    """Every request the nodes saw, beyond the proxy's own checks and discovery."""
    return [(r.method, r.path) for node in nodes for r in generations(node)]


# --- blob digests

TRAVERSALS = [
    # decoded, this is POST /api/generate on every node: a generation without a slot
    ("POST", "/api/blobs/..%2F..%2Fapi%2Fgenerate"),
    ("POST", "/api/blobs/..%2f..%2fapi%2fchat"),
    # a query smuggled into the node's target
    ("POST", f"/api/blobs/{DIGEST}%3Finsecure=true"),
    ("HEAD", f"/api/blobs/{DIGEST}%3Fx=1"),
    # HEAD to any other path on every node
    ("HEAD", "/api/blobs/..%2F..%2Fapi%2Fps"),
    ("HEAD", "/api/blobs/..%2F"),
    # not a digest Ollama accepts
    ("HEAD", "/api/blobs/sha256:abc"),
    ("POST", "/api/blobs/sha512:" + "ab" * 64),
    ("POST", f"/api/blobs/{DIGEST}0"),
    ("POST", f"/api/blobs/{DIGEST[:-1]}g"),
    ("HEAD", f"/api/blobs/{DIGEST}%0A"),
]


@pytest.mark.parametrize(("method", "target"), TRAVERSALS)
async def test_a_blob_path_that_is_no_digest_is_400_and_reaches_no_node(
    start_nodes: StartNodes, start_proxy: StartProxy, method: str, target: str
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes)
    body = json.dumps({"model": "llama3.2", **GENERATE}).encode()
    status, answer = await send(proxy, method, target, body if method == "POST" else b"")
    assert status == 400
    if method == "POST":
        assert answer == {"error": "invalid digest format"}  # Ollama's words
    assert seen(nodes) == []
    assert all(n.stats.completed == 0 for n in nodes)


@pytest.mark.parametrize(
    "digest", [DIGEST, "sha256-" + "ab" * 32, "sha256:" + "AB" * 32, "sha256%3A" + "cd" * 32]
)
async def test_a_blob_digest_ollama_accepts_goes_to_the_nodes_alone(
    start_nodes: StartNodes, start_proxy: StartProxy, digest: str
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes)
    status, _ = await send(proxy, "POST", f"/api/blobs/{digest}?x=1", b"weights")
    assert status == 201
    status, _ = await send(proxy, "HEAD", f"/api/blobs/{digest}")
    assert status == 200
    decoded = digest.replace("%3A", ":")
    assert seen(nodes) == [("POST", f"/api/blobs/{decoded}"), ("HEAD", f"/api/blobs/{decoded}")] * 2
    assert all(WELL_FORMED_BLOB.fullmatch(path) for _, path in seen(nodes))
