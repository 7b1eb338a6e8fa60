"""A short property-based fuzz of the request path, judged on what a recording node receives.

A real proxy (in process, ``start_proxy``, one slot) stands in front of one node on a raw
socket that answers checks (``GET /api/version``) and discovery (``/api/tags``, ``/api/ps``:
the models of ``LISTING``) and every other request with a short JSON body of known length
(after a short wait for a request with ``X-Slow``), and records every request it gets, parsed
strictly by httptools (llhttp). Hypothesis writes client requests raw: mostly an Ollama path
with its method and a body naming a listed model, each part bent now and then (other and odd
methods; escapes, dot segments, ``?``, ``#``, absolute form, paths that climb out of a
parameter; headers in odd case, duplicated, hop-by-hop or named by Connection, Expect,
Upgrade; every Content-Length/Transfer-Encoding mix; model keys in another case, keep_alive
values, unknown models, non-JSON, empty bodies). Up to three requests are pipelined on a
connection, up to three connections at once, and the client reads the answers with a deadline
or leaves after some. Each request carries its own ``X-Request-Id``: the proxy passes it to
the node (it is end to end) and logs it, which ties what the node got to the client's request
and to the proxy's access log line.

Properties, for every example:

P1 well formed: every request the node receives is HTTP/1.1 as RFC 9112 has a sender write it:
   an origin-form target (``/…``, no ``#``), at most one Content-Length and it is the body's,
   no Transfer-Encoding, no hop-by-hop header (nor one the client's Connection named), one
   Host, the node's ``host:port``, and field lines of tokens and visible characters.
P2 accounted for: what the node acts on is what the proxy counted. A request with one of our
   ids answers a client's request, and was logged: the endpoint the node routes it to (its
   target's path percent-decoded, as Go's net/http gives it to Ollama's router, sorted as
   Ollama's path, a path under a prefix, or other) is the one the proxy's logged path names,
   and, for a request that came through the forwarder (not a fleet request: a listing, a
   fan-out, a blob or an unload), the model Ollama reads from its body (Go's encoding/json:
   keys matched in any case, the last one wins, a null changes nothing; ``model``, else the
   legacy ``name``) is the model the proxy logged: the one it routed, and took the slot, for.
   A request without one of our ids is the proxy's own: a check or discovery, or a fleet
   request for what a client of the example asked (its method, a GET for a HEAD of a
   listing, and its path), and on ``/api/generate`` or ``/api/chat`` an unload as Ollama
   reads it (``keep_alive`` of 0 whole seconds, nothing to generate). Anything else is work
   the proxy never counted.
P3 answered: each client request gets a complete, parseable HTTP answer before the deadline;
   a connection may end early only right after an error answer or one that closes it (or
   whose request asked to), never mid-answer and never by hanging.
P4 no leak: afterwards every request has ended, every slot is back and the queue empty
   (``pool_is_idle``); the process's descriptors are back to the baseline, less two per open
   node connection (the proxy's end and the node's end, both in this process); and each open
   node connection that carried forwarded requests is idle in the proxy's pool.
P5 no crash: nothing is logged as an error by aiohttp's server, the proxy or asyncio, other
   than aiohttp's note of a request it could not parse (and answered 400).

The examples this fuzz and the attack run found, shrunk, stay at the end of the file as
regression cases (``test_a_found_example_holds``).

Runs derandomized (the same examples on every run, no example database) in a few seconds.
``FUZZ_EXAMPLES=3000 FUZZ_RANDOM=1`` explores further (about two minutes, with
``-o timeout=600``); ``FUZZ_CHECK_OPEN=all`` (or filter names, comma-separated) turns filters
off, to check a fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools
import pytest
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.api import (
    BLOBS_PREFIX,
    FANOUT_PATHS,
    KNOWN_PATHS,
    LISTING_PATHS,
    MODEL_REQUIRED_PATHS,
    OPENAI_MODEL_PREFIX,
)
from proxy.fleet import DIGEST as BLOB_DIGEST

from .conftest import Proxy, StartProxy, pool_is_idle, wait_until
from .socketnode import SocketNode

ANSWER_TIMEOUT = 2.0  # per connection: every answer within it, or the proxy hangs
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
MODELS = ("llama3.2:latest", "qwen2.5:7b", "nomic-embed-text:latest")
LISTING = {"models": [{"name": m, "model": m, "size": 1, "digest": "0" * 64} for m in MODELS]}
RUNNING = {
    "models": [{"name": m, "model": m, "expires_at": "2099-01-01T00:00:00Z"} for m in MODELS]
}
CHECKS = (b"/api/version", b"/api/tags", b"/api/ps")  # the proxy's checks and discovery
# RFC 9110 §7.6.1, stated here rather than taken from the proxy: the test judges it.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
FIELD_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)
REQUEST_ID = "x-request-id"
SLOW_HEADER = "X-Slow"  # the node answers a request that has it only after SLOW_ANSWER
SLOW_ANSWER = 0.05
_ids = itertools.count(1)


# -- the node ---------------------------------------------------------------------------------


@dataclass
class NodeRequest:
    method: str
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]  # names in lower case
    body: bytes

    def values(self, name: str) -> list[bytes]:
        return [v for n, v in self.headers if n == name.encode()]

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    @property
    def request_id(self) -> str | None:
        ids = self.values(REQUEST_ID)
        return ids[0].decode("latin-1") if ids else None


class NodeConnection:
    """One connection to the node: httptools callbacks build each request, then answer it."""

    def __init__(self, node: RecordingNode, writer: asyncio.StreamWriter) -> None:
        self.node = node
        self.writer = writer
        self.parser = httptools.HttpRequestParser(self)
        self.record = bytearray()  # every byte received, for the report
        self.forwarded = False  # carried a client's request (one with our id): upstream.py's
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", [], bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        request = NodeRequest(
            method, self._url, self.parser.get_http_version(), self._headers, bytes(self._body)
        )
        self.node.received.append(request)
        self.forwarded |= request.request_id is not None and not from_the_fleet(request)
        keep_alive = self.parser.should_keep_alive()
        if request.values(SLOW_HEADER.lower()):  # a generation that takes a while
            asyncio.get_running_loop().call_later(SLOW_ANSWER, self.answer, request, keep_alive)
        else:
            self.answer(request, keep_alive)

    def answer(self, request: NodeRequest, keep_alive: bool) -> None:
        if self.writer.is_closing():  # the proxy left: its client did
            return
        self.writer.write(answer_to(request))
        if not keep_alive:
            self.writer.close()


def from_the_fleet(got: NodeRequest) -> bool:
    """Sent by fleet.py's client session, not upstream.py's connections: a merged listing, a
    fan-out, a blob (its path built from a checked digest) or an unload. It carries the
    client's request id too, so that the node's log names the request.

    The fleet writes its own paths, unescaped: a forwarded request keeps the client's escapes,
    so ``/api%2Fpull`` reaching a node as such was forwarded (the proxy routes it, as Ollama
    does, as ``/api/pull``: a fan-out that sends ``/api/pull``)."""
    own = got.path.decode("latin-1")
    if own in LISTING_PATHS | FANOUT_PATHS:
        return True
    if own.startswith(BLOBS_PREFIX) and BLOB_DIGEST.fullmatch(own.removeprefix(BLOBS_PREFIX)):
        return True
    path = unquote_to_bytes(got.path).decode("utf-8", "surrogateescape")
    return path in ("/api/generate", "/api/chat") and bool(ollama_unloads(got.path, got.body))


def answer_to(request: NodeRequest) -> bytes:
    if request.path == b"/api/version":
        doc: Any = {"version": "0.12.6"}
    elif request.path in (b"/api/tags", b"/api/ps"):
        doc = LISTING if request.path == b"/api/tags" else RUNNING
    else:
        doc = {"done": True}
    body = json.dumps(doc).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + (b"" if request.method == "HEAD" else body)


class RecordingNode(SocketNode):
    """Answers and records (see the module's docstring); a parse failure is a fault."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "rec"
        self.received: list[NodeRequest] = []
        self.faults: list[str] = []
        self.open: set[NodeConnection] = set()  # accepted and not yet closed

    def closing(self) -> None:
        for conn in self.open:  # ones the proxy left open (a leak the test reported)
            conn.writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = NodeConnection(self, writer)
        self.open.add(conn)
        try:
            while not writer.is_closing() and (data := await reader.read(65536)):
                conn.record += data
                conn.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.faults.append(f"{type(exc).__name__}: {exc}; bytes: {bytes(conn.record)!r}")
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.open.discard(conn)


# -- client requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]  # as sent, Host included, framing excluded
    body: bytes  # what the client means to send, before any chunked coding
    framing: str  # how the body goes: see FRAMINGS
    chunks: tuple[int, ...] = ()  # chunk sizes, for the chunked framings
    request_id: str = field(default_factory=lambda: f"fz-{next(_ids)}")

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", *(f"{k}: {v}" for k, v in self.headers)]
        lines.append(f"X-Request-Id: {self.request_id}")
        head = "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")
        return head + FRAMINGS[self.framing](self)

    @property
    def asks_to_close(self) -> bool:
        return "close" in self.connection_tokens

    @property
    def asks_to_upgrade(self) -> bool:
        upgrade = any(k.lower() == "upgrade" for k, _ in self.headers)
        return upgrade and "upgrade" in self.connection_tokens

    @property
    def connection_tokens(self) -> set[str]:
        values = [v for k, v in self.headers if k.lower() == "connection"]
        return {t.strip().lower() for v in values for t in v.split(",")}


