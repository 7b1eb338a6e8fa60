"""Command line of ``python -m proxy.bench``; see the package docstring for what it measures."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .compare import compare
from .cores import choose
from .costs import COST_SCENARIOS, ON_REQUEST
from .processes import BenchError, raise_fd_limit
from .profiling import profile_streaming
from .report import costs_tables, error_count, machine_summary, relay_table, scheduling_table
from .scale import SMOKE, Scale
from .scenarios import Others, Results, log_progress, measure_all
from .stacks import nginx_version

SCENARIOS = ("stream", "embed", "hold", "sched", *COST_SCENARIOS)
DEFAULT_SCENARIOS = tuple(name for name in SCENARIOS if name not in ON_REQUEST)
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m proxy.bench",
        description="Benchmark the proxy against direct access and nginx on simulated nodes.",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny run of seconds (CI)")
    p.add_argument("--profile", action="store_true", help="profile the proxy with py-spy")
    p.add_argument("--no-nginx", action="store_true", help="leave nginx out even if installed")
    p.add_argument(
        "--compare",
        metavar="REV",
        help="run this checkout's proxy and REV's (a git revision) side by side under the same "
        "load, and print their CPU per chunk and per request; nothing else is run",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="add the bare relay (proxy/bench/bare.py): the same relay with nothing else, "
        "the floor under the proxy on this runtime",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="let the stream scenario's processes share every core (by default the front "
        "runs alone on one)",
    )
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated scenarios to run, of: {','.join(SCENARIOS)} "
        f"(default: all but {','.join(ON_REQUEST)})",
    )
    p.add_argument("--streams", type=int, help="concurrent streams (default 100)")
    p.add_argument("--requests", type=int, help="streams measured per front (default 2000)")
    p.add_argument("--tokens", type=int, help="tokens per stream (default 100)")
    p.add_argument("--token-interval", type=float, help="seconds per token (default 0.005)")
    p.add_argument(
        "--latency-streams",
        type=int,
        help="concurrent streams of the light load's time to first byte (default 10; 0: skip)",
    )
    p.add_argument(
        "--latency-requests", type=int, help="streams measured at the light load (default 1500)"
    )
    p.add_argument(
        "--rounds", type=int, help="rounds taking the fronts in turn, per stream load (default 3)"
    )
    p.add_argument(
        "--stagger",
        type=float,
        help="spread the clients' first streams over this many streams' length (default 1; "
        "0: all at once)",
    )
    p.add_argument("--hold-streams", type=int, help="streams held at once (default 5000)")
    p.add_argument("--embed-requests", type=int, help="embed requests per front (default 10000)")
    p.add_argument(
        "--open-rate",
        type=float,
        help="unequal-open: streams arriving a second (Poisson; default 36)",
    )
    p.add_argument(
        "--chat-pause",
        type=float,
        help="chats-paused: a user's pause before each next turn, at most (seconds, drawn "
        "evenly; default 1)",
    )
    return p


def _scale(args: argparse.Namespace) -> Scale:
    scale = SMOKE if args.smoke else Scale()
    overrides = {
        "streams": args.streams,
        "stream_requests": args.requests,
        "tokens": args.tokens,
        "token_interval": args.token_interval,
        "latency_streams": args.latency_streams,
        "latency_requests": args.latency_requests,
        "rounds": args.rounds,
        "stagger": args.stagger,
        "hold_streams": args.hold_streams,
        "embed_requests": args.embed_requests,
        "chat_pause": args.chat_pause,
        "unequal_open_rate": args.open_rate,
    }
    return dataclasses.replace(scale, **{k: v for k, v in overrides.items() if v is not None})


def _scenarios(text: str) -> set[str]:
    chosen = {name.strip() for name in text.split(",") if name.strip()}
    unknown = chosen - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"--only: unknown scenarios {sorted(unknown)}; known: {SCENARIOS}")
    return chosen


def _cancel_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, through every cleanup, instead of killing us outright."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


async def _run(args: argparse.Namespace, scale: Scale, scenarios: set[str]) -> None:
    _cancel_on_sigterm()
    raise_fd_limit()
    nginx = None if args.no_nginx else nginx_version()
    cores = choose(pin=not args.no_pin)
    print(machine_summary(nginx), flush=True)
    if "stream" in scenarios and not (args.profile or args.compare):
        print(cores.summary(), flush=True)
    if nginx is None:
        print("nginx skipped (--no-nginx)" if args.no_nginx else "nginx not installed, skipped")
    with tempfile.TemporaryDirectory(prefix="ollama-proxy-bench-") as tmp:
        workdir = Path(tmp)
        if args.profile:
            print("\n" + await profile_streaming(workdir, scale, log_progress))
            return
        if args.compare:
            print("\n" + await compare(workdir, args.compare, scale, log_progress))
            return
        others = Others(nginx=nginx is not None, floor=args.floor)
        results = await measure_all(workdir, scale, others, scenarios, log_progress, cores)
    _print_tables(results, scale)
    if errors := error_count(results):
        raise BenchError(f"{errors} requests failed (see the errors rows)")


def _print_tables(results: Results, scale: Scale) -> None:
    if results.relay:
        print("\n" + relay_table(results, scale))
    if results.scheduling:
        print("\n" + scheduling_table(results, scale))
    for table in costs_tables(results, scale):
        print("\n" + table)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    scenarios = _scenarios(args.only)
    try:
        asyncio.run(_run(args, _scale(args), scenarios))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process the benchmark started was stopped", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
