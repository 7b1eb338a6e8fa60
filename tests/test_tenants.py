"""Client keys through the real process and real clients: 401, 403 and 429 in each API's
shape, models by glob, management by ``manage``, rate and token windows charged from final
chunks, a key revoked during its stream, and secrets in no log line and at no node."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import pytest
import yaml

from proxy.sim import SimNode, answer_text, answer_tokens

from .conftest import (
    StartNodes,
    StartProxy,
    free_port,
    generations,
    metric,
    proxy_config_data,
    wait_until,
)

NAMES = ("alice", "ops", "root", "slow", "tok", "claude", "codex", "bulk", "solo")
SECRETS = {name: f"op-test-{name}-s3cr3t" for name in NAMES}
CHAT = [{"role": "user", "content": "one two three"}]  # three prompt tokens at the sim node


def key_entry(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "key_sha256": hashlib.sha256(SECRETS[name].encode()).hexdigest(), **extra}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


@dataclass
class Running:
    url: str
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    seen: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for_line(self, text: str, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                self.seen.clear()
                await self.seen.wait()

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as r:
            return await r.text()


@contextlib.asynccontextmanager
async def proxy_process(config: Path) -> AsyncIterator[Running]:
    """``python -m proxy`` on a free port, every line of its stderr kept for the test."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "--config", str(config)),
        *("--listen", f"127.0.0.1:{port}"),
        stderr=asyncio.subprocess.PIPE,
    )
    running = Running(f"http://127.0.0.1:{port}", process)

    async def read() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            running.lines.append(line.decode())
            running.seen.set()

    reading = asyncio.create_task(read())
    try:
        await running.wait_for_line("listening on", timeout=20)
        yield running
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 20)
        await reading


def write_config(path: Path, nodes: list[SimNode], keys: list[dict[str, Any]]) -> Path:
    data = proxy_config_data(nodes, auth={"keys": keys}, reload={"watch": False})
    path.write_text(yaml.safe_dump(data))
    return path


def assert_no_secret_leaked(running: Running, nodes: list[SimNode]) -> None:
    log = "".join(running.lines)
    assert "key=alice" in log  # the access log names the key ...
    assert [s for s in SECRETS.values() if s in log] == []  # ... and never its secret
    for node in nodes:
        for request in node.stats.requests:
            sent = json.dumps(request.headers)
            assert [s for s in SECRETS.values() if s in sent] == [], request.path
            assert "x-api-key" not in {h.lower() for h in request.headers}


async def test_keys_through_every_client(start_nodes: StartNodes, tmp_path: Path) -> None:
    (node,) = await start_nodes(1, tokens=4, resident=["llama3.2:latest", "qwen2:latest"])
    keys = [
        key_entry("alice", models=["llama3.2*"], requests_per_minute=100),
        key_entry("ops", manage=True),
        key_entry("root", admin=True),
    ]
    async with proxy_process(write_config(tmp_path / "config.yaml", [node], keys)) as proxy:
        await proxy.wait_for_line("auth: keys mode, 3 keys")
        await openai_answers(proxy.url)
        await ollama_answers(proxy.url)
        await anthropic_answers(proxy.url)
        await admin_paths(proxy.url)
        text = await proxy.metrics()
        # The last proxied request (anthropic's refused one) has been logged.
        await proxy.wait_for_line("path=/v1/messages model=- node=- status=401")
    assert metric(text, "ollama_proxy_key_requests_total", key="alice", code="200") == 3
    assert metric(text, "ollama_proxy_key_requests_total", key="", code="401") == 3
    assert metric(text, "ollama_proxy_key_rejections_total", key="", reason="unauthorized") == 3
    assert metric(text, "ollama_proxy_key_rejections_total", key="alice", reason="forbidden") == 2
    # Ollama's final chunk, OpenAI's usage and Anthropic's: 3 + 4, 3 + 4 and 3 + 16 tokens.
    assert metric(text, "ollama_proxy_key_tokens_total", key="alice", type="completion") == 24
    assert metric(text, "ollama_proxy_key_tokens_total", key="alice", type="prompt") == 9
    assert_no_secret_leaked(proxy, [node])
    pulls = [r for r in generations(node) if r.path == "/api/pull"]
    assert len(pulls) == 1  # ops's; alice's was refused before any node


