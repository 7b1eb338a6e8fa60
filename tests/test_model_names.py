"""Model names as Ollama parses them: every spelling of one model reaches the nodes that list it,
with the client's own spelling in what the node gets."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from proxy.models import display_name, normalize_model, parse_name

from .conftest import Proxy, StartNodes, StartProxy, generations

# Listed by the node in one spelling, asked for in every other Ollama takes for the same model.
LISTED = ["llama3.2:latest", "HF.co/User/Repo:Q4_K_M", "someone/model:7b"]
FORMS = {
    "llama3.2:latest": [
        "llama3.2",
        "llama3.2:latest",
        "library/llama3.2",
        "library/llama3.2:latest",
        "registry.ollama.ai/library/llama3.2",
        "registry.ollama.ai/library/llama3.2:latest",
        "https://registry.ollama.ai/library/llama3.2:latest",
        "LLAMA3.2",
        "Llama3.2:Latest",
        "Registry.Ollama.AI/Library/llama3.2",
        "llama3.2:latest:local",  # Ollama's "this machine's copy" suffix
        " llama3.2 ",  # Ollama trims the name
    ],
    "HF.co/User/Repo:Q4_K_M": [
        "hf.co/user/repo:Q4_K_M",
        "hf.co/user/repo:q4_k_m",
        "HF.CO/USER/REPO:Q4_K_M",
    ],
    "someone/model:7b": [
        "someone/model:7b",
        "registry.ollama.ai/someone/model:7b",
        "SomeOne/Model:7B",
    ],
}


async def post(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)


def test_every_form_has_one_key() -> None:
    for listed, forms in FORMS.items():
        assert {normalize_model(form) for form in forms} == {normalize_model(listed)}, listed
    assert normalize_model("llama3.2") == "llama3.2:latest"  # the key is the shortest form


def test_names_ollama_refuses_match_no_other() -> None:
    digest = "llama3.2@sha256:" + "a" * 64  # Ollama reads no digest in a model name
    for name in (digest, "llama3.2:", "/llama3.2", "a/b/c/d", "ns.with.dots/m", "-x", "x" * 81):
        assert parse_name(name) is None, name
        assert normalize_model(name) == name  # as it came: it matches no listed model
    assert normalize_model("\u212aimi") != normalize_model("kimi")  # the Kelvin sign is no k


def test_display_name_is_what_ollama_lists() -> None:
    assert display_name("registry.ollama.ai/library/Llama3.2") == "Llama3.2:latest"
    assert display_name("hf.co/User/Repo") == "hf.co/User/Repo:latest"
    assert display_name("library/x:1b") == "x:1b"
    assert display_name("localhost:5000/ns/m") == "localhost:5000/ns/m:latest"


async def test_every_form_reaches_the_node_that_lists_the_model(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (holder,) = await start_nodes(1, models=LISTED, resident=LISTED)
    (other,) = await start_nodes(1, models=["qwen2.5:0.5b"], resident=["qwen2.5:0.5b"])
    proxy = await start_proxy([holder, other])
    asked = [form for forms in FORMS.values() for form in forms]
    for form in asked:
        status, body = await post(
            proxy, "/api/generate", {"model": form, "prompt": "x", "stream": False}
        )
        assert status == 200, (form, body)
        status, body = await post(
            proxy, "/v1/chat/completions", {"model": form, "messages": [{"role": "user"}]}
        )
        assert status == 200, (form, body)
    # The body went on unchanged: the node saw each name as the client spelt it.
    seen = [r.model for r in generations(holder)]
    assert seen == [form for form in asked for _ in range(2)]
    assert generations(other) == []


async def test_the_listing_side_meets_the_request_side(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    """Models listed in other spellings by two nodes are one model to routing and listings."""
    (a,) = await start_nodes(
        1, models=["HF.co/User/Repo:Q4_K_M"], resident=["HF.co/User/Repo:Q4_K_M"]
    )
    (b,) = await start_nodes(
        1, models=["hf.co/user/repo:Q4_K_M"], resident=["hf.co/user/repo:Q4_K_M"]
    )
    proxy = await start_proxy([a, b])
    body = {"model": "hf.co/user/repo:q4_k_m", "prompt": "x", "stream": False}
    answers = await asyncio.gather(*(post(proxy, "/api/generate", body) for _ in range(6)))
    assert [status for status, _ in answers] == [200] * 6
    assert generations(a) and generations(b)  # both nodes have it, in memory: shared out
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/api/tags") as resp:
            names = [m["name"] for m in (await resp.json())["models"]]
    assert len(names) == 1 and normalize_model(names[0]) == "hf.co/user/repo:q4_k_m"


@pytest.mark.parametrize("name", ["llama3.2@sha256:" + "a" * 64, "llama3.2:", "a/b/c/d"])
async def test_a_name_ollama_refuses_reaches_no_node(
    start_nodes: StartNodes, start_proxy: StartProxy, name: str
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    status, body = await post(proxy, "/api/generate", {"model": name, "prompt": "x"})
    assert status == 404, body
    assert generations(node) == []
