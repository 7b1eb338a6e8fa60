"""TLS on the listener, through the real process: certificates made at test time (trustme),
real clients over https, a new certificate on reload, and clients that never handshake."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import pytest
import trustme
import yaml

from proxy.config import ConfigError, parse_config
from proxy.sim import SimNode

from .conftest import StartNodes, free_port


class Certs:
    """A CA the clients trust, and the proxy's certificate and key files, replaceable."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.cert_file = directory / "proxy.crt"
        self.key_file = directory / "proxy.key"
        self.der = self.issue()

    def issue(self) -> bytes:
        """A new certificate for 127.0.0.1 in the files; returns it (DER)."""
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.key_file))
        return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def tls(self) -> dict[str, str]:
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


class Process:
    def __init__(self, url: str, process: asyncio.subprocess.Process) -> None:
        self.url = url
        self.process = process
        self.log: list[str] = []
        self.port = int(url.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def tls_proxy(config: Path) -> AsyncIterator[Process]:
    """``python -m proxy`` on a free port, its log kept (conftest's proxy_subprocess drops it)."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "--config", str(config)),
        *("--listen", f"127.0.0.1:{port}"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    running = Process(f"https://127.0.0.1:{port}", process)
    async with asyncio.timeout(20):
        async for line in process.stderr:
            running.log.append(line.decode())
            if "listening on" in running.log[-1]:
                break

    async def keep_log() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            running.log.append(line.decode())

    reader = asyncio.create_task(keep_log())
    try:
        yield running
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 20)
        await reader


def write_config(path: Path, node: SimNode, certs: Certs, **top: Any) -> Path:
    data = {"nodes": [{"url": node.url}], "tls": certs.tls(), "reload": {"watch": False}, **top}
    path.write_text(yaml.safe_dump(data))
    return path


async def peer_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a new connection is shown (DER)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    await close(writer)
    return bytes(der)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def reload(url: str, context: ssl.SSLContext) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/-/reload", ssl=context) as resp:
            return resp.status, await resp.text()


# -- the config ------------------------------------------------------------------------------


def tls_errors(tls: dict[str, Any]) -> list[str]:
    try:
        parse_config({"nodes": [{"url": "http://n:1"}], "tls": tls})
    except ConfigError as exc:
        return exc.errors
    return []


def test_tls_is_off_without_files_and_loaded_with_both(certs: Certs) -> None:
    assert parse_config({"nodes": [{"url": "http://n:1"}]}).tls.context is None
    config = parse_config({"nodes": [{"url": "http://n:1"}], "tls": certs.tls()})
    assert isinstance(config.tls.context, ssl.SSLContext)
    assert config.tls.cert_file == str(certs.cert_file)


def test_tls_needs_both_files_and_files_that_load(certs: Certs, tmp_path: Path) -> None:
    assert tls_errors({"cert_file": str(certs.cert_file)}) == [
        "tls.key_file: is required with the other (both, or neither for plain HTTP)"
    ]
    missing = str(tmp_path / "nothing.pem")
    assert tls_errors({**certs.tls(), "key_file": missing}) == [
        f"tls.key_file: no such file: {missing}"
    ]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    (error,) = tls_errors({**certs.tls(), "cert_file": str(garbage)})
    assert error.startswith("tls.cert_file: cannot load with tls.key_file:")
    (tmp_path / "other").mkdir()
    other = Certs(tmp_path / "other")
    (error,) = tls_errors({**certs.tls(), "key_file": str(other.key_file)})  # not its key
    assert error.startswith("tls.cert_file: cannot load with tls.key_file:")
    assert tls_errors({**certs.tls(), "ciphers": "ALL"})[0].startswith("tls.ciphers: unknown key")


# -- through the process ---------------------------------------------------------------------


async def test_a_streamed_chat_over_https(
    start_nodes: StartNodes, certs: Certs, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1, tokens=5)
    config = write_config(tmp_path / "config.yaml", node, certs)
    async with tls_proxy(config) as proxy:
        assert f"listening on https://127.0.0.1:{proxy.port}" in proxy.log[-1]
        async with ollama.AsyncClient(host=proxy.url, verify=certs.client_context()) as client:
            chunks = [
                chunk
                async for chunk in await client.chat(
                    model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            ]
        assert len(chunks) == 6 and chunks[-1].done
        assert "".join(c.message.content or "" for c in chunks)
    assert node.stats.completed == 1


async def test_a_reload_serves_a_new_certificate_to_new_connections(
    start_nodes: StartNodes, certs: Certs, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = write_config(tmp_path / "config.yaml", node, certs)
    trust = certs.client_context()
    async with tls_proxy(config) as proxy:
        old = certs.der
        assert await peer_certificate(proxy.port, trust) == old
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=trust)
        new = certs.issue()  # renewed in place, as certbot does
        status, body = await reload(proxy.url, trust)
        assert status == 200, body
        assert await peer_certificate(proxy.port, trust) == new
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")  # opened before: still served
        await close(writer)


async def test_a_certificate_that_does_not_load_rejects_the_reload(
    start_nodes: StartNodes, certs: Certs, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = write_config(tmp_path / "config.yaml", node, certs)
    trust = certs.client_context()
    async with tls_proxy(config) as proxy:
        certs.cert_file.write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
        status, body = await reload(proxy.url, trust)
        assert status >= 400 and "tls.cert_file: cannot load" in body
        assert await peer_certificate(proxy.port, trust) == certs.der  # the old one serves
        assert any("config reload rejected" in line for line in proxy.log)


async def test_a_client_that_never_handshakes_is_closed_after_header_timeout(
    start_nodes: StartNodes, certs: Certs, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    limits = {"header_timeout": 0.3}
    config = write_config(tmp_path / "config.yaml", node, certs, limits=limits)
    async with tls_proxy(config) as proxy:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed, nothing said
        assert 0.25 < time.monotonic() - started < 3
        await close(writer)
        assert await peer_certificate(proxy.port, certs.client_context()) == certs.der


async def test_the_handshake_counts_against_the_head_timeout(
    start_nodes: StartNodes, certs: Certs, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = write_config(tmp_path / "config.yaml", node, certs, limits={"header_timeout": 1.0})
    async with tls_proxy(config) as proxy:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await asyncio.sleep(0.8)  # a slow handshake: the time is what is tested
        await writer.start_tls(certs.client_context(), server_hostname="127.0.0.1")
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # then no request: closed at 1 s from accept
        assert time.monotonic() - started < 1.5  # not header_timeout after the handshake
        await close(writer)


async def test_plain_http_to_the_tls_port_fails_cleanly(
    start_nodes: StartNodes, certs: Certs, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    config = write_config(tmp_path / "config.yaml", node, certs)
    async with tls_proxy(config) as proxy, aiohttp.ClientSession() as session:
        plain = proxy.url.replace("https://", "http://")
        chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(aiohttp.ClientError):
            async with session.post(plain + "/api/chat", json=chat) as resp:
                await resp.read()
        async with session.get(proxy.url + "/", ssl=certs.client_context()) as resp:
            assert resp.status == 200  # and it goes on serving
        proxy.process.terminate()
        await proxy.process.wait()
    assert not any("Traceback" in line or "ERROR" in line for line in proxy.log), proxy.log
    assert [r for r in node.stats.requests if r.path == "/api/chat"] == []


async def test_a_handshake_under_way_holds_a_place_under_the_connection_cap(
    start_nodes: StartNodes, certs: Certs, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    limits = {"header_timeout": 0.5, "max_client_connections": 1}
    config = write_config(tmp_path / "config.yaml", node, certs, limits=limits)
    async with tls_proxy(config) as proxy:
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", proxy.port)
        await asyncio.sleep(0.05)  # accepted (nothing to wait on: it says nothing)
        started = time.monotonic()
        assert await peer_certificate(proxy.port, certs.client_context()) == certs.der
        assert time.monotonic() - started > 0.3  # served once the silent one was closed
        assert await silent_reader.read() == b""
        await close(silent)
