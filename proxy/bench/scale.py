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
    # Issue 16. Unequal nodes: one model in memory on each, at these speeds, with a closed
    # loop of clients for three quarters of their slots.
    unequal_intervals: tuple[float, ...] = (0.002, 0.006, 0.025)
    unequal_parallel: int = 4
    unequal_clients: int = 9
    unequal_light_clients: int = 6  # "unequal-light": half the slots
    unequal_heavy_clients: int = 24  # "unequal-heavy": twice the slots
    unequal_requests: int = 300
    unequal_tokens: int = 40
    # "unequal-open": the same streams arriving at this rate (Poisson) whatever the latency:
    # half the fleet's capacity (4 / 0.08 + 4 / 0.24 + 4 / 1.0 = 71 a second), 72 % of the
    # fast node's alone (docs/performance.md, "After the simulated node measured its own speed").
    unequal_open_rate: float = 36.0
    unequal_open_in_flight: int = 200  # at most; beyond, an arrival waits, its clock running
    # Idle capacity: the first node holds the model, the others load it in idle_load_delay;
    # a closed loop of clients for every slot of the fleet (the warm node's alone queue).
    idle_nodes: int = 3
    idle_parallel: int = 4
    idle_clients: int = 12
    idle_requests: int = 96
    idle_tokens: int = 40
    idle_interval: float = 0.005
    idle_load_delay: float = 0.3
    # Conversations: chats of so many turns at once, each resending its history: short
    # questions, long answers, as in a chat.
    chat_nodes: int = 3
    chat_parallel: int = 4  # a slot for every chat, so that each could keep its cache
    chats: int = 12
    chat_turns: int = 6
    chat_tokens: int = 150  # per answer, about 800 characters
    chat_user_chars: int = 120  # per user message
    chat_interval: float = 0.005
    chat_pause: float = 1.0  # at most, before each next turn in "chats-paused" (ChatLoad.pause)
    # Prefill per uncached token (4 characters): the last turn's history (about 4,800
    # characters) costs about 1 s uncached, its new user message about 25 ms.
    prefill_per_token: float = 0.0008
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
    unequal_intervals=(0.001, 0.002, 0.005),
    unequal_parallel=2,
    unequal_clients=4,
    unequal_light_clients=2,
    unequal_heavy_clients=6,
    unequal_requests=12,
    unequal_tokens=5,
    unequal_open_rate=200.0,
    unequal_open_in_flight=20,
    idle_parallel=2,
    idle_clients=6,
    idle_requests=12,
    idle_tokens=5,
    idle_interval=0.002,
    idle_load_delay=0.05,
    chats=3,
    chat_turns=2,
    chat_tokens=5,
    chat_user_chars=40,
    chat_interval=0.001,
    chat_pause=0.01,
    prefill_per_token=0.0005,
    load_timeout=30.0,
)
