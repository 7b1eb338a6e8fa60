"""What a simulated node is told (SimSettings) and what it reports (SimRequest, SimStats)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_DIED_MESSAGE = "llama runner process has terminated: exit status 2"
FAULTS = frozenset({"none", "refuse", "error500", "stall", "die", "busy"})
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text and BPE vocabularies
DEFAULT_MODELS = ("llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest")


@dataclass
class SimSettings:
    """How a node behaves. Mutable: a test may change any field while the node runs."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))  # on disk
    resident: list[str] = field(default_factory=list)  # in memory; others pay load_delay
    # Times each model (by its normalised name) was created anew: its listed digest changes.
    revisions: dict[str, int] = field(default_factory=dict)
    num_parallel: int = 4  # generations at once, node-wide (like OLLAMA_NUM_PARALLEL)
    max_queue: int = 512  # requests waiting for a slot; more get 503 busy
    tokens: int = 8  # tokens per generation unless the request asks for a number
    token_interval: float = 0.005  # seconds between streamed tokens
    first_token_delay: float = 0.0  # prompt evaluation time, whatever the prompt
    # Seconds per prompt token that a slot's KV cache does not hold (a token being
    # CHARS_PER_TOKEN characters of the rendered prompt), before the first token and on top of
    # first_token_delay: a chat turn is cheap on the slot that served the turn before.
    prefill_per_token: float = 0.0
    load_delay: float = 0.0  # cold load of a model that is not resident
    pull_interval: float = 0.0  # seconds between the progress lines of a pull, push or create
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
    model: str | None  # the body's "model" (or legacy "name") as Ollama reads it, if any


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
    # Characters of rendered prompts (see plans.rendered) found in a slot's KV cache, and
    # prefilled: the share a scheduler with conversation affinity saves.
    prompt_cached_total: int = 0
    prompt_computed_total: int = 0
    # Chat requests served, by conversation and length ("1a2b3c4d/3": plans.conversation_key),
    # so that a harness can tell which node served each turn of a chat.
    chat_turns: dict[str, int] = field(default_factory=dict)


class LiveNode(Protocol):
    """The node as its parts see it. They read both attributes on every use, never keep
    them: a test may change the settings, and reset_stats() replaces the stats."""

    settings: SimSettings
    stats: SimStats

    def changed(self) -> None:
        """Wake every wait_for(): to be called after each change of stats or settings."""