def chunked(request: ClientRequest, *, ext: bool = False) -> bytes:
    body, pieces, pos = request.body, [], 0
    for size in (*request.chunks, len(request.body)):
        piece = body[pos : pos + size]
        pos += len(piece)
        if piece:
            pieces.append(b"%x%b\r\n%b\r\n" % (len(piece), b";x=1" if ext else b"", piece))
    return b"".join(pieces) + b"0\r\n\r\n"


def _length_head(request: ClientRequest, name: str = "Content-Length", extra: int = 0) -> bytes:
    return f"{name}: {len(request.body) - extra}\r\n".encode()


FRAMINGS = {
    "length": lambda r: _length_head(r) + b"\r\n" + r.body,
    "none": lambda r: b"\r\n" + r.body,  # only for an empty body (see requests())
    "length-odd-case": lambda r: _length_head(r, "cONTENT-lENGTH") + b"\r\n" + r.body,
    "chunked": lambda r: b"Transfer-Encoding: chunked\r\n\r\n" + chunked(r),
    "chunked-ext": lambda r: b"transfer-encoding: Chunked\r\n\r\n" + chunked(r, ext=True),
    "chunked-trailer": lambda r: (
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked(r)[:-2] + b"X-Trail: 1\r\n\r\n"
    ),
    "length-and-chunked": lambda r: (
        _length_head(r) + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(r)
    ),
    "length-twice": lambda r: _length_head(r) * 2 + b"\r\n" + r.body,
    "length-short": lambda r: _length_head(r, extra=min(1, len(r.body))) + b"\r\n" + r.body,
    "gzip-chunked": lambda r: b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(r),
    "chunked-identity": lambda r: b"Transfer-Encoding: chunked, identity\r\n\r\n" + chunked(r),
}


