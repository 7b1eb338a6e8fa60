"""A simulated Ollama server: the stand-in for real nodes in tests, demos and benchmarks.

A SimNode speaks Ollama's wire format (the native NDJSON API and the OpenAI-compatible /v1 API)
with deterministic output ("tok0 tok1 ..."), and reproduces what a load balancer has to cope
with: a limited number of parallel generations behind a bounded queue (503 when it is full),
slow cold loads of models that are not in memory (and, with ``max_loaded``, the eviction of the
least recently used one to make room), prompt cancellation when the client goes away, and
injected faults (500s, 503s, streams that stall or die, refused connections).

Settings are read per request, so a test can change them while the node runs. Besides Ollama's
API, ``GET /-/sim/stats`` answers the node's counters (SimStats without its request list) and
the models in memory, for harnesses that run nodes as separate processes.

Run nodes as a separate process with ``python -m proxy.simnode --port 11501 --port 11502``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import hashlib
import importlib
import itertools
import json
import math
import re
import signal
import struct
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.typedefs import Handler

from .models import is_unload_request

__all__ = [
    "BUSY_MESSAGE",
    "RUNNER_DIED_MESSAGE",
    "SimNode",
    "SimRequest",
    "SimSettings",
    "SimStats",
    "main",
    "normalize_model",
]

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_DIED_MESSAGE = "llama runner process has terminated: exit status 2"
FAULTS = frozenset({"none", "refuse", "error500", "stall", "die", "busy"})
DEFAULT_MODELS = ("llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest")

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
# Ollama accepts large bodies (base64 images, long chat histories); aiohttp's default is 1 MiB.
MAX_BODY_BYTES = 256 * 1024 * 1024
CONTEXT_LENGTH = 4096
KEEP_ALIVE = timedelta(minutes=5)
# The simulator's own observation endpoint: never recorded in stats.requests, never faulted.
STATS_PATH = "/-/sim/stats"

_response_ids = itertools.count(1)


# --------------------------------------------------------------------------- public data


@dataclass
class SimSettings:
    """How a node behaves. Mutable: a test may change any field while the node runs."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))  # on disk
    resident: list[str] = field(default_factory=list)  # in memory; others pay load_delay
    num_parallel: int = 4  # generations at once, node-wide (like OLLAMA_NUM_PARALLEL)
    max_queue: int = 512  # requests waiting for a slot; more get 503 busy
    tokens: int = 8  # tokens per generation unless the request asks for a number
    token_interval: float = 0.005  # seconds between streamed tokens
    first_token_delay: float = 0.0  # prompt evaluation time
    load_delay: float = 0.0  # cold load of a model that is not resident
    # Models held in memory at most (like OLLAMA_MAX_LOADED_MODELS), 0 for no limit. A cold
    # load beyond it evicts the least recently used model with no generation in progress; when
    # every other one is busy, the node holds one more until one of them goes idle.
    max_loaded: int = 0
    # One of FAULTS, applied to generations and embeddings. "refuse" aborts every connection
    # as it arrives; for a real "connection refused" use SimNode.refuse() (or stop()).
    fault: str = "none"
    fault_after_tokens: int = 2  # tokens sent before a "stall" or "die"
    version: str = "0.12.6"
    embedding_dim: int = 8
    health_fail: bool = False  # "/" and /api/version answer 500
    record_requests: bool = True  # keep every request in stats.requests (off for benchmarks)

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {sorted(FAULTS)}")


@dataclass
class SimRequest:
    """One request as the node received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any  # the parsed body, None when it is not JSON
    model: str | None  # the body's "model" (or legacy "name") when it has one


@dataclass
class SimStats:
    """What the node has done; wait_for() wakes on every change."""

    requests: list[SimRequest] = field(default_factory=list)
    active: int = 0  # generations holding a parallel slot now
    max_active: int = 0
    queued: int = 0  # generations waiting for a slot now
    completed: int = 0
    cancelled: int = 0  # the client (or stop()) closed the connection before the end
    busy_rejections: int = 0
    cold_loads: int = 0
    evictions: int = 0  # models unloaded to stay within max_loaded
    eval_count_total: int = 0
    prompt_eval_count_total: int = 0


def normalize_model(name: str) -> str:
    """Ollama's rule: a name without a tag means ":latest" ("llama3.2" is "llama3.2:latest")."""
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"


# --------------------------------------------------------------------------- wire helpers


