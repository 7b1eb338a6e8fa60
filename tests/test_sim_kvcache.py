"""The simulated node's slots and their KV cache: a request takes the free slot with the
longest cached prefix of its prompt and pays prefill only for the rest (issue 16)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.sim import SimNode, SimSettings, slots
from proxy.sim.plans import conversation_key, rendered
from proxy.sim.slots import PrefixCaches, shared_prefix

PREFILL = 0.001  # seconds per uncached token (4 characters)
MODEL = "llama3.2:latest"


def test_shared_prefix_counts_leading_characters() -> None:
    assert shared_prefix("abcdef", "abcxyz") == 3
    assert shared_prefix("abc", "abcdef") == 3
    assert shared_prefix("", "abc") == 0
    assert shared_prefix("xbc", "abc") == 0


def test_a_request_takes_the_free_slot_with_the_longest_prefix() -> None:
    caches = PrefixCaches(lambda: 3)
    texts = ("<user>cats\n", "<user>dogs and more\n", "")
    held_all = [caches.take(MODEL, text) for text in texts]  # one slot each, held at once
    for held, text in zip(held_all, texts, strict=True):
        held.slot.cached = text
        caches.release(held)
    held = caches.take(MODEL, "<user>dogs and more\n<assistant>woof\n")
    assert (held.cached, held.computed) == (len("<user>dogs and more\n"), len("<assistant>woof\n"))
    # The best slot is busy: the next longest prefix wins over an empty slot, as in Ollama
    # (without OLLAMA_MULTIUSER_CACHE), even though that overwrites another chat's cache.
    other = caches.take(MODEL, "<user>dogs?\n")
    assert other.cached == len("<user>")
    assert other.slot is held_all[0].slot


def test_without_a_match_the_least_recently_used_slot_is_overwritten() -> None:
    caches = PrefixCaches(lambda: 2)
    first, second = caches.take(MODEL, "aaaa"), caches.take(MODEL, "bbbb")
    first.slot.cached, second.slot.cached = "aaaa", "bbbb"
    caches.release(first)
    caches.release(second)
    held = caches.take(MODEL, "cccc")
    assert held.slot is first.slot and held.cached == 0
    assert sorted(caches.cached_texts(MODEL)) == ["", "bbbb"]  # only the shared prefix stays


def test_a_prompt_cached_whole_still_evaluates_its_last_token() -> None:
    caches = PrefixCaches(lambda: 1)
    held = caches.take(MODEL, "same")
    held.slot.cached = "same"
    caches.release(held)
    again = caches.take(MODEL, "same")
    assert (again.cached, again.computed) == (3, 1)


def test_clearing_a_model_forgets_its_slots() -> None:
    caches = PrefixCaches(lambda: 1)
    held = caches.take(MODEL, "hello")
    held.slot.cached = "hello"
    caches.release(held)
    caches.clear(MODEL)
    assert caches.take(MODEL, "hello").cached == 0


def test_prompts_render_each_message_as_its_role_and_text() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    assert rendered(messages) == "<system>be brief\n<user>hi\n"
    assert rendered(["a system prompt ", "a prompt"]) == "a system prompt a prompt"
    key = conversation_key(messages)
    assert key is not None and key.endswith("/2")
    assert conversation_key([messages[0], {"role": "user", "content": "other"}]) != key


# --------------------------------------------------------------------------- through HTTP


@pytest.fixture
async def node() -> AsyncIterator[SimNode]:
    settings = SimSettings(
        tokens=4,
        token_interval=0.001,
        num_parallel=2,
        resident=[MODEL],
        prefill_per_token=PREFILL,
    )
    sim = SimNode(settings)
    await sim.start()
    yield sim
    await sim.stop()


async def chat(node: SimNode, path: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "stream": False}
    async with aiohttp.ClientSession() as session, session.post(node.url + path, json=body) as r:
        assert r.status == 200
        answer: dict[str, Any] = await r.json()
        return answer


def prefill_ns(characters: int) -> int:
    return round(-(-characters // 4) * PREFILL * 1e9)


HISTORY = [{"role": "user", "content": "Tell me a long story about a lighthouse. " * 8}]
FIRST = f"<user>{HISTORY[0]['content']}\n"


async def test_a_follow_up_turn_pays_prefill_only_for_its_new_part(node: SimNode) -> None:
    first = await chat(node, "/api/chat", HISTORY)
    assert first["prompt_eval_duration"] == prefill_ns(len(FIRST))
    reply = first["message"]["content"]
    turn = [*HISTORY, {"role": "assistant", "content": reply}, {"role": "user", "content": "And?"}]
    second = await chat(node, "/api/chat", turn)

    new_part = "<user>And?\n"
    assert second["prompt_eval_duration"] == prefill_ns(len(new_part))
    assert second["prompt_eval_count"] > first["prompt_eval_count"]  # the whole prompt's count
    cached = len(FIRST) + len(f"<assistant>{reply}\n")
    assert node.stats.prompt_cached_total == cached
    assert node.stats.prompt_computed_total == len(FIRST) + len(new_part)
    turns = sorted(node.stats.chat_turns)
    assert [key.split("/")[1] for key in turns] == ["1", "3"]
    assert len({key.split("/")[0] for key in turns}) == 1  # one conversation


async def test_the_openai_chat_path_shares_the_cache(node: SimNode) -> None:
    first = await chat(node, "/v1/chat/completions", HISTORY)
    reply = first["choices"][0]["message"]["content"]
    turn = [*HISTORY, {"role": "assistant", "content": reply}, {"role": "user", "content": "And?"}]
    await chat(node, "/api/chat", turn)
    assert node.stats.prompt_computed_total == len(FIRST) + len("<user>And?\n")


async def test_a_prompt_sharing_nothing_takes_another_slot(node: SimNode) -> None:
    first = await chat(node, "/api/chat", HISTORY)
    async with aiohttp.ClientSession() as session:
        other = {"model": MODEL, "prompt": "Something else entirely.", "stream": False}
        async with session.post(node.url + "/api/generate", json=other) as response:
            assert response.status == 200
    reply = first["message"]["content"]
    turn = [*HISTORY, {"role": "assistant", "content": reply}, {"role": "user", "content": "And?"}]
    second = await chat(node, "/api/chat", turn)
    assert second["prompt_eval_duration"] == prefill_ns(len("<user>And?\n"))


async def test_unloading_the_model_empties_its_slots(node: SimNode) -> None:
    first = await chat(node, "/api/chat", HISTORY)
    async with aiohttp.ClientSession() as session:
        unload = {"model": MODEL, "keep_alive": 0}
        async with session.post(node.url + "/api/generate", json=unload) as response:
            assert response.status == 200
    reply = first["message"]["content"]
    turn = [*HISTORY, {"role": "assistant", "content": reply}, {"role": "user", "content": "And?"}]
    second = await chat(node, "/api/chat", turn)
    assert second["prompt_eval_duration"] == prefill_ns(len(rendered(turn)))
    assert node.stats.prompt_cached_total == 0


async def test_final_chunks_report_the_nodes_load_time_and_speed() -> None:
    settings = SimSettings(tokens=5, token_interval=0.003, load_delay=0.05, first_token_delay=0.0)
    sim = SimNode(settings)
    await sim.start()
    try:
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        async with aiohttp.ClientSession() as session:
            replies = []
            for _ in range(2):
                async with session.post(sim.url + "/api/generate", json=body) as response:
                    replies.append(await response.json())
    finally:
        await sim.stop()
    cold, warm = replies
    assert cold["load_duration"] >= 50_000_000 and warm["load_duration"] == 0
    # 5 tokens at 3 ms (or the time they took), a cold load or not
    assert min(cold["eval_duration"], warm["eval_duration"]) >= 15_000_000
    assert abs(cold["eval_duration"] - warm["eval_duration"]) < 15_000_000


def test_choosing_among_many_slots_compares_each_cached_text_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The benchmark's nodes have thousands of slots holding the same prompt."""
    caches = PrefixCaches(lambda: 5000)
    held_all = [caches.take(MODEL, "hello") for _ in range(4000)]
    for held in held_all:
        held.slot.cached = "hello"
        caches.release(held)
    compared: list[str] = []

    def counting(a: str, b: str) -> int:
        compared.append(a)
        return shared_prefix(a, b)

    monkeypatch.setattr(slots, "shared_prefix", counting)
    assert caches.take(MODEL, "hello").cached == 4
    assert sorted(compared) == ["", "hello", "hello"]  # each group once, then the chosen slot