def go_fold(key: str) -> str:
    """A JSON key as Go's encoding/json matches it to a field: case-insensitively, with Unicode
    simple folding (the long s, U+017F, is an s; ``str.lower`` maps the Kelvin sign to k)."""
    return key.replace("\u017f", "s").lower()


class Pairs(list[tuple[str, Any]]):
    """A JSON object's members in order, duplicates kept."""


def json_pairs(body: bytes) -> Pairs | None:
    """A body's top-level JSON object, or None when it is none."""
    try:
        value = json.loads(body, object_pairs_hook=Pairs)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, Pairs) else None


def matching(pairs: Pairs, name: str, fold: Callable[[str], str] = go_fold) -> list[Any]:
    """The values given to field ``name``, in order; a null leaves a Go field as it was."""
    return [value for key, value in pairs if fold(key) == name and value is not None]


class Undecodable(Exception):
    """Ollama would answer 400: the body does not decode into its request type."""


def go_value(pairs: Pairs, name: str, kinds: tuple[type, ...]) -> Any:
    """The value Go's decoder leaves in field ``name``: the last one given wins; one of
    another type fails the whole decode (none of the fields read here takes a bool)."""
    values = matching(pairs, name)
    if any(isinstance(v, bool) or not isinstance(v, kinds) for v in values):
        raise Undecodable(name)
    return values[-1] if values else None


def ollama_model(body: bytes) -> str | None:
    """The model Ollama reads from a body: ``model``, else the legacy ``name``."""
    pairs = json_pairs(body)
    if pairs is None:
        return None
    try:
        return go_value(pairs, "model", (str,)) or go_value(pairs, "name", (str,)) or None
    except Undecodable:
        return None  # Ollama answers 400: nothing is served


DURATION = re.compile(r"(-?\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)?")
SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def ollama_unloads(path: bytes, body: bytes) -> bool | None:
    """Whether Ollama takes this as an unload (keep_alive of 0 whole seconds and nothing to
    generate); None when it would refuse the body."""
    pairs = json_pairs(body)
    if pairs is None:
        return None
    try:
        keep_alive = go_value(pairs, "keep_alive", (int, float, str))
        work = go_value(pairs, "messages" if path == b"/api/chat" else "prompt", (list, str))
    except Undecodable:
        return None
    if isinstance(keep_alive, str):
        match = DURATION.fullmatch(keep_alive)
        if match is None or (match[2] is None and float(match[1]) != 0):
            return None  # Go's time.ParseDuration needs a unit except for "0"
        keep_alive = float(match[1]) * SECONDS[match[2] or "s"]
    return keep_alive is not None and int(keep_alive) == 0 and not work


# -- strategies -------------------------------------------------------------------------------
# Mostly what clients send (an Ollama path with its method and a body naming a listed model),
# each part bent now and then; the plain choice comes first, where hypothesis shrinks to.

