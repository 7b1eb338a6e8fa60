"""Per-key windows and conversation affinity shared by replicas in a real Redis: a limit holds
across replicas and across a restart, Redis going away falls back to each replica's own
windows (no request fails) and its return shares them again; a chat alternating between
replicas keeps its node, and every process computes the same conversation keys."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from proxy.affinity import conversation_of
from proxy.errors import RateLimited
from proxy.sim import SimNode

from .conftest import (
    Proxy,
    RedisServer,
    StartNodes,
    StartProxy,
    generations,
    metric,
    proxy_config_data,
    proxy_subprocess,
    wait_until,
)

SECRETS = {"alice": "op-test-alice-s3cr3t", "root": "op-test-root-s3cr3t"}
CHAT = [{"role": "user", "content": "one two three"}]  # three prompt tokens at the sim node


def keys(**limits: int) -> dict[str, Any]:
    """``auth:`` with alice under ``limits`` and root, who may read /-/usage."""
    return {
        "keys": [
            {"name": name, "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}
            | (limits if name == "alice" else {"admin": True})
            for name, secret in SECRETS.items()
        ]
    }


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


async def replicas(
    start_proxy: StartProxy, nodes: list[SimNode], redis: RedisServer, **config: Any
) -> list[Proxy]:
    """Two in-process replicas sharing ``redis``."""
    return [await start_proxy(nodes, state={"redis_url": redis.url}, **config) for _ in "ab"]


async def chat(proxy: Proxy) -> tuple[int, Mapping[str, str]]:
    body = {"model": "llama3.2", "messages": CHAT, "stream": False}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/api/chat", json=body, headers=bearer("alice")) as r,
    ):
        await r.read()
        return r.status, r.headers


async def statuses(order: list[Proxy]) -> list[int]:
    return [(await chat(proxy))[0] for proxy in order]


async def admissions(client: Redis) -> int:
    """The admission scripts Redis has run."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def charged(proxy: Proxy, tokens: int) -> bool:
    """The replica has charged ``tokens`` to alice and sent them to Redis."""
    forwarder = proxy.runtime.forwarder
    usage = forwarder.quotas.keys["alice"].tokens
    return usage["prompt"] + usage["completion"] == tokens and not forwarder.writes.busy


async def test_a_request_limit_holds_across_replicas(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1)
    a, b = await replicas(start_proxy, [node], redis, auth=keys(requests_per_minute=3))
    remaining = [(await chat(p))[1]["X-RateLimit-Remaining-Requests"] for p in (a, b, a)]
    assert remaining == ["2", "1", "0"]
    status, headers = await chat(b)  # the fourth, at whichever replica
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert await statuses([a]) == [429]
    assert len(generations(node)) == 3
    # Found full, a replica refuses without asking Redis again until the window has room.
    assert b.runtime.state.client is not None
    asked = await admissions(b.runtime.state.client)
    assert await statuses([b, b, a]) == [429] * 3
    assert await admissions(b.runtime.state.client) == asked
    async with (
        aiohttp.ClientSession() as s,
        s.get(b.url + "/-/usage", headers=bearer("root")) as r,
    ):
        usage = await r.json()
    assert usage["shared"] is True
    [alice] = [k for k in usage["keys"] if k["name"] == "alice"]
    assert alice["windows"]["requests_per_minute"]["used"] == 3  # the fleet's, not b's 1
    assert alice["requests"] == {"200": 1, "429": 3}  # totals stay per replica


async def test_a_token_budget_holds_across_replicas(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1, tokens=4)  # 3 + 4 tokens an answer
    a, b = await replicas(start_proxy, [node], redis, auth=keys(tokens_per_minute=10))
    assert await statuses([a]) == [200]
    await wait_until(lambda: charged(a, 7), what="a's charge sent")
    assert await statuses([b]) == [200]  # 7 of 10 used: there is room
    await wait_until(lambda: charged(b, 7), what="b's charge sent")
    status, headers = await chat(a)  # 14 of 10, though a itself charged only 7
    assert status == 429
    assert headers["X-RateLimit-Remaining-Tokens"] == "0"
    assert len(generations(node)) == 2


