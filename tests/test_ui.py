"""The dashboard (``/-/ui/``) in a real headless chromium, driven by Playwright for Python with
Debian's browser: sign in, every node with its slots and models, a slot bar that moves while a
request runs, a drain from the page that routing then respects, the playground's chat with a
Stop the node sees, and no error in the browser's console.

The last test's screenshot is the README's: ``UPDATE_SCREENSHOT=1`` writes it to
``docs/dashboard.png`` (otherwise to the test's temporary folder, so runs leave the tree clean).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import Proxy, StartNodes, StartProxy, generations, wait_until

TOKEN = "admin-secret"
DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = shutil.which("chromium")
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@contextlib.asynccontextmanager
async def dashboard(proxy: Proxy, viewport: dict[str, int] = LAPTOP) -> AsyncIterator[Any]:
    """The page open in chromium; on leaving, nothing may have gone to its console as an error
    or a warning, and no script may have raised."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian's package; .ci/run installs it)")
    async_api = pytest.importorskip("playwright.async_api")
    problems: list[str] = []
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport=viewport)
            page.set_default_timeout(5000)
            page.on("console", lambda m: _complain(problems, m))
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            await page.goto(proxy.url + "/-/ui/")
            yield page
        finally:
            await browser.close()
    assert problems == []


def _complain(problems: list[str], message: Any) -> None:
    if message.type in ("error", "warning"):
        problems.append(f"console {message.type}: {message.text}")


async def sign_in(page: Any, secret: str, *, opens: bool = True) -> None:
    """By keyboard: the page puts the focus in the token field."""
    await page.get_by_label("Admin token").wait_for()
    await page.keyboard.type(secret)
    await page.keyboard.press("Enter")
    if opens:
        await page.locator("#dashboard").wait_for()


def card(page: Any, name: str) -> Any:
    return page.locator(f'[data-node="{name}"]')


async def generate(proxy: Proxy, headers: dict[str, str] | None = None, **body: Any) -> int:
    request = {"model": "llama3.2", "prompt": "hi", "stream": False, **body}
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/api/generate", json=request, headers=headers) as r,
    ):
        await r.read()
        return r.status


