"""The benchmark's smoke run, so that ``python -m proxy.bench`` never rots.

It asserts nothing about speed: only that every scenario runs end to end, with no failed
request, and prints its tables. The parsing helpers are checked on their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.bench import cores, fairness
from proxy.bench.costs import CostRow, changed_turns, cost_row
from proxy.bench.loadgen import run_chats, run_streams, user_message
from proxy.bench.profiling import hotspots
from proxy.bench.rawhttp import CHUNKED_END, _Framing
from proxy.bench.report import costs_tables, percentile, relay_table, render
from proxy.bench.scale import SMOKE, Scale
from proxy.bench.scenarios import Column, Results, _latency_load, _shares, _stream_load
from proxy.bench.specs import (
    ChatLoad,
    ChatOutcome,
    EmbedOutcome,
    StreamLoad,
    StreamOutcome,
    pooled,
)
from proxy.bench.stacks import Front
from proxy.sim import SimNode, SimSettings

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SECONDS = 45  # a smoke run takes about 8 s on 2 cores; leave room for a busy machine


def smoke_run(*options: str) -> str:
    """``python -m proxy.bench --smoke OPTIONS``: what it printed, once it has succeeded."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy.bench", "--smoke", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.timeout(SMOKE_SECONDS + 15)
def test_smoke_run_prints_both_tables() -> None:
    out = smoke_run("--floor", "--only", "stream,embed,hold,sched")
    headers = ("Machine:", "relay", "direct", "proxy", "bare relay", "CPU per streamed chunk")
    for header in (*headers, "scheduling"):
        assert header in out, out
    assert "errors (stream / hold / embed)" in out
    assert "Cores" in out  # pinned, or why not
    for load in (SMOKE.streams, SMOKE.latency_streams):  # the full load's and the light one's
        assert f"added TTFB vs direct p99 (ms), {load} streams" in out, out
    assert "nginx" in out  # a column when installed, else "nginx not installed, skipped"


@pytest.mark.timeout(SMOKE_SECONDS + 15)
def test_compare_runs_two_checkouts_side_by_side() -> None:
    out = smoke_run("--compare", "HEAD")
    for row in ("Compare: this checkout (A) against HEAD (B)", "streams of", "/api/embed"):
        assert row in out, out

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    head = git("rev-parse", "--short", "HEAD").strip()
    ours = [
        line
        for line in git("worktree", "list").splitlines()
        if "compare-checkout" in line and f" {head} " in line
    ]
    assert ours == []  # the checkout is gone again (others' runs may hold checkouts of theirs)


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0


def test_render_aligns_columns() -> None:
    table = render(["name", "value"], [["a", "1"], ["longer", "22"]])
    assert table.splitlines() == [
        "name    value",
        "------  -----",
        "a           1",
        "longer     22",
    ]


def test_chunked_framing_ends_only_at_the_last_chunk() -> None:
    framing = _Framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")
    assert not framing.feed(b'5\r\n{"a"}\n\r\n')
    assert not framing.feed(b"0\r\n")  # the end may arrive in pieces
    assert framing.feed(b"\r\n")
    assert CHUNKED_END.endswith(b"0\r\n\r\n")


def test_length_framing_and_connection_close() -> None:
    framing = _Framing(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close"
    )
    assert (framing.status, framing.keep_alive) == (503, False)
    assert not framing.feed(b"ab")
    assert framing.feed(b"cd")


def test_hotspots_count_self_and_total_time() -> None:
    collapsed = (
        "main (/x/proxy/app.py:1);relay (/x/proxy/forward.py:9) 3\nmain (/x/proxy/app.py:1) 1\n"
    )
    by_function, by_file = hotspots(collapsed)
    assert by_function[0].function == "relay (proxy/forward.py:9)"
    assert (by_function[0].self_share, by_function[0].total_share) == (0.75, 0.75)
    assert by_function[1].total_share == 1.0
    assert by_file[0].function == "proxy/forward.py"


