"""Model names as Ollama compares them, and requests whose meaning is about a model."""

from __future__ import annotations

from typing import Any

from .api import UNLOAD_PATHS


def normalize_model(name: str) -> str:
    """``llama3.2`` and ``llama3.2:latest`` are one model to Ollama; so they are here."""
    name = name.strip()
    last_part = name.rsplit("/", 1)[-1]
    return name if ":" in last_part or not name else name + ":latest"


def is_unload_request(path: str, body: dict[str, Any]) -> bool:
    """Ollama's unload request: ``keep_alive`` 0 and nothing to generate (``ollama stop``).

    ``body`` holds its fields as Ollama reads them, under their own names (``Prompt`` is the
    prompt): ``bodies.json_object`` for the proxy, the simulator's own reading for it."""
    keep_alive = body.get("keep_alive")
    if path not in UNLOAD_PATHS or isinstance(keep_alive, bool) or keep_alive not in UNLOAD:
        return False
    if path == "/api/chat":
        return not body.get("messages")
    return not body.get("prompt") and not body.get("images")


UNLOAD = (0, "0", "0s", "0m")  # not False, though False == 0: Ollama refuses a bool there
