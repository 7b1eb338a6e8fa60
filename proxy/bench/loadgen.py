"""The load generator: ``python -m proxy.bench.loadgen LOAD_JSON`` prints one outcome as JSON.

It runs in a process of its own, so that its CPU is never counted as the proxy's, and it reads
the CPU time and memory of the processes it measures itself, at the exact start and end of the
measured phase. It must stay cheap on a 2-core machine that also runs the nodes and the proxy:
streams and embeddings go through ``rawhttp`` (lines counted in raw reads, never parsed as
JSON); only held streams, which are many but slow, use aiohttp.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
import time
from dataclasses import dataclass

import aiohttp

from .procstat import cpu_seconds, rss_bytes
from .rawhttp import Client
from .specs import (
    ChatLoad,
    ChatOutcome,
    EmbedLoad,
    EmbedOutcome,
    HoldLoad,
    HoldOutcome,
    Load,
    StreamLoad,
    StreamOutcome,
    decode_load,
    encode,
)

GENERATE = "/api/generate"
CHAT = "/api/chat"
EMBED = "/api/embed"
JSON_HEADERS = {"Content-Type": "application/json"}
# Errors a client sees when a server refuses, resets or stalls a connection.
CLIENT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
# A held stream asks for more tokens than any hold lasts: it ends only when released.
ENDLESS_TOKENS = 1_000_000


def generate_body(model: str, tokens: int) -> bytes:
    options = {"num_predict": tokens}
    return json.dumps({"model": model, "prompt": "hello", "options": options}).encode()


# --------------------------------------------------------------------------- closed and open loops


@dataclass
class _Sample:
    ok: bool
    lines: int
    ttfb: float = 0.0
    latency: float = 0.0


async def _post(
    client: Client, path: str, body: bytes, expected_lines: int | None, due: float = 0.0
) -> _Sample:
    """One request, timed from when it was written, or from ``due`` (a perf_counter time)."""
    try:
        response = await client.post(path, body)
    except (ConnectionError, OSError):
        return _Sample(ok=False, lines=0)
    complete = expected_lines is None or response.lines == expected_lines
    since = due or response.started
    return _Sample(
        response.status == 200 and complete,
        response.lines,
        response.first_byte - since,
        response.ended - since,
    )


async def _closed_loop(
    clients: list[Client],
    path: str,
    work: list[bytes],
    expected_lines: int | None,
    stagger: float = 0.0,
) -> list[_Sample]:
    """Every client sends the next body of ``work`` as soon as it is free; each body once.
    Client i starts ``stagger * i / len(clients)`` seconds after the first."""
    bodies = iter(work)  # shared by the clients
    samples: list[_Sample] = []

    async def run_client(client: Client, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        for body in bodies:
            samples.append(await _post(client, path, body, expected_lines))

    await asyncio.gather(
        *(run_client(client, stagger * i / len(clients)) for i, client in enumerate(clients))
    )
    return samples


async def _open_loop(
    load: StreamLoad, path: str, work: list[bytes], expected_lines: int | None
) -> list[_Sample]:
    """Each body of ``work`` sent at its arrival time, drawn from a Poisson process of
    ``load.rate`` a second (seeded: the same times through every front), whatever is still in
    flight. Each is timed from its arrival time, not from when it was written: a front that
    falls behind is charged for it (no coordinated omission). At most ``load.concurrency`` in
    flight; beyond that a request waits for a connection, its clock running."""
    gaps = random.Random(load.seed)
    arrivals = list(itertools.accumulate(gaps.expovariate(load.rate) for _ in work))
    gate, idle, opened = asyncio.Semaphore(load.concurrency), list[Client](), list[Client]()

    async def send(body: bytes, due: float) -> _Sample:
        await asyncio.sleep(due - time.perf_counter())
        async with gate:
            if not idle:
                opened.append(Client(load.urls[len(opened) % len(load.urls)]))
                idle.append(opened[-1])
            client = idle.pop()
            try:
                return await _post(client, path, body, expected_lines, due)
            finally:
                idle.append(client)

    started = time.perf_counter()
    tasks = [asyncio.create_task(send(b, started + t)) for b, t in zip(work, arrivals, strict=True)]
    try:
        await asyncio.wait(tasks, timeout=arrivals[-1] + load.time_limit if tasks else 0)
    finally:
        for task in tasks:
            task.cancel()  # past the time limit: these count as failed
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in opened:
            client.close()
    return [t.result() if not t.cancelled() else _Sample(ok=False, lines=0) for t in tasks]


async def _warm_and_measure(
    load: StreamLoad | EmbedLoad, path: str, work: list[bytes], expected_lines: int | None
) -> tuple[list[_Sample], float, float]:
    """One unmeasured request per client when asked (its connection opens, the front's upstream
    connections too), then the measured loop: its samples, wall seconds, and the CPU seconds of
    the watched processes."""
    clients = [Client(load.urls[i % len(load.urls)]) for i in range(load.concurrency)]
    try:
        if load.warmup:
            await _closed_loop(clients, path, work[:1] * len(clients), None)
        cpu_before, started = cpu_seconds(load.watch_pids), time.perf_counter()
        stagger = load.stagger if isinstance(load, StreamLoad) else 0.0
        if isinstance(load, StreamLoad) and load.rate > 0:
            samples = await _open_loop(load, path, work, expected_lines)
        else:
            samples = await _closed_loop(clients, path, work, expected_lines, stagger)
        wall, cpu = time.perf_counter() - started, cpu_seconds(load.watch_pids) - cpu_before
    finally:
        for client in clients:
            client.close()
    return samples, wall, cpu


# --------------------------------------------------------------------------- streams


async def run_streams(load: StreamLoad) -> StreamOutcome:
    rng = random.Random(load.seed)
    bodies = {model: generate_body(model, load.tokens) for model in load.models}
    # Drawn in advance, so that every front gets the same sequence of models.
    work = [bodies[rng.choice(load.models)] for _ in range(load.requests)]
    expected = load.tokens + 1  # one line per token, then the final one
    samples, wall, cpu = await _warm_and_measure(load, GENERATE, work, expected)
    good = [s for s in samples if s.ok]
    return StreamOutcome(
        requests=len(samples),
        errors=len(samples) - len(good),
        chunks=sum(s.lines for s in samples),
        cpu_seconds=cpu,
        wall_seconds=wall,
        ttfb=[s.ttfb for s in good],
        latency=[s.latency for s in good],
    )


# --------------------------------------------------------------------------- held streams


class _HoldTally:
    """Counts streams as they open or fail; ``settled`` is set once every stream has done so."""

    def __init__(self, streams: int) -> None:
        self.pending = streams
        self.settled = asyncio.Event()
        if streams == 0:
            self.settled.set()

    def settle(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.settled.set()


async def _hold_one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    gate: asyncio.Semaphore,
    tally: _HoldTally,
) -> None:
    """Open a stream and read it until cancelled; returning at all means it failed or ended."""
    resp: aiohttp.ClientResponse | None = None
    try:
        async with gate:
            try:
                resp = await session.post(url + GENERATE, data=body, headers=JSON_HEADERS)
                if resp.status != 200 or not await resp.content.readany():
                    return
            finally:
                tally.settle()  # opened or failed: the next stream may start opening
        while await resp.content.readany():
            pass  # a token now and then until the release
    except CLIENT_ERRORS:
        return
    finally:
        if resp is not None:
            resp.close()  # unread: closes the connection, as a departing client does


async def run_hold(load: HoldLoad, session: aiohttp.ClientSession) -> HoldOutcome:
    body = generate_body(load.model, ENDLESS_TOKENS)
    gate = asyncio.Semaphore(load.open_at_once)
    tally = _HoldTally(load.streams)
    rss_idle = rss_bytes(load.watch_pids)
    started = time.perf_counter()
    streams = [
        asyncio.create_task(_hold_one(session, load.urls[i % len(load.urls)], body, gate, tally))
        for i in range(load.streams)
    ]
    try:
        await tally.settled.wait()
        open_seconds = time.perf_counter() - started
        rss_held = rss_bytes(load.watch_pids)
        await asyncio.sleep(load.hold_seconds)
        held = sum(1 for stream in streams if not stream.done())
    finally:
        for stream in streams:
            stream.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    return HoldOutcome(held, load.streams - held, open_seconds, rss_idle, rss_held)


# --------------------------------------------------------------------------- embeddings


async def run_embed(load: EmbedLoad) -> EmbedOutcome:
    body = json.dumps({"model": load.model, "input": "hello"}).encode()
    samples, wall, cpu = await _warm_and_measure(load, EMBED, [body] * load.requests, None)
    return EmbedOutcome(len(samples), sum(not s.ok for s in samples), cpu, wall)


# --------------------------------------------------------------------------- conversations

FILLER = "and tell me more about the lighthouse keeper, the storm and the ship that came in. "


def user_message(chat: int, turn: int, chars: int) -> str:
    """A user message of ``chars`` characters, its own for each chat and turn from the start
    (so that chats share no more than the role of their first message)."""
    head = f"Chat {chat}, question {turn + 1}: "
    return (head + FILLER * (chars // len(FILLER) + 1))[: max(chars, len(head))]


async def _chat_turn(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[_Sample, str]:
    """One streamed turn: its sample (time to the first line, to the end) and the answer."""
    started, first, lines, done = time.perf_counter(), 0.0, 0, False
    parts: list[str] = []
    try:
        async with session.post(url + CHAT, data=body, headers=JSON_HEADERS) as resp:
            async for line in resp.content:
                first = first or time.perf_counter()
                chunk = json.loads(line)
                lines += 1
                parts.append(chunk.get("message", {}).get("content", ""))
                done = chunk.get("done") is True
            ok = resp.status == 200 and done
    except (*CLIENT_ERRORS, ValueError):  # ValueError: a line that is not JSON
        return _Sample(ok=False, lines=lines), ""
    ended = time.perf_counter()
    return _Sample(ok, lines, first - started, ended - started), "".join(parts)


async def _one_chat(
    session: aiohttp.ClientSession, load: ChatLoad, chat: int, samples: list[_Sample]
) -> None:
    """The chat's turns one after another, each resending the history; stops at a failure."""
    url = load.urls[chat % len(load.urls)]
    messages: list[dict[str, str]] = []
    options = {"num_predict": load.tokens}
    pauses = random.Random(load.seed * 1000 + chat)  # the same pauses through every front
    for turn in range(load.turns):
        if turn and load.pause > 0:
            await asyncio.sleep(pauses.uniform(0, load.pause))
        messages.append({"role": "user", "content": user_message(chat, turn, load.user_chars)})
        body = {"model": load.model, "messages": messages, "options": options}
        sample, answer = await _chat_turn(session, url, json.dumps(body).encode())
        samples.append(sample)
        if not sample.ok:
            return
        messages.append({"role": "assistant", "content": answer})


async def run_chats(load: ChatLoad) -> ChatOutcome:
    samples: list[_Sample] = []
    async with _session() as session:
        await asyncio.gather(
            *(_one_chat(session, load, chat, samples) for chat in range(load.chats))
        )
    good = [s for s in samples if s.ok]
    return ChatOutcome(
        requests=len(samples),
        errors=len(samples) - len(good),
        ttfb=[s.ttfb for s in good],
        latency=[s.latency for s in good],
    )


# --------------------------------------------------------------------------- entry point


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),  # every client gets its own connection
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def run(load: Load) -> StreamOutcome | HoldOutcome | EmbedOutcome | ChatOutcome:
    if isinstance(load, StreamLoad):
        return await run_streams(load)
    if isinstance(load, EmbedLoad):
        return await run_embed(load)
    if isinstance(load, ChatLoad):
        return await run_chats(load)
    async with _session() as session:
        return await run_hold(load, session)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    load = decode_load(args[0])
    try:
        import uvloop  # optional extra: a cheaper client leaves more CPU to what is measured
    except ImportError:
        outcome = asyncio.run(run(load))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            outcome = runner.run(run(load))
    print(encode(outcome), flush=True)


if __name__ == "__main__":
    main()