async def openai_answers(url: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=SECRETS["alice"], max_retries=0
    ) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="llama3.2",
            messages=CHAT,
        )
        assert raw.parse().choices[0].message.content == answer_text(CHAT, 4)
        assert raw.headers["X-RateLimit-Limit-Requests"] == "100"
        assert raw.headers["X-RateLimit-Remaining-Requests"] == "99"
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.chat.completions.create(model="qwen2", messages=CHAT)
        assert denied.value.status_code == 403 and "qwen2" in denied.value.message
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as refused:
            await bad.chat.completions.create(model="llama3.2", messages=CHAT)
    assert refused.value.code == "invalid_api_key"
    assert refused.value.response.headers["WWW-Authenticate"] == "Bearer"


async def ollama_answers(url: str) -> None:
    alice = ollama.AsyncClient(host=url, headers=bearer("alice"))
    try:
        answer = await alice.generate("llama3.2", "one two three")
        assert answer.response == answer_text("one two three", 4) and answer.eval_count == 4
        with pytest.raises(ollama.ResponseError) as denied:
            await alice.pull("llama3.2")
        assert denied.value.status_code == 403 and "may not manage" in denied.value.error
    finally:
        await alice.close()
    ops = ollama.AsyncClient(host=url, headers=bearer("ops"))
    try:
        assert (await ops.pull("llama3.2")).status == "success"
    finally:
        await ops.close()
    anonymous = ollama.AsyncClient(host=url)
    try:
        with pytest.raises(ollama.ResponseError) as refused:
            await anonymous.list()
        assert refused.value.status_code == 401 and "missing API key" in refused.value.error
    finally:
        await anonymous.close()


async def anthropic_answers(url: str) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=url, api_key=SECRETS["alice"], max_retries=0
    ) as client:
        message = await client.messages.create(
            model="llama3.2",
            max_tokens=16,
            messages=[{"role": "user", "content": "one two three"}],
        )
        assert message.content and message.role == "assistant"
    async with anthropic.AsyncAnthropic(base_url=url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await bad.messages.create(
                model="llama3.2", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            )
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid API key"},
    }


