"""One access log line per request, written when it ends (never per chunk)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .config import AccessLogConfig
from .exchange import Exchange

log = logging.getLogger("ollama_proxy.access")


class AccessLog:
    def __init__(self, config: AccessLogConfig) -> None:
        self.enabled = config.enabled
        self.format = config.format

    def record(self, ex: Exchange) -> None:
        if not self.enabled or not log.isEnabledFor(logging.INFO):
            return
        fields = access_fields(ex)
        if self.format == "json":
            log.info(json.dumps(fields, separators=(",", ":")))
        else:
            log.info(" ".join(f"{key}={_text(value)}" for key, value in fields.items()))


def access_fields(ex: Exchange) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "id": ex.request_id,
        "client": ex.client,
        "method": ex.method,
        "path": ex.path,
        "model": ex.model,
        "node": ex.node.name if ex.node is not None else None,
        "status": ex.reported_status,
        "queue_s": round(ex.queue_wait, 4),
        "ttfb_s": round(ex.first_byte - ex.started, 4) if ex.first_byte else None,
        "duration_s": round(now - ex.started, 4),
        "tokens_in": ex.usage.prompt_tokens if ex.usage else None,
        "tokens_out": ex.usage.completion_tokens if ex.usage else None,
        "retries": max(0, ex.attempts - 1),
    }


def _text(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    return json.dumps(text) if (" " in text or '"' in text or not text) else text
