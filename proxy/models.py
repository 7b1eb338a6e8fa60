"""Model names as Ollama compares them, and requests whose meaning is about a model."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from .api import UNLOAD_PATHS

# Ollama's types/model ParseName: a missing host, namespace or tag takes these.
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
# Each part as Ollama's isValidPart takes it: host, namespace, model, tag. The first character
# is alphanumeric or "_"; a host may hold a port, a namespace no dot.
_PARTS = tuple(
    re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_{more}]{{0,{longest - 1}}}")
    for more, longest in ((r".:\-", 350), (r"\-", 80), (r".\-", 80), (r".\-", 80))
)


@dataclass(frozen=True)
class ModelName:
    """A name Ollama accepts, its missing parts filled in, each part as the client spelt it."""

    host: str
    namespace: str
    model: str
    tag: str

    def shortest(self) -> str:
        """Ollama's DisplayShortest: what /api/tags lists (``llama3.2:latest``,
        ``hf.co/user/repo:Q4_K_M``, ``user/model:7b``)."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


def parse_name(name: str) -> ModelName | None:
    """``[scheme://][host/][namespace/]model[:tag]`` as Ollama parses it, with its defaults;
    None for a name Ollama refuses (a part empty, too long or of other characters: a digest
    ``@sha256:...`` among them, since Ollama reads no digest in a model name)."""
    name = _without_local_suffix(name.strip())
    tag = DEFAULT_TAG
    if name.rfind(":") > name.rfind("/"):  # "/" is no tag character: a colon before is a port
        name, tag = name.rsplit(":", 1)
    *rest, model = name.rsplit("/", 2)
    namespace = rest[-1] if rest else DEFAULT_NAMESPACE
    host = rest[0].split("://", 1)[-1] if len(rest) == 2 else DEFAULT_HOST
    parts = (host, namespace, model, tag)
    if not all(valid.fullmatch(part) for valid, part in zip(_PARTS, parts, strict=True)):
        return None
    return ModelName(*parts)


# Ollama's errtypes.InvalidModelNameErrMsg: its 400 for a name ParseName refuses (generate, chat,
# embed, show, pull, create and the OpenAI paths; delete and copy say it in their own words).
INVALID_MODEL_NAME = "invalid model name"


def refused_name(name: str) -> bool:
    """A name Ollama answers 400 for before it looks for the model. Not an empty one (its "model
    is required" or 404 stays), nor one asking for ollama.com's copy (``:cloud``), which Ollama
    takes off before it parses the rest."""
    if not name.strip():
        return False
    base, colon, suffix = name.strip().rpartition(":")
    if colon and suffix == "cloud" and parse_name(base) is not None:
        return False
    return parse_name(name) is None


def _without_local_suffix(name: str) -> str:
    """Ollama reads a last ``:local`` as "this machine's copy" (``llama3.2:1b:local``), not as
    a tag. (``:cloud`` asks a node to send the request to ollama.com instead: another model.)"""
    before, colon, suffix = name.rpartition(":")
    return before if colon and suffix.strip().lower() == "local" else name


def display_name(name: str) -> str:
    """The name as Ollama lists it (its shortest form, the client's case kept); a name Ollama
    refuses as it came."""
    parsed = parse_name(name)
    return parsed.shortest() if parsed is not None else name.strip()


@functools.lru_cache(maxsize=4096)  # asked per request and per listed model, of few names
def normalize_model(name: str) -> str:
    """One key per model, as Ollama matches names: ``llama3.2``, ``llama3.2:latest``,
    ``library/llama3.2``, ``registry.ollama.ai/library/llama3.2:latest`` and ``LLAMA3.2`` are
    one model (Ollama compares each part ignoring ASCII case), keyed ``llama3.2:latest``.

    A name Ollama refuses keys as it came: it matches no name a node lists (lowercased, the
    Kelvin sign would turn ``\u212aimi`` into ``kimi``)."""
    parsed = parse_name(name)
    return parsed.shortest().lower() if parsed is not None else name.strip()


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
