"""Request framing attacks through ``python -m proxy``, judged on what the node receives.

For each request below, sent raw on a fresh connection, either the client gets a 400 and the
node nothing, or the node gets exactly one well-formed HTTP/1.1 request: an origin-form
target, one Content-Length that is its body's length, no Transfer-Encoding, nothing smuggled
after it. Where RFC 9112 leaves no choice, only the 400 will do. The proxy never connects to a
host a request names: only to its nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import proxy_subprocess
from .socketnode import SocketNode

BODY = b'{"model": "m", "prompt": "x"}'
LENGTH = b"Content-Length: %d" % len(BODY)
CHUNKED = b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY)
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"
# Read by a Content-Length that ends after the size line, this chunked body carries a request
# whose own body is the chunked body's rest ("\r\n0\r\n\r\n", 7 bytes).
HIDDEN = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\nContent-Length: 7\r\n\r\n"
HIDING = b"%x\r\n%b\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN)
BAIT = b"BAIT_PORT"  # replaced by the port of a listener the proxy must never connect to
LAST = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
ANSWER_TIMEOUT = 3.0
# aiohttp's server answers a request it cannot parse in HTTP/1.0: a 400 all the same.
REFUSED = re.compile(rb"HTTP/1\.[01] 400 ")
OWN_PATHS = (b"/api/version", b"/api/tags", b"/api/ps")  # the proxy's checks and discovery
LISTING = json.dumps({"models": [{"name": "m:latest", "model": "m:latest"}]}).encode()

BAD_LENGTH = "RFC 9112 §6.3: an invalid Content-Length is an unrecoverable error, a 400"
NOT_CHUNKED_LAST = "RFC 9112 §6.3: a request whose last transfer coding is not chunked: 400"
TE_OVER_CL = "RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and this is not chunked"
SPACE_BEFORE_COLON = "RFC 9112 §5.1: whitespace between a field name and its colon: 400"


def post(
    *headers: bytes, body: bytes = BODY, target: bytes = b"/api/generate", eol: bytes = b"\r\n"
) -> bytes:
    lines = [b"POST %b HTTP/1.1" % target, b"Host: localhost", *headers]
    return b"".join(line + eol for line in lines) + eol + body


@dataclass(frozen=True)
class Attack:
    name: str
    raw: bytes
    must_refuse: str = ""  # the rule that leaves a 400 the only right answer


# Transfer-Encoding written so that one parser may see chunks where another sees none; and
# the rule that makes a 400 the answer when the body is sent chunked.
OBFUSCATED_TE = [
    ("chunked, identity", b"Transfer-Encoding: chunked, identity", NOT_CHUNKED_LAST),
    ("leading space", b"Transfer-Encoding:  chunked", ""),
    ("xchunked", b"Transfer-Encoding: xchunked", NOT_CHUNKED_LAST),
    ("tab", b"Transfer-Encoding:\tchunked", ""),
    ("space before colon", b"Transfer-Encoding : chunked", SPACE_BEFORE_COLON),
    ("two headers", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity", NOT_CHUNKED_LAST),
]
SHORT, LONG = (b"Content-Length: %d" % len(b) for b in (BODY, BODY + SMUGGLED))
ATTACKS = [
    Attack(
        "CL.TE",
        post(
            b"Content-Length: %d" % len(CHUNKED + SMUGGLED),
            b"Transfer-Encoding: chunked",
            body=CHUNKED + SMUGGLED,
        ),
    ),
    Attack(
        "TE.CL",
        post(
            b"Transfer-Encoding: chunked",
            b"Content-Length: %d" % len(b"%x\r\n" % len(HIDDEN)),
            body=HIDING,
        ),
    ),
    *(
        Attack(f"TE {name}, chunked", post(te, body=CHUNKED), rule)
        for name, te, rule in OBFUSCATED_TE
    ),
    *(
        Attack(f"TE {name}, and a length", post(te, LENGTH), rule or TE_OVER_CL)
        for name, te, rule in OBFUSCATED_TE
    ),
    Attack("CL twice, equal", post(LENGTH, LENGTH)),
    Attack("CL twice, short first", post(SHORT, LONG, body=BODY + SMUGGLED), BAD_LENGTH),
    Attack("CL twice, long first", post(LONG, SHORT, body=BODY + SMUGGLED), BAD_LENGTH),
    *(
        Attack(f"CL {value.decode()}", post(b"Content-Length: " + value), BAD_LENGTH)
        for value in (
            b"+%d" % len(BODY),
            b"-1",
            b"0x%x" % len(BODY),
            b"%d %d" % divmod(len(BODY), 10),
        )
    ),
    Attack("obs-fold", post(b"X-Folded: a", b" b", LENGTH)),
    Attack("obs-fold hiding TE", post(b"X-Folded: a", b" Transfer-Encoding: chunked", LENGTH)),
    Attack("bare LF line ends", post(LENGTH, eol=b"\n")),
    Attack("bare LF in a header", post(b"X-A: a\nTransfer-Encoding: chunked", LENGTH)),
    Attack("bare CR in a header", post(b"X-A: a\rTransfer-Encoding: chunked", LENGTH)),
    Attack("NUL in a header", post(b"X-Nul: a\x00b", LENGTH)),
    Attack(
        "absolute-form, a port here",
        post(LENGTH, target=b"http://127.0.0.1:%b/api/generate" % BAIT),
    ),
    Attack("absolute-form, another host", post(LENGTH, target=b"http://evil.example/api/generate")),
    Attack("fragment", post(LENGTH, target=b"/api/generate#frag")),
]


# -- the node -------------------------------------------------------------------------------


class RecordingNode(SocketNode):
    """Records every byte of every connection. Answers checks and discovery with the model
    ``m``, any other request with a short JSON body: a request ends where its
    Content-Length says (the parse that judges it comes later, from the record)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[bytearray] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = bytearray()
        self.records.append(record)
        pending = b""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                record += data
                pending += data
                while (end := pending.find(b"\r\n\r\n")) >= 0:
                    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", pending[:end])
                    size = end + 4 + (int(length[1]) if length else 0)
                    if len(pending) < size:
                        break
                    writer.write(answer_to(pending[:end]))
                    pending = pending[size:]
        writer.close()


