"""What the benchmark starts: simulated nodes, the proxy, and nginx, each a process of its own."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from .processes import (
    PROJECT_ROOT,
    STOP_GRACE,
    BenchError,
    Child,
    Processes,
    free_ports,
    raise_fd_limit,
    wait_ready,
)
from .procstat import children
from .specs import Load, Outcome, decode_outcome, encode

Balance = Literal["least_conn", "round_robin"]
Policy = Literal["proxy", "least_conn", "round_robin"]  # the fronts of the scheduling tables
POLICY_LABELS: dict[Policy, str] = {
    "proxy": "proxy",
    "least_conn": "nginx least_conn",
    "round_robin": "nginx round robin",
}
BARE_RELAY = "bare relay"


@dataclass(frozen=True)
class Front:
    """Where the load goes: straight to the nodes, or to one server in front of them."""

    name: str
    urls: list[str]
    pids: list[int] = field(default_factory=list)  # whose CPU and memory are this front's
    child: Child | None = None


@dataclass(frozen=True)
class SimNodeSpec:
    """The command-line settings of one simulated node (see ``python -m proxy.sim -h``)."""

    token_interval: float
    num_parallel: int
    resident: tuple[str, ...]
    load_delay: float = 0.0
    max_loaded: int = 0  # models in memory at most (0: no limit), as OLLAMA_MAX_LOADED_MODELS
    max_queue: int = 512
    prefill_per_token: float = 0.0  # seconds per prompt token not in a slot's KV cache

    def args(self, port: int) -> list[str]:
        return [
            "-m",
            "proxy.sim",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token-interval",
            str(self.token_interval),
            "--num-parallel",
            str(self.num_parallel),
            "--max-queue",
            str(self.max_queue),
            "--load-delay",
            str(self.load_delay),
            "--max-loaded",
            str(self.max_loaded),
            "--prefill-per-token",
            str(self.prefill_per_token),
            "--resident",
            ",".join(self.resident),
        ]


async def start_sims(procs: Processes, specs: list[SimNodeSpec]) -> list[str]:
    """One process per node, started together; their base URLs once all answer."""
    ports = free_ports(len(specs))
    nodes = [
        await procs.start_python("simnode", spec.args(port))
        for spec, port in zip(specs, ports, strict=True)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    await asyncio.gather(*(wait_ready(n, url + "/") for n, url in zip(nodes, urls, strict=True)))
    return urls


# --------------------------------------------------------------------------- the proxy


def proxy_config(port: int, node_urls: list[str], caps: list[int]) -> str:
    """A proxy config; JSON is YAML, so json.dumps writes a valid one."""
    nodes = [
        {"url": url, "name": f"sim{i}", "max_concurrency": cap}
        for i, (url, cap) in enumerate(zip(node_urls, caps, strict=True))
    ]
    return json.dumps({"listen": f"127.0.0.1:{port}", "nodes": nodes}, indent=2)


async def start_proxy(
    procs: Processes,
    workdir: Path,
    node_urls: list[str],
    caps: list[int],
    *,
    python_args: tuple[str, ...] = (),  # e.g. ("-m", "cProfile", "-o", FILE) to profile it
    source: Path | None = None,  # another checkout's proxy (--compare), else this one's
) -> Front:
    (port,) = free_ports(1)
    config = workdir / f"proxy-{port}.yaml"
    config.write_text(proxy_config(port, node_urls, caps))
    args = [*python_args, "-m", "proxy", "--config", str(config), "--log-level", "warning"]
    child = await procs.start_python("proxy", args, cwd=source or PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    await wait_ready(child, url + "/-/ready")
    return Front("proxy", [url], [child.pid], child)


async def start_bare_relay(procs: Processes, node_urls: list[str]) -> Front:
    """The floor under the proxy (``bare.py``): the same relay, nothing else."""
    (port,) = free_ports(1)
    child = await procs.start_python("bare", ["-m", "proxy.bench.bare", str(port), *node_urls])
    url = f"http://127.0.0.1:{port}"
    await wait_ready(child, url + "/")
    return Front(BARE_RELAY, [url], [child.pid], child)


# --------------------------------------------------------------------------- nginx


def nginx_version() -> str | None:
    """``nginx/1.22.1``, or None when nginx is not installed."""
    binary = shutil.which("nginx")
    if binary is None:
        return None
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return done.stderr.strip().removeprefix("nginx version: ") or "nginx"


NGINX_CONF = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    upstream ollama {{
{balance}{servers}
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64m;
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_config(
    directory: Path, port: int, node_urls: list[str], balance: Balance, streams: int
) -> str:
    """One worker, unbuffered, HTTP/1.1 keep-alive upstreams: nginx at its best for streams."""
    # Each stream takes two connections (client and upstream). Not more than needed: nginx
    # allocates and touches every connection slot at start, which would inflate its memory.
    connections = min(2 * streams + 1024, raise_fd_limit() - 64)
    servers = "\n".join(f"        server {url.removeprefix('http://')};" for url in node_urls)
    return NGINX_CONF.format(
        dir=directory,
        port=port,
        nofile=connections + 64,
        connections=connections,
        balance="        least_conn;\n" if balance == "least_conn" else "",
        servers=servers,
    )


async def start_nginx(
    procs: Processes, workdir: Path, node_urls: list[str], balance: Balance, *, streams: int
) -> Front:
    """nginx in front of the nodes, with room for ``streams`` concurrent streams."""
    (port,) = free_ports(1)
    # A directory of its own each time: a port freed by an earlier nginx may come round again.
    directory = Path(tempfile.mkdtemp(prefix=f"nginx-{port}-", dir=workdir))
    conf = directory / "nginx.conf"
    conf.write_text(nginx_config(directory, port, node_urls, balance, streams))
    argv = ["nginx", "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    child = await procs.start("nginx", argv)
    url = f"http://127.0.0.1:{port}"
    await wait_ready(child, url + "/", status=None)
    name = "nginx" if balance == "least_conn" else "nginx round robin"
    return Front(name, [url], [child.pid, *children(child.pid)], child)


async def start_front(
    procs: Processes, workdir: Path, urls: list[str], policy: Policy, caps: list[int], streams: int
) -> Front:
    """The proxy (each node capped at ``caps``) or nginx with that balancing, for a
    scheduling table."""
    if policy == "proxy":
        return await start_proxy(procs, workdir, urls, caps)
    return await start_nginx(procs, workdir, urls, policy, streams=streams)


# --------------------------------------------------------------------------- the load generator


async def run_load(procs: Processes, load: Load, kind: type[Outcome], time_limit: float) -> Outcome:
    """Run the load generator in its own process and return what it reports."""
    child = await procs.start_python(
        "loadgen", ["-m", "proxy.bench.loadgen", encode(load)], capture_stdout=True
    )
    assert child.process.stdout is not None  # capture_stdout
    try:
        output = await asyncio.wait_for(child.process.stdout.read(), time_limit)
        await asyncio.wait_for(child.process.wait(), STOP_GRACE)
    except TimeoutError:
        raise BenchError(f"the load generator ran over {time_limit:g} s") from None
    finally:
        await procs.stop(child)
    if child.process.returncode != 0 or not output.strip():
        raise BenchError(f"the load generator failed:\n{child.log_tail()}")
    return decode_outcome(output.decode().strip().splitlines()[-1], kind)


# --------------------------------------------------------------------------- node state


async def cold_load_counter(url: str) -> int:
    """The node's cold loads so far, from the simulator's ``/-/sim/stats``.

    Not from ``/api/ps``: a node with ``max_loaded`` evicts models, so the models in memory
    say nothing about how many times one was loaded.
    """
    return int((await sim_stats(url))["cold_loads"])


async def sim_stats(url: str) -> dict[str, Any]:
    """The node's counters (the simulator's SimStats) and the models in memory."""
    async with aiohttp.ClientSession() as session, session.get(url + "/-/sim/stats") as resp:
        if resp.status != 200:
            raise BenchError(f"{url}/-/sim/stats answered {resp.status}")
        stats: dict[str, Any] = await resp.json()
        return stats


async def reset_model(url: str, model: str, *, resident: bool) -> None:
    """Unload the model (which empties its slots' KV caches), and load it again if the node
    is to hold it: the node's memory as at its start, for the next policy's run."""
    unload, load = {"model": model, "keep_alive": 0}, {"model": model}
    async with aiohttp.ClientSession() as session:
        for body in (unload, load) if resident else (unload,):
            async with session.post(url + "/api/generate", json=body) as resp:
                if resp.status != 200:
                    raise BenchError(f"{url}: resetting {model} answered {resp.status}")
                await resp.read()
