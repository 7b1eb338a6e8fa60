"""deploy/: every artefact parses, agrees with the proxy it deploys, and uses real metrics.

No container engine or cluster runs here, so each artefact is read and cross-checked: ports,
paths and signals against the proxy's code and a live proxy, configs through ``--check``, the
alert rules through promtool (Debian's ``prometheus`` package), metric names against a live
``/metrics`` scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from proxy.__main__ import main as cli_main
from proxy.config import DEFAULT_LISTEN, Config, parse_config

from .conftest import StartNodes, StartProxy, free_port, pool_is_idle, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
AUTOSCALING = K8S / "autoscaling"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
UNIT = DEPLOY / "systemd" / "ollama-proxy.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

METRIC_NAME = re.compile(r"\bollama_proxy_[a-z0-9_]+")
# Labels Prometheus adds to every scraped series.
SCRAPE_LABELS = frozenset({"job", "instance"})
REQUIRED_ALERTS = {
    "OllamaProxyNodeDown",
    "OllamaProxyAllNodesDown",
    "OllamaProxyQueueNearFull",
    "OllamaProxyHigh503Rate",
    "OllamaProxyUpstreamErrors",
    "OllamaProxyTimeToFirstByteHigh",
    "OllamaProxyStateBackendDown",
}
PROMTOOL_MISSING = (
    "promtool not found: install Debian's prometheus package (apt-get install prometheus)"
)


# -- helpers shared with test_docs -------------------------------------------------------------


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def check_cli(args: list[str]) -> tuple[int, str]:
    """``ollama-proxy ARGS --check``, in-process: (exit status, what it wrote to stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli_main([*args, "--check"])
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue()
    return 0, err.getvalue()


def check_config_file(path: Path) -> tuple[int, str]:
    return check_cli(["--config", str(path)])


def check_config_text(text: str, tmp_path: Path, name: str = "config.yaml") -> Config:
    """Assert that the text passes ``--check``; return the config it describes."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    status, errors = check_config_file(path)
    assert status == 0, errors
    return parse_config(yaml.safe_load(text))


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(PROMTOOL_MISSING)
    return found


def run_promtool(*args: str) -> None:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def check_promql(expressions: list[str], tmp_path: Path) -> None:
    """Each expression must parse as PromQL: promtool checks them as recording rules."""
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(expressions)]
    path = tmp_path / "expressions.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    run_promtool("check", "rules", str(path))


def exported_names(scrape: str) -> set[str]:
    """Names a query may use: families from # TYPE lines (present even before any sample),
    with the _bucket, _sum and _count series of histograms."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", scrape, re.MULTILINE):
        names.add(name)
        if kind in ("histogram", "summary"):
            names.update(f"{name}_{part}" for part in ("bucket", "sum", "count"))
    return names


def sample_labels(scrape: str) -> dict[str, set[str]]:
    """Series name → the label names its samples carry."""
    labels: dict[str, set[str]] = {}
    for name, inside in re.findall(r"^(\w+)\{([^}]*)\}", scrape, re.MULTILINE):
        labels.setdefault(name, set()).update(re.findall(r'(\w+)="', inside))
    return labels


def selector_label_problems(expression: str, scrape: str) -> list[str]:
    """Label names in ``metric{label=...}`` selectors that the metric's samples do not have."""
    seen = sample_labels(scrape)
    problems = []
    for name, inside in re.findall(r"(ollama_proxy_[a-z0-9_]+)\{([^}]*)\}", expression):
        if name not in seen:
            continue  # no sample yet: the name itself is checked against # TYPE lines
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", inside):
            if label not in seen[name] | SCRAPE_LABELS:
                problems.append(f"{name}{{{label}=...}}: {name} has labels {sorted(seen[name])}")
    return problems


