"""The dashboard's server side: ``/-/events`` (auth, one snapshot with the nodes, at once on a
change, an end at shutdown), the ring of last requests, ``/-/access``, the page's files, and
the header naming the node that answered."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.accesslog import Recent
from proxy.events import RECENT_SHOWN
from proxy.exchange import Exchange

from .conftest import (
    StartNodes,
    StartProxy,
    generations,
    proxy_config_data,
    proxy_subprocess,
    wait_until,
)

TOKEN = "admin-secret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


def key_entry(name: str, secret: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "key_sha256": hashlib.sha256(secret.encode()).hexdigest(), **extra}


async def snapshots(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The ``snapshot`` events of a ``text/event-stream`` answer, as they come."""
    event: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line:
            name, _, value = line.partition(": ")
            event[name] = value
            continue
        assert event.pop("event") == "snapshot"
        yield json.loads(event.pop("data"))


async def first_snapshot(response: aiohttp.ClientResponse) -> dict[str, Any]:
    async for snapshot in snapshots(response):
        return snapshot
    raise AssertionError("the stream ended before its first event")


async def test_the_stream_needs_the_admin_token_and_sends_the_nodes(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes, admin={"token": TOKEN})
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/-/events") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        async with session.get(proxy.url + "/-/access") as r:
            assert r.status == 200 and (await r.json())["admin"] is False
        async with session.get(proxy.url + "/-/access", headers=BEARER) as r:
            assert await r.json() == {"admin": True, "key": None}  # admin.token is no key
        async with session.post(proxy.url + "/api/generate", json=GENERATE) as r:
            assert r.status == 200
            answered_by = r.headers["X-Ollama-Proxy-Node"]
        async with session.get(proxy.url + "/-/events", headers=BEARER) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
            snapshot = await first_snapshot(r)
        async with session.head(proxy.url + "/-/events", headers=BEARER) as r:
            assert r.status == 405  # a HEAD's answer would never end
    by_name = {n["name"]: n for n in snapshot["nodes"]}
    assert sorted(by_name) == ["sim0", "sim1"]
    for node in by_name.values():
        assert node["up"] and node["state"] == "ready" and node["max_concurrency"] == 4
        assert "llama3.2:latest" in node["models"]
        assert node["resident_until"]["llama3.2:latest"] > time.time()
    assert by_name[answered_by]["requests"] == 1 and by_name[answered_by]["errors"] == 0
    (last,) = snapshot["recent"]
    assert (last["method"], last["path"], last["model"], last["node"], last["status"]) == (
        "POST",
        "/api/generate",
        "llama3.2",
        answered_by,
        200,
    )
    assert last["tokens_out"] == 8 and last["ttfb_s"] is not None
    assert snapshot["traffic"]["requests"] == 1 and snapshot["traffic"]["ttfb"]["p50"] > 0
    assert snapshot["queue"] == {"depth": 0, "by_key": {}}


