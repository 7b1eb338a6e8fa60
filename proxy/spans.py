"""One OpenTelemetry span per request, in the GenAI semantic conventions' terms.

Imported only when tracing is on (``tracing.from_environment``): this is the one module that
imports OpenTelemetry, so a proxy without the ``otel`` extra, or with no exporter configured,
never loads it. The span is the proxy's SERVER span for the client's request, a child of the
client's ``traceparent`` when it sent one; the node gets this span's ``traceparent`` in place
of the client's, so the node's own spans (if it makes any) hang below the proxy's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .http1 import RawHeaders

# The GenAI operation each inference path is (gen_ai.operation.name).
OPERATIONS = {
    "/api/chat": "chat",
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    "/api/generate": "text_completion",
    "/v1/completions": "text_completion",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
    "/v1/embeddings": "embeddings",
}
PROVIDER = "ollama"
TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
_PROPAGATOR = TraceContextTextMapPropagator()  # W3C trace context only: OTEL_PROPAGATORS unread
# Methods a span is named by; any other is "_OTHER" (a client may send any token as a method,
# and names must stay few: the HTTP semantic conventions' rule).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"})
_EXPORTERS_GROUP = "opentelemetry_traces_exporter"  # the entry points the exporter packages add
_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


class Tracing:
    """The proxy's tracer; ``begin`` makes one request's span."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("ollama_proxy")

    def begin(self, method: str, path: str, headers: Mapping[str, str], request_id: str) -> Span:
        parent = _PROPAGATOR.extract(headers)  # the client's traceparent and tracestate
        known = method if method in KNOWN_METHODS else "_OTHER"
        attributes = {
            "http.request.method": known,
            "url.path": path,
            "ollama_proxy.request_id": request_id,
        }
        span = self.tracer.start_span(
            known, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        return Span(span, known if known != "_OTHER" else "HTTP", OPERATIONS.get(path))

    def shutdown(self) -> None:
        """Export what is still buffered (at the proxy's stop)."""
        self.provider.shutdown()


class Span:
    """One request's span, told what the request path learns as it learns it."""

    def __init__(self, span: trace.Span, method: str, operation: str | None) -> None:
        self.span = span
        self.method = method
        self.operation = operation
        self.error: str | None = None  # what failed, when the node or the proxy did

    def admitted(self, node_name: str, node_url: str, queue_wait: float) -> None:
        """A node was chosen (again, on a retry): the span names the last one."""
        if not self.span.is_recording():  # sampled out
            return
        url = urlsplit(node_url)
        self.span.set_attributes(
            {
                "server.address": url.hostname or "",
                "server.port": url.port or (443 if url.scheme == "https" else 80),
                "ollama_proxy.node": node_name,
            }
        )
        self.span.add_event("admitted", {"ollama_proxy.queue_wait": queue_wait})

    def outgoing(self, headers: RawHeaders) -> RawHeaders:
        """The node's request headers with this span's trace context for the client's."""
        kept = [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS]
        return [*kept, *((k.encode(), v.encode()) for k, v in self.context_headers().items())]

    def context_headers(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) naming this span, for a request to a node."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier

    def first_byte(self, status: int) -> None:
        """The node's head came: whatever failed on an attempt before was retried past."""
        self.error = None
        self.span.add_event("first_byte", {"http.response.status_code": status})

    def failed(self, kind: str) -> None:
        """The node failed the request (``connect``, ``reset``, ``timeout``, ``broken``)."""
        self.error = kind
        self.span.add_event("node_failed", {"error.type": kind})

    def end(
        self,
        *,
        model: str | None,
        endpoint: str,
        status: int,
        tokens: tuple[int, int] | None,
        cut: str | None,
    ) -> None:
        """The request is over: name, outcome and token counts, then the span ends.

        ``cut`` says why it ended before its answer did: ``client_closed`` or the proxy's own
        reason (``drain``)."""
        span = self.span
        if not span.is_recording():  # sampled out
            span.end()
            return
        attributes: dict[str, str | int] = {}
        if self.operation is not None and model is not None:
            span.update_name(f"{self.operation} {model}")
            attributes["gen_ai.operation.name"] = self.operation
            attributes["gen_ai.provider.name"] = PROVIDER
            attributes["gen_ai.request.model"] = model
        else:
            span.update_name(f"{self.method} {endpoint}")
        if tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = tokens[0]
            attributes["gen_ai.usage.output_tokens"] = tokens[1]
        if status:
            attributes["http.response.status_code"] = status
        # A 4xx is the client's error, not the server span's (HTTP semantic conventions).
        error = cut or self.error or (str(status) if status >= 500 or not status else None)
        if error is not None:
            attributes["error.type"] = error
            span.set_status(Status(StatusCode.ERROR, _DESCRIPTIONS.get(error, error)))
        span.set_attributes(attributes)
        span.add_event("end")
        span.end()


_DESCRIPTIONS = {
    "client_closed": "the client left before the answer ended",
    "drain": "cut by the proxy's stop",
    "0": "ended without an answer",
}


def from_environment() -> Tracing:
    """A tracer provider as the SDK's environment variables describe it: the resource
    (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), the sampler (``OTEL_TRACES_SAMPLER``),
    batching (``OTEL_BSP_*``), and each exporter ``OTEL_TRACES_EXPORTER`` names (``otlp`` when
    it names none), which reads its own (``OTEL_EXPORTER_OTLP_*``)."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "ollama-proxy"}))  # named by none
    provider = TracerProvider(resource=resource)
    for exporter in exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


def exporter_names() -> list[str]:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip() or "otlp"
    return [name.strip() for name in names.split(",") if name.strip()]


def exporters() -> list[SpanExporter]:
    return [_exporter(name) for name in exporter_names()]


def _exporter(name: str) -> SpanExporter:
    """The exporter an entry point names, the way the SDK's autoconfiguration finds it; but
    ``otlp`` is OTLP over HTTP unless its protocol says grpc (the spec's default, and the
    package the extra installs)."""
    if name == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        name = _OTLP_BY_PROTOCOL.get(protocol.strip(), name)
    found = entry_points(group=_EXPORTERS_GROUP, name=name)
    if not found:
        raise LookupError(f"no trace exporter named {name!r} is installed")
    exporter: SpanExporter = next(iter(found)).load()()
    return exporter
