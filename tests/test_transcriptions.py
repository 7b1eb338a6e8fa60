"""Multipart inference (/v1/audio/transcriptions): the model is read from the form, so routing,
caps and the queue apply as to any generation."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from proxy.bodies import form_model
from proxy.errors import BadRequest

from .conftest import StartNodes, StartProxy, generations, wait_until

WHISPER = "whisper:small"
AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64)  # a few bytes that stand for a recording


def form(model: str | None, boundary: str = "b0undary") -> tuple[bytes, str]:
    parts = [(b'name="file"; filename="a.wav"\r\nContent-Type: audio/wav', AUDIO)]
    if model is not None:
        parts.append((b'name="model"', model.encode()))
    body = b"".join(
        b"--%s\r\nContent-Disposition: form-data; %s\r\n\r\n%s\r\n"
        % (boundary.encode(), head, value)
        for head, value in parts
    )
    return body + b"--%s--\r\n" % boundary.encode(), f"multipart/form-data; boundary={boundary}"


def test_the_model_is_read_from_the_form_as_go_reads_it() -> None:
    body, content_type = form(WHISPER)
    assert form_model(body, content_type, {}, strict=True) == WHISPER
    assert form_model(body, content_type, {"model": "q"}, strict=True) == "q"  # Go: query first
    no_model, _ = form(None)
    assert form_model(no_model, content_type, {}, strict=True) == ""
    urlencoded = b"language=en&model=whisper%3Asmall"
    assert form_model(urlencoded, "application/x-www-form-urlencoded", {}, strict=True) == WHISPER
    for broken in (body[:-12], b"not a form"):
        with pytest.raises(BadRequest, match="failed to parse multipart form"):
            form_model(broken, content_type, {}, strict=True)
        assert form_model(broken, content_type, {}, strict=False) == ""
    with pytest.raises(BadRequest, match="isn't multipart/form-data"):
        form_model(b"{}", "application/json", {}, strict=True)


async def test_a_transcription_goes_to_the_node_that_has_its_model(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (other,) = await start_nodes(1)
    (holder,) = await start_nodes(1, models=[WHISPER], resident=[WHISPER])
    proxy = await start_proxy([other, holder])
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    try:
        for _ in range(4):
            answer = await client.audio.transcriptions.create(
                model=WHISPER, file=("a.wav", AUDIO, "audio/wav")
            )
            assert answer.text
        with pytest.raises(openai.NotFoundError):
            await client.audio.transcriptions.create(model="nowhere", file=("a.wav", AUDIO))
    finally:
        await client.close()
    assert [r.model for r in generations(holder)] == [WHISPER] * 4
    assert generations(other) == []


async def test_transcriptions_under_a_cap_of_one_wait_in_the_queue(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, models=[WHISPER], resident=[WHISPER], token_interval=0.05)
    proxy = await start_proxy([node], caps=[1])
    body, content_type = form(WHISPER)

    async def transcribe() -> int:
        async with aiohttp.ClientSession() as session:
            headers = {"Content-Type": content_type}
            async with session.post(
                proxy.url + "/v1/audio/transcriptions", data=body, headers=headers
            ) as resp:
                await resp.read()
                return resp.status

    first = asyncio.create_task(transcribe())
    await node.wait_for(lambda s: s.active == 1)
    second = asyncio.create_task(transcribe())
    await wait_until(lambda: proxy.pool.queue_depth == 1, what="the second one queued")
    assert node.stats.active == 1 and len(generations(node)) == 1  # not on the node yet
    assert await asyncio.gather(first, second) == [200, 200]
    assert node.stats.max_active == 1 and node.stats.completed == 2


async def test_a_form_without_a_model_is_refused_before_any_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    body, content_type = form(None)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy.url + "/v1/audio/transcriptions",
            data=body,
            headers={"Content-Type": content_type},
        ) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
    assert "model is required" in error["message"]  # OpenAI-shaped, as Ollama answers on /v1
    assert generations(node) == []
