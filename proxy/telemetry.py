"""Token counts and speeds, read from the end of a response after it has passed through.

Ollama's final chunk (``"done": true``) carries ``prompt_eval_count``, ``eval_count``,
``eval_duration`` and ``load_duration``; a non-streaming answer carries them in its body. The
compatible APIs have ``usage``: OpenAI's chat and completions ``prompt_tokens`` and
``completion_tokens``; the Responses API and Anthropic's Messages ``input_tokens`` and
``output_tokens``, streamed in the last event that has them (``response.completed``'s
``response.usage``; ``message_delta``'s ``usage``, where Ollama's Anthropic layer puts the input
tokens too). The relay keeps references to the last few chunks it wrote (no copy, no parsing per
chunk); this module parses once, when the response has ended.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

NS = 1e-9
# Keys written after the bulk of an answer, as compact JSON writes them (Go's encoder and
# Python's json.dumps with separators both put no space after the comma).
_COUNT_KEYS = (
    b',"total_duration":',
    b',"load_duration":',
    b',"prompt_eval_count":',
    b',"eval_count":',
    b',"usage":',
)
SUFFIX_WINDOW = 4096
_USAGE_KEY = b'"usage":'
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    eval_seconds: float  # time spent generating completion_tokens; 0 when unknown
    load_seconds: float | None  # model load time, when the node reported one

    @property
    def tokens_per_second(self) -> float | None:
        if self.eval_seconds <= 0 or self.completion_tokens <= 0:
            return None
        return self.completion_tokens / self.eval_seconds


def usage_from_tail(chunks: Iterable[bytes], content_type: str) -> Usage | None:
    """The usage in the last JSON object of a response that has one, given its last chunks."""
    tail = b"".join(chunks)
    if content_type == "text/event-stream":
        objects = _sse_objects_last_first(tail)
    else:  # NDJSON's final line, or a whole JSON body
        stripped = tail.rstrip()
        objects = [_last_object(stripped[stripped.rfind(b"\n") + 1 :])]
    for obj in objects:
        usage = obj and (_from_ollama(obj) or _from_openai(obj))
        if usage:
            return usage
    if content_type == "text/event-stream":
        return _last_usage_field(tail)
    return None


def _last_usage_field(tail: bytes) -> Usage | None:
    """The last ``"usage":`` object in the tail, for a final event whose beginning is not in
    it: the Responses API's ``response.completed`` repeats the whole answer before its usage,
    and a long one spans more pieces than the tail keeps. (Inside a JSON string the quotes
    would be escaped, so the match is a key.)"""
    at = tail.rfind(_USAGE_KEY)
    if at < 0:
        return None
    try:
        value, _ = _DECODER.raw_decode(tail[at + len(_USAGE_KEY) :].decode(errors="replace"))
    except (ValueError, RecursionError):
        return None
    return _from_openai({"usage": value}) if isinstance(value, dict) else None


def _last_object(data: bytes) -> dict[str, Any] | None:
    """The JSON object ``data``, or of a large one the top-level fields at its end.

    An embedding answer is kilobytes to megabytes of floats, and Ollama and the OpenAI API
    write the counts last: parsing from the first count key in the last few kilobytes reads
    the same fields for a fraction of the work. When that key is not at the top level (the
    braces do not balance) the whole object is parsed.
    """
    if len(data) > SUFFIX_WINDOW:
        window = data[-SUFFIX_WINDOW:]
        starts = [at for key in _COUNT_KEYS if (at := window.find(key)) >= 0]
        if starts and (fields := _object(b"{" + window[min(starts) + 1 :])) is not None:
            return fields
    return _object(data)


def _sse_objects_last_first(tail: bytes) -> list[dict[str, Any] | None]:
    events = (_sse_data(event) for event in tail.split(b"\n\n"))
    return [_object(data) for data in reversed(list(events)) if data.startswith(b"{")]


def _sse_data(event: bytes) -> bytes:
    """An event's data, its ``event:`` (and any other field's) lines left out."""
    lines = event.strip().split(b"\n")
    return b"\n".join(
        line.removeprefix(b"data:").strip() for line in lines if line.startswith(b"data:")
    )


def _from_ollama(obj: dict[str, Any]) -> Usage | None:
    if "prompt_eval_count" not in obj and "eval_count" not in obj:
        return None
    load = obj.get("load_duration")
    return Usage(
        prompt_tokens=_int(obj.get("prompt_eval_count")),
        completion_tokens=_int(obj.get("eval_count")),
        eval_seconds=_int(obj.get("eval_duration")) * NS,
        load_seconds=_int(load) * NS if load is not None else None,
    )


def _from_openai(obj: dict[str, Any]) -> Usage | None:
    """``usage`` as OpenAI's chat, its Responses API and Anthropic's Messages write it."""
    usage = obj.get("usage")
    response = obj.get("response")  # the Responses API's response.completed event
    if not isinstance(usage, dict) and isinstance(response, dict):
        usage = response.get("usage")
    if not isinstance(usage, dict):
        return None
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens", usage.get("input_tokens"))),
        completion_tokens=_int(usage.get("completion_tokens", usage.get("output_tokens"))),
        eval_seconds=0.0,
        load_seconds=None,
    )


def _object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # too deep is no final chunk
        return None
    return value if isinstance(value, dict) else None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


PROGRESS_EVENTS = 8  # events after the first read over which a stream's speed is measured
PROGRESS_SECONDS = 0.5  # or this long after the first read, with at least MIN_EVENTS seen
MIN_EVENTS = 2


class Progress:
    """A stream's speed as it flows: events (NDJSON lines, or server-sent events) relayed
    after its first read, over the time since that read. The first read is left out: it
    carries the prompt's evaluation and, on the compatible APIs, the opening events. Fed
    only until the speed is known (a few chunks), so the rest of the stream costs nothing."""

    __slots__ = ("_ended_line", "_separator", "_since", "events", "rate")

    def __init__(self, content_type: str) -> None:
        self._separator = b"\n\n" if content_type == "text/event-stream" else b"\n"
        self._since: float | None = None
        self._ended_line = False  # the last piece ended with a newline (half of "\n\n")
        self.events = 0  # after the first read
        self.rate = 0.0  # events per second, once known

    def feed(self, data: bytes, now: float) -> bool:
        """Count the next piece relayed; True once the rate is known."""
        if self._since is None:
            self._since = now
            return False
        self.events += data.count(self._separator) + self._split_separator(data)
        self._ended_line = data.endswith(b"\n")
        elapsed = now - self._since
        enough = self.events >= PROGRESS_EVENTS or (
            self.events >= MIN_EVENTS and elapsed >= PROGRESS_SECONDS
        )
        if not enough or elapsed <= 0:
            return False
        self.rate = self.events / elapsed
        return True

    def _split_separator(self, data: bytes) -> int:
        """1 when an event's blank line was split between the last piece and this one."""
        return int(len(self._separator) == 2 and self._ended_line and data.startswith(b"\n"))
