"""What operators see of a request: its status in the metrics and the access log, its id, and
the routing decision at debug level."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest

from .conftest import StartNodes, StartProxy, metric, wait_until

UNLOAD = {"model": "llama3.2", "keep_alive": 0}


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
