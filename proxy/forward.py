"""THE request path, top to bottom: read → admit → attempt (retry before the first byte) → relay.

Every client request reaches it through aiohttp's server, which alone decides how requests
are framed; answers go back through aiohttp's response API, which frames them anew.

Invariants kept here:
- Bytes pass unchanged: status, end-to-end headers and body as the node sent them; only
  hop-by-hop headers are dropped and ``Host`` is the node's.
- A slot is held from admission until the response ends or the client leaves, and released
  exactly once (``finally``).
- Nothing is retried once the node has answered, but for its 503 (busy). The client gets the
  head when the node's has come (a streamed body) or once the whole body has (a short one of
  known length, so that a node that breaks off gets the client a proper ``{"error"}``
  status). After the head, a broken node ends the client's stream with an error line and a
  closed connection, never a last chunk, so it cannot look complete; never a 500 either.
- A client that leaves closes the upstream connection at once (Ollama stops generating when
  its connection closes) and is never blamed on the node.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import HttpVersion11, hdrs, web

from .accesslog import AccessLog, Recent
from .affinity import Affinity, conversation_of, response_id_of, response_key, result_of
from .answer import Answer
from .api import (
    INFERENCE_PATHS,
    MODEL_INFO_PATHS,
    MODEL_REQUIRED_PATHS,
    OPENAI_MODEL_PREFIX,
    TELEMETRY_PATHS,
)
from .auth import Auth, is_management, model_not_found, rejection_reason, tenant_of
from .bodies import model_of, read_bounded, request_fields
from .cache import CACHED_PATHS, ResponseCache
from .config import Config
from .discovery import Discovery
from .errors import (
    BadRequest,
    FailureKind,
    ProxyError,
    Unavailable,
    UpstreamError,
    family_of,
    shown,
    stream_error,
)
from .estimate import expected_tokens, requested_tokens, revised_expected
from .exchange import EXCHANGE, REQUEST_ID_HEADER, Exchange
from .fleet import Fleet
from .health import Health
from .http1 import (
    RESET_REQUEST_HEADERS,
    Head,
    RawHeaders,
    end_to_end,
    request_bytes,
    response_headers,
)
from .leases import Slots
from .metrics import Metrics, endpoint_label
from .models import INVALID_MODEL_NAME, is_unload_request, normalize_model, refused_name
from .pool import Lease, Node, Pool, Want
from .quota import Quotas
from .routing import availability, charge_wait, log_decision, reason_of, want_for
from .shared_affinity import SharedAffinity
from .shared_limits import SharedQuotas, WriteBehind
from .state import SharedState
from .telemetry import Progress, usage_from_tail
from .tracing import from_environment
from .upstream import Connection, Upstreams

if TYPE_CHECKING:
    from .spans import Span, Tracing

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A client that reads slower than the node writes: stop reading from the node once this many
# bytes of its answer wait for the client (beyond what the client's socket buffers hold).
NODE_BUFFER_HIGH = 256 * 1024
# Pieces kept for reading the final chunk; Ollama's final chunk may span several reads when a
# generate answer carries a long "context".
TAIL_PIECES = 16
# A node's answer with a Content-Length up to this size (a non-streamed generation, an
# embedding) is taken whole before the client gets its head: head and body then leave in one
# write, and a node that breaks off mid-body gets a 502 instead of a short body.
WHOLE_BODY_MAX = 1024 * 1024


class Forwarder:
    def __init__(
        self,
        pool: Pool,
        health: Health,
        metrics: Metrics,
        discovery: Discovery,
        fleet: Fleet,
        config: Config,
        state: SharedState | None = None,
    ) -> None:
        self.pool = pool
        # The Redis replicas share, when state.redis_url is set (else unused).
        self.state = state or SharedState(config.state)
        self.slots = Slots(pool, self.state, config.state)  # leases fleet-wide, with Redis
        self.discovery = discovery
        self.fleet = fleet
        self.upstreams = Upstreams(config.upstream.connect_timeout, config.upstream.idle_timeout)
        self.health = health
        self.metrics = metrics
        self.active = 0  # requests being handled now, for a graceful stop
        self.idle = asyncio.Event()
        self.idle.set()
        self.cut_reason: str | None = None  # set when the proxy ends what still runs ("drain")
        self.quotas = Quotas()  # each key's windows and totals, kept across reloads
        self.recent = Recent()  # the last requests that ended, for the dashboard
        # Which node served each conversation's last turn; kept across reloads.
        self.affinity = Affinity(config.routing.affinity_entries, config.routing.affinity_ttl)
        self.tracing: Tracing | None = from_environment()  # None: untraced, and it costs nothing
        # Both kept for the fleet too while Redis answers, written behind by one task.
        self.writes = WriteBehind(self.state)
        self.shared_quotas = SharedQuotas(self.quotas, self.state, self.writes)
        self.shared_affinity = SharedAffinity(self.affinity, self.state, self.writes)
        self.cache = ResponseCache(config.cache, self.state, discovery.tasks)  # embeddings
        metrics.watch_cache(self.cache.held_bytes)
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take new settings (at start and on reload); requests under way keep theirs."""
        self.max_attempts = config.upstream.max_attempts
        self.spill_after = config.routing.spill_after
        self.routing = routing = config.routing  # the scheduler's settings, and affinity's
        self.session_header = routing.session_header
        # A node that left the config, or whose name now has another URL, is forgotten.
        nodes = {n.name: n.url for n in config.nodes}
        self.affinity.configure(routing.affinity_entries, routing.affinity_ttl, nodes)
        self.max_body_size = config.max_body_size
        self.cache.configure(config.cache)
        # Generations last as long as they last: only silence (idle_timeout) is a failure.
        urls = frozenset(n.url for n in config.nodes)
        upstream = config.upstream
        self.upstreams.configure(
            upstream.connect_timeout,
            upstream.idle_timeout,
            urls,
            client_timeout=upstream.client_timeout,
            max_idle=upstream.max_idle_connections,
            idle_expiry=upstream.idle_connection_timeout,
        )
        self.access_log = AccessLog(config.access_log)
        self.auth = Auth(config)
        self.quotas.configure(config.auth.keys)
        # A key is the proxy's: never sent on to a node (the node's own headers still are).
        self.dropped_request_headers = RESET_REQUEST_HEADERS | self.auth.dropped_headers

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every request that neither the fleet nor the admin paths answer: to a node."""
        return await self._observe(request, self._proxy)

    def observed(self, handler: Handler) -> Handler:
        """A fleet handler, counted, measured and logged like a proxied request."""

        async def answer(request: web.Request, ex: Exchange) -> web.StreamResponse:
            response = await handler(request)
            ex.status = response.status
            return response

        async def observed_handler(request: web.Request) -> web.StreamResponse:
            return await self._observe(request, answer)

        return observed_handler

    async def _observe(
        self,
        request: web.Request,
        serve: Callable[[web.Request, Exchange], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Run ``serve`` as one request: counted for the drain, then metrics and access log."""
        ex = Exchange(
            request.method,
            request.path,
            request_id=request.headers.get(REQUEST_ID_HEADER) or _new_request_id(),
            client=request.remote or "",
        )
        if self.tracing is not None:
            ex.trace = self.tracing.begin(
                request.method, request.path, request.headers, ex.request_id
            )
        request[REQUEST_ID] = ex.request_id  # for the answer's head (tag_response)
        request[EXCHANGE] = ex  # for the fleet's handlers: the request's id and key
        self.active += 1
        self.idle.clear()
        try:
            # Who is asking, and may they ask for this path (401, 403); the model and the
            # key's budget are checked once the body is read.
            ex.key = self.auth.identify(request.method, request.headers)
            self.auth.check_path(ex.key, request.path, request.remote)
            response = await serve(request, ex)
            ex.status = ex.status or response.status  # an answer made whole here (an unload)
            return response
        except ProxyError as exc:
            ex.status = exc.status
            ex.rejection = rejection_reason(exc)
            self.metrics.proxy_error(exc)
            return exc.response(request.path)
        except asyncio.CancelledError:
            ex.cut = self.cut_reason  # the proxy's own doing, or else the client left:
            ex.client_gone = ex.cut is None  # neither is the node's fault
            raise
        except ConnectionError:
            if not _client_left(request):
                raise
            # The client left while its answer was being written. aiohttp logs an exception
            # raised from here as a server error, with a traceback; a response returned
            # instead it fails to send, and ends the request quietly.
            ex.cut = self.cut_reason
            ex.client_gone = ex.cut is None
            return web.Response()
        finally:
            endpoint = endpoint_label(request.path)
            self.metrics.request_done(ex, endpoint)
            if ex.trace is not None:
                _end_trace(ex.trace, ex, endpoint)
            self._account_key(ex)
            self.access_log.record(ex)
            self.recent.record(ex)
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    async def _proxy(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        if "#" in request.raw_path:  # aiohttp and a node may cut a fragment at other places
            raise BadRequest("invalid request target: a fragment is never sent to a server")
        await self._read(request, ex)
        self._check_key(ex)
        if ex.takes_slot and ex.key is not None:  # the key's windows: the fleet's when shared
            if self.state.shared:
                ex.limit_headers = await self.shared_quotas.admit(ex.key.name)
            else:
                ex.limit_headers = self.quotas.admit(ex.key.name)
        if ex.unload and ex.model_key is not None:
            await self._recheck_if_missing(ex.model_key)
            self._check_model_available(ex.model_key, ex.model or ex.model_key)
            return await self.fleet.unload(request, ex.body, ex.model_key)
        if request.path in CACHED_PATHS and self.cache.on:
            cached = await self._cached(request, ex)
            if cached is not None:
                return cached  # no slot, no node
        return await self._forward(request, ex)

    # -- read -------------------------------------------------------------------------------

    async def _read(self, request: web.Request, ex: Exchange) -> None:
        """Buffer the body (bounded) and find its model."""
        ex.body = await read_bounded(request, self.max_body_size)
        payload = request_fields(
            request.path,
            ex.body,
            request.headers.get(hdrs.CONTENT_TYPE, ""),
            request.query,
            strict=request.path in MODEL_REQUIRED_PATHS,
        )
        ex.model = model_of(payload)
        ex.predict = requested_tokens(payload)
        if request.path.startswith(OPENAI_MODEL_PREFIX):
            ex.model = request.path.removeprefix(OPENAI_MODEL_PREFIX)
        if ex.model is None and request.path in MODEL_REQUIRED_PATHS:
            raise BadRequest("model is required")
        # A model loaded on several nodes must leave all of them, not the one that was asked.
        ex.unload = payload is not None and is_unload_request(request.path, payload)
        # Inference, including future POST paths that name a model (a new Ollama endpoint
        # must not slip past the caps).
        ex.takes_slot = not ex.unload and (
            request.path in INFERENCE_PATHS
            or (
                ex.model is not None
                and request.method == "POST"
                and request.path not in MODEL_INFO_PATHS
            )
        )
        if ex.model is not None and (
            ex.takes_slot
            or ex.unload
            or request.path in MODEL_INFO_PATHS
            or request.path.startswith(OPENAI_MODEL_PREFIX)
        ):
            ex.model_key = normalize_model(ex.model)
            if request.path != "/api/push" and refused_name(ex.model):  # push: Ollama streams it
                raise ProxyError(400, INVALID_MODEL_NAME)  # Ollama's, before it looks for one
        if ex.takes_slot and ex.model_key is not None and self.affinity.entries:
            session = request.headers.get(self.session_header) if self.session_header else None
            ex.conversation = conversation_of(request.path, payload, ex.model_key, session)

    # -- the client's key -------------------------------------------------------------------

    def _check_key(self, ex: Exchange) -> None:
        """The key may use the model it names (its budget for inference is checked next)."""
        if ex.key is None:
            return
        if ex.model is not None and ex.path.startswith(OPENAI_MODEL_PREFIX):
            self.auth.check_listed(ex.key, ex.model)
        elif ex.model is not None and not is_management(ex.path):
            self.auth.check_model(ex.key, normalize_model(ex.model))

    def _account_key(self, ex: Exchange) -> None:
        """After the answer: its status, and its tokens from the final chunk, on the key."""
        if ex.key is None:
            return
        self.quotas.answered(ex.key.name, ex.reported_status, ex.rejection)
        if ex.usage is not None:
            usage = ex.usage
            self.shared_quotas.charge(ex.key.name, usage.prompt_tokens, usage.completion_tokens)

    # -- the response cache -----------------------------------------------------------------

    async def _cached(self, request: web.Request, ex: Exchange) -> web.Response | None:
        """The answer kept for the same request to the same model, replayed byte for byte;
        None to ask a node. After the key's checks: a key reads only what it may ask for."""
        if ex.model_key is None:
            return None
        nodes = self.pool.nodes.values()
        ex.cache = await self.cache.lookup(
            request.path, request.headers, ex.body, ex.model_key, nodes
        )
        if ex.cache is None:
            return None
        self.metrics.cache_result(ex.cache.result)
        if (entry := ex.cache.entry) is None:
            return None
        ex.status = entry.status
        response = web.Response(status=entry.status, body=entry.body)
        response.headers[hdrs.CONTENT_TYPE] = entry.content_type
        response.headers.update(ex.limit_headers)
        return response

    # -- admit and attempt ------------------------------------------------------------------

    async def _forward(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        tried: list[Node] = []  # nodes that failed this request, not to be chosen again
        while True:
            lease = await self._admit(ex, tried)
            try:
                upstream = await self._attempt(request, ex, lease.node, tried)
                if upstream is None:
                    continue  # retry on another node; the finally gives this slot back first
                try:
                    return await self._relay(request, ex, upstream, lease)
                finally:
                    # Back to the pool if the node's answer ended cleanly; otherwise closed,
                    # which is also what makes the node stop generating for a client that left.
                    upstream.conn.finish()
            finally:
                lease.release()
                if self.slots.configured:
                    self.slots.give_back(lease)

    async def _attempt(
        self, request: web.Request, ex: Exchange, node: Node, tried: list[Node]
    ) -> Upstream | None:
        """The node's response headers, or None when the request should go to another node."""
        ex.node = node
        ex.attempts += 1
        try:
            upstream = await self._send(request, ex, node)
            ex.first_byte = time.monotonic()  # the node's status line and headers are in
        except Unavailable:
            ex.node = None  # the proxy's own shortage: no node answered, none is to blame
            raise
        except UpstreamError as err:
            if ex.trace is not None:
                ex.trace.failed(err.kind)
            self._node_failed(node, err.kind)
            tried.append(node)
            if err.may_retry and self._may_retry(ex, tried):
                self.metrics.retry(err.kind)
                return None
            raise _gateway_error(node, err) from None
        if ex.trace is not None:
            ex.trace.first_byte(upstream.head.status)
        if upstream.head.status == 503 and self._may_retry(ex, [*tried, node]):
            # Ollama's own queue is full: nothing was generated, another node may have room.
            upstream.conn.finish()
            tried.append(node)
            self.metrics.retry("node_busy")
            return None
        return upstream

    def _may_retry(self, ex: Exchange, tried: list[Node]) -> bool:
        """Attempts are left, and some node that has not failed this request could take it."""
        if ex.attempts >= self.max_attempts:
            return False
        others = want_for(self.pool, ex.model_key, spill_after=0, exclude=tried)
        return bool(self.pool.candidates(others))

    async def _admit(self, ex: Exchange, tried: list[Node]) -> Lease:
        """A slot for inference; for other requests a place of their own on a node (they are
        capped apart, so they neither wait behind generations nor reach a node unbounded)."""
        if ex.model_key is not None:
            await self._recheck_if_missing(ex.model_key)
            self._check_model_available(ex.model_key, ex.model or ex.model_key)
        key = ex.conversation.lookup if ex.conversation else None
        if key is not None and self.state.shared:  # another replica may have served it
            known = await self.shared_affinity.lookup(key)
        else:
            known = self.affinity.lookup(key)
        preferred = known if known is not None and self._takes_new(known) else None
        want = want_for(
            self.pool,
            ex.model_key,
            self.spill_after,
            exclude=tried,
            preferred=preferred,
            settings=self.routing,
            tokens=ex.predict,
        )
        if ex.takes_slot:
            queued_at = time.monotonic()
            lease = await self.pool.acquire(want, len(ex.body), tenant=tenant_of(ex.key))
            if self.slots.configured:
                lease = await self._leased(lease, want, ex, queued_at)
            waited = time.monotonic() - queued_at
            ex.queue_wait += waited
            self.metrics.queue_wait(waited)
            charge_wait(self.pool, want, lease.node, waited)  # the idle nodes' loads' rent
        else:
            lease = await self.pool.acquire(want, len(ex.body), slot=False)
        if ex.model_key is not None and ex.takes_slot and not lease.node.is_resident(ex.model_key):
            ex.cold = True
            self.metrics.cold_load(lease.node, ex.model_key)
        if ex.conversation is not None:
            ex.affinity = result_of(known, lease.node.name)
        ex.admitted = time.monotonic()
        if ex.trace is not None:
            ex.trace.admitted(lease.node.name, lease.node.url, ex.queue_wait)
        if ex.takes_slot:
            self.metrics.routing_decision(reason_of(self.pool, want, lease.node))
        log_decision(self.pool, want, lease.node, ex.request_id, ex.queue_wait)
        return lease

    async def _leased(self, lease: Lease, want: Want, ex: Exchange, queued_at: float) -> Lease:
        """With Redis: the slot counted fleet-wide too; refused (the fleet is at a cap), the
        request waits in the queue again, until the queue's timeout from its arrival."""
        timeout = self.pool.queue_config.timeout
        while not await self.slots.take(lease):
            self.metrics.lease_refused(lease.node)
            try:  # the queue's timeout counts from the arrival, not from each refusal
                async with asyncio.timeout(queued_at + timeout - time.monotonic()):
                    lease = await self.pool.acquire(want, len(ex.body), tenant=tenant_of(ex.key))
            except TimeoutError:
                raise Unavailable(
                    "timed out waiting for a free node, please try again",
                    retry_after=max(1, round(timeout / 10)),  # as the pool's own timeout
                    reason="timeout",
                ) from None
        return lease

    async def _recheck_if_missing(self, model_key: str) -> None:
        """Before a 404, read the nodes' lists again: the model may have been pulled on a node
        straight since discovery last looked (the ``ollama`` CLI answers a 404 by pulling it,
        through the proxy, onto every node)."""
        if availability(self.pool, model_key) == "nowhere":
            await self.discovery.refresh_for_missing(model_key)

    def _takes_new(self, name: str) -> bool:
        node = self.pool.nodes.get(name)
        return node is not None and node.takes_new

    def _check_model_available(self, model_key: str, named: str) -> None:
        """404 when no node has the model, in Ollama's words for a model it cannot load; 503
        when only nodes that are down may have it."""
        where = availability(self.pool, model_key)
        named = shown(named)  # the client's own name, however long, quoted in short
        if where == "down":
            raise Unavailable(f"model '{named}' is only on nodes that are down", retry_after=5)
        if where == "unknown":
            raise Unavailable(f"no node that may have model '{named}' is reachable", retry_after=5)
        if where == "nowhere":
            raise ProxyError(404, model_not_found(named))

    async def _send(self, request: web.Request, ex: Exchange, node: Node) -> Upstream:
        """Send the request and wait for the node's status and headers."""
        connections = self.upstreams.to(node.url)
        headers = _with_request_id(request, ex, self.dropped_request_headers)
        if ex.trace is not None:  # the proxy's span for the client's, as the node's parent
            headers = ex.trace.outgoing(headers)
        raw = request_bytes(
            request.method,
            # Origin-form always, with the client's own escapes and no fragment (the target
            # of an absolute-form request names the proxy, not where the node should look).
            connections.base_path + request.rel_url.raw_path_qs,
            connections.host_header,
            _with_node_headers(headers, node),
            ex.body,
        )
        while True:
            conn, reused = await connections.get()
            answer = Answer(conn, NODE_BUFFER_HIGH, request.transport)
            conn.send(raw, answer, body_expected=request.method != "HEAD")
            try:
                head = await answer.head()
            except UpstreamError as err:
                conn.close()
                if reused and err.kind == "reset":
                    continue  # a kept-alive connection the node had closed: nothing was done
                raise
            except BaseException:
                conn.close()  # the client left: closing stops the node
                raise
            return Upstream(conn, answer, head, node)

    def _node_failed(self, node: Node, kind: FailureKind) -> None:
        self.health.passive_failure(node, kind)
        self.metrics.upstream_error(node, kind)

    # -- relay ------------------------------------------------------------------------------

    async def _relay(
        self, request: web.Request, ex: Exchange, upstream: Upstream, lease: Lease
    ) -> web.StreamResponse:
        """Pass the node's response through, each piece as it arrives; a generation's first
        pieces also show the node's speed (``_progressed``)."""
        node, head = upstream.node, upstream.head
        ex.status = head.status
        if head.has_body and 0 < (head.content_length or 0) <= WHOLE_BODY_MAX:
            return await self._relay_whole(ex, upstream)
        response = web.StreamResponse(
            status=head.status, reason=head.reason, headers=response_headers(head)
        )
        if head.content_length is not None:
            response.content_length = head.content_length
        response.headers.update(ex.limit_headers)  # the key's budget left, as OpenAI sends it
        await response.prepare(request)  # the head goes out: the commit point, no retry after
        # An answer to keep is gathered whole as it passes (a node's JSON over 2 KiB comes
        # chunked, Go's way); any other keeps its last pieces only.
        gathered = self.cache.gathering(ex.cache, TAIL_PIECES)
        tail = deque(maxlen=TAIL_PIECES) if gathered is None else gathered
        progress = self._progress_of(ex, head)
        try:
            while data := await upstream.answer.read():
                tail.append(data)
                await response.write(data)
                if progress is not None and progress.feed(data, self.pool.clock()):
                    self._progressed(ex, lease, progress)
                    progress = None  # measured: the rest of the stream is only relayed
            await response.write_eof()
        except UpstreamError as err:
            if ex.trace is not None:
                ex.trace.failed(err.kind)
            self._node_failed(node, err.kind)
            await _break_stream(request, response, head, node, err)
            return response
        finally:
            # Dropped for taking nothing (upstream.client_timeout): aiohttp cancels this
            # handler, and the request is counted as the client's (499), never the node's.
            if upstream.answer.client_dropped:
                self.metrics.client_timeout()
        self._after_response(ex, node, head, tail)
        return response

    def _progress_of(self, ex: Exchange, head: Head) -> Progress | None:
        """A meter for a streamed generation's speed, None for anything else."""
        if head.status != 200 or not ex.takes_slot or ex.model_key is None:
            return None
        return Progress(head.content_type) if ex.path in TELEMETRY_PATHS else None

    def _progressed(self, ex: Exchange, lease: Lease, progress: Progress) -> None:
        """The stream showed its speed: its slot's expected end moves to match, and a node
        that never answered for the model has a speed now (waiters may now go there)."""
        model, now, rate = ex.model_key or "", self.pool.clock(), progress.rate
        total = expected_tokens(self.pool.nodes.values(), model, ex.predict)
        lease.expected = revised_expected(lease.started, now, progress.events, total, rate)
        if lease.node.record_progress(model, rate):
            self.pool.changed()

    async def _relay_whole(self, ex: Exchange, upstream: Upstream) -> web.StreamResponse:
        """A short answer of known length: taken whole, then sent with its head at once."""
        node = upstream.node
        try:
            body = await upstream.answer.read_all()
        except UpstreamError as err:
            if ex.trace is not None:
                ex.trace.failed(err.kind)
            self._node_failed(node, err.kind)
            raise _gateway_error(node, err) from None  # nothing was sent: a clean error
        head = upstream.head
        self._after_response(ex, node, head, (body,))
        response = web.Response(
            status=head.status, reason=head.reason, headers=response_headers(head), body=body
        )
        response.headers.update(ex.limit_headers)
        return response

    def _after_response(self, ex: Exchange, node: Node, head: Head, tail: Iterable[bytes]) -> None:
        """Once per request, after the last byte: health evidence and token telemetry."""
        if head.status >= 500 and head.status != 503:  # 503 is load, not a fault
            self._node_failed(node, "status_5xx")
        else:
            self.health.passive_success(node)
        if head.status == 200 and ex.path in TELEMETRY_PATHS:
            ex.usage = usage_from_tail(tail, head.content_type)
        if ex.cache is not None:
            self.cache.store(ex.cache, node, head, tail)
        if head.status == 200 and ex.model_key is not None and ex.takes_slot:
            self.discovery.served(node, ex.model_key)
            node.answered.add(ex.model_key)  # its own figures from now on, if any came
            if ex.usage is not None:
                node.record_usage(
                    ex.model_key, ex.usage, cold=ex.cold, held=time.monotonic() - ex.admitted
                )
            if ex.cold:  # loading it may have pushed another model out of memory
                self.discovery.refresh_soon(node)
            if ex.conversation is not None:
                self._remember(ex, ex.model_key, node, tail)

    def _remember(self, ex: Exchange, model: str, node: Node, tail: Iterable[bytes]) -> None:
        """This turn's node, for the conversation's next turn: under its history's key and, on
        the Responses API, under the id of this answer (a next turn may name it previous)."""
        if ex.conversation is not None and ex.conversation.record is not None:
            self.shared_affinity.record(ex.conversation.record, node.name)
        if ex.path == "/v1/responses" and (response_id := response_id_of(tail)):
            self.shared_affinity.record(response_key(model, response_id), node.name)


REQUEST_ID = web.RequestKey("request_id", str)  # the id, for the answer's head
NODE_HEADER = "X-Ollama-Proxy-Node"  # the node's name, on answers a node gave
_REQUEST_ID_PREFIX = os.urandom(4).hex()  # tells this process's ids from another replica's
_request_numbers = itertools.count(1)


def _new_request_id() -> str:
    """Unique per process and cheap: a random prefix and a counter (uuid4 costs a syscall)."""
    return f"{_REQUEST_ID_PREFIX}-{next(_request_numbers):x}"


async def tag_response(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Every answer carries the request's id (the client's, or the proxy's own): set as its
    head goes out (aiohttp's ``on_response_prepare``), since a stream's goes out mid-request."""
    request_id = request.get(REQUEST_ID) or request.headers.get(REQUEST_ID_HEADER)
    response.headers[REQUEST_ID_HEADER] = request_id or _new_request_id()
    ex = request.get(EXCHANGE)
    if ex is not None and ex.cache is not None:
        response.headers["X-Cache"] = ex.cache.header
    if ex is not None and ex.node is not None:  # which node answered (or failed) it
        response.headers[NODE_HEADER] = ex.node.name


def _end_trace(span: Span, ex: Exchange, endpoint: str) -> None:
    """The request's outcome on its span, which ends."""
    usage = ex.usage
    span.end(
        model=ex.model,
        endpoint=endpoint,
        status=ex.status,
        tokens=(usage.prompt_tokens, usage.completion_tokens) if usage is not None else None,
        cut=ex.cut or ("client_closed" if ex.client_gone else None),
    )


def _with_request_id(request: web.Request, ex: Exchange, dropped: frozenset[bytes]) -> RawHeaders:
    """The client's end-to-end headers but ``dropped`` (hop-by-hop, and the client's key),
    with the proxy's id for the request when it sent none, so that the node's log and the
    proxy's name the same request."""
    headers = end_to_end(request.raw_headers, dropped)
    if REQUEST_ID_HEADER in request.headers:
        return headers
    return [*headers, (REQUEST_ID_HEADER.encode(), ex.request_id.encode())]


def _with_node_headers(headers: RawHeaders, node: Node) -> RawHeaders:
    """The client's headers, with the node's own (its credentials) in place of any of the
    same name: a client cannot choose what the node is told."""
    own = node.config.headers
    if not own:
        return headers
    names = {name.lower().encode() for name in own}
    kept = [(k, v) for k, v in headers if k.lower() not in names]
    return [*kept, *((k.encode(), v.encode()) for k, v in own.items())]


async def expect_continue(request: web.Request) -> None:
    """aiohttp's own expect handler, but quiet when the client has gone already: aiohttp's
    writes its ``100 Continue`` to the closing transport and logs that as a server error."""
    if request.version != HttpVersion11:
        return
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    if not _client_left(request):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own bytes have not begun


def _client_left(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _gateway_error(node: Node, err: UpstreamError) -> ProxyError:
    if err.kind == "timeout":
        return ProxyError(504, f"node {node.name} did not answer in time: {err.detail}")
    return ProxyError(502, f"node {node.name} failed: {err.detail}")


async def _break_stream(
    request: web.Request, response: web.StreamResponse, head: Head, node: Node, err: UpstreamError
) -> None:
    """The node failed mid-body: end the client's stream so that it cannot look complete.

    A streamed (chunked) body gets one more event in its own format and the request's API
    family's shape (``errors.stream_error``); then the connection closes without the
    terminating chunk (aiohttp's last chunk, written after the handler returns, finds it
    closed). A body with a Content-Length just closes short of its length.
    """
    if head.content_length is None and request.version >= (1, 1):
        message = f"node {node.name} failed mid-response: {err.detail}"
        event_stream = head.content_type == "text/event-stream"
        await response.write(
            stream_error(message, family_of(request.path), event_stream=event_stream)
        )
    if request.transport is not None:
        request.transport.close()  # flushes what was written, then FIN: never the last chunk


@dataclass
class Upstream:
    """A node's answer under way: the connection, the answer, and its status and headers."""

    conn: Connection
    answer: Answer
    head: Head
    node: Node
