"""The simulated nodes behind the proxy answer as a real Ollama would, through the official
SDKs: readable text, streams on the Responses and Anthropic Messages paths, tool calls when
tools are offered, thinking when asked, JSON for a format, and a load request's answer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import pytest

from proxy.sim import answer_text

from .conftest import Proxy, StartNodes, StartProxy

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
async def proxy(start_nodes: StartNodes, start_proxy: StartProxy) -> Proxy:
    nodes = await start_nodes(2, tokens=6, token_interval=0.001)
    return await start_proxy(nodes)


@pytest.fixture
async def openai_client(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def ollama_client(proxy: Proxy) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=proxy.url)
    yield client
    await client.close()


async def test_the_text_is_readable_and_the_same_for_the_same_question(
    ollama_client: ollama.AsyncClient,
) -> None:
    first = await ollama_client.generate("llama3.2", "why is the sky blue")
    again = await ollama_client.generate("llama3.2", "why is the sky blue")
    other = await ollama_client.generate("llama3.2", "tell me a joke")
    seeded = await ollama_client.generate("llama3.2", "tell me a joke", options={"seed": 7})
    assert first.response == again.response == answer_text("why is the sky blue", 6)
    assert other.response != first.response
    assert seeded.response == answer_text("anything", 6, seed=7)
    words = first.response.split()
    assert len(words) == 6 and all(word.strip(".,").isalpha() for word in words)
    assert first.eval_count == 6


async def test_responses_stream_through_the_proxy(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.responses.create(model="llama3.2", input="hello", stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == answer_text("hello", 6) and len(deltas) == 6
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == answer_text("hello", 6)
    assert completed.response.usage is not None and completed.response.usage.output_tokens == 6


async def test_responses_stream_helper_and_whole_body(openai_client: openai.AsyncOpenAI) -> None:
    async with openai_client.responses.stream(model="llama3.2", input="hello") as stream:
        texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(texts) == final.output_text == answer_text("hello", 6)
    whole = await openai_client.responses.create(model="llama3.2", input="hello")
    assert whole.output_text == answer_text("hello", 6) and whole.status == "completed"


async def test_anthropic_messages_stream_through_the_proxy(proxy: Proxy) -> None:
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        messages: Any = [{"role": "user", "content": "hello"}]
        async with client.messages.stream(
            model="llama3.2", max_tokens=4, messages=messages
        ) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        assert "".join(texts) == answer_text("hello", 4) and len(texts) == 4
        assert final.content[0].type == "text" and final.content[0].text == "".join(texts)
        assert final.stop_reason == "end_turn"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (1, 4)
        whole = await client.messages.create(model="llama3.2", max_tokens=4, messages=messages)
        assert whole.content[0].type == "text" and whole.content[0].text == "".join(texts)
    finally:
        await client.close()


async def test_tools_offered_get_a_call_of_the_first(
    ollama_client: ollama.AsyncClient, openai_client: openai.AsyncOpenAI, proxy: Proxy
) -> None:
    ask = [{"role": "user", "content": "weather in Lisbon?"}]
    native = await ollama_client.chat("llama3.2", messages=ask, tools=[WEATHER])
    calls = native.message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"
    assert set(calls[0].function.arguments) == {"city"}  # the required properties
    assert isinstance(calls[0].function.arguments["city"], str)
    streamed = [
        part.message.tool_calls
        async for part in await ollama_client.chat(
            "llama3.2", messages=ask, tools=[WEATHER], stream=True
        )
        if part.message.tool_calls
    ]
    assert streamed == [calls]
    # Given the tool's result, the model answers in words.
    answered = [*ask, {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    reply = await ollama_client.chat("llama3.2", messages=answered, tools=[WEATHER])
    assert not reply.message.tool_calls and reply.message.content

    chat: Any = ask
    tools: Any = [WEATHER]
    whole = await openai_client.chat.completions.create(
        model="llama3.2", messages=chat, tools=tools
    )
    assert whole.choices[0].finish_reason == "tool_calls"
    call = whole.choices[0].message.tool_calls
    assert call is not None and call[0].type == "function"
    assert call[0].function.name == "get_weather"
    assert set(json.loads(call[0].function.arguments)) == {"city"}
    stream = await openai_client.chat.completions.create(
        model="llama3.2", messages=chat, tools=tools, stream=True
    )
    chunks = [chunk async for chunk in stream]
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas if d.function] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        spec: Any = {
            "name": "get_weather",
            "input_schema": WEATHER["function"]["parameters"],  # type: ignore[index]
        }
        async with client.messages.stream(
            model="llama3.2", max_tokens=8, messages=chat, tools=[spec]
        ) as events:
            message = await events.get_final_message()
        assert message.stop_reason == "tool_use"
        block = message.content[0]
        assert block.type == "tool_use" and block.name == "get_weather"
        assert set(block.input) == {"city"}
    finally:
        await client.close()


async def test_think_gives_thinking_before_the_answer(
    ollama_client: ollama.AsyncClient, openai_client: openai.AsyncOpenAI
) -> None:
    ask = [{"role": "user", "content": "why?"}]
    reply = await ollama_client.chat("llama3.2", messages=ask, think=True)
    assert reply.message.thinking and reply.message.content
    assert reply.eval_count == 6  # thinking spends part of the budget
    parts = [p async for p in await ollama_client.chat("llama3.2", ask, think=True, stream=True)]
    kinds = ["thinking" if p.message.thinking else "content" for p in parts if not p.done]
    assert kinds == sorted(kinds, reverse=True) and set(kinds) == {"thinking", "content"}
    plain = await ollama_client.chat("llama3.2", messages=ask)
    assert not plain.message.thinking
    generated = await ollama_client.generate("llama3.2", "why?", think=True)
    assert generated.thinking and generated.response

    async with openai_client.responses.stream(
        model="llama3.2", input="why?", reasoning={"effort": "low"}
    ) as stream:
        kinds_seen = [e.type async for e in stream]
        final = await stream.get_final_response()
    assert "response.reasoning_summary_text.delta" in kinds_seen
    assert [item.type for item in final.output] == ["reasoning", "message"]


async def test_format_gives_json_that_fits_the_schema(
    ollama_client: ollama.AsyncClient, openai_client: openai.AsyncOpenAI
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age"],
    }
    ask = [{"role": "user", "content": "who?"}]
    reply = await ollama_client.chat("llama3.2", messages=ask, format=schema)
    value = json.loads(reply.message.content or "")
    assert set(value) == {"name", "age", "tags", "ok"}
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    assert isinstance(value["tags"], list) and isinstance(value["ok"], bool)
    parts = [p async for p in await ollama_client.chat("llama3.2", ask, format=schema, stream=True)]
    assert json.loads("".join(p.message.content or "" for p in parts)) == value
    assert isinstance(
        json.loads((await ollama_client.generate("llama3.2", "x", format="json")).response), dict
    )
    formatted: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    chat: Any = ask
    whole = await openai_client.chat.completions.create(
        model="llama3.2", messages=chat, response_format=formatted
    )
    assert json.loads(whole.choices[0].message.content or "") == value


async def test_a_request_with_nothing_to_generate_loads_the_model(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, resident=[])
    proxy = await start_proxy([node])
    async with ollama.AsyncClient(host=proxy.url) as client:
        loaded = await client.generate("llama3.2")
        assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
        chat = await client.chat("llama3.2")
        assert (chat.done, chat.done_reason, chat.message.content) == (True, "load", "")
    assert node.stats.cold_loads == 1 and node.settings.resident == ["llama3.2:latest"]
    async with aiohttp.ClientSession() as session:
        body = {"model": "llama3.2", "keep_alive": 0}
        async with session.post(proxy.url + "/api/generate", json=body) as resp:
            assert (await resp.json())["done_reason"] == "unload"
    assert node.settings.resident == []