async def test_a_window_survives_a_restart(
    start_nodes: StartNodes, redis: RedisServer, tmp_path: Path
) -> None:
    [node] = await start_nodes(1)
    config = tmp_path / "config.yaml"
    data = proxy_config_data(
        [node], auth=keys(requests_per_minute=2), state={"redis_url": redis.url}
    )
    config.write_text(yaml.safe_dump(data))
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    seen = []
    for _ in range(2):  # the same replica, started twice
        async with proxy_subprocess(config) as (url, _), aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(url + "/api/generate", json=body, headers=bearer("alice")) as r:
                    seen.append(r.status)
    assert seen == [200, 200, 429, 429]
    assert len(generations(node)) == 2


async def test_without_redis_each_replica_holds_its_own_window(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1)
    a, b = await replicas(start_proxy, [node], redis, auth=keys(requests_per_minute=3))
    assert await statuses([a]) == [200]
    redis.stop()  # the replicas find out on their next request, or their next ping
    # Each replica on its own windows, which counted what it admitted while shared.
    assert await statuses([a, a, a]) == [200, 200, 429]
    assert await statuses([b, b, b, b]) == [200, 200, 200, 429]
    assert not a.runtime.state.up and not b.runtime.state.up
    redis.start()  # empty: what was counted meanwhile is each replica's
    await wait_until(lambda: a.runtime.state.up and b.runtime.state.up, timeout=5)
    assert await statuses([b, a, b, a]) == [200, 200, 200, 429]


async def test_a_redis_that_hangs_costs_a_request_half_a_second_at_most(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    """Redis stopped (SIGSTOP: connections open, no answer): the request that finds out waits
    for the command's timeout, then is served from local state, as are the next ones."""
    nodes = await start_nodes(2)
    proxy = await start_proxy(
        nodes, state={"redis_url": redis.url}, auth=keys(requests_per_minute=100)
    )
    history: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    await turn(proxy, history, "before", headers=bearer("alice"))
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)
    try:
        history.append({"role": "user", "content": "and then?"})  # a lookup, and an admission
        started = time.monotonic()
        await turn(proxy, history, "during", headers=bearer("alice"))
        # The one command timeout (0.5 s), the answer, and room for a loaded machine.
        assert time.monotonic() - started < 2
        assert not proxy.runtime.state.up
        assert served_by(nodes, "during") == served_by(nodes, "before")  # the local table
    finally:
        redis.process.send_signal(signal.SIGCONT)
    await wait_until(lambda: proxy.runtime.state.up, timeout=5, what="Redis answering again")