class _ApiError(Exception):
    """An error answered with a real status before any byte of the body was sent."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _ndjson(value: Any) -> bytes:
    return _dumps(value) + b"\n"


def _sse(value: Any) -> bytes:
    return b"data: " + _dumps(value) + b"\n\n"


def _json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=_dumps(value), status=status, content_type="application/json", charset="utf-8"
    )


def _go_not_found() -> web.Response:
    # Go's mux answers unknown paths (and wrong methods) this way, without a charset.
    return web.Response(
        body=b"404 page not found", status=404, headers={"Content-Type": "text/plain"}
    )


def _error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """The error envelope of the API family the path belongs to."""
    if path.startswith("/v1/messages"):
        kinds = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}
        return {
            "type": "error",
            "error": {"type": kinds.get(status, "api_error"), "message": message},
        }
    if path.startswith("/v1/"):
        # Ollama 0.12's OpenAI middleware: its own 400s are invalid_request_error; errors coming
        # up from the native handlers (404, 500, 503) are all reported as api_error.
        kind = "invalid_request_error" if status == 400 else "api_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"error": message}


def _parse_json(body: bytes) -> Any:
    """The parsed body, or None when it is empty or not JSON."""
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 with Ollama's reasons."""
    body = await request.read()  # cached: the recording middleware read it first
    if not body:
        raise _ApiError(400, "missing request body")
    try:
        value = json.loads(body)
    except ValueError as error:
        raise _ApiError(400, f"invalid JSON: {error}") from None
    if not isinstance(value, dict):
        raise _ApiError(400, "invalid request body: expected a JSON object")
    return value


def _model_field(body: dict[str, Any], *keys: str) -> str:
    """The first non-empty model name among keys ("model", or the legacy "name")."""
    for key in keys:
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    raise _ApiError(400, "model is required")


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso_now() -> str:
    return _iso(datetime.now(UTC))


def _seconds_to_ns(seconds: float) -> int:
    return round(seconds * 1e9)


async def _wait_forever() -> NoReturn:
    """Sleep until cancelled: aiohttp cancels the handler when its connection closes."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable: nothing sets this event")


async def _drop_connection(request: web.Request) -> NoReturn:
    """Abort the TCP connection like a crashed process: no status, no chunk terminator."""
    if request.transport is not None:
        request.transport.abort()
    # The abort makes aiohttp cancel this handler (handler_cancellation) on the next loop turn.
    await _wait_forever()


# --------------------------------------------------------------------------- fake model data


def _digest(name: str) -> str:
    return hashlib.sha256(normalize_model(name).encode()).hexdigest()


def _model_size(name: str) -> int:
    return 1_000_000_000 + int(_digest(name)[:6], 16) * 100  # 1 to 2.7 GB, stable per name


def _family(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    match = re.match(r"[a-z]+", base)
    return match.group(0) if match else "llama"


def _parameter_size(name: str) -> str:
    tag = normalize_model(name).rsplit(":", 1)[-1]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([bm])", tag)
    return f"{match.group(1)}{match.group(2).upper()}" if match else "3.2B"


def _details(name: str) -> dict[str, Any]:
    family = _family(name)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": _parameter_size(name),
        "quantization_level": "Q4_K_M",
    }


def _capabilities(name: str) -> list[str]:
    return ["embedding"] if "embed" in name else ["completion"]


def _token_text(index: int) -> str:
    """Distinct, ordered tokens, so a test can check that none was lost or reordered."""
    return f"tok{index} "


def _text_of(value: Any) -> str:
    """The words in a prompt, message list, or content-part list, whatever the API family."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(item) for item in value)
    if isinstance(value, dict):
        return _text_of(value.get("content", value.get("text")))
    return ""


def _word_count(*values: Any) -> int:
    """Stand-in for prompt tokens: whitespace-separated words, at least 1."""
    return max(1, len(" ".join(_text_of(value) for value in values).split()))


