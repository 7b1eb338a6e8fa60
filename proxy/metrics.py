"""Every metric the proxy exports, defined once.

Updated once per request (never per streamed chunk). Gauges that mirror live state (in-flight,
node up, queue depth) are read from the pool at scrape time instead of being kept in step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import estimate
from .api import BLOBS_PREFIX, KNOWN_PATHS, OPENAI_MODEL_PREFIX
from .cache import RESULTS as CACHE_RESULTS
from .errors import FailureKind, ProxyError, RetryReason, Unavailable
from .exchange import Exchange
from .pool import Node, Pool
from .routing import REASONS as ROUTING_REASONS
from .state import SharedState
from .telemetry import Usage

# The *_created series double the output and no dashboard here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# From 1 ms (a cached listing) to tens of minutes (a cold load of a large model, a long
# generation); prometheus-client's defaults stop at 10 s.
TTFB_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    40,
    80,
    160,
    320,
    640,
    1280,
    2560,
)
DURATION_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    40,
    80,
    160,
    320,
    640,
    1280,
    2560,
    5120,
    10240,
)
QUEUE_REJECTIONS = ("full", "body_bytes", "timeout")  # a 503 from the queue, for these reasons
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


def endpoint_label(path: str) -> str:
    """A bounded label: known paths as they are, parameters folded, the rest "other"."""
    if path in KNOWN_PATHS:
        return path
    if path.startswith(BLOBS_PREFIX):
        return "/api/blobs/:digest"
    if path.startswith(OPENAI_MODEL_PREFIX):
        return "/v1/models/:model"
    return "other"


class Metrics:
    def __init__(self, pool: Pool, state: SharedState | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ollama_proxy_requests",
            "Requests answered, by node, endpoint and status code (499: the client left; 503 "
            "too when the proxy cut it at a stop).",
            ["node", "endpoint", "code"],
            registry=r,
        )
        self.queue_rejected = Counter(
            "ollama_proxy_queue_rejected",
            "Requests answered 503 because the queue was full or the wait timed out.",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "ollama_proxy_retries",
            "Requests sent again to another node before any byte reached the client.",
            ["reason"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "ollama_proxy_client_disconnects",
            "Requests whose client left before the end; the node's request was cancelled.",
            registry=r,
        )
        self.client_timeouts = Counter(
            "ollama_proxy_client_timeouts",
            "Requests dropped because their client took nothing of the answer for "
            "upstream.client_timeout (also counted as disconnects, status 499).",
            registry=r,
        )
        self.requests_cut = Counter(
            "ollama_proxy_requests_cut",
            "Requests the proxy itself ended before their answer did, by reason (drain: still "
            "running when a stop's drain ended); counted with status 503, not as disconnects.",
            ["reason"],
            registry=r,
        )
        self.resource_shortages = Counter(
            "ollama_proxy_resource_shortages",
            "Requests answered 503 because the proxy ran out of descriptors or buffers "
            "when connecting to a node; not counted against the node.",
            registry=r,
        )
        self.upstream_errors = Counter(
            "ollama_proxy_upstream_errors",
            "Failures talking to a node, by kind (connect, reset, timeout, broken, status_5xx).",
            ["node", "kind"],
            registry=r,
        )
        self.ttfb = Histogram(
            "ollama_proxy_time_to_first_byte_seconds",
            "From the request's arrival to the node's response headers (Ollama sends them with "
            "its first token).",
            ["node"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "ollama_proxy_request_duration_seconds",
            "From the request's arrival to its end.",
            ["node"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "ollama_proxy_queue_wait_seconds",
            "Time requests waited in the proxy for a slot.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "ollama_proxy_tokens",
            "Tokens processed, from the nodes' final chunks: prompt "
            "(prompt_eval_count) and completion (eval_count).",
            ["node", "model", "type"],
            registry=r,
        )
        self.generation_seconds = Counter(
            "ollama_proxy_generation_seconds",
            "Time nodes spent generating (eval_duration); "
            "completion tokens / this = tokens per second.",
            ["node", "model"],
            registry=r,
        )
        self.model_load = Histogram(
            "ollama_proxy_model_load_seconds",
            "Model load time reported by the node (load_duration).",
            ["node", "model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.lease_refusals = Counter(
            "ollama_proxy_lease_refusals",
            "Slots this replica chose that Redis refused, the node (or the model, or the key) "
            "being at its cap across the replicas; the request waited in the queue again.",
            ["node"],
            registry=r,
        )
        self.cold_loads = Counter(
            "ollama_proxy_cold_loads",
            "Requests sent to a node that did not hold their model "
            "in memory (it had to load it first).",
            ["node", "model"],
            registry=r,
        )
        self.config_reloads = Counter(
            "ollama_proxy_config_reloads",
            "Config reloads, by result (success, failure).",
            ["result"],
            registry=r,
        )
        # Per client key (tenants): label values are configured key names only, "" for a
        # request without a known key (none configured, missing or unknown).
        self.key_requests = Counter(
            "ollama_proxy_key_requests",
            "Requests answered, by client key and status code.",
            ["key", "code"],
            registry=r,
        )
        self.key_tokens = Counter(
            "ollama_proxy_key_tokens",
            "Tokens charged to each client key, from the final chunks: prompt and completion.",
            ["key", "type"],
            registry=r,
        )
        self.key_rejections = Counter(
            "ollama_proxy_key_rejections",
            "Requests refused for their key: unauthorized (401), forbidden (403), rate, tokens "
            "or concurrency (429).",
            ["key", "reason"],
            registry=r,
        )
        self.affinity = Counter(
            "ollama_proxy_affinity",
            "Chat requests of a known or new conversation, by result: hit (back to the node "
            "that served its last turn), moved (another node: load won, or that node is gone), "
            "new (no turn of it known).",
            ["result"],
            registry=r,
        )
        self.routing_decisions = Counter(
            "ollama_proxy_routing_decisions",
            "Requests given a slot, by why that node (affinity, fastest, spill, only_choice).",
            ["reason"],
            registry=r,
        )
        self.cache_requests = Counter(
            "ollama_proxy_cache_requests",
            "Embedding requests asked of the response cache, by result: hit (replayed, no "
            "node), miss, bypass (the client's Cache-Control: no-cache or no-store), "
            "no_digest (the model's nodes do not agree on its digest: not cached).",
            ["result"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "ollama_proxy_cache_bytes",
            "Bytes of answers the response cache holds in this process, or (with Redis) "
            "that this replica stored there and have not expired.",
            registry=r,
        )
        r.register(_PoolCollector(pool))
        r.register(_StateCollector(state))
        # The per-request series, each child looked up once: prometheus-client's labels()
        # takes a lock and checks its arguments (about 2 µs a call, 0.4 µs for the update).
        self._requests_for = functools.cache(self.requests.labels)
        self._ttfb_for = functools.cache(self.ttfb.labels)
        self._duration_for = functools.cache(self.duration.labels)
        self._tokens_for = functools.cache(self.tokens.labels)
        self._generation_seconds_for = functools.cache(self.generation_seconds.labels)
        self._model_load_for = functools.cache(self.model_load.labels)
        self._key_requests_for = functools.cache(self.key_requests.labels)
        self._key_tokens_for = functools.cache(self.key_tokens.labels)
        # Known label values start at 0, so the first event is an increase, not a new series.
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        for reason in QUEUE_REJECTIONS:
            self.queue_rejected.labels(reason)
        for reason in ("connect", "reset", "node_busy"):
            self.retries.labels(reason)
        self.requests_cut.labels("drain")
        for result in ("hit", "moved", "new"):
            self.affinity.labels(result)
        for reason in ROUTING_REASONS:
            self.routing_decisions.labels(reason)
        for result in CACHE_RESULTS:
            self.cache_requests.labels(result)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request_done(self, ex: Exchange, endpoint: str) -> None:
        node = ex.node.name if ex.node is not None else ""
        code = str(ex.reported_status or 500)  # 0: no answer was made
        self._requests_for(node, endpoint, code).inc()
        if ex.client_gone:
            self.client_disconnects.inc()
        if ex.cut is not None:
            self.requests_cut.labels(ex.cut).inc()
        if ex.first_byte is not None:
            self._ttfb_for(node).observe(ex.first_byte - ex.started)
        self._duration_for(node).observe(time.monotonic() - ex.started)
        if ex.usage is not None and ex.model_key is not None:
            self._usage(node, ex.model_key, ex.usage)
        if ex.affinity is not None:
            self.affinity.labels(ex.affinity).inc()
        self._key_done(ex, code)

    def _key_done(self, ex: Exchange, code: str) -> None:
        key = ex.key.name if ex.key is not None else ""
        self._key_requests_for(key, code).inc()
        if ex.rejection is not None:
            self.key_rejections.labels(key, ex.rejection).inc()
        if ex.usage is not None:
            self._key_tokens_for(key, "prompt").inc(ex.usage.prompt_tokens)
            self._key_tokens_for(key, "completion").inc(ex.usage.completion_tokens)

    def _usage(self, node: str, model: str, usage: Usage) -> None:
        self._tokens_for(node, model, "prompt").inc(usage.prompt_tokens)
        self._tokens_for(node, model, "completion").inc(usage.completion_tokens)
        if usage.eval_seconds > 0:
            self._generation_seconds_for(node, model).inc(usage.eval_seconds)
        if usage.load_seconds is not None:
            self._model_load_for(node, model).observe(usage.load_seconds)

    def watch_cache(self, held_bytes: Callable[[], float]) -> None:
        self.cache_bytes.set_function(held_bytes)

    def cache_result(self, result: str) -> None:
        self.cache_requests.labels(result).inc()

    def routing_decision(self, reason: str) -> None:
        self.routing_decisions.labels(reason).inc()

    def cold_load(self, node: Node, model: str) -> None:
        self.cold_loads.labels(node.name, model).inc()

    def config_reload(self, result: str) -> None:
        self.config_reloads.labels(result).inc()

    def proxy_error(self, exc: ProxyError) -> None:
        if isinstance(exc, Unavailable) and exc.reason in QUEUE_REJECTIONS:
            self.queue_rejected.labels(exc.reason).inc()
        elif isinstance(exc, Unavailable) and exc.reason == "resources":
            self.resource_shortages.inc()

    def client_timeout(self) -> None:
        self.client_timeouts.inc()

    def upstream_error(self, node: Node, kind: FailureKind) -> None:
        self.upstream_errors.labels(node.name, kind).inc()

    def retry(self, reason: RetryReason) -> None:
        self.retries.labels(reason).inc()

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def lease_refused(self, node: Node) -> None:
        self.lease_refusals.labels(node.name).inc()


class _StateCollector(Collector):
    """Whether the state replicas share is where the config puts it, read at scrape time."""

    def __init__(self, state: SharedState | None) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ollama_proxy_state_backend_up",
            'Where slots, key limits, affinity and the cache are kept: backend="redis" is 1 '
            "while the configured Redis answers and 0 while the replica serves on local state "
            'instead; backend="local" is 1 when no Redis is configured.',
            labels=["backend"],
        )
        if self.state is not None and self.state.configured:
            up.add_metric(["redis"], 1 if self.state.up else 0)
        else:
            up.add_metric(["local"], 1)
        yield up


class _PoolCollector(Collector):
    """Live state, read from the pool when Prometheus scrapes."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "ollama_proxy_in_flight", "Requests holding a slot on the node now.", labels=["node"]
        )
        other = GaugeMetricFamily(
            "ollama_proxy_other_in_flight",
            "Requests that take no slot (model information, unknown paths) on the node now.",
            labels=["node"],
        )
        cap = GaugeMetricFamily(
            "ollama_proxy_node_max_concurrency", "The node's max_concurrency.", labels=["node"]
        )
        up = GaugeMetricFamily(
            "ollama_proxy_node_up",
            "1 when the node passes its health checks (see node_draining for drained nodes).",
            labels=["node"],
        )
        draining = GaugeMetricFamily(
            "ollama_proxy_node_draining",
            "1 when the node takes no new requests: drained by an operator or removed from the "
            "config and finishing its requests.",
            labels=["node"],
        )
        speed = GaugeMetricFamily(
            "ollama_proxy_tokens_per_second",
            "Generation speed per node and model: a moving "
            "average of eval_count / eval_duration over recent answers.",
            labels=["node", "model"],
        )
        wait = GaugeMetricFamily(
            "ollama_proxy_node_expected_wait_seconds",
            "Expected seconds until one of the node's slots frees (0 when one is free now).",
            labels=["node"],
        )
        now = self.pool.clock()
        for node in self.pool.all_nodes():
            wait.add_metric([node.name], estimate.first_free_seconds(node, now))
            in_flight.add_metric([node.name], node.in_flight)
            other.add_metric([node.name], node.other_in_flight)
            cap.add_metric([node.name], node.config.max_concurrency)
            up.add_metric([node.name], 1 if node.up else 0)
            draining.add_metric([node.name], 1 if node.draining or node.removed else 0)
            for model, value in node.tokens_per_second.items():
                speed.add_metric([node.name, model], value)
        depth = GaugeMetricFamily(
            "ollama_proxy_queue_depth", "Requests waiting in the proxy for a slot."
        )
        depth.add_metric([], self.pool.queue_depth)
        capacity = GaugeMetricFamily(
            "ollama_proxy_queue_max_size", "Requests that may wait in the proxy (queue.max_size)."
        )
        capacity.add_metric([], self.pool.queue_config.max_size)
        body_bytes = GaugeMetricFamily(
            "ollama_proxy_queue_body_bytes", "Bytes of request bodies held by queued requests."
        )
        body_bytes.add_metric([], self.pool.queued_body_bytes)
        body_budget = GaugeMetricFamily(
            "ollama_proxy_queue_max_body_bytes",
            "Bytes of request bodies queued requests may hold in all (queue.max_body_bytes).",
        )
        body_budget.add_metric([], self.pool.queue_config.max_body_bytes)
        yield from (
            in_flight,
            other,
            cap,
            up,
            draining,
            depth,
            capacity,
            body_bytes,
            body_budget,
            speed,
            wait,
        )
