"""Logs a client cannot forge or flood: one line per request, control characters escaped,
every field a client shapes cut short; malformed requests as one line, without their bytes."""

from __future__ import annotations

import io
import json
import logging

import aiohttp
import pytest

from .conftest import StartNodes, StartProxy

FORGED_MODEL = "llama9\nid=forged\rstatus=200\x1b[2J\x7f"  # no space: not quoted before
HUGE = 8 * 1024 * 1024  # 8 MiB: far past any real model name or path


def as_json(value: object) -> io.BytesIO:
    """A large JSON body as aiohttp wants it sent (bytes that large warn)."""
    return io.BytesIO(json.dumps(value).encode())


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ollama_proxy.access"]


async def test_control_characters_in_a_model_name_stay_on_one_text_line(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    async with aiohttp.ClientSession() as session:
        body = {"model": FORGED_MODEL, "prompt": "hi"}
        async with session.post(proxy.url + "/api/generate", json=body) as resp:
            assert resp.status == 404
    (line,) = access_lines(caplog)  # written before the answer left
    assert not any(c in line for c in "\n\r\x1b\x7f")
    assert 'model="llama9\\nid=forged\\rstatus=200\\u001b[2J\\u007f"' in line


async def test_control_characters_in_a_path_are_escaped_in_both_formats(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    (node,) = await start_nodes(1)
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    for log_format in ("text", "json"):
        proxy = await start_proxy([node], access_log={"format": log_format})
        async with aiohttp.ClientSession() as session:
            url = proxy.url + "/api/x%09id=forged%1b%7f%E2%80%A8"
            async with session.get(url) as resp:
                assert resp.status == 404  # the node's own answer to an unknown path
    text_line, json_line = access_lines(caplog)
    for line in (text_line, json_line):
        assert not any(c in line for c in "\t\x1b\x7f\u2028")
    assert 'path="/api/x\\tid=forged\\u001b\\u007f\\u2028"' in text_line
    assert json.loads(json_line)["path"] == "/api/x\tid=forged\x1b\x7f\u2028"


async def test_a_huge_model_name_is_cut_in_the_log_and_in_the_error(
    start_nodes: StartNodes, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node], access_log={"format": "json"})
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    async with aiohttp.ClientSession() as session:
        body = {"model": "a" * HUGE, "prompt": "hi"}
        async with session.post(proxy.url + "/api/generate", data=as_json(body)) as resp:
            assert resp.status == 404
            answer = await resp.read()
        async with session.delete(
            proxy.url + "/api/delete", data=as_json({"model": "b" * HUGE})
        ) as resp:
            assert resp.status == 404
            deleted = await resp.read()
    assert len(answer) < 1000 and len(deleted) < 1000
    error = json.loads(answer)["error"]
    assert error.startswith("model 'aaaa") and f"…({HUGE} bytes)' not found" in error
    assert f"…({HUGE + len(':latest')} bytes)' not found" in json.loads(deleted)["error"]
    lines = access_lines(caplog)
    assert len(lines) == 2 and all(len(line) < 1000 for line in lines)
    assert json.loads(lines[0])["model"].endswith(f"…({HUGE} bytes)")


async def test_a_long_admin_path_is_not_echoed_whole(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/-/" + "c" * 8000) as resp:
            assert resp.status == 404
            assert len(await resp.read()) < 1000
