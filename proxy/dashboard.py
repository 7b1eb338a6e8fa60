"""The dashboard: ``GET /-/ui/`` serves the page's files from the package (``proxy/ui/``),
``GET /-/events`` its live snapshots (``events.py``) behind the admin paths' guard.

The files hold no data: they are served to anyone. The page asks ``GET /-/access`` whether
what it holds (nothing, or a token from session storage) opens the admin paths, and for the
admin token (or a key with ``admin``) when it does not: an answer of 200 either way, since a
browser logs every 401 to the console as an error. Everything the page shows comes
through the guarded stream and the admin paths; it loads nothing from elsewhere, which its
``Content-Security-Policy`` states to the browser too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .admin import Managed, guarded
from .auth import KeyRefused
from .errors import error_response, shown
from .events import Events

UI_DIR = Path(__file__).parent / "ui"
PAGE = "index.html"
TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a proxy upgraded in place serves its new page at once
}


def add_routes(
    router: web.UrlDispatcher,
    runtime: Managed,
    events: Events,
    expect: Callable[[web.Request], Awaitable[None]],
) -> None:
    """Before the admin paths' own: their catch-all answers every other ``/-/`` path 404."""
    stream = guarded(runtime, events.stream)  # no HEAD: its answer would never end
    router.add_get("/-/events", stream, allow_head=False, expect_handler=expect)
    router.add_get("/-/access", _Access(runtime).answer, expect_handler=expect)
    router.add_get("/-/ui", _to_page, expect_handler=expect)
    router.add_get("/-/ui/{name:[^/]*}", _Files(UI_DIR).serve, expect_handler=expect)


class _Files:
    """The page's files, read once: a handful of small ones, and only those."""

    def __init__(self, folder: Path) -> None:
        self.files = {
            path.name: (path.read_bytes(), TYPES[path.suffix])
            for path in sorted(folder.iterdir())
            if path.suffix in TYPES
        }

    async def serve(self, request: web.Request) -> web.Response:
        name = request.match_info["name"] or PAGE
        if name not in self.files:
            return error_response(404, f"no dashboard file {shown(name)!r}")
        body, content_type = self.files[name]
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS
        )


class _Access:
    def __init__(self, runtime: Managed) -> None:
        self.runtime = runtime

    async def answer(self, request: web.Request) -> web.Response:
        """Whether the request's credentials open the admin paths (and if not, why), and the
        name of the client key they are, if one (the playground then chats with it)."""
        auth = self.runtime.auth
        try:
            auth.check_admin(request.headers, request.remote)
        except KeyRefused as refused:
            return web.json_response({"admin": False, "message": refused.message})
        key = None
        with contextlib.suppress(KeyRefused):  # admin.token, or no credentials: no key
            key = auth.identify(request.method, request.headers)
        return web.json_response({"admin": True, "key": key.name if key else None})


async def _to_page(request: web.Request) -> web.Response:
    raise web.HTTPFound("/-/ui/")
