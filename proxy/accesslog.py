"""One access log line per request, written when it ends (never per chunk).

Every field a client can shape (its request id, the path, the model, even the method) is cut
to ``errors.SHOWN_MAX`` characters and written with its control characters escaped, so that no
request can write a second line, rewrite a terminal, or fill the disk with one field.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from typing import Any, NamedTuple

from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError

from .config import AccessLogConfig
from .errors import SHOWN_MAX, shown
from .exchange import Exchange

log = logging.getLogger("ollama_proxy.access")

# aiohttp's words for what was wrong with a request end where it quotes the request's bytes:
# at a colon, or at a quoted string other than a header's name ("Missing 'Host' header").
_REASON_WORDS = re.compile(r"""(?:[^:\n'"]|'[\w-]{1,40}')*""")
REASON_MAX = 100

# JSON's short escapes; every other character that is not printable becomes \\uXXXX.
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class AccessLog:
    def __init__(self, config: AccessLogConfig) -> None:
        self.enabled = config.enabled
        self.format = config.format

    def record(self, ex: Exchange) -> None:
        if not self.enabled or not log.isEnabledFor(logging.INFO):
            return
        fields = {key: _capped(value) for key, value in access_fields(ex).items()}
        if self.format == "json":
            # ensure_ascii escapes every control character but DEL, the one ASCII left.
            log.info(json.dumps(fields, separators=(",", ":")).replace("\x7f", "\\u007f"))
        else:
            log.info(" ".join(f"{key}={_text(value)}" for key, value in fields.items()))


class Finished(NamedTuple):
    """One ended request as the dashboard lists it: what its access log line says, held in
    memory (a tuple: the request path pays one small allocation for it)."""

    at: float  # wall-clock time it ended
    method: str
    path: str
    model: str | None
    key: str | None
    node: str | None
    status: int
    takes_slot: bool
    queue_s: float
    ttfb_s: float | None
    duration_s: float
    tokens_in: int | None
    tokens_out: int | None


class Recent:
    """The last requests that ended, newest last: a bounded ring, fed where the access log
    line is written, read by the dashboard's snapshots (``events.py``)."""

    def __init__(self, size: int = 1024) -> None:
        self.entries: deque[Finished] = deque(maxlen=size)

    def record(self, ex: Exchange) -> None:
        usage = ex.usage
        fields = (
            time.time(),
            ex.method,
            _bounded(ex.path),  # the client's to shape (a model name, megabytes long)
            _bounded(ex.model) if ex.model is not None else None,
            ex.key.name if ex.key is not None else None,
            ex.node.name if ex.node is not None else None,
            ex.reported_status,
            ex.takes_slot,
            ex.queue_wait,
            ex.first_byte - ex.started if ex.first_byte else None,
            time.monotonic() - ex.started,
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
        )
        # tuple.__new__ skips NamedTuple's own __new__ and its keyword handling: a third of
        # the cost (performance.md).
        self.entries.append(tuple.__new__(Finished, fields))


def _bounded(text: str) -> str:
    return text if len(text) <= SHOWN_MAX else shown(text)


class MalformedRequests(logging.Filter):
    """aiohttp's record of a request it could not parse, made one line of the proxy's.

    aiohttp's server (``RequestHandler.handle_error``, on the ``aiohttp.server`` logger)
    logs each such request at ERROR with a traceback and the offending line quoted, which
    may be a header line with its token. The record keeps its logger and becomes
    ``malformed request from ADDRESS answered 400: REASON`` at INFO (the client's fault, not
    the proxy's), without the traceback or any byte of the request.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.msg = "malformed request from %s answered %d: %s"
            record.args = (remote, exc.code or 400, malformed_reason(exc))
            record.exc_info = record.exc_text = record.stack_info = None
            if record.levelno > logging.INFO:
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def malformed_reason(exc: HttpProcessingError) -> str:
    """What aiohttp found wrong with a request, in its words, without the request's bytes."""
    if isinstance(exc, InvalidURLError):
        return "invalid URL"  # its message is the whole target
    match = _REASON_WORDS.match(exc.message)
    words = (match[0] if match else "").strip() or type(exc).__name__
    return "".join(_escaped(c) for c in shown(words, REASON_MAX))


MALFORMED_REQUESTS = MalformedRequests()  # one instance: adding it again changes nothing


def access_fields(ex: Exchange) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "id": ex.request_id,
        "client": ex.client,
        "key": ex.key.name if ex.key is not None else None,
        "method": ex.method,
        "path": ex.path,
        "model": ex.model,
        "node": ex.node.name if ex.node is not None else None,
        "status": ex.reported_status,
        "queue_s": round(ex.queue_wait, 4),
        "ttfb_s": round(ex.first_byte - ex.started, 4) if ex.first_byte else None,
        "duration_s": round(now - ex.started, 4),
        "tokens_in": ex.usage.prompt_tokens if ex.usage else None,
        "tokens_out": ex.usage.completion_tokens if ex.usage else None,
        "retries": max(0, ex.attempts - 1),
        "cut": ex.cut,
        "conv": ex.affinity,  # hit, moved or new: a chat's way back to its last turn's node
        "cache": ex.cache.result if ex.cache is not None else None,  # embeddings only
    }


def _capped(value: object) -> object:
    return shown(value) if isinstance(value, str) else value


def _text(value: object) -> str:
    """A ``key=value`` value: as it is when that is unambiguous, else a JSON-style string."""
    if value is None:
        return "-"
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "\\'):
        return text
    return '"' + "".join(_escaped(c) for c in text) + '"'


def _escaped(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if char.isprintable():
        return char
    if ord(char) > 0xFFFF:
        return json.dumps(char)[1:-1]  # a surrogate pair, as JSON spells it
    return f"\\u{ord(char):04x}"
