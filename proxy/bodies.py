"""Request bodies as the proxy reads them: bounded in size, JSON objects or a clear 400."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .errors import BadRequest, BodyTooLarge


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it passes ``limit`` (announced or sent chunked)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    if request.content.is_eof():  # the usual short body came with the head: take it at once
        whole = request.content.read_nowait()
        if len(whole) > limit:
            raise BodyTooLarge(limit)
        return whole
    body = bytearray()
    async for piece in request.content.iter_any():
        body += piece
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


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