API_PATHS = sorted(KNOWN_PATHS | {"/metrics", "/-/healthy", "/api/status"})
PREFIXES = (BLOBS_PREFIX, OPENAI_MODEL_PREFIX)  # a parameter follows
NATURAL_METHODS = {p: "POST" for p in MODEL_REQUIRED_PATHS | FANOUT_PATHS} | {
    "/api/delete": "DELETE",
    OPENAI_MODEL_PREFIX: "GET",
    BLOBS_PREFIX: "POST",
}
METHODS = ("GET", "POST", "HEAD", "DELETE", "PUT", "OPTIONS")
ODD_METHODS = ("PATCH", "TRACE", "CONNECT", "PROPFIND", "FOO", "get")
PARAMETERS = ("sha256:" + "0" * 64, "llama3.2", "", ".", "..", "a/b", "a%2Fb")
CLIMBS = ("..", "%2e%2e", ".%2E", ".")
SEPARATORS = ("%2F", "%2f", "/", "%5C")
ESCAPES = ("%2F", "%2f", "%2E", "%2e%2e", "%00", "%23", "%3F", "%20", "%FF", "%zz", "%")
SEGMENT_CHARS = "abcXYZ019-._~:@!$&'()*+,;=é"
BENDS = ("dot", "up", "escape", "slash-escape", "upper", "//", "random")
AUTHORITIES = ("evil.example", "127.0.0.1:1", "proxy", "u:p@evil.example", "[::1]:1", "")


def sometimes(draw: st.DrawFn, one_in: int) -> bool:
    return draw(st.integers(0, one_in - 1)) == one_in - 1


@st.composite
def parameters(draw: st.DrawFn) -> str:
    """A digest or a model name, or one that climbs out of its prefix to another path."""
    if not sometimes(draw, 4):
        return str(draw(st.sampled_from(PARAMETERS)))
    climbs = draw(st.lists(st.sampled_from(CLIMBS), min_size=1, max_size=3))
    separator = draw(st.sampled_from(SEPARATORS))
    to = str(draw(st.sampled_from(API_PATHS))).lstrip("/").replace("/", separator)
    return separator.join([*climbs, to])


@st.composite
def segments(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(SEGMENT_CHARS) | st.sampled_from(ESCAPES), max_size=5))
    return "".join(parts) if parts else str(draw(st.sampled_from(("", ".", ".."))))


@st.composite
def bent(draw: st.DrawFn, path: str) -> str:
    """The path with dot segments, an escape, another case, an extra slash, or another."""
    bend = draw(st.sampled_from(BENDS))
    head, _, last = path.rpartition("/")
    if bend == "dot":
        return f"{head}/./{last}"
    if bend == "up":
        return f"{head}/x/../{last}"
    if bend == "escape" and last:
        i = draw(st.integers(0, len(last) - 1))
        return f"{head}/{last[:i]}%{ord(last[i]):02{draw(st.sampled_from('xX'))}}{last[i + 1 :]}"
    if bend == "slash-escape":
        return path.replace("/", "%2F", 2).replace("%2F", "/", 1)
    if bend == "upper":
        return path.upper()
    if bend == "//":
        return path.replace("/", "//", 2).replace("//", "/", 1)
    return "/" + "/".join(draw(st.lists(segments(), min_size=1, max_size=4)))


@st.composite
def targets(draw: st.DrawFn, path: str) -> str:
    """The request target for ``path``: origin form, maybe bent, a query, a fragment; now and
    then absolute form or ``*``."""
    if path in PREFIXES:
        path += draw(parameters())
    if sometimes(draw, 4):
        path = draw(bent(path))
    if sometimes(draw, 4):
        path += "?" + draw(st.sampled_from(("", "a=1", "a=%20b&c", "x=/..", "q=%FF")))
    if sometimes(draw, 8):
        path += "#" + draw(st.sampled_from(("", "frag", "a?b", "/api/generate")))
    if sometimes(draw, 12):
        scheme = draw(st.sampled_from(("http", "HTTP", "https")))
        authority = draw(st.sampled_from(AUTHORITIES))
        return f"{scheme}://{authority}{draw(st.sampled_from((path, '')))}"
    return "*" if sometimes(draw, 40) else path


def odd_case(name: str) -> st.SearchStrategy[str]:
    alternating = "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(name))
    return st.sampled_from((name, name.lower(), name.upper(), name.swapcase(), alternating))


