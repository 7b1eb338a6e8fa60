"""The Ollama API's paths as the proxy sorts them, defined once."""

from __future__ import annotations

# Answers that carry token counts in their final chunk (or their body).
TELEMETRY_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    }
)
# Inference whose body is a form (multipart/form-data), its model one of the fields.
FORM_PATHS = frozenset({"/v1/audio/transcriptions"})
# Inference: these take a slot on the node (a generation or an embedding on its GPU). The
# transcription path is counted as requests only.
INFERENCE_PATHS = TELEMETRY_PATHS | FORM_PATHS
# Answered by one node that has the model, taking no slot.
MODEL_INFO_PATHS = frozenset({"/api/show", "/api/push"})
MODEL_REQUIRED_PATHS = INFERENCE_PATHS | MODEL_INFO_PATHS
# Where `keep_alive: 0` with nothing to generate unloads a model (`ollama stop`).
UNLOAD_PATHS = frozenset({"/api/generate", "/api/chat"})
# Answered from every node's answer, merged (fleet.py).
LISTING_PATHS = frozenset({"/api/tags", "/api/ps", "/v1/models", "/api/version"})
# Sent to every node that should have the result (fleet.py); blobs are under BLOBS_PREFIX.
FANOUT_PATHS = frozenset({"/api/pull", "/api/create", "/api/copy", "/api/delete"})
BLOBS_PREFIX = "/api/blobs/"
OPENAI_MODEL_PREFIX = "/v1/models/"

KNOWN_PATHS = MODEL_REQUIRED_PATHS | LISTING_PATHS | FANOUT_PATHS | {"/"}
# The methods Ollama's router takes (server/routes.go) on its paths that go on to one node:
# any other method is answered 405 by the proxy, as by Ollama, and never reaches a node. The
# listings and fan-out paths are routed with their methods by fleet.py; paths not named here
# (Ollama's newer cloud and experimental ones, or one a future Ollama adds) go to a node with
# any method.
FORWARDED_ROUTES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(sorted(INFERENCE_PATHS | MODEL_INFO_PATHS), ("POST",)),
    "/v1/audio/transcriptions": ("POST",),
    OPENAI_MODEL_PREFIX + "{model}": ("GET",),
}
