"""Reload without dropping streams, drain, admin paths, token telemetry and the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.sim import SimNode

from .conftest import (
    StartNodes,
    StartProxy,
    generations,
    metric,
    proxy_config_data,
    proxy_subprocess,
    wait_until,
)

GENERATE = {"model": "llama3.2", "prompt": "one two three"}


def write_config(path: Path, nodes: list[SimNode], **top: Any) -> None:
    data = proxy_config_data(nodes, reload={"poll_interval": 0.05}, **top)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    tmp.replace(path)  # as editors and ConfigMaps do: a new file in its place


class SteadyLoad:
    """Workers sending streaming generates back to back; every failure is kept."""

    def __init__(self, url: str, workers: int = 4) -> None:
        self.url = url
        self.workers = workers
        self.completed = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> SteadyLoad:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _worker(self) -> None:
        while not self._stop.is_set():
            async with self._session.post(self.url + "/api/generate", json=GENERATE) as resp:
                body = await resp.read()
            last = json.loads(body.splitlines()[-1]) if body else {}
            if resp.status != 200 or last.get("done") is not True:
                self.failures.append(f"{resp.status} {body[-200:]!r}")
            else:
                self.completed += 1


@pytest.fixture
async def three_nodes(start_nodes: StartNodes) -> list[SimNode]:
    return await start_nodes(3, tokens=5, token_interval=0.01)


async def test_reload_adds_and_removes_nodes_under_load(
    three_nodes: list[SimNode], start_proxy: StartProxy, tmp_path: Path
) -> None:
    a, b, c = three_nodes
    path = tmp_path / "config.yaml"
    write_config(path, [a, b])
    proxy = await start_proxy([], config_path=path)
    async with SteadyLoad(proxy.url) as load:
        await wait_until(lambda: load.completed >= 10)
        write_config(path, [b, c])  # c joins, a leaves
        await c.wait_for(lambda s: len(s.requests) > 1)  # health check, then traffic
        a_after_reload = len(generations(a))
        await c.wait_for(lambda s: s.completed >= 10)
        await wait_until(lambda: load.completed >= 40)
    assert load.failures == []
    assert len(generations(a)) == a_after_reload  # nothing new since the reload
    assert a.stats.active == 0
    assert [n.name for n in proxy.pool.all_nodes()] == [b.name, c.name]
    text = await proxy.metrics_text()
    assert metric(text, "ollama_proxy_config_reloads_total", result="success") == 1


async def test_a_removed_nodes_kept_alive_connections_are_closed(
    three_nodes: list[SimNode], start_proxy: StartProxy, tmp_path: Path
) -> None:
    a, b, _ = three_nodes
    path = tmp_path / "config.yaml"
    write_config(path, [a, b])
    proxy = await start_proxy([], config_path=path)
    async with aiohttp.ClientSession() as session:
        for _ in range(4):  # least loaded, rotating: both nodes serve
            async with session.post(proxy.url + "/api/generate", json=GENERATE) as resp:
                await resp.read()
    (kept,) = proxy.runtime.forwarder.upstreams.to(a.url).idle
    assert kept.transport is not None
    ours = kept.transport.get_extra_info("sockname")[:2]
    assert ours in a.peers()
    write_config(path, [b])
    assert proxy.runtime.reload() == []
    await wait_until(lambda: ours not in a.peers(), what="the node saw its connection close")


async def test_invalid_reload_keeps_the_old_config(
    three_nodes: list[SimNode], start_proxy: StartProxy, tmp_path: Path
) -> None:
    a, b, _ = three_nodes
    path = tmp_path / "config.yaml"
    write_config(path, [a, b])
    proxy = await start_proxy([], config_path=path)
    path.write_text("nodes:\n  - url: gpu-c:11434\n")
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/-/reload") as resp:
            assert resp.status == 400
            body = await resp.json()
        assert body["errors"] == ["nodes[0].url: must start with http:// or https://"]
        async with session.post(proxy.url + "/api/generate", json=GENERATE) as resp:
            assert resp.status == 200
            await resp.read()
    await wait_until(
        lambda: proxy.runtime.metrics.config_reloads.labels("failure")._value.get() >= 2
    )
    assert sorted(proxy.pool.nodes) == sorted([a.name, b.name])


async def test_the_config_watcher_goes_on_after_a_reload_failed_unexpectedly(
    three_nodes: list[SimNode],
    start_proxy: StartProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b, _ = three_nodes
    path = tmp_path / "config.yaml"
    write_config(path, [a])
    proxy = await start_proxy([], config_path=path)
    reload, failed = proxy.runtime.reload, asyncio.Event()

    def fail_once() -> list[str]:  # a bug of ours, not a rejected file
        if not failed.is_set():
            failed.set()
            raise RuntimeError("a bug in reloading")
        return reload()

    monkeypatch.setattr(proxy.runtime, "reload", fail_once)
    write_config(path, [a, b])
    await failed.wait()
    write_config(path, [a, b])  # the next change of the file is still seen
    await wait_until(lambda: sorted(proxy.pool.nodes) == sorted([a.name, b.name]))


async def test_drained_node_finishes_its_streams_and_gets_nothing_new(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    a, b = await start_nodes(2, tokens=20, token_interval=0.01)
    proxy = await start_proxy([a, b])
    async with SteadyLoad(proxy.url, workers=6) as load, aiohttp.ClientSession() as session:
        await a.wait_for(lambda s: s.active >= 1)
        async with session.post(proxy.url + f"/-/nodes/{a.name}/drain") as resp:
            assert (await resp.json())["state"] == "draining"
        seen_at_drain = len(generations(a))
        await a.wait_for(lambda s: s.active == 0)
        await wait_until(lambda: load.completed >= 30)
    assert load.failures == []
    assert len(generations(a)) == seen_at_drain
    assert a.stats.cancelled == 0  # its streams ran to their end
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + f"/-/nodes/{a.name}/ready") as resp:
            assert (await resp.json())["state"] == "ready"


async def test_token_counters_match_the_nodes(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2, tokens=7)
    proxy = await start_proxy(nodes)
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "a b c d"}]}
    async with aiohttp.ClientSession() as session:
        for path, body in [
            ("/api/generate", GENERATE),
            ("/api/generate", {**GENERATE, "stream": False}),
            ("/api/chat", chat),
            ("/api/chat", {**chat, "stream": False}),
            ("/api/generate", {**GENERATE, "options": {"num_predict": 3}}),
            # Kilobytes of floats: the counts are read from the end of the body only.
            ("/api/embed", {"model": "llama3.2", "input": ["one two", "three four five"]}),
        ]:
            async with session.post(proxy.url + path, json=body) as resp:
                assert resp.status == 200
                await resp.read()
    text = await proxy.metrics_text()

    def total(kind: str) -> float:
        return sum(
            metric(
                text, "ollama_proxy_tokens_total", node=n.name, model="llama3.2:latest", type=kind
            )
            for n in nodes
        )

    assert total("completion") == sum(n.stats.eval_count_total for n in nodes) == 31
    assert total("prompt") == sum(n.stats.prompt_eval_count_total for n in nodes)
    assert sum(n.stats.completed for n in nodes) == 6  # the embedding's 5 tokens among them
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/-/nodes") as resp:
        state = await resp.json()
    speeds = [n["tokens_per_second"].get("llama3.2:latest", 0) for n in state["nodes"]]
    assert all(speed > 0 for speed in speeds)


async def test_access_log_line_per_request(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    (node,) = await start_nodes(1, tokens=4)
    proxy = await start_proxy([node], access_log={"format": "json"})
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy.url + "/api/generate", json=GENERATE, headers={"X-Request-Id": "abc123"}
        ) as resp:
            await resp.read()
    await wait_until(lambda: any("abc123" in r.message for r in caplog.records))
    line = json.loads(next(r.message for r in caplog.records if "abc123" in r.message))
    assert line["status"] == 200 and line["node"] == node.name and line["model"] == "llama3.2"
    assert line["tokens_out"] == 4 and line["tokens_in"] == 3 and line["retries"] == 0
    assert set(line) >= {"client", "method", "path", "queue_s", "ttfb_s", "duration_s"}


async def test_client_cancel_is_logged_as_499(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    (node,) = await start_nodes(1, tokens=100, token_interval=0.02)
    proxy = await start_proxy([node])
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + "/api/generate", json=GENERATE)
        await resp.content.readline()
        resp.close()
    await node.wait_for(lambda s: s.cancelled == 1)
    await wait_until(lambda: any("status=499" in r.message for r in caplog.records))


async def test_admin_token_guards_state_changes(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], admin={"token": "s3cret"})
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + f"/-/nodes/{node.name}/drain") as resp:
            assert resp.status == 401 and "error" in await resp.json()
        async with session.get(proxy.url + "/-/nodes") as resp:
            assert resp.status == 401
        headers = {"Authorization": "Bearer s3cret"}
        async with session.get(proxy.url + "/-/nodes", headers=headers) as resp:
            assert resp.status == 200
        for probe in ("/-/healthy", "/-/ready"):  # probes stay open
            async with session.get(proxy.url + probe) as resp:
                assert resp.status == 200


async def test_readiness_fails_when_shutting_down_or_no_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/-/ready") as resp:
            assert resp.status == 200
        proxy.runtime.shutting_down = True
        async with session.get(proxy.url + "/-/ready") as resp:
            assert resp.status == 503
        async with session.get(proxy.url + "/-/healthy") as resp:
            assert resp.status == 200
        async with session.get(proxy.url + "/-/nope") as resp:
            assert resp.status == 404  # admin namespace: never passed to a node
    assert all(r.path != "/-/nope" for r in node.stats.requests)


async def test_sigterm_lets_streams_finish_and_refuses_new_connections(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1, num_parallel=20, tokens=40, token_interval=0.03)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"nodes": [{"url": node.url, "max_concurrency": 20}]}))
    async with proxy_subprocess(config) as (url, process), aiohttp.ClientSession() as session:

        async def stream() -> dict[str, Any]:
            async with session.post(url + "/api/generate", json=GENERATE) as resp:
                lines = (await resp.read()).splitlines()
            return dict(json.loads(lines[-1]))

        streams = [asyncio.create_task(stream()) for _ in range(20)]
        await node.wait_for(lambda s: s.active == 20)
        process.send_signal(signal.SIGTERM)
        await wait_until(lambda: not port_open(url))  # refused while the streams run on
        assert node.stats.active == 20
        finals = await asyncio.gather(*streams)
        assert all(f.get("done") is True and "error" not in f for f in finals)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    assert node.stats.completed == 20 and node.stats.cancelled == 0


def port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) == 0


async def test_sighup_reloads_the_real_process(start_nodes: StartNodes, tmp_path: Path) -> None:
    a, b = await start_nodes(2)
    config = tmp_path / "config.yaml"
    one_node = {"nodes": [{"url": a.url, "name": "a"}], "reload": {"watch": False}}
    config.write_text(yaml.safe_dump(one_node))
    async with proxy_subprocess(config) as (url, process), aiohttp.ClientSession() as session:
        both = {**one_node, "nodes": [*one_node["nodes"], {"url": b.url, "name": "b"}]}
        config.write_text(yaml.safe_dump(both))  # not watched: only the signal reloads it
        process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(5):
            while True:
                async with session.get(url + "/-/nodes") as resp:
                    names = [n["name"] for n in (await resp.json())["nodes"] if n["up"]]
                if names == ["a", "b"]:
                    break
                await asyncio.sleep(0.05)


async def test_cap_change_applies_to_new_requests(
    start_nodes: StartNodes, start_proxy: StartProxy, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1, num_parallel=10, tokens=10, token_interval=0.01)
    path = tmp_path / "config.yaml"
    write_config(path, [node], caps=[1])
    proxy = await start_proxy([], config_path=path)
    write_config(path, [node], caps=[3])
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/-/reload") as resp:
            assert resp.status == 200
        bodies = [session.post(proxy.url + "/api/generate", json=GENERATE) for _ in range(9)]
        for resp in await asyncio.gather(*bodies):
            await resp.read()
            resp.release()
    assert node.stats.max_active == 3
