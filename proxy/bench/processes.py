"""Child processes of the benchmark: started, awaited until ready, and always stopped.

Every child runs in a session of its own, so that a signal to its group reaches everything it
started (nginx's workers) and nothing else; ``Processes`` stops them all when its block ends,
whether it ends normally, on an error, or on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # where ``python -m proxy`` finds the package
STOP_GRACE = 5.0  # seconds a child gets to exit after SIGTERM, before SIGKILL
READY_TIMEOUT = 30.0


class BenchError(Exception):
    """The benchmark could not run (a child failed to start, a load timed out)."""


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """The children of one scenario; ``async with`` stops every one of them at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[Child] = []

    async def __aenter__(self) -> Processes:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop_all()

    async def start(
        self, name: str, argv: list[str], *, capture_stdout: bool = False, cwd: Path = PROJECT_ROOT
    ) -> Child:
        log = self.log_dir / f"{name}-{len(self._children)}.log"
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if capture_stdout else log_file,
                stderr=log_file,
                cwd=cwd,  # ``python -m proxy`` runs the proxy found here
                start_new_session=True,
            )
        child = Child(name, process, log)
        self._children.append(child)
        return child

    async def start_python(
        self, name: str, args: list[str], *, capture_stdout: bool = False, cwd: Path = PROJECT_ROOT
    ) -> Child:
        return await self.start(
            name, [sys.executable, *args], capture_stdout=capture_stdout, cwd=cwd
        )

    @property
    def pids(self) -> list[int]:
        """The running children's process ids (not their own children: nginx's worker)."""
        return [child.pid for child in self._children]

    async def stop(self, child: Child, sig: signal.Signals = signal.SIGTERM) -> None:
        if child in self._children:
            self._children.remove(child)
        await _stop(child, sig)

    async def stop_all(self) -> None:
        children, self._children = self._children, []
        try:
            await asyncio.gather(*(_stop(child, signal.SIGTERM) for child in reversed(children)))
        finally:  # even when cancelled halfway (a second Ctrl-C): nothing may outlive us
            for child in children:
                _signal_group(child, signal.SIGKILL)


def _signal_group(child: Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


async def _stop(child: Child, sig: signal.Signals) -> None:
    if child.process.returncode is None:
        _signal_group(child, sig)
        try:
            await asyncio.wait_for(child.process.wait(), STOP_GRACE)
        except TimeoutError:
            _signal_group(child, signal.SIGKILL)
            await child.process.wait()
    _signal_group(child, signal.SIGKILL)  # whatever it left behind in its group


async def wait_ready(child: Child, url: str, *, status: int | None = 200) -> None:
    """Poll ``url`` until it answers (with ``status`` when given); fail if the child exits."""
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while True:
            if child.process.returncode is not None:
                raise BenchError(
                    f"{child.name} exited ({child.process.returncode}):\n{child.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as resp:
                    if status is None or resp.status == status:
                        return
            if asyncio.get_running_loop().time() > deadline:
                raise BenchError(f"{child.name} not ready at {url}:\n{child.log_tail()}")
            await asyncio.sleep(0.05)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now; all bound at once so that no two are the same."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if hard != resource.RLIM_INFINITY else 1 << 20
