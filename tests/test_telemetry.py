"""Token counts read from the end of an answer, the large ones without parsing it all."""

from __future__ import annotations

import json

from proxy.telemetry import SUFFIX_WINDOW, Usage, usage_from_tail


def compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def test_large_embedding_counts_come_from_its_end() -> None:
    vectors = [[0.123456789] * 1000]
    body = compact(
        {"model": "m", "embeddings": vectors, "total_duration": 5, "prompt_eval_count": 7}
    )
    assert len(body) > SUFFIX_WINDOW
    usage = usage_from_tail([body], "application/json")
    assert usage == Usage(prompt_tokens=7, completion_tokens=0, eval_seconds=0.0, load_seconds=None)


def test_count_key_nested_near_the_end_falls_back_to_the_whole_object() -> None:
    """A count key inside a nested object is not a top-level field: the whole body is parsed."""
    body = compact(
        {
            "data": [0.5] * 1000,
            "meta": {"x": 1, "usage": {"prompt_tokens": 99}},
            "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        }
    )
    # The first count key in the window is the nested one; its suffix does not balance.
    window = body[-SUFFIX_WINDOW:]
    assert window.find(b',"usage":') < window.rfind(b',"usage":')
    usage = usage_from_tail([body], "application/json")
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)


def test_small_body_is_parsed_whole() -> None:
    body = compact({"model": "m", "done": True, "eval_count": 2, "eval_duration": 10**9})
    usage = usage_from_tail([body[:10], body[10:]], "application/json")
    assert usage is not None and usage.completion_tokens == 2 and usage.tokens_per_second == 2


def test_a_final_chunk_nested_too_deep_has_no_counts() -> None:
    """A node's answer nested deeper than Python's parser goes is no final chunk: no counts,
    and no RecursionError (raised after the answer, it would log a traceback)."""
    deep = b'{"done":true,"eval_count":3,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    assert usage_from_tail([deep], "application/x-ndjson") is None


def event(name: str, data: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + compact(data) + b"\n\n"


def test_anthropic_streams_count_from_message_delta() -> None:
    """Ollama's Anthropic layer sends input and output tokens in message_delta's usage."""
    tail = [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"input_tokens": 5, "output_tokens": 7},
            },
        ),
        event("message_stop", {"type": "message_stop"}),
    ]
    usage = usage_from_tail(tail, "text/event-stream")
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (5, 7)


def test_responses_streams_count_from_response_completed() -> None:
    completed = {
        "type": "response.completed",
        "response": {"status": "completed", "usage": {"input_tokens": 2, "output_tokens": 9}},
    }
    tail = [
        event("response.output_text.done", {"text": "x"}),
        event("response.completed", completed),
    ]
    usage = usage_from_tail(tail, "text/event-stream")
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2, 9)


def test_whole_messages_and_responses_bodies_have_input_and_output_tokens() -> None:
    body = compact({"type": "message", "usage": {"input_tokens": 4, "output_tokens": 6}})
    usage = usage_from_tail([body], "application/json")
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (4, 6)


def test_a_long_response_completed_event_cut_at_its_start_still_counts() -> None:
    """``response.completed`` repeats the whole answer: a long one outlasts the pieces the
    relay keeps, and its usage, at its end, is read all the same."""
    text = "word " * 20_000
    completed = {
        "type": "response.completed",
        "response": {
            "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
            "usage": {"input_tokens": 3, "output_tokens": 20_000, "total_tokens": 20_003},
        },
    }
    frames = event("response.completed", completed)
    pieces = [frames[at : at + 1024] for at in range(0, len(frames), 1024)]
    usage = usage_from_tail(pieces[-16:], "text/event-stream")
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 20_000)
