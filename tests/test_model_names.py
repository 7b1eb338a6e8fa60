"""Model names as Ollama parses them: every spelling of one model reaches the nodes that list it,
with the client's own spelling in what the node gets."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import ollama
import openai
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


REFUSED = ["llama3.2@sha256:" + "a" * 64, "llama3.2:", "a/b/c/d", "x" * 81, "bad name"]


@pytest.mark.parametrize("name", REFUSED)
async def test_a_name_ollama_refuses_gets_its_400_and_reaches_no_node(
    start_nodes: StartNodes, start_proxy: StartProxy, name: str
) -> None:
    """Ollama's 400 "invalid model name", in each API family's shape, before any node."""
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/show"):
        status, body = await post(proxy, path, {"model": name, "prompt": "x"})
        assert (status, body) == (400, {"error": "invalid model name"}), path
    async with ollama.AsyncClient(host=proxy.url) as client:
        with pytest.raises(ollama.ResponseError) as refused:
            await client.chat(model=name, messages=[{"role": "user", "content": "x"}])
    assert (refused.value.status_code, refused.value.error) == (400, "invalid model name")
    oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    await oai.close()
    assert bad.value.status_code == 400 and "invalid model name" in str(bad.value)
    assert generations(node) == []


async def test_fleet_paths_refuse_such_names_in_ollamas_words(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes)
    name = REFUSED[0]
    assert await post(proxy, "/api/pull", {"model": name}) == (
        400,
        {"error": "invalid model name"},
    )
    assert await post(proxy, "/api/create", {"model": name, "from": "llama3.2"}) == (
        400,
        {"error": "invalid model name"},
    )
    copied = await post(proxy, "/api/copy", {"source": "llama3.2", "destination": name})
    assert copied == (400, {"error": f'destination "{name}" is invalid'})
    copied = await post(proxy, "/api/copy", {"source": name, "destination": "x"})
    assert copied == (400, {"error": f'source "{name}" is invalid'})
    async with aiohttp.ClientSession() as session:
        async with session.delete(proxy.url + "/api/delete", json={"model": name}) as resp:
            assert (resp.status, await resp.json()) == (400, {"error": f'name "{name}" is invalid'})
    assert all(generations(node) == [] for node in nodes)


async def test_a_cloud_name_is_not_refused(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    (node,) = await start_nodes(1)
    proxy = await start_proxy([node])
    status, body = await post(proxy, "/api/generate", {"model": "gpt-oss:20b:cloud"})
    assert status == 404, body  # no node lists it: not Ollama's 400 for a name it refuses
