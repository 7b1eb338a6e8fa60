"""Conversation keys (turn N+1 looks up what turn N recorded, in every chat family) and the
affinity table (bounded, expiring, forgetting nodes), on plain objects and a fake clock."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest

from proxy.affinity import (
    Affinity,
    Conversation,
    conversation_of,
    response_id_of,
    response_key,
    result_of,
)
from proxy.bodies import json_object
from proxy.config import ConfigError, parse_config

MODEL = "llama3.2:latest"
SYSTEM = "You are a careful assistant. " * 200  # a long shared system prompt
TURNS = 6

# One request body of a family, from the system prompt and the history so far.
Body = Callable[[str, list[dict[str, Any]]], dict[str, Any]]


def ollama_body(system: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": "llama3.2", "messages": [{"role": "system", "content": system}, *history]}


def anthropic_body(system: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    # The SDKs' prompt caching: cache_control on the system prompt and on the last block,
    # which moves every turn.
    messages = [dict(m) for m in history]
    last = messages[-1]
    last["content"] = [{"type": "text", "text": last["content"], "cache_control": EPHEMERAL}]
    system_blocks = [{"type": "text", "text": system, "cache_control": EPHEMERAL}]
    return {"model": "llama3.2", "max_tokens": 100, "system": system_blocks, "messages": messages}


def responses_body(system: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    if len(history) == 1:  # a first turn as the SDK's examples send it: input as a string
        return {"model": "llama3.2", "instructions": system, "input": history[0]["content"]}
    items = [
        {
            "type": "message",
            "id": f"msg_{i}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": m["content"], "annotations": []}],
        }
        if m["role"] == "assistant"
        else {"role": m["role"], "content": m["content"]}
        for i, m in enumerate(history)
    ]
    return {"model": "llama3.2", "instructions": system, "input": items}


EPHEMERAL = {"type": "ephemeral"}
FAMILIES: dict[str, Body] = {
    "/api/chat": ollama_body,
    "/v1/chat/completions": ollama_body,
    "/v1/messages": anthropic_body,
    "/v1/responses": responses_body,
}


def keys(path: str, payload: dict[str, Any], session: str | None = None) -> Conversation:
    """As the proxy reads a request: parsed by bodies.json_object, nested objects as pairs."""
    fields = json_object(json.dumps(payload).encode(), strict=True)
    conversation = conversation_of(path, fields, MODEL, session)
    assert conversation is not None
    return conversation


def chat(path: str, first: str, system: str = SYSTEM) -> list[Conversation]:
    """The keys of each of a chat's turns, the client appending each answer it got."""
    history: list[dict[str, Any]] = []
    turns = []
    for n in range(1, TURNS + 1):
        history.append({"role": "user", "content": f"{first} (question {n})"})
        turns.append(keys(path, FAMILIES[path](system, history)))
        history.append({"role": "assistant", "content": f"answer {n} to {first}"})
    return turns


@pytest.mark.parametrize("path", sorted(FAMILIES))
def test_each_turn_looks_up_what_the_turn_before_recorded(path: str) -> None:
    turns = chat(path, "Tell me about otters")
    assert turns[0].lookup is None  # a first turn: nothing before it
    for before, turn in itertools.pairwise(turns):
        assert turn.lookup is not None and turn.lookup == before.record
    assert len({t.record for t in turns}) == TURNS  # each turn a key of its own


@pytest.mark.parametrize("path", sorted(FAMILIES))
def test_chats_sharing_a_system_prompt_do_not_share_keys(path: str) -> None:
    otters, stars = chat(path, "Tell me about otters"), chat(path, "Tell me about stars")
    assert not {t.record for t in otters} & {t.record for t in stars}
    assert not {t.lookup for t in otters[1:]} & {t.lookup for t in stars[1:]}


