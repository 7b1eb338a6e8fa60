"""Each key's live usage: its rate windows and its totals, apart from the config.

Windows slide: a window of ``span`` seconds counts what was used in the buckets of ``step``
seconds that started in the last span (a minute in one-second buckets, a day in one-minute
buckets), so a key over its budget is let in again as its oldest use leaves the window, not
all at once at the top of the hour. A bucket counts until a whole span after its end, so a
window never lets through more than its limit in any span (it may hold a use up to one step
longer than the span).

Requests are counted when admitted; tokens (prompt + completion) when the answer has ended,
from its final chunk, so a stream is never cut for its tokens: the key's next request gets
429 instead. State is kept by key name and survives reloads for keys that stay.

These are this process's windows; with ``state.redis_url`` the fleet's are in Redis
(``shared_limits``), and these count alongside and serve while Redis does not answer.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import KeyConfig
from .errors import RateLimited, RejectionReason

MINUTE = 60.0
DAY = 86400.0


# A window as the answer's headers and /-/usage show it: what it holds, and the seconds until
# it is empty; the same whether counted here or, for the fleet, in Redis. A plain tuple: this
# is on the request path of every key with limits (a NamedTuple costs ten times as much).
Figures = tuple[int, float]


class Window:
    """What was used in the last ``span`` seconds, counted per ``step`` seconds."""

    def __init__(self, span: float, step: float) -> None:
        self.span = span
        self.step = step
        self._buckets: deque[list[float]] = deque()  # [start, amount], oldest first
        self._total = 0.0

    def used(self, now: float) -> int:
        self._expire(now)
        return int(self._total)

    def add(self, now: float, amount: int) -> None:
        start = now - now % self.step
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1][1] += amount
        else:
            self._buckets.append([start, float(amount)])
        self._total += amount
        self._expire(now)

    def wait(self, now: float, limit: int) -> float:
        """Seconds until one more unit fits under ``limit`` (0: it fits now)."""
        excess: float = self.used(now) + 1 - limit
        if excess <= 0:
            return 0.0
        for start, amount in self._buckets:  # the oldest leave first
            excess -= amount
            if excess <= 0:
                return self._end(start) - now
        return self.reset(now)  # a limit below 1: config.py allows none

    def reset(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's ``x-ratelimit-reset-*``)."""
        self._expire(now)
        return self._end(self._buckets[-1][0]) - now if self._buckets else 0.0

    def figures(self, now: float) -> Figures:
        self._expire(now)
        reset = self._end(self._buckets[-1][0]) - now if self._buckets else 0.0
        return int(self._total), reset

    def _end(self, start: float) -> float:
        return start + self.step + self.span

    def _expire(self, now: float) -> None:
        while self._buckets and self._end(self._buckets[0][0]) <= now:
            self._total -= self._buckets.popleft()[1]


@dataclass
class KeyUsage:
    """One key's windows and totals since the proxy started."""

    config: KeyConfig
    requests: Window = field(default_factory=lambda: Window(MINUTE, 1.0))
    tokens_minute: Window = field(default_factory=lambda: Window(MINUTE, 1.0))
    tokens_day: Window = field(default_factory=lambda: Window(DAY, MINUTE))
    codes: Counter[str] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)

    def limits(self) -> list[tuple[str, Window, int | None]]:
        c = self.config
        return [
            ("requests_per_minute", self.requests, c.requests_per_minute),
            ("tokens_per_minute", self.tokens_minute, c.tokens_per_minute),
            ("tokens_per_day", self.tokens_day, c.tokens_per_day),
        ]

    @property
    def limited(self) -> bool:
        """Some window of the key has a limit (a key with none has nothing to hold)."""
        c = self.config
        return not (c.requests_per_minute is c.tokens_per_minute is c.tokens_per_day is None)

    def figures(self, now: float, limited: bool = False) -> list[Figures]:
        """Each window's use and reset now, in the order of ``limits``; with ``limited``, the
        windows with no limit as empty (the headers leave them out)."""
        c, every = self.config, not limited
        return [
            self.requests.figures(now) if every or c.requests_per_minute else _EMPTY,
            self.tokens_minute.figures(now) if every or c.tokens_per_minute else _EMPTY,
            self.tokens_day.figures(now) if every or c.tokens_per_day else _EMPTY,
        ]