EXTRA_HEADERS = (
    ("Content-Type", "application/json"),
    ("Accept", "*/*"),
    ("User-Agent", "fuzz/1"),
    ("X-Custom", "v"),
    ("X-Custom", "  spaced\tvalue "),
    ("Authorization", "Bearer t"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Trail"),
    ("Upgrade", "h2c"),
    ("Proxy-Connection", "keep-alive"),
    ("Proxy-Authorization", "Basic eDp5"),
    ("Expect", "100-continue"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("Accept-Encoding", "gzip"),
    ("X-Hop", "1"),
    (SLOW_HEADER, "1"),
)
CONNECTION_TOKENS = ("close", "keep-alive", "Upgrade", "TE", "X-Custom", "x-hop", "Keep-Alive")
ODD_HOSTS = ([], ["localhost", "localhost"], ["evil.example"])


@st.composite
def headers(draw: st.DrawFn) -> tuple[tuple[str, str], ...]:
    """Host (or none, or two), a few others, Connection with its tokens, in any order."""
    hosts = draw(st.sampled_from(ODD_HOSTS)) if sometimes(draw, 10) else ["localhost"]
    chosen = [(draw(odd_case("Host")), value) for value in hosts]
    extras = draw(st.lists(st.sampled_from(EXTRA_HEADERS), max_size=3))
    chosen += [(draw(odd_case(name)), value) for name, value in extras]
    nameable = CONNECTION_TOKENS + tuple(name for name, _ in extras)  # hop-by-hop by naming
    for _ in range(draw(st.sampled_from((0, 0, 1, 2)))):
        tokens = draw(st.lists(st.sampled_from(nameable), min_size=1, max_size=3))
        value = draw(st.sampled_from((",", ", "))).join(tokens)
        chosen.append((draw(odd_case("Connection")), value))
    return tuple(draw(st.permutations(chosen)))


LISTED_NAMES = ("llama3.2", "llama3.2:latest", "qwen2.5:7b", "nomic-embed-text")
ODD_NAMES = (" llama3.2 ", "LLAMA3.2", "unknown-model", "", 5, None, [])
KEYS = ("model", "name", "prompt", "messages", "keep_alive", "stream", "input", "options")
KEYS += ("images", "source", "destination")
KEY_VARIANTS = ("Model", "MODEL", "Name", "Prompt", "Keep_Alive", "\u212aeep_alive")
KEEP_ALIVES = ("5m", 0, "0", "0s", "0m", -1, None, 0.0, "500ms", False)
# What each path's client puts next to the model.
USUAL_FIELDS = {
    "/api/generate": ("prompt", "hi"),
    "/api/chat": ("messages", [{"role": "user", "content": "hi"}]),
    "/api/embed": ("input", "hi"),
    "/v1/embeddings": ("input", "hi"),
    "/v1/chat/completions": ("messages", [{"role": "user", "content": "hi"}]),
    "/v1/completions": ("prompt", "hi"),
}


@st.composite
def model_names(draw: st.DrawFn) -> Any:
    if sometimes(draw, 8):
        return draw(st.sampled_from(ODD_NAMES) | st.text(max_size=8))
    return draw(st.sampled_from(LISTED_NAMES))


def values_for(key: str) -> st.SearchStrategy[Any]:
    folded = go_fold(key)
    if folded in ("model", "name", "source", "destination"):
        return model_names()
    if folded == "keep_alive":
        return st.sampled_from(KEEP_ALIVES)
    if folded == "messages":
        return st.sampled_from(([{"role": "user", "content": "hi"}], []))
    if folded == "stream":
        return st.booleans()
    return st.sampled_from(("hi", "", ["x"], {}, ["aGk="]))


@st.composite
def json_bodies(draw: st.DrawFn, path: str) -> bytes:
    """A JSON object as the path's client writes it, and a few more keys, duplicates too."""
    pairs: list[tuple[str, Any]] = []
    if not sometimes(draw, 5):
        pairs.append(("model", draw(model_names())))
        if path in USUAL_FIELDS and not sometimes(draw, 4):  # without: an unload, maybe
            pairs.append(USUAL_FIELDS[path])
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=3))
    if sometimes(draw, 16):  # Ollama (Go) matches a key to its field in any case
        keys.insert(draw(st.integers(0, len(keys))), draw(st.sampled_from(KEY_VARIANTS)))
    pairs += [(key, draw(values_for(key))) for key in keys]
    return ("{" + ",".join(json.dumps(k) + ":" + json.dumps(v) for k, v in pairs) + "}").encode()


NON_JSON = (b"", b"not json", b"{", b"[1,2]", b'"str"', b"null", b"\xff\xfe", b"{}")
ODD_FRAMINGS = tuple(f for f in FRAMINGS if f not in ("length", "chunked"))


@st.composite
def requests(draw: st.DrawFn) -> ClientRequest:
    path = draw(st.sampled_from(API_PATHS + list(PREFIXES) * 2))
    method = NATURAL_METHODS.get(path, "GET")
    if sometimes(draw, 4):
        method = draw(st.sampled_from((*METHODS, "HEAD", *ODD_METHODS)))
    if sometimes(draw, 5):
        body = draw(st.sampled_from(NON_JSON) | st.binary(max_size=24))
    else:
        body = draw(json_bodies(path)) if method != "GET" or sometimes(draw, 3) else b""
    framing = draw(st.sampled_from(("length",) * 3 + ("chunked",)))
    if sometimes(draw, 6):
        framing = draw(st.sampled_from(ODD_FRAMINGS))
    if framing == "none" and body:
        framing = "length"
    chunks = tuple(draw(st.lists(st.integers(1, 8), max_size=3)))
    return ClientRequest(method, draw(targets(path)), draw(headers()), body, framing, chunks)


@dataclass(frozen=True)
class Conversation:
    """Requests pipelined on one connection; the client may leave after some answers."""

    requests: list[ClientRequest]
    leave_after: int | None = None  # answers read before closing; None: all of them


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    sent = draw(st.lists(requests(), min_size=1, max_size=3))
    return Conversation(sent, draw(st.sampled_from([None] * 4 + list(range(len(sent))))))


examples = st.lists(conversations(), min_size=1, max_size=3)


