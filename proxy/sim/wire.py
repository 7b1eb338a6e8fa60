"""What every handler shares on the wire: JSON bytes, error envelopes, request bodies, times,
and the lazily started stream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from aiohttp import web

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


class ApiError(Exception):
    """An error answered with a real status before any byte of the body was sent."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def ndjson(value: Any) -> bytes:
    return dumps(value) + b"\n"


def sse(value: Any) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=dumps(value), status=status, content_type="application/json", charset="utf-8"
    )


def go_not_found() -> web.Response:
    # Go's mux answers unknown paths (and wrong methods) this way, without a charset.
    return web.Response(
        body=b"404 page not found", status=404, headers={"Content-Type": "text/plain"}
    )


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """The error envelope of the API family the path belongs to."""
    if path.startswith("/v1/messages"):
        kinds = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}
        return {
            "type": "error",
            "error": {"type": kinds.get(status, "api_error"), "message": message},
        }
    if path.startswith("/v1/"):
        # Ollama 0.12's OpenAI middleware: its own 400s are invalid_request_error; errors coming
        # up from the native handlers (404, 500, 503) are all reported as api_error.
        kind = "invalid_request_error" if status == 400 else "api_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"error": message}


# What Ollama's request structs read as Go's encoding/json reads them, for the fields a proxy
# acts on: a key names a field exactly or else ignoring case (Unicode simple folding, where the
# Kelvin sign is a k and the long s an s), keys are assigned in document order so the last one
# wins, and a null leaves a string field as it was. Other keys are read as they are spelled.
GO_FIELDS = frozenset(
    {
        "model",
        "name",
        "keep_alive",
        "prompt",
        "messages",
        "images",
        "stream",
        "source",
        "destination",
    }
)
GO_STRINGS = frozenset({"model", "name", "prompt", "source", "destination"})
_FOLDS_ONTO_ASCII = str.maketrans({"\u212a": "k", "\u017f": "s"})


def parse_json(body: bytes) -> tuple[Any, dict[str, Any] | None]:
    """The parsed body (None when it is empty or not JSON) and, for an object, what Ollama
    reads from it (``go_reads``)."""
    try:
        return _parse(body) if body else (None, None)
    except (ValueError, RecursionError):
        return None, None


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as Ollama reads a JSON object (``go_reads``), or a 400 with its
    reasons."""
    body = await request.read()  # cached: the recording middleware read it first
    if not body:
        raise ApiError(400, "missing request body")
    try:
        _value, read = _parse(body)
    except ValueError as error:
        raise ApiError(400, f"invalid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON: exceeded max depth") from None
    if read is None:
        raise ApiError(400, "invalid request body: expected a JSON object")
    return read


def _parse(body: bytes) -> tuple[Any, dict[str, Any] | None]:
    """The value, and ``go_reads`` of its top-level object's members (the last object the
    decoder finishes) when it is one."""
    last: list[list[tuple[str, Any]]] = [[]]

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        last[0] = pairs
        return dict(pairs)

    value = json.loads(body.decode("utf-8", "replace"), object_pairs_hook=keep)
    return value, go_reads(last[0]) if isinstance(value, dict) else None


def go_reads(members: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members as Ollama's Go structs take them (see GO_FIELDS)."""
    read: dict[str, Any] = {}
    for key, value in members:
        field = _go_field(key)
        if field is None:
            read[key] = value
        elif value is not None or field not in GO_STRINGS:
            read[field] = value
    return read


def _go_field(key: str) -> str | None:
    if key in GO_FIELDS:
        return key
    folded = key.translate(_FOLDS_ONTO_ASCII)
    folded = folded.lower() if folded.isascii() else ""
    return folded if folded in GO_FIELDS else None


def model_field(body: dict[str, Any], *keys: str) -> str:
    """The first non-empty model name among keys ("model", or the legacy "name")."""
    for key in keys:
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    raise ApiError(400, "model is required")


@dataclass
class Form:
    """A multipart/form-data body as Go's ``ParseMultipartForm`` sorts it."""

    values: dict[str, str]  # the first value of each field that is no file
    files: dict[str, bytes]  # the first file of each name


def multipart_form(body: bytes, content_type: str) -> Form:
    """The form, read with the standard library's MIME parser (not the proxy's reader, so
    tests compare two readings), or a 400 in Ollama's words."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if message.get_content_type() != "multipart/form-data" or not message.is_multipart():
        raise ApiError(400, "failed to parse multipart form: not a multipart/form-data body")
    form = Form({}, {})
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(content, bytes):
            continue
        if part.get_filename():
            form.files.setdefault(name, content)
        else:
            form.values.setdefault(name, content.decode("utf-8", "replace"))
    return form


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def iso_now() -> str:
    return iso(datetime.now(UTC))


def seconds_to_ns(seconds: float) -> int:
    return round(seconds * 1e9)


class LazyStream:
    """A streamed response whose status line leaves with the first frame, as in Ollama, so
    that anything going wrong before the first token keeps its real status."""

    def __init__(self, request: web.Request, content_type: str) -> None:
        self._request = request
        self._content_type = content_type
        self._response: web.StreamResponse | None = None

    async def send(self, frame: bytes) -> None:
        if self._response is None:
            self._response = web.StreamResponse(headers={"Content-Type": self._content_type})
            self._response.enable_chunked_encoding()
            await self._response.prepare(self._request)
        await self._response.write(frame)

    async def finish(self, last_frames: bytes) -> web.StreamResponse:
        await self.send(last_frames)
        assert self._response is not None  # send() opened it
        await self._response.write_eof()
        return self._response
