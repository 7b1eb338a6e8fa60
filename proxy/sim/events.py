"""The event-stream APIs: OpenAI's Responses and Anthropic's Messages, each one JSON body or,
when streaming, named SSE events (``event: name`` then ``data: {...}``) in the order Ollama's
converters send them (its ``openai/responses.go`` and ``anthropic/anthropic.go``)."""

from __future__ import annotations

from typing import Any

from .formats import Format, Usage, response_ids
from .plans import Plan
from .replies import Reply, ToolCall
from .wire import SSE, dumps


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps({"type": name, **data}) + b"\n\n"


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponsesFormat(Format):
    """OpenAI's Responses API. Streaming: response.created and .in_progress; a reasoning item
    with its summary deltas when thinking; then either function_call items or one message item
    (output_item.added, content_part.added, output_text.delta…, output_text.done,
    content_part.done, output_item.done); then response.completed with the usage."""

    content_type = SSE

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        number = next(response_ids)
        self.id = f"resp_{number}"
        self.message_id = f"msg_{number}"
        self.reasoning_id = f"rs_{number}"
        self._sequence = 0
        self._opened = False
        self._output = 0  # index of the output item being written
        self._text = ""
        self._thought = ""
        self._in: str | None = None  # "reasoning" or "message": the item open now

    def _event(self, name: str, **data: Any) -> bytes:
        self._sequence += 1
        return event(name, {**data, "sequence_number": self._sequence - 1})

    def _response(self, status: str, output: list[Any], usage: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.plan.model,
            "output": output,
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "text": {"format": {"type": "json_schema" if self.plan.format else "text"}},
            "usage": usage,
        }

    def _open(self) -> bytes:
        if self._opened:
            return b""
        self._opened = True
        started = self._response("in_progress", [], None)
        return self._event("response.created", response=started) + self._event(
            "response.in_progress", response=started
        )

    def _reasoning_item(self) -> dict[str, Any]:
        summary = [{"type": "summary_text", "text": self._thought}]
        return {
            "id": self.reasoning_id,
            "type": "reasoning",
            "summary": summary,
            "encrypted_content": self._thought,
        }

    def _message_item(self, status: str) -> dict[str, Any]:
        content = [_output_text(self._text)] if status == "completed" else []
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _close_reasoning(self) -> bytes:
        if self._in != "reasoning":
            return b""
        self._in = None
        ids = {"item_id": self.reasoning_id, "output_index": self._output, "summary_index": 0}
        frames = self._event("response.reasoning_summary_text.done", **ids, text=self._thought)
        frames += self._event(
            "response.output_item.done", output_index=self._output, item=self._reasoning_item()
        )
        self._output += 1
        return frames

    def thinking_frame(self, text: str) -> bytes:
        frames = self._open()
        if self._in is None:
            self._in = "reasoning"
            item = {"id": self.reasoning_id, "type": "reasoning", "summary": []}
            frames += self._event(
                "response.output_item.added", output_index=self._output, item=item
            )
        self._thought += text
        ids = {"item_id": self.reasoning_id, "output_index": self._output, "summary_index": 0}
        return frames + self._event("response.reasoning_summary_text.delta", **ids, delta=text)

    def token_frame(self, text: str) -> bytes:
        frames = self._open() + self._close_reasoning()
        ids = {"item_id": self.message_id, "output_index": self._output, "content_index": 0}
        if self._in is None:
            self._in = "message"
            item = self._message_item("in_progress")
            frames += self._event(
                "response.output_item.added", output_index=self._output, item=item
            )
            frames += self._event("response.content_part.added", **ids, part=_output_text(""))
        self._text += text
        return frames + self._event("response.output_text.delta", **ids, delta=text, logprobs=[])

    def tool_frames(self, calls: list[ToolCall]) -> bytes:
        frames = self._open() + self._close_reasoning()
        for offset, item in enumerate(self._call_items(calls)):
            at = self._output + offset
            started = {**item, "status": "in_progress", "arguments": ""}
            ids = {"item_id": item["id"], "output_index": at}
            frames += self._event("response.output_item.added", output_index=at, item=started)
            frames += self._event(
                "response.function_call_arguments.delta", **ids, delta=item["arguments"]
            )
            frames += self._event(
                "response.function_call_arguments.done", **ids, arguments=item["arguments"]
            )
            frames += self._event("response.output_item.done", output_index=at, item=item)
        return frames

    def _call_items(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        return [
            {
                "id": f"fc_{self.id}_{index}",
                "type": "function_call",
                "status": "completed",
                "call_id": call.id,
                "name": call.name,
                "arguments": dumps(call.arguments).decode(),
            }
            for index, call in enumerate(calls)
        ]

    def final_frames(self, reply: Reply, usage: Usage) -> bytes:
        frames = self._open() + self._close_reasoning()
        if self._in == "message":
            ids = {"item_id": self.message_id, "output_index": self._output, "content_index": 0}
            frames += self._event("response.output_text.done", **ids, text=self._text, logprobs=[])
            frames += self._event(
                "response.content_part.done", **ids, part=_output_text(self._text)
            )
            item = self._message_item("completed")
            frames += self._event("response.output_item.done", output_index=self._output, item=item)
        whole = self._completed(reply.tool_calls, usage)
        return frames + self._event("response.completed", response=whole)

    def whole_body(self, reply: Reply, usage: Usage) -> dict[str, Any]:
        self._text, self._thought = reply.text, reply.thought
        return self._completed(reply.tool_calls, usage)

    def _completed(self, calls: list[ToolCall], usage: Usage) -> dict[str, Any]:
        """The finished response, from the text and thought written (or given whole)."""
        output = [self._reasoning_item()] if self._thought else []
        if calls:
            output += self._call_items(calls)
        else:
            output.append(self._message_item("completed"))
        return self._response("completed", output, responses_usage(usage))


def responses_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.eval_count,
        "total_tokens": usage.prompt_tokens + usage.eval_count,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


class MessagesFormat(Format):
    """Anthropic's Messages API. Streaming: message_start; a content block per part (thinking,
    text, each tool_use) with content_block_start, its deltas and content_block_stop; then
    message_delta with the stop reason and usage, and message_stop."""

    content_type = SSE

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.id = f"msg_{next(response_ids)}"
        self._opened = False
        self._index = 0
        self._in: str | None = None  # "thinking" or "text": the block open now

    def _open(self) -> bytes:
        if self._opened:
            return b""
        self._opened = True
        usage = {"input_tokens": self.plan.prompt_tokens, "output_tokens": 0}
        started = {**self._message([], None), "usage": usage}
        return event("message_start", {"message": started})

    def _message(self, content: list[Any], stop_reason: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.plan.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }

    def _block(self, kind: str, block: dict[str, Any], delta: dict[str, Any]) -> bytes:
        frames = self._open()
        if self._in != kind:
            frames += self._close()
            self._in = kind
            frames += event("content_block_start", {"index": self._index, "content_block": block})
        return frames + event("content_block_delta", {"index": self._index, "delta": delta})

    def _close(self) -> bytes:
        if self._in is None:
            return b""
        self._in = None
        self._index += 1
        return event("content_block_stop", {"index": self._index - 1})

    def thinking_frame(self, text: str) -> bytes:
        delta = {"type": "thinking_delta", "thinking": text}
        return self._block("thinking", {"type": "thinking", "thinking": ""}, delta)

    def token_frame(self, text: str) -> bytes:
        return self._block(
            "text", {"type": "text", "text": ""}, {"type": "text_delta", "text": text}
        )

    def tool_frames(self, calls: list[ToolCall]) -> bytes:
        frames = b""
        for call in calls:
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": dumps(call.arguments).decode()}
            frames += self._block("tool_use", block, delta) + self._close()
        return frames

    def final_frames(self, reply: Reply, usage: Usage) -> bytes:
        frames = self._open() + self._close()
        delta = {"stop_reason": stop_reason(reply), "stop_sequence": None}
        frames += event("message_delta", {"delta": delta, "usage": messages_usage(usage)})
        return frames + event("message_stop", {})

    def whole_body(self, reply: Reply, usage: Usage) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if reply.thinking:
            content.append({"type": "thinking", "thinking": reply.thought})
        if reply.content:
            content.append({"type": "text", "text": reply.text})
        content += [
            {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
            for call in reply.tool_calls
        ]
        whole = self._message(content, stop_reason(reply))
        return {**whole, "usage": messages_usage(usage)}


def stop_reason(reply: Reply) -> str:
    return "tool_use" if reply.tool_calls else "end_turn"


def messages_usage(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.eval_count}