def answer_to(head: bytes) -> bytes:
    target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
    if target == b"/api/version":
        doc = b'{"version":"0.12.6"}'
    else:
        doc = LISTING if target in OWN_PATHS else b'{"done":true}'
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        len(doc),
        doc,
    )


@dataclass
class NodeRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names in lower case
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


class Malformed(Exception):
    """The proxy sent the node bytes that are not HTTP/1.1 as RFC 9112 has a sender write it."""


REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.1")
FIELD_VALUE = rb"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(" + FIELD_VALUE + rb")[ \t]*")


def requests_in(record: bytes) -> list[NodeRequest]:
    """Every request of one connection, parsed strictly; Malformed at the first fault."""
    requests, pos = [], 0
    while pos < len(record):
        end = record.find(b"\r\n\r\n", pos)
        if end < 0:
            raise Malformed(f"a head never ended: {record[pos : pos + 200]!r}")
        request_line, *lines = record[pos:end].split(b"\r\n")
        if not (line := REQUEST_LINE.fullmatch(request_line)):
            raise Malformed(f"request line {request_line!r}")
        headers = []
        for field in lines:
            if not (match := FIELD_LINE.fullmatch(field)):
                raise Malformed(f"header line {field!r} in {record[pos:end]!r}")
            headers.append((match[1].lower(), match[2]))
        request = NodeRequest(line[1], line[2], headers, b"")
        if request.values(b"transfer-encoding"):
            raise Malformed(f"Transfer-Encoding sent to the node: {record[pos:end]!r}")
        lengths = request.values(b"content-length")
        if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
            raise Malformed(f"Content-Length {lengths} sent to the node")
        size = int(lengths[0]) if lengths else 0
        pos = end + 4 + size
        request.body = record[end + 4 : pos]
        if len(request.body) < size:
            raise Malformed(f"a body shorter than its Content-Length: {request.body!r}")
        requests.append(request)
    return requests


def forwarded(node: RecordingNode) -> list[NodeRequest]:
    """What reached the node, less the proxy's own checks and discovery."""
    every = [r for record in node.records for r in requests_in(bytes(record))]
    return [r for r in every if not (r.method == b"GET" and r.target in OWN_PATHS)]


# -- the client -----------------------------------------------------------------------------


async def send(host: str, port: int, raw: bytes) -> bytes:
    """Every byte the proxy answers ``raw`` with, to the end of the connection.

    Once an answer has begun, a last request asks the proxy to close: answers come in order,
    so any request smuggled in ``raw`` has been served by then.
    """
    reader, writer = await asyncio.open_connection(host, port)
    received = bytearray()
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            writer.write(raw)
            while b"\r\n\r\n" not in received and (data := await reader.read(65536)):
                received += data
            with contextlib.suppress(ConnectionError):  # it may have closed after its answer
                writer.write(LAST)
                while data := await reader.read(65536):
                    received += data
    except TimeoutError:
        pass  # judged on what came
    finally:
        writer.close()
    return bytes(received)


async def bait_listener(accepted: list[object]) -> asyncio.Server:
    async def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("peername"))
        writer.close()

    return await asyncio.start_server(note, "127.0.0.1", 0)


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_the_node_gets_one_clean_request_or_none(attack: Attack, tmp_path: Path) -> None:
    node = RecordingNode()
    await node.start()
    accepted: list[object] = []
    bait = await bait_listener(accepted)
    raw = attack.raw.replace(BAIT, b"%d" % bait.sockets[0].getsockname()[1])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"nodes": [{"url": f"http://{node.address}"}]}))
    try:
        async with proxy_subprocess(config) as (url, _):
            host, port = url.removeprefix("http://").split(":")
            answer = await send(host, int(port), raw)
    finally:
        await node.stop()  # after the proxy: every byte it sent is in the record
        bait.close()
        await bait.wait_closed()
    assert not accepted, "the proxy connected to a host the request named"
    status = answer.partition(b"\r\n")[0]
    got = forwarded(node)
    if attack.must_refuse or REFUSED.match(status):
        assert REFUSED.match(status), f"{attack.must_refuse}; got {answer[:300]!r}"
        assert not got, f"a 400, yet the node got {got}"
        return
    assert status.startswith(b"HTTP/1.1 200"), f"neither a 400 nor the node's answer: {answer!r}"
    assert len(got) == 1, f"the node got {len(got)} requests: {[r.target for r in got]}"
    (request,) = got
    assert request.method == b"POST"
    assert request.target == b"/api/generate", (
        f"not the target the proxy routed: {request.target!r}"
    )
    assert request.values(b"host") == [node.address.encode()]
    assert request.values(b"content-length") == [b"%d" % len(BODY)]
    assert request.body == BODY
