"""Real client libraries, pointed at the proxy, change nothing but their base URL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import ollama
import openai
import pytest

from proxy.sim import answer_text

from .conftest import Proxy, StartNodes, StartProxy


@pytest.fixture
async def proxy(start_nodes: StartNodes, start_proxy: StartProxy) -> Proxy:
    nodes = await start_nodes(2, tokens=5, token_interval=0.001)
    return await start_proxy(nodes)


@pytest.fixture
async def ollama_client(proxy: Proxy) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=proxy.url)
    yield client
    await client.close()


@pytest.fixture
async def openai_client(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


async def test_ollama_generate_streaming_and_not(ollama_client: ollama.AsyncClient) -> None:
    parts = [p async for p in await ollama_client.generate("llama3.2", "hi there", stream=True)]
    assert "".join(p.response for p in parts) == answer_text("hi there", 5)
    assert parts[-1].done and parts[-1].eval_count == 5
    whole = await ollama_client.generate("llama3.2", "hi there")
    assert whole.response == answer_text("hi there", 5) and whole.done


async def test_ollama_chat_streaming_and_not(ollama_client: ollama.AsyncClient) -> None:
    messages = [{"role": "user", "content": "hello"}]
    stream = await ollama_client.chat("llama3.2", messages=messages, stream=True)
    parts = [p async for p in stream]
    assert "".join(p.message.content or "" for p in parts) == answer_text("hello", 5)
    whole = await ollama_client.chat("llama3.2", messages=messages)
    assert whole.message.content == answer_text("hello", 5)


async def test_ollama_embed_list_show(ollama_client: ollama.AsyncClient) -> None:
    embedded = await ollama_client.embed("nomic-embed-text", ["a", "b"])
    assert len(embedded.embeddings) == 2
    listed = await ollama_client.list()
    assert "llama3.2:latest" in [m.model for m in listed.models]
    shown = await ollama_client.show("llama3.2")
    assert shown.details is not None and shown.details.family == "llama"


async def test_ollama_unknown_model_is_404(ollama_client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await ollama_client.generate("no-such-model", "hi")
    assert caught.value.status_code == 404
    assert "not found" in caught.value.error


async def test_openai_chat_streaming_and_not(openai_client: openai.AsyncOpenAI) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "hello"}
    ]
    whole = await openai_client.chat.completions.create(model="llama3.2", messages=messages)
    assert whole.choices[0].message.content == answer_text("hello", 5)
    stream = await openai_client.chat.completions.create(
        model="llama3.2", messages=messages, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == answer_text("hello", 5)


async def test_openai_embeddings_and_models(openai_client: openai.AsyncOpenAI) -> None:
    embedded = await openai_client.embeddings.create(model="nomic-embed-text", input="hello")
    assert len(embedded.data[0].embedding) > 0
    models = [m.id async for m in openai_client.models.list()]
    assert "llama3.2:latest" in models
