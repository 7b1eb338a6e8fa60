"""The response cache: embedding answers replayed byte for byte, keyed by the model's digest."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from redis.asyncio import Redis

from proxy.cache import Entry, Gathered, Lookup, client_directive, request_key
from proxy.config import parse_config
from proxy.http1 import Head
from proxy.sim import SimNode

from .conftest import (
    BareNode,
    Proxy,
    RedisServer,
    StartNodes,
    StartProxy,
    generations,
    metric,
    proxy_config_data,
    wait_until,
)

MODEL = "nomic-embed-text"
EMBED = {"model": MODEL, "input": ["the sky is blue"]}


async def post(url: str, body: Any, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
        return r.status, await r.read(), dict(r.headers)


def embeds(node: SimNode | Any) -> int:
    return len([r for r in generations(node) if "embed" in r.path])


async def cache_metric(proxy: Proxy, result: str) -> float:
    return metric(await proxy.metrics_text(), "ollama_proxy_cache_requests_total", result=result)


async def test_a_second_identical_request_is_replayed_without_a_node(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    [node] = await start_nodes(1)
    proxy = await start_proxy([node])
    status, first, head = await post(proxy.url + "/api/embed", EMBED)
    assert (status, head["X-Cache"]) == (200, "miss")
    # The same meaning in other bytes: keys in another order, spaces.
    other = b'{ "input": ["the sky is blue"],  "model": "nomic-embed-text" }'
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/api/embed", data=other) as r:
            assert r.status == 200
            assert r.headers["X-Cache"] == "hit"
            assert r.headers["Content-Type"] == head["Content-Type"]
            assert "X-Request-Id" in r.headers  # the proxy's own headers as on any answer
            assert await r.read() == first  # the node's bytes, its total_duration and all
    assert embeds(node) == 1
    assert await cache_metric(proxy, "hit") == 1
    assert await cache_metric(proxy, "miss") == 1
    held = metric(await proxy.metrics_text(), "ollama_proxy_cache_bytes")
    assert held == len(first)
    assert proxy.pool.nodes[node.name].in_flight == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "ollama_proxy.access"]
    assert ["node=sim0" in line and "cache=miss" in line for line in logged] == [True, False]
    assert "node=- " in logged[1] and "cache=hit" in logged[1]


async def test_every_embedding_path_is_cached_and_generations_are_not(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node])
    bodies = {
        "/api/embeddings": {"model": MODEL, "prompt": "hi"},
        "/v1/embeddings": {"model": MODEL, "input": "hi"},
        "/api/embed": {"model": MODEL, "input": "hi"},
    }
    for path, body in bodies.items():
        results = [(await post(proxy.url + path, body))[2]["X-Cache"] for _ in range(2)]
        assert results == ["miss", "hit"], path
    assert embeds(node) == 3
    generate = {"model": "llama3.2", "prompt": "hi", "stream": False}
    for _ in range(2):
        _, _, head = await post(proxy.url + "/api/generate", generate)
        assert "X-Cache" not in head
    assert len([r for r in generations(node) if r.path == "/api/generate"]) == 2


async def test_no_cache_bypasses_the_lookup_and_no_store_keeps_nothing(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node])
    url = proxy.url + "/api/embed"
    _, _, head = await post(url, EMBED, **{"Cache-Control": "no-store"})
    assert head["X-Cache"] == "bypass"
    assert (await post(url, EMBED))[2]["X-Cache"] == "miss"  # no-store kept nothing
    _, fresh, head = await post(url, EMBED, **{"Cache-Control": "max-age=0, no-cache"})
    assert head["X-Cache"] == "bypass"
    assert embeds(node) == 3
    _, replayed, head = await post(url, EMBED)
    assert head["X-Cache"] == "hit"
    assert replayed == fresh  # no-cache's fresh answer replaced the one kept before
    assert await cache_metric(proxy, "bypass") == 2


async def test_a_recreated_model_has_a_new_digest_and_misses(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    [node] = await start_nodes(1, pull_interval=0)
    proxy = await start_proxy([node])
    url = proxy.url + "/api/embed"
    assert (await post(url, EMBED))[2]["X-Cache"] == "miss"
    assert (await post(url, EMBED))[2]["X-Cache"] == "hit"
    live = proxy.pool.nodes[node.name]
    before = live.digests[f"{MODEL}:latest"]
    status, _, _ = await post(proxy.url + "/api/create", {"model": MODEL, "from": MODEL})
    assert status == 200
    # Until the node's listing is read again its digest is unknown: nothing cached meanwhile.
    await wait_until(lambda: live.digests.get(f"{MODEL}:latest") not in (None, before))
    _, _, head = await post(url, EMBED)
    assert head["X-Cache"] == "miss"
    assert (await post(url, EMBED))[2]["X-Cache"] == "hit"
    assert embeds(node) == 2


async def test_nodes_that_disagree_on_the_digest_are_not_cached(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    nodes[1].settings.revisions[f"{MODEL}:latest"] = 1  # re-created on one node straight
    proxy = await start_proxy(nodes)
    await proxy.runtime.discovery.refresh_all()
    for _ in range(2):
        _, _, head = await post(proxy.url + "/api/embed", EMBED)
        assert head["X-Cache"] == "bypass"
    assert sum(embeds(n) for n in nodes) == 2
    assert await cache_metric(proxy, "no_digest") == 2
    nodes[0].settings.revisions[f"{MODEL}:latest"] = 1  # and now on the other one too
    await proxy.runtime.discovery.refresh_all()
    heads = [(await post(proxy.url + "/api/embed", EMBED))[2]["X-Cache"] for _ in range(2)]
    assert heads == ["miss", "hit"]


async def test_the_bound_in_bytes_evicts_the_least_recently_used(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node])
    url = proxy.url + "/api/embed"
    bodies = {name: {"model": MODEL, "input": name} for name in "abc"}
    _, answer, _ = await post(url, bodies["a"])
    size = len(answer)  # the three answers differ by a few bytes at most
    data = proxy_config_data([node], cache={"max_bytes": int(size * 2.5)})
    proxy.runtime.apply(parse_config(data))  # a reload: the bound applies to what is held
    assert (await post(url, bodies["b"]))[2]["X-Cache"] == "miss"
    assert (await post(url, bodies["a"]))[2]["X-Cache"] == "hit"  # a is now the newest
    assert (await post(url, bodies["c"]))[2]["X-Cache"] == "miss"  # b goes
    assert (await post(url, bodies["a"]))[2]["X-Cache"] == "hit"
    assert (await post(url, bodies["b"]))[2]["X-Cache"] == "miss"
    assert proxy.runtime.forwarder.cache.held_bytes() <= size * 2.5


async def test_an_answer_expires_after_the_ttl(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node], cache={"ttl": 60})
    now = [1000.0]
    proxy.runtime.forwarder.cache.clock = lambda: now[0]
    url = proxy.url + "/api/embed"
    assert (await post(url, EMBED))[2]["X-Cache"] == "miss"
    now[0] += 59
    assert (await post(url, EMBED))[2]["X-Cache"] == "hit"
    now[0] += 2
    assert (await post(url, EMBED))[2]["X-Cache"] == "miss"
    assert embeds(node) == 2


async def test_off_with_max_bytes_zero(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node], cache={"max_bytes": 0})
    for _ in range(2):
        assert "X-Cache" not in (await post(proxy.url + "/api/embed", EMBED))[2]
    assert embeds(node) == 2


async def test_only_complete_200_answers_are_kept(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    [node] = await start_nodes(1, fault="error500")
    proxy = await start_proxy([node], health_check={"fall": 100})
    url = proxy.url + "/api/embed"
    for _ in range(2):
        status, _, head = await post(url, EMBED)
        assert (status, head["X-Cache"]) == (500, "miss")
    node.settings.fault = "none"
    assert (await post(url, EMBED))[2]["X-Cache"] == "miss"
    assert (await post(url, EMBED))[2]["X-Cache"] == "hit"


class ChunkedEmbedder(BareNode):
    """Answers as Go's net/http does a JSON body over 2 KiB: chunked, no Content-Length."""

    HELLO = (
        b'{"version": "0.12.6", "models": [{"name": "nomic-embed-text:latest", '
        b'"model": "nomic-embed-text:latest", "digest": "abc", "expires_at": '
        b'"2099-01-01T00:00:00Z"}]}'
    )
    BODY = b'{"model":"nomic-embed-text","embeddings":[[' + b"0.125," * 600 + b"0.5]]}"

    def __init__(self) -> None:
        super().__init__()
        self.posts = 0

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        self.posts += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(self.BODY), 1000):
            piece = self.BODY[start : start + 1000]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")


