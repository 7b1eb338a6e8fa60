"""Conversation affinity through the proxy: each turn's lookup finds the node that served the
turn before, a session header names the conversation, and nodes that go down or leave the
config are not preferred. Sim nodes on loopback, real clients."""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import pytest

from proxy import forward
from proxy.pool import Pool, Want
from proxy.sim import SimNode

from .conftest import Proxy, StartNodes, StartProxy, generations, metric, proxy_config, wait_until

AFFINITY = "ollama_proxy_affinity_total"
JSON_LOG = {"format": "json"}


class Preferences:
    """What ``want_for`` was asked to prefer, one entry per admission, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[str | None] = []
        real = forward.want_for

        def recording(pool: Pool, model: str | None, *args: Any, **kwargs: Any) -> Want:
            self.seen.append(kwargs.get("preferred"))
            return real(pool, model, *args, **kwargs)

        monkeypatch.setattr(forward, "want_for", recording)


def served_by(nodes: list[SimNode], request_id: str) -> str:
    """The node that saw the request with this id."""
    (name,) = [
        n.name
        for n in nodes
        for r in generations(n)
        if {k.lower(): v for k, v in r.headers.items()}.get("x-request-id") == request_id
    ]
    return name


class Chat:
    """A chat on /api/chat, the client resending its whole history each turn."""

    def __init__(self, proxy: Proxy, nodes: list[SimNode], name: str) -> None:
        self.proxy, self.nodes, self.name = proxy, nodes, name
        self.history: list[dict[str, Any]] = [{"role": "system", "content": "Be brief. " * 100}]

    async def turns(self, count: int = 6) -> list[str]:
        """The node of each of ``count`` more turns."""
        return [await self.turn() for _ in range(count)]

    async def turn(self) -> str:
        n = len(self.history) // 2
        self.history.append({"role": "user", "content": f"{self.name}: question {n}"})
        request_id = f"{self.name}-{n}"
        body = {"model": "llama3.2", "messages": self.history, "stream": False}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.proxy.url + "/api/chat", json=body, headers={"X-Request-Id": request_id}
            ) as resp,
        ):
            assert resp.status == 200
            self.history.append((await resp.json())["message"])
        return served_by(self.nodes, request_id)


async def affinity_counts(proxy: Proxy) -> dict[str, float]:
    text = await proxy.metrics_text()
    return {r: metric(text, AFFINITY, result=r) for r in ("hit", "moved", "new")}


async def test_each_turn_prefers_the_node_of_the_turn_before(
    start_nodes: StartNodes, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = await start_nodes(3)
    proxy = await start_proxy(nodes)
    preferences = Preferences(monkeypatch)
    otters = await Chat(proxy, nodes, "otters").turns()
    stars = await Chat(proxy, nodes, "stars").turns()  # the same system prompt
    for served, preferred in ((otters, preferences.seen[:6]), (stars, preferences.seen[6:])):
        assert preferred == [None, *served[:-1]]  # a first turn knows no node
    counts = await affinity_counts(proxy)
    assert counts["new"] == 2 and counts["hit"] + counts["moved"] == 10
    assert counts["hit"] == sum(a == b for s in (otters, stars) for a, b in itertools.pairwise(s))


async def test_turn_n_plus_one_returns_to_turn_n_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """Equally loaded (idle) nodes: every turn of the chat stays on the first turn's node."""
    nodes = await start_nodes(3)
    proxy = await start_proxy(nodes)
    served = await Chat(proxy, nodes, "otters").turns()
    assert len(set(served)) == 1, served
    assert await affinity_counts(proxy) == {"hit": 5, "moved": 0, "new": 1}


async def test_a_session_header_names_the_conversation(
    start_nodes: StartNodes, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes, routing={"session_header": "X-Chat"})
    preferences = Preferences(monkeypatch)
    async with aiohttp.ClientSession() as session:
        for n, prompt in enumerate(["first", "unrelated"]):  # no shared history at all
            body = {"model": "llama3.2", "prompt": prompt, "stream": False}
            headers = {"X-Chat": "session-1", "X-Request-Id": f"s{n}"}
            async with session.post(proxy.url + "/api/generate", json=body, headers=headers) as r:
                assert r.status == 200
    assert preferences.seen == [None, served_by(nodes, "s0")]