async def test_sign_in_and_see_every_node_with_its_slots_and_models_and_a_bar_move(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(3, token_interval=0.02, tokens=8)
    proxy = await start_proxy(nodes, caps=[2, 4, 4], admin={"token": TOKEN})
    async with dashboard(proxy) as page:
        await sign_in(page, "wrong", opens=False)
        await page.get_by_text("That token does not open the admin paths.").wait_for()
        await sign_in(page, TOKEN)
        for node, cap in zip(nodes, [2, 4, 4], strict=True):
            await card(page, node.name).get_by_text(f"0 / {cap} slots").wait_for()
            models = card(page, node.name).locator(".model")
            assert await models.count() == 3  # the sim's three models on disk
            memory = card(page, node.name).locator(".model", has_text="llama3.2:latest")
            assert "in memory until" in await memory.inner_text()
        # 1.5 s: a snapshot (one a second) comes while it runs.
        running = asyncio.create_task(generate(proxy, options={"num_predict": 75}))
        moved = page.locator('.bar[aria-valuenow="1"]')
        await moved.wait_for()
        assert await moved.count() == 1
        assert await running == 200
        await moved.wait_for(state="detached")  # back to 0 once it ended
        # The request is listed with its node and tokens; the fleet has learned a speed.
        (served,) = [n for n in nodes if generations(n)]
        row = page.locator("#requests tbody tr").first
        await row.get_by_text(served.name, exact=True).wait_for()
        assert "/api/generate" in await row.inner_text()
        await card(page, served.name).get_by_text("tok/s").wait_for()


async def test_drain_a_node_from_the_page_and_routing_avoids_it(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2)
    proxy = await start_proxy(nodes, admin={"token": TOKEN})
    drained, other = nodes
    async with dashboard(proxy) as page:
        await sign_in(page, TOKEN)
        button = page.get_by_role("button", name=f"Drain {drained.name}")
        await button.focus()
        await page.keyboard.press("Enter")
        await card(page, drained.name).locator(".badge", has_text="draining").wait_for()
        assert proxy.pool.nodes[drained.name].draining
        statuses = await asyncio.gather(*(generate(proxy) for _ in range(8)))
        assert statuses == [200] * 8
        assert len(generations(drained)) == 0 and len(generations(other)) == 8
        await page.get_by_role("button", name=f"Undrain {drained.name}").click()
        await card(page, drained.name).locator(".badge", has_text="ready").wait_for()
        assert not proxy.pool.nodes[drained.name].draining


async def send(page: Any, text: str) -> Any:
    """Type a message and press Enter; the new answer's turn in the transcript."""
    await page.get_by_label("Message").fill(text)
    await page.get_by_label("Message").press("Enter")
    return page.locator(".turn.assistant").last


async def test_chat_in_the_playground_and_stop_it_on_the_node(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    nodes = await start_nodes(2, token_interval=0.01, tokens=12)
    proxy = await start_proxy(nodes, admin={"token": TOKEN})
    async with dashboard(proxy) as page:
        await sign_in(page, TOKEN)
        await page.locator("#model option", has_text="llama3.2:latest").wait_for(state="attached")
        await page.get_by_label("Model").select_option("llama3.2:latest")
        first = await send(page, "hello there")
        await first.locator(".meta", has_text="tokens/s").wait_for()
        assert (await first.locator(".answer-text").inner_text()).strip()
        (served,) = [n for n in nodes if generations(n)]
        assert f"node {served.name}" in await first.locator(".meta").inner_text()
        second = await send(page, "and then?")
        await second.locator(".meta", has_text="tokens/s").wait_for()
        # Multi-turn: the history went along, and affinity sent it back to the same node.
        turn = generations(served)[-1]
        assert [m["role"] for m in turn.json["messages"]] == ["user", "assistant", "user"]
        assert f"node {served.name}" in await second.locator(".meta").inner_text()
        for node in nodes:
            node.settings.token_interval = 0.5  # long enough to stop halfway
            node.settings.tokens = 100
        third = await send(page, "tell me everything")
        await page.wait_for_function(
            "document.querySelector('.turn.assistant:last-child .answer-text').textContent"
        )
        await page.get_by_role("button", name="Stop").click()
        stopped = time.monotonic()
        await wait_until(lambda: sum(n.stats.cancelled for n in nodes) == 1, timeout=1.0)
        assert time.monotonic() - stopped < 1.0
        await third.locator(".meta", has_text="stopped").wait_for()
        assert await page.get_by_role("button", name="Send").is_enabled()


def key_entry(name: str, secret: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "key_sha256": hashlib.sha256(secret.encode()).hexdigest(), **extra}


async def test_the_page_reads_on_a_phone_and_shows_usage_per_key(
    start_nodes: StartNodes, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """With keys (one with ``admin``), after some traffic: usage per key, and a page that fits
    a phone's width. Its laptop-sized screenshot is the README's."""
    nodes = await start_nodes(3, token_interval=0.02, tokens=30)
    keys = [
        key_entry("ops", "ops-secret", admin=True),
        key_entry("alice", "alice-secret", requests_per_minute=60, tokens_per_minute=5000),
        key_entry("bob", "bob-secret", tokens_per_day=100_000),
    ]
    proxy = await start_proxy(nodes, caps=[2, 2, 4], auth={"keys": keys})
    alice, bob = ({"Authorization": f"Bearer {who}-secret"} for who in ("alice", "bob"))
    await asyncio.gather(*(generate(proxy, alice) for _ in range(5)), generate(proxy, bob))
    proxy.pool.nodes[nodes[2].name].draining = True
    proxy.pool.changed()
    async with dashboard(proxy, PHONE) as page:
        await sign_in(page, "ops-secret")
        usage = page.locator("#usage tbody tr", has_text="alice")
        await usage.get_by_text("5 / 60").wait_for()
        fits = "document.documentElement.scrollWidth <= window.innerWidth"
        assert await page.evaluate(fits)
        await page.set_viewport_size(LAPTOP)
        await page.get_by_label("Model").select_option("llama3.2:latest")
        answer = await send(page, "hello")
        await answer.locator(".meta", has_text="tokens/s").wait_for()
        busy = [asyncio.create_task(generate(proxy, bob, options={"num_predict": 60}))]
        await page.locator('.bar[aria-valuenow="1"]').wait_for()
        await page.locator("#requests tbody tr", has_text="/api/chat").wait_for()
        shot = DOCS / "dashboard.png" if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "d.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes().startswith(b"\x89PNG")
        await asyncio.gather(*busy)
