"""Whether requests are traced: decided once, at start, from the standard ``OTEL_*`` variables.

Tracing is on when the ``otel`` extra is installed, ``OTEL_SDK_DISABLED`` is not ``true``, and
``OTEL_TRACES_EXPORTER`` names an exporter (not ``none``) or, with it unset, an OTLP endpoint
is given (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). Otherwise
the forwarder holds ``None`` and the request path's hooks are one ``is not None`` each:
OpenTelemetry is not even imported (``spans.py`` is the module that imports it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spans import Tracing

log = logging.getLogger("ollama_proxy")

ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def configured(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (it says nothing about the extra)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return any(environ.get(name, "").strip() for name in ENDPOINTS)


def from_environment(environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """The tracer the environment asks for, or None: unconfigured, the extra missing, or an
    exporter that cannot be made (logged; the proxy serves untraced rather than not at all)."""
    if not configured(environ):
        return None
    try:
        from . import spans
    except ImportError as exc:
        log.warning("OTEL_* asks for traces but the otel extra is not installed: %s", exc)
        return None
    try:
        tracing = spans.from_environment()
    except (LookupError, ImportError, ValueError) as exc:
        log.error("tracing is off: its exporter could not be made: %s", exc)
        return None
    log.info("tracing requests (OpenTelemetry, exporters: %s)", ", ".join(spans.exporter_names()))
    return tracing
