"""Request bodies as the proxy reads them: bounded in size and in time, JSON objects or a
clear 400, and the fields the proxy acts on read as Ollama's Go decoder reads them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .errors import BadRequest, BodyTooLarge, ProxyError

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


# The top-level fields the proxy acts on (routing, caps, unloads, fan-out), named as Ollama's
# request structs name them.
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
