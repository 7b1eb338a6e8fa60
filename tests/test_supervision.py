"""Background work: tasks kept and ended, loops that log a failing round and go on."""

from __future__ import annotations

import asyncio

import pytest

from proxy.config import NodeConfig
from proxy.pool import Node
from proxy.supervision import Once, Tasks, every, for_each


def node(name: str) -> Node:
    config = NodeConfig(
        url="http://127.0.0.1:1", name=name, max_concurrency=1, weight=1.0, model_concurrency={}
    )
    return Node(config)


async def test_background_task_failures_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    tasks = Tasks()
    failed = asyncio.Event()

    async def fail() -> None:
        failed.set()
        raise RuntimeError("a bug")

    tasks.spawn(fail(), "failing")
    await failed.wait()
    await tasks.aclose()
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "failing" in record.getMessage() and "a bug" in caplog.text


async def test_nothing_new_starts_once_the_tasks_are_closed() -> None:
    tasks = Tasks()
    await tasks.aclose()
    started = False

    async def late() -> None:
        nonlocal started
        started = True

    tasks.spawn(late(), "late")  # closed, not left unawaited (that would warn)
    await asyncio.sleep(0)
    assert not started


async def test_a_loop_logs_a_failing_round_once_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds = 0
    fifth = asyncio.Event()

    async def body() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 5:
            fifth.set()
        if rounds < 4:
            raise KeyError("the same bug each round")

    loop = asyncio.create_task(every(lambda: 0, body, "test loop"))
    await fifth.wait()
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "test loop" in tracebacks[0].getMessage()


async def test_one_node_failing_leaves_the_others_done(caplog: pytest.LogCaptureFixture) -> None:
    nodes = [node(name) for name in ("n1", "n2", "n3")]
    done: list[str] = []

    async def refresh(node: Node) -> None:
        if node.name == "n2":
            raise ValueError("n2's answer")
        done.append(node.name)

    reported = Once()
    for _ in range(3):
        await for_each(nodes, refresh, "refresh", reported)
    assert done == ["n1", "n3"] * 3
    assert len([r for r in caplog.records if r.exc_info and "n2" in r.getMessage()]) == 1
