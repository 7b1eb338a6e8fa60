"""Injected faults that strike while a request is served: a dropped connection, a stall.

The faults answered before any work ("error500", "busy") are plain errors of the generation's
admission; "refuse" is applied by the node's front door to every request.
"""

from __future__ import annotations

import asyncio
from typing import NoReturn

from aiohttp import web

from .slots import Ticket

MID_REQUEST = ("stall", "die")


async def wait_forever() -> NoReturn:
    """Sleep until cancelled: aiohttp cancels the handler when its connection closes."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable: nothing sets this event")


async def drop_connection(request: web.Request) -> NoReturn:
    """Abort the TCP connection like a crashed process: no status, no chunk terminator."""
    if request.transport is not None:
        request.transport.abort()
    # The abort makes aiohttp cancel this handler (handler_cancellation) on the next loop turn.
    await wait_forever()


async def strike(fault: str, request: web.Request, ticket: Ticket) -> NoReturn:
    """Inject a mid-generation fault: "die" drops the connection, "stall" goes silent."""
    if fault == "die":
        ticket.node_died = True
        await drop_connection(request)
    await wait_forever()  # stall: until the client gives up


def fault_point(fault: str, after_tokens: int, tokens: int) -> int | None:
    """After how many tokens a stall/die strikes (before the ending at the latest)."""
    if fault not in MID_REQUEST:
        return None
    return min(max(0, after_tokens), tokens)