def test_the_front_gets_the_last_cpu_and_the_rest_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda _pid, _cpus: None, raising=False)
    chosen = cores.choose()
    assert (chosen.front, chosen.others) == ({3}, {0, 1, 2})
    assert "the front alone on CPU 3" in chosen.summary()
    assert not cores.choose(pin=False).pinned
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {5}, raising=False)
    assert cores.choose().summary() == "Cores: shared by every process (only 1 CPU)"


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs sched_setaffinity and 2 CPUs",
)
def test_pinned_moves_processes_for_the_block_only() -> None:
    chosen = cores.choose()
    everywhere = chosen.front | chosen.others
    front = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with cores.pinned(chosen, [front.pid], [other.pid]):
            assert os.sched_getaffinity(front.pid) == chosen.front
            assert os.sched_getaffinity(other.pid) == chosen.others
            assert os.sched_getaffinity(0) == chosen.others  # so what it starts meanwhile too
        for pid in (front.pid, other.pid, 0):
            assert os.sched_getaffinity(pid) == everywhere
    finally:
        for child in (front, other):
            child.kill()
            child.wait()


def test_rounds_share_the_streams_and_pool_them() -> None:
    assert _shares(2000, 4) == [500] * 4
    assert _shares(10, 4) == [3, 3, 2, 2]
    assert _shares(2, 4) == [1, 1]
    parts = [
        StreamOutcome(2, 0, 10, 0.5, 1.0, [0.1, 0.2], [1.0, 1.1]),
        StreamOutcome(1, 1, 3, 0.25, 2.0, [], []),
    ]
    assert pooled(parts) == StreamOutcome(3, 1, 13, 0.75, 3.0, [0.1, 0.2], [1.0, 1.1])


def test_clients_start_spread_over_one_stream() -> None:
    front, scale = Front("direct", ["http://127.0.0.1:1"]), Scale()
    assert _stream_load(front, scale, 10).stagger == pytest.approx(0.5)  # 100 tokens at 5 ms
    assert _latency_load(front, scale, 10).stagger == pytest.approx(0.05)  # 10 tokens


def test_a_cpu_time_of_a_few_clock_ticks_is_no_figure() -> None:
    """A smoke run's streams take less CPU than the clock's tick: n/a, not 0.00."""
    stream = StreamOutcome(8, 0, 48, cpu_seconds=0.0, wall_seconds=0.1, ttfb=[0.01], latency=[])
    embed = EmbedOutcome(20, 0, cpu_seconds=0.01, wall_seconds=0.1)
    columns = {f: Column(True, stream=stream, embed=embed) for f in ("proxy", "nginx")}
    table = relay_table(Results(relay=columns), SMOKE)
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert rows["CPU per streamed chunk (us)"].split()[-3:] == ["n/a"] * 3, table
    assert rows["embed req/s per core (req / CPU s)"].split()[-3:] == ["n/a"] * 3, table
    assert " 0.00 " not in table + " "


async def test_fairness_run_on_real_timers_puts_b_ahead_of_the_backlog() -> None:
    fair = await fairness.run(fair=True, service=0.003, backlog=40, sends=4)
    fifo = await fairness.run(fair=False, service=0.003, backlog=40, sends=4)
    assert max(fair) < min(fifo)


# --------------------------------------------------------------------------- issue 16's scenarios


@pytest.mark.timeout(SMOKE_SECONDS + 15)
def test_smoke_run_of_the_cost_scenarios_prints_their_tables() -> None:
    out = smoke_run("--only", "unequal,unequal-open,idle,chats,chats-paused")
    titles = ("Unequal nodes:", "Poisson arrivals", "Idle capacity:", "Conversations:")
    for title in (*titles, "after a user's pause"):
        assert title in out, out
    assert out.count("TTFT p99 (s)") == 5, out
    assert out.count("changed node") == 2, out
    if "nginx least_conn" in out:  # nginx installed: each table compares the proxy with it
        assert out.count("proxy / least_conn") == 5, out


def test_changed_turns_follow_each_conversation_across_nodes() -> None:
    node_a = {"c1/1": 1, "c1/5": 1, "c2/1": 1, "c2/3": 1, "c2/5": 0}
    node_b = {"c1/3": 1, "c2/5": 1}
    # c1: a, b, a (2 changes); c2: a, a, b (1 change); a count of 0 is a turn of another run.
    assert changed_turns([node_a, node_b]) == (4, 3)
    assert changed_turns([{"c/1": 1}, {}]) == (0, 0)


