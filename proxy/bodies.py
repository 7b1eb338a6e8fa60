"""Request bodies as the proxy reads them: bounded in size and in time, JSON objects or a
clear 400."""

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


def json_object(body: bytes, *, strict: bool) -> dict[str, Any] | None:
    """The body as a JSON object; on a model endpoint anything else is a 400."""
    if not body:
        if strict:
            raise BadRequest("missing request body")  # Ollama's own words
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        if strict:
            raise BadRequest(f"invalid JSON in request body: {exc}") from None
        return None
    if isinstance(payload, dict):
        return payload
    if strict:
        raise BadRequest("request body must be a JSON object")
    return None


def model_of(payload: dict[str, Any] | None) -> str | None:
    if payload is None:
        return None
    model = payload.get("model") or payload.get("name")  # "name": Ollama's legacy spelling
    return model if isinstance(model, str) and model else None


def required_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    payload = json_object(body, strict=True)
    assert payload is not None  # strict: anything else raised
    return payload