# -- the client -------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]

    @property
    def content_length(self) -> int | None:
        lengths = [v for n, v in self.headers if n.lower() == b"content-length"]
        return int(lengths[0]) if lengths else None

    @property
    def closes(self) -> bool:
        return any(n.lower() == b"connection" and b"close" in v.lower() for n, v in self.headers)


@dataclass
class Outcome:
    conversation: Conversation
    answers: list[Answer] = field(default_factory=list)
    ended: bool = False  # the proxy closed the connection
    timed_out: bool = False
    left: bytes = b""  # bytes after the last complete answer
    fault: str = ""  # the answers did not parse


class AnswerParser:
    """Answers one at a time, each fed to its own httptools parser a byte at a time, so that
    one ends exactly where it ends (a HEAD answer ends with its head)."""

    def __init__(self) -> None:
        self.done = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.done = True

    def take(self, data: bytes, head_only: bool) -> int | None:
        """Bytes of ``data`` the answer took, or None while it is incomplete."""
        self.parser = httptools.HttpResponseParser(self)
        if head_only:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return None
            self.parser.feed_data(data[: end + 4])
            return end + 4
        for i in range(len(data)):
            self.parser.feed_data(data[i : i + 1])
            if self.done:
                return i + 1
        return None


def next_answer(data: bytes, request: ClientRequest) -> tuple[Answer, int] | None:
    """The final answer at the start of ``data`` (1xx skipped) and its length, or None."""
    pos = 0
    while True:
        head = AnswerParser()
        if (taken := head.take(data[pos:], head_only=True)) is None:
            return None
        final = head.status >= 200
        if final and request.method != "HEAD" and head.status not in (204, 304):
            head = AnswerParser()  # the same answer again, with its body
            if (taken := head.take(data[pos:], head_only=False)) is None:
                return None
        pos += taken
        if final:
            return Answer(head.status, head.headers), pos


async def converse(port: int, conversation: Conversation) -> Outcome:
    """Send every request at once on one connection; read the answers until the deadline
    (or until the client leaves)."""
    outcome = Outcome(conversation)
    requests = conversation.requests
    wanted = len(requests) if conversation.leave_after is None else conversation.leave_after
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            for request in requests:
                writer.write(request.wire())
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            while len(outcome.answers) < wanted:
                if (found := next_answer(data, requests[len(outcome.answers)])) is not None:
                    outcome.answers.append(found[0])
                    data = data[found[1] :]
                    continue
                chunk = await reader.read(65536)
                if not chunk:
                    outcome.ended = True
                    break
                data += chunk
    except TimeoutError:
        outcome.timed_out = True
    except ConnectionError:
        outcome.ended = True
    except httptools.HttpParserError as exc:
        outcome.fault = f"{exc}: {data[:300]!r}"
    finally:
        outcome.left = data
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return outcome


