"""The proxy and Ollama read every request the same way: blob digests as Ollama validates them,
body keys as Go's encoding/json matches them, and no body the proxy cannot read at all.

Each test asserts on what the nodes saw: what a node runs must be what the proxy routed,
capped and counted.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
import yarl

from proxy.bodies import json_object
from proxy.errors import BadRequest
from proxy.fleet import _error_text, _json_line
from proxy.sim import SimNode

from .conftest import (
    Proxy,
    StartNodes,
    StartProxy,
    generations,
    metric,
    proxy_subprocess,
    wait_until,
)

DIGEST = "sha256:" + "ab" * 32
WELL_FORMED_BLOB = re.compile(r"/api/blobs/sha256[:-][0-9a-fA-F]{64}")
GENERATE = {"prompt": "why is the sky blue?", "stream": False}


async def send(
    proxy: Proxy | str, method: str, target: str, body: bytes = b""
) -> tuple[int, dict[str, Any] | None]:
    """The status and JSON answer for ``target`` sent exactly as written (escapes kept)."""
    base = proxy if isinstance(proxy, str) else proxy.url
    url = yarl.URL(base + target, encoded=True)
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


# --- keys, as Go reads them


async def tiny_and_big(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> tuple[Proxy, SimNode, SimNode]:
    """Two nodes, each with one model loaded: a request's model decides where it goes."""
    (tiny,) = await start_nodes(1, models=["tiny:latest"], resident=["tiny:latest"])
    (big,) = await start_nodes(1, models=["big:latest"], resident=["big:latest"])
    return await start_proxy([tiny, big]), tiny, big


@pytest.mark.parametrize("key", ["Model", "MODEL", "mOdEl"])
async def test_a_key_in_another_case_names_the_field_as_in_go(
    start_nodes: StartNodes, start_proxy: StartProxy, key: str
) -> None:
    proxy, tiny, big = await tiny_and_big(start_nodes, start_proxy)
    status, answer = await send(
        proxy, "POST", "/api/generate", json.dumps({key: "big", **GENERATE}).encode()
    )
    assert status == 200 and answer is not None and answer["done_reason"] == "stop"
    assert seen([tiny]) == []
    assert [r.model for r in generations(big)] == ["big"]  # what the node ran ...
    text = await proxy.metrics_text()  # ... is what the proxy counted
    assert (
        metric(
            text, "ollama_proxy_tokens_total", node="sim1", model="big:latest", type="completion"
        )
        > 0
    )


