"""Tests of the simulated Ollama node: wire format, slots, cancellation, faults, clients."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from pytest_aiohttp import AiohttpClient

from proxy.sim import (
    BUSY_MESSAGE,
    RUNNER_DIED_MESSAGE,
    SimNode,
    SimSettings,
    answer_text,
    answer_tokens,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FINAL_FIELDS = {
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
}


@pytest.fixture
async def node() -> AsyncIterator[SimNode]:
    sim = SimNode(SimSettings(tokens=3, token_interval=0.002, resident=["llama3.2"]))
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def read_ndjson(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    return [json.loads(line) async for line in response.content]


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, Any]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json(content_type=None)


# --------------------------------------------------------------------------- wire format


async def test_generate_streams_one_chunk_per_token_then_final_fields(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    body = {"model": "llama3.2", "prompt": "why is the sky blue"}
    async with session.post(f"{node.url}/api/generate", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-ndjson"
        assert response.headers["Transfer-Encoding"] == "chunked"
        chunks = await read_ndjson(response)

    *tokens, final = chunks
    assert [chunk["response"] for chunk in tokens] == answer_tokens("why is the sky blue", 3)
    assert all(chunk["done"] is False and chunk["model"] == "llama3.2" for chunk in tokens)
    assert tokens[0]["created_at"].endswith("Z")
    assert final["done"] is True
    assert final["done_reason"] == "stop"
    assert final["response"] == ""
    assert final["context"] == [1, 2, 3]
    assert final.keys() >= FINAL_FIELDS
    assert final["eval_count"] == 3
    assert final["prompt_eval_count"] == 5
    assert final["eval_duration"] >= 6_000_000  # 3 tokens x 2 ms, or the time they took
    assert all(isinstance(final[key], int) for key in FINAL_FIELDS)
    assert node.stats.completed == 1
    assert node.stats.eval_count_total == 3
    assert node.stats.prompt_eval_count_total == 5


async def test_eval_duration_is_the_time_the_tokens_took_when_the_sleeps_overrun(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    """As Ollama measures it: a sim held up (a busy machine) must not claim its nominal speed."""
    body = {"model": "llama3.2", "prompt": "why is the sky blue"}
    async with session.post(f"{node.url}/api/generate", json=body) as response:
        await response.content.readline()  # the first token: generation is under way
        time.sleep(0.2)  # noqa: ASYNC251 - holds up the sim, which runs on this loop
        final = (await read_ndjson(response))[-1]
    assert final["eval_count"] == 3
    assert final["eval_duration"] >= 200_000_000


async def test_generate_stream_false_is_one_json_body(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    body = {"model": "llama3.2:latest", "prompt": "hi", "stream": False}
    body["options"] = {"num_predict": 5}
    async with session.post(f"{node.url}/api/generate", json=body) as response:
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        assert "Content-Length" in response.headers
        raw = await response.read()

    assert b": " not in raw and b", " not in raw  # compact JSON, like Go
    reply = json.loads(raw)
    assert reply["response"] == answer_text("hi", 5)
    assert reply["done"] is True and reply["eval_count"] == 5
    assert reply["model"] == "llama3.2:latest"  # echoed as sent


async def test_chat_streams_assistant_messages(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    messages = [{"role": "user", "content": "one two"}, {"role": "user", "content": "three"}]
    body = {"model": "llama3.2", "messages": messages}
    async with session.post(f"{node.url}/api/chat", json=body) as response:
        *tokens, final = await read_ndjson(response)

    assert [chunk["message"] for chunk in tokens] == [
        {"role": "assistant", "content": token} for token in answer_tokens(messages, 3)
    ]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["done_reason"] == "stop" and "context" not in final
    assert final["prompt_eval_count"] == 3


async def test_embed_endpoints_take_a_slot_and_answer_vectors(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    status, reply = await post_json(
        session, f"{node.url}/api/embed", {"model": "nomic-embed-text", "input": ["a", "b c"]}
    )
    assert status == 200
    assert reply["model"] == "nomic-embed-text"
    assert [len(vector) for vector in reply["embeddings"]] == [8, 8]
    assert reply["embeddings"][0] != reply["embeddings"][1]
    assert reply["prompt_eval_count"] == 3

    status, legacy = await post_json(
        session, f"{node.url}/api/embeddings", {"model": "nomic-embed-text", "prompt": "a"}
    )
    assert status == 200
    assert legacy["embedding"] == reply["embeddings"][0]
    assert node.stats.completed == 2 and node.stats.max_active == 1


async def test_errors_have_ollama_statuses_and_shapes(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    status, reply = await post_json(session, f"{node.url}/api/chat", {"model": "nope"})
    assert (status, reply) == (404, {"error": 'model "nope" not found, try pulling it first'})

    status, reply = await post_json(session, f"{node.url}/v1/chat/completions", {"model": "x"})
    assert status == 404
    assert reply["error"]["type"] == "api_error" and reply["error"]["param"] is None

    status, reply = await post_json(session, f"{node.url}/api/generate", {"prompt": "hi"})
    assert (status, reply) == (400, {"error": "model is required"})

    async with session.post(f"{node.url}/api/generate", data=b"{oops") as response:
        assert response.status == 400
        assert "error" in await response.json()

    async with session.get(f"{node.url}/api/nothing") as response:
        assert (response.status, await response.text()) == (404, "404 page not found")


# --------------------------------------------------------------------------- slots


async def test_slots_queue_then_reject_with_503(session: aiohttp.ClientSession) -> None:
    settings = SimSettings(num_parallel=1, max_queue=1, tokens=5, token_interval=0.01)
    node = SimNode(settings, name="tight")
    await node.start()
    try:
        body = {"model": "llama3.2", "prompt": "x", "stream": False}
        url = f"{node.url}/api/generate"
        first = asyncio.create_task(post_json(session, url, body))
        await node.wait_for(lambda stats: stats.active == 1)
        second = asyncio.create_task(post_json(session, url, body))
        await node.wait_for(lambda stats: stats.queued == 1)

        assert await post_json(session, url, body) == (503, {"error": BUSY_MESSAGE})
        results = await asyncio.gather(first, second)
    finally:
        await node.stop()

    assert [status for status, _reply in results] == [200, 200]
    stats = node.stats
    assert (stats.completed, stats.busy_rejections, stats.max_active) == (2, 1, 1)
    assert (stats.active, stats.queued) == (0, 0)


# --------------------------------------------------------------------------- cancellation


async def test_client_leaving_mid_stream_is_counted_promptly(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    node.settings.tokens = 1000
    body = {"model": "llama3.2", "prompt": "x"}
    async with session.post(f"{node.url}/api/generate", json=body) as response:
        assert json.loads(await response.content.readline())["response"] == answer_text("x", 1)
        response.close()  # drop the connection, as a proxy does when its client leaves

    await node.wait_for(lambda stats: stats.cancelled == 1 and stats.active == 0, timeout=0.2)
    assert node.stats.completed == 0


@pytest.mark.parametrize("stage", ["stream_false", "waiting_for_slot", "cold_load"])
async def test_cancellation_before_the_first_byte_is_counted(
    node: SimNode, session: aiohttp.ClientSession, stage: str
) -> None:
    node.settings.tokens = 1000
    url = f"{node.url}/api/generate"
    blocker = None
    model = "llama3.2"
    if stage == "waiting_for_slot":
        node.settings.num_parallel = 1
        blocker = asyncio.create_task(post_json(session, url, {"model": model, "prompt": "hi"}))
        await node.wait_for(lambda stats: stats.active == 1)
    if stage == "cold_load":
        node.settings.load_delay = 10.0
        model = "qwen2.5:0.5b"

    request = asyncio.create_task(
        post_json(session, url, {"model": model, "prompt": "hi", "stream": False})
    )
    reached = {
        "stream_false": lambda stats: stats.active == 1,
        "waiting_for_slot": lambda stats: stats.queued == 1,
        "cold_load": lambda stats: stats.cold_loads == 1,
    }[stage]
    await node.wait_for(reached)
    request.cancel()  # the client closes its connection

    await node.wait_for(lambda stats: stats.cancelled == 1, timeout=0.2)
    assert node.stats.queued == 0
    if blocker is not None:
        blocker.cancel()
        await node.wait_for(lambda stats: stats.cancelled == 2, timeout=0.2)
    assert node.stats.active == 0


async def test_concurrent_requests_share_one_cold_load(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    node.settings.load_delay = 0.05
    url = f"{node.url}/api/generate"
    body = {"model": "qwen2.5:0.5b", "prompt": "x", "stream": False}
    results = await asyncio.gather(*(post_json(session, url, body) for _ in range(3)))

    assert all(reply["load_duration"] >= 40_000_000 for _status, reply in results)
    assert node.stats.cold_loads == 1
    assert "qwen2.5:0.5b" in node.settings.resident
    async with session.get(f"{node.url}/api/ps") as response:
        names = [model["name"] for model in (await response.json())["models"]]
    assert names == ["llama3.2:latest", "qwen2.5:0.5b"]

    await post_json(session, url, body)
    assert node.stats.cold_loads == 1


# --------------------------------------------------------------------------- max_loaded


async def ps_names(session: aiohttp.ClientSession, url: str) -> list[str]:
    async with session.get(f"{url}/api/ps") as response:
        return [model["name"] for model in (await response.json())["models"]]


async def test_a_cold_load_beyond_max_loaded_evicts_the_least_recently_used(
    session: aiohttp.ClientSession,
) -> None:
    settings = SimSettings(tokens=1, resident=["llama3.2"], max_loaded=1, load_delay=0.02)
    node = SimNode(settings)
    await node.start()
    try:
        url = f"{node.url}/api/generate"

        async def generate(model: str) -> int:
            status, reply = await post_json(
                session, url, {"model": model, "prompt": "hi", "stream": False}
            )
            assert status == 200
            return int(reply["load_duration"])

        assert await generate("llama3.2") == 0  # resident: no load
        assert await generate("qwen2.5:0.5b") >= 15_000_000
        assert node.stats.cold_loads == 1
        assert await ps_names(session, node.url) == ["qwen2.5:0.5b"]

        assert await generate("llama3.2") >= 15_000_000  # evicted: loaded again
        assert (node.stats.cold_loads, node.stats.evictions) == (2, 2)
        assert await ps_names(session, node.url) == ["llama3.2:latest"]
    finally:
        await node.stop()


async def test_a_model_in_use_is_evicted_only_once_idle(session: aiohttp.ClientSession) -> None:
    settings = SimSettings(tokens=1000, token_interval=0.01, resident=["llama3.2"], max_loaded=1)
    node = SimNode(settings)
    await node.start()
    try:
        url = f"{node.url}/api/generate"
        llama = asyncio.create_task(post_json(session, url, {"model": "llama3.2", "prompt": "hi"}))
        await node.wait_for(lambda stats: stats.active == 1)
        qwen = asyncio.create_task(
            post_json(session, url, {"model": "qwen2.5:0.5b", "prompt": "hi"})
        )
        await node.wait_for(lambda _stats: "qwen2.5:0.5b" in settings.resident)
        # Loaded while llama3.2 streams: both in memory, one more than max_loaded.
        assert await ps_names(session, node.url) == ["llama3.2:latest", "qwen2.5:0.5b"]
        assert node.stats.evictions == 0

        llama.cancel()  # llama3.2 goes idle: evicted then, as qwen2.5 is still in use
        await node.wait_for(lambda stats: stats.evictions == 1)
        assert await ps_names(session, node.url) == ["qwen2.5:0.5b"]
        qwen.cancel()
        await node.wait_for(lambda stats: stats.active == 0)
        assert node.stats.evictions == 1
    finally:
        await node.stop()


async def test_no_limit_by_default(node: SimNode, session: aiohttp.ClientSession) -> None:
    url = f"{node.url}/api/generate"
    for model in ("qwen2.5:0.5b", "nomic-embed-text", "llama3.2"):
        await post_json(session, url, {"model": model, "prompt": "hi", "stream": False})
    assert len(await ps_names(session, node.url)) == 3
    assert node.stats.evictions == 0


# --------------------------------------------------------------------------- faults


async def test_die_fault_cuts_the_stream_after_some_tokens(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    node.settings.fault = "die"
    received: list[str] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        body = {"model": "llama3.2", "prompt": "hi"}
        async with session.post(f"{node.url}/api/generate", json=body) as resp:
            async for line in resp.content:
                received.append(json.loads(line)["response"])

    assert received == answer_tokens("hi", 2)
    await node.wait_for(lambda stats: stats.active == 0)
    assert (node.stats.completed, node.stats.cancelled) == (0, 0)


async def test_stall_fault_goes_silent_until_the_client_leaves(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    node.settings.fault = "stall"
    node.settings.fault_after_tokens = 1
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{node.url}/api/chat", json=body) as response:
        first = json.loads(await response.content.readline())
        assert first["message"]["content"] == answer_text("hi", 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(response.content.readline(), timeout=0.05)
        response.close()

    await node.wait_for(lambda stats: stats.cancelled == 1 and stats.active == 0, timeout=0.2)


async def test_error_faults_answer_generations_but_not_health_checks(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    body = {"model": "llama3.2"}
    node.settings.fault = "error500"
    assert await post_json(session, f"{node.url}/api/chat", body) == (
        500,
        {"error": RUNNER_DIED_MESSAGE},
    )
    node.settings.fault = "busy"
    assert await post_json(session, f"{node.url}/api/embed", body) == (503, {"error": BUSY_MESSAGE})
    assert node.stats.busy_rejections == 1

    async with session.get(f"{node.url}/api/version") as response:
        assert await response.json() == {"version": "0.12.6"}
    async with session.head(f"{node.url}/") as response:
        assert response.status == 200

    node.settings.health_fail = True
    async with session.get(f"{node.url}/api/version") as response:
        assert response.status == 500
    async with session.get(f"{node.url}/") as response:
        assert response.status == 500


async def test_stop_drops_connections_and_start_rebinds_the_same_port(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    node.settings.tokens = 1000
    url = node.url
    with pytest.raises(aiohttp.ClientPayloadError):
        body = {"model": "llama3.2", "prompt": "hi"}
        async with session.post(f"{url}/api/generate", json=body) as response:
            await response.content.readline()
            await node.stop()
            await response.read()
    assert node.stats.cancelled == 1

    await node.refuse()  # already stopped: a no-op
    with pytest.raises(aiohttp.ClientConnectorError):
        await session.get(f"{url}/")

    assert await node.start() == url
    async with session.get(f"{url}/") as response:
        assert await response.text() == "Ollama is running"


# --------------------------------------------------------------------------- observation


async def test_requests_are_recorded_and_stats_reset(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    await post_json(session, f"{node.url}/api/generate", body)
    async with session.get(f"{node.url}/api/tags"):
        pass

    generate, tags = node.stats.requests
    assert (generate.method, generate.path, generate.model) == ("POST", "/api/generate", "llama3.2")
    assert generate.json == body and json.loads(generate.body) == body
    assert generate.headers["Content-Type"] == "application/json"
    assert (tags.method, tags.json, tags.model) == ("GET", None, None)

    node.reset_stats()
    assert node.stats.requests == [] and node.stats.completed == 0
    with pytest.raises(TimeoutError, match="condition not reached"):
        await node.wait_for(lambda stats: stats.completed == 1, timeout=0.01)


async def test_sim_stats_reports_counters_and_residency_without_being_recorded(
    node: SimNode, session: aiohttp.ClientSession
) -> None:
    body = {"model": "qwen2.5:0.5b", "prompt": "one two", "stream": False}
    await post_json(session, f"{node.url}/api/generate", body)
    node.settings.fault = "refuse"  # the harness still sees the node's counters
    async with session.get(f"{node.url}/-/sim/stats") as response:
        assert response.status == 200
        stats = await response.json()

    assert stats == {
        "active": 0,
        "max_active": 1,
        "queued": 0,
        "completed": 1,
        "cancelled": 0,
        "busy_rejections": 0,
        "cold_loads": 1,
        "evictions": 0,
        "eval_count_total": 3,
        "prompt_eval_count_total": 2,
        "prompt_cached_total": 0,
        "prompt_computed_total": 7,  # "one two"
        "chat_turns": {},
        "resident": ["llama3.2:latest", "qwen2.5:0.5b"],
    }
    assert [request.path for request in node.stats.requests] == ["/api/generate"]


# --------------------------------------------------------------------------- management


async def test_model_management_endpoints(node: SimNode, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{node.url}/api/pull", json={"model": "phi3"}) as response:
        statuses = [step["status"] for step in await read_ndjson(response)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "phi3:latest" in node.settings.models

    copy = {"source": "phi3", "destination": "mine"}
    async with session.post(f"{node.url}/api/copy", json=copy) as response:
        assert response.status == 200
    async with session.delete(f"{node.url}/api/delete", json={"model": "phi3"}) as response:
        assert response.status == 200
    async with session.delete(f"{node.url}/api/delete", json={"model": "phi3"}) as response:
        assert response.status == 404

    async with session.get(f"{node.url}/api/tags") as response:
        models = (await response.json())["models"]
    assert [model["name"] for model in models][-1] == "mine:latest"
    assert {"name", "model", "modified_at", "size", "digest", "details"} <= models[0].keys()

    blob = f"{node.url}/api/blobs/sha256:abc"
    async with session.head(blob) as response:
        assert response.status == 404
    async with session.post(blob, data=b"bytes") as response:
        assert response.status == 201
    async with session.head(blob) as response:
        assert response.status == 200


# --------------------------------------------------------------------------- real clients


async def test_official_ollama_client_works_against_the_node(node: SimNode) -> None:
    async with ollama.AsyncClient(host=node.url) as client:
        generated = await client.generate(model="llama3.2", prompt="hi")
        assert generated.response == answer_text("hi", 3)
        assert generated.eval_count == 3

        parts = [part async for part in await client.generate("llama3.2", "hi", stream=True)]
        assert "".join(part.response or "" for part in parts) == answer_text("hi", 3)

        chat = await client.chat("llama3.2", messages=[{"role": "user", "content": "hi"}])
        assert chat.message.content == answer_text("hi", 3)

        embedded = await client.embed("nomic-embed-text", input=["a", "b"])
        assert len(embedded.embeddings) == 2

        listed = await client.list()
        assert listed.models[0].model == "llama3.2:latest"
        shown = await client.show("llama3.2")
        assert shown.details is not None and shown.details.format == "gguf"
        running = await client.ps()  # the embedding model was loaded above
        assert [model.name for model in running.models] == [
            "llama3.2:latest",
            "nomic-embed-text:latest",
        ]

        with pytest.raises(ollama.ResponseError) as missing:
            await client.generate("nope", "hi")
        assert missing.value.status_code == 404


async def test_official_openai_client_works_against_the_node(node: SimNode) -> None:
    messages: Any = [{"role": "user", "content": "hello there"}]
    async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="x") as client:
        completion = await client.chat.completions.create(model="llama3.2", messages=messages)
        assert completion.choices[0].message.content == answer_text("hello there", 3)
        assert completion.usage is not None and completion.usage.completion_tokens == 3

        stream = await client.chat.completions.create(
            model="llama3.2", messages=messages, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == (
            answer_text("hello there", 3)
        )
        assert chunks[-1].choices[0].finish_reason == "stop"

        text = await client.completions.create(model="llama3.2", prompt="hi")
        assert text.choices[0].text == answer_text("hi", 3)

        embedded = await client.embeddings.create(model="nomic-embed-text", input="a")
        assert len(embedded.data[0].embedding) == 8  # decoded from the client's base64 default

        models = await client.models.list()
        assert models.data[0].id == "llama3.2:latest"

        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=messages)


async def test_app_also_runs_under_aiohttp_test_server(aiohttp_client: AiohttpClient) -> None:
    node = SimNode(SimSettings(tokens=2, token_interval=0.001))
    client = await aiohttp_client(node.app)
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    async with client.post("/api/generate", json=body) as response:
        assert (await response.json())["response"] == answer_text("hi", 2)
    assert node.stats.cold_loads == 1


# --------------------------------------------------------------------------- command line


async def test_command_line_serves_until_sigterm(session: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.sim",
        "--port",
        "0",
        "--tokens",
        "2",
        "--max-loaded",
        "1",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=5)).decode()
        assert line.startswith("sim node listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[-1].strip()
        for model in ("llama3.2", "qwen2.5:0.5b"):
            body = {"model": model, "prompt": "hi", "stream": False}
            status, reply = await post_json(session, f"{url}/api/generate", body)
            assert (status, reply["response"]) == (200, answer_text("hi", 2))
        async with session.get(f"{url}/-/sim/stats") as response:
            stats = await response.json()
        assert (stats["cold_loads"], stats["resident"]) == (2, ["qwen2.5:0.5b"])
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=5) == 0
