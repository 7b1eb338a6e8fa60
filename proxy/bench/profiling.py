"""``--profile``: where the proxy's CPU goes while it relays streams, sampled by py-spy.

py-spy samples the running proxy from outside (``--nonblocking``: it never pauses it), so the
proxy runs its normal code. It sees Python frames only: time spent in C below the last Python
frame (uvloop's socket reads and writes, aiohttp's C HTTP parser) counts as the self time of that
frame, and time in uvloop's own loop, with no Python frame above it, as that of
``run (asyncio/runners.py)``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .processes import BenchError, Processes
from .report import render
from .scale import CHAT_MODEL, EMBED_MODEL, Scale
from .scenarios import Log
from .specs import StreamLoad, StreamOutcome
from .stacks import SimNodeSpec, run_load, start_proxy, start_sims

SAMPLES_PER_SECOND = 250
TOP = 20
ATTACH_SECONDS = 1.0  # py-spy needs a moment to attach before the load starts
# Long paths to a library or to the project, shortened to what follows them.
_PATH_PREFIX = re.compile(r"\((?:[^()]*/(?:site-packages|python3\.\d+)/|[^()]*/(?=proxy/))")


@dataclass
class Hotspot:
    function: str  # "name (file:line)", the line being the function's first
    self_share: float  # of all samples, with this function the innermost Python frame
    total_share: float  # of all samples, with this function anywhere on the stack


def hotspots(collapsed: str, top: int = TOP) -> tuple[list[Hotspot], list[Hotspot]]:
    """Top functions, and top files, by self time, from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    files: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count, frames = int(count_text), [_shorten(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        files[_file_of(frames[-1])] += count
        for frame in set(frames):
            anywhere[frame] += count
    if not samples:
        return [], []
    by_function = [Hotspot(f, n / samples, anywhere[f] / samples) for f, n in own.most_common(top)]
    by_file = [Hotspot(f, n / samples, n / samples) for f, n in files.most_common(top)]
    return by_function, by_file


def _shorten(frame: str) -> str:
    return _PATH_PREFIX.sub("(", frame)


def _file_of(frame: str) -> str:
    location = frame.rpartition("(")[2].rstrip(")")
    return location.rpartition(":")[0] or location


def hotspot_table(title: str, spots: list[Hotspot], *, total: bool = True) -> str:
    headers = [title, "self %"] + (["total %"] if total else [])
    rows = [
        [spot.function, f"{spot.self_share * 100:.1f}"]
        + ([f"{spot.total_share * 100:.1f}"] if total else [])
        for spot in spots
    ]
    return render(headers, rows)


async def profile_streaming(workdir: Path, scale: Scale, log: Log) -> str:
    """Run the relay's streaming load through a proxy sampled by py-spy; the report as text."""
    spy = shutil.which("py-spy")
    if spy is None:
        return "py-spy not installed (pip install py-spy): profile skipped"
    cap = scale.streams + scale.embed_clients
    node = SimNodeSpec(scale.token_interval, cap, (CHAT_MODEL, EMBED_MODEL))
    samples_file = workdir / "py-spy.txt"
    async with Processes(workdir) as procs:
        urls = await start_sims(procs, [node] * scale.nodes)
        proxy = await start_proxy(procs, workdir, urls, [cap] * len(urls))
        argv = [spy, "record", "--pid", str(proxy.pids[0]), "--format", "raw", "--function"]
        argv += ["--nonblocking", "--rate", str(SAMPLES_PER_SECOND), "-o", str(samples_file)]
        recorder = await procs.start("py-spy", argv)
        await asyncio.sleep(ATTACH_SECONDS)
        log(f"{scale.streams} concurrent streams through the proxy, sampled by py-spy")
        load = StreamLoad(
            proxy.urls, scale.streams, scale.stream_requests, scale.tokens, [CHAT_MODEL], proxy.pids
        )
        outcome = await run_load(procs, load, StreamOutcome, scale.load_timeout)
        await procs.stop(recorder, signal.SIGINT)  # py-spy writes its file when interrupted
    if not samples_file.exists():
        raise BenchError(f"py-spy wrote no samples:\n{recorder.log_tail()}")
    return _profile_report(outcome, samples_file.read_text())


def _profile_report(outcome: StreamOutcome, collapsed: str) -> str:
    by_function, by_file = hotspots(collapsed)
    per_chunk = outcome.cpu_seconds / outcome.chunks * 1e6 if outcome.chunks else float("nan")
    return "\n\n".join(
        [
            f"Profile of the proxy relaying {outcome.requests} streams ({outcome.chunks} chunks, "
            f"{outcome.errors} errors): {per_chunk:.2f} us of CPU per chunk while sampled.",
            hotspot_table("function (self time = innermost Python frame)", by_function),
            hotspot_table("file", by_file, total=False),
        ]
    )
