"""A bare relay, the floor under the proxy: ``python -m proxy.bench.bare PORT NODE_URL...``.

What CPython, uvloop and httptools cost per request and per chunk when nothing else is done:
requests parsed by httptools, sent round robin over ``proxy.upstream``'s connections and
relayed as the proxy relays them, with no routing, caps, queue, health checks, metrics,
telemetry or error answers (a failure closes the connection). The benchmark runs it with
``--floor``: what separates it from nginx is the runtime, what separates the proxy from it is
aiohttp's server and the proxy's own work. Never for use in front of real nodes.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Iterator

import httptools
import uvloop

from ..answer import Answer
from ..http1 import request_bytes
from ..upstream import NodeConnections, Upstreams

SKIPPED_HEADERS = frozenset({b"host", b"content-length", b"connection", b"transfer-encoding"})


class BareRelay(asyncio.Protocol):
    """One client connection; its requests one at a time (benchmark clients do not pipeline)."""

    def __init__(self, upstreams: Upstreams, nodes: Iterator[str]) -> None:
        self.upstreams = upstreams
        self.nodes = nodes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.relaying: asyncio.Task[None] | None = None  # referenced, so never collected early

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_message_begin(self) -> None:
        self.target, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in SKIPPED_HEADERS:
            self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        node = self.upstreams.to(next(self.nodes))
        request = request_bytes(
            method,
            self.target.decode("latin-1"),
            node.host_header,
            self.headers,
            b"".join(self.body),
        )
        self.relaying = asyncio.ensure_future(
            self._relay(node, request, body_expected=method != "HEAD")
        )

    async def _relay(self, node: NodeConnections, request: bytes, *, body_expected: bool) -> None:
        client = self.transport
        assert client is not None
        conn, _ = await node.get()
        try:
            answer = Answer(conn, 1 << 30)
            conn.send(request, answer, body_expected=body_expected)
            head = await answer.head()
            chunked = head.content_length is None and body_expected
            lines = [b"HTTP/1.1 %d %b\r\n" % (head.status, head.raw_reason)]
            lines += [
                b"%b: %b\r\n" % kv for kv in head.raw_headers if kv[0].lower() != b"connection"
            ]
            client.write(b"".join(lines) + b"\r\n")
            while data := await answer.read():
                client.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            if chunked:
                client.write(b"0\r\n\r\n")
            conn.finish()
        except BaseException:
            conn.close()
            self.close()
            raise

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def serve(port: int, node_urls: list[str]) -> None:
    upstreams = Upstreams(connect_timeout=5.0, idle_timeout=600.0)
    nodes = itertools.cycle(node_urls)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: BareRelay(upstreams, nodes), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    port, *node_urls = sys.argv[1:]
    uvloop.run(serve(int(port), node_urls))


if __name__ == "__main__":
    main()