async def scrape_after_traffic(start_nodes: StartNodes, start_proxy: StartProxy) -> str:
    """A live /metrics after cold loads, streamed generations, a non-streamed chat and a
    queue rejection."""
    nodes = await start_nodes(2, tokens=30, token_interval=0.005, load_delay=0.01, resident=[])
    proxy = await start_proxy(nodes, caps=[1, 1], queue={"max_size": 0}, routing={"spill_after": 0})
    pool = proxy.pool
    generate = {"model": "llama3.2", "prompt": "one two three"}
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/chat", json=chat) as resp:
            assert resp.status == 200
            await resp.read()
        await wait_until(lambda: pool_is_idle(pool), what="the chat's slot back")
        held = [await session.post(proxy.url + "/api/generate", json=generate) for _ in nodes]
        try:
            assert [r.status for r in held] == [200, 200]  # every slot taken, queue size 0
            async with session.post(proxy.url + "/api/generate", json=generate) as resp:
                assert resp.status == 503
        finally:
            for resp in held:
                await resp.read()
                resp.release()
    return await proxy.metrics_text()


# -- every file parses -----------------------------------------------------------------------


def test_deploy_has_the_artefacts() -> None:
    expected = [
        "docker/Dockerfile",
        "compose.yaml",
        "systemd/ollama-proxy.service",
        "kubernetes/deployment.yaml",
        "kubernetes/service.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/poddisruptionbudget.yaml",
        "prometheus/alerts.yml",
        "prometheus/prometheus.yml",
        "grafana/dashboard.json",
    ]
    assert [name for name in expected if not (DEPLOY / name).is_file()] == []


