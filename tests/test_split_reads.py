"""Framing under every split of the reads, on fake transports (no sockets, so reads are cut
where the test says: TCP between machines, backpressure and TLS cut them anywhere).

The node's connection: every single and every pair of split points of an answer gives the
request path exactly the node's payload, one end, and a connection back in the pool only when
it may carry another request. Then the whole request path: the client's response, parsed as
strictly as a client would, carries the node's payload for every split of the node's reads
and of the client's request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from proxy.errors import UpstreamError
from proxy.http1 import Head
from proxy.upstream import Connection, NodeConnections, State

from .fakes import FakeTransport, chunked, cuts, every_split

NDJSON_LINES = [
    b'{"model":"m","response":"Hi","done":false}\n',
    b'{"model":"m","response":" there","done":false}\n',
    b'{"model":"m","done":true,"eval_count":2,"prompt_eval_count":3}\n',
]
SSE_EVENTS = [b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', b"data: [DONE]\n\n"]
LENGTH_BODY = b'{"embeddings":[[0.1,0.2,0.3]]}'

NDJSON_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*NDJSON_LINES)
)
SSE_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*SSE_EVENTS)
)
LENGTH_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(LENGTH_BODY), LENGTH_BODY)
)
ANSWERS = {
    "ndjson": (NDJSON_ANSWER, b"".join(NDJSON_LINES)),
    "sse": (SSE_ANSWER, b"".join(SSE_EVENTS)),
    "length": (LENGTH_ANSWER, LENGTH_BODY),
}


@dataclass
class RecordingSink:
    head: Head | None = None
    body: bytearray = field(default_factory=bytearray)
    ends: int = 0
    error: UpstreamError | None = None

    def head_received(self, head: Head) -> None:
        assert self.head is None, "a second head"
        self.head = head

    def body_received(self, data: bytes) -> None:
        assert not self.ends, "body after the end"
        self.body += data

    def ended(self) -> None:
        self.ends += 1

    def failed(self, error: UpstreamError) -> None:
        self.error = error


class FakePool(NodeConnections):
    def __init__(self) -> None:
        super().__init__("http://node:11434", connect_timeout=1, idle_timeout=60)


def connected() -> tuple[Connection, FakeTransport, FakePool]:
    pool = FakePool()
    conn = Connection(pool)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    return conn, transport, pool


def exchange(conn: Connection, reads: list[bytes]) -> RecordingSink:
    sink = RecordingSink()
    conn.send(b"POST /api/generate HTTP/1.1\r\n\r\n", sink, body_expected=True)
    for data in reads:
        conn.data_received(data)
    return sink


@pytest.mark.parametrize("kind", ANSWERS)
async def test_every_split_of_an_answer_gives_its_payload_and_reuse(kind: str) -> None:
    answer, payload = ANSWERS[kind]
    cases = 0
    for reads in every_split(answer, pairs=True):
        conn, _, pool = connected()
        sink = exchange(conn, reads)
        assert (bytes(sink.body), sink.ends, sink.error) == (payload, 1, None), reads
        conn.finish()
        assert conn.state is State.IDLE and pool.idle == [conn], reads
        # The same connection carries the next answer, whole.
        again = exchange(conn, [answer])
        assert (bytes(again.body), again.ends) == (payload, 1), reads
        cases += 1
    points = len(answer) - 1
    assert cases == 1 + points + points * (points - 1) // 2  # whole, every point, every pair


@pytest.mark.parametrize("kind", ANSWERS)
async def test_an_answer_cut_short_fails_and_is_not_reused(kind: str) -> None:
    answer, _ = ANSWERS[kind]
    for end in range(1, len(answer)):
        conn, _transport, pool = connected()
        sink = exchange(conn, [answer[:end]])
        conn.connection_lost(None)  # the node went away
        assert sink.ends == 0 and sink.error is not None, end
        assert sink.error.kind == ("reset" if sink.head is None else "broken"), end
        conn.finish()
        assert conn.state is State.CLOSED and not pool.idle


async def test_a_body_ended_by_the_close_ends_and_is_not_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n" + NDJSON_LINES[0]
    for reads in every_split(answer, pairs=False):
        conn, _, pool = connected()
        sink = exchange(conn, reads)
        assert sink.ends == 0
        conn.connection_lost(None)
        assert (bytes(sink.body), sink.ends, sink.error) == (NDJSON_LINES[0], 1, None)
        conn.finish()
        assert not pool.idle


@pytest.mark.parametrize(
    "answer",
    [
        NDJSON_ANSWER.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1),
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["connection-close", "http10"],
)
async def test_the_nodes_framing_can_forbid_reuse(answer: bytes) -> None:
    conn, _, pool = connected()
    sink = exchange(conn, [answer])
    assert sink.ends == 1
    conn.finish()
    assert conn.state is State.CLOSED and not pool.idle


async def test_bytes_after_the_answer_make_the_connection_unusable() -> None:
    conn, _, pool = connected()
    sink = exchange(conn, [LENGTH_ANSWER + LENGTH_ANSWER])
    assert (bytes(sink.body), sink.ends) == (LENGTH_BODY, 1)  # the second reaches nobody
    conn.finish()
    assert not pool.idle


async def test_invalid_framing_fails_the_answer() -> None:
    both = NDJSON_ANSWER.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n", 1)
    for bad in (both, NDJSON_ANSWER.replace(b"\r\n2b\r\n", b"\r\nzz\r\n")):
        conn, _, pool = connected()
        sink = exchange(conn, [bad])
        assert sink.error is not None and sink.error.kind == "broken"
        assert conn.state is State.CLOSED and not pool.idle


async def test_an_answer_to_head_ends_at_its_head_and_is_not_reused() -> None:
    conn, _, pool = connected()
    sink = RecordingSink()
    conn.send(b"HEAD /api/tags HTTP/1.1\r\n\r\n", sink, body_expected=False)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert sink.head is not None and sink.ends == 1 and not sink.body
    conn.finish()
    assert not pool.idle


async def test_an_informational_answer_is_skipped() -> None:
    conn, _, _ = connected()
    sink = exchange(conn, [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + LENGTH_ANSWER])
    assert sink.head is not None and sink.head.status == 200
    assert (bytes(sink.body), sink.ends) == (LENGTH_BODY, 1)


async def test_a_request_not_fully_written_is_not_reused() -> None:
    conn, transport, pool = connected()
    transport.get_write_buffer_size = lambda: 10  # type: ignore[method-assign]
    exchange(conn, [LENGTH_ANSWER])
    conn.finish()
    assert not pool.idle


def test_cuts_cover_the_data() -> None:
    assert cuts(b"abcdef", (1, 3)) == [b"a", b"bc", b"def"]