async def test_keep_alive_0_with_a_prompt_in_another_case_is_a_generation_with_a_slot(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """Ollama generates for this body (``Prompt`` is its prompt); an unload would be sent to
    every node that has the model, with no slot: a generation on each, uncapped."""
    nodes = await start_nodes(
        2, models=["tiny:latest"], resident=["tiny:latest"], token_interval=0.05
    )
    proxy = await start_proxy(nodes, caps=[1, 1])
    body = {"model": "tiny", "keep_alive": 0, "Prompt": "hello there", "stream": True}
    url = proxy.url + "/api/generate"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200
        first = json.loads(await resp.content.readline())
        assert first["done"] is False  # tokens, not an unload's one answer
        in_flight = lambda: sum(n.in_flight for n in proxy.pool.nodes.values())  # noqa: E731
        await wait_until(lambda: in_flight() == 1, what="one slot taken")
        lines = [json.loads(line) for line in (await resp.read()).splitlines()]
    assert lines[-1]["done_reason"] != "unload"
    assert sorted(seen(nodes)) == [("POST", "/api/generate")]  # one node, not all of them
    assert sum(n.stats.completed for n in nodes) == 1


async def test_a_kelvin_sign_key_is_keep_alive_to_go_and_to_the_proxy(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """Go folds by Unicode simple folding: U+212A (Kelvin sign) is a k."""
    nodes = await start_nodes(2, models=["tiny:latest"], resident=["tiny:latest"])
    proxy = await start_proxy(nodes)
    body = json.dumps({"model": "tiny", "\u212aeep_alive": 0}).encode()
    status, answer = await send(proxy, "POST", "/api/generate", body)
    assert status == 200 and answer is not None and answer["done_reason"] == "unload"
    assert seen(nodes) == [("POST", "/api/generate")] * 2  # every node that holds it


AMBIGUOUS = [
    b'{"model": "tiny", "Model": "big", "prompt": "hi"}',
    b'{"Model": "big", "model": "tiny", "prompt": "hi"}',
    b'{"model": "tiny", "model": "big", "prompt": "hi"}',
    b'{"model": "tiny", "\\u006dodel": "big", "prompt": "hi"}',
    b'{"model": "big", "name": "tiny", "NAME": "big"}',
    # Go leaves a string as it was on null: a generation to Ollama, an unload to a reader
    # that lets the last key win
    b'{"model": "tiny", "keep_alive": 0, "prompt": "hi", "prompt": null}',
    b'{"model": "tiny", "keep_alive": 0, "KEEP_ALIVE": "5m", "prompt": ""}',
    b'{"model": "tiny", "keep_alive": 0, "messages": [], "Messages": [{"role": "user"}]}',
]


@pytest.mark.parametrize("body", AMBIGUOUS)
async def test_a_field_named_by_two_keys_is_400_and_reaches_no_node(
    start_nodes: StartNodes, start_proxy: StartProxy, body: bytes
) -> None:
    proxy, tiny, big = await tiny_and_big(start_nodes, start_proxy)
    path = "/api/chat" if b"essages" in body else "/api/generate"
    status, answer = await send(proxy, "POST", path, body)
    assert status == 400 and answer is not None and set(answer) == {"error"}
    assert seen([tiny, big]) == []


async def test_a_field_named_twice_is_400_on_a_path_the_proxy_does_not_know(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    proxy, tiny, big = await tiny_and_big(start_nodes, start_proxy)
    body = b'{"model": "tiny", "Model": "big"}'
    status, _ = await send(proxy, "POST", "/api/experimental/new-inference", body)
    assert status == 400
    assert seen([tiny, big]) == []


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (b'{"Model": "m", "Stream": false, "x": 1}', {"model": "m", "stream": False}),
        (b'{"\\u006dodel": "m"}', {"model": "m"}),
        (
            b'{"\xe2\x84\xaaEEP_ALIVE": 0, "me\xc5\xbf\xc5\xbfages": []}',
            {"keep_alive": 0, "messages": []},
        ),
        # the dotless i folds to itself in Go, not to I; a hyphen is no underscore, a space counts
        (b'{"\xc4\xb1mages": ["x"], "keep-alive": 0, "model ": "m"}', {}),
        (b'{"format": {"model": "m", "Model": "n"}}', {}),  # only top-level keys count
        (b"{}", {}),
    ],
)
def test_fields_are_read_as_go_matches_keys(body: bytes, fields: dict[str, Any]) -> None:
    assert json_object(body, strict=True) == fields


@pytest.mark.parametrize("body", [b"[]", b"[1]", b'"model"', b"1", b"null", b" [ ] "])
def test_a_body_that_is_no_object_is_none_or_400(body: bytes) -> None:
    assert json_object(body, strict=False) is None
    with pytest.raises(BadRequest, match="must be a JSON object"):
        json_object(body, strict=True)


# --- the simulated node reads as Go


@pytest.mark.parametrize(
    ("body", "runs"),
    [
        ({"Model": "big"}, "big"),
        ({"model": "tiny", "Model": "big"}, "big"),  # Go assigns in document order: last wins
        ({"Model": "big", "model": "tiny"}, "tiny"),  # an exact match does not come first
        ({"MODEL": "tiny", "model": None}, "tiny"),  # null leaves a Go string as it was
    ],
)
async def test_the_simulated_node_reads_the_model_as_go(
    start_nodes: StartNodes, body: dict[str, Any], runs: str
) -> None:
    (node,) = await start_nodes(1, models=["tiny:latest", "big:latest"])
    pairs = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in body.items())
    raw = ("{" + pairs + ', "prompt": "hi", "stream": false}').encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + "/api/generate", data=raw) as resp:
            assert resp.status == 200
            assert (await resp.json())["model"] == runs
    assert generations(node)[-1].model == runs


