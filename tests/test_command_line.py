"""The real process (``python -m proxy``): its listener, its options, demo mode and stopping."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy import __version__

from .conftest import StartNodes, free_port

GENERATE = {"model": "llama3.2", "prompt": "one two three"}


class Running:
    """``python -m proxy ARGS``, its stderr read line by line as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._more = asyncio.Event()
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._more.set()
        self._more.set()

    async def line(self, text: str, within: float = 20) -> str:
        """The first line holding ``text``; fails when the process ends without one."""
        async with asyncio.timeout(within):
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found is not None:
                    return found
                if self._reading.done():
                    raise AssertionError(f"no line with {text!r}:\n" + "\n".join(self.lines))
                self._more.clear()
                await self._more.wait()

    async def exit_code(self, within: float = 20) -> int:
        code = await asyncio.wait_for(self.process.wait(), within)
        await self._reading
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@contextlib.asynccontextmanager
async def run_proxy(*args: str, cwd: Path | None = None) -> AsyncIterator[Running]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", *args),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,  # one stream: argparse's --version goes to stdout
    )
    process.stderr = process.stdout  # read as one
    running = Running(process)
    try:
        yield running
    finally:
        if process.returncode is None:
            process.kill()
        await running.exit_code()


def write_config(path: Path, urls: list[str], **top: Any) -> Path:
    path.write_text(yaml.safe_dump({"nodes": [{"url": url} for url in urls], **top}))
    return path


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.text()


# -- the listener ---------------------------------------------------------------------------


async def test_a_second_proxy_on_a_port_in_use_exits_and_the_first_serves_on(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = write_config(tmp_path / "config.yaml", [node.url])
    listen = f"127.0.0.1:{free_port()}"
    async with run_proxy("--config", str(config), "--listen", listen) as first:
        await first.line("listening on")
        async with run_proxy("--config", str(config), "--listen", listen) as second:
            assert await second.exit_code() == 1
        assert f"cannot listen on {listen}: address in use" in second.output
        for _ in range(10):  # were both listening, the kernel would share these out
            assert await get_text(f"http://{listen}/") == "Ollama is running"
        assert first.process.returncode is None


async def test_two_proxies_share_a_port_when_both_are_told_to(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = write_config(tmp_path / "config.yaml", [node.url], listen_reuse_port=True)
    listen = f"127.0.0.1:{free_port()}"
    async with run_proxy("--config", str(config), "--listen", listen) as first:
        await first.line("listening on")
        async with run_proxy("--config", str(config), "--listen", listen) as second:
            await second.line("listening on")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_listen_takes_an_ipv6_address_in_brackets(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = write_config(tmp_path / "config.yaml", [node.url])
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
    async with run_proxy("--config", str(config), "--listen", f"[::1]:{port}") as proxy:
        line = await proxy.line("listening on")
        assert f"listening on http://[::1]:{port}," in line
        assert await get_text(f"http://[::1]:{port}/") == "Ollama is running"


@pytest.mark.parametrize("listen", [":99999", "127.0.0.1:99999", "::1:8080", "nowhere"])
async def test_listen_is_checked_as_the_files_listen_is(tmp_path: Path, listen: str) -> None:
    config = write_config(tmp_path / "config.yaml", ["http://127.0.0.1:9"])
    async with run_proxy("--config", str(config), f"--listen={listen}") as proxy:
        assert await proxy.exit_code() == 2
    assert proxy.output.startswith("--listen: "), proxy.output
    assert "config.yaml" not in proxy.output


# -- options ----------------------------------------------------------------------------------


async def test_a_missing_config_file_says_how_to_give_one(tmp_path: Path) -> None:
    async with run_proxy(cwd=tmp_path) as proxy:
        assert await proxy.exit_code() == 2
    assert "config.yaml: no such file" in proxy.output
    assert "--config FILE" in proxy.output and "--demo" in proxy.output


async def test_version() -> None:
    async with run_proxy("--version") as proxy:
        assert await proxy.exit_code() == 0
    assert proxy.output == f"ollama-proxy {__version__}"


# -- demo mode --------------------------------------------------------------------------------


async def test_demo_reads_no_config_yaml_it_was_not_given(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("listen: 0.0.0.0:1\nnodes: not a list\n")
    listen = f"127.0.0.1:{free_port()}"
    async with run_proxy("--demo", "--listen", listen, cwd=tmp_path) as proxy:
        await proxy.line(f"listening on http://{listen}, 2 nodes")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://{listen}/api/generate", json=GENERATE) as resp:
                assert resp.status == 200


async def test_demo_listens_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("listen: 0.0.0.0:1\nnodes: not a list\n")
    async with run_proxy("--demo", cwd=tmp_path) as proxy:
        # Ollama's port, on loopback: listening there, or refused for another process's use
        # of it (a real Ollama on this machine); either way not the file's, nor 0.0.0.0.
        await proxy.line("127.0.0.1:11434")
        assert "0.0.0.0" not in proxy.output


# -- stopping ---------------------------------------------------------------------------------


async def test_a_second_sigterm_during_the_drain_stops_at_once(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1, tokens=2000, token_interval=0.02)  # a 40 s stream
    config = write_config(tmp_path / "config.yaml", [node.url], shutdown={"drain_timeout": 60})
    listen = f"127.0.0.1:{free_port()}"
    async with (
        run_proxy("--config", str(config), "--listen", listen) as proxy,
        aiohttp.ClientSession() as session,
    ):
        await proxy.line("listening on")
        async with session.post(f"http://{listen}/api/generate", json=GENERATE) as resp:
            await resp.content.readline()
            proxy.process.send_signal(signal.SIGTERM)
            await proxy.line("stopping")
            proxy.process.send_signal(signal.SIGTERM)
            assert await proxy.exit_code(within=5) == 0
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # cut: never a last chunk
    line = await proxy.line("path=/api/generate")
    assert "status=503" in line and "cut=drain" in line, line
    assert "after a second signal: cutting them" in proxy.output


async def test_log_level_debug_shows_each_routing_decision(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = write_config(tmp_path / "config.yaml", [node.url])
    listen = f"127.0.0.1:{free_port()}"
    args = ("--config", str(config), "--listen", listen, "--log-level", "debug")
    async with run_proxy(*args) as proxy, aiohttp.ClientSession() as session:
        await proxy.line("listening on")
        headers = {"X-Request-Id": "seen-1"}
        async with session.post(
            f"http://{listen}/api/generate", json=GENERATE, headers=headers
        ) as resp:
            await resp.read()
        line = await proxy.line("route id=seen-1 ")
    assert "model=llama3.2:latest" in line and "node=127.0.0.1:" in line and "why=" in line
