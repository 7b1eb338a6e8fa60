"""The work of a node: generations and embeddings, from admission through a parallel slot
and the model's load to the last token, and the endpoints that ask for them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

from ..models import is_unload_request, normalize_model
from .events import MessagesFormat, ResponsesFormat
from .faults import MID_REQUEST, fault_point, strike
from .formats import (
    ChatFormat,
    Format,
    GenerateFormat,
    OpenAIChatFormat,
    OpenAICompletionFormat,
    TranscriptionFormat,
    Usage,
    base64_floats,
    embedding,
)
from .memory import ModelMemory
from .plans import (
    Plan,
    embedding_inputs,
    plan_events,
    plan_native,
    plan_openai,
    word_count,
)
from .replies import Reply, Script, compose
from .settings import BUSY_MESSAGE, CHARS_PER_TOKEN, RUNNER_DIED_MESSAGE, LiveNode
from .slots import Held, QueueFullError, SlotGate, Ticket
from .wire import (
    ApiError,
    LazyStream,
    iso_now,
    json_object,
    json_response,
    model_field,
    multipart_form,
    seconds_to_ns,
)


def token_frames(fmt: Format, script: Script) -> Iterator[Callable[[], bytes]]:
    """Each token's frame maker, in the order the reply streams, made as they are due."""
    for text in script.thinking_tokens():
        yield functools.partial(fmt.thinking_frame, text)
    for text in script.content_tokens():
        yield functools.partial(fmt.token_frame, text)
    if script.tool_calls:
        for _ in range(Reply(tool_calls=script.tool_calls).tokens - 1):
            yield _silent  # the arguments are being generated: nothing to show yet
        yield functools.partial(fmt.tool_frames, script.tool_calls)


def _silent() -> bytes:
    return b""


async def _discard(_frame: bytes) -> None:
    """Where a non-streaming answer's frames go: it is answered whole at the end."""