def test_the_same_history_reserialised_hashes_the_same() -> None:
    plain = {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"},
        ],
    }
    # As an SDK sends the same history: parts for content, other key order, null fields.
    reserialised = {
        "messages": [
            {"content": [{"type": "text", "text": "Be brief."}], "role": "system"},
            {"content": [{"text": "hi", "type": "text"}], "role": "user"},
            {
                "content": "hello",
                "role": "assistant",
                "refusal": None,
                "annotations": [],
                "tool_calls": None,
            },
            {"role": "user", "content": [{"type": "text", "text": "how are you?"}]},
        ],
        "model": "llama3.2",
    }
    path = "/v1/chat/completions"
    assert keys(path, plain) == keys(path, reserialised)
    changed = json.loads(json.dumps(plain))
    changed["messages"][2]["content"] = "hello!"
    assert keys(path, changed).record != keys(path, plain).record


def test_a_tool_loop_chains_its_turns() -> None:
    """The tool's result is the next request's new input; the call is the answer before it."""
    asked = [{"role": "user", "content": "weather in Paris?"}]
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "function": {"name": "weather", "arguments": '{"c":"P"}'}}],
    }
    result = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    answered = [*asked, call, result]
    path = "/v1/chat/completions"
    first = keys(path, {"model": "m", "messages": asked})
    second = keys(path, {"model": "m", "messages": answered})
    third = keys(path, {"model": "m", "messages": [*answered, *final_turn()]})
    assert second.lookup == first.record
    assert third.lookup == second.record


def final_turn() -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "ok"}]


def test_an_answer_begun_by_the_client_is_not_part_of_the_key() -> None:
    """Anthropic's prefill: the request ends with the start of the assistant's answer, and
    the next turn resends the whole answer in its place."""
    asked = {"role": "user", "content": "JSON please"}
    prefilled = keys("/v1/messages", {"model": "m", "messages": [asked, ASSISTANT_BEGUN]})
    later = [asked, {"role": "assistant", "content": '{"a": 1}'}, {"role": "user", "content": "b"}]
    assert keys("/v1/messages", {"model": "m", "messages": later}).lookup == prefilled.record
    only_prefill = conversation_of("/v1/messages", {"messages": [ASSISTANT_BEGUN]}, MODEL)
    assert only_prefill is None


ASSISTANT_BEGUN = {"role": "assistant", "content": "{"}


def test_anthropic_tool_results_come_as_user_turns() -> None:
    asked = {"role": "user", "content": "weather in Paris?"}
    use = {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}
    called = {"role": "assistant", "content": [use]}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}
    returned = {"role": "user", "content": [result]}
    first = keys("/v1/messages", {"model": "m", "messages": [asked]})
    second = keys("/v1/messages", {"model": "m", "messages": [asked, called, returned]})
    assert second.lookup == first.record


def test_responses_function_calls_chain() -> None:
    asked = {"role": "user", "content": "weather?"}
    call = {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "sunny"}
    first = keys("/v1/responses", {"model": "m", "input": [asked]})
    second = keys("/v1/responses", {"model": "m", "input": [asked, call, output]})
    assert second.lookup == first.record


def test_a_previous_response_id_is_the_turn_before() -> None:
    body = {"model": "m", "previous_response_id": "resp_7", "input": "and then?"}
    assert keys("/v1/responses", body) == Conversation(response_key(MODEL, "resp_7"), None)
    completed = (
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"id":"resp_7","object":"response","output":[{"id":"msg_7"}]}}\n\n'
    )
    assert response_id_of([b"event: response.output_text.done\n", completed]) == "resp_7"
    assert response_id_of([b'{"id":"resp_9","object":"response","status":"completed"}']) == (
        "resp_9"
    )
    assert response_id_of([b'{"id":"msg_1"}']) is None


