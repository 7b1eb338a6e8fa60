"""The Redis replicas share: the proxy says whether it answers, and serves either way."""

from __future__ import annotations

import aiohttp

from proxy.state import shown_url

from .conftest import RedisServer, StartNodes, StartProxy, metric, wait_until


async def backend_up(url: str, backend: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return metric(await r.text(), "ollama_proxy_state_backend_up", backend=backend)


async def test_without_redis_the_state_is_local(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node])
    assert await backend_up(proxy.url, "local") == 1
    assert proxy.runtime.state.client is None


async def test_the_proxy_notices_redis_go_and_come_back(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    [node] = await start_nodes(1)
    proxy = await start_proxy([node], state={"redis_url": redis.url})
    state = proxy.runtime.state
    assert state.shared
    assert await backend_up(proxy.url, "redis") == 1

    redis.stop()
    await wait_until(lambda: not state.up, timeout=5, what="the proxy to notice Redis went")
    assert await backend_up(proxy.url, "redis") == 0
    async with aiohttp.ClientSession() as s:  # still serving, on local state
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        async with s.post(proxy.url + "/api/generate", json=body) as r:
            assert r.status == 200

    redis.start()
    await wait_until(lambda: state.up, timeout=5, what="the proxy to notice Redis is back")
    assert await backend_up(proxy.url, "redis") == 1


async def test_redis_that_never_answered_is_retried(
    start_nodes: StartNodes, start_proxy: StartProxy, redis: RedisServer
) -> None:
    redis.stop()
    [node] = await start_nodes(1)
    proxy = await start_proxy([node], state={"redis_url": redis.url})
    state = proxy.runtime.state
    assert not state.up
    redis.start()
    await wait_until(lambda: state.up, timeout=5, what="the proxy to find Redis")


def test_a_redis_password_is_never_logged() -> None:
    assert shown_url("redis://user:s3cret@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert shown_url("redis://redis:6379/0") == "redis://redis:6379/0"
