"""Command line: ``ollama-proxy --config FILE`` (or ``python -m proxy``), --check, --demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from proxy import __version__  # the package's, not a module (tests/test_imports.py)

from . import keys_cli
from .app import RUNTIME, Runtime, make_app
from .auth import startup_notice
from .config import Config, ConfigError, NodeConfig, load_config, parse_config, parse_listen
from .serving import ListenError, Serving, serve, shown_address

log = logging.getLogger("ollama_proxy")

EXIT_INVALID_CONFIG = 2
EXIT_CANNOT_LISTEN = 1
DEFAULT_CONFIG = "config.yaml"
DEMO_LISTEN = ("127.0.0.1", 11434)
DEMO_NODES = 2
YOUNG_COLLECTION_THRESHOLD = 10_000  # allocations between collections of young objects


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["key"]:  # ollama-proxy key new NAME
        keys_cli.main(argv[1:])
        return
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    listen = _listen_option(args.listen)
    path = _config_path(args)
    config = _config(path, listen, demo=args.demo)
    if args.check:
        print(f"{path or '--demo'}: valid ({len(config.nodes)} nodes)")
        return
    _use_uvloop()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(config, path, demo=args.demo))
    except ListenError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_CANNOT_LISTEN)


def _listen_option(listen: str | None) -> tuple[str, int] | None:
    """``--listen``, read as ``listen:`` in the file is, its errors naming the option."""
    if listen is None:
        return None
    try:
        return parse_listen(listen, "--listen")
    except ConfigError as exc:
        _exit_invalid(exc.errors)


def _config_path(args: argparse.Namespace) -> Path | None:
    """The file to read: --config's, else ./config.yaml; none for --demo without --config (the
    demo never picks up whatever config.yaml the working directory holds)."""
    if args.config is not None:
        return Path(args.config)
    return None if args.demo else Path(DEFAULT_CONFIG)


def _config(path: Path | None, listen: tuple[str, int] | None, *, demo: bool) -> Config:
    if path is not None and not path.exists():
        _exit_invalid(
            [
                f"{path}: no such file. Name the config file with --config FILE (the "
                "repository's config.yaml is a commented example), or try the proxy in front "
                "of simulated nodes with --demo"
            ]
        )
    try:
        config = load_config(path) if path is not None else _demo_defaults()
    except ConfigError as exc:
        _exit_invalid([f"{path}: {line}" for line in exc.errors])
    if demo and listen is None:
        listen = DEMO_LISTEN  # made-up answers: on loopback only, unless --listen says so
    if listen is not None:
        config = dataclasses.replace(config, listen_host=listen[0], listen_port=listen[1])
    return config


def _exit_invalid(lines: list[str]) -> NoReturn:
    for line in lines:
        print(line, file=sys.stderr)
    sys.exit(EXIT_INVALID_CONFIG)


def _demo_defaults() -> Config:
    # The node is a placeholder: the demo replaces the node list with its simulated fleet.
    return parse_config({"nodes": [{"url": "http://127.0.0.1:9"}]})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ollama-proxy", description="Reverse proxy and load balancer for Ollama servers."
    )
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG})")
    p.add_argument("--check", action="store_true", help="validate the config and exit (0 or 2)")
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"serve {DEMO_NODES} simulated Ollama nodes instead of the config's nodes "
        "(for trying the proxy without Ollama; never used unless asked for). Reads no file "
        "unless --config names one, and listens on 127.0.0.1:11434 unless --listen says "
        "otherwise",
    )
    p.add_argument("--listen", help='host:port to listen on, overriding the config ("[::1]:port")')
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _use_uvloop() -> None:
    try:
        import uvloop  # optional extra
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: Config, config_path: Path | None, *, demo: bool) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if demo:
            config = await _start_demo_fleet(config, stack)
            config_path = None  # the demo fleet is not in the file: never reload from it
        app = make_app(config, config_path)
        runtime = app[RUNTIME]
        # Before listening: once "listening on" is logged, a SIGHUP must reload, not kill.
        signals = _stop_on_signals(on_hangup=runtime.reload)
        serving = await serve(
            app, config.listen_host, config.listen_port, reuse_port=config.listen_reuse_port
        )
        stack.push_async_callback(serving.close)
        _tune_garbage_collector()
        where = shown_address(config.listen_host, serving.port)
        # Before "listening on": whoever waits for that line reads the start-up whole.
        log.log(*startup_notice(config))  # open, protected or keys; a warning when open
        log.info(
            "listening on %s://%s, %d nodes: %s",
            "https" if config.tls.context else "http",
            where,
            len(config.nodes),
            ", ".join(f"{n.name}={n.url}" for n in config.nodes),
        )
        await signals.stop.wait()
        await _drain(runtime, serving, signals.now)


def _tune_garbage_collector() -> None:
    """Collect young objects less often, and never look again at those made at start-up.

    A request makes a few hundred container objects (futures, dicts, lists), nearly all freed
    by reference counting when it ends. Collecting every 700 of them cost 4-5 % of the
    proxy's CPU under streaming load (timed with ``gc.callbacks``), every 10,000 about 2 %;
    the rare cycle waits a little longer, a few MB at most.
    """
    gc.freeze()  # modules, config, app: long-lived, never garbage
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


class StopSignals:
    """SIGTERM or SIGINT: ``stop`` (drain, then go) the first time, ``now`` the second."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.now = asyncio.Event()

    def received(self) -> None:
        (self.now if self.stop.is_set() else self.stop).set()


def _stop_on_signals(on_hangup: Callable[[], object]) -> StopSignals:
    """SIGTERM and SIGINT stop the proxy; the config reloads on each SIGHUP meanwhile."""
    signals = StopSignals()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.received)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    return signals


async def _drain(runtime: Runtime, serving: Serving, now: asyncio.Event) -> None:
    """Fail readiness, stop accepting, let requests in flight finish (bounded, or until
    ``now``), then cut the rest: as the proxy's doing, not their clients'."""
    runtime.shutting_down = True
    forwarder = runtime.forwarder
    bound = runtime.config.shutdown.drain_timeout
    log.info(
        "stopping: no new connections; waiting up to %gs for requests in flight "
        "(a second SIGTERM or SIGINT stops at once)",
        bound,
    )
    await serving.stop_accepting()  # nor new requests on kept-alive connections
    await _first_of(forwarder.idle, now, within=bound)
    if not forwarder.idle.is_set():
        after = "a second signal" if now.is_set() else f"{bound:g}s"
        log.warning("%d requests still running after %s: cutting them", forwarder.active, after)
        forwarder.cut_reason = "drain"
    log.info("stopped")


async def _first_of(*events: asyncio.Event, within: float) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _start_demo_fleet(config: Config, stack: contextlib.AsyncExitStack) -> Config:
    from .sim import SimNode, SimSettings  # only the demo needs it

    nodes = []
    for i in range(DEMO_NODES):
        sim = SimNode(
            SimSettings(resident=["llama3.2:latest"], tokens=40, token_interval=0.05),
            name=f"demo-{i + 1}",
        )
        url = await sim.start()
        stack.push_async_callback(sim.stop)
        nodes.append(NodeConfig(url=url, name=sim.name, max_concurrency=2, weight=1.0))
    log.warning(
        "DEMO MODE: %d simulated Ollama nodes, not real ones. Their answers are made-up text. "
        "For real nodes, list them in the config and run without --demo.",
        DEMO_NODES,
    )
    return dataclasses.replace(config, nodes=tuple(nodes))


if __name__ == "__main__":
    main()