class Generation:
    """The generation and embedding endpoints of one node, native and OpenAI/Anthropic."""

    def __init__(self, node: LiveNode, gate: SlotGate, memory: ModelMemory) -> None:
        self._node = node
        self._gate = gate
        self._memory = memory

    # ---- the core

    def _admit(self, model: str) -> None:
        """Checks made before queueing: the model exists, and no fault answers first."""
        if not self._memory.has(model):
            raise ApiError(404, f'model "{model}" not found, try pulling it first')
        if self._node.settings.fault == "error500":
            raise ApiError(500, RUNNER_DIED_MESSAGE)
        if self._node.settings.fault == "busy":
            self._count_busy()
            raise ApiError(503, BUSY_MESSAGE)

    def _count_busy(self) -> None:
        self._node.stats.busy_rejections += 1
        self._node.changed()

    def _count_cancelled(self) -> None:
        self._node.stats.cancelled += 1
        self._node.changed()

    def _count_completed(self, usage: Usage) -> None:
        stats = self._node.stats
        stats.completed += 1
        stats.eval_count_total += usage.eval_count
        stats.prompt_eval_count_total += usage.prompt_tokens
        self._node.changed()

    @contextlib.asynccontextmanager
    async def _slot(self, model: str) -> AsyncIterator[Ticket]:
        """Hold a parallel slot for the body, the model marked in use (see ModelMemory.using);
        count a cancellation, wherever it strikes."""
        try:
            await self._gate.acquire()
        except QueueFullError:
            self._count_busy()
            raise ApiError(503, BUSY_MESSAGE) from None
        except asyncio.CancelledError:
            self._count_cancelled()
            raise
        ticket = Ticket()
        try:
            with self._memory.using(model):
                yield ticket
        except (asyncio.CancelledError, ConnectionError):  # a ConnectionError: writing to it
            if not ticket.node_died:
                self._count_cancelled()
            raise
        finally:
            self._gate.release()

    async def _run_tokens(
        self,
        request: web.Request,
        frames: Iterator[Callable[[], bytes]],
        count: int,
        ticket: Ticket,
        fault: str,
        emit: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """One token every token_interval; ``frames`` makes each token's frame when it is due
        (empty for a token that shows nothing yet, as the arguments of a tool call)."""
        fault_at = fault_point(fault, self._node.settings.fault_after_tokens, count)
        for index, frame in enumerate(frames):
            if index:
                await asyncio.sleep(self._node.settings.token_interval)
            if index == fault_at:
                await strike(fault, request, ticket)
            if data := frame():
                await emit(data)
        if fault_at == count:  # a fault beyond the last token still spoils the ending
            await strike(fault, request, ticket)

    def _usage(
        self,
        plan: Plan,
        tokens: int,
        started_ns: int,
        load_ns: int,
        prefill: float = 0.0,
        eval_started_ns: int | None = None,
    ) -> Usage:
        """prompt_eval_duration is the prompt's evaluation (first_token_delay) and the prefill
        of its uncached part only, as Ollama reports it; prompt_eval_count the whole prompt.
        eval_duration is the time the tokens took (from ``eval_started_ns``), as Ollama
        measures it, never less than token_interval each: on a busy machine the sleeps between
        tokens overrun, and a node must not claim a speed it did not deliver."""
        settings = self._node.settings
        nominal = seconds_to_ns(tokens * settings.token_interval)
        took = 0 if eval_started_ns is None else time.monotonic_ns() - eval_started_ns
        return Usage(
            prompt_tokens=plan.prompt_tokens,
            eval_count=tokens,
            total_duration=max(1, time.monotonic_ns() - started_ns),
            load_duration=load_ns,
            prompt_eval_duration=max(1, seconds_to_ns(settings.first_token_delay + prefill)),
            eval_duration=max(1, nominal, took),
        )

    @contextlib.contextmanager
    def _kv_slot(self, plan: Plan) -> Iterator[Held]:
        """The model's slot with the longest cached prefix of the prompt, counted in stats."""
        caches = self._memory.caches
        held = caches.take(normalize_model(plan.model), plan.prompt_text)
        stats = self._node.stats
        stats.prompt_cached_total += held.cached
        stats.prompt_computed_total += held.computed
        if plan.conversation is not None:
            stats.chat_turns[plan.conversation] = stats.chat_turns.get(plan.conversation, 0) + 1
        self._node.changed()
        try:
            yield held
        finally:
            caches.release(held)

    def _prefill_seconds(self, held: Held) -> float:
        tokens = -(-held.computed // CHARS_PER_TOKEN)  # rounded up: a started token is a token
        return tokens * self._node.settings.prefill_per_token

    async def _serve_generation(
        self, request: web.Request, plan: Plan, fmt: Format
    ) -> web.StreamResponse:
        """Queue for a slot, load, evaluate the prompt, then stream tokens or answer whole."""
        self._admit(plan.model)
        fault = self._node.settings.fault
        started_ns = time.monotonic_ns()
        script = compose(plan)
        async with self._slot(plan.model) as ticket:
            load_ns = await self._memory.ensure_loaded(plan.model)
            with self._kv_slot(plan) as held:
                prefill = self._prefill_seconds(held)
                await asyncio.sleep(self._node.settings.first_token_delay + prefill)
                held.slot.cached = plan.prompt_text
                if plan.stream:
                    stream = LazyStream(request, fmt.content_type)
                    frames = token_frames(fmt, script)
                    send = stream.send
                    eval_ns = time.monotonic_ns()
                    await self._run_tokens(request, frames, script.tokens, ticket, fault, send)
                    usage = self._usage(plan, script.tokens, started_ns, load_ns, prefill, eval_ns)
                    last = fmt.final_frames(Reply(tool_calls=script.tool_calls), usage)
                    response: web.StreamResponse = await stream.finish(last)
                else:
                    quiet = itertools.repeat(_silent, script.tokens)  # the time, not the frames
                    eval_ns = time.monotonic_ns()
                    await self._run_tokens(request, quiet, script.tokens, ticket, fault, _discard)
                    usage = self._usage(plan, script.tokens, started_ns, load_ns, prefill, eval_ns)
                    response = json_response(fmt.whole_body(script.whole(), usage))
                held.slot.cached = plan.cached_after(lambda: script.whole().text)
            self._count_completed(usage)
        return response

    async def _load(self, model: str, empty: dict[str, Any]) -> web.Response:
        """A request with nothing to generate loads the model and says so, as Ollama does."""
        self._admit(model)
        async with self._slot(model):
            await self._memory.ensure_loaded(model)
        done = {"done": True, "done_reason": "load"}
        return json_response({"model": model, "created_at": iso_now(), **empty, **done})

    async def _serve_embedding(
        self, request: web.Request, model: str, texts: list[str]
    ) -> tuple[list[list[float]], Usage]:
        """Embeddings take a slot like generations; a stall/die strikes before the answer."""
        self._admit(model)
        fault = self._node.settings.fault
        started_ns = time.monotonic_ns()
        async with self._slot(model) as ticket:
            load_ns = await self._memory.ensure_loaded(model)
            await asyncio.sleep(self._node.settings.first_token_delay)
            if fault in MID_REQUEST:
                await strike(fault, request, ticket)
            vectors = [embedding(text, self._node.settings.embedding_dim) for text in texts]
            plan = Plan(model=model, stream=False, tokens=0, prompt_tokens=word_count(texts))
            usage = self._usage(plan, 0, started_ns, load_ns)
            self._count_completed(usage)
        return vectors, usage

    def _unload(self, body: dict[str, Any], empty: dict[str, Any]) -> web.Response:
        """What ``ollama stop`` asks for: out of memory now, no generation, no slot."""
        model = model_field(body, "model")
        if not self._memory.has(model):
            raise ApiError(404, f'model "{model}" not found, try pulling it first')
        self._memory.unload(model)
        done = {"done": True, "done_reason": "unload"}
        return json_response({"model": model, "created_at": iso_now(), **empty, **done})

    # ---- native endpoints

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        if is_unload_request(request.path, body):
            return self._unload(body, {"response": ""})
        if not body.get("prompt") and not body.get("images"):
            return await self._load(model_field(body, "model"), {"response": ""})
        prompt = [body.get("system"), body.get("prompt")]
        plan = plan_native(body, self._node.settings.tokens, prompt)
        return await self._serve_generation(request, plan, GenerateFormat(plan))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        empty = {"message": {"role": "assistant", "content": ""}}
        if is_unload_request(request.path, body):
            return self._unload(body, empty)
        if not body.get("messages"):
            return await self._load(model_field(body, "model"), empty)
        plan = plan_native(body, self._node.settings.tokens, body.get("messages"))
        return await self._serve_generation(request, plan, ChatFormat(plan))

    async def embed(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        model = model_field(body, "model")
        vectors, usage = await self._serve_embedding(
            request, model, embedding_inputs(body.get("input"))
        )
        return json_response(
            {
                "model": model,
                "embeddings": vectors,
                "total_duration": usage.total_duration,
                "load_duration": usage.load_duration,
                "prompt_eval_count": usage.prompt_tokens,
            }
        )

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        model = model_field(body, "model")
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) and prompt else []
        vectors, _usage = await self._serve_embedding(request, model, texts)
        return json_response({"embedding": vectors[0] if vectors else []})

    # ---- OpenAI- and Anthropic-compatible endpoints

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        plan = plan_openai(body, self._node.settings.tokens, body.get("messages"))
        return await self._serve_generation(request, plan, OpenAIChatFormat(plan))

    async def openai_completions(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        plan = plan_openai(body, self._node.settings.tokens, body.get("prompt"))
        return await self._serve_generation(request, plan, OpenAICompletionFormat(plan))

    async def openai_responses(self, request: web.Request) -> web.StreamResponse:
        plan = plan_events(
            await json_object(request), self._node.settings.tokens, "max_output_tokens"
        )
        return await self._serve_generation(request, plan, ResponsesFormat(plan))

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        plan = plan_events(body, self._node.settings.tokens, "max_tokens")
        return await self._serve_generation(request, plan, MessagesFormat(plan))

    async def openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        model = model_field(body, "model")
        if body.get("input") is None:
            raise ApiError(400, "invalid input")
        texts = embedding_inputs(body.get("input"))
        vectors, usage = await self._serve_embedding(request, model, texts)
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "embedding": base64_floats(vector) if as_base64 else vector,
                "index": index,
            }
            for index, vector in enumerate(vectors)
        ]
        tokens = {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}
        return json_response({"object": "list", "data": data, "model": model, "usage": tokens})

    async def transcription(self, request: web.Request) -> web.StreamResponse:
        """/v1/audio/transcriptions: a form with the model and the audio; a generation (a
        slot, the model's load) whose words are the transcript."""
        form = multipart_form(await request.read(), request.headers.get("Content-Type", ""))
        model = request.query.get("model") or form.values.get("model")  # Go: the query first
        if not model:
            raise ApiError(400, "model is required")
        if not form.files.get("file"):
            raise ApiError(400, "file is required")
        plan = Plan(model=model, stream=False, tokens=self._node.settings.tokens, prompt_tokens=1)
        return await self._serve_generation(request, plan, TranscriptionFormat(plan))