def test_a_cost_row_counts_what_the_nodes_did_between_readings() -> None:
    def stats(cold: int, cached: int, computed: int, turns: dict[str, int]) -> dict[str, object]:
        return {
            "cold_loads": cold,
            "prompt_cached_total": cached,
            "prompt_computed_total": computed,
            "chat_turns": turns,
        }

    before = [stats(1, 100, 50, {"x/1": 1}), stats(0, 0, 0, {})]
    after = [stats(1, 400, 80, {"x/1": 1, "y/1": 1}), stats(2, 0, 20, {"y/3": 1})]
    outcome = ChatOutcome(requests=2, errors=0, ttfb=[0.1, 0.2], latency=[0.3, 0.4])
    row = cost_row(outcome, before, after)
    assert row.cold_loads == [0, 2]
    assert (row.cached_chars, row.computed_chars) == (300, 50)
    assert (row.follow_ups, row.changed_node) == (1, 1)


def test_cost_tables_show_ratios_to_least_conn_and_the_cache_share() -> None:
    def row(latency: float, cached: int) -> CostRow:
        return CostRow(4, 0, [latency / 2] * 4, [latency] * 4, [0, 1, 1], cached, 100 - cached)

    rows = {"proxy": row(1.0, 75), "nginx least_conn": row(2.0, 25)}
    (table,) = costs_tables(Results(costs={"chats": rows}), SMOKE)
    cells = {line.split("  ")[0]: line.split("  ")[1:] for line in table.splitlines()[1:]}
    proxy = [cell.strip() for cell in cells["proxy"] if cell.strip()]
    assert proxy == ["4", "1.000", "1.000", "0.500", "0.500", "0/1/1", "0", "75%", "0 of 0"]
    ratios = [cell.strip() for cell in cells["proxy / least_conn"] if cell.strip()]
    assert ratios == ["-", "0.50", "0.50", "0.50", "0.50", "-", "-", "-", "-"]


def test_user_messages_differ_per_chat_from_the_start() -> None:
    first, other = user_message(0, 0, 60), user_message(1, 0, 60)
    assert len(first) == len(other) == 60
    assert first[: len("Chat ")] == other[: len("Chat ")] and first[5] != other[5]
    assert user_message(0, 1, 60) != first


async def test_chats_resend_their_history_and_hit_the_slots_cache() -> None:
    settings = SimSettings(
        tokens=3, token_interval=0.001, num_parallel=2, resident=["llama3.2:latest"]
    )
    node = SimNode(settings)
    await node.start()
    try:
        load = ChatLoad(
            [node.url], chats=2, turns=3, tokens=3, user_chars=80, model="llama3.2:latest"
        )
        outcome = await run_chats(load)
    finally:
        await node.stop()
    assert (outcome.requests, outcome.errors, len(outcome.ttfb)) == (6, 0, 6)
    lengths = sorted(int(key.split("/")[1]) for key in node.stats.chat_turns)
    assert lengths == [1, 1, 3, 3, 5, 5]
    assert changed_turns([node.stats.chat_turns]) == (4, 0)
    # Each follow-up found its history (prompts and answers) in its chat's slot: only the new
    # user message, about 80 characters, was prefilled after the first turns.
    first_turns = 2 * len(f"<user>{user_message(0, 0, 80)}\n")
    assert node.stats.prompt_computed_total < first_turns + 4 * 100
    assert node.stats.prompt_cached_total > node.stats.prompt_computed_total


async def _open_loop_latencies(concurrency: int) -> list[float]:
    """Four streams of about 50 ms arriving within a few ms, through an open loop of at most
    ``concurrency`` connections, to a node with a slot for each."""
    settings = SimSettings(token_interval=0.01, num_parallel=4, resident=["llama3.2:latest"])
    node = SimNode(settings)
    await node.start()
    try:
        load = StreamLoad(
            [node.url], concurrency, requests=4, tokens=5, models=["llama3.2:latest"],
            watch_pids=[], warmup=False, rate=1000.0,
        )  # fmt: skip
        outcome = await run_streams(load)
    finally:
        await node.stop()
    assert (outcome.requests, outcome.errors) == (4, 0)
    return sorted(outcome.latency)


async def test_an_open_loop_sends_each_stream_when_it_arrives() -> None:
    """Whatever is in flight: the four run at once, each in about one stream's time."""
    latency = await _open_loop_latencies(concurrency=4)
    assert latency[-1] < 1.8 * latency[0], latency


async def test_an_open_loop_times_a_stream_from_its_arrival() -> None:
    """With one connection the four go one after another, and the last one's wait counts: no
    coordinated omission, which would time each from when it was sent (one stream each)."""
    latency = await _open_loop_latencies(concurrency=1)
    assert latency[-1] > 3 * latency[0], latency
