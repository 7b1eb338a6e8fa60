"""What the simulated model says: readable prose, a few words of thinking, JSON that fits a
requested format, and a call of an offered tool; all deterministic for a seed, so that a test
can compute the answer it will read (``prose``) and the same question always gets the same
answer."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .plans import Plan, seed_for

SENTENCES = (
    "The fleet answers as if it were one Ollama server.",
    "Each request goes to a node that already holds its model.",
    "A cold load costs seconds, so the proxy prefers a warm node.",
    "When every node is busy, the request waits in a fair queue.",
    "Streaming starts with the first token and never buffers the answer.",
    "This text is made up by a simulated node, not by a real model.",
    "Slow nodes get fewer requests until they catch up again.",
    "A node that fails its health check stops getting new work.",
    "Pulls and deletes fan out to every node of the fleet.",
    "The metrics page shows tokens per second for every node.",
    "Clients only change their base URL to use the proxy.",
    "Conversations stick to the node that holds their cache.",
)
THOUGHTS = (
    "The user wants a short answer.",
    "I should check what the question asks first.",
    "A simple explanation will do here.",
    "Let me keep the reply brief and clear.",
)
# What a string property holds when a schema asks for one: short, readable, stable.
SAMPLE_WORDS = ("Lisbon", "blue", "a short example", "Ada Lovelace", "tomorrow", "green tea")
SAMPLE_BY_NAME = {
    "city": "Lisbon",
    "location": "Lisbon, Portugal",
    "country": "Portugal",
    "name": "Ada Lovelace",
    "unit": "celsius",
    "query": "ollama proxy",
    "language": "English",
}


def _words(seed: int, sentences: tuple[str, ...]) -> Iterator[str]:
    chooser = random.Random(seed)
    while True:
        order = list(sentences)
        chooser.shuffle(order)
        for sentence in order:
            yield from sentence.split()


def prose(tokens: int, seed: int) -> list[str]:
    """The answer's tokens: one word and its space each."""
    return [f"{word} " for word in itertools.islice(_words(seed, SENTENCES), tokens)]


def answer_tokens(prompt: Any, tokens: int, seed: int | None = None) -> list[str]:
    """The tokens a node answers to ``prompt`` (a prompt string or a message list), for tests
    to compare with what they read."""
    return prose(tokens, seed_for(prompt, seed))


def answer_text(prompt: Any, tokens: int, seed: int | None = None) -> str:
    return "".join(answer_tokens(prompt, tokens, seed))


def sample_value(schema: Any, name: str, seed: int) -> Any:
    """A value of the simple JSON-schema type ``schema`` names (nested objects and arrays
    filled the same way; an ``enum`` gives its first choice)."""
    if not isinstance(schema, dict):
        return SAMPLE_WORDS[seed % len(SAMPLE_WORDS)]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
    if kind == "object" or "properties" in schema:
        return sample_object(schema, seed)
    if kind == "array":
        return [sample_value(schema.get("items"), name, seed)]
    if kind == "integer":
        return seed % 100
    if kind == "number":
        return round((seed % 1000) / 10, 1)
    if kind == "boolean":
        return seed % 2 == 0
    return SAMPLE_BY_NAME.get(name.lower(), SAMPLE_WORDS[seed % len(SAMPLE_WORDS)])


def sample_object(schema: dict[str, Any], seed: int, *, required_only: bool = False) -> Any:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    names = list(properties)
    if required_only and isinstance(schema.get("required"), list):
        names = [name for name in names if name in schema["required"]]
    return {
        name: sample_value(properties[name], name, seed + index) for index, name in enumerate(names)
    }


def json_tokens(value: Any) -> list[str]:
    """A JSON text cut into token-sized pieces that join back to it."""
    text = json.dumps(value, ensure_ascii=False)
    pieces = text.replace(", ", ",\0 ").replace(": ", ":\0 ").split("\0")
    return [piece for piece in pieces if piece]


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str


@dataclass
class Reply:
    """What one generation produces, in the order it streams: thinking, then content (prose or
    JSON), or a tool call in place of the content."""

    thinking: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """What eval_count counts: every token generated, thinking and tool calls too."""
        calls = sum(len(json_tokens(call.arguments)) for call in self.tool_calls)
        return len(self.thinking) + len(self.content) + calls

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def thought(self) -> str:
        return "".join(self.thinking)


@dataclass
class Script:
    """A reply yet to be generated: its tokens are made as they are due, so that a request
    for a million tokens (the benchmark's held streams) costs no more memory than a short one."""

    seed: int
    thinking: int  # tokens of thinking
    content: int  # tokens of prose, unless ``fixed`` holds the content
    fixed: list[str] | None = None  # a format's JSON
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.thinking + self.content + Reply(tool_calls=self.tool_calls).tokens

    def thinking_tokens(self) -> Iterator[str]:
        return (f"{word} " for word in itertools.islice(_words(self.seed, THOUGHTS), self.thinking))

    def content_tokens(self) -> Iterator[str]:
        if self.fixed is not None:
            return iter(self.fixed)
        return (f"{word} " for word in itertools.islice(_words(self.seed, SENTENCES), self.content))

    def whole(self) -> Reply:
        """The reply made at once, for an answer that is one body."""
        thinking, content = list(self.thinking_tokens()), list(self.content_tokens())
        return Reply(thinking=thinking, content=content, tool_calls=self.tool_calls)


def compose(plan: Plan) -> Script:
    """The reply to a plan. Thinking takes a third of the token budget, as a thinking model
    spends part of ``num_predict`` on it; a requested format gives exactly its JSON, whatever
    the budget; an offered tool is called in place of an answer."""
    thinking = plan.tokens // 3 if plan.think else 0
    script = Script(plan.seed, thinking, plan.tokens - thinking)
    if plan.tool is not None:
        schema = plan.tool["parameters"]
        arguments = sample_object(schema, plan.seed, required_only=True) if schema else {}
        script.tool_calls = [
            ToolCall(plan.tool["name"], arguments, f"call_{plan.seed % 16**8:08x}")
        ]
        script.content = 0
    elif plan.format is not None:
        value = sample_object(plan.format, plan.seed) if isinstance(plan.format, dict) else {}
        if not isinstance(plan.format, dict) or not plan.format.get("properties"):
            value = {"answer": "".join(prose(12, plan.seed)).strip()}
        script.fixed = json_tokens(value)
        script.content = len(script.fixed)
    return script
