"""A pull fanned out to several nodes reads as one Ollama's pull: one sequence of steps, each
layer's total from its first line on, its completed never going back, one final line."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import ollama

from proxy.sim.catalog import layers

from .conftest import Proxy, StartNodes, StartProxy

STEPS = ["pulling manifest", "layers", "verifying sha256 digest", "writing manifest"]


async def pull_lines(proxy: Proxy, model: str) -> list[dict[str, Any]]:
    lines = []
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/pull", json={"model": model}) as resp:
            assert resp.status == 200
            async for line in resp.content:  # as they come, one by one
                lines.append(json.loads(line))
    return lines


def check_monotonic(lines: list[dict[str, Any]], model: str) -> None:
    totals: dict[str, int] = {}
    completed: dict[str, int] = {}
    phases = []
    for line in lines[:-1]:
        assert "error" not in line and line.get("status") != "success", line
        if "digest" in line:
            digest = line["digest"]
            assert line["total"] == totals.setdefault(digest, line["total"]) > 0, line
            assert line["completed"] >= completed.get(digest, 0), (line, completed)
            completed[digest] = line["completed"]
            phase = "layers"
        else:
            phase = line["status"]
        if not phases or phases[-1] != phase:
            phases.append(phase)
    assert phases == STEPS, phases
    assert totals == dict(layers(model))  # each layer's own size, not a sum over nodes
    assert completed == totals


async def test_pull_from_two_nodes_at_different_speeds_is_monotonic(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (fast,) = await start_nodes(1, pull_interval=0.001)
    (slow,) = await start_nodes(1, pull_interval=0.01)
    proxy = await start_proxy([fast, slow])
    lines = await pull_lines(proxy, "gemma3:1b")
    assert lines[-1] == {"status": "success"}
    check_monotonic(lines, "gemma3:1b")
    # The CLI's client sees the same, and an ordinary end.
    async with ollama.AsyncClient(host=proxy.url) as client:
        parts = [p async for p in await client.pull("gemma3:4b", stream=True)]
    assert [p.status for p in parts].count("success") == 1 and parts[-1].status == "success"
    check_monotonic([p.model_dump(exclude_none=True) for p in parts], "gemma3:4b")


async def test_a_node_failing_mid_pull_leaves_the_merge_and_the_end_says_so(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (good,) = await start_nodes(1, pull_interval=0.001)
    (bad,) = await start_nodes(1, pull_interval=0.001)
    proxy = await start_proxy([good, bad])
    await bad.refuse()
    lines = await pull_lines(proxy, "gemma3:1b")
    assert "error" in lines[-1] and bad.name in lines[-1]["error"]
    assert not any(line.get("status") == "success" for line in lines)
    check_monotonic([*lines[:-1], {"status": "success"}], "gemma3:1b")