_EMPTY: Figures = (0, 0.0)


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.keys: dict[str, KeyUsage] = {}

    def configure(self, keys: Iterable[KeyConfig]) -> None:
        """Keys that stay keep their windows and totals; removed keys' go."""
        old, self.keys = self.keys, {}
        for key in keys:
            usage = old.get(key.name) or KeyUsage(key)
            usage.config = key
            self.keys[key.name] = usage

    def admit(self, name: str) -> dict[str, str]:
        """Count one request against the key's windows; raise RateLimited (429) when a window
        is full. Returns the X-RateLimit-* headers of the remaining budget."""
        usage = self.keys.get(name)
        if usage is None:
            return {}  # revoked while the request was read: its key is checked no more
        now = self.clock()
        if not usage.limited:
            usage.requests.add(now, 1)
            return {}
        for what, window, limit in usage.limits():
            wait = window.wait(now, limit) if limit is not None else 0.0
            if wait > 0:
                raise over_limit(usage.config, what, wait, usage.figures(now, limited=True))
        usage.requests.add(now, 1)
        return headers_of(usage.config, usage.figures(now, limited=True))

    def count(self, name: str) -> None:
        """One request admitted elsewhere (by the fleet's windows): counted here too, so that
        this replica's windows are current should it have to fall back on them."""
        if (usage := self.keys.get(name)) is not None:
            usage.requests.add(self.clock(), 1)

    def charge(self, name: str, prompt: int, completion: int) -> None:
        usage = self.keys.get(name)
        if usage is None:
            return
        now = self.clock()
        usage.tokens_minute.add(now, prompt + completion)
        usage.tokens_day.add(now, prompt + completion)
        usage.tokens.update(prompt=prompt, completion=completion)

    def answered(self, name: str, code: int, rejection: RejectionReason | None) -> None:
        usage = self.keys.get(name)
        if usage is not None:
            usage.codes[str(code)] += 1
            if rejection is not None:
                usage.rejections[rejection] += 1

    def report(self) -> dict[str, Any]:
        """GET /-/usage: each key's totals and its windows now."""
        now = self.clock()
        return {"keys": [report_of(u, u.figures(now)) for u in self.keys.values()]}


def over_limit(config: KeyConfig, what: str, wait: float, figures: list[Figures]) -> RateLimited:
    """429 for a key over its ``what`` window, which has room again in ``wait`` seconds."""
    limit = getattr(config, what)
    reason: RejectionReason = "rate" if what.startswith("requests") else "tokens"
    message = f"key {config.name!r} is over its {what} ({limit}); retry in {wait:.0f} s"
    retry = max(1, math.ceil(wait))
    return RateLimited(
        message, reason=reason, retry_after=retry, headers=headers_of(config, figures)
    )


def report_of(usage: KeyUsage, figures: list[Figures]) -> dict[str, Any]:
    """A key's entry in /-/usage: its totals here, and its windows' ``figures``."""
    windows = {
        what: {
            "limit": limit,
            "used": used,
            "remaining": None if limit is None else max(0, limit - used),
            "reset_seconds": round(reset, 3),
        }
        for (what, _, limit), (used, reset) in zip(usage.limits(), figures, strict=True)
    }
    return {
        "name": usage.config.name,
        "requests": dict(usage.codes),
        "tokens": {"prompt": usage.tokens["prompt"], "completion": usage.tokens["completion"]},
        "rejections": dict(usage.rejections),
        "windows": windows,
    }


def headers_of(config: KeyConfig, figures: list[Figures]) -> dict[str, str]:
    """OpenAI's names: the requests window, and the tokens window closest to its limit."""
    requests, *tokens = figures
    headers: dict[str, str] = {}
    if config.requests_per_minute is not None:
        headers |= _window_headers("Requests", requests, config.requests_per_minute)
    token_windows = [
        (limit - seen[0], seen, limit)
        for seen, limit in zip(
            tokens, (config.tokens_per_minute, config.tokens_per_day), strict=True
        )
        if limit is not None
    ]
    if token_windows:
        _, seen, limit = min(token_windows, key=lambda t: t[0])
        headers |= _window_headers("Tokens", seen, limit)
    return headers


def _window_headers(what: str, seen: Figures, limit: int) -> dict[str, str]:
    used, reset = seen
    return {
        f"X-RateLimit-Limit-{what}": str(limit),
        f"X-RateLimit-Remaining-{what}": str(max(0, limit - used)),
        f"X-RateLimit-Reset-{what}": duration(reset),
    }


def duration(seconds: float) -> str:
    """As the OpenAI API writes its resets: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
