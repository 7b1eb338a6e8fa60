"""A node's answer cut at any point reaches the client whole, through ``python -m proxy``.

Loopback hands each write to the reader whole, so a proxy tested on it never sees a chunk
size line or a CRLF split across two reads; a real network does (about one stream in 75 hung,
in a report). Here the node cuts every answer at seeded random points (inside size lines,
CRLFs, data and the head) and writes the pieces one by one with a pause between them, so that
they arrive as separate reads. The client parses every answer strictly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from .conftest import proxy_subprocess
from .socketnode import SocketNode

SEED = 75
REQUESTS = 300
CONCURRENCY = 16
ANSWER_TIMEOUT = 2.0  # seconds for one whole answer; the node's pieces take a few ms
MAX_FAILURES = 12  # then stop asking: enough to see the pattern, and the test stays short
PATHS = {"/api/chat": "ndjson", "/v1/chat/completions": "sse", "/api/generate": "length"}
LISTING = json.dumps({"models": [{"name": "m:latest", "model": "m:latest"}]}).encode()
VERSION = b'{"version":"0.12.6"}'
WORDS = ["a", "token", "streamed", "déjà", "☕", "Grüße", "x" * 40, "}{", "data:"]


# -- what the node sends --------------------------------------------------------------------


@dataclass
class Wire:
    """An answer as the node frames it, and the offsets where a cut splits framing."""

    data: bytearray = field(default_factory=bytearray)
    marks: list[int] = field(default_factory=list)

    def add(self, part: bytes, *, framing: bool = False) -> None:
        if framing:  # before it, inside it, after it
            self.marks.extend(range(len(self.data), len(self.data) + len(part) + 1))
        self.data += part

    def chunk(self, piece: bytes) -> None:
        self.add(b"%x\r\n" % len(piece), framing=True)
        self.add(piece)
        self.add(b"\r\n", framing=True)


@dataclass(frozen=True)
class Planned:
    """One answer: its bytes on the wire, where to cut them, and what the client must get."""

    wire: bytes
    marks: list[int]
    content_type: str
    payload: bytes
    chunked: bool


def path_of(number: int) -> str:
    return random.Random(f"{SEED}/{number}/path").choice(list(PATHS))


def planned(path: str, number: int) -> Planned:
    rng = random.Random(f"{SEED}/{number}")
    kind = PATHS[path]
    if kind == "length":
        body = json.dumps({"model": "m", "response": text(rng, 200), "done": True}).encode()
        return framed(rng, [body], "application/json", chunked=False)
    count = rng.randint(2, 8)
    if kind == "ndjson":
        lines = [
            {"model": "m", "message": {"content": text(rng, 60)}, "done": False}
            for _ in range(count)
        ]
        lines.append({"model": "m", "done": True, "prompt_eval_count": 3, "eval_count": count})
        pieces = [json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines]
        return framed(rng, pieces, "application/x-ndjson", chunked=True)
    events = [
        {"object": "chat.completion.chunk", "choices": [{"delta": {"content": text(rng, 60)}}]}
        for _ in range(count)
    ]
    pieces = [b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in events]
    return framed(rng, [*pieces, b"data: [DONE]\n\n"], "text/event-stream", chunked=True)


def text(rng: random.Random, most: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(1, most)))


def framed(rng: random.Random, pieces: list[bytes], content_type: str, *, chunked: bool) -> Planned:
    payload = b"".join(pieces)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(payload)
    wire = Wire()
    wire.add(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\n%b" % (content_type.encode(), framing))
    wire.add(b"\r\n\r\n", framing=True)
    if not chunked:
        wire.add(payload)
    else:
        for piece in regrouped(rng, pieces):
            wire.chunk(piece)
        wire.add(b"0\r\n\r\n", framing=True)
    return Planned(bytes(wire.data), wire.marks, content_type, payload, chunked)


def regrouped(rng: random.Random, pieces: list[bytes]) -> list[bytes]:
    """Mostly one line or event a chunk, as Ollama writes; sometimes two, or half of one."""
    chunks: list[bytes] = []
    for piece in pieces:
        draw = rng.random()
        if draw < 0.15 and chunks:
            chunks[-1] += piece
        elif draw < 0.3 and len(piece) > 1:
            half = rng.randrange(1, len(piece))
            chunks += [piece[:half], piece[half:]]
        else:
            chunks.append(piece)
    return chunks


def cut(plan: Planned, number: int) -> list[bytes]:
    """The wire in pieces: cuts mostly where framing is split, some anywhere."""
    rng = random.Random(f"{SEED}/{number}/cuts")
    points = set(rng.sample(plan.marks, min(len(plan.marks), rng.randint(2, 12))))
    points.update(rng.randrange(1, len(plan.wire)) for _ in range(rng.randint(1, 4)))
    edges = [0, *sorted(p for p in points if 0 < p < len(plan.wire)), len(plan.wire)]
    return [plan.wire[a:b] for a, b in itertools.pairwise(edges)]


class SplitNode(SocketNode):
    """A node on a bare socket: health checks and discovery answered at once, every POST with
    the pieces ``script(target, body)`` gives, each written, drained and followed by
    ``pause`` so that it reaches the proxy as a read of its own. Counts answers per connection.
    """

    def __init__(self, script: Callable[[str, bytes], list[bytes]], pause: float) -> None:
        super().__init__()
        self.script = script
        self.pause = pause
        self.answers_per_connection: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.answers_per_connection)
        self.answers_per_connection.append(0)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b" ", 2)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(length[1]) if length else 0)
                if method != b"POST":
                    doc = VERSION if target == b"/api/version" else LISTING
                    writer.write(json_answer(doc))
                    continue
                self.answers_per_connection[index] += 1
                for piece in self.script(target.decode(), body):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(self.pause)
        writer.close()


def json_answer(doc: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        len(doc),
        doc,
    )


def random_cuts(target: str, body: bytes) -> list[bytes]:
    number = json.loads(body)["n"]
    return cut(planned(target, number), number)


@contextlib.asynccontextmanager
async def proxy_before(nodes: list[SplitNode], tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """``python -m proxy`` in front of ``nodes``; yields its host and port."""
    for node in nodes:
        await node.start()
    config = tmp_path / "config.yaml"
    entries = [
        {"url": n.url, "name": f"split{i}", "max_concurrency": 16} for i, n in enumerate(nodes)
    ]
    config.write_text(yaml.safe_dump({"nodes": entries}))
    try:
        async with proxy_subprocess(config) as (url, _):
            host, port = url.removeprefix("http://").split(":")
            yield host, int(port)
    finally:
        for node in nodes:
            await node.stop()


# -- what the client gets -------------------------------------------------------------------


class Malformed(Exception):
    """The proxy's answer breaks HTTP/1.1 framing, at byte ``at`` of it."""

    def __init__(self, what: str, at: int) -> None:
        super().__init__(f"{what} at byte {at}")
        self.at = at


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    payload: bytes  # the body, dechunked
    size: int  # bytes of the answer on the wire


STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*")
SIZE_LINE = re.compile(rb"[0-9a-fA-F]{1,8}")


def parse_response(buf: bytes) -> Response | None:
    """The whole answer at the start of ``buf``, strictly; None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line, *lines = buf[:end].split(b"\r\n")
    if not (status := STATUS_LINE.fullmatch(status_line)):
        raise Malformed(f"status line {status_line[:40]!r}", 0)
    headers = {}
    for line in lines:
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise Malformed(f"header line {line[:40]!r}", 0)
        headers[name.lower()] = value.strip()
    pos = end + 4
    if "content-length" in headers:
        size = pos + int(headers["content-length"])
        return Response(int(status[1]), headers, buf[pos:size], size) if len(buf) >= size else None
    if headers.get("transfer-encoding") != "chunked":
        raise Malformed(f"neither a length nor chunks: {headers}", 0)
    payload = bytearray()
    while (eol := buf.find(b"\r\n", pos)) >= 0:
        if not SIZE_LINE.fullmatch(size_line := buf[pos:eol]):
            raise Malformed(f"chunk size line {size_line[:20]!r}", pos)
        size, pos = int(size_line, 16), eol + 2
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise Malformed(f"no CRLF after a chunk of {size} bytes", pos + size)
        if size == 0:
            return Response(int(status[1]), headers, bytes(payload), pos + 2)
        payload += buf[pos : pos + size]
        pos += size + 2
    return None


async def exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: str,
    body: bytes,
    received: bytearray,
) -> Response:
    """POST ``body``; the answer, with every byte read also in ``received``."""
    writer.write(
        b"POST %b HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (target.encode(), len(body), body)
    )
    while (response := parse_response(bytes(received))) is None:
        data = await reader.read(65536)
        if not data:
            raise Malformed("the proxy closed the connection mid-answer", len(received))
        received += data
    if response.size != len(received):
        raise Malformed("bytes after the answer's end", response.size)
    return response


def problem_with(response: Response, plan: Planned) -> str | None:
    if response.status != 200:
        return f"status {response.status}"
    if response.headers.get("content-type") != plan.content_type:
        return f"content type {response.headers.get('content-type')!r}"
    if not plan.chunked and response.headers.get("content-length") != str(len(plan.payload)):
        return f"content length {response.headers.get('content-length')!r}"
    got, want = response.payload, plan.payload
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        at = min(len(got), len(want)) if at is None else at
        return (
            f"payload differs at byte {at}: got {got[at : at + 40]!r}, want {want[at : at + 40]!r}"
        )
    return None


async def ask_all(host: str, port: int, numbers: Iterator[int], failures: list[str]) -> None:
    """One client: its requests one after another on a kept-alive connection, taken from
    ``numbers``; a new connection after an answer that failed."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    for number in numbers:
        if len(failures) >= MAX_FAILURES:
            break
        target = path_of(number)
        plan = planned(target, number)
        conn = conn or await asyncio.open_connection(host, port)
        received = bytearray()
        problem: str | None
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                body = json.dumps({"model": "m", "n": number}).encode()
                response = await exchange(*conn, target, body, received)
            problem = problem_with(response, plan)
        except TimeoutError:
            problem = f"no whole answer in {ANSWER_TIMEOUT:g}s, got {bytes(received)[-120:]!r}"
        except Malformed as exc:
            problem = f"{exc}: {bytes(received[max(0, exc.at - 30) : exc.at + 30])!r}"
        except ConnectionError as exc:
            problem = f"{exc!r} after {len(received)} bytes of the answer"
        if problem is not None:
            failures.append(f"#{number} {PATHS[target]}: {problem}")
        if problem is not None or response.headers.get("connection") == "close":
            conn[1].close()
            conn = None
    if conn is not None:
        conn[1].close()


