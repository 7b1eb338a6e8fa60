"""What a request asks for, read from its body: the generation's plan (model, streaming,
tokens), the words of its prompt, its embedding inputs, or an unload."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .wire import model_field


@dataclass
class Plan:
    """What one generation request asks for, read from its body."""

    model: str  # as the client spelled it: Ollama echoes it back unchanged
    stream: bool
    tokens: int
    prompt_tokens: int
    include_usage: bool = False  # OpenAI stream_options.include_usage


def flag(value: Any, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def _token_budget(value: Any, default: int) -> int:
    """A request's num_predict / max_tokens; negative means "until done" in Ollama."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options")
    return options if isinstance(options, dict) else {}


def plan_native(body: dict[str, Any], default_tokens: int, prompt: Any) -> Plan:
    """/api/generate and /api/chat: streamed unless "stream" is false."""
    return Plan(
        model=model_field(body, "model"),
        stream=flag(body.get("stream"), True),
        tokens=_token_budget(_options(body).get("num_predict"), default_tokens),
        prompt_tokens=word_count(prompt),
    )


def plan_openai(body: dict[str, Any], default_tokens: int, prompt: Any) -> Plan:
    """/v1/chat/completions and /v1/completions: streamed (as SSE) only when asked."""
    stream_options = body.get("stream_options")
    budget = body.get("max_completion_tokens", body.get("max_tokens"))
    return Plan(
        model=model_field(body, "model"),
        stream=flag(body.get("stream"), False),
        tokens=_token_budget(budget, default_tokens),
        prompt_tokens=word_count(prompt),
        include_usage=isinstance(stream_options, dict)
        and stream_options.get("include_usage") is True,
    )


def plan_whole_only(body: dict[str, Any], default_tokens: int, budget_key: str) -> Plan:
    """/v1/responses and /v1/messages: always answered as one JSON body."""
    prompt = [body.get("instructions"), body.get("system"), body.get("input"), body.get("messages")]
    return Plan(
        model=model_field(body, "model"),
        stream=False,
        tokens=_token_budget(body.get(budget_key), default_tokens),
        prompt_tokens=word_count(prompt),
    )


def _text_of(value: Any) -> str:
    """The words in a prompt, message list, or content-part list, whatever the API family."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(item) for item in value)
    if isinstance(value, dict):
        return _text_of(value.get("content", value.get("text")))
    return ""


def word_count(*values: Any) -> int:
    """Stand-in for prompt tokens: whitespace-separated words, at least 1."""
    return max(1, len(" ".join(_text_of(value) for value in values).split()))


def embedding_inputs(value: Any) -> list[str]:
    """Inputs as texts: a string, a list of strings, or (OpenAI) token ids or lists of them."""
    if value is None:
        return []
    if isinstance(value, list) and value and all(isinstance(item, int) for item in value):
        return [json.dumps(value)]  # one input given as token ids
    if isinstance(value, list):
        return [item if isinstance(item, str) else json.dumps(item) for item in value]
    return [value if isinstance(value, str) else json.dumps(value)]
