"""CPU time and resident memory of processes, read from /proc (Linux only)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Indexes into the fields of /proc/PID/stat that follow the command name (field 3 is index 0).
_PPID = 1
_UTIME = 11
_STIME = 12


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rpartition(")")[2].split()  # the command name may hold spaces and parentheses


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time the processes have used so far."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        ticks += int(fields[_UTIME]) + int(fields[_STIME])
    return ticks / CLOCK_TICKS


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident memory of the processes now (their shared pages counted once per process)."""
    pages = 0
    for pid in pids:
        pages += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE_SIZE


def children(pid: int) -> list[int]:
    """Direct children of a process (nginx's workers under its master)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[_PPID]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return found
