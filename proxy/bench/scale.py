"""How big each scenario is: the full run's defaults, and the seconds-long smoke run."""

from __future__ import annotations

from dataclasses import dataclass

# Models the simulated nodes hold (all are on their "disk" by default).
CHAT_MODEL = "llama3.2:latest"
OTHER_CHAT_MODEL = "qwen2.5:0.5b"
EMBED_MODEL = "nomic-embed-text:latest"


@dataclass(frozen=True)
class Scale:
    # Relay: streams through each front, as in issue 7.
    nodes: int = 2
    streams: int = 100  # concurrent clients, each streaming one generation after another
    stream_requests: int = 2000  # generations measured per front
    tokens: int = 100
    token_interval: float = 0.005  # seconds between tokens
    # Time to first byte at a light load too, where a busy machine cannot hide the front's own
    # cost: few streams, short ones so that many are measured in seconds (0 streams: skipped).
    latency_streams: int = 10
    latency_requests: int = 1500
    latency_tokens: int = 10
    # Both stream loads are measured in rounds that take the fronts in turn (see
    # ``scenarios._interleaved``), so that a slow spell of a shared machine hits every front.
    rounds: int = 3  # with 3 fronts, each is measured once in each place of the order
    # The clients' first measured streams spread over this many streams' length (0: all at once,
    # in step ever after; see ``StreamLoad.stagger``).
    stagger: float = 1.0
    # Held streams: open this many at once, then hold them.
    hold_streams: int = 5000
    hold_seconds: float = 3.0
    hold_token_interval: float = 1.0  # live but slow streams, like a long generation
    # Short non-streaming requests.
    embed_clients: int = 32
    embed_requests: int = 10000  # enough CPU time for nginx to span many 10 ms clock ticks
    # Scheduling: a fast node and a slow one, each holding a different model.
    sched_clients: int = 16
    sched_requests: int = 160
    sched_tokens: int = 40
    fast_interval: float = 0.005
    slow_interval: float = 0.02
    sched_parallel: int = 4  # each node's OLLAMA_NUM_PARALLEL, and the proxy's cap
    load_delay: float = 1.5  # a cold load of the model a node does not hold
    # Each node's OLLAMA_MAX_LOADED_MODELS: a GPU holds one large model, so serving the other
    # evicts it, and each switch back costs another cold load.
    sched_max_loaded: int = 1
    # Bounds.
    load_timeout: float = 600.0  # seconds one load-generator run may take


SMOKE = Scale(
    streams=4,
    stream_requests=8,
    tokens=5,
    token_interval=0.001,
    latency_streams=2,
    latency_requests=6,
    latency_tokens=3,
    rounds=2,
    hold_streams=20,
    hold_seconds=0.1,
    embed_clients=2,
    embed_requests=20,
    sched_clients=2,
    sched_requests=6,
    sched_tokens=3,
    fast_interval=0.001,
    slow_interval=0.003,
    load_delay=0.1,
    load_timeout=30.0,
)
