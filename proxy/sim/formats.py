"""How each endpoint frames a generation: Ollama's NDJSON (generate, chat), OpenAI's chat and
completion (SSE when streaming), and the whole bodies of Responses and Anthropic Messages;
with the usage they report, and the made-up text and vectors the model produces."""

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
from .wire import NDJSON, SSE, iso_now, ndjson, sse

_response_ids = itertools.count(1)


def token_text(index: int) -> str:
    """Distinct, ordered tokens, so a test can check that none was lost or reordered."""
    return f"tok{index} "


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
    """How one endpoint frames a generation: per-token frames, the ending, or one body."""

    content_type = NDJSON

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.created = int(time.time())

    def token_frame(self, text: str) -> bytes:
        raise NotImplementedError

    def final_frames(self, usage: Usage) -> bytes:
        raise NotImplementedError

    def whole_body(self, text: str, usage: Usage) -> dict[str, Any]:
        raise NotImplementedError


class _NativeFormat(Format):
    """Ollama's own NDJSON framing; the final chunk is the whole body with empty text."""

    def _chunk(self, text: str, done: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _ending(self) -> dict[str, Any]:
        return {"done_reason": "stop"}

    def token_frame(self, text: str) -> bytes:
        return ndjson(self._chunk(text, done=False))

    def final_frames(self, usage: Usage) -> bytes:
        return ndjson(self.whole_body("", usage))

    def whole_body(self, text: str, usage: Usage) -> dict[str, Any]:
        return {**self._chunk(text, done=True), **self._ending(), **usage.ollama_fields()}


class GenerateFormat(_NativeFormat):
    def _chunk(self, text: str, done: bool) -> dict[str, Any]:
        return {"model": self.plan.model, "created_at": iso_now(), "response": text, "done": done}

    def _ending(self) -> dict[str, Any]:
        return {**super()._ending(), "context": [1, 2, 3]}


class ChatFormat(_NativeFormat):
    def _chunk(self, text: str, done: bool) -> dict[str, Any]:
        return {
            "model": self.plan.model,
            "created_at": iso_now(),
            "message": {"role": "assistant", "content": text},
            "done": done,
        }


class _OpenAIFormat(Format):
    """Shared framing of /v1/chat/completions and /v1/completions (SSE when streaming)."""

    content_type = SSE
    id_prefix = ""
    chunk_object = ""
    whole_object = ""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.id = f"{self.id_prefix}-{next(_response_ids)}"

    def _envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.plan.model,
            "system_fingerprint": "fp_ollama",
            "choices": [choice],
        }

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _whole_choice(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def token_frame(self, text: str) -> bytes:
        return sse(self._envelope(self.chunk_object, self._chunk_choice(text, None)))

    def final_frames(self, usage: Usage) -> bytes:
        frames = [sse(self._envelope(self.chunk_object, self._chunk_choice("", "stop")))]
        if self.plan.include_usage:
            usage_chunk = {**self._envelope(self.chunk_object, {}), "choices": []}
            frames.append(sse({**usage_chunk, "usage": usage.openai_usage()}))
        frames.append(b"data: [DONE]\n\n")
        return b"".join(frames)

    def whole_body(self, text: str, usage: Usage) -> dict[str, Any]:
        whole = self._envelope(self.whole_object, self._whole_choice(text))
        return {**whole, "usage": usage.openai_usage()}


class OpenAIChatFormat(_OpenAIFormat):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    whole_object = "chat.completion"

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text}
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}

    def _whole_choice(self, text: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "finish_reason": "stop"}


class OpenAICompletionFormat(_OpenAIFormat):
    id_prefix = "cmpl"
    chunk_object = "text_completion"
    whole_object = "text_completion"

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "finish_reason": finish_reason}

    def _whole_choice(self, text: str) -> dict[str, Any]:
        return self._chunk_choice(text, "stop")


class ResponsesFormat(Format):
    """A minimal OpenAI Responses API body."""

    def whole_body(self, text: str, usage: Usage) -> dict[str, Any]:
        number = next(_response_ids)
        content = {"type": "output_text", "text": text, "annotations": []}
        message = {
            "type": "message",
            "id": f"msg_{number}",
            "status": "completed",
            "role": "assistant",
            "content": [content],
        }
        return {
            "id": f"resp_{number}",
            "object": "response",
            "created_at": self.created,
            "status": "completed",
            "model": self.plan.model,
            "output": [message],
            "usage": {
                "input_tokens": usage.prompt_tokens,
                "output_tokens": usage.eval_count,
                "total_tokens": usage.prompt_tokens + usage.eval_count,
            },
        }


class MessagesFormat(Format):
    """A minimal Anthropic Messages API body."""

    def whole_body(self, text: str, usage: Usage) -> dict[str, Any]:
        return {
            "id": f"msg_{next(_response_ids)}",
            "type": "message",
            "role": "assistant",
            "model": self.plan.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.eval_count},
        }


class TranscriptionFormat(Format):
    """/v1/audio/transcriptions' JSON body: the words heard, nothing else."""

    def whole_body(self, text: str, usage: Usage) -> dict[str, Any]:
        return {"text": text}