def test_a_session_header_names_the_conversation() -> None:
    body = ollama_body(SYSTEM, [{"role": "user", "content": "hi"}])
    session = keys("/api/chat", body, session="abc")
    assert session.lookup == session.record is not None
    later = ollama_body("other", [{"role": "user", "content": "something else"}])
    assert keys("/api/chat", later, session="abc") == session  # the header wins
    assert keys("/api/chat", body, session="abd") != session
    other_model = conversation_of("/api/chat", None, "qwen3:latest", "abc")
    assert other_model is not None and other_model.record != session.record
    # Honoured on any inference path, even without a history.
    assert conversation_of("/api/generate", {"prompt": "x"}, MODEL, "abc") == session


def test_requests_without_a_history_have_no_keys() -> None:
    assert conversation_of("/api/generate", {"prompt": "hi"}, MODEL) is None
    assert conversation_of("/api/chat", None, MODEL) is None
    assert conversation_of("/api/chat", {"messages": []}, MODEL) is None
    assert conversation_of("/api/chat", {"messages": "nonsense"}, MODEL) is None


def test_results() -> None:
    assert result_of(None, "a") == "new"
    assert result_of("a", "a") == "hit"
    assert result_of("a", "b") == "moved"


# -- the table ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(n: int) -> bytes:
    return n.to_bytes(16, "little")


def test_the_table_keeps_the_most_recently_recorded() -> None:
    table = Affinity(entries=3, ttl=60, clock=Clock())
    for n in range(4):
        table.record(key(n), f"node{n}")
    assert len(table) == 3
    assert table.lookup(key(0)) is None
    assert [table.lookup(key(n)) for n in (1, 2, 3)] == ["node1", "node2", "node3"]
    table.record(key(1), "node9")  # recorded again: now the newest, and at its new node
    table.record(key(4), "node4")
    assert table.lookup(key(2)) is None
    assert table.lookup(key(1)) == "node9"


def test_entries_expire() -> None:
    clock = Clock()
    table = Affinity(entries=10, ttl=60, clock=clock)
    table.record(key(1), "a")
    clock.now += 30
    table.record(key(2), "b")
    clock.now += 30
    assert table.lookup(key(1)) is None  # recorded 60 s ago
    assert table.lookup(key(2)) == "b"
    clock.now += 31
    table.record(key(3), "c")  # expired entries leave as new ones come
    assert len(table) == 1


def test_nodes_that_leave_are_forgotten() -> None:
    table = Affinity(entries=10, ttl=60, clock=Clock())
    for n, node in enumerate(["a", "b", "a", "c"]):
        table.record(key(n), node)
    table.forget(["a", "x"])
    assert [table.lookup(key(n)) for n in range(4)] == [None, "b", None, "c"]


def test_a_smaller_bound_applies_at_once_and_zero_turns_it_off() -> None:
    table = Affinity(entries=10, ttl=60, clock=Clock())
    for n in range(5):
        table.record(key(n), "a")
    table.configure(entries=2, ttl=60)
    assert len(table) == 2 and table.lookup(key(4)) == "a"
    table.configure(entries=0, ttl=60)
    table.record(key(9), "a")
    assert len(table) == 0


# -- its settings ------------------------------------------------------------------------------


def test_the_settings_and_their_errors() -> None:
    nodes = [{"url": "http://10.0.0.5:11434"}]
    routing = parse_config({"nodes": nodes}).routing
    assert (routing.affinity_entries, routing.affinity_ttl) == (100_000, 600)
    assert routing.session_header == "X-Session-Id"
    assert (
        parse_config({"nodes": nodes, "routing": {"session_header": ""}}).routing.session_header
        == ""
    )
    bad = {"affinity_entries": -1, "affinity_ttl": "long", "session_header": "X Session"}
    with pytest.raises(ConfigError) as caught:
        parse_config({"nodes": nodes, "routing": bad})
    assert caught.value.errors == [
        "routing.session_header: must be a header name (or empty: none)",
        "routing.affinity_entries: must be at least 0",
        "routing.affinity_ttl: must be a number",
    ]
