"""The benchmark's smoke run, so that ``python -m proxy.bench`` never rots.

It asserts nothing about speed: only that every scenario runs end to end, with no failed
request, and prints its tables. The parsing helpers are checked on their own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.bench.profiling import hotspots
from proxy.bench.rawhttp import CHUNKED_END, _Framing
from proxy.bench.report import percentile, render

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SECONDS = 45  # a smoke run takes about 8 s on 2 cores; leave room for a busy machine


@pytest.mark.timeout(SMOKE_SECONDS + 15)
def test_smoke_run_prints_both_tables() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy.bench", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for header in ("Machine:", "relay", "direct", "proxy", "CPU per streamed chunk", "scheduling"):
        assert header in out, out
    assert "errors (stream / hold / embed)" in out
    assert "nginx" in out  # a column when installed, else "nginx not installed, skipped"


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0


def test_render_aligns_columns() -> None:
    table = render(["name", "value"], [["a", "1"], ["longer", "22"]])
    assert table.splitlines() == [
        "name    value",
        "------  -----",
        "a           1",
        "longer     22",
    ]


def test_chunked_framing_ends_only_at_the_last_chunk() -> None:
    framing = _Framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")
    assert not framing.feed(b'5\r\n{"a"}\n\r\n')
    assert not framing.feed(b"0\r\n")  # the end may arrive in pieces
    assert framing.feed(b"\r\n")
    assert CHUNKED_END.endswith(b"0\r\n\r\n")


def test_length_framing_and_connection_close() -> None:
    framing = _Framing(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close"
    )
    assert (framing.status, framing.keep_alive) == (503, False)
    assert not framing.feed(b"ab")
    assert framing.feed(b"cd")


def test_hotspots_count_self_and_total_time() -> None:
    collapsed = (
        "main (/x/proxy/app.py:1);relay (/x/proxy/forward.py:9) 3\nmain (/x/proxy/app.py:1) 1\n"
    )
    by_function, by_file = hotspots(collapsed)
    assert by_function[0].function == "relay (proxy/forward.py:9)"
    assert (by_function[0].self_share, by_function[0].total_share) == (0.75, 0.75)
    assert by_function[1].total_share == 1.0
    assert by_file[0].function == "proxy/forward.py"
