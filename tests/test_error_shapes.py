"""The proxy's own errors in the shape of each API family, read by that family's own SDK.

OpenAI's shape under /v1, Anthropic's on /v1/messages, Ollama's ``{"error": ...}`` elsewhere,
each with Ollama's words; a stream a node breaks off ends with an error event the SDK raises.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import ollama
import openai
import pytest

from proxy.api import FORWARDED_ROUTES
from proxy.sim import answer_tokens

from .conftest import BareNode, Proxy, StartNodes, StartProxy, free_port, generations

MISSING = 'model "no-such" not found, try pulling it first'  # Ollama's words (handleScheduleError)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def proxy(start_nodes: StartNodes, start_proxy: StartProxy) -> Proxy:
    return await start_proxy(await start_nodes(1))


@pytest.fixture
async def openai_client(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def anthropic_client(proxy: Proxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)


async def test_openai_sdk_reads_a_missing_model_as_not_found(
    openai_client: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await openai_client.chat.completions.create(model="no-such", messages=USER)  # type: ignore[list-item]
    assert MISSING in caught.value.message
    assert caught.value.body == {
        "message": MISSING,
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.NotFoundError) as retrieved:
        await openai_client.models.retrieve("no-such")
    assert retrieved.value.body["type"] == "not_found_error"  # type: ignore[index]


async def test_openai_sdk_reads_a_missing_model_field_as_a_bad_request(
    openai_client: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client.chat.completions.create(model="", messages=USER)  # type: ignore[list-item]
    assert "model is required" in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]


async def test_openai_sdk_reads_no_node_up_as_a_server_error(start_proxy: StartProxy) -> None:
    dead = BareNode()
    dead.url = f"http://127.0.0.1:{free_port()}"  # nothing listens: never up
    proxy = await start_proxy([dead])
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.models.list()
    assert caught.value.status_code == 503
    assert "no healthy node is available" in caught.value.message
    assert caught.value.body["type"] == "api_error"  # type: ignore[index]


async def test_anthropic_sdk_reads_a_missing_model_as_not_found(proxy: Proxy) -> None:
    async with anthropic_client(proxy) as client:
        with pytest.raises(anthropic.NotFoundError) as caught:
            await client.messages.create(model="no-such", max_tokens=5, messages=USER)  # type: ignore[list-item]
    assert MISSING in caught.value.message
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": MISSING},
    }


async def test_ollama_client_reads_a_missing_model_as_its_error(proxy: Proxy) -> None:
    client = ollama.AsyncClient(host=proxy.url)
    try:
        with pytest.raises(ollama.ResponseError) as caught:
            await client.chat("no-such", messages=USER)
    finally:
        await client.close()
    assert (caught.value.status_code, caught.value.error) == (404, MISSING)


async def test_fleet_not_found_answers_in_ollamas_words(proxy: Proxy) -> None:
    client = ollama.AsyncClient(host=proxy.url)
    try:
        with pytest.raises(ollama.ResponseError) as copied:
            await client.copy("no-such", "other")
        with pytest.raises(ollama.ResponseError) as deleted:
            await client.delete("no-such")
    finally:
        await client.close()
    assert (copied.value.status_code, copied.value.error) == (404, 'model "no-such" not found')
    assert (deleted.value.status_code, deleted.value.error) == (404, "model 'no-such' not found")


class BreakingAnthropicNode(BareNode):
    """Holds llama3.2; starts an Anthropic message stream, then dies after its first text."""

    HELLO = json.dumps(
        {"version": "0.12.6", "models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]}
    ).encode()
    EVENTS = (
        ("message_start", {
            "type": "message_start",
            "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "content": [],
                "model": "llama3.2", "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 0},
            },
        }),
        ("content_block_start", {
            "type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""},
        }),
        ("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": "Hel"},
        }),
    )  # fmt: skip

    async def answer(self, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for name, data in self.EVENTS:
            event = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        writer.transport.abort()  # a crash: no last chunk
        raise ConnectionResetError


async def test_anthropic_sdk_raises_on_a_stream_the_node_broke_off(
    start_proxy: StartProxy,
) -> None:
    node = BreakingAnthropicNode()
    await node.start()
    proxy = await start_proxy([node])
    texts = []
    async with anthropic_client(proxy) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            stream = await client.messages.create(
                model="llama3.2",
                max_tokens=5,
                messages=USER,  # type: ignore[list-item]
                stream=True,
            )
            async for event in stream:
                if event.type == "content_block_delta":
                    texts.append(event.delta.text)  # type: ignore[union-attr]
    assert texts == ["Hel"]
    assert "node bare failed mid-response" in caught.value.message
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    assert body["error"]["message"].startswith("node bare failed mid-response")


async def test_openai_sdk_raises_on_a_stream_the_node_broke_off(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, tokens=10, fault="die", fault_after_tokens=2)
    proxy = await start_proxy([node])
    texts = []
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.APIError) as caught:
            stream = await client.chat.completions.create(
                model="llama3.2",
                messages=USER,  # type: ignore[list-item]
                stream=True,
            )
            async for chunk in stream:
                texts.append(chunk.choices[0].delta.content)
    assert texts[0] == answer_tokens(USER, 1)[0]
    assert caught.value.message.startswith("node sim0 failed mid-response")
    assert caught.value.body["type"] == "api_error"  # type: ignore[index]


# Each path the proxy knows, a method it does not take, and the methods it does.
WRONG_METHODS = [
    ("GET", "/api/chat", "POST"),
    ("GET", "/api/generate", "POST"),
    ("PUT", "/api/generate", "POST"),
    ("GET", "/api/embed", "POST"),
    ("HEAD", "/api/show", "POST"),
    ("PUT", "/api/tags", "GET, HEAD"),
    ("POST", "/api/tags", "GET, HEAD"),
    ("DELETE", "/api/ps", "GET, HEAD"),
    ("GET", "/api/pull", "POST"),
    ("GET", "/api/delete", "DELETE"),
    ("PUT", "/api/copy", "POST"),
    ("GET", "/v1/chat/completions", "POST"),
    ("GET", "/v1/messages", "POST"),
    ("DELETE", "/v1/models/llama3.2", "GET"),
    ("POST", "/v1/models", "GET, HEAD"),
] + [
    ("GET" if methods == ("POST",) else "POST", path.replace("{model}", "x"), ", ".join(methods))
    for path, methods in FORWARDED_ROUTES.items()
]


async def test_a_wrong_method_on_a_known_path_is_405_with_allow(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    async with aiohttp.ClientSession() as session:
        for method, path, allow in WRONG_METHODS:
            async with session.request(method, proxy.url + path) as resp:
                assert (resp.status, resp.headers.get("Allow")) == (405, allow), (method, path)
                if method != "HEAD":
                    assert_family_shape(path, await resp.json(), method)
    assert generations(node) == []  # not one reached the node


def assert_family_shape(
    path: str, body: dict[str, object], needle: str, kind: str = "invalid_request_error"
) -> None:
    if path.startswith("/v1/messages"):
        error = body["error"]
        assert body["type"] == "error" and isinstance(error, dict), body
        assert needle in error["message"] and error["type"] == kind
    elif path.startswith("/v1/"):
        error = body["error"]
        assert isinstance(error, dict) and needle in error["message"], body
        assert error["type"] == kind
    else:
        assert isinstance(body["error"], str) and needle in body["error"], body


async def test_aiohttps_own_404_takes_the_family_shape(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/api/a%0Ab", "/v1/a%0Ab", "/v1/messages/a%0Ab"):  # no route takes these
            async with session.get(proxy.url + path) as resp:
                assert resp.status == 404, path
                assert_family_shape(path, await resp.json(), "not found", "not_found_error")


async def test_a_preflight_on_a_known_path_is_not_refused(proxy: Proxy) -> None:
    """OPTIONS is not a wrong method: a browser's CORS preflight is never the proxy's 405."""
    preflight = {"Origin": "http://localhost", "Access-Control-Request-Method": "POST"}
    async with aiohttp.ClientSession() as session:
        for path in ("/api/chat", "/v1/chat/completions", "/v1/messages"):
            async with session.options(proxy.url + path, headers=preflight) as resp:
                assert "not allowed" not in await resp.text(), path