def _embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from the text (Ollama's /api/embed normalises)."""
    raw = [byte / 127.5 - 1.0 for byte in hashlib.shake_256(text.encode()).digest(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _embedding_inputs(value: Any) -> list[str]:
    """Inputs as texts: a string, a list of strings, or (OpenAI) token ids or lists of them."""
    if value is None:
        return []
    if isinstance(value, list) and value and all(isinstance(item, int) for item in value):
        return [json.dumps(value)]  # one input given as token ids
    if isinstance(value, list):
        return [item if isinstance(item, str) else json.dumps(item) for item in value]
    return [value if isinstance(value, str) else json.dumps(value)]


# --------------------------------------------------------------------------- generation model


@dataclass
class _Plan:
    """What one generation request asks for, read from its body."""

    model: str  # as the client spelled it: Ollama echoes it back unchanged
    stream: bool
    tokens: int
    prompt_tokens: int
    include_usage: bool = False  # OpenAI stream_options.include_usage


def _flag(value: Any, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def _token_budget(value: Any, default: int) -> int:
    """A request's num_predict / max_tokens; negative means "until done" in Ollama."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options")
    return options if isinstance(options, dict) else {}


def _plan_native(body: dict[str, Any], default_tokens: int, prompt: Any) -> _Plan:
    """/api/generate and /api/chat: streamed unless "stream" is false."""
    return _Plan(
        model=_model_field(body, "model"),
        stream=_flag(body.get("stream"), True),
        tokens=_token_budget(_options(body).get("num_predict"), default_tokens),
        prompt_tokens=_word_count(prompt),
    )


def _plan_openai(body: dict[str, Any], default_tokens: int, prompt: Any) -> _Plan:
    """/v1/chat/completions and /v1/completions: streamed (as SSE) only when asked."""
    stream_options = body.get("stream_options")
    budget = body.get("max_completion_tokens", body.get("max_tokens"))
    return _Plan(
        model=_model_field(body, "model"),
        stream=_flag(body.get("stream"), False),
        tokens=_token_budget(budget, default_tokens),
        prompt_tokens=_word_count(prompt),
        include_usage=isinstance(stream_options, dict)
        and stream_options.get("include_usage") is True,
    )


def _plan_whole_only(body: dict[str, Any], default_tokens: int, budget_key: str) -> _Plan:
    """/v1/responses and /v1/messages: always answered as one JSON body."""
    prompt = [body.get("instructions"), body.get("system"), body.get("input"), body.get("messages")]
    return _Plan(
        model=_model_field(body, "model"),
        stream=False,
        tokens=_token_budget(body.get(budget_key), default_tokens),
        prompt_tokens=_word_count(prompt),
    )


@dataclass
class _Usage:
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


class _Format:
    """How one endpoint frames a generation: per-token frames, the ending, or one body."""

    content_type = NDJSON

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.created = int(time.time())

    def token_frame(self, text: str) -> bytes:
        raise NotImplementedError

    def final_frames(self, usage: _Usage) -> bytes:
        raise NotImplementedError

    def whole_body(self, text: str, usage: _Usage) -> dict[str, Any]:
        raise NotImplementedError


class _NativeFormat(_Format):
    """Ollama's own NDJSON framing; the final chunk is the whole body with empty text."""

    def _chunk(self, text: str, done: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _ending(self) -> dict[str, Any]:
        return {"done_reason": "stop"}

    def token_frame(self, text: str) -> bytes:
        return _ndjson(self._chunk(text, done=False))

    def final_frames(self, usage: _Usage) -> bytes:
        return _ndjson(self.whole_body("", usage))

    def whole_body(self, text: str, usage: _Usage) -> dict[str, Any]:
        return {**self._chunk(text, done=True), **self._ending(), **usage.ollama_fields()}


class _GenerateFormat(_NativeFormat):
    def _chunk(self, text: str, done: bool) -> dict[str, Any]:
        return {"model": self.plan.model, "created_at": _iso_now(), "response": text, "done": done}

    def _ending(self) -> dict[str, Any]:
        return {**super()._ending(), "context": [1, 2, 3]}


class _ChatFormat(_NativeFormat):
    def _chunk(self, text: str, done: bool) -> dict[str, Any]:
        return {
            "model": self.plan.model,
            "created_at": _iso_now(),
            "message": {"role": "assistant", "content": text},
            "done": done,
        }


class _OpenAIFormat(_Format):
    """Shared framing of /v1/chat/completions and /v1/completions (SSE when streaming)."""

    content_type = SSE
    id_prefix = ""
    chunk_object = ""
    whole_object = ""

    def __init__(self, plan: _Plan) -> None:
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
        return _sse(self._envelope(self.chunk_object, self._chunk_choice(text, None)))

    def final_frames(self, usage: _Usage) -> bytes:
        frames = [_sse(self._envelope(self.chunk_object, self._chunk_choice("", "stop")))]
        if self.plan.include_usage:
            usage_chunk = {**self._envelope(self.chunk_object, {}), "choices": []}
            frames.append(_sse({**usage_chunk, "usage": usage.openai_usage()}))
        frames.append(b"data: [DONE]\n\n")
        return b"".join(frames)

    def whole_body(self, text: str, usage: _Usage) -> dict[str, Any]:
        whole = self._envelope(self.whole_object, self._whole_choice(text))
        return {**whole, "usage": usage.openai_usage()}


class _OpenAIChatFormat(_OpenAIFormat):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    whole_object = "chat.completion"

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text}
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}

    def _whole_choice(self, text: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "finish_reason": "stop"}


class _OpenAICompletionFormat(_OpenAIFormat):
    id_prefix = "cmpl"
    chunk_object = "text_completion"
    whole_object = "text_completion"

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "finish_reason": finish_reason}

    def _whole_choice(self, text: str) -> dict[str, Any]:
        return self._chunk_choice(text, "stop")


class _ResponsesFormat(_Format):
    """A minimal OpenAI Responses API body."""

    def whole_body(self, text: str, usage: _Usage) -> dict[str, Any]:
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


class _MessagesFormat(_Format):
    """A minimal Anthropic Messages API body."""

    def whole_body(self, text: str, usage: _Usage) -> dict[str, Any]:
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


class _LazyStream:
    """A streamed response whose status line leaves with the first frame, as in Ollama, so
    that anything going wrong before the first token keeps its real status."""

    def __init__(self, request: web.Request, content_type: str) -> None:
        self._request = request
        self._content_type = content_type
        self._response: web.StreamResponse | None = None

    async def send(self, frame: bytes) -> None:
        if self._response is None:
            self._response = web.StreamResponse(headers={"Content-Type": self._content_type})
            self._response.enable_chunked_encoding()
            await self._response.prepare(self._request)
        await self._response.write(frame)

    async def finish(self, last_frames: bytes) -> web.StreamResponse:
        await self.send(last_frames)
        assert self._response is not None  # send() opened it
        await self._response.write_eof()
        return self._response


# --------------------------------------------------------------------------- admission


class _QueueFullError(Exception):
    pass


class _SlotGate:
    """FIFO admission: capacity() generations at once, at most queue_limit() waiting.

    Both limits are read on every call so that tests can change them on a running node. A
    released slot is handed straight to the oldest waiter, so late arrivals cannot overtake.
    """

    def __init__(
        self,
        capacity: Callable[[], int],
        queue_limit: Callable[[], int],
        on_change: Callable[[], None],
    ) -> None:
        self._capacity = capacity
        self._queue_limit = queue_limit
        self._on_change = on_change
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.active = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if not self._waiters and self.active < self._capacity():
            self.active += 1
            self._on_change()
            return
        if len(self._waiters) >= self._queue_limit():
            raise _QueueFullError
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._admit_waiters()  # capacity may have been raised since the last release
        self._on_change()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # we were handed a slot just as we were cancelled: pass it on
            else:
                self._forget(waiter)
            raise

    def release(self) -> None:
        self.active -= 1
        self._admit_waiters()
        self._on_change()

    def _admit_waiters(self) -> None:
        while self._waiters and self.active < self._capacity():
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter is skipped, not admitted
                waiter.set_result(None)
                self.active += 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):  # release() may have popped it already
            self._waiters.remove(waiter)
        self._on_change()


@dataclass
class _Ticket:
    """A generation's claim on a slot; node_died tells a fault apart from a client leaving."""

    node_died: bool = False


# --------------------------------------------------------------------------- the node


class SimNode:
    """One simulated Ollama server. See the module docstring."""

    def __init__(self, settings: SimSettings | None = None, *, name: str = "sim") -> None:
        self.settings = settings if settings is not None else SimSettings()
        self.name = name
        self.stats = SimStats()
        self.url = ""
        self.port: int | None = None  # remembered across stop()/start()
        self._runner: web.AppRunner | None = None
        self._stats_changed = asyncio.Event()
        self._gate = _SlotGate(
            lambda: self.settings.num_parallel, lambda: self.settings.max_queue, self._sync_gate
        )
        self._loads: dict[str, asyncio.Task[None]] = {}  # cold loads in progress, by model
        # For max_loaded: generations in progress per model, and when each model was last used
        # (a tick of _use_clock; a model never used since it became resident counts as 0).
        self._users: Counter[str] = Counter()
        self._last_used: dict[str, int] = {}
        self._use_clock = itertools.count(1)
        self._blobs: set[str] = set()
        self._started_at = datetime.now(UTC)
        self.app = self._build_app()

    # ---- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen (again) and return the URL; port 0 means the remembered port, else a free one."""
        if self._runner is not None:
            return self.url
        runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port or self.port or 0).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        """Stop listening and drop every connection at once, like a killed process."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()  # stop accepting before dropping, so nothing slips in between
        if runner.server is not None:
            for connection in runner.server.connections:
                if connection.transport is not None:
                    connection.transport.abort()
        await runner.cleanup()

    async def refuse(self) -> None:
        """Refuse connections from now on (the port stays remembered: start() re-binds it)."""
        await self.stop()

    # ---- observation

    async def wait_for(
        self,
        predicate: Callable[[SimStats], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - part of the interface tests are written against
    ) -> None:
        """Return once predicate(stats) holds; woken by every stats change, not by polling."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.stats):
                    await self._stats_changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{self.name}: condition not reached within {timeout}s; {self._summary()}"
            ) from None

    def reset_stats(self) -> None:
        """Start counting afresh; generations in progress stay counted as active or queued."""
        active, queued = self._gate.active, self._gate.queued
        self.stats = SimStats(active=active, max_active=active, queued=queued)
        self._changed()

    def _summary(self) -> str:
        counters = {key: value for key, value in vars(self.stats).items() if key != "requests"}
        return f"stats {counters}, {len(self.stats.requests)} requests"

    def _changed(self) -> None:
        # Wake every wait_for(): each waits on the event current when it last checked.
        self._stats_changed.set()
        self._stats_changed = asyncio.Event()

    def _sync_gate(self) -> None:
        self.stats.active = self._gate.active
        self.stats.queued = self._gate.queued
        self.stats.max_active = max(self.stats.max_active, self._gate.active)
        self._changed()

    # ---- app and middleware

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._front_door], client_max_size=MAX_BODY_BYTES)
        app.add_routes(self._routes())
        app.on_cleanup.append(self._cancel_loads)
        return app

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self._root),
            web.get("/api/version", self._version),
            web.get("/api/tags", self._tags),
            web.get("/api/ps", self._ps),
            web.post("/api/show", self._show),
            web.post("/api/generate", self._generate),
            web.post("/api/chat", self._chat),
            web.post("/api/embed", self._embed),
            web.post("/api/embeddings", self._embeddings),
            web.post("/api/pull", self._pull),
            web.post("/api/push", self._push),
            web.post("/api/create", self._create),
            web.post("/api/copy", self._copy),
            web.delete("/api/delete", self._delete),
            web.head("/api/blobs/{digest}", self._blob_exists),
            web.post("/api/blobs/{digest}", self._blob_upload),
            web.post("/v1/chat/completions", self._openai_chat),
            web.post("/v1/completions", self._openai_completions),
            web.post("/v1/embeddings", self._openai_embeddings),
            web.post("/v1/responses", self._openai_responses),
            web.post("/v1/messages", self._anthropic_messages),
            web.get("/v1/models", self._openai_models),
            web.get("/v1/models/{model:.+}", self._openai_model),
            web.get(STATS_PATH, self._sim_stats),
        ]

    @web.middleware
    async def _front_door(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == STATS_PATH:  # the harness looking on, not a request to the node
            return await handler(request)
        await self._record(request)
        if self.settings.fault == "refuse":
            await _drop_connection(request)  # the nearest a live listener gets to refusing
        try:
            return await handler(request)
        except _ApiError as error:
            body = _error_body(request.path, error.status, error.message)
            return _json_response(body, error.status)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return _go_not_found()
        except ConnectionError:
            if request.transport is not None and not request.transport.is_closing():
                raise
            return web.Response()  # the client left mid-write: Ollama logs no error for that

    async def _record(self, request: web.Request) -> None:
        body = await request.read()
        if not self.settings.record_requests:
            return
        payload = _parse_json(body)
        model = None
        if isinstance(payload, dict):
            named = payload.get("model", payload.get("name"))
            model = named if isinstance(named, str) else None
        headers = dict(request.headers)
        entry = SimRequest(request.method, request.path, headers, body, payload, model)
        self.stats.requests.append(entry)
        self._changed()

    async def _cancel_loads(self, _app: web.Application) -> None:
        for task in self._loads.values():
            task.cancel()
        self._loads.clear()

    # ---- models on disk and in memory

    def _unload(self, body: dict[str, Any], empty: dict[str, Any]) -> web.Response:
        """What ``ollama stop`` asks for: out of memory now, no generation, no slot."""
        model = _model_field(body, "model")
        if not self._has_model(model):
            raise _ApiError(404, f'model "{model}" not found, try pulling it first')
        wanted = normalize_model(model)
        self.settings.resident[:] = [
            m for m in self.settings.resident if normalize_model(m) != wanted
        ]
        self._changed()
        done = {"done": True, "done_reason": "unload"}
        return _json_response({"model": model, "created_at": _iso_now(), **empty, **done})

    def _has_model(self, name: str) -> bool:
        wanted = normalize_model(name)
        return any(normalize_model(model) == wanted for model in self.settings.models)

    def _is_resident(self, name: str) -> bool:
        wanted = normalize_model(name)
        return any(normalize_model(model) == wanted for model in self.settings.resident)

    def _add_model(self, name: str) -> None:
        if not self._has_model(name):
            self.settings.models.append(normalize_model(name))

    def _remove_model(self, name: str) -> None:
        wanted = normalize_model(name)
        self.settings.models[:] = [m for m in self.settings.models if normalize_model(m) != wanted]
        self.settings.resident[:] = [
            m for m in self.settings.resident if normalize_model(m) != wanted
        ]
        self._last_used.pop(wanted, None)

    async def _ensure_loaded(self, name: str) -> int:
        """Make the model resident; return the ns spent waiting for a cold load.

        Concurrent requests for the same cold model share one load, and the load goes on
        when they are cancelled (as in Ollama, whose scheduler finishes loading a model even
        when nobody waits for it any more).
        """
        if self._is_resident(name):
            return 0
        key = normalize_model(name)
        load = self._loads.get(key)
        if load is None:
            load = asyncio.create_task(self._load(key))
            self._loads[key] = load
            self.stats.cold_loads += 1
            self._changed()
        started = time.monotonic_ns()
        await asyncio.shield(load)
        return time.monotonic_ns() - started

    async def _load(self, key: str) -> None:
        try:
            await asyncio.sleep(self.settings.load_delay)
            if not self._is_resident(key):
                self.settings.resident.append(key)
            self._touch(key)  # the newest in memory, even if every waiter has gone
            self._evict_over_limit()
            self._changed()
        finally:
            self._loads.pop(key, None)

    @contextlib.contextmanager
    def _using(self, name: str) -> Iterator[None]:
        """Mark a model in use for the body (from its load to the last token): never evicted
        meanwhile, and the most recently used when it ends."""
        key = normalize_model(name)
        self._users[key] += 1
        self._touch(key)
        try:
            yield
        finally:
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]
            self._touch(key)
            self._evict_over_limit()  # room may have been waiting for this model to go idle

    def _touch(self, key: str) -> None:
        self._last_used[key] = next(self._use_clock)

    def _evict_over_limit(self) -> None:
        """Unload least recently used idle models until at most max_loaded are in memory."""
        limit = self.settings.max_loaded
        resident = self.settings.resident
        evicted = False
        while limit > 0 and len(resident) > limit:
            idle = [m for m in resident if normalize_model(m) not in self._users]
            if not idle:
                break  # every model is busy: the first to go idle is evicted then
            # min() keeps the first of equals: among models never used, the first listed.
            victim = min(idle, key=lambda m: self._last_used.get(normalize_model(m), 0))
            resident.remove(victim)
            self._last_used.pop(normalize_model(victim), None)
            self.stats.evictions += 1
            evicted = True
        if evicted:
            self._changed()

    # ---- generation core

    def _admit(self, model: str) -> None:
        """Checks made before queueing: the model exists, and no fault answers first."""
        if not self._has_model(model):
            raise _ApiError(404, f'model "{model}" not found, try pulling it first')
        if self.settings.fault == "error500":
            raise _ApiError(500, RUNNER_DIED_MESSAGE)
        if self.settings.fault == "busy":
            self._count_busy()
            raise _ApiError(503, BUSY_MESSAGE)

    def _count_busy(self) -> None:
        self.stats.busy_rejections += 1
        self._changed()

    def _count_cancelled(self) -> None:
        self.stats.cancelled += 1
        self._changed()

    def _count_completed(self, usage: _Usage) -> None:
        self.stats.completed += 1
        self.stats.eval_count_total += usage.eval_count
        self.stats.prompt_eval_count_total += usage.prompt_tokens
        self._changed()

    @contextlib.asynccontextmanager
    async def _generation_slot(self, model: str) -> AsyncIterator[_Ticket]:
        """Hold a parallel slot for the body, the model marked in use (see _using); count a
        cancellation, wherever it strikes."""
        try:
            await self._gate.acquire()
        except _QueueFullError:
            self._count_busy()
            raise _ApiError(503, BUSY_MESSAGE) from None
        except asyncio.CancelledError:
            self._count_cancelled()
            raise
        ticket = _Ticket()
        try:
            with self._using(model):
                yield ticket
        except (asyncio.CancelledError, ConnectionError):  # a ConnectionError: writing to it
            if not ticket.node_died:
                self._count_cancelled()
            raise
        finally:
            self._gate.release()

    async def _strike(self, fault: str, request: web.Request, ticket: _Ticket) -> NoReturn:
        """Inject a mid-generation fault: "die" drops the connection, "stall" goes silent."""
        if fault == "die":
            ticket.node_died = True
            await _drop_connection(request)
        await _wait_forever()  # stall: until the client gives up

    def _fault_point(self, fault: str, tokens: int) -> int | None:
        """After how many tokens a stall/die strikes (before the ending at the latest)."""
        if fault not in ("stall", "die"):
            return None
        return min(max(0, self.settings.fault_after_tokens), tokens)

    async def _run_tokens(
        self,
        request: web.Request,
        plan: _Plan,
        ticket: _Ticket,
        fault: str,
        emit: Callable[[str], Awaitable[None]],
    ) -> None:
        fault_at = self._fault_point(fault, plan.tokens)
        for index in range(plan.tokens):
            if index:
                await asyncio.sleep(self.settings.token_interval)
            if index == fault_at:
                await self._strike(fault, request, ticket)
            await emit(_token_text(index))
        if fault_at == plan.tokens:  # a fault beyond the last token still spoils the ending
            await self._strike(fault, request, ticket)

    def _usage(self, plan: _Plan, started_ns: int, load_ns: int) -> _Usage:
        return _Usage(
            prompt_tokens=plan.prompt_tokens,
            eval_count=plan.tokens,
            total_duration=max(1, time.monotonic_ns() - started_ns),
            load_duration=load_ns,
            prompt_eval_duration=max(1, _seconds_to_ns(self.settings.first_token_delay)),
            eval_duration=max(1, _seconds_to_ns(plan.tokens * self.settings.token_interval)),
        )

    async def _serve_generation(
        self, request: web.Request, plan: _Plan, fmt: _Format
    ) -> web.StreamResponse:
        """Queue for a slot, load, evaluate the prompt, then stream tokens or answer whole."""
        self._admit(plan.model)
        fault = self.settings.fault
        started_ns = time.monotonic_ns()
        async with self._generation_slot(plan.model) as ticket:
            load_ns = await self._ensure_loaded(plan.model)
            await asyncio.sleep(self.settings.first_token_delay)
            if plan.stream:
                stream = _LazyStream(request, fmt.content_type)

                async def send(text: str) -> None:
                    await stream.send(fmt.token_frame(text))

                await self._run_tokens(request, plan, ticket, fault, send)
                usage = self._usage(plan, started_ns, load_ns)
                response: web.StreamResponse = await stream.finish(fmt.final_frames(usage))
            else:
                pieces: list[str] = []

                async def collect(text: str) -> None:
                    pieces.append(text)

                await self._run_tokens(request, plan, ticket, fault, collect)
                usage = self._usage(plan, started_ns, load_ns)
                response = _json_response(fmt.whole_body("".join(pieces), usage))
            self._count_completed(usage)
        return response

    async def _serve_embedding(
        self, request: web.Request, model: str, texts: list[str]
    ) -> tuple[list[list[float]], _Usage]:
        """Embeddings take a slot like generations; a stall/die strikes before the answer."""
        self._admit(model)
        fault = self.settings.fault
        started_ns = time.monotonic_ns()
        async with self._generation_slot(model) as ticket:
            load_ns = await self._ensure_loaded(model)
            await asyncio.sleep(self.settings.first_token_delay)
            if fault in ("stall", "die"):
                await self._strike(fault, request, ticket)
            vectors = [_embedding(text, self.settings.embedding_dim) for text in texts]
            plan = _Plan(model=model, stream=False, tokens=0, prompt_tokens=_word_count(texts))
            usage = self._usage(plan, started_ns, load_ns)
            self._count_completed(usage)
        return vectors, usage

    # ---- native generation endpoints

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        if is_unload_request(request.path, body):
            return self._unload(body, {"response": ""})
        prompt = [body.get("system"), body.get("prompt")]
        plan = _plan_native(body, self.settings.tokens, prompt)
        return await self._serve_generation(request, plan, _GenerateFormat(plan))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        if is_unload_request(request.path, body):
            return self._unload(body, {"message": {"role": "assistant", "content": ""}})
        plan = _plan_native(body, self.settings.tokens, body.get("messages"))
        return await self._serve_generation(request, plan, _ChatFormat(plan))

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        model = _model_field(body, "model")
        vectors, usage = await self._serve_embedding(
            request, model, _embedding_inputs(body.get("input"))
        )
        return _json_response(
            {
                "model": model,
                "embeddings": vectors,
                "total_duration": usage.total_duration,
                "load_duration": usage.load_duration,
                "prompt_eval_count": usage.prompt_tokens,
            }
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        model = _model_field(body, "model")
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) and prompt else []
        vectors, _usage = await self._serve_embedding(request, model, texts)
        return _json_response({"embedding": vectors[0] if vectors else []})

    # ---- OpenAI- and Anthropic-compatible endpoints

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        plan = _plan_openai(body, self.settings.tokens, body.get("messages"))
        return await self._serve_generation(request, plan, _OpenAIChatFormat(plan))

    async def _openai_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        plan = _plan_openai(body, self.settings.tokens, body.get("prompt"))
        return await self._serve_generation(request, plan, _OpenAICompletionFormat(plan))

    async def _openai_responses(self, request: web.Request) -> web.StreamResponse:
        plan = _plan_whole_only(
            await _json_object(request), self.settings.tokens, "max_output_tokens"
        )
        return await self._serve_generation(request, plan, _ResponsesFormat(plan))

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        plan = _plan_whole_only(await _json_object(request), self.settings.tokens, "max_tokens")
        return await self._serve_generation(request, plan, _MessagesFormat(plan))

    async def _openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        model = _model_field(body, "model")
        if body.get("input") is None:
            raise _ApiError(400, "invalid input")
        texts = _embedding_inputs(body.get("input"))
        vectors, usage = await self._serve_embedding(request, model, texts)
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "embedding": _base64_floats(vector) if as_base64 else vector,
                "index": index,
            }
            for index, vector in enumerate(vectors)
        ]
        tokens = {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}
        return _json_response({"object": "list", "data": data, "model": model, "usage": tokens})

    def _openai_model_entry(self, model_id: str) -> dict[str, Any]:
        created = int(self._started_at.timestamp())
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "library",
        }

    async def _openai_models(self, _request: web.Request) -> web.StreamResponse:
        data = [self._openai_model_entry(normalize_model(m)) for m in self.settings.models]
        return _json_response({"object": "list", "data": data})

    async def _openai_model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        if not self._has_model(name):
            raise _ApiError(404, f'model "{name}" not found, try pulling it first')
        return _json_response(self._openai_model_entry(name))  # the id as asked, like Ollama

    # ---- health and listings

    async def _root(self, _request: web.Request) -> web.StreamResponse:
        if self.settings.health_fail:
            return web.Response(text="Ollama is not healthy (simulated)", status=500)
        return web.Response(text="Ollama is running")

    async def _version(self, _request: web.Request) -> web.StreamResponse:
        if self.settings.health_fail:
            raise _ApiError(500, "health check failure (simulated)")
        return _json_response({"version": self.settings.version})

    def _model_entry(self, name: str) -> dict[str, Any]:
        canonical = normalize_model(name)
        return {
            "name": canonical,
            "model": canonical,
            "modified_at": _iso(self._started_at),
            "size": _model_size(name),
            "digest": _digest(name),
            "details": _details(name),
        }

    async def _tags(self, _request: web.Request) -> web.StreamResponse:
        return _json_response({"models": [self._model_entry(m) for m in self.settings.models]})

    async def _ps(self, _request: web.Request) -> web.StreamResponse:
        expires_at = _iso(datetime.now(UTC) + KEEP_ALIVE)
        models = [self._resident_entry(name, expires_at) for name in self.settings.resident]
        return _json_response({"models": models})

    def _resident_entry(self, name: str, expires_at: str) -> dict[str, Any]:
        canonical = normalize_model(name)
        return {
            "name": canonical,
            "model": canonical,
            "size": _model_size(name),
            "digest": _digest(name),
            "details": _details(name),
            "expires_at": expires_at,
            "size_vram": _model_size(name),
            "context_length": CONTEXT_LENGTH,
        }

    async def _sim_stats(self, _request: web.Request) -> web.StreamResponse:
        counters = {key: value for key, value in vars(self.stats).items() if key != "requests"}
        resident = [normalize_model(name) for name in self.settings.resident]
        return _json_response({**counters, "resident": resident})

    async def _show(self, request: web.Request) -> web.StreamResponse:
        name = _model_field(await _json_object(request), "model", "name")
        if not self._has_model(name):
            raise _ApiError(404, f"model '{name}' not found")
        family = _family(name)
        modelfile = f'# Modelfile generated by "ollama show"\nFROM {normalize_model(name)}\n'
        return _json_response(
            {
                "modelfile": modelfile,
                "parameters": "",
                "template": "",
                "details": _details(name),
                "model_info": {
                    "general.architecture": family,
                    f"{family}.context_length": CONTEXT_LENGTH,
                },
                "capabilities": _capabilities(name),
                "modified_at": _iso(self._started_at),
            }
        )

    # ---- model management

    async def _progress(
        self, request: web.Request, body: dict[str, Any], steps: list[dict[str, Any]]
    ) -> web.StreamResponse:
        """NDJSON progress steps (pull, push, create), or only the outcome when not streaming."""
        if not _flag(body.get("stream"), True):
            return _json_response(steps[-1])
        stream = _LazyStream(request, NDJSON)
        for step in steps[:-1]:
            await stream.send(_ndjson(step))
        return await stream.finish(_ndjson(steps[-1]))

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        name = _model_field(body, "model", "name")
        digest = f"sha256:{_digest(name)}"
        total = _model_size(name)
        layers = [
            {
                "status": f"pulling {digest[7:19]}",
                "digest": digest,
                "total": total,
                "completed": done,
            }
            for done in (0, total // 2, total)
        ]
        steps: list[dict[str, Any]] = [
            {"status": "pulling manifest"},
            *layers,
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        self._add_model(name)
        return await self._progress(request, body, steps)

    async def _push(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        name = _model_field(body, "model", "name")
        if not self._has_model(name):
            raise _ApiError(404, f"model '{name}' not found")
        digest = f"sha256:{_digest(name)}"
        total = _model_size(name)
        steps: list[dict[str, Any]] = [
            {"status": "retrieving manifest"},
            {
                "status": f"pushing {digest[7:19]}",
                "digest": digest,
                "total": total,
                "completed": total,
            },
            {"status": "pushing manifest"},
            {"status": "success"},
        ]
        return await self._progress(request, body, steps)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        name = _model_field(body, "model", "name")
        steps = [
            {"status": "reading model metadata"},
            {"status": "creating system layer"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        self._add_model(name)
        return await self._progress(request, body, steps)

    async def _copy(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str):
            raise _ApiError(400, "source and destination are required")
        if not self._has_model(source):
            raise _ApiError(404, f"model '{source}' not found")
        self._add_model(destination)
        return web.Response(status=200)

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        name = _model_field(await _json_object(request), "model", "name")
        if not self._has_model(name):
            raise _ApiError(404, f"model '{name}' not found")
        self._remove_model(name)
        return web.Response(status=200)

    async def _blob_exists(self, request: web.Request) -> web.StreamResponse:
        found = request.match_info["digest"] in self._blobs
        return web.Response(status=200 if found else 404)

    async def _blob_upload(self, request: web.Request) -> web.StreamResponse:
        self._blobs.add(request.match_info["digest"])
        return web.Response(status=201)


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's encoding_format "base64": little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# --------------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SimSettings()
    parser = argparse.ArgumentParser(
        prog="python -m proxy.simnode", description="Run simulated Ollama nodes."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, action="append", help="one node per --port (default: one, any port)"
    )
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--token-interval", type=float, default=defaults.token_interval)
    parser.add_argument("--first-token-delay", type=float, default=defaults.first_token_delay)
    parser.add_argument("--load-delay", type=float, default=defaults.load_delay)
    parser.add_argument("--num-parallel", type=int, default=defaults.num_parallel)
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue)
    parser.add_argument(
        "--max-loaded",
        type=int,
        default=defaults.max_loaded,
        help="models in memory at most, the least recently used evicted (0: no limit)",
    )
    parser.add_argument("--models", default=",".join(defaults.models), help="comma-separated")
    parser.add_argument("--resident", default="", help="comma-separated models already loaded")
    return parser.parse_args(argv)


def _split_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _settings_from_args(args: argparse.Namespace) -> SimSettings:
    return SimSettings(
        models=_split_names(args.models),
        resident=_split_names(args.resident),
        num_parallel=args.num_parallel,
        max_queue=args.max_queue,
        tokens=args.tokens,
        token_interval=args.token_interval,
        first_token_delay=args.first_token_delay,
        load_delay=args.load_delay,
        max_loaded=args.max_loaded,
        record_requests=False,  # a long benchmark would otherwise keep every body in memory
    )


async def _serve_until_signalled(host: str, ports: list[int], settings: SimSettings) -> None:
    nodes = [SimNode(copy.deepcopy(settings), name=f"sim{i}") for i in range(len(ports))]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        for node, port in zip(nodes, ports, strict=True):
            url = await node.start(host, port)
            print(f"sim node listening on {url}", flush=True)
        await stop.wait()
    finally:
        for node in nodes:
            await node.stop()


def _run(main_coroutine: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed: the simulator should cost benchmarks little CPU."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        asyncio.run(main_coroutine)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main_coroutine)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    _run(_serve_until_signalled(args.host, args.port or [0], _settings_from_args(args)))


if __name__ == "__main__":
    main()