async def test_answers_cut_anywhere_reach_clients_whole(tmp_path: Path) -> None:
    nodes = [SplitNode(random_cuts, pause=0.001) for _ in range(2)]
    failures: list[str] = []
    numbers = iter(range(REQUESTS))
    async with proxy_before(nodes, tmp_path) as (host, port):
        await asyncio.gather(*(ask_all(host, port, numbers, failures) for _ in range(CONCURRENCY)))
    asked = REQUESTS - sum(1 for _ in numbers)
    if failures:
        pytest.fail(
            f"{len(failures)} of {asked} answers broken (seed {SEED}):\n" + "\n".join(failures[:8])
        )
    counts = [n for node in nodes for n in node.answers_per_connection]
    assert sum(counts) == REQUESTS
    assert max(counts) > 1, "the proxy opened a node connection per answer: no keep-alive"


REPRO = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
    b'8\r\n{"a":1}\n\r\n',
    b"a",  # the next chunk's size line, alone in a read
    b'\r\n{"bb":22}\n\r\n',
    b"0\r\n\r\n",
]


async def test_a_size_line_alone_in_a_read_is_not_lost(tmp_path: Path) -> None:
    """The reported hang: the ``a`` of ``a\\r\\n`` came in a read of its own and was dropped."""
    # A pause long enough for the proxy to read each write alone (no event tells the node
    # that the proxy has read); without the split there is no bug to see.
    node = SplitNode(lambda target, body: REPRO, pause=0.05)
    async with proxy_before([node], tmp_path) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        received = bytearray()
        try:
            async with asyncio.timeout(3):
                response = await exchange(reader, writer, "/api/chat", b'{"model":"m"}', received)
        except (TimeoutError, Malformed) as exc:
            raise AssertionError(f"{exc!r}; the client got {bytes(received)!r}") from None
        finally:
            writer.close()
    assert response.status == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.payload == b'{"a":1}\n{"bb":22}\n'
