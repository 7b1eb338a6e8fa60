"""OpenTelemetry traces: one span per request in the GenAI conventions' terms, the W3C trace
context taken from the client and given to the node, and nothing at all when it is off."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import pytest
import yaml
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.app import RUNTIME
from proxy.sim import SimNode
from proxy.spans import Tracing
from proxy.tracing import configured

from .conftest import Proxy, StartNodes, StartProxy, free_port, proxy_subprocess, wait_until

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(
    start_nodes: StartNodes, start_proxy: StartProxy, exporter: InMemorySpanExporter
) -> tuple[Proxy, SimNode]:
    """A proxy whose spans go to ``exporter``, in front of one node."""
    (node,) = await start_nodes(1, tokens=5, token_interval=0.001)
    proxy = await start_proxy([node])
    trace_to(proxy, exporter)
    return proxy, node


def trace_to(proxy: Proxy, exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    proxy.app[RUNTIME].forwarder.tracing = Tracing(provider)


async def one_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    """The one span ended (a stream's ends just after its client has read the last byte)."""
    await wait_until(lambda: len(exporter.get_finished_spans()) >= 1, what="a span ended")
    (span,) = exporter.get_finished_spans()
    return span


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def node_context(node: SimNode) -> tuple[str, str]:
    """The trace id and parent span id in the traceparent the node got last."""
    traceparent = node_traceparent(node)
    assert traceparent is not None
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


def node_traceparent(node: SimNode) -> str | None:
    """The traceparent of the last request a client sent (health checks and discovery GET)."""
    seen = [r for r in node.stats.requests if r.method == "POST"][-1]
    headers = {k.lower(): v for k, v in seen.headers.items()}
    return headers.get("traceparent")


async def post(url: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            answer: dict[str, Any] = await resp.json()
            return answer


async def test_a_chat_is_one_genai_span(
    traced: tuple[Proxy, SimNode], exporter: InMemorySpanExporter
) -> None:
    proxy, node = traced
    answer = await post(proxy.url + "/api/chat", CHAT)
    span = await one_span(exporter)
    assert span.name == "chat llama3.2"
    assert span.kind is SpanKind.SERVER
    port = int(node.url.rsplit(":", 1)[1])
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "url.path": "/api/chat",
        "ollama_proxy.request_id": dict(span.attributes or {})["ollama_proxy.request_id"],
        "server.address": "127.0.0.1",
        "server.port": port,
        "ollama_proxy.node": node.name,
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": "llama3.2",
        "gen_ai.usage.input_tokens": answer["prompt_eval_count"],
        "gen_ai.usage.output_tokens": answer["eval_count"],
        "http.response.status_code": 200,
    }
    assert [e.name for e in span.events] == ["admitted", "first_byte", "end"]
    assert span.events[0].attributes == {"ollama_proxy.queue_wait": pytest.approx(0, abs=0.5)}
    assert span.status.status_code is StatusCode.UNSET
    assert span.parent is None  # the client sent no traceparent: the proxy's span is the root


async def test_the_clients_traceparent_is_the_parent_and_the_node_gets_the_proxys(
    traced: tuple[Proxy, SimNode], exporter: InMemorySpanExporter
) -> None:
    proxy, node = traced
    await post(proxy.url + "/api/chat", CHAT, traceparent=TRACEPARENT, tracestate="vendor=x")
    span = await one_span(exporter)
    trace_id, span_id = hex_ids(span)
    assert trace_id == CLIENT_TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == CLIENT_SPAN
    assert span.parent.is_remote
    assert node_context(node) == (CLIENT_TRACE, span_id)
    (seen,) = [r for r in node.stats.requests if r.path == "/api/chat"]
    assert [v for k, v in seen.headers.items() if k.lower() == "tracestate"] == ["vendor=x"]


async def test_a_stream_through_the_ollama_client(
    traced: tuple[Proxy, SimNode], exporter: InMemorySpanExporter
) -> None:
    proxy, node = traced
    client = ollama.AsyncClient(host=proxy.url)
    try:
        stream = await client.chat("llama3.2", messages=CHAT["messages"], stream=True)
        parts = [part async for part in stream]
    finally:
        await client.close()
    span = await one_span(exporter)
    trace_id, span_id = hex_ids(span)
    assert node_context(node) == (trace_id, span_id)  # a new trace, the proxy's
    attributes = span.attributes or {}
    assert attributes["gen_ai.usage.output_tokens"] == parts[-1].eval_count == 5
    assert attributes["gen_ai.usage.input_tokens"] == parts[-1].prompt_eval_count
    assert span.name == "chat llama3.2"
    first_byte, end = span.events[1].timestamp, span.events[2].timestamp
    assert first_byte is not None and end is not None and first_byte < end


@pytest.mark.parametrize(
    ("path", "body", "name"),
    [
        (
            "/api/generate",
            {"model": "llama3.2", "prompt": "hi", "stream": False},
            "text_completion",
        ),
        ("/v1/chat/completions", {"model": "llama3.2", "messages": CHAT["messages"]}, "chat"),
        ("/api/embed", {"model": "llama3.2", "input": "hi"}, "embeddings"),
    ],
)
async def test_each_path_is_its_operation(
    traced: tuple[Proxy, SimNode],
    exporter: InMemorySpanExporter,
    path: str,
    body: dict[str, Any],
    name: str,
) -> None:
    proxy, _ = traced
    await post(proxy.url + path, body)
    span = await one_span(exporter)
    assert span.name == f"{name} llama3.2"
    assert (span.attributes or {})["gen_ai.operation.name"] == name
    assert (span.attributes or {})["gen_ai.usage.input_tokens"] > 0


async def test_other_requests_are_named_by_method_and_route(
    traced: tuple[Proxy, SimNode], exporter: InMemorySpanExporter
) -> None:
    proxy, _ = traced
    await post(proxy.url + "/api/show", {"model": "llama3.2"})
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/api/tags") as resp:
        assert resp.status == 200
    async with aiohttp.ClientSession() as session:
        async with session.request("PROPFIND", proxy.url + "/pot") as resp:
            assert resp.status == 404  # the node's answer to a path it does not know
    await wait_until(lambda: len(exporter.get_finished_spans()) == 3, what="three spans")
    names = sorted(span.name for span in exporter.get_finished_spans())
    assert names == ["GET /api/tags", "HTTP other", "POST /api/show"]  # names stay few
    assert all(
        "gen_ai.operation.name" not in (s.attributes or {}) for s in exporter.get_finished_spans()
    )


async def test_a_fan_out_gives_every_node_the_proxys_span(
    start_nodes: StartNodes, start_proxy: StartProxy, exporter: InMemorySpanExporter
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes)
    trace_to(proxy, exporter)
    body = {"model": "tinyllama", "stream": False}
    await post(proxy.url + "/api/pull", body, traceparent=TRACEPARENT)
    span = await one_span(exporter)
    assert span.name == "POST /api/pull"
    _, span_id = hex_ids(span)
    for node in nodes:
        (pull,) = [r for r in node.stats.requests if r.path == "/api/pull"]
        assert pull.headers.get("traceparent", "").split("-")[1:3] == [CLIENT_TRACE, span_id]


async def test_a_client_that_leaves_ends_the_span_in_error(
    start_nodes: StartNodes, start_proxy: StartProxy, exporter: InMemorySpanExporter
) -> None:
    (node,) = await start_nodes(1, tokens=200, token_interval=0.02)
    proxy = await start_proxy([node])
    trace_to(proxy, exporter)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + "/api/chat", json={**CHAT, "stream": True})
        await resp.content.readline()
        resp.close()
    await node.wait_for(lambda s: s.cancelled == 1, timeout=5)
    span = await one_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "the client left before the answer ended"
    assert (span.attributes or {})["error.type"] == "client_closed"
    assert "gen_ai.usage.output_tokens" not in (span.attributes or {})
    assert [e.name for e in span.events] == ["admitted", "first_byte", "end"]