async def test_a_chunked_answer_is_gathered_and_replayed_whole(start_proxy: StartProxy) -> None:
    node = ChunkedEmbedder()
    await node.start()
    proxy = await start_proxy([node])  # type: ignore[list-item]
    await wait_until(lambda: proxy.pool.nodes["bare"].digests != {}, what="the node listed")
    answers = [await post(proxy.url + "/api/embed", EMBED) for _ in range(2)]
    assert [a[2]["X-Cache"] for a in answers] == ["miss", "hit"]
    assert answers[0][1] == answers[1][1] == ChunkedEmbedder.BODY
    assert answers[1][2]["Content-Type"] == "application/json; charset=utf-8"
    assert node.posts == 1


async def test_a_key_reads_only_models_it_may_use_and_a_hit_counts_in_its_window(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    [node] = await start_nodes(1)

    def key(name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "key_sha256": hashlib.sha256(name.encode()).hexdigest(), **extra}

    keys = [key("alice", requests_per_minute=2), key("bob", models=["llama3.2"])]
    proxy = await start_proxy([node], auth={"keys": keys})
    url = proxy.url + "/api/embed"
    alice, bob = ({"Authorization": f"Bearer {name}"} for name in ("alice", "bob"))
    assert (await post(url, EMBED, **alice))[2]["X-Cache"] == "miss"
    assert (await post(url, EMBED, **bob))[0] == 403  # kept, but not for a key without it
    assert (await post(url, EMBED, **alice))[2]["X-Cache"] == "hit"
    assert (await post(url, EMBED, **alice))[0] == 429  # the hit was counted in the minute
    assert embeds(node) == 1


async def test_replicas_share_the_cache_in_redis(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1)
    state = {"redis_url": redis.url}
    first, second = [await start_proxy([node], state=state, cache={"ttl": 30}) for _ in "ab"]
    _, answer, head = await post(first.url + "/api/embed", EMBED)
    assert head["X-Cache"] == "miss"
    kept = first.runtime.forwarder.cache
    await wait_until(lambda: kept.held_bytes() == len(answer), what="the answer in Redis")
    _, replayed, head = await post(second.url + "/api/embed", EMBED)
    assert (head["X-Cache"], replayed) == ("hit", answer)
    assert embeds(node) == 1
    assert len(kept.local) == 0  # kept in Redis, not in the replica
    client = Redis.from_url(redis.url)
    try:
        [name] = await client.keys("ollama-proxy:cache:*")
        assert 29_000 < await client.pttl(name) <= 30_000
        assert (await client.get(name)).endswith(answer)
    finally:
        await client.aclose()


async def test_without_redis_answering_the_cache_is_local_and_requests_are_served(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node], state={"redis_url": redis.url})
    state = proxy.runtime.state
    redis.stop()
    _, _, head = await post(proxy.url + "/api/embed", EMBED)  # the GET fails: a miss
    assert head["X-Cache"] == "miss"
    assert not state.up
    assert (await post(proxy.url + "/api/embed", EMBED))[2]["X-Cache"] == "hit"  # locally
    redis.start()
    await wait_until(lambda: state.up, timeout=5, what="Redis back")
    assert len(proxy.runtime.forwarder.cache.local) == 0  # the fleet's entries are in Redis
    assert (await post(proxy.url + "/api/embed", EMBED))[2]["X-Cache"] == "miss"