@pytest.mark.parametrize(
    ("body", "unload"),
    [
        (b'{"model": "tiny", "keep_alive": 0}', True),
        (b'{"model": "tiny", "keep_alive": 0, "Prompt": "hi"}', False),
        (b'{"model": "tiny", "keep_alive": 0, "prompt": "hi", "prompt": null}', False),
        (b'{"model": "tiny", "KEEP_ALIVE": 0}', True),
        (b'{"model": "tiny", "keep_alive": 0, "keep_alive": null}', False),
    ],
)
async def test_the_simulated_node_tells_an_unload_as_go(
    start_nodes: StartNodes, body: bytes, unload: bool
) -> None:
    (node,) = await start_nodes(1, models=["tiny:latest"], resident=["tiny:latest"])
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + "/api/generate", data=body) as resp:
            lines = [json.loads(line) for line in (await resp.read()).splitlines()]
    assert (lines[-1]["done_reason"] == "unload") is unload


# --- nesting

DEEP = [
    b"[" * 100_000,
    b'{"model": "llama3.2", "options": ' + b'{"a": ' * 100_000,
    b'{"model": "llama3.2", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
]


@pytest.mark.parametrize("body", DEEP)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/generate"),
        ("POST", "/api/experimental/anything"),
        ("POST", "/api/pull"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
    ],
)
async def test_deeply_nested_json_is_400_without_a_traceback(
    start_nodes: StartNodes,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    method: str,
    path: str,
) -> None:
    nodes = await start_nodes(1)
    proxy = await start_proxy(nodes, max_body_size=1024 * 1024)
    caplog.set_level(logging.DEBUG)
    status, answer = await send(proxy, method, path, body)
    assert status == 400 and answer is not None and "depth" in answer["error"]
    assert seen(nodes) == []
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_a_node_answering_deep_json_is_an_error_of_that_node() -> None:
    """Pull and create merge the nodes' progress lines; delete and copy quote their errors."""
    assert "unreadable progress line" in _json_line(b"[" * 100_000)["error"]
    assert _error_text("[" * 100_000, 500).startswith("status 500: [[[")


async def test_the_simulated_node_answers_deep_json_with_400(start_nodes: StartNodes) -> None:
    (node,) = await start_nodes(1)
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + "/api/generate", data=b"[" * 100_000) as resp:
            assert resp.status == 400
            assert "depth" in (await resp.json())["error"]


# --- the real process


async def test_the_real_process_reads_requests_as_ollama(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (tiny,) = await start_nodes(1, models=["tiny:latest"], resident=["tiny:latest"])
    (big,) = await start_nodes(1, models=["big:latest"], resident=["big:latest"])
    config = tmp_path / "config.yaml"
    nodes = [{"url": n.url, "name": n.name} for n in (tiny, big)]
    config.write_text(yaml.safe_dump({"nodes": nodes}))
    async with proxy_subprocess(config) as (url, _):
        blob = await send(url, "POST", "/api/blobs/..%2F..%2Fapi%2Fgenerate", b'{"model":"big"}')
        deep = await send(url, "POST", "/api/generate", b"[" * 100_000)
        ambiguous = await send(url, "POST", "/api/generate", b'{"model":"tiny","Model":"big"}')
        assert seen([tiny, big]) == []
        status, _ = await send(url, "POST", "/api/generate", b'{"Model":"big","prompt":"hi"}')
    assert blob == (400, {"error": "invalid digest format"})
    assert deep[0] == ambiguous[0] == 400
    assert status == 200 and seen([tiny, big]) == [("POST", "/api/generate")]
    assert [r.model for r in generations(big)] == ["big"]


def test_keep_alive_false_is_no_unload() -> None:
    """Python's ``False == 0``; Go's decoder refuses a bool for a duration: not an unload."""
    from proxy.models import is_unload_request

    assert is_unload_request("/api/generate", {"model": "m", "keep_alive": 0})
    assert not is_unload_request("/api/generate", {"model": "m", "keep_alive": False})