async def test_admission_tells_the_queue_wait_and_leaving_the_queue_is_an_error(
    start_nodes: StartNodes, start_proxy: StartProxy, exporter: InMemorySpanExporter
) -> None:
    (node,) = await start_nodes(1, tokens=30, token_interval=0.01)
    proxy = await start_proxy([node], caps=[1])
    trace_to(proxy, exporter)
    async with aiohttp.ClientSession() as session:
        holder = await session.post(proxy.url + "/api/chat", json={**CHAT, "stream": True})
        waiter = asyncio.create_task(post(proxy.url + "/api/chat", CHAT))
        leaver = asyncio.create_task(session.post(proxy.url + "/api/chat", json=CHAT))
        await wait_until(lambda: proxy.pool.queue_depth == 2, what="two queued")
        leaver.cancel()
        await wait_until(lambda: proxy.pool.queue_depth == 1, what="one left the queue")
        await holder.read()
        await waiter
    await wait_until(lambda: len(exporter.get_finished_spans()) == 3, what="three spans")
    left, held, waited = exporter.get_finished_spans()  # in the order they ended
    assert [e.name for e in left.events] == ["end"]  # never admitted
    assert (left.attributes or {})["error.type"] == "client_closed"
    assert left.status.status_code is StatusCode.ERROR
    admitted = {span: (span.events[0].attributes or {}) for span in (held, waited)}
    assert admitted[held]["ollama_proxy.queue_wait"] < 0.1
    assert admitted[waited]["ollama_proxy.queue_wait"] >= 0.2  # behind 30 tokens of 10 ms
    assert waited.status.status_code is StatusCode.UNSET


