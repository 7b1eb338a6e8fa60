"""What the proxy learned about one request, for the metrics and the access log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from .affinity import Conversation, Result
from .auth import Key
from .cache import Lookup
from .errors import RejectionReason
from .pool import Node
from .telemetry import Usage

if TYPE_CHECKING:
    from .spans import Span

CLIENT_CLOSED = 499  # nginx's code for a client that left before the answer ended
# The proxy itself ended the request before its answer did (the drain's end at a stop): the
# client saw a broken or missing answer, through no fault of its own or of the node.
CUT_BY_PROXY = 503


@dataclass
class Exchange:
    method: str
    path: str
    body: bytes = b""
    model: str | None = None  # as the client named it
    model_key: str | None = None  # normalised, when the request must go to a node that has it
    takes_slot: bool = False
    unload: bool = False  # `ollama stop`: goes to every node that has the model
    cold: bool = False  # sent to a node that did not hold the model in memory
    predict: int | None = None  # completion tokens it asks for at most, when it says
    node: Node | None = None
    status: int = 0
    attempts: int = 0
    client_gone: bool = False
    cut: str | None = None  # why the proxy ended it before its answer ended ("drain")
    request_id: str = ""
    client: str = ""
    started: float = field(default_factory=time.monotonic)
    queue_wait: float = 0.0
    admitted: float = 0.0  # when its node was chosen (monotonic), for the time it held a slot
    first_byte: float | None = None
    usage: Usage | None = None
    key: Key | None = None  # the client's key, when keys are configured
    rejection: RejectionReason | None = None  # why the key was refused (401, 403, 429)
    limit_headers: dict[str, str] = field(default_factory=dict)  # X-RateLimit-*, for answers
    conversation: Conversation | None = None  # a chat's keys in the affinity table
    affinity: Result | None = None  # whether it went back to its last turn's node
    trace: Span | None = None  # its OpenTelemetry span, when tracing is on
    cache: Lookup | None = None  # what the response cache made of it (embeddings only)

    @property
    def reported_status(self) -> int:
        """The status for metrics and the log: 499 when the client left first, 503 when the
        proxy cut it."""
        if self.cut is not None:
            return CUT_BY_PROXY
        return CLIENT_CLOSED if self.client_gone else self.status


REQUEST_ID_HEADER = "X-Request-Id"
# The request's exchange, for the handlers it passes through (fleet.py reads its id and key).
EXCHANGE = web.RequestKey("exchange", Exchange)
