"""Request bodies as the proxy reads them: bounded in size and in time, JSON objects or a
clear 400, and the fields the proxy acts on read as Ollama's Go decoder reads them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus, unquote_to_bytes

from aiohttp import web
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import (
    MultipartParser,
    MultipartState,
    QuerystringParser,
    parse_options_header,
)

from .api import FORM_PATHS, KNOWN_PATHS
from .errors import BadRequest, BodyTooLarge, ProxyError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# The form parser logs each malformed form it meets as a warning: a client's mistake, answered
# with a 400 already, is nothing for the proxy's log.
logging.getLogger("python_multipart").setLevel(logging.ERROR)

# The longest wait for the next piece of a body (limits.body_timeout), set on each request by
# the server (serving.py); this default is for requests that come another way.
BODY_TIMEOUT = web.RequestKey("body_timeout", float)
DEFAULT_BODY_TIMEOUT = 60.0


class BodyStalled(ProxyError):
    def __init__(self, timeout: float) -> None:
        super().__init__(408, f"the request body stopped arriving for {timeout:g}s")


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it passes ``limit`` (announced or sent chunked), or
    408 when its next piece does not come within the body timeout."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    if request.content.is_eof():  # the usual short body came with the head: take it at once
        whole = request.content.read_nowait()
        if len(whole) > limit:
            raise BodyTooLarge(limit)
        return whole
    stall = request.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT)
    body = bytearray()
    while piece := await _next_piece(request, stall):
        body += piece
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


async def _next_piece(request: web.Request, stall: float) -> bytes:
    try:
        async with asyncio.timeout(stall):
            return await request.content.readany()
    except TimeoutError:
        raise BodyStalled(stall) from None


# The top-level fields the proxy acts on (routing, caps, unloads, fan-out, and the history a
# conversation is known by: affinity.py), named as Ollama's request structs name them.
FIELDS = frozenset(
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
        "system",
        "instructions",
        "input",
        "previous_response_id",
        # A generation's length bound, for its expected cost (estimate.requested_tokens).
        "options",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
    }
)
# Go's encoding/json matches a key to a field exactly or, failing that, by Unicode simple case
# folding; the only letters outside ASCII that fold onto ASCII ones are the Kelvin sign (k) and
# the long s (s). The dotless i folds to itself.
_ONTO_ASCII = str.maketrans({"\u212a": "k", "\u017f": "s"})
# Objects are decoded as lists of (key, value) pairs in document order, so that a field named
# by two keys is seen (a dict keeps one of them). The proxy reads top-level fields only, so
# nested objects stay lists of pairs: cheaper than making dicts of them.
_PAIRS = json.JSONDecoder(object_pairs_hook=list)
_JSON_SPACE = b" \t\n\r"


def json_object(body: bytes, *, strict: bool) -> dict[str, Any] | None:
    """The fields the proxy acts on, as Ollama reads them (see ``fields_of``); None for a body
    that is no JSON object, which on a model endpoint (``strict``) is a 400 instead."""
    if not body:
        if strict:
            raise BadRequest("missing request body")  # Ollama's own words
        return None
    try:
        members = _members(body)
    except ValueError as exc:
        if strict:
            raise BadRequest(f"invalid JSON in request body: {exc}") from None
        return None
    if members is not None:
        return fields_of(members)
    if strict:
        raise BadRequest("request body must be a JSON object")
    return None


def _members(body: bytes) -> list[tuple[str, Any]] | None:
    """The top-level object's members in document order; None for JSON that is no object.

    Bytes are read as Go reads them: UTF-8, an invalid sequence standing for U+FFFD. Nesting
    too deep to parse is a 400 on every path, never a guess: what the proxy cannot read may
    still mean something to Ollama (Go's decoder goes 10000 levels deep).
    """
    try:
        value = _PAIRS.decode(body.decode("utf-8", "replace"))
    except RecursionError:
        raise BadRequest("invalid JSON in request body: exceeded max depth") from None
    if not isinstance(value, list):
        return None
    if value:  # an object's members are tuples; an array's items never are
        return value if isinstance(value[0], tuple) else None
    return value if body.lstrip(_JSON_SPACE).startswith(b"{") else None


def fields_of(members: list[tuple[str, Any]]) -> dict[str, Any]:
    """The fields the proxy acts on, each under its own name, as Go's decoder assigns them.

    A key names a field exactly or, failing that, ignoring case, so ``Model`` is the model. A
    field named by more than one key (``model`` and ``Model``, or ``model`` twice) is a 400:
    Go lets the last one win, but leaves a string as it was for a later ``null``, and other
    decoders keep the first or refuse; no client sends one, and whichever the proxy picked it
    could route, cap or count a request as something the node does not run.
    """
    fields: dict[str, Any] = {}
    for key, value in members:
        field = field_named(key)
        if field is None:
            continue
        if field in fields:
            raise BadRequest(f'invalid request body: more than one key names the field "{field}"')
        fields[field] = value
    return fields


def field_named(key: str) -> str | None:
    """The field of ``FIELDS`` a top-level key names to Go's decoder, if any."""
    if key in FIELDS:
        return key
    folded = key.translate(_ONTO_ASCII)
    if not folded.isascii():
        return None
    folded = folded.lower()
    return folded if folded in FIELDS else None


def model_of(payload: dict[str, Any] | None) -> str | None:
    if payload is None:
        return None
    model = payload.get("model") or payload.get("name")  # "name": Ollama's legacy spelling
    return model if isinstance(model, str) and model else None


def required_json_object(body: bytes) -> dict[str, Any]:
    """The fields the proxy acts on in a JSON object body, or a 400 saying what is wrong."""
    payload = json_object(body, strict=True)
    assert payload is not None  # strict: anything else raised
    return payload


def whole_object(body: bytes) -> dict[str, Any]:
    """The whole body, nested objects and all, for sending it on changed; only for a body
    ``json_object`` accepted."""
    try:
        value = json.loads(body.decode("utf-8", "replace"))
    except RecursionError:
        raise BadRequest("invalid JSON in request body: exceeded max depth") from None
    assert isinstance(value, dict)  # json_object read it as an object
    return value


# -- forms (/v1/audio/transcriptions): the model is a field of the form -------------------------

FORM_TYPES = frozenset({b"multipart/form-data", b"application/x-www-form-urlencoded"})


def request_fields(
    path: str, body: bytes, content_type: str, query: Mapping[str, str], *, strict: bool
) -> dict[str, Any] | None:
    """The fields the proxy acts on: of the JSON body, or of the form on a path whose body is
    one (and on a path the proxy does not know, sent a form: a newer Ollama's upload)."""
    is_form = parse_options_header(content_type)[0] in FORM_TYPES
    if path in FORM_PATHS or (is_form and path not in KNOWN_PATHS):
        return {"model": form_model(body, content_type, query, strict=strict)}
    return json_object(body, strict=strict)


def form_model(body: bytes, content_type: str, query: Mapping[str, str], *, strict: bool) -> str:
    """The ``model`` field of a form body as Go's ``Request.FormValue`` reads it ("" for none).

    Go puts the URL's query values before a multipart form's (so ``?model=`` wins there), and
    an urlencoded body's before the query's. A form that cannot be read is a 400 when
    ``strict``, in Ollama's words; else it names no model.
    """
    mime, options = parse_options_header(content_type)
    try:
        if mime == b"multipart/form-data":
            if "model" in query:
                return query["model"]
            return _multipart_field(body, options.get(b"boundary"), b"model") or ""
        if mime == b"application/x-www-form-urlencoded":
            found = _urlencoded_field(body, b"model")
            return found if found is not None else query.get("model", "")
    except FormParserError as exc:
        if strict:
            raise BadRequest(f"failed to parse multipart form: {exc}") from None
        return ""
    if strict:
        raise BadRequest(f"failed to parse multipart form: {NOT_MULTIPART}")
    return query.get("model", "")


NOT_MULTIPART = "request Content-Type isn't multipart/form-data"  # Go's http.ErrNotMultipart


def _multipart_field(body: bytes, boundary: bytes | None, name: bytes) -> str | None:
    """The first part named ``name`` that is no file (Go's ``FormValue``), read in place: the
    parser hands over offsets into ``body``, and only the field's own bytes are copied."""
    if not boundary:
        raise FormParserError("no multipart boundary param in Content-Type")
    field = _FieldOfForm(name)
    parser = MultipartParser(boundary, field.callbacks())
    parser.write(body)
    if parser.state not in (MultipartState.END, MultipartState.END_BOUNDARY):
        raise FormParserError("NextPart: EOF")  # Go's words for a form cut short
    return field.value.decode("utf-8", "replace") if field.value is not None else None


class _FieldOfForm:
    """Multipart parser callbacks that keep one field's value and nothing else."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.value: bytes | None = None
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None  # the part's first Content-Disposition
        self._data: bytearray | None = None  # the wanted part's bytes, while it is read

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_began,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_ended,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._take_data,
            "on_part_end": self._part_ended,
        }

    def _part_began(self) -> None:
        self._disposition = None

    def _header_ended(self) -> None:
        if self._disposition is None and self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        if self.value is None and self._disposition is not None:
            kind, params = parse_options_header(self._disposition)
            # Go's FormName and FileName: a form-data part with our name and no file name.
            if kind == b"form-data" and params.get(b"name") == self.name:
                self._data = None if params.get(b"filename") else bytearray()

    def _take_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:
            self._data += data[start:end]

    def _part_ended(self) -> None:
        if self._data is not None:
            self.value, self._data = bytes(self._data), None


def _urlencoded_field(body: bytes, name: bytes) -> str | None:
    """The first ``name=value`` of an urlencoded body, decoded as Go's ParseQuery does; only
    that value is copied."""
    key = bytearray()
    value: bytearray | None = None  # the wanted field's bytes, once its name has been read
    found: bytes | None = None

    def take_data(data: bytes, start: int, end: int) -> None:
        nonlocal value
        if (
            value is None
            and found is None
            and unquote_to_bytes(bytes(key).replace(b"+", b" ")) == name
        ):
            value = bytearray()
        if value is not None:
            value += data[start:end]

    def field_ended() -> None:
        nonlocal value, found
        if found is None and unquote_to_bytes(bytes(key).replace(b"+", b" ")) == name:
            found = bytes(value or b"")
        key.clear()
        value = None

    parser = QuerystringParser(
        {
            "on_field_name": lambda data, start, end: key.extend(data[start:end]),
            "on_field_data": take_data,
            "on_field_end": field_ended,
        }
    )
    parser.write(body)
    parser.finalize()
    return unquote_plus(found.decode("latin-1"), "utf-8", "replace") if found is not None else None
