"""What the load generator is asked to do, and what it reports: JSON across a process boundary.

The load generator runs in its own process (its CPU must never count as the proxy's), so a load
is described by plain data: the orchestrator encodes one of the loads below as JSON on the
command line, and the load generator prints one outcome as a JSON line on stdout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

Outcome = TypeVar("Outcome", "StreamOutcome", "HoldOutcome", "EmbedOutcome", "ChatOutcome")


@dataclass(frozen=True)
class StreamLoad:
    """A closed loop of streamed generations: ``concurrency`` clients share ``requests``; or,
    with a ``rate``, an open loop: each request sent when a seeded Poisson process says, up to
    ``concurrency`` in flight, its times counted from then (see ``loadgen._open_loop``)."""

    urls: list[str]  # client i talks to urls[i % len(urls)]
    concurrency: int  # clients of the closed loop; the open loop's connections at most
    requests: int  # measured generations in all, after the warm-up
    tokens: int  # per generation (Ollama's options.num_predict)
    models: list[str]  # each request names one, drawn with a seeded random generator
    watch_pids: list[int]  # processes whose CPU time is read around the measured phase
    warmup: bool = True  # one unmeasured generation per client first (connections, caches)
    seed: int = 1
    # Seconds over which the clients' first measured requests are spread (client i waits
    # i / concurrency of it): streams of equal length started together stay in step, and
    # every new request would arrive in a burst with all the others.
    stagger: float = 0.0
    rate: float = 0.0  # requests a second of the open loop; 0: a closed loop
    # Seconds the open loop waits after its last arrival; what has not ended by then failed.
    time_limit: float = 60.0
    kind: Literal["stream"] = "stream"


@dataclass(frozen=True)
class HoldLoad:
    """Open ``streams`` generations at once and keep them all open for ``hold_seconds``."""

    urls: list[str]
    streams: int
    open_at_once: int  # streams being opened at a time: a ramp, not a SYN flood
    hold_seconds: float
    model: str
    watch_pids: list[int]  # processes whose resident memory is read while the streams are held
    kind: Literal["hold"] = "hold"


@dataclass(frozen=True)
class EmbedLoad:
    """A closed loop of short non-streaming ``/api/embed`` requests."""

    urls: list[str]
    concurrency: int
    requests: int
    model: str
    watch_pids: list[int]
    warmup: bool = True
    kind: Literal["embed"] = "embed"


@dataclass(frozen=True)
class ChatLoad:
    """``chats`` conversations at once, each of ``turns`` streamed ``/api/chat`` requests: a
    turn resends the whole history (every user message and answer so far) plus a new user
    message of about ``user_chars`` characters, once the answer before it has ended (and a
    pause, when asked)."""

    urls: list[str]  # chat i talks to urls[i % len(urls)]
    chats: int
    turns: int
    tokens: int  # per answer
    user_chars: int
    model: str
    # Seconds a user takes before the next turn, drawn evenly from 0 to this (seeded): others'
    # turns arrive meanwhile. 0: the next turn as soon as the answer has ended.
    pause: float = 0.0
    seed: int = 1
    kind: Literal["chat"] = "chat"


Load = StreamLoad | HoldLoad | EmbedLoad | ChatLoad


@dataclass
class StreamOutcome:
    requests: int
    errors: int  # failed, or fewer lines than tokens + 1
    chunks: int  # NDJSON lines received: one per token, plus the final one
    cpu_seconds: float  # of watch_pids during the measured phase
    wall_seconds: float
    ttfb: list[float]  # seconds to the first body byte, successful requests only
    latency: list[float]  # seconds to the end of the body, successful requests only


def pooled(parts: list[StreamOutcome]) -> StreamOutcome:
    """Several runs of one load as one: counts and times added, samples put together."""
    return StreamOutcome(
        requests=sum(part.requests for part in parts),
        errors=sum(part.errors for part in parts),
        chunks=sum(part.chunks for part in parts),
        cpu_seconds=sum(part.cpu_seconds for part in parts),
        wall_seconds=sum(part.wall_seconds for part in parts),
        ttfb=[value for part in parts for value in part.ttfb],
        latency=[value for part in parts for value in part.latency],
    )


@dataclass
class HoldOutcome:
    held: int  # streams still open at the end of the hold
    errors: int  # streams that failed to open or ended before the release
    open_seconds: float  # time to open them all
    rss_idle_bytes: int  # of watch_pids before the first stream
    rss_held_bytes: int  # of watch_pids with every stream open


@dataclass
class EmbedOutcome:
    requests: int
    errors: int
    cpu_seconds: float
    wall_seconds: float


@dataclass
class ChatOutcome:
    requests: int  # turns sent, over every chat
    errors: int  # failed turns; a chat stops at its first
    ttfb: list[float]  # seconds to the first streamed line, successful turns only
    latency: list[float]  # seconds to the end of the answer, successful turns only


def encode(value: Load | StreamOutcome | HoldOutcome | EmbedOutcome | ChatOutcome) -> str:
    return json.dumps(asdict(value), separators=(",", ":"))


def decode_load(text: str) -> Load:
    data: dict[str, Any] = json.loads(text)
    kinds: dict[str, type[Load]] = {
        "stream": StreamLoad,
        "hold": HoldLoad,
        "embed": EmbedLoad,
        "chat": ChatLoad,
    }
    return kinds[data["kind"]](**data)


def decode_outcome(text: str, kind: type[Outcome]) -> Outcome:
    return kind(**json.loads(text))
