"""What one client can hold of the proxy, through the real server.

Each test plays one attack on raw sockets: here, pipelining without ever reading.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from proxy.sim import SimNode

from .conftest import StartNodes, generations, proxy_config_data, proxy_subprocess

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


# -- the real process ------------------------------------------------------------------------


def write_config(tmp_path: Path, nodes: list[SimNode], **top: Any) -> Path:
    data = proxy_config_data(nodes, **top)
    del data["listen"]  # the subprocess gets --listen
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match[1]) / 1024


# -- 1: a client that pipelines and never reads --------------------------------------------

TOKENS = 10_000  # a generation's answer is about 80 kB: the kernel's buffers hold few of them


def pipelined(count: int) -> bytes:
    """Generations, listings, unknown paths and unknown models, one after another."""
    generate = json.dumps({**GENERATE, "options": {"num_predict": TOKENS}}).encode()
    unknown = json.dumps({**GENERATE, "model": "no-such-model"}).encode()
    kinds = [
        b"POST /api/generate HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s"
        % (len(generate), generate),
        b"GET /api/tags HTTP/1.1\r\nHost: p\r\n\r\n",
        b"GET /no/such/path HTTP/1.1\r\nHost: p\r\n\r\n",
        b"POST /api/generate HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s"
        % (len(unknown), unknown),
    ]
    return b"".join(kinds[i % len(kinds)] for i in range(count))


async def settled(count: Any, quiet: float = 0.5, bound: float = 15.0) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + bound
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "still growing"
        await asyncio.sleep(0.05)
        if (now := count()) != last:
            last, since = now, time.monotonic()
    return int(last)


async def test_a_client_that_pipelines_and_never_reads_holds_a_bounded_share(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    """aiohttp 3.14 already parses at most 32 pipelined requests ahead and answers one at a
    time, each answer waiting for the client's socket to drain before the next request
    starts: what the proxy holds is bounded by the kernel's buffers, not by what was sent.
    (This passed before any change here; the attack ran against an earlier server.)"""
    (node,) = await start_nodes(1, token_interval=0)
    requests = 2000
    async with proxy_subprocess(write_config(tmp_path, [node])) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        before = rss_mib(process.pid)
        seen_before = len(generations(node))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client reads nothing
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        with sock:
            await asyncio.wait_for(loop.sock_sendall(sock, pipelined(requests)), 10)
            forwarded = await settled(lambda: len(generations(node)) - seen_before)
            grown = rss_mib(process.pid) - before
            # 3 of every 4 requests reach the node when answered (tags, unknown path, and the
            # generation): far fewer did, and the proxy stopped there.
            assert forwarded < requests * 3 / 4 / 3
            assert grown < 30, f"RSS grew by {grown:.1f} MiB"
            # It is backpressure, not a wedge: reading resumes it.
            async with asyncio.timeout(5):
                while len(generations(node)) - seen_before <= forwarded:
                    await loop.sock_recv(sock, 1 << 16)
