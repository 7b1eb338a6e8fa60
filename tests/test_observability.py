"""What operators see of a request: its status in the metrics and the access log, its id, and
the routing decision at debug level."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from proxy.__main__ import _drain as drain
from proxy.sim import SimNode

from .conftest import (
    BareNode,
    StartNodes,
    StartProxy,
    free_port,
    generations,
    metric,
    wait_until,
)

UNLOAD = {"model": "llama3.2", "keep_alive": 0}
GENERATE = {"model": "llama3.2", "prompt": "one two three"}


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.message) for r in caplog.records if r.name == "ollama_proxy.access"]


async def test_an_unload_is_counted_and_logged_as_the_200_it_was(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes, access_log={"format": "json"})
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/generate", json=UNLOAD) as resp:
            assert resp.status == 200
            await resp.read()
    await wait_until(lambda: any(line["path"] == "/api/generate" for line in access_lines(caplog)))
    (line,) = [line for line in access_lines(caplog) if line["path"] == "/api/generate"]
    assert line["status"] == 200
    text = await proxy.metrics_text()
    requests = "ollama_proxy_requests_total"
    assert metric(text, requests, node="", endpoint="/api/generate", code="200") == 1
    assert metric(text, requests, node="", endpoint="/api/generate", code="500") == 0


async def test_streams_cut_at_the_drains_end_are_the_proxys_not_the_clients(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    (node,) = await start_nodes(1, tokens=2000, token_interval=0.02)
    proxy = await start_proxy(
        [node], shutdown={"drain_timeout": 0.1}, access_log={"format": "json"}
    )
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/generate", json=GENERATE) as resp:
            await resp.content.readline()
            await drain(proxy.runtime, proxy.serving, asyncio.Event())
            await proxy.serving.close()
    (line,) = access_lines(caplog)
    assert line["status"] == 503 and line["cut"] == "drain"
    text = proxy.runtime.metrics.render().decode()
    assert metric(text, "ollama_proxy_requests_cut_total", reason="drain") == 1
    assert metric(text, "ollama_proxy_client_disconnects_total") == 0
    generate = {"node": node.name, "endpoint": "/api/generate"}
    assert metric(text, "ollama_proxy_requests_total", **generate, code="503") == 1
    assert metric(text, "ollama_proxy_requests_total", **generate, code="499") == 0


def request_ids(node: SimNode) -> list[str | None]:
    """The ids the node was given, in order, case as aiohttp's server keeps headers."""
    return [
        next((v for k, v in r.headers.items() if k.lower() == "x-request-id"), None)
        for r in generations(node)
    ]


async def test_every_answer_carries_the_request_id_and_the_node_gets_it(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    (node,) = await start_nodes(1, tokens=3)
    proxy = await start_proxy([node], access_log={"format": "json"})
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    async with aiohttp.ClientSession() as session:
        headers = {"X-Request-Id": "client-7"}
        async with session.post(proxy.url + "/api/generate", json=GENERATE, headers=headers) as r:
            await r.read()
            assert r.headers["X-Request-Id"] == "client-7"  # a stream's head
        async with session.post(proxy.url + "/api/generate", json=GENERATE) as r:
            await r.read()
            own = r.headers["X-Request-Id"]
        quiet = {**GENERATE, "stream": False}
        async with session.post(proxy.url + "/api/generate", json=quiet) as r:
            await r.read()
            whole = r.headers["X-Request-Id"]
        missing = {"model": "nothing-like-it", "prompt": "hi"}
        async with session.post(proxy.url + "/api/generate", json=missing) as r:
            assert r.status == 404 and r.headers["X-Request-Id"]  # the proxy's own error
        for path in ("/api/tags", "/", "/-/healthy"):
            async with session.get(proxy.url + path) as r:
                assert r.headers["X-Request-Id"], path
    assert own != whole and "client-7" not in (own, whole)
    assert request_ids(node) == ["client-7", own, whole]
    logged = [line["id"] for line in access_lines(caplog) if line["path"] == "/api/generate"]
    assert logged[:3] == ["client-7", own, whole]


async def test_debug_logs_each_routing_decision(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    (holds,) = await start_nodes(1)  # llama3.2 in memory
    (lacks,) = await start_nodes(1, models=["qwen2.5:0.5b"], resident=[])
    proxy = await start_proxy([holds, lacks])
    nodes = proxy.pool.nodes
    await wait_until(lambda: nodes[holds.name].is_resident("llama3.2:latest"))
    await wait_until(lambda: nodes[lacks.name].models is not None)
    caplog.set_level(logging.DEBUG, logger="ollama_proxy.routing")
    async with aiohttp.ClientSession() as session:
        headers = {"X-Request-Id": "r-1"}
        async with session.post(proxy.url + "/api/generate", json=GENERATE, headers=headers) as r:
            await r.read()
    (line,) = [r.message for r in caplog.records if r.name == "ollama_proxy.routing"]
    assert line.startswith(f"route id=r-1 model=llama3.2:latest node={holds.name} why=resident ")
    assert f"candidates={holds.name} " in line and "queue_s=0.0" in line, line


async def test_a_node_never_reached_is_not_said_to_have_the_model(
    start_proxy: StartProxy,
) -> None:
    dead = BareNode()  # a port nobody listens on: the node was never reachable
    dead.url = f"http://127.0.0.1:{free_port()}"
    proxy = await start_proxy([dead])
    await wait_until(lambda: not proxy.pool.nodes["bare"].up, what="the first check failed")
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/generate", json=GENERATE) as r:
            assert r.status == 503 and r.headers["Retry-After"]
            message = (await r.json())["error"]
        async with session.get(proxy.url + "/-/nodes") as r:
            (node,) = (await r.json())["nodes"]
    assert message == "no node that may have model 'llama3.2' is reachable"
    assert node["recent_errors"], node
    for error in node["recent_errors"]:  # an http:// node: nothing about SSL
        assert "ssl" not in error["error"].lower(), error
    assert "Connection refused" in node["recent_errors"][-1]["error"]


async def test_each_answer_names_the_node_that_gave_it(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes)
    named = {}
    async with aiohttp.ClientSession() as session:
        for number in range(4):
            headers = {"X-Request-Id": f"r{number}"}
            body = {**GENERATE, "stream": number % 2 == 0}  # a stream's head, and a whole answer
            async with session.post(proxy.url + "/api/generate", json=body, headers=headers) as r:
                await r.read()
                named[f"r{number}"] = r.headers["X-Ollama-Proxy-Node"]
        async with session.get(proxy.url + "/api/tags") as r:
            assert "X-Ollama-Proxy-Node" not in r.headers  # the whole fleet's answer
    saw = {request_id(r.headers): n.name for n in nodes for r in generations(n)}
    assert named == saw and len(set(saw.values())) == 2


def request_id(headers: dict[str, str]) -> str:
    return next(v for k, v in headers.items() if k.lower() == "x-request-id")
