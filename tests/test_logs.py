"""Logs a client cannot forge or flood: one line per request, control characters escaped,
every field a client shapes cut short; malformed requests as one line, without their bytes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from .conftest import StartNodes, StartProxy, free_port, proxy_config_data, wait_until

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
            assert resp.status == 400  # a name Ollama refuses: its "invalid model name"
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
            assert resp.status == 400  # too long a name for Ollama: its 400, no name in it
            answer = await resp.read()
        async with session.delete(
            proxy.url + "/api/delete", data=as_json({"model": "b" * HUGE})
        ) as resp:
            assert resp.status == 400
            deleted = await resp.read()
    assert len(answer) < 1000 and len(deleted) < 1000
    assert json.loads(answer)["error"] == "invalid model name"
    assert f'…({HUGE} bytes)" is invalid' in json.loads(deleted)["error"]
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


# Each is a request aiohttp's parser refuses; each quotes a token-like secret.
MALFORMED = [
    b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer s3cr3t\x01tok\r\n\r\n",
    b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nAuthorization Bearer s3cr3t\r\n\r\n",
    b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-Key: s3cr3t" + b"k" * 9000 + b"\r\n\r\n",
    b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nAuthorization: s3cr3t\x00\r\n\r\n",
]


@contextlib.asynccontextmanager
async def proxy_logging(config: Path) -> AsyncIterator[tuple[int, list[str]]]:
    """``python -m proxy`` on a free port; yields (port, the lines of its log so far)."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "--config", str(config)),
        *("--listen", f"127.0.0.1:{port}"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []

    async def collect(stream: asyncio.StreamReader) -> None:
        async for line in stream:
            lines.append(line.decode(errors="replace"))

    collecting = asyncio.create_task(collect(process.stderr))
    try:
        await wait_until(lambda: any("listening on" in line for line in lines), 20)
        yield port, lines
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
        await collecting


async def raw_exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await reader.read()  # aiohttp closes after a 400 for what it could not parse
    writer.close()
    return answer


async def test_a_malformed_request_is_one_line_without_its_bytes(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(proxy_config_data([node])))
    async with proxy_logging(config) as (port, lines):
        start = len(lines)
        for request in MALFORMED:
            assert (await raw_exchange(port, request)).startswith(b"HTTP/1.0 400 ")
        # A good request after them: once its line is in, theirs are too.
        good = b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        assert (await raw_exchange(port, good)).startswith(b"HTTP/1.1 200 ")
        await wait_until(lambda: any("ollama_proxy.access" in line for line in lines[start:]))
        logged = lines[start:]
    assert not any("s3cr3t" in line or "Traceback" in line for line in logged), logged
    malformed = [line for line in logged if "aiohttp.server" in line]
    assert len(malformed) == len(MALFORMED) and all(line.count("\n") == 1 for line in malformed)
    assert all(
        " INFO aiohttp.server: malformed request from 127.0.0.1 answered 400: " in line
        for line in malformed
    )
    assert "Invalid header value char" in malformed[0]
    assert len(logged) == len(MALFORMED) + 1  # and the good request's access line
