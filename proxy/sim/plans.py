"""What a request asks for, read from its body: the generation's plan (model, streaming,
tokens, thinking, a format, an offered tool, the seed of its text), the words of its prompt,
its embedding inputs. Each API family spells these its own way; a plan reads them all."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
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
    seed: int = 0  # of the made-up text (replies.py)
    think: bool = False
    format: Any = None  # "json", or a JSON schema (a dict)
    tool: dict[str, Any] | None = None  # the tool the model calls: name and parameters
    prompt_text: str = ""  # the prompt as a slot's KV cache holds it (see rendered())
    chat: bool = False  # a message list: the reply joins the cache as an assistant message
    conversation: str | None = None  # see conversation_key()

    def cached_after(self, reply: Callable[[], str]) -> str:
        """What the slot holds once the reply is generated: for a chat the prompt, then the
        reply as the next turn's history will render it; for other prompts the prompt (the
        reply is not made again only for a cache that nothing is likely to reuse)."""
        if self.chat:
            return self.prompt_text + rendered({"role": "assistant", "content": reply()})
        return self.prompt_text


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
        seed=seed_for(prompt, _options(body).get("seed")),
        think=_thinks(body),
        format=_native_format(body.get("format")),
        tool=_tool_to_call(body.get("tools"), body.get("messages")),
        **_cache_fields(prompt, body.get("messages")),
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
        seed=seed_for(prompt, body.get("seed")),
        think=_thinks(body),
        format=_openai_format(body.get("response_format")),
        tool=_tool_to_call(body.get("tools"), body.get("messages"), body.get("tool_choice")),
        **_cache_fields(prompt, body.get("messages")),
    )


def plan_events(body: dict[str, Any], default_tokens: int, budget_key: str) -> Plan:
    """/v1/responses and /v1/messages: one JSON body, or event streams when asked."""
    prompt = [body.get("instructions"), body.get("system"), body.get("input"), body.get("messages")]
    text = body.get("text")
    conversation = body.get("messages", body.get("input"))
    return Plan(
        model=model_field(body, "model"),
        stream=flag(body.get("stream"), False),
        tokens=_token_budget(body.get(budget_key), default_tokens),
        prompt_tokens=word_count(prompt),
        seed=seed_for(prompt, None),
        think=_thinks(body),
        format=_openai_format(text.get("format") if isinstance(text, dict) else None),
        tool=_tool_to_call(body.get("tools"), conversation, body.get("tool_choice")),
        **_cache_fields(prompt, conversation),
    )


def _cache_fields(prompt: Any, messages: Any) -> dict[str, Any]:
    chat = isinstance(messages, list)
    key = conversation_key(messages) if chat else None
    return {"prompt_text": rendered(prompt), "chat": chat, "conversation": key}


def rendered(value: Any) -> str:
    """A prompt as the model reads it, and a slot's KV cache holds it: texts in order, each
    message as its role and its text on a line ("<user>hello\n"), so that a chat's next turn,
    which resends the history, starts with what the previous turn's slot processed."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(rendered(item) for item in value)
    if isinstance(value, dict):
        text = _text_of(value.get("content", value.get("text")))
        role = value.get("role")
        return f"<{role}>{text}\n" if isinstance(role, str) else text
    return ""


def conversation_key(messages: Any) -> str | None:
    """Which conversation and turn a chat request is, for SimStats.chat_turns: a hash of its
    first user message and the number of messages, "1a2b3c4d/3"."""
    if not isinstance(messages, list):
        return None
    first = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    if first is None:
        return None
    return f"{zlib.crc32(rendered(first).encode()):08x}/{len(messages)}"


def seed_for(prompt: Any, explicit: Any = None) -> int:
    """The request's seed when it gives one, else one read from its prompt's words: the same
    question gets the same answer, another question another."""
    if isinstance(explicit, int) and not isinstance(explicit, bool):
        return explicit
    return zlib.crc32(" ".join(_text_of(prompt).split()).encode())


def _thinks(body: dict[str, Any]) -> bool:
    """Ollama's ``think`` (true or a level); OpenAI's ``reasoning_effort`` or ``reasoning``
    effort; Anthropic's ``thinking`` enabled."""
    think = body.get("think")
    if think is True or think in ("low", "medium", "high"):
        return True
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    effort = body.get("reasoning_effort", effort)
    if isinstance(effort, str) and effort != "none":
        return True
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def _native_format(value: Any) -> Any:
    return value if value == "json" or isinstance(value, dict) else None


def _openai_format(value: Any) -> Any:
    """``response_format`` (chat) or ``text.format`` (Responses) as Ollama's ``format``."""
    if not isinstance(value, dict):
        return None
    if value.get("type") == "json_object":
        return "json"
    if value.get("type") != "json_schema":
        return None
    nested = value.get("json_schema")
    schema = nested.get("schema") if isinstance(nested, dict) else value.get("schema")
    return schema if isinstance(schema, dict) else "json"


def _tool_to_call(tools: Any, conversation: Any, choice: Any = None) -> dict[str, Any] | None:
    """The first offered tool, as {"name", "parameters"}, unless the conversation's last turn
    is a tool's result (the model answers it in words) or the client said "none"."""
    if not isinstance(tools, list) or choice == "none" or _answers_a_tool(conversation):
        return None
    for tool in tools:
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            parameters = spec.get("parameters", spec.get("input_schema"))
            return {"name": spec["name"], "parameters": parameters or {}}
    return None


def _answers_a_tool(conversation: Any) -> bool:
    if not isinstance(conversation, list) or not conversation:
        return False
    last = conversation[-1]
    if not isinstance(last, dict):
        return False
    content = last.get("content")
    parts = content if isinstance(content, list) else []
    return (
        last.get("role") == "tool"
        or last.get("type") == "function_call_output"
        or any(isinstance(p, dict) and p.get("type") == "tool_result" for p in parts)
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