async def test_the_windows_in_redis_slide_as_the_local_ones(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    """Buckets a span past their end leave the window (also after a gap longer than the
    buckets it holds); a full window has room again when its oldest bucket leaves."""
    [node] = await start_nodes(1)
    proxy = await start_proxy(
        [node], state={"redis_url": redis.url}, auth=keys(requests_per_minute=3)
    )
    state, quotas = proxy.runtime.state, proxy.runtime.forwarder.shared_quotas
    assert state.client is not None
    key = state.key("quota", "alice", "requests")
    seconds, _ = await state.client.time()
    for old, gone in ((seconds - 70, "1"), (seconds - 9000, "1")):  # stepped through; scanned
        buckets = {str(old): gone, str(seconds - 30): "2", str(seconds - 5): "1"}
        await state.client.delete(key)
        quotas._refused.clear()  # found full before: refused without asking Redis
        await state.client.hset(key, mapping={**buckets, "sum": 4, "old": old, "new": seconds - 5})
        with pytest.raises(RateLimited) as refused:
            await quotas.admit("alice")
        assert refused.value.retry_after in (31, 32)  # when the bucket of 2 leaves
        assert refused.value.headers["X-RateLimit-Remaining-Requests"] == "0"
        assert await state.client.hget(key, str(old)) is None
        assert await state.client.hget(key, "sum") == b"3"
    await state.client.hset(key, mapping={"sum": 2, str(seconds - 30): 1})  # room for one
    quotas._refused.clear()
    headers = await quotas.admit("alice")
    assert headers["X-RateLimit-Remaining-Requests"] == "0"
    assert headers["X-RateLimit-Reset-Requests"] in ("1m0s", "1m1s")  # the new bucket's


# -- conversation affinity -----------------------------------------------------------------


async def turn(
    proxy: Proxy,
    history: list[dict[str, Any]],
    request_id: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    body = {"model": "llama3.2", "messages": history, "stream": False}
    headers = {"X-Request-Id": request_id, **(headers or {})}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/api/chat", json=body, headers=headers) as r,
    ):
        assert r.status == 200
        history.append((await r.json())["message"])


def served_by(nodes: list[SimNode], request_id: str) -> str:
    [name] = [
        n.name
        for n in nodes
        for r in generations(n)
        if {k.lower(): v for k, v in r.headers.items()}.get("x-request-id") == request_id
    ]
    return name


async def affinity_counts(proxies: list[Proxy]) -> dict[str, float]:
    texts = [await p.metrics_text() for p in proxies]
    return {
        r: sum(metric(t, "ollama_proxy_affinity_total", result=r) for t in texts)
        for r in ("hit", "moved", "new")
    }


async def test_a_chat_alternating_between_replicas_keeps_its_node(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    nodes = await start_nodes(3)
    pair = await replicas(start_proxy, nodes, redis)
    history: list[dict[str, Any]] = [{"role": "system", "content": "Be brief. " * 100}]
    served = []
    for n in range(6):
        proxy = pair[n % 2]
        history.append({"role": "user", "content": f"question {n}: " + "why? " * 20})
        await turn(proxy, history, f"turn-{n}")
        served.append(served_by(nodes, f"turn-{n}"))
        await wait_until(lambda p=proxy: not p.runtime.forwarder.writes.busy, what="the record")
    assert len(set(served)) == 1, served
    assert await affinity_counts(pair) == {"hit": 5, "moved": 0, "new": 1}


async def test_a_node_not_in_this_replicas_config_is_ignored(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes, state={"redis_url": redis.url})
    shared = proxy.runtime.forwarder.shared_affinity
    key = b"k" * 16
    client = proxy.runtime.state.client
    assert client is not None
    await client.set(proxy.runtime.state.key("affinity", key.hex()), "gone-node")
    assert await shared.lookup(key) is None
    await client.set(proxy.runtime.state.key("affinity", key.hex()), nodes[1].name)
    assert await shared.lookup(key) == nodes[1].name


KEYS_OF = """
import json, sys
from proxy.affinity import conversation_of
from proxy.errors import RateLimited
payload = json.loads(sys.stdin.read())
c = conversation_of("/api/chat", payload, "llama3.2:latest")
print(c.lookup.hex(), c.record.hex())
"""


def test_every_process_computes_the_same_keys() -> None:
    """Long texts go into the keys as a digest that is no process's own (``hash`` is keyed
    per process): a replica finds what another recorded."""
    long = "a long system prompt, as most chats have. " * 20
    payload = {
        "messages": [
            {"role": "system", "content": long},
            {"role": "user", "content": "x" * 100},
            {"role": "assistant", "content": [{"type": "text", "text": "y" * 200}]},
            {"role": "user", "content": "and then?"},
        ]
    }
    here = conversation_of("/api/chat", payload, "llama3.2:latest")
    assert here is not None and here.lookup is not None and here.record is not None
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", KEYS_OF],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=20,
        )
        assert done.stdout.split() == [here.lookup.hex(), here.record.hex()]
