"""HTTP/1.1 wire rules in one place: hop-by-hop headers, a node's response head, the request
the proxy writes to a node.

Framing is never decided here from raw bytes: node answers are parsed by httptools (llhttp)
in ``upstream.py``, client requests by aiohttp's server (llhttp too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

RawHeaders = Sequence[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: meaningful for one connection only; never forwarded, in either direction.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Written anew for the node (``request_bytes``): the node's host (Ollama on loopback answers
# 403 to any other) and the length of the body actually sent.
RESET_REQUEST_HEADERS = frozenset({b"host", b"content-length", b"expect"})
# Written anew for the client by aiohttp's server, from the body it sends.
RESET_RESPONSE_HEADERS = frozenset({b"content-length"})


@dataclass
class Head:
    """A node's status line and headers, as httptools parsed them."""

    status: int
    raw_reason: bytes = b""
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_length: int | None = None
    keep_alive: bool = True  # the node's framing lets the connection carry another request
    has_body: bool = True  # not for HEAD, 1xx, 204, 304

    @property
    def reason(self) -> str:
        return self.raw_reason.decode("latin-1")

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ("" when there is none)."""
        for name, value in self.raw_headers:
            if name.lower() == b"content-type":
                return value.split(b";", 1)[0].strip().lower().decode("latin-1")
        return ""


def end_to_end(raw_headers: RawHeaders, also_drop: frozenset[bytes] = frozenset()) -> RawHeaders:
    """The headers a proxy passes on: not hop-by-hop, nor named in ``Connection``."""
    named = _connection_tokens(v for k, v in raw_headers if k.lower() == b"connection")
    return [
        (k, v)
        for k, v in raw_headers
        if (lower := k.lower()) not in HOP_BY_HOP and lower not in also_drop and lower not in named
    ]


def _connection_tokens(connection_values: Iterable[bytes]) -> set[bytes]:
    """Headers named in ``Connection`` are hop-by-hop too (RFC 9110 §7.6.1)."""
    tokens: set[bytes] = set()
    for value in connection_values:
        tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def request_bytes(method: str, target: str, host: str, headers: RawHeaders, body: bytes) -> bytes:
    """An HTTP/1.1 request in one buffer: origin-form ``target``, the node's Host, the client's
    end-to-end headers as it sent them, and the body with its length."""
    # The target as aiohttp read it (decoded as UTF-8, keeping any other bytes as they were).
    line = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("utf-8", "surrogateescape")
    lines = [line, *[b"%b: %b\r\n" % header for header in headers]]
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines += (b"\r\n", body)
    return b"".join(lines)


def response_headers(head: Head) -> list[tuple[str, str]]:
    """The node's end-to-end headers for aiohttp's response (which frames the body itself)."""
    return [
        (_text(name), _text(value))
        for name, value in end_to_end(head.raw_headers, RESET_RESPONSE_HEADERS)
    ]


def _text(raw: bytes) -> str:
    # aiohttp writes header text as UTF-8: decoding as UTF-8 gives back the node's bytes.
    return raw.decode("utf-8", "replace")