async def test_in_keys_mode_only_a_key_with_admin_opens_it(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    keys = [
        key_entry("ops", "ops-secret", admin=True),
        key_entry("alice", "alice-secret", requests_per_minute=60),
    ]
    proxy = await start_proxy([node], auth={"keys": keys})
    alice = {"Authorization": "Bearer alice-secret"}
    async with aiohttp.ClientSession() as session:
        for headers in ({}, alice):
            async with session.get(proxy.url + "/-/events", headers=headers) as r:
                assert r.status == 401
        async with session.post(proxy.url + "/api/generate", json=GENERATE, headers=alice) as r:
            assert r.status == 200
        ops = {"Authorization": "Bearer ops-secret"}
        async with session.get(proxy.url + "/-/access", headers=ops) as r:
            assert await r.json() == {"admin": True, "key": "ops"}
        async with session.get(proxy.url + "/-/access", headers=alice) as r:
            assert (await r.json())["admin"] is False
        async with session.get(proxy.url + "/-/events", headers=ops) as r:
            snapshot = await first_snapshot(r)
    usage = {k["name"]: k for k in snapshot["usage"]}
    assert usage["alice"]["windows"]["requests_per_minute"] == {
        **usage["alice"]["windows"]["requests_per_minute"],
        "used": 1,
        "limit": 60,
    }
    assert snapshot["recent"][0]["key"] == "alice"


async def test_a_drain_is_sent_at_once_not_at_the_next_tick(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes, admin={"token": TOKEN})
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/-/events", headers=BEARER) as r:
            stream = snapshots(r)
            await anext(stream)
            drained = time.monotonic()
            async with session.post(proxy.url + "/-/nodes/sim1/drain", headers=BEARER) as d:
                assert d.status == 200
            snapshot = await anext(stream)
            took = time.monotonic() - drained
            await stream.aclose()
    assert {n["name"]: n["state"] for n in snapshot["nodes"]} == {
        "sim0": "ready",
        "sim1": "draining",
    }
    assert took < 0.6  # a tick is 1 s: this one came because the pool changed


async def test_a_graceful_stop_ends_an_open_stream_cleanly_at_once(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(proxy_config_data([node], admin={"token": TOKEN})))
    async with proxy_subprocess(config) as (url, process), aiohttp.ClientSession() as session:
        async with session.get(url + "/-/events", headers=BEARER) as r:
            stream = snapshots(r)
            await anext(stream)
            process.terminate()
            stopped = time.monotonic()
            # The stream's end is clean (its last chunk): aiohttp's own wait of 1 s for
            # handlers, then a cut, would raise ClientPayloadError here.
            async for _ in stream:
                pass
            assert time.monotonic() - stopped < 0.9
        assert await asyncio.wait_for(process.wait(), 10) == 0


def test_the_ring_of_last_requests_is_bounded_and_keeps_no_body() -> None:
    recent = Recent(size=3)
    for number in range(5):
        ex = Exchange("POST", f"/api/chat/{number}" + "x" * 10_000, body=b"b" * 1_000_000)
        ex.status = 200
        recent.record(ex)
    assert [e.path[:11] for e in recent.entries] == [f"/api/chat/{n}" for n in (2, 3, 4)]
    assert all(len(e.path) < 300 for e in recent.entries)  # cut, as the access log cuts it
    assert b"b" * 10 not in repr(recent.entries).encode()
    assert RECENT_SHOWN <= 1024  # the snapshot lists fewer than the default ring holds


async def test_the_page_is_served_from_the_package_with_a_strict_policy(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], admin={"token": TOKEN})
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/-/ui", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/-/ui/"
        async with session.get(proxy.url + "/-/ui/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            page = await r.text()
        for name, content_type in [("app.js", "text/javascript"), ("style.css", "text/css")]:
            assert f'"{name}"' in page
            async with session.get(proxy.url + "/-/ui/" + name) as r:
                assert r.status == 200 and r.content_type == content_type
        async with session.get(proxy.url + "/-/ui/../config.yaml") as r:
            assert r.status == 404
        async with session.get(proxy.url + "/-/ui/missing.js") as r:
            assert r.status == 404 and "error" in await r.json()
    assert generations(node) == []  # the page's paths never reach a node


async def test_in_protected_mode_loopback_needs_no_token(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/-/access") as r:
            assert await r.json() == {"admin": True, "key": None}
        async with session.get(proxy.url + "/-/events") as r:
            snapshot = await first_snapshot(r)
    assert snapshot["proxy"]["auth"] == "protected"
    assert [n["name"] for n in snapshot["nodes"]] == [node.name]


async def test_the_queue_is_shown_by_key(start_nodes: StartNodes, start_proxy: StartProxy) -> None:
    (node,) = await start_nodes(1, tokens=50, token_interval=0.02)  # 1 s each
    keys = [key_entry("ops", "ops-secret", admin=True), key_entry("alice", "alice-secret")]
    proxy = await start_proxy([node], caps=[1], auth={"keys": keys})
    alice = {"Authorization": "Bearer alice-secret"}
    async with aiohttp.ClientSession() as session:

        async def generate() -> int:
            async with session.post(proxy.url + "/api/generate", json=GENERATE, headers=alice) as r:
                await r.read()
                return r.status

        running = [asyncio.create_task(generate()) for _ in range(3)]
        await wait_until(lambda: proxy.pool.queue_depth == 2, what="two waiting")
        ops = {"Authorization": "Bearer ops-secret"}
        async with session.get(proxy.url + "/-/events", headers=ops) as r:
            snapshot = await first_snapshot(r)
        assert await asyncio.gather(*running) == [200] * 3
    assert snapshot["queue"]["by_key"] == {"alice": {"holding": 1, "waiting": 2}}
    assert snapshot["nodes"][0]["in_flight"] == 1 and snapshot["nodes"][0]["queued_for_it"] == 2


async def test_a_node_that_goes_down_is_sent_at_once_with_its_last_error(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes, admin={"token": TOKEN})
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/-/events", headers=BEARER) as r:
            stream = snapshots(r)
            await anext(stream)
            await nodes[1].refuse()
            await wait_until(lambda: not proxy.pool.nodes["sim1"].up, what="sim1 down")
            went_down = time.monotonic()
            async with asyncio.timeout(3):
                async for snapshot in stream:
                    if not snapshot["nodes"][1]["up"]:
                        break
            took = time.monotonic() - went_down
            await stream.aclose()
    down = snapshot["nodes"][1]
    assert down["name"] == "sim1" and down["recent_errors"][-1]["error"]
    assert took < 0.6  # not the next tick's
