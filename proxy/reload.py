"""Notice when the config file changes, however it was changed.

Editors write a new file and rename it over the old one; Kubernetes swaps a ConfigMap's
``..data`` symlink. Both replace the file rather than writing into it, so the watcher looks at
the path each time (stat follows symlinks) instead of holding on to one inode, and reports a
change only once the file has looked the same twice in a row, so a file caught half-written is
not loaded.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

Fingerprint = tuple[int, int, int, int] | None


def fingerprint(path: Path) -> Fingerprint:
    try:
        st = os.stat(path)
    except OSError:
        return None  # missing for a moment while being replaced
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


async def watch_file(path: Path, interval: Callable[[], float]) -> AsyncIterator[None]:
    """Yield once per settled change of ``path``; ``interval()`` is read at every look."""
    loaded = fingerprint(path)
    previous = loaded
    while True:
        await asyncio.sleep(interval())
        current = fingerprint(path)
        settled = current == previous
        previous = current
        if settled and current is not None and current != loaded:
            loaded = current
            yield