async def test_a_node_that_fails_mid_stream_ends_the_span_in_error(
    start_nodes: StartNodes, start_proxy: StartProxy, exporter: InMemorySpanExporter
) -> None:
    (node,) = await start_nodes(1, fault="die", token_interval=0.001)
    proxy = await start_proxy([node])
    trace_to(proxy, exporter)
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/chat", json={**CHAT, "stream": True}) as resp:
            assert resp.status == 200
            with contextlib.suppress(aiohttp.ClientPayloadError):
                await resp.read()
    span = await one_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "broken"
    assert [e.name for e in span.events] == ["admitted", "first_byte", "node_failed", "end"]


# -- off: nothing at all -------------------------------------------------------------------


async def test_untraced_the_node_gets_only_the_clients_own_trace_context(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1, tokens=2, token_interval=0.001)
    proxy = await start_proxy([node])
    assert proxy.app[RUNTIME].forwarder.tracing is None
    await post(proxy.url + "/api/chat", CHAT)
    assert node_traceparent(node) is None  # none invented
    await post(proxy.url + "/api/chat", CHAT, traceparent=TRACEPARENT)
    assert node_traceparent(node) == TRACEPARENT  # passed on as any header, unchanged


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "p"}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_what_configured_means(environ: dict[str, str], on: bool) -> None:
    assert configured(environ) is on


IMPORTS_CHECK = """
import asyncio, sys
from proxy.app import RUNTIME, make_app
from proxy.config import parse_config

async def main():
    runtime = make_app(parse_config({"nodes": [{"url": "http://127.0.0.1:9"}]}))[RUNTIME]
    await runtime.aclose()
    loaded = [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]
    print(runtime.forwarder.tracing is not None, len(loaded))

asyncio.run(main())
"""


@pytest.mark.parametrize(("exporter_name", "seen"), [(None, "False 0"), ("console", "True")])
def test_untraced_the_proxy_never_imports_opentelemetry(
    exporter_name: str | None, seen: str
) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if exporter_name is not None:
        environ["OTEL_TRACES_EXPORTER"] = exporter_name
    run = subprocess.run(
        [sys.executable, "-c", IMPORTS_CHECK],
        env=environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert run.stdout.startswith(seen)


# -- the real process, configured by the environment alone ---------------------------------


@contextlib.asynccontextmanager
async def collector() -> AsyncIterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """An OTLP/HTTP endpoint on loopback that keeps what it is sent."""
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def test_otel_variables_turn_tracing_on_in_the_real_process(
    start_nodes: StartNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (node,) = await start_nodes(1, tokens=3, token_interval=0.001)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"nodes": [{"url": node.url}]}))
    async with collector() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # milliseconds: export at once
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with proxy_subprocess(config) as (url, _):
            await post(url + "/api/chat", CHAT, traceparent=TRACEPARENT)
            await wait_until(lambda: bool(received), what="spans exported", timeout=10)
    (resource_spans,) = received[0].resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "ollama-proxy"
    (span,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert span.name == "chat llama3.2"
    assert span.trace_id.hex() == CLIENT_TRACE and span.parent_span_id.hex() == CLIENT_SPAN
    assert node_context(node) == (CLIENT_TRACE, span.span_id.hex())