# -- the rig ----------------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured(name: str, level: int) -> Iterator[Records]:
    logger = logging.getLogger(name)
    handler, old_level = Records(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@dataclass
class Rig:
    node: RecordingNode
    proxy: Proxy
    access: Records
    errors: list[Records]
    baseline: int  # descriptors less two per open node connection

    def descriptors_less_node_connections(self) -> int:
        return len(os.listdir("/proc/self/fd")) - 2 * len(self.node.open)

    def forwarding_connections(self) -> tuple[int, int]:
        """Open connections that carried forwarded requests, as the node and the proxy see
        them: all of them must be idle in the proxy's pool."""
        upstream = self.proxy.runtime.forwarder.upstreams.by_url.get(self.node.url)
        return sum(c.forwarded for c in self.node.open), len(upstream.idle) if upstream else 0

    @property
    def port(self) -> int:
        return self.proxy.serving.port

    def logged(self) -> dict[str, dict[str, Any]]:
        lines = [json.loads(r.getMessage()) for r in self.access.records]
        return {line["id"]: line for line in lines}

    def reset(self) -> None:
        self.node.received.clear()
        self.node.faults.clear()
        self.access.records.clear()
        for errors in self.errors:
            errors.records.clear()


@pytest.fixture
async def node() -> AsyncIterator[RecordingNode]:
    node = RecordingNode()
    await node.start()
    yield node
    await node.stop()  # after the proxy's teardown: fixtures end in reverse order


@pytest.fixture
async def rig(node: RecordingNode, start_proxy: StartProxy) -> AsyncIterator[Rig]:
    with contextlib.ExitStack() as stack:
        access = stack.enter_context(captured("ollama_proxy.access", logging.INFO))
        errors = [
            stack.enter_context(captured(name, logging.ERROR))
            for name in ("aiohttp.server", "aiohttp.web", "ollama_proxy", "asyncio")
        ]
        # One slot: two connections at once make one request wait in the queue.
        proxy = await start_proxy([node], caps=[1], access_log={"format": "json"})
        rig = Rig(node, proxy, access, errors, baseline=0)
        rig.baseline = rig.descriptors_less_node_connections()
        yield rig


# -- the properties ---------------------------------------------------------------------------


def check_well_formed(node: RecordingNode, by_id: dict[str, ClientRequest]) -> None:
    """P1."""
    assert not node.faults, f"the node could not parse what the proxy sent: {node.faults}"
    for got in node.received:
        where = f"the node got {got.method} {got.target!r} {got.headers}"
        assert got.version == "1.1", where
        assert got.target.startswith(b"/") and b"#" not in got.target, f"target: {where}"
        streamed = got.target.startswith(BLOBS_PREFIX.encode()) and not got.values("content-length")
        streamed &= bool(got.values("transfer-encoding"))  # a bodiless check or GET has neither
        if streamed:  # a blob of unknown length (sent chunked) can only go on so (fleet.py)
            assert got.values("transfer-encoding") == [b"chunked"], where
        else:
            assert not got.values("transfer-encoding"), f"Transfer-Encoding: {where}"
        lengths = got.values("content-length")
        assert len(lengths) <= 1 and lengths in ([], [b"%d" % len(got.body)]), where
        assert got.values("host") == [node.address.encode()], f"Host: {where}"
        named = HOP_BY_HOP - {"transfer-encoding"} if streamed else HOP_BY_HOP
        if (client := by_id.get(got.request_id or "")) is not None:
            named = named | client.connection_tokens - {"host", "content-length"}
        assert not {n.decode() for n, _ in got.headers} & named, f"hop-by-hop: {where}"
        for name, value in got.headers:
            assert TOKEN.fullmatch(name) and FIELD_VALUE.fullmatch(value), where


def check_accounted(
    node: RecordingNode, by_id: dict[str, ClientRequest], logged: dict[str, dict[str, Any]]
) -> None:
    """P2."""
    asked = {(r.method, client_path(r.target)) for r in by_id.values()}
    for got in node.received:
        where = f"the node got {got.method} {got.target!r} {got.body!r}"
        if got.request_id is None:
            assert is_own(got, asked), f"neither forwarded nor the proxy's own: {where}"
            continue
        assert got.request_id in by_id, f"an id no client sent: {where}"
        line = logged.get(got.request_id)
        assert line is not None, f"forwarded, and never logged: {where}"
        routed = unquote_to_bytes(got.path).decode("utf-8", "surrogateescape")
        assert endpoint(routed) == endpoint(line["path"]), f"the proxy routed {line!r}; {where}"
        model = ollama_model(got.body)
        if from_the_fleet(got):  # a fan-out is logged without its model
            continue
        if model is not None and not got.path.startswith(OPENAI_MODEL_PREFIX.encode()):
            assert model == line["model"], f"the proxy counted {line['model']!r}; {where}"


def endpoint(path: str) -> str:
    """What Ollama serves at a path: one of its paths, a path under a prefix, or none."""
    if path in KNOWN_PATHS:
        return path
    return next((prefix for prefix in PREFIXES if path.startswith(prefix)), "other")


def client_path(target: str) -> bytes:
    """The path a client's target names, percent-decoded."""
    if not target.startswith("/"):
        target = "/" + target.partition("://")[2].partition("/")[2]  # absolute form
    path = target.split("?", 1)[0].split("#", 1)[0]
    return unquote_to_bytes(path.encode("utf-8", "surrogateescape"))


def is_own(got: NodeRequest, asked: set[tuple[str, bytes]]) -> bool:
    """A check or discovery; or a fleet request for what a client asked: its method (a GET for
    a HEAD of a listing) and its path, and, on a generation path, an unload as Ollama reads it.
    """
    path = unquote_to_bytes(got.path)
    if got.method == "GET" and path in CHECKS:
        return not got.body
    methods = {got.method, "HEAD"} if got.method == "GET" else {got.method}
    if not any((m, path) in asked for m in methods):
        return False
    return path not in (b"/api/generate", b"/api/chat") or bool(ollama_unloads(path, got.body))


def check_answered(outcome: Outcome) -> None:
    """P3."""
    requests, leave_after = outcome.conversation.requests, outcome.conversation.leave_after
    sent = [(r.method, r.target, r.framing) for r in requests]
    where = f"requests {sent}; answers {[a.status for a in outcome.answers]}"
    assert not outcome.timed_out, (
        f"no answer within {ANSWER_TIMEOUT}s: {where}; got {outcome.left!r}"
    )
    assert not outcome.fault, f"an answer that does not parse: {outcome.fault}; {where}"
    if len(outcome.answers) in (len(requests), leave_after):
        return
    assert outcome.ended, f"fewer answers than requests, and the connection open: {where}"
    assert outcome.answers, f"the connection ended with no answer at all: {where}"
    last = outcome.answers[-1]
    answered = requests[len(outcome.answers) - 1]
    # aiohttp answers a HEAD it cannot parse with a 400 that has a body, then closes.
    error_body = answered.method == "HEAD" and last.status == 400
    if not (error_body and len(outcome.left) == last.content_length):
        assert not outcome.left, f"the connection ended mid-answer: {outcome.left!r}; {where}"
    closing = last.status >= 400 or last.closes
    closing |= answered.asks_to_close
    assert closing, f"the connection ended after an answer that did not close it: {where}"


async def check_released(rig: Rig) -> None:
    """P4."""
    pool, forwarder = rig.proxy.pool, rig.proxy.runtime.forwarder
    await wait_until(lambda: forwarder.active == 0, what="every request ended")
    await wait_until(lambda: pool_is_idle(pool), what="slots released, queue empty")
    await wait_until(
        lambda: rig.descriptors_less_node_connections() <= rig.baseline,
        what=f"descriptors back to {rig.baseline} (plus 2 per node connection)",
    )
    await wait_until(
        lambda: len(set(rig.forwarding_connections())) == 1,
        what="every connection to the node that forwarded requests idle in the proxy's pool",
    )


def check_no_crash(rig: Rig) -> None:
    """P5."""
    errors = [r for records in rig.errors for r in records.records if not client_fault(r)]
    assert not errors, [f"{r.name}: {r.getMessage()} {r.exc_info}" for r in errors]


def client_fault(record: logging.LogRecord) -> bool:
    """aiohttp logs each request it could not parse (and answered 400) with its traceback."""
    return record.exc_info is not None and isinstance(record.exc_info[1], HttpProcessingError)


async def holds(rig: Rig, example: list[Conversation]) -> None:
    """Run one example and check every property on it."""
    rig.reset()
    outcomes = await asyncio.gather(*(converse(rig.port, c) for c in example))
    for outcome in outcomes:
        check_answered(outcome)
    await check_released(rig)
    by_id = {r.request_id: r for c in example for r in c.requests}
    check_well_formed(rig.node, by_id)
    check_accounted(rig.node, by_id, rig.logged())
    check_no_crash(rig)


@settings(
    max_examples=EXAMPLES,
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    database=None,  # nothing written to the work tree; derandomized runs repeat anyway
    deadline=None,  # the property has its own deadline (ANSWER_TIMEOUT), on the sockets
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(example=examples)
async def test_the_request_path_holds_its_properties(rig: Rig, example: list[Conversation]) -> None:
    await holds(rig, example)


def one(
    method: str,
    target: str,
    body: bytes = b"{}",
    headers: tuple[tuple[str, str], ...] = (),
    framing: str = "length",
) -> ClientRequest:
    return ClientRequest(method, target, (("Host", "localhost"), *headers), body, framing)


def alone(*sent: ClientRequest, leave_after: int | None = None) -> list[Conversation]:
    return [Conversation(list(sent), leave_after)]


UPGRADE = (("Upgrade", "h2c"), ("Connection", "Upgrade"))
GENERATION = b'{"model": "llama3.2", "prompt": "hi"}'
DIGEST = "sha256:" + "0" * 64
# What this fuzz and the attack run found, each as the example it shrank to (or a plainer one
# of the same): they failed before their fixes and must hold now.
FOUND = {
    "a model key in another case (Go's decoder reads it)": alone(
        one("POST", "/", b'{"Model": "llama3.2"}')
    ),
    "blob path traversal to a generation": alone(
        one("POST", "/api/blobs/..%2Fgenerate", GENERATION)
    ),
    "blob path traversal, encoded twice": alone(
        one("POST", "/api/blobs/..%252F..%252Fapi%252Fgenerate", GENERATION)
    ),
    "a key given again as null (Go keeps the first)": alone(
        one("POST", "/", b'{"model": "llama3.2", "model": null}')
    ),
    "a fragment before the query": alone(one("GET", "/#a?b")),
    "a blob upload of unknown length": alone(one("POST", BLOBS_PREFIX + DIGEST, framing="chunked")),
    "a request pipelined after an upgrade request": alone(
        one("GET", "/", headers=UPGRADE), one("GET", "/")
    ),
    "an upgrade asked for on a second Connection line": alone(
        one("POST", "/v1/messages", headers=(("Connection", "x-hop"), *UPGRADE)), one("GET", "/")
    ),
    "Expect: 100-continue from a client that left": alone(
        one("POST", "/", headers=(("Expect", "100-continue"),)), leave_after=0
    ),
    "a blob check with a body": alone(one("HEAD", BLOBS_PREFIX + DIGEST, GENERATION)),
    "a GET under the blobs prefix": alone(one("GET", BLOBS_PREFIX, b"")),
    **{
        f"Expect: 100-continue from a client that left, on the proxy's own {method} {path}": alone(
            one(method, path, b"", headers=(("Expect", "100-continue"),)), leave_after=0
        )
        for method, path in [
            ("GET", "/"),
            ("GET", "/metrics"),
            ("GET", "/-/healthy"),
            ("HEAD", "/api/tags"),
        ]
    },
}


@pytest.mark.parametrize("example", list(FOUND.values()), ids=list(FOUND))
async def test_a_found_example_holds(rig: Rig, example: list[Conversation]) -> None:
    await holds(rig, example)