async def test_through_the_openai_client(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node])
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused") as client:
        answers = [await client.embeddings.create(model=MODEL, input="hello") for _ in "ab"]
    assert answers[0].data[0].embedding == answers[1].data[0].embedding
    assert embeds(node) == 1


async def test_through_the_ollama_client(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node])
    client = ollama.AsyncClient(host=proxy.url)
    try:
        answers = [await client.embed(model=MODEL, input="hello") for _ in "ab"]
    finally:
        await client.close()
    assert answers[0].embeddings == answers[1].embeddings
    assert answers[0].total_duration == answers[1].total_duration  # replayed, not recomputed
    assert embeds(node) == 1


# -- the pieces, alone ---------------------------------------------------------------------------


def test_the_key_is_the_body_s_meaning_the_path_and_the_digest() -> None:
    one = request_key("/api/embed", "d1", b'{"model":"m","input":"x","truncate":true}')
    assert one == request_key("/api/embed", "d1", b'{"truncate": true, "input":"x", "model":"m"}')
    assert one != request_key("/api/embed", "d2", b'{"model":"m","input":"x","truncate":true}')
    assert one != request_key("/v1/embeddings", "d1", b'{"model":"m","input":"x","truncate":true}')
    assert one != request_key("/api/embed", "d1", b'{"model":"m","input":"y","truncate":true}')
    assert request_key("/api/embed", "d1", b'["not", "an", "object"]') is None
    assert request_key("/api/embed", "d1", b"not json") is None
    assert request_key("/api/embed", "d1", b'{"input":"\\ud800"}') is not None  # a lone half


