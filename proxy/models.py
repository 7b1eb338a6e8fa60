"""Model names as Ollama compares them."""

from __future__ import annotations


def normalize_model(name: str) -> str:
    """``llama3.2`` and ``llama3.2:latest`` are one model to Ollama; so they are here."""
    name = name.strip()
    last_part = name.rsplit("/", 1)[-1]
    return name if ":" in last_part or not name else name + ":latest"
