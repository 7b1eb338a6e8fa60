"""Listening: client connections accepted up to a cap, timed while a request head is on its way,
and served by aiohttp's server; the stop.

The proxy accepts connections itself (``loop.sock_accept``, then ``connect_accepted_socket``
with aiohttp's ``web.Server`` as the protocol factory), so that it can stop accepting at
``limits.max_client_connections``: the next connections wait in the kernel's accept queue, as
in HAProxy's ``maxconn``, and every descriptor the proxy may need for its nodes stays free.
Each connection is a ``ClientConnection``, which hands every event to aiohttp's handler and
watches the time its requests' heads take (``limits.header_timeout``).

With ``tls`` in the config, asyncio's SSL transport runs the handshake before the connection is
handed on, with the current config's context (a reload's new certificate serves the next
connections). The handshake's time counts against the first head's: it is bounded by
``header_timeout``, and the head's time starts at accept, not at the handshake's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket

from aiohttp import web
from aiohttp.typedefs import Handler

from .app import RUNTIME
from .bodies import BODY_TIMEOUT
from .config import LimitsConfig
from .errors import error_body, is_shortage

log = logging.getLogger("ollama_proxy")

KEEPALIVE_TIMEOUT = 75.0  # an idle kept-alive client connection closes after it (as nginx)
BACKLOG = 128  # connections the kernel holds for the proxy to accept (aiohttp's own default)
# Descriptors kept apart from client and node connections: the listener, the event loop,
# logs, the health checks' and fleet calls' own connections.
RESERVED_DESCRIPTORS = 64
# The kernel refused an accept for want of descriptors or memory: look again after this.
ACCEPT_RETRY_DELAY = 0.1
CAP_RECHECK = 1.0  # at the cap, seconds between looks at a cap a reload may have raised

_HEAD_LATE = error_body("the request's head did not arrive in time")
HEAD_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_HEAD_LATE), _HEAD_LATE)
)


def default_max_client_connections(descriptors: int | None = None) -> int:
    """Half of what the descriptor limit (RLIMIT_NOFILE's soft one) leaves: a busy client
    connection may need a connection to a node, and node connections stay open between
    requests."""
    if descriptors is None:
        descriptors, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if descriptors == resource.RLIM_INFINITY:
            descriptors = 2**20
    return max(1, (descriptors - RESERVED_DESCRIPTORS) // 2)


class ClientConnection(asyncio.Protocol):
    """One client connection: aiohttp's handler for it, with a deadline on each request head.

    The head's time starts at accept, and at the first byte after an answer (or at the
    answer's end when bytes beyond the request came while it was being answered: a pipelined
    head); it stops when a request's handler starts, which aiohttp does once the head is
    whole. Bytes of a head that came in the same read as the end of the request before it
    cannot be told from that request (only aiohttp's parser frames requests): aiohttp's
    keep-alive timeout, which closes a connection that has not sent a whole request in time,
    bounds that one instead.
    """

    def __init__(
        self, serving: Serving, handler: web.RequestHandler, accepted_at: float | None = None
    ) -> None:
        self.serving = serving
        self.handler = handler
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.request: web.BaseRequest | None = None  # the one being answered, or the last
        self.busy = False  # a request is being answered
        self.head_expected = False  # bytes beyond the request's body came while busy
        self.partial_head = False  # bytes of a head came, no handler started yet
        self.head_since: float | None = None  # when the awaited head's time started
        self._timer: asyncio.TimerHandle | None = None
        self._accepted_at = accepted_at  # the first head's time starts there (TLS handshakes)

    # -- asyncio.Protocol, handed on to aiohttp -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport
        self.serving.opened(self)
        self._head_due(since=self._accepted_at)
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.request is not None and not self.request.content.is_eof():
            pass  # the request's body (or the rest of an unread one, which aiohttp skips)
        elif self.busy:
            self.head_expected = True
        else:
            self.partial_head = True
            if self.head_since is None:
                self._head_due()
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()  # aiohttp's returns nothing: the transport closes

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_since = None
        if self._timer is not None:
            self._timer.cancel()
        self.serving.closed(self)
        self.handler.connection_lost(exc)

    # -- from the middleware --------------------------------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        self.head_since = None  # the timer, if armed, finds nothing due when it fires
        self.request, self.busy = request, True
        self.head_expected = self.partial_head = False

    def request_ended(self) -> None:
        self.busy = False
        if self.head_expected:
            self.partial_head = True
            self._head_due()

    # -- the head's deadline --------------------------------------------------------------------

    # One timer per connection, left armed when a head arrives in time (arming and cancelling
    # one per request would cost more than the rest of this bookkeeping): when it fires it
    # looks at whether a head is still awaited, and since when.

    def _head_due(self, since: float | None = None) -> None:
        self.head_since = self.loop.time() if since is None else since
        if self._timer is None:
            self._arm(self.head_since + self.serving.limits.header_timeout)

    def _arm(self, when: float) -> None:
        self._timer = self.loop.call_at(when, self._look)

    def _look(self) -> None:
        self._timer = None
        if self.head_since is None or self.busy:
            return  # no head awaited: the next one arms the timer again
        deadline = self.head_since + self.serving.limits.header_timeout
        if self.loop.time() < deadline:
            self._arm(deadline)  # a later head than the one that armed it
        else:
            self._head_late()

    def _head_late(self) -> None:
        """No request started in time. Every earlier answer is whole in the transport by now
        (aiohttp writes an answer's last bytes before it waits for them to drain), so a 408
        cannot cut into one; a client that sent nothing gets no answer, only the close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.partial_head and transport.get_write_buffer_size() == 0:
            transport.write(HEAD_TIMEOUT_ANSWER)
        if transport.get_write_buffer_size():
            transport.abort()  # the client is not reading: a close would wait for it forever
        else:
            transport.close()


class Serving:
    """The proxy accepting connections: started by ``serve``, then ``stop_accepting`` and
    ``close``."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner: web.AppRunner | None = None
        self.sockets: list[socket.socket] = []
        self.clients: dict[asyncio.BaseTransport, ClientConnection] = {}  # open ones
        self.default_cap = default_max_client_connections()
        self.loop = asyncio.get_running_loop()
        self._listening: set[socket.socket] = set()  # those whose readiness is watched
        self._starting: set[asyncio.Task[None]] = set()  # accepted, being handed to aiohttp
        self._connecting = 0  # of those, not yet counted in ``clients``
        self._recheck: asyncio.TimerHandle | None = None
        self._stopped = False
        self._at_cap_logged = False
        self._shortage_logged = False

    @property
    def limits(self) -> LimitsConfig:
        return self.app[RUNTIME].config.limits  # the current config's: reloads apply

    @property
    def max_clients(self) -> int:
        return self.limits.max_client_connections or self.default_cap

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    @web.middleware
    async def track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tells each connection when its requests start and end; sets the body timeout."""
        request[BODY_TIMEOUT] = self.limits.body_timeout
        client = self.clients.get(request.transport) if request.transport else None
        if client is None:
            return await handler(request)
        client.request_started(request)
        try:
            response = await handler(request)
        finally:
            client.request_ended()
        if response.status == 408 and not request.content.is_eof():
            await _close_after(request, response)  # the body stalled: nothing to linger for
        return response

    # -- accepting --------------------------------------------------------------------------------

    # Callbacks on the listening sockets' readiness, not a task per accept: one wake-up takes
    # every connection the kernel holds (up to the cap), so a burst of clients costs one loop
    # turn, not two per client behind the turns busy relaying other streams.

    def start_accepting(self) -> None:
        for sock in self.sockets:
            self._listen(sock)

    def _listen(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0 and sock not in self._listening:
            self._listening.add(sock)
            self.loop.add_reader(sock.fileno(), self._acceptable, sock)

    def _unlisten(self, sock: socket.socket) -> None:
        if sock in self._listening:
            self._listening.discard(sock)
            self.loop.remove_reader(sock.fileno())

    def _acceptable(self, sock: socket.socket) -> None:
        """Accept what waits, below the cap; at it, the next wait in the kernel's queue."""
        while len(self.clients) + self._connecting < self.max_clients:
            try:
                client, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(sock, exc)
                return
            self._shortage_logged = False
            self._connecting += 1
            task = asyncio.ensure_future(self._serve_accepted(client))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
        self._at_cap(sock)

    async def _serve_accepted(self, client: socket.socket) -> None:
        assert self.runner is not None and self.runner.server is not None
        server = self.runner.server
        accepted_at = self.loop.time()
        tls = self.app[RUNTIME].config.tls.context
        try:  # returns once the connection is counted (ClientConnection.connection_made)
            await self.loop.connect_accepted_socket(
                lambda: ClientConnection(self, server(), accepted_at),
                client,
                ssl=tls,
                ssl_handshake_timeout=self.limits.header_timeout if tls is not None else None,
            )
        except OSError:  # a failed or late TLS handshake too (ssl.SSLError, TimeoutError)
            client.close()  # gone before it could be served
        except BaseException:
            client.close()  # the proxy stops
            raise
        finally:
            self._connecting -= 1

    def _at_cap(self, sock: socket.socket) -> None:
        self._unlisten(sock)
        if not self._at_cap_logged:
            self._at_cap_logged = True
            log.warning(
                "%d client connections open (limits.max_client_connections): new "
                "connections wait until one closes",
                len(self.clients),
            )
        self._look_again_later()

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> None:
        if isinstance(exc, ConnectionAbortedError):
            return  # the client left first: nothing
        if not is_shortage(exc):
            log.warning("accepting a connection failed: %s", exc)
        elif not self._shortage_logged:  # once until an accept succeeds again
            self._shortage_logged = True
            log.warning("cannot accept connections: %s; new ones wait", exc.strerror)
        self._unlisten(sock)
        self.loop.call_later(ACCEPT_RETRY_DELAY, self._room_again)

    def _look_again_later(self) -> None:
        """At the cap a closing connection makes room; a reload may raise the cap too."""
        if self._recheck is None:
            self._recheck = self.loop.call_later(CAP_RECHECK, self._room_again)

    def _room_again(self) -> None:
        self._recheck = None
        if self._stopped:
            return
        if len(self.clients) + self._connecting < self.max_clients:
            self._at_cap_logged = False
            for sock in self.sockets:
                self._listen(sock)
        else:
            self._look_again_later()

    def opened(self, client: ClientConnection) -> None:
        assert client.transport is not None
        self.clients[client.transport] = client

    def closed(self, client: ClientConnection) -> None:
        if client.transport in self.clients:
            del self.clients[client.transport]
            if len(self._listening) < len(self.sockets) and not self._stopped:
                self._room_again()

    # -- stopping ---------------------------------------------------------------------------------

    async def stop_accepting(self) -> None:
        """No new connections, and no new requests on open ones; requests in flight go on.

        aiohttp's ``pre_shutdown`` makes busy connections close once their answer is out,
        but leaves idle ones open, where a client's next request would wait unanswered until
        the end: those are closed here.
        """
        await self._close_listeners()
        server = self.runner.server if self.runner is not None else None
        if server is None:
            return
        await asyncio.sleep(0)  # requests already read start their handlers (are busy)
        server.pre_shutdown()
        for client in list(self.clients.values()):
            if not client.busy:
                client.handler.force_close()

    async def _close_listeners(self) -> None:
        self._stopped = True
        if self._recheck is not None:
            self._recheck.cancel()
        for sock in self.sockets:
            self._unlisten(sock)
            sock.close()
        for task in self._starting:  # TLS handshakes under way: no request has come on them
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)

    async def close(self) -> None:
        """Close every connection, then the application (its tasks and node connections)."""
        await self._close_listeners()
        if self.runner is not None:
            await self.runner.cleanup()


async def _close_after(request: web.Request, response: web.StreamResponse) -> None:
    """Send the answer now, then close the connection (aiohttp would linger, reading the rest
    of the body for a while, and a stalled client sends none)."""
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    if request.transport is not None:
        request.transport.close()


class ListenError(Exception):
    """The proxy cannot listen where it was told to; the message says where and why."""


def shown_address(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_failure(host: str, port: int, exc: OSError) -> ListenError:
    where = shown_address(host, port)
    if exc.errno == errno.EADDRINUSE:
        return ListenError(
            f"cannot listen on {where}: address in use (another process listens there: stop "
            "it or choose another address with --listen or listen:; two proxies share a port "
            "only when both have listen_reuse_port: true)"
        )
    return ListenError(f"cannot listen on {where}: {exc.strerror or exc}")


async def _listening_sockets(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Bound and listening, one per address of ``host`` (as ``loop.create_server`` does)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # an IPv6 socket takes no IPv4: that has its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve(app: web.Application, host: str, port: int, *, reuse_port: bool = False) -> Serving:
    """Start the application (its start-up checks), then listen on ``host:port``."""
    serving = Serving(app)
    app.middlewares.insert(0, serving.track)  # outermost: every answer ends a request
    runner = serving.runner = web.AppRunner(
        app,
        # Without this aiohttp notices a departed client only at its next write, so a
        # non-streaming generation would keep its GPU busy to the end for nobody.
        handler_cancellation=True,
        access_log=None,  # the proxy writes its own, with node, model and tokens
        shutdown_timeout=1.0,  # the drain is where requests get their time
        keepalive_timeout=KEEPALIVE_TIMEOUT,
    )
    await runner.setup()
    try:
        serving.sockets = await _listening_sockets(host, port, reuse_port=reuse_port)
    except OSError as exc:
        await runner.cleanup()
        raise _listen_failure(host, port, exc) from None
    except BaseException:
        await runner.cleanup()
        raise
    serving.start_accepting()
    return serving
