"""How each endpoint frames a generation: Ollama's NDJSON (generate, chat) and OpenAI's chat and
completion (SSE when streaming), with the usage they report, and the made-up vectors of
embeddings. The event streams of Responses and Anthropic Messages are in events.py."""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import struct
import time
from dataclasses import dataclass
from typing import Any

from .plans import Plan
from .replies import Reply, ToolCall
from .wire import NDJSON, SSE, dumps, iso_now, ndjson, sse

response_ids = itertools.count(1)


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from the text (Ollama's /api/embed normalises)."""
    raw = [byte / 127.5 - 1.0 for byte in hashlib.shake_256(text.encode()).digest(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def base64_floats(vector: list[float]) -> str:
    """OpenAI's encoding_format "base64": little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@dataclass
class Usage:
    """Token counts and timings (ns) of one finished generation."""

    prompt_tokens: int
    eval_count: int
    total_duration: int
    load_duration: int
    prompt_eval_duration: int
    eval_duration: int

    def ollama_fields(self) -> dict[str, Any]:
        return {
            "total_duration": self.total_duration,
            "load_duration": self.load_duration,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": self.prompt_eval_duration,
            "eval_count": self.eval_count,
            "eval_duration": self.eval_duration,
        }

    def openai_usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.eval_count,
            "total_tokens": self.prompt_tokens + self.eval_count,
        }


class Format:
    """How one endpoint frames a generation: the frames of each thinking token, answer token
    and tool call, in that order, then the ending; or one body."""

    content_type = NDJSON

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.created = int(time.time())

    def thinking_frame(self, text: str) -> bytes:
        return b""  # a family with no place for thinking does not show it

    def token_frame(self, text: str) -> bytes:
        raise NotImplementedError

    def tool_frames(self, calls: list[ToolCall]) -> bytes:
        raise NotImplementedError

    def final_frames(self, reply: Reply, usage: Usage) -> bytes:
        raise NotImplementedError

    def whole_body(self, reply: Reply, usage: Usage) -> dict[str, Any]:
        raise NotImplementedError


def native_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Ollama's ``message.tool_calls``: arguments as an object, not a JSON string."""
    return [
        {
            "id": call.id,
            "function": {"index": index, "name": call.name, "arguments": call.arguments},
        }
        for index, call in enumerate(calls)
    ]


class _NativeFormat(Format):
    """Ollama's own NDJSON framing; the final chunk is the whole body with empty text."""

    def _chunk(self, reply: Reply, done: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _ending(self) -> dict[str, Any]:
        return {"done_reason": "stop"}

    def thinking_frame(self, text: str) -> bytes:
        return ndjson(self._chunk(Reply(thinking=[text]), done=False))

    def token_frame(self, text: str) -> bytes:
        return ndjson(self._chunk(Reply(content=[text]), done=False))

    def tool_frames(self, calls: list[ToolCall]) -> bytes:
        return ndjson(self._chunk(Reply(tool_calls=calls), done=False))

    def final_frames(self, reply: Reply, usage: Usage) -> bytes:
        return ndjson(self.whole_body(Reply(), usage))

    def whole_body(self, reply: Reply, usage: Usage) -> dict[str, Any]:
        return {**self._chunk(reply, done=True), **self._ending(), **usage.ollama_fields()}


class GenerateFormat(_NativeFormat):
    def _chunk(self, reply: Reply, done: bool) -> dict[str, Any]:
        chunk = {"model": self.plan.model, "created_at": iso_now(), "response": reply.text}
        if reply.thinking:
            chunk["thinking"] = reply.thought
        return {**chunk, "done": done}

    def _ending(self) -> dict[str, Any]:
        return {**super()._ending(), "context": [1, 2, 3]}


class ChatFormat(_NativeFormat):
    def _chunk(self, reply: Reply, done: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.thinking:
            message["thinking"] = reply.thought
        if reply.tool_calls:
            message["tool_calls"] = native_tool_calls(reply.tool_calls)
        return {"model": self.plan.model, "created_at": iso_now(), "message": message, "done": done}


class _OpenAIFormat(Format):
    """Shared framing of /v1/chat/completions and /v1/completions (SSE when streaming)."""

    content_type = SSE
    id_prefix = ""
    chunk_object = ""
    whole_object = ""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.id = f"{self.id_prefix}-{next(response_ids)}"

    def _envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.plan.model,
            "system_fingerprint": "fp_ollama",
            "choices": [choice],
        }

    def _chunk_choice(self, reply: Reply, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _whole_choice(self, reply: Reply) -> dict[str, Any]:
        raise NotImplementedError

    def _frame(self, reply: Reply, finish_reason: str | None = None) -> bytes:
        return sse(self._envelope(self.chunk_object, self._chunk_choice(reply, finish_reason)))

    def token_frame(self, text: str) -> bytes:
        return self._frame(Reply(content=[text]))

    def final_frames(self, reply: Reply, usage: Usage) -> bytes:
        frames = [self._frame(Reply(), finish_of(reply))]
        if self.plan.include_usage:
            usage_chunk = {**self._envelope(self.chunk_object, {}), "choices": []}
            frames.append(sse({**usage_chunk, "usage": usage.openai_usage()}))
        frames.append(b"data: [DONE]\n\n")
        return b"".join(frames)

    def whole_body(self, reply: Reply, usage: Usage) -> dict[str, Any]:
        whole = self._envelope(self.whole_object, self._whole_choice(reply))
        return {**whole, "usage": usage.openai_usage()}


def finish_of(reply: Reply) -> str:
    return "tool_calls" if reply.tool_calls else "stop"


def openai_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls``: arguments as a JSON string; Ollama sends each call whole."""
    return [
        {
            "id": call.id,
            "index": index,
            "type": "function",
            "function": {"name": call.name, "arguments": dumps(call.arguments).decode()},
        }
        for index, call in enumerate(calls)
    ]


class OpenAIChatFormat(_OpenAIFormat):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    whole_object = "chat.completion"

    def thinking_frame(self, text: str) -> bytes:
        return self._frame(Reply(thinking=[text]))

    def tool_frames(self, calls: list[ToolCall]) -> bytes:
        return self._frame(Reply(tool_calls=calls))

    def _message(self, reply: Reply) -> dict[str, Any]:
        """Ollama's OpenAI layer names the thinking ``reasoning``."""
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.thinking:
            message["reasoning"] = reply.thought
        if reply.tool_calls:
            message["tool_calls"] = openai_tool_calls(reply.tool_calls)
        return message

    def _chunk_choice(self, reply: Reply, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": self._message(reply), "finish_reason": finish_reason}

    def _whole_choice(self, reply: Reply) -> dict[str, Any]:
        return {"index": 0, "message": self._message(reply), "finish_reason": finish_of(reply)}


class OpenAICompletionFormat(_OpenAIFormat):
    id_prefix = "cmpl"
    chunk_object = "text_completion"
    whole_object = "text_completion"

    def tool_frames(self, calls: list[ToolCall]) -> bytes:
        return b""  # completions offer no tools: plans never call one here

    def _chunk_choice(self, reply: Reply, finish_reason: str | None) -> dict[str, Any]:
        return {"text": reply.text, "index": 0, "finish_reason": finish_reason}

    def _whole_choice(self, reply: Reply) -> dict[str, Any]:
        return self._chunk_choice(reply, "stop")


class TranscriptionFormat(Format):
    """/v1/audio/transcriptions' JSON body: the words heard, nothing else."""

    def whole_body(self, reply: Reply, usage: Usage) -> dict[str, Any]:
        return {"text": reply.text}
