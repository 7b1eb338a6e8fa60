"""The tables the benchmark prints, and the machine they were measured on."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from .costs import CostRow, unequal_clients
from .procstat import CLOCK_TICKS
from .scale import CHAT_MODEL, OTHER_CHAT_MODEL, Scale
from .scenarios import Column, Results, SchedulingRow
from .stacks import BARE_RELAY

NONE = "-"
UNMEASURED = "n/a"  # measured, but too little of it to be a figure
MB = 1024 * 1024
# CPU time is read in clock ticks (10 ms at Linux's usual 100 Hz): fewer than this many and
# one tick more or less would change the figure by more than 5 %.
MIN_CPU_TICKS = 20


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the nearest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def render(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _number(value: float | None, digits: int = 1) -> str:
    if value is None:  # nothing measured
        return NONE
    if value != value:  # NaN: too little measured (a CPU time of a few clock ticks)
        return UNMEASURED
    if round(value, digits) == 0:
        value = 0.0  # not "-0.00" for a difference within rounding
    return f"{value:,.{digits}f}"


# --------------------------------------------------------------------------- the relay table

Figure = Callable[[Column], float | None]


def _cpu_per_chunk_us(c: Column) -> float | None:
    if not c.watched or c.stream is None or not c.stream.chunks:
        return None
    if not measurable_cpu(c.stream.cpu_seconds):
        return float("nan")
    return c.stream.cpu_seconds / c.stream.chunks * 1e6


def measurable_cpu(seconds: float) -> bool:
    """Enough clock ticks of CPU time for a figure (a smoke run's few streams have none)."""
    return seconds * CLOCK_TICKS >= MIN_CPU_TICKS


def _ttfb_ms(q: float, *, light: bool = False) -> Figure:
    """A percentile of time to first byte: under the full load, or the light one's."""

    def figure(c: Column) -> float | None:
        outcome = c.latency if light else c.stream
        if outcome is None or not outcome.ttfb:
            return None
        return percentile(outcome.ttfb, q) * 1000

    return figure


def _held(c: Column) -> float | None:
    return None if c.hold is None else c.hold.held


def _open_seconds(c: Column) -> float | None:
    return None if c.hold is None else c.hold.open_seconds


def _rss_mb(c: Column) -> float | None:
    return c.hold.rss_held_bytes / MB if c.watched and c.hold is not None else None


def _rss_idle_mb(c: Column) -> float | None:
    return c.hold.rss_idle_bytes / MB if c.watched and c.hold is not None else None


def _embed_wall_rate(c: Column) -> float | None:
    return c.embed.requests / c.embed.wall_seconds if c.embed else None


def _embed_rate_per_core(c: Column) -> float | None:
    if not c.watched or c.embed is None:
        return None
    if not measurable_cpu(c.embed.cpu_seconds):
        return float("nan")
    return c.embed.requests / c.embed.cpu_seconds


def _errors(c: Column) -> str:
    streams = [part.errors for part in (c.stream, c.latency) if part is not None]
    counts = [sum(streams) if streams else None] + [
        None if part is None else part.errors for part in (c.hold, c.embed)
    ]
    return " / ".join(NONE if count is None else str(count) for count in counts)


def _ratio(columns: dict[str, Column], figure: Figure, front: str = "proxy") -> str:
    if front not in columns or "nginx" not in columns:
        return NONE
    value, nginx = figure(columns[front]), figure(columns["nginx"])
    if value is None or nginx is None or not nginx:
        return NONE
    if value != value or nginx != nginx:
        return UNMEASURED
    return f"{value / nginx:.2f}"


def _added_to_direct(figure: Figure, columns: dict[str, Column]) -> Figure:
    """The figure minus direct access's, for every front but direct itself."""

    def added(c: Column) -> float | None:
        direct = columns.get("direct")
        value = figure(c)
        base = None if direct is None or c is direct else figure(direct)
        return None if value is None or base is None else value - base

    return added


def error_count(results: Results) -> int:
    """Failed requests in every scenario: a benchmark with failures measured something else."""
    relay = sum(
        part.errors
        for column in results.relay.values()
        for part in (column.stream, column.latency, column.hold, column.embed)
        if part is not None
    )
    costs = sum(row.errors for rows in results.costs.values() for row in rows.values())
    return relay + costs + sum(row.outcome.errors for row in results.scheduling.values())


def _relay_figures(columns: dict[str, Column], scale: Scale) -> list[tuple[str, Figure, int, bool]]:
    """The rows of the relay table: label, figure, digits shown, and whether a ratio is wanted."""
    loads = [(f"{scale.streams} streams", False)]
    if scale.latency_streams > 0:
        loads.append((f"{scale.latency_streams} streams", True))
    ttfb: list[tuple[str, Figure, int, bool]] = []
    for load, light in loads:
        p50, p99 = _ttfb_ms(50, light=light), _ttfb_ms(99, light=light)
        ttfb += [
            (f"time to first byte p50 (ms), {load}", p50, 2, False),
            (f"time to first byte p99 (ms), {load}", p99, 2, False),
            (f"added TTFB vs direct p50 (ms), {load}", _added_to_direct(p50, columns), 2, False),
            (f"added TTFB vs direct p99 (ms), {load}", _added_to_direct(p99, columns), 2, False),
        ]
    return [
        ("CPU per streamed chunk (us)", _cpu_per_chunk_us, 2, True),
        *ttfb,
        (f"streams held (of {scale.hold_streams})", _held, 0, False),
        ("time to open them (s)", _open_seconds, 1, False),
        ("RSS idle (MB)", _rss_idle_mb, 1, False),
        (f"RSS holding {scale.hold_streams} streams (MB)", _rss_mb, 1, True),
        ("embed req/s (wall clock)", _embed_wall_rate, 0, False),
        ("embed req/s per core (req / CPU s)", _embed_rate_per_core, 0, True),
    ]


def relay_table(results: Results, scale: Scale) -> str:
    columns = results.relay
    names = list(columns)
    # Ratios to nginx: the proxy's, and the bare relay's when it ran (--floor).
    compared = [f for f in ("proxy", BARE_RELAY) if f in columns] if "nginx" in columns else []
    rows = []
    for label, figure, digits, ratio in _relay_figures(columns, scale):
        row = [label, *(_number(figure(columns[name]), digits) for name in names)]
        rows.append(row + [_ratio(columns, figure, f) if ratio else NONE for f in compared])
    errors = ["errors (stream / hold / embed)", *(_errors(columns[name]) for name in names)]
    rows.append(errors + [NONE for _ in compared])
    headers = ["relay", *names, *(f"{f.split()[0]}/nginx" for f in compared)]
    return f"{_relay_title(scale)}\n{render(headers, rows)}"


def _relay_title(scale: Scale) -> str:
    return (
        f"Relay: {scale.nodes} simulated nodes; {scale.streams} concurrent streams of "
        f"{scale.tokens} tokens at {scale.token_interval * 1000:g} ms per token "
        f"({scale.stream_requests} streams measured){_light_load(scale)}; "
        f"{scale.hold_streams} streams held for "
        f"{scale.hold_seconds:g} s; {scale.embed_requests} /api/embed requests from "
        f"{scale.embed_clients} clients."
    )


def _light_load(scale: Scale) -> str:
    if scale.latency_streams <= 0:
        return ""
    return (
        f", and time to first byte at {scale.latency_streams} concurrent streams of "
        f"{scale.latency_tokens} tokens ({scale.latency_requests} measured)"
    )


# --------------------------------------------------------------------------- scheduling


def _scheduling_row(label: str, row: SchedulingRow) -> list[str]:
    outcome = row.outcome
    mean = sum(outcome.latency) / len(outcome.latency) if outcome.latency else None
    return [
        label,
        str(outcome.requests),
        _number(mean, 3),
        _number(percentile(outcome.latency, 99) if outcome.latency else None, 3),
        str(row.cold_loads),
        str(outcome.errors),
    ]


def _models_in_memory(max_loaded: int) -> str:
    if max_loaded <= 0:
        return "no limit on models in memory"
    return f"memory for {max_loaded} model{'s' if max_loaded > 1 else ''} each"


def scheduling_table(results: Results, scale: Scale) -> str:
    title = (
        f"Scheduling: a fast node ({scale.fast_interval * 1000:g} ms per token, holds "
        f"{CHAT_MODEL}) and a slow one ({scale.slow_interval * 1000:g} ms per token, holds "
        f"{OTHER_CHAT_MODEL}), {scale.sched_parallel} parallel each, "
        f"{_models_in_memory(scale.sched_max_loaded)}, "
        f"cold load {scale.load_delay:g} s; {scale.sched_clients} clients, "
        f"{scale.sched_requests} streams of {scale.sched_tokens} tokens, models mixed at random."
    )
    headers = ["scheduling", "requests", "mean (s)", "p99 (s)", "cold loads", "errors"]
    rows = [_scheduling_row(label, row) for label, row in results.scheduling.items()]
    return f"{title}\n{render(headers, rows)}"


# --------------------------------------------------------------------------- issue 16's

BASELINE = "nginx least_conn"  # what the targets are ratios to


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _p99(values: list[float]) -> float | None:
    return percentile(values, 99) if values else None


def _cost_figures(row: CostRow) -> list[float | None]:
    """Mean and p99 latency, mean and p99 time to first token: the columns with a ratio."""
    return [_mean(row.latency), _p99(row.latency), _mean(row.ttfb), _p99(row.ttfb)]


def _cache_share(row: CostRow) -> str:
    prompt = row.cached_chars + row.computed_chars
    return f"{row.cached_chars / prompt:.0%}" if prompt else NONE


def _cost_row(label: str, row: CostRow, chats: bool) -> list[str]:
    cells = [label, str(row.requests), *(_number(v, 3) for v in _cost_figures(row))]
    cells += ["/".join(str(n) for n in row.cold_loads), str(row.errors)]
    if chats:
        cells += [_cache_share(row), f"{row.changed_node} of {row.follow_ups}"]
    return cells


def _ratio_row(rows: dict[str, CostRow], front: str, width: int) -> list[str] | None:
    """The front's figures ÷ nginx least_conn's, in the same run."""
    if front not in rows or BASELINE not in rows:
        return None
    pairs = zip(_cost_figures(rows[front]), _cost_figures(rows[BASELINE]), strict=True)
    ratios = [NONE if a is None or not b else f"{a / b:.2f}" for a, b in pairs]
    cells = [f"{front} / least_conn", NONE, *ratios]
    return cells + [NONE] * (width - len(cells))


def _cost_title(name: str, scale: Scale) -> str:
    if name.startswith("chats"):
        return _chats_title(scale, scale.chat_pause if name == "chats-paused" else 0.0)
    if name.startswith("unequal"):
        return _unequal_title(name, scale)
    if name == "idle":
        return (
            f"Idle capacity: one node holds {CHAT_MODEL}, {scale.idle_nodes - 1} idle ones "
            f"have it on disk (cold load {scale.idle_load_delay:g} s); "
            f"{scale.idle_parallel} parallel each, {scale.idle_interval * 1000:g} ms per token; "
            f"{scale.idle_clients} clients, {scale.idle_requests} streams of "
            f"{scale.idle_tokens} tokens. Cold loads per node, the warm one first."
        )
    return f"Unknown scenario {name}"


def _unequal_title(name: str, scale: Scale) -> str:
    speeds = ", ".join(f"{interval * 1000:g}" for interval in scale.unequal_intervals)
    slots = scale.unequal_parallel * len(scale.unequal_intervals)
    load = f"{unequal_clients(name, scale)} clients for their {slots} slots"
    if name == "unequal-open":
        load = (
            f"Poisson arrivals at {scale.unequal_open_rate:g} a second whatever is in flight "
            f"(at most {scale.unequal_open_in_flight}), times from each one's arrival"
        )
    return (
        f"Unequal nodes: {len(scale.unequal_intervals)} nodes at {speeds} ms per token, "
        f"{scale.unequal_parallel} parallel each, {CHAT_MODEL} in memory on all; "
        f"{load}, {scale.unequal_requests} streams of {scale.unequal_tokens} tokens."
    )


def _chats_title(scale: Scale, pause: float) -> str:
    when = (
        f"after a user's pause of 0 to {pause:g} s"
        if pause > 0
        else "as soon as the answer before has ended"
    )
    return (
        f"Conversations: {scale.chats} chats of {scale.chat_turns} turns at once over "
        f"{scale.chat_nodes} nodes ({scale.chat_parallel} parallel each, "
        f"{scale.chat_interval * 1000:g} ms per token); each turn resends the history and a new "
        f"user message of {scale.chat_user_chars} characters, {when}; answers of "
        f"{scale.chat_tokens} tokens; prefill {scale.prefill_per_token * 1000:g} ms per "
        "uncached token (4 characters). TTFT: time to the first streamed line."
    )


def costs_tables(results: Results, scale: Scale) -> list[str]:
    """One table per scenario of issue 16 that ran."""
    tables = []
    for name, rows in results.costs.items():
        chats = name.startswith("chats")
        headers = ["front", "requests", "mean (s)", "p99 (s)", "TTFT mean (s)", "TTFT p99 (s)"]
        headers += ["cold loads", "errors"] + (["from cache", "changed node"] if chats else [])
        lines = [_cost_row(label, row, chats) for label, row in rows.items()]
        if (ratio := _ratio_row(rows, "proxy", len(headers))) is not None:
            lines.append(ratio)
        tables.append(f"{_cost_title(name, scale)}\n{render(headers, lines)}")
    return tables


# --------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_summary(nginx: str | None) -> str:
    return (
        f"Machine: {os.cpu_count()} CPUs ({_cpu_model()}), Linux {platform.release()}; "
        f"Python {platform.python_version()}, aiohttp {_version('aiohttp')}, "
        f"uvloop {_version('uvloop')}, {nginx or 'nginx not installed'}"
    )
