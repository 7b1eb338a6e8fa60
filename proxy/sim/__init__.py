"""A simulated Ollama server: the stand-in for real nodes in tests, demos and benchmarks.

A SimNode speaks Ollama's wire format (the native NDJSON API and the OpenAI-compatible /v1 API)
writing readable made-up prose, deterministic per seed (``options.seed``, else the prompt's
words; ``answer_text`` computes it for a test), streaming on every path Ollama streams
(Responses and Anthropic Messages as their named SSE events), calling the first offered tool,
thinking when asked, answering a ``format`` with JSON that fits it, and a request with nothing
to generate with ``done_reason: "load"``. It reproduces what a load balancer has to cope
with: a limited number of parallel generations behind a bounded queue (503 when it is full),
slow cold loads of models that are not in memory (and, with ``max_loaded``, the eviction of the
least recently used one to make room), each slot's KV cache (a request takes the free slot
whose cached text shares the longest prefix with its prompt, as Ollama's runner does, and
pays ``prefill_per_token`` only for the rest: a chat's next turn is cheap on the node that
served the last one; unloading a model empties its slots), prompt cancellation when the
client goes away, and injected faults (500s, 503s, streams that stall or die, refused connections).

Settings are read per request, so a test can change them while the node runs. Besides Ollama's
API, ``GET /-/sim/stats`` answers the node's counters (SimStats without its request list) and
the models in memory, for harnesses that run nodes as separate processes.

Run nodes as a separate process with ``python -m proxy.sim --port 11501 --port 11502``.

The package plays Ollama; of the proxy it shares only ``proxy.models``, Ollama's own rules for
model names and unload requests (one definition of them). Its modules, in import order:
settings (what a node is told and reports), wire (JSON, errors, request bodies as Ollama's Go
decoder reads them), catalog (the models' made-up data and listings), plans (what a request
asks for), replies (what the model says), formats (how each endpoint frames a generation),
events (the Responses and Messages event streams), slots (parallel slots and the
queue), faults, memory (models on disk and in memory), generation (the work and its
endpoints), server (SimNode) and __main__.
"""

from __future__ import annotations

from ..models import normalize_model
from .replies import answer_text, answer_tokens
from .server import SimNode
from .settings import BUSY_MESSAGE, RUNNER_DIED_MESSAGE, SimRequest, SimSettings, SimStats

__all__ = [
    "BUSY_MESSAGE",
    "RUNNER_DIED_MESSAGE",
    "SimNode",
    "SimRequest",
    "SimSettings",
    "SimStats",
    "answer_text",
    "answer_tokens",
    "normalize_model",
]
