"""Model-aware routing, merged listings and fan-out model management over a mixed fleet."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from proxy.sim import SimNode

from .conftest import Proxy, StartNodes, StartProxy, generations

LLAMA, QWEN, NOMIC = "llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest"


async def post(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + path, json=body) as resp:
            return resp.status, await resp.read()


async def get_json(proxy: Proxy, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(proxy.url + path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def models_asked(node: SimNode) -> set[str]:
    return {r.model for r in generations(node) if r.model}


async def test_requests_land_only_on_nodes_with_their_model(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (a,) = await start_nodes(1, models=[LLAMA, QWEN], resident=[LLAMA, QWEN])
    (b,) = await start_nodes(1, models=[QWEN, NOMIC], resident=[QWEN, NOMIC])
    (c,) = await start_nodes(1, models=[NOMIC, LLAMA], resident=[NOMIC, LLAMA])
    proxy = await start_proxy([a, b, c])
    calls = [
        post(proxy, "/api/generate", {"model": "llama3.2", "prompt": "x"}),
        post(proxy, "/api/chat", {"model": QWEN, "messages": []}),
        post(proxy, "/api/embed", {"model": "nomic-embed-text", "input": "x"}),
        post(proxy, "/v1/chat/completions", {"model": QWEN, "messages": []}),
    ] * 6
    results = await asyncio.gather(*calls)
    assert [status for status, _ in results] == [200] * len(calls)
    for node in (a, b, c):
        asked = {m if ":" in m else m + ":latest" for m in models_asked(node)}
        assert asked <= set(node.settings.models), (node.name, asked)
    assert all(len(generations(n)) > 0 for n in (a, b, c))


async def test_unknown_model_is_the_proxys_404(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes)
    status, body = await post(proxy, "/api/generate", {"model": "no-such", "prompt": "x"})
    assert status == 404
    assert json.loads(body) == {"error": 'model "no-such" not found, try pulling it first'}
    assert all(generations(n) == [] for n in nodes)
    client = ollama.AsyncClient(host=proxy.url)
    try:
        with pytest.raises(ollama.ResponseError) as caught:
            await client.chat("no-such", messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 404
    finally:
        await client.close()


async def test_model_only_on_a_down_node_is_503(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (a,) = await start_nodes(1, models=[LLAMA])
    (b,) = await start_nodes(1, models=[QWEN], resident=[QWEN])
    proxy = await start_proxy([a, b])
    proxy.pool.nodes[b.name].up = False
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/chat", json={"model": QWEN}) as resp:
            assert resp.status == 503 and "Retry-After" in resp.headers
            assert "down" in (await resp.json())["error"]


async def test_resident_nodes_first_no_cold_loads(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    everything = [LLAMA, QWEN, NOMIC]
    nodes = [
        (await start_nodes(1, models=everything, resident=[model], load_delay=0.5))[0]
        for model in everything
    ]
    proxy = await start_proxy(nodes, caps=[2, 2, 2])
    bodies = [{"model": m, "prompt": "x", "stream": False} for m in everything] * 10
    results = await asyncio.gather(*(post(proxy, "/api/generate", b) for b in bodies))
    assert all(status == 200 for status, _ in results)
    assert [n.stats.cold_loads for n in nodes] == [0, 0, 0]
    assert [n.stats.max_active for n in nodes] == [2, 2, 2]  # caps hold; queue absorbed it
    for node, model in zip(nodes, everything, strict=True):
        assert models_asked(node) == {model}


async def test_one_cold_load_per_model_when_none_is_loaded(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(3, models=[LLAMA, QWEN], resident=[], load_delay=0.3)
    proxy = await start_proxy(nodes, caps=[2, 2, 2])
    bodies = [{"model": m, "prompt": "x", "stream": False} for m in (LLAMA, QWEN)] * 6
    for batch in (bodies[:2], bodies[2:]):  # the first of each model, then the rest
        results = await asyncio.gather(*(post(proxy, "/api/generate", b) for b in batch))
        assert all(status == 200 for status, _ in results)
    assert sum(n.stats.cold_loads for n in nodes) == 2
    text = await proxy.metrics_text()
    assert text.count("ollama_proxy_cold_loads_total{") == 2


async def test_spill_to_a_cold_node_after_waiting(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (warm,) = await start_nodes(1, models=[LLAMA], resident=[LLAMA], tokens=30, token_interval=0.02)
    (cold,) = await start_nodes(1, models=[LLAMA], resident=[])
    proxy = await start_proxy([warm, cold], caps=[1, 1], routing={"spill_after": 0.1})
    body = {"model": LLAMA, "prompt": "x", "stream": False}
    results = await asyncio.gather(
        post(proxy, "/api/generate", body), post(proxy, "/api/generate", body)
    )
    assert [s for s, _ in results] == [200, 200]
    assert cold.stats.cold_loads == 1  # the second did not wait the whole first generation


async def test_per_model_cap_on_a_node(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    (node,) = await start_nodes(1, resident=[NOMIC], token_interval=0.01)
    config_node = {"model_concurrency": {"nomic-embed-text": 1}}
    proxy = await start_proxy([node], caps=[4], node_extra=config_node)
    bodies = [{"model": "nomic-embed-text", "input": "x"}] * 5
    results = await asyncio.gather(*(post(proxy, "/api/embed", b) for b in bodies))
    assert all(status == 200 for status, _ in results)
    assert node.stats.max_active == 1


async def test_merged_listings(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    (a,) = await start_nodes(1, models=[LLAMA, QWEN], resident=[LLAMA], version="0.12.6")
    (b,) = await start_nodes(1, models=[QWEN, NOMIC], resident=[QWEN], version="0.11.10")
    proxy = await start_proxy([a, b])
    tags = await get_json(proxy, "/api/tags")
    assert sorted(m["model"] for m in tags["models"]) == sorted([LLAMA, QWEN, NOMIC])
    ps = await get_json(proxy, "/api/ps")
    assert sorted(m["model"] for m in ps["models"]) == sorted([LLAMA, QWEN])
    models = await get_json(proxy, "/v1/models")
    assert models["object"] == "list"
    assert sorted(m["id"] for m in models["data"]) == sorted([LLAMA, QWEN, NOMIC])
    assert await get_json(proxy, "/api/version") == {"version": "0.11.10"}
    client = ollama.AsyncClient(host=proxy.url)
    try:
        listed = await client.list()
        assert len(listed.models) == 3
        shown = await client.show("nomic-embed-text")  # only b has it
        assert shown.details is not None
    finally:
        await client.close()
    assert any(r.path == "/api/show" for r in generations(b))
    assert not any(r.path == "/api/show" for r in generations(a))


async def test_pull_fans_out_with_merged_progress(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2, models=[LLAMA])
    proxy = await start_proxy(nodes)
    status, body = await post(proxy, "/api/pull", {"model": "gemma3:1b"})
    assert status == 200
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines[-1] == {"status": "success"}
    complete = [
        line for line in lines if line.get("completed") and line["completed"] == line["total"]
    ]
    single = next(r for r in nodes[0].stats.requests if r.path == "/api/pull")
    assert single.json == {"model": "gemma3:1b", "stream": True}
    assert complete, lines
    assert max(line["total"] for line in complete) == _layer_total(nodes[0], "gemma3:1b")
    assert all("gemma3:1b" in n.settings.models for n in nodes)
    assert all(r.path == "/api/pull" for n in nodes for r in generations(n))
    # The official client sees one ordinary pull, streaming or not.
    client = ollama.AsyncClient(host=proxy.url)
    try:
        assert (await client.pull("gemma3:4b")).status == "success"
        statuses = [p.status async for p in await client.pull("gemma3:12b", stream=True)]
        assert statuses[-1] == "success"
    finally:
        await client.close()


def _layer_total(node: SimNode, model: str) -> int:
    from proxy.sim.catalog import model_size  # the simulator's own size for that name

    return model_size(model)


async def test_pull_failing_on_one_node_reports_it(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    good, bad = await start_nodes(2)
    proxy = await start_proxy([good, bad])
    await bad.refuse()
    _, body = await post(proxy, "/api/pull", {"model": "gemma3:1b"})
    last = json.loads(body.splitlines()[-1])
    assert "error" in last and bad.name in last["error"] and "1 of 2" in last["error"]
    assert "success" not in body.decode()
    client = ollama.AsyncClient(host=proxy.url)
    try:
        with pytest.raises(ollama.ResponseError, match=bad.name):
            await client.pull("gemma3:1b")
    finally:
        await client.close()


async def test_delete_copy_create_and_blobs_fan_out(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2, models=[LLAMA, QWEN])
    proxy = await start_proxy(nodes)
    async with aiohttp.ClientSession() as session:
        async with session.delete(proxy.url + "/api/delete", json={"model": QWEN}) as resp:
            assert resp.status == 200
        assert all(QWEN not in n.settings.models for n in nodes)
        async with session.delete(proxy.url + "/api/delete", json={"model": QWEN}) as resp:
            assert resp.status == 404
        copy = {"source": "llama3.2", "destination": "mine:latest"}
        async with session.post(proxy.url + "/api/copy", json=copy) as resp:
            assert resp.status == 200
        assert all("mine:latest" in n.settings.models for n in nodes)
        blob = proxy.url + "/api/blobs/sha256:" + "cd" * 32
        async with session.head(blob) as resp:
            assert resp.status == 404
        async with session.post(blob, data=b"weights" * 1000) as resp:
            assert resp.status == 201
        async with session.head(blob) as resp:
            assert resp.status == 200
        create = {"model": "custom", "from": "llama3.2", "stream": False}
        async with session.post(proxy.url + "/api/create", json=create) as resp:
            assert resp.status == 200 and await resp.json() == {"status": "success"}
    assert all("custom:latest" in n.settings.models or "custom" in n.settings.models for n in nodes)


async def test_push_and_openai_model_go_to_a_node_that_has_it(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (a,) = await start_nodes(1, models=[LLAMA])
    (b,) = await start_nodes(1, models=[QWEN], resident=[QWEN])
    proxy = await start_proxy([a, b])
    status, body = await post(proxy, "/api/push", {"model": QWEN, "stream": False})
    assert status == 200 and json.loads(body) == {"status": "success"}
    assert [r.path for r in generations(b)] == ["/api/push"] and generations(a) == []
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        model = await client.models.retrieve(QWEN)
        assert model.id == QWEN
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("no-such")
    finally:
        await client.close()
    assert generations(b)[-1].path == f"/v1/models/{QWEN}"


async def test_every_node_down_is_503_not_404(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    await node.refuse()  # down before the proxy ever listed its models
    proxy = await start_proxy([node])
    status, body = await post(proxy, "/api/generate", {"model": "llama3.2", "prompt": "x"})
    # Never reached, so never listed: not said to have the model, only that none is reachable.
    assert status == 503 and "is reachable" in json.loads(body)["error"]


async def test_ollama_stop_unloads_on_every_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(3, models=[LLAMA, QWEN], resident=[LLAMA, QWEN])
    proxy = await start_proxy(nodes)
    client = ollama.AsyncClient(host=proxy.url)
    try:
        # What `ollama stop llama3.2` sends.
        answer = await client.generate("llama3.2", keep_alive=0)
        assert answer.done_reason == "unload"
        ps = await client.ps()
    finally:
        await client.close()
    assert all(n.settings.resident == [QWEN] for n in nodes)
    assert [m.model for m in ps.models] == [QWEN]
    assert all(n.stats.active == 0 and n.stats.max_active == 0 for n in nodes)  # no slot used


async def test_every_fan_out_carries_the_requests_id_and_origin_to_each_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """Pull, create, copy, delete, blobs and ``ollama stop``: each node's request names the
    client's request (its X-Request-Id) and its Origin, as a proxied request does."""
    nodes = await start_nodes(2, models=[LLAMA, QWEN], resident=[LLAMA])
    proxy = await start_proxy(nodes)
    blob = "/api/blobs/sha256:" + "ab" * 32
    calls: list[tuple[str, str, Any]] = [
        ("POST", "/api/pull", {"model": QWEN, "stream": False}),
        ("POST", "/api/create", {"model": "custom", "from": "llama3.2", "stream": False}),
        ("POST", "/api/copy", {"source": "llama3.2", "destination": "mine"}),
        ("DELETE", "/api/delete", {"model": "mine"}),
        ("HEAD", blob, None),
        ("POST", blob, b"weights"),
        ("POST", "/api/generate", {"model": "llama3.2", "keep_alive": 0}),  # ollama stop
    ]
    origin = "http://localhost:3000"
    async with aiohttp.ClientSession() as session:
        for number, (method, path, body) in enumerate(calls):
            headers = {"Origin": origin, "X-Request-Id": f"client-{number}"}
            sent = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.request(method, proxy.url + path, headers=headers, **sent) as r:
                assert r.status in (200, 201, 404), (path, await r.text())
                assert r.headers["X-Request-Id"] == f"client-{number}"
    for node in nodes:
        heads = [(r, {k.lower(): v for k, v in r.headers.items()}) for r in generations(node)]
        seen = [(r.method, r.path, h.get("x-request-id"), h.get("origin")) for r, h in heads]
        expected = [
            (method, path, f"client-{number}", origin)
            for number, (method, path, _) in enumerate(calls)
        ]
        assert seen == expected, node.name
