"""Which cores the stream scenario's processes run on: the front being measured alone on one.

On a machine of a few cores the front (the proxy, or nginx's master and worker) would share them
with the load generator and the simulated nodes, and its time to first byte would mostly measure
who got a core first. So, on Linux with at least 2 CPUs, ``pinned`` puts every front on the last
allowed CPU and everything else on the others for the stream scenario: the nodes, the benchmark's
own process, and so the load generators it starts meanwhile. Direct access gets the same
placement, with nothing busy on the front's CPU. Every thread of every process is moved (threads
started before the move would keep their old CPUs). Afterwards every process is spread over all
the CPUs again: the other scenarios run as they always did, so that their figures stay
comparable with earlier runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cores:
    """Where the front runs, and where everything else does; both empty when not pinned."""

    front: frozenset[int] = frozenset()
    others: frozenset[int] = frozenset()
    reason: str = ""  # why not pinned

    @property
    def pinned(self) -> bool:
        return bool(self.front)

    def summary(self) -> str:
        if not self.pinned:
            return f"Cores: shared by every process ({self.reason})"
        return (
            f"Cores, in the stream scenario: the front alone on {_cpus(self.front)}; the nodes "
            f"and the load generator on {_cpus(self.others)}. Other scenarios share them all."
        )


def _cpus(cpus: Iterable[int]) -> str:
    ordered = sorted(cpus)
    return f"CPU{'s' if len(ordered) > 1 else ''} {','.join(map(str, ordered))}"


def choose(pin: bool = True) -> Cores:
    """The last allowed CPU for the front, the others for the rest; unpinned where impossible."""
    if not pin:
        return Cores(reason="--no-pin")
    if not hasattr(os, "sched_setaffinity"):
        return Cores(reason="no sched_setaffinity on this system")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return Cores(reason=f"only {len(allowed)} CPU")
    return Cores(front=frozenset(allowed[-1:]), others=frozenset(allowed[:-1]))


def threads(pid: int) -> list[int]:
    """The thread ids of a process (itself when /proc does not list them)."""
    try:
        return [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return [pid]


def place(pids: Iterable[int], cpus: frozenset[int]) -> None:
    """Allow these processes, every thread of each, on ``cpus`` only."""
    for pid in pids:
        for tid in threads(pid):
            with contextlib.suppress(ProcessLookupError):  # a thread or process that just ended
                os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def pinned(cores: Cores, front_pids: Iterable[int], other_pids: Iterable[int]) -> Iterator[None]:
    """For the block: the fronts' processes on the front's CPU, the others and this process (so
    every child it starts meanwhile) on the other CPUs; all of them on every CPU again after."""
    if not cores.pinned:
        yield
        return
    fronts, others = list(front_pids), [os.getpid(), *other_pids]
    place(others, cores.others)
    place(fronts, cores.front)
    try:
        yield
    finally:
        place(fronts + others, cores.front | cores.others)
