"""Notice when the config file changes, however it was changed.

Editors write a new file and rename it over the old one; Kubernetes swaps a ConfigMap's
``..data`` symlink. Both replace the file rather than writing into it, so the watcher looks at
the path each time (stat follows symlinks) instead of holding on to one inode, and reports a
change only once the file has looked the same twice in a row, so a file caught half-written is
not loaded. The looking is timed by the caller (``app.py``, with a supervised loop).
"""

from __future__ import annotations

import os
from pathlib import Path

Fingerprint = tuple[int, int, int, int] | None


def fingerprint(path: Path) -> Fingerprint:
    try:
        st = os.stat(path)
    except OSError:
        return None  # missing for a moment while being replaced
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class FileWatch:
    """Tells, at each look, whether ``path`` has settled into a version not yet reported."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reported = self._previous = fingerprint(path)

    def changed(self) -> bool:
        current = fingerprint(self.path)
        settled = current == self._previous
        self._previous = current
        if settled and current is not None and current != self._reported:
            self._reported = current
            return True
        return False