@pytest.mark.parametrize(
    "path", deploy_files(".yaml", ".yml"), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_yaml_file_parses(path: Path) -> None:
    assert load_yaml_all(path), f"{path} holds no YAML document"


@pytest.mark.parametrize("path", deploy_files(".json"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_file_parses(path: Path) -> None:
    json.loads(path.read_text(encoding="utf-8"))


# -- Kubernetes ------------------------------------------------------------------------------


def k8s_manifests(directory: Path = K8S) -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(directory.glob("*.yaml"))
        for doc in load_yaml_all(path)
        if doc.get("kind") != "Kustomization"
    ]


def k8s_objects(name: str = "ollama-proxy") -> dict[str, dict[str, Any]]:
    """The objects of one name (the proxy's, or its Redis's), by kind."""
    objects: dict[str, dict[str, Any]] = {}
    for doc in k8s_manifests():
        if doc["metadata"]["name"] == name:
            assert doc["kind"] not in objects, f"two {doc['kind']} objects named {name}"
            objects[doc["kind"]] = doc
    return objects


def proxy_container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a name or a number) as the container's port number."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if isinstance(port, str):
        assert port in ports, f"port {port!r} is not one of the container's {ports}"
        return int(ports[port])
    assert port in ports.values()
    return port


def configmap_config(objects: dict[str, dict[str, Any]], tmp_path: Path) -> Config:
    return check_config_text(objects["ConfigMap"]["data"]["config.yaml"], tmp_path)


def test_kubernetes_has_every_object_and_kustomize_lists_them() -> None:
    objects = k8s_objects()
    assert set(objects) == {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"}
    assert set(k8s_objects("ollama-proxy-redis")) == {"Deployment", "Service"}
    for directory in (K8S, AUTOSCALING):
        (kustomization,) = load_yaml_all(directory / "kustomization.yaml")
        manifests = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert set(kustomization["resources"]) == manifests


def test_kubernetes_replicas_share_the_redis_of_the_manifests(tmp_path: Path) -> None:
    """state.redis_url names the Redis Service and its port; the proxy's selectors never pick
    Redis's pods, nor Redis's the proxy's."""
    proxy, redis = k8s_objects(), k8s_objects("ollama-proxy-redis")
    url = urlsplit(configmap_config(proxy, tmp_path).state.redis_url)
    (port,) = redis["Service"]["spec"]["ports"]
    assert (url.scheme, url.hostname, url.port) == ("redis", "ollama-proxy-redis", port["port"])
    (container,) = redis["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container_port(container, port["targetPort"]) == 6379
    redis_pods = redis["Deployment"]["spec"]["template"]["metadata"]["labels"]
    proxy_pods = proxy["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert redis["Service"]["spec"]["selector"].items() <= redis_pods.items()
    assert redis["Deployment"]["spec"]["selector"]["matchLabels"].items() <= redis_pods.items()
    assert not proxy["Service"]["spec"]["selector"].items() <= redis_pods.items()
    assert not redis["Service"]["spec"]["selector"].items() <= proxy_pods.items()
    assert proxy["Deployment"]["spec"]["replicas"] >= 2
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"  # see operations.md
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def adapter_rules() -> list[dict[str, Any]]:
    (configmap,) = load_yaml_all(AUTOSCALING / "prometheus-adapter.yaml")
    return list(yaml.safe_load(configmap["data"]["config.yaml"])["rules"])


def test_the_autoscaler_scales_the_deployment_on_the_adapter_s_metric(tmp_path: Path) -> None:
    (hpa,) = load_yaml_all(AUTOSCALING / "hpa.yaml")
    deployment, pdb = (k8s_objects()[k] for k in ("Deployment", "PodDisruptionBudget"))
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    served = {rule["name"]["as"]: rule for rule in adapter_rules()}
    pod_metrics = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert pod_metrics == ["ollama_proxy_queue_depth"]
    rule = served["ollama_proxy_queue_depth"]
    assert re.match(rule["name"]["matches"], "ollama_proxy_queue_depth")
    assert rule["seriesQuery"].startswith("ollama_proxy_queue_depth{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # The adapter's query, its template filled in as the adapter fills it, is PromQL.
    query = rule["metricsQuery"]
    for template, value in (
        ("<<.Series>>", "ollama_proxy_queue_depth"),
        ("<<.LabelMatchers>>", 'namespace="default",pod=~"ollama-proxy-.*"'),
        ("<<.GroupBy>>", "pod"),
    ):
        query = query.replace(template, value)
    assert "<<" not in query
    check_promql([query, rule["seriesQuery"]], tmp_path)


def test_kubernetes_objects_agree_with_each_other(tmp_path: Path) -> None:
    objects = k8s_objects()
    deployment, service, pdb = (
        objects[k] for k in ("Deployment", "Service", "PodDisruptionBudget")
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    container = proxy_container(objects)
    config = configmap_config(objects, tmp_path)
    (service_port,) = service["spec"]["ports"]
    assert container_port(container, service_port["targetPort"]) == config.listen_port
    assert service_port["port"] == config.listen_port == 11434  # Ollama's port: a drop-in
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.listen_port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert deployment["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]


def test_kubernetes_config_mount_follows_configmap_updates(tmp_path: Path) -> None:
    objects = k8s_objects()
    container = proxy_container(objects)
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    # A subPath mount is never updated: the whole directory must be mounted for reloads.
    assert "subPath" not in mount
    assert Path(mount["mountPath"]) == config_path.parent
    assert volumes[mount["name"]]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert config_path.name in objects["ConfigMap"]["data"]
    # The container's arguments are ones the CLI accepts, with the ConfigMap's file.
    args = [
        str(tmp_path / "config.yaml") if a == str(config_path) else a for a in container["args"]
    ]
    (tmp_path / "config.yaml").write_text(objects["ConfigMap"]["data"]["config.yaml"])
    assert check_cli(args) == (0, "")


def test_kubernetes_stop_fits_in_the_grace_period(tmp_path: Path) -> None:
    objects = k8s_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = proxy_container(objects)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    assert pause >= 3  # long enough for endpoints to drop the pod before the listener closes
    drain = configmap_config(objects, tmp_path).shutdown.drain_timeout
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    assert objects["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_kubernetes_pod_runs_unprivileged() -> None:
    objects = k8s_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = proxy_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_user()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


async def test_kubernetes_probes_are_served_by_the_proxy(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """The probes' paths answer as the probes need, with the admin token set (they must stay
    open) and with every node down (liveness must not restart a proxy for its nodes' sake)."""
    objects = k8s_objects()
    container = proxy_container(objects)
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    for probe in (readiness, liveness):
        assert container_port(container, probe["httpGet"]["port"]) == 11434
    (node,) = await start_nodes(1)
    healthy = await start_proxy([node], admin={"token": "s3cret"})
    gone = DeadNode("gone", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    dead = await start_proxy([gone], admin={"token": "s3cret"})
    async with aiohttp.ClientSession() as session:

        async def status(proxy_url: str, probe: dict[str, Any]) -> int:
            async with session.get(proxy_url + probe["httpGet"]["path"]) as resp:
                return resp.status

        assert await status(healthy.url, readiness) == 200
        assert await status(healthy.url, liveness) == 200
        assert await status(dead.url, readiness) == 503
        assert await status(dead.url, liveness) == 200
        healthy.runtime.shutting_down = True  # after SIGTERM: the Service must stop sending
        assert await status(healthy.url, readiness) == 503
        assert await status(healthy.url, liveness) == 200


@dataclass
class DeadNode:
    """Where a node would be, with nothing listening: its first health check fails."""

    name: str
    url: str


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: the manifests are still parsed and cross-checked")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout)}
    assert kinds == set(k8s_objects())


# -- Docker ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage and the build stage, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def dockerfile_user() -> int:
    users = [args for op, args in final_stage() if op == "USER"]
    return int(users[-1].split(":")[0])


def exec_form(stage: list[tuple[str, str]], op: str) -> list[str]:
    (args,) = [a for o, a in stage if o == op]
    value = json.loads(args)
    assert isinstance(value, list), f"{op} must use the exec form (a JSON list)"
    return [str(v) for v in value]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in final_stage():
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def test_dockerfile_runs_unprivileged_and_stops_gracefully() -> None:
    stage = final_stage()
    ops = dict(stage)
    assert ops["FROM"].startswith("python:3.11")
    assert dockerfile_user() != 0
    assert ops["STOPSIGNAL"] == "SIGTERM"
    assert int(ops["EXPOSE"]) == int(DEFAULT_LISTEN.rsplit(":", 1)[1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_form(stage, "ENTRYPOINT") == [next(iter(scripts))]
    # The context is the repository root: every source copied into the image exists, and the
    # Dockerfile's own ignore file (everything out, then what the image needs back in) keeps it.
    ignore = Path(f"{DOCKERFILE}.dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignore[[line.startswith("#") for line in ignore].index(False)] == "*"
    for op, args in dockerfile_instructions():
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert {f"!{source}", f"!{source}/"} & set(ignore), f"{source} is ignored"


def test_dockerfile_default_command_checks_the_shipped_config(tmp_path: Path) -> None:
    command = exec_form(final_stage(), "CMD")
    image_path = command[command.index("--config") + 1]
    copies = [a.split() for o, a in final_stage() if o == "COPY" and not a.startswith("--from")]
    (source,) = [s for *sources, target in copies for s in sources if target == image_path]
    args = [str(ROOT / source) if a == image_path else a for a in command]
    assert check_cli(args) == (0, "")


async def test_dockerfile_healthcheck_passes_on_a_live_proxy_and_fails_without_one(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (healthcheck,) = [args for op, args in final_stage() if op == "HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"  # the slim image has no curl
    env = dockerfile_env()
    url = env["OLLAMA_PROXY_HEALTHCHECK_URL"]
    assert url == f"http://127.0.0.1:{dockerfile_port()}/-/healthy"
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])

    async def run(check_url: str) -> int:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *command[1:],
            env={**os.environ, "OLLAMA_PROXY_HEALTHCHECK_URL": check_url},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await asyncio.wait_for(process.wait(), 20)

    assert await run(proxy.url + "/-/healthy") == 0
    assert await run(f"http://127.0.0.1:{free_port()}/-/healthy") != 0


def dockerfile_port() -> int:
    return int(dict(final_stage())["EXPOSE"])


# -- docker compose --------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    (doc,) = load_yaml_all(DEPLOY / "compose.yaml")
    return dict(doc)


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            yield (DEPLOY / source).resolve(), target


def compose_proxy_config(tmp_path: Path) -> tuple[Config, dict[str, Any]]:
    proxy = compose()["services"]["proxy"]
    config_path = Path(proxy["command"][proxy["command"].index("--config") + 1])
    (source,) = [s for s, target in bind_mounts(proxy) if Path(target) == config_path.parent]
    assert source.is_dir(), "mount the config's directory: a file mount misses replaced files"
    text = (source / config_path.name).read_text(encoding="utf-8")
    return check_config_text(text, tmp_path), proxy


def test_compose_mounts_exist_and_volumes_are_declared() -> None:
    spec = compose()
    for name, service in spec["services"].items():
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name}: {source} does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in spec["volumes"], f"{name}: volume {source} is not declared"
    build = spec["services"]["proxy"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_proxy_fronts_the_ollama_services(tmp_path: Path) -> None:
    config, proxy = compose_proxy_config(tmp_path)
    services = compose()["services"]
    ollamas = {n for n, s in services.items() if s.get("image", "").startswith("ollama/ollama")}
    assert len(ollamas) >= 2
    assert {n.name for n in config.nodes} == ollamas
    for node in config.nodes:
        assert node.url == f"http://{node.name}:11434"
        parallel = int(services[node.name]["environment"]["OLLAMA_NUM_PARALLEL"])
        assert node.max_concurrency == parallel, f"{node.name}: cap != OLLAMA_NUM_PARALLEL"
    assert set(proxy["depends_on"]) == ollamas | {"redis"}
    replicas = proxy["deploy"]["replicas"]
    assert replicas >= 2
    # One host port per replica, each onto the port the config listens on.
    (ports,) = proxy["ports"]
    hosts, container = ports.split(":")
    first, last = (int(p) for p in hosts.split("-"))
    assert (last - first + 1, int(container)) == (replicas, config.listen_port)
    assert first == config.listen_port
    grace = proxy["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > config.shutdown.drain_timeout


def test_compose_replicas_share_the_compose_redis(tmp_path: Path) -> None:
    config, _ = compose_proxy_config(tmp_path)
    redis = compose()["services"]["redis"]
    assert redis["image"].startswith("redis:")
    url = urlsplit(config.state.redis_url)
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    command = redis["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "ports" not in redis  # reached by the replicas only


def test_compose_prometheus_scrapes_the_proxy_and_loads_the_alerts(tmp_path: Path) -> None:
    config, _ = compose_proxy_config(tmp_path)
    prometheus = compose()["services"]["prometheus"]
    mounts = {target: source for source, target in bind_mounts(prometheus)}
    config_file = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    in_container = Path(config_file.split("=", 1)[1])
    assert mounts[str(in_container.parent)] == PROMETHEUS
    (scrape,) = load_yaml_all(PROMETHEUS / in_container.name)
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    # Each replica of the service is a target of its own, found by the service's DNS name.
    (dns,) = job["dns_sd_configs"]
    assert (dns["names"], dns["type"], dns["port"]) == (["proxy"], "A", config.listen_port)
    assert scrape["rule_files"] == ["alerts.yml"]  # relative: read beside prometheus.yml
    alerts = load_yaml_all(PROMETHEUS / "alerts.yml")[0]
    jobs = {
        m
        for g in alerts["groups"]
        for r in g["rules"]
        for m in re.findall(r'job="([^"]+)"', r["expr"])
    }
    assert jobs == {job["job_name"]}


def test_compose_grafana_has_the_datasource_and_the_dashboard() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    mounts = {target: source for source, target in bind_mounts(grafana)}
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasources,) = load_yaml_all(provisioning / "datasources" / "prometheus.yml")
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    (providers,) = [load_yaml_all(p)[0] for p in (provisioning / "dashboards").glob("*.yml")]
    folder = providers["providers"][0]["options"]["path"]
    dashboards = [t for t, s in mounts.items() if s == DASHBOARD]
    assert [str(Path(t).parent) for t in dashboards] == [folder]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in dashboards


# -- systemd ---------------------------------------------------------------------------------


def unit_directives() -> dict[str, list[str]]:
    """``Section.Key`` → values, in order (a key may repeat, as ExecReload does here)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return directives


def test_systemd_unit_is_hardened_and_reloads_with_sighup() -> None:
    unit = unit_directives()

    def one(key: str) -> str:
        (value,) = unit[f"Service.{key}"]
        return value

    assert one("User") not in ("", "root")
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("CapabilityBoundingSet") == ""
    assert one("KillSignal") == "SIGTERM"
    assert unit["Service.ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert one("RestartPreventExitStatus") == "2"  # an invalid config: restarting cannot help


def test_systemd_stop_timeout_exceeds_the_drain_bound() -> None:
    (value,) = unit_directives()["Service.TimeoutStopSec"]
    config_arg = shlex.split(unit_directives()["Service.ExecStart"][0])
    assert config_arg[config_arg.index("--config") + 1] == "/etc/ollama-proxy/config.yaml"
    # The drain bound of the shipped example (the file an install starts from).
    drain = parse_config(yaml.safe_load((ROOT / "config.yaml").read_text())).shutdown
    assert float(value) > drain.drain_timeout + 5


def test_systemd_commands_are_ones_the_cli_accepts() -> None:
    unit = unit_directives()
    for key in ("ExecStartPre", "ExecStart", "ExecReload"):
        for line in unit[f"Service.{key}"]:
            binary, *args = shlex.split(line)
            if binary.endswith("/ollama-proxy"):
                args = [str(ROOT / "config.yaml") if a.endswith(".yaml") else a for a in args]
                assert check_cli([a for a in args if a != "--check"]) == (0, "")


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found: the unit is still parsed and checked")
    # verify wants every command to exist: stand the installed proxy in with a real program.
    text = UNIT.read_text().replace(
        "/opt/ollama-proxy/bin/ollama-proxy", shutil.which("true") or ""
    )
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    for args in (["verify"], ["security", "--offline=yes", "--threshold=20"]):
        result = subprocess.run(
            [analyze, *args, str(unit)], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, f"systemd-analyze {args[0]}: {result.stdout}{result.stderr}"


# -- Prometheus alerts -----------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_yaml_all(PROMETHEUS / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool() -> None:
    run_promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    run_promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_alert_rules_fire_as_intended() -> None:
    """promtool's unit tests: each alert fires on the series that should trigger it."""
    run_promtool("test", "rules", str(PROMETHEUS / "alerts.test.yml"))
    (tests,) = load_yaml_all(PROMETHEUS / "alerts.test.yml")
    tested = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_alerts_cover_the_failures_operators_page_on() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


# -- Grafana ---------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def dashboard_expressions() -> list[str]:
    board = dashboard()
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


def grafana_to_promql(expression: str) -> str:
    """Grafana's variables and macros replaced by values Prometheus accepts."""
    for macro, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
        expression = expression.replace(macro, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expression)


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def test_dashboard_panels_are_well_formed(tmp_path: Path) -> None:
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
    check_promql([grafana_to_promql(e) for e in dashboard_expressions()], tmp_path)


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set(METRIC_NAME.findall(" ".join(dashboard_expressions())))
    assert used >= {
        "ollama_proxy_in_flight",
        "ollama_proxy_node_max_concurrency",
        "ollama_proxy_queue_depth",
        "ollama_proxy_time_to_first_byte_seconds_bucket",
        "ollama_proxy_tokens_total",
        "ollama_proxy_generation_seconds_total",
        "ollama_proxy_upstream_errors_total",
        "ollama_proxy_retries_total",
        "ollama_proxy_node_up",
    }
    ttfb = [e for e in dashboard_expressions() if "time_to_first_byte" in e]
    assert any("histogram_quantile(0.5," in e for e in ttfb)
    assert any("histogram_quantile(0.99," in e for e in ttfb)


# -- metric names against a live scrape ------------------------------------------------------


def deploy_metric_uses() -> dict[str, set[str]]:
    """Every ollama_proxy_* name written anywhere under deploy/, with the files that use it."""
    uses: dict[str, set[str]] = {}
    for path in deploy_files(""):
        for name in METRIC_NAME.findall(path.read_text(encoding="utf-8")):
            uses.setdefault(name, set()).add(str(path.relative_to(DEPLOY)))
    return uses


async def test_alerts_and_dashboard_use_only_metrics_the_proxy_exports(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    scrape = await scrape_after_traffic(start_nodes, start_proxy)
    exported = exported_names(scrape)
    missing = {name: sorted(files) for name, files in deploy_metric_uses().items()}
    missing = {name: files for name, files in missing.items() if name not in exported}
    assert missing == {}, f"not in a live /metrics scrape: {missing}"
    expressions = [r["expr"] for r in alert_rules()] + dashboard_expressions()
    problems = [p for e in expressions for p in selector_label_problems(e, scrape)]
    assert problems == []
