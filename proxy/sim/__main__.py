"""The command line: ``python -m proxy.sim --port 11501 --port 11502`` runs one node per port
until SIGINT or SIGTERM (the benchmark's nodes, each in a process of its own)."""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib
import signal
from collections.abc import Coroutine
from typing import Any

from .server import SimNode
from .settings import SimSettings


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SimSettings()
    parser = argparse.ArgumentParser(
        prog="python -m proxy.sim", description="Run simulated Ollama nodes."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, action="append", help="one node per --port (default: one, any port)"
    )
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--token-interval", type=float, default=defaults.token_interval)
    parser.add_argument("--first-token-delay", type=float, default=defaults.first_token_delay)
    parser.add_argument(
        "--prefill-per-token",
        type=float,
        default=defaults.prefill_per_token,
        help="seconds per prompt token not in a slot's KV cache (a token: 4 characters)",
    )
    parser.add_argument("--load-delay", type=float, default=defaults.load_delay)
    parser.add_argument("--pull-interval", type=float, default=defaults.pull_interval)
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
        prefill_per_token=args.prefill_per_token,
        load_delay=args.load_delay,
        pull_interval=args.pull_interval,
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