def test_the_client_s_directives() -> None:
    def directive(**headers: str) -> str:
        return client_directive(CIMultiDictProxy(CIMultiDict(headers)))

    assert directive() == ""
    assert directive(**{"Cache-Control": "No-Cache"}) == "no-cache"
    assert directive(**{"Cache-Control": "max-age=0, no-store"}) == "no-store"
    assert directive(Pragma="no-cache") == "no-cache"
    assert directive(**{"Cache-Control": "max-age=60"}) == ""


def test_an_entry_round_trips_and_a_gathered_answer_past_its_bound_is_not_whole() -> None:
    entry = Entry(200, "application/json; charset=utf-8", b'{"a":\n1}')
    assert Entry.decode(entry.encode()) == entry
    gathered = Gathered(limit=10, tail=2)
    for piece in (b"1234", b"5678"):
        gathered.append(piece)
    assert gathered.whole and list(gathered) == [b"1234", b"5678"]
    for piece in (b"abc", b"d", b"e"):
        gathered.append(piece)
    assert not gathered.whole and list(gathered) == [b"d", b"e"]


async def test_a_gathering_cut_to_its_tail_is_not_kept(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node])
    cache, live = proxy.runtime.forwarder.cache, proxy.pool.nodes[node.name]
    model = f"{MODEL}:latest"
    head = Head(200, raw_headers=[(b"Content-Type", b"application/json")])
    for pieces, kept in (([b"12345678", b"90", b"1"], 0), ([b"1234", b"5678"], 1)):
        gathered = Gathered(limit=10, tail=2)
        for piece in pieces:
            gathered.append(piece)
        cache.store(Lookup("miss", "k", model, live.digests[model]), live, head, gathered)
        assert len(cache.local) == kept
    assert cache.local.get("k", cache.clock()) == Entry(200, "application/json", b"12345678")