async def test_the_sdks_chats_are_keyed_too(
    start_nodes: StartNodes, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SDK resends its history as it serialises it: the ollama library (streamed),
    OpenAI's chat completions and Anthropic's messages. The second turn of each prefers the
    first's node."""
    nodes = await start_nodes(3)
    proxy = await start_proxy(nodes)
    preferences = Preferences(monkeypatch)
    first = {"X-Request-Id": "first"}
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    async with ollama.AsyncClient(host=proxy.url, headers=first) as oll:
        stream = await oll.chat(model="llama3.2", messages=messages, stream=True)
        said = "".join([p.message.content or "" async for p in stream])
    messages += [{"role": "assistant", "content": said}, {"role": "user", "content": "more"}]
    async with ollama.AsyncClient(host=proxy.url) as oll:
        await oll.chat(model="llama3.2", messages=messages)
    assert preferences.seen[-2:] == [None, served_by(nodes, "first")]
    clear_ids(nodes)
    oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    async with oai, ant:
        messages = [{"role": "user", "content": "hi"}]
        asked = await oai.chat.completions.create(
            model="llama3.2", messages=messages, extra_headers=first
        )
        messages += [asked.choices[0].message.model_dump(), {"role": "user", "content": "more"}]
        await oai.chat.completions.create(model="llama3.2", messages=messages)
        assert preferences.seen[-2:] == [None, served_by(nodes, "first")]
        clear_ids(nodes)
        history: list[Any] = [{"role": "user", "content": "hi"}]
        answer = await ant.messages.create(
            model="llama3.2", max_tokens=20, messages=history, extra_headers=first
        )
        history += [{"role": "assistant", "content": answer.content}]
        history += [{"role": "user", "content": "more"}]
        await ant.messages.create(model="llama3.2", max_tokens=20, messages=history)
        assert preferences.seen[-2:] == [None, served_by(nodes, "first")]
    assert (await affinity_counts(proxy))["new"] == 3


def clear_ids(nodes: list[SimNode]) -> None:
    for node in nodes:
        node.stats.requests.clear()


async def test_a_node_that_is_down_or_gone_is_not_preferred(
    start_nodes: StartNodes,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nodes = await start_nodes(3)
    proxy = await start_proxy(nodes, access_log=JSON_LOG)
    caplog.set_level(logging.INFO, logger="ollama_proxy.access")
    preferences = Preferences(monkeypatch)
    otters, stars = Chat(proxy, nodes, "otters"), Chat(proxy, nodes, "stars")
    first = await otters.turn()
    await stars.turn()
    await next(n for n in nodes if n.name == first).stop()
    await wait_until(lambda: not proxy.pool.nodes[first].up, what="the node taken out")
    await otters.turn()  # known, at a node that is down: not preferred
    assert preferences.seen == [None, None, None]
    assert conv_logged(caplog) == ["new", "new", "moved"]
    # A node gone from the config is forgotten: stars' next turn knows no node.
    gone = served_by(nodes, "stars-0")
    proxy.runtime.apply(proxy_config([n for n in nodes if n.name != gone], access_log=JSON_LOG))
    await wait_until(lambda: gone not in proxy.pool.nodes, what="the reload")
    await stars.turn()
    assert preferences.seen[-1] is None
    assert conv_logged(caplog)[-1] == "new"


def conv_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``conv`` field of each access log line so far."""
    lines = [r.message for r in caplog.records if r.name == "ollama_proxy.access"]
    return [json.loads(line)["conv"] for line in lines]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_previous_response_id_finds_its_node(
    start_nodes: StartNodes,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    stream: bool,
) -> None:
    """The Responses API's chain by id: the id is read from the answer's last bytes."""
    nodes = await start_nodes(3)
    proxy = await start_proxy(nodes)
    preferences = Preferences(monkeypatch)
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as oai:
        first_id = await responses_id(oai, stream, input="hi", extra_headers=REQUEST_ID_1)
        await responses_id(oai, stream, input="more", previous_response_id=first_id)
    assert first_id.startswith("resp_")
    assert preferences.seen == [None, served_by(nodes, "r1")]


REQUEST_ID_1 = {"X-Request-Id": "r1"}


async def responses_id(oai: openai.AsyncOpenAI, stream: bool, **kwargs: Any) -> str:
    if not stream:
        return (await oai.responses.create(model="llama3.2", **kwargs)).id
    response_id = ""
    async for event in await oai.responses.create(model="llama3.2", stream=True, **kwargs):
        if event.type == "response.completed":
            response_id = event.response.id
    return response_id


async def test_no_entries_no_affinity(
    start_nodes: StartNodes, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes, routing={"affinity_entries": 0})
    preferences = Preferences(monkeypatch)
    await Chat(proxy, nodes, "otters").turns(3)
    assert preferences.seen == [None, None, None]
    assert await affinity_counts(proxy) == {"hit": 0, "moved": 0, "new": 0}
    assert len(proxy.runtime.forwarder.affinity) == 0