async def admin_paths(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for who, status in (("alice", 401), ("root", 200)):
            async with session.get(url + "/-/nodes", headers=bearer(who)) as resp:
                assert resp.status == status, who
        async with session.get(url + "/-/usage", headers=bearer("root")) as resp:
            usage = {k["name"]: k for k in (await resp.json())["keys"]}
    assert usage["alice"]["requests"] == {"200": 3, "403": 2}
    assert usage["alice"]["rejections"] == {"forbidden": 2}
    assert usage["alice"]["tokens"] == {"prompt": 9, "completion": 24}
    assert usage["alice"]["windows"]["requests_per_minute"]["limit"] == 100
    assert usage["ops"]["requests"] == {"200": 1}


async def test_requests_and_tokens_per_window(start_nodes: StartNodes, tmp_path: Path) -> None:
    (node,) = await start_nodes(1, tokens=8, token_interval=0.001)
    keys = [
        key_entry("alice", requests_per_minute=2),
        key_entry("tok", tokens_per_minute=10),  # one answer of 3 + 8 tokens spends it
        key_entry("slow", tokens_per_day=12),
    ]
    async with proxy_process(write_config(tmp_path / "config.yaml", [node], keys)) as proxy:
        async with aiohttp.ClientSession() as session:

            async def chat(who: str) -> aiohttp.ClientResponse:
                body = {"model": "llama3.2", "messages": CHAT}
                resp = await session.post(
                    proxy.url + "/v1/chat/completions", json=body, headers=bearer(who)
                )
                await resp.read()
                return resp

            assert [(await chat("alice")).status for _ in range(2)] == [200, 200]
            limited = await chat("alice")
            assert limited.status == 429 and int(limited.headers["Retry-After"]) > 50
            assert limited.headers["X-RateLimit-Remaining-Requests"] == "0"
            error = (await limited.json())["error"]
            assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"

            stream = await session.post(
                proxy.url + "/api/generate",
                json={"model": "llama3.2", "prompt": "one two three"},
                headers=bearer("tok"),
            )
            lines = [json.loads(line) async for line in stream.content]
            assert len(lines) == 9 and lines[-1]["done"]  # past its budget, never cut
            spent = await chat("tok")
            assert spent.status == 429 and spent.headers["X-RateLimit-Remaining-Tokens"] == "0"
            assert spent.headers["X-RateLimit-Limit-Tokens"] == "10"

            assert (await chat("slow")).status == 200  # 11 of its 12 tokens for the day
            assert (await chat("slow")).status == 200  # 1 left: let in, and then over
            day = await chat("slow")
            assert day.status == 429 and int(day.headers["Retry-After"]) > 86000
        text = await proxy.metrics()
    assert metric(text, "ollama_proxy_key_rejections_total", key="alice", reason="rate") == 1
    assert metric(text, "ollama_proxy_key_rejections_total", key="tok", reason="tokens") == 1
    assert metric(text, "ollama_proxy_key_tokens_total", key="tok", type="prompt") == 3
    assert metric(text, "ollama_proxy_key_tokens_total", key="tok", type="completion") == 8
    assert len(generations(node)) == 5  # the three 429s reached no node


async def test_tokens_of_the_messages_and_responses_apis_are_charged(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    """Anthropic's and the Responses API's usage, streamed and whole, spend a key's tokens:
    two answers of 3 + 4 tokens spend a budget of 10, and the third request is a 429."""
    (node,) = await start_nodes(1, tokens=4)
    keys = [key_entry(name, tokens_per_minute=10) for name in ("claude", "codex")]
    async with proxy_process(write_config(tmp_path / "config.yaml", [node], keys)) as proxy:
        await anthropic_spends_its_tokens(proxy.url)
        await responses_spend_their_tokens(proxy.url)
        await proxy.wait_for_line("path=/v1/responses model=llama3.2 node=- status=429")
        text = await proxy.metrics()
    for key in ("claude", "codex"):
        assert metric(text, "ollama_proxy_key_tokens_total", key=key, type="prompt") == 6
        assert metric(text, "ollama_proxy_key_tokens_total", key=key, type="completion") == 8
        assert metric(text, "ollama_proxy_key_rejections_total", key=key, reason="tokens") == 1
    for path in ("/v1/messages", "/v1/responses"):
        labels = {"node": node.name, "model": "llama3.2:latest", "type": "completion"}
        assert metric(text, "ollama_proxy_tokens_total", **labels) == 16
        logged = [line for line in proxy.lines if f"path={path} " in line and "status=200" in line]
        assert len(logged) == 2 and all("tokens_in=3 tokens_out=4" in line for line in logged)


async def anthropic_spends_its_tokens(url: str) -> None:
    question = {"max_tokens": 4, "messages": [{"role": "user", "content": "one two three"}]}
    async with anthropic.AsyncAnthropic(
        base_url=url, api_key=SECRETS["claude"], max_retries=0
    ) as client:
        async with client.messages.stream(model="llama3.2", **question) as stream:
            streamed = await stream.get_final_message()
        assert streamed.usage.output_tokens == 4
        whole = await client.messages.create(model="llama3.2", **question)
        assert whole.usage.input_tokens == 3
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="llama3.2", **question)
    assert limited.value.body["error"]["type"] == "rate_limit_error"


async def responses_spend_their_tokens(url: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=SECRETS["codex"], max_retries=0
    ) as client:
        stream = await client.responses.create(model="llama3.2", input="one two three", stream=True)
        events = [event async for event in stream]
        assert events[-1].type == "response.completed"
        whole = await client.responses.create(model="llama3.2", input="one two three")
        assert whole.usage is not None and whole.usage.output_tokens == 4
        with pytest.raises(openai.RateLimitError) as limited:
            await client.responses.create(model="llama3.2", input="one two three")
    assert limited.value.response.headers["X-RateLimit-Remaining-Tokens"] == "0"


async def test_listings_show_a_key_only_the_models_it_may_use(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    both = ["llama3.2:latest", "qwen2:latest"]
    (node,) = await start_nodes(1, models=both, resident=both)
    keys = [key_entry("alice", models=["llama3.2*"]), key_entry("ops", models=["*"])]
    async with proxy_process(write_config(tmp_path / "config.yaml", [node], keys)) as proxy:
        for who, expected in (("alice", ["llama3.2:latest"]), ("ops", both)):
            client = ollama.AsyncClient(host=proxy.url, headers=bearer(who))
            try:
                assert sorted(m.model or "" for m in (await client.list()).models) == expected
                assert sorted(m.model or "" for m in (await client.ps()).models) == expected
            finally:
                await client.close()
            async with openai.AsyncOpenAI(
                base_url=proxy.url + "/v1", api_key=SECRETS[who], max_retries=0
            ) as openai_client:
                listed = sorted([m.id async for m in openai_client.models.list()])
                assert listed == expected, who
                assert (await openai_client.models.retrieve("llama3.2")).id == "llama3.2"
                if who == "alice":  # as absent as a model no node has
                    with pytest.raises(openai.NotFoundError) as hidden:
                        await openai_client.models.retrieve("qwen2")
                    with pytest.raises(openai.NotFoundError) as absent:
                        await openai_client.models.retrieve("llama3.2-absent")
                else:
                    assert (await openai_client.models.retrieve("qwen2")).id == "qwen2"
        text = await proxy.metrics()
    # The same answer as for a model no node has, but for the name.
    assert hidden.value.body == json.loads(
        json.dumps(absent.value.body).replace("llama3.2-absent", "qwen2")
    )
    assert hidden.value.message.endswith('model "qwen2" not found, try pulling it first')
    assert metric(text, "ollama_proxy_key_rejections_total", key="alice", reason="forbidden") == 1
    asked = [r.path for r in generations(node) if r.path.startswith("/v1/models/")]
    assert asked.count("/v1/models/qwen2") == 1  # ops's: alice's reached no node


async def test_a_revoked_keys_stream_finishes_and_its_next_request_is_401(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1, tokens=40, token_interval=0.03)
    path = write_config(tmp_path / "config.yaml", [node], [key_entry("alice"), key_entry("ops")])
    generate = {"model": "llama3.2", "prompt": "one two three"}
    async with proxy_process(path) as proxy, aiohttp.ClientSession() as session:
        async with session.post(
            proxy.url + "/api/generate", json=generate, headers=bearer("alice")
        ) as stream:
            first = await stream.content.readline()
            write_config(path, [node], [key_entry("ops")])  # alice's key is revoked
            proxy.process.send_signal(signal.SIGHUP)
            await proxy.wait_for_line("config reloaded")
            async with session.post(
                proxy.url + "/api/generate", json=generate, headers=bearer("alice")
            ) as refused:
                assert refused.status == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
            async with session.post(
                proxy.url + "/api/generate",
                json={**generate, "stream": False},
                headers=bearer("ops"),
            ) as other:
                assert other.status == 200
            rest = [json.loads(line) async for line in stream.content]
        assert json.loads(first)["response"] == answer_tokens("one two three", 1)[0]
        assert rest[-1]["done"]
        assert len(rest) == 40  # every token after the first, and the final chunk
    assert node.stats.cancelled == 0


async def test_protected_and_open_modes_through_the_process(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    """Loopback clients may manage in protected mode (others may not: test_auth.py);
    ``auth.open`` says so at start, and Authorization passes to the node as before."""
    (node,) = await start_nodes(1)
    path = tmp_path / "config.yaml"
    for auth, notice in (({}, "auth: protected mode"), ({"open": True}, "auth: open mode")):
        data = proxy_config_data([node], auth=auth, reload={"watch": False})
        path.write_text(yaml.safe_dump(data))
        async with proxy_process(path) as proxy, aiohttp.ClientSession() as session:
            await proxy.wait_for_line(notice)
            async with session.post(
                proxy.url + "/api/pull", json={"model": "llama3.2", "stream": False}
            ) as resp:
                assert resp.status == 200
            async with session.get(proxy.url + "/-/nodes") as resp:
                assert resp.status == 200
            async with session.post(
                proxy.url + "/api/generate",
                json={"model": "llama3.2", "prompt": "hi", "stream": False},
                headers={"Authorization": "Bearer for-the-node"},
            ) as resp:
                assert resp.status == 200
    sent = [r.headers.get("Authorization") for r in generations(node) if r.path == "/api/generate"]
    assert sent == ["Bearer for-the-node"] * 2


async def test_a_change_to_the_keys_file_alone_reloads_the_keys(
    start_nodes: StartNodes, start_proxy: StartProxy, tmp_path: Path
) -> None:
    (node,) = await start_nodes(1)
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([key_entry("ops")]))
    data = proxy_config_data(
        [node], auth={"keys_file": "keys.yaml"}, reload={"poll_interval": 0.05}
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    proxy = await start_proxy([node], config_path=tmp_path / "config.yaml")
    assert [k.name for k in proxy.runtime.config.auth.keys] == ["ops"]
    keys_file.write_text(yaml.safe_dump({"keys": [key_entry("ops"), key_entry("alice")]}))
    await wait_until(
        lambda: len(proxy.runtime.config.auth.keys) == 2, what="the keys file reloaded"
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/api/tags", headers=bearer("alice")) as resp:
            assert resp.status == 200
        keys_file.write_text("keys: [")  # a broken keys file: the reload is rejected
        registry = proxy.runtime.metrics.registry
        await wait_until(
            lambda: (
                registry.get_sample_value(
                    "ollama_proxy_config_reloads_total", {"result": "failure"}
                )
                == 1
            ),
            what="the rejected reload",
        )
        async with session.get(proxy.url + "/api/tags", headers=bearer("alice")) as resp:
            assert resp.status == 200  # the old keys keep serving


# The fairness run: one node with 2 slots, every answer holding its slot for one service time.
SERVICE_TOKENS, TOKEN_INTERVAL = 8, 0.004  # 32 ms of tokens an answer, and the proxy's share
BACKLOG, SENDS = 100, 10


@dataclass
class FairnessRun:
    service: float  # the time one request holds a slot, from this run's throughput
    waits: list[float]  # each of B's requests, from its arrival to its slot (the proxy's log)
    backlog_served: int  # of A's requests, answered 200

    @property
    def median_wait(self) -> float:
        """In service times."""
        return statistics.median(self.waits) / self.service


class Answers:
    """Requests answered so far, for pacing B by the slots that free, not by a timer, and for
    the service time: with both slots busy throughout, 2 slots / answers per second."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.changed = asyncio.Event()

    @property
    def count(self) -> int:
        return len(self.ends)

    def ended(self, _task: object) -> None:
        self.ends.append(time.monotonic())
        self.changed.set()

    def service(self) -> float:
        return 2 * (self.ends[-1] - self.ends[0]) / (self.count - 1)

    async def reach(self, count: int) -> None:
        while self.count < count:
            self.changed.clear()
            await self.changed.wait()


async def fairness_run(node: SimNode, path: Path, *, b_key: str) -> FairnessRun:
    """A ("bulk") queues BACKLOG chats at once; B (``b_key``) then sends SENDS, one each time
    two answers have ended (one service time of the 2 slots, however fast this machine is),
    each without waiting for its own answer before, as the pool's benchmark sends them
    (``proxy.bench.fairness``). ``b_key="bulk"`` puts B's requests in A's queue: first come
    first served, the order without fair share."""
    write_fairness_config(path, node)
    chat = {"model": "llama3.2", "messages": CHAT}
    answers = Answers()
    async with (
        proxy_process(path) as proxy,
        openai_client(proxy.url, "bulk") as a,
        openai_client(proxy.url, b_key) as b,
    ):
        backlog = [
            asyncio.create_task(a.chat.completions.with_raw_response.create(**chat))
            for _ in range(BACKLOG)
        ]
        for task in backlog:
            task.add_done_callback(answers.ended)
        await wait_for_queue(proxy, BACKLOG - 2)  # A's backlog waits: 2 served, the rest queued
        sent = []
        for number in range(SENDS):
            await answers.reach(answers.count + 2)
            ask = b.chat.completions.create(**chat, extra_headers={"X-Request-Id": f"b-{number}"})
            sent.append(asyncio.create_task(ask))
            sent[-1].add_done_callback(answers.ended)
        answered = [raw.status_code for raw in await asyncio.gather(*backlog)]
        await asyncio.gather(*sent)
        await proxy.wait_for_line(f'"id":"b-{SENDS - 1}"')
    logged = [json.loads(line[line.index("{") :]) for line in proxy.lines if '"queue_s"' in line]
    waits = [entry["queue_s"] for entry in logged if entry["id"].startswith("b-")]
    return FairnessRun(answers.service(), waits, answered.count(200))


def openai_client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=SECRETS[key], max_retries=0)


def write_fairness_config(path: Path, node: SimNode) -> None:
    data = proxy_config_data(
        [node],
        caps=[2],
        auth={"keys": [key_entry("bulk"), key_entry("solo")]},
        queue={"max_size": BACKLOG + SENDS, "timeout": 60},
        access_log={"format": "json"},
        reload={"watch": False},
    )
    path.write_text(yaml.safe_dump(data))


async def wait_for_queue(proxy: Running, depth: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while metric(await proxy.metrics(), "ollama_proxy_queue_depth") < depth:
        assert time.monotonic() < deadline, f"the queue never reached {depth}"
        await asyncio.sleep(0.01)


async def test_another_keys_request_waits_about_one_service_time_behind_a_backlog(
    start_nodes: StartNodes, tmp_path: Path
) -> None:
    """Fair share through the real process: B's median wait is about one service time (in
    one queue, about BACKLOG / 2 of them: docs/performance.md), and A's are all answered."""
    (node,) = await start_nodes(
        1, num_parallel=2, tokens=SERVICE_TOKENS, token_interval=TOKEN_INTERVAL
    )
    run = await fairness_run(node, tmp_path / "config.yaml", b_key="solo")
    assert run.backlog_served == BACKLOG and len(run.waits) == SENDS
    assert run.median_wait <= 3, (run.service, run.waits)
    assert node.stats.max_active <= 2
