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

from .app import RUNTIME, Runtime, make_app
from .config import Config, ConfigError, NodeConfig, load_config, parse_config
from .serving import Serving, serve

log = logging.getLogger("ollama_proxy")

EXIT_INVALID_CONFIG = 2
DEMO_NODES = 2
YOUNG_COLLECTION_THRESHOLD = 10_000  # allocations between collections of young objects
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = _demo_defaults() if _demo_without_file(args) else load_config(args.config)
        if args.listen:
            host, port = _listen_override(args.listen)
            config = dataclasses.replace(config, listen_host=host, listen_port=port)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{args.config}: {line}", file=sys.stderr)
        sys.exit(EXIT_INVALID_CONFIG)
    if args.check:
        print(f"{args.config}: valid ({len(config.nodes)} nodes)")
        return
    _use_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, Path(args.config), demo=args.demo))


def _demo_without_file(args: argparse.Namespace) -> bool:
    """The demo runs from anywhere: with no config file it needs none."""
    return bool(args.demo) and not Path(args.config).exists()


def _demo_defaults() -> Config:
    # The node is a placeholder: the demo replaces the node list with its simulated fleet.
    return parse_config({"listen": "127.0.0.1:11434", "nodes": [{"url": "http://127.0.0.1:9"}]})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ollama-proxy", description="Reverse proxy and load balancer for Ollama servers."
    )
    p.add_argument("--config", default="config.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="validate the config and exit (0 or 2)")
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"serve {DEMO_NODES} simulated Ollama nodes instead of the config's nodes "
        "(for trying the proxy without Ollama; never used unless asked for)",
    )
    p.add_argument("--listen", help="host:port to listen on, overriding the config")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _listen_override(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise ConfigError([f"--listen: must be host:port, got {listen!r}"])
    return host or "127.0.0.1", int(port)


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
        stop = _stop_on_signals(on_hangup=runtime.reload)
        # reuse_port: a new proxy can start on the same port before the old one drains, so an
        # upgrade on one host refuses no connection.
        serving = await serve(app, config.listen_host, config.listen_port, reuse_port=True)
        stack.push_async_callback(serving.close)
        _tune_garbage_collector()
        log.info(
            "listening on %s://%s:%d, %d nodes: %s",
            "https" if config.tls.context else "http",
            config.listen_host,
            config.listen_port,
            len(config.nodes),
            ", ".join(f"{n.name}={n.url}" for n in config.nodes),
        )
        if not config.admin.token and config.listen_host not in LOOPBACK:
            log.warning(
                "admin.token is not set: anyone who can reach %s:%d can drain nodes and "
                "reload the config through /-/",
                config.listen_host,
                config.listen_port,
            )
        await stop.wait()
        await _drain(runtime, serving)


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


def _stop_on_signals(on_hangup: Callable[[], object]) -> asyncio.Event:
    """Set on SIGTERM or SIGINT; the config reloads on each SIGHUP meanwhile."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    return stop


async def _drain(runtime: Runtime, serving: Serving) -> None:
    """Fail readiness, stop accepting, let requests in flight finish (bounded), then go."""
    runtime.shutting_down = True
    bound = runtime.config.shutdown.drain_timeout
    log.info("stopping: no new connections; waiting up to %gs for requests in flight", bound)
    await serving.stop_accepting()  # nor new requests on kept-alive connections
    try:
        await asyncio.wait_for(runtime.forwarder.idle.wait(), bound)
    except TimeoutError:
        log.warning(
            "%d requests still running after %gs: closing them", runtime.forwarder.active, bound
        )
    log.info("stopped")


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
