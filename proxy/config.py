"""config.yaml → frozen dataclasses.

Pure: no I/O beyond reading the file (and the TLS certificate and key it names, which must
load), no side effects. Every problem is reported as one line
that names its dotted path (``nodes[1].url: must start with http:// or https://``), and all of
them are collected before failing, so an operator fixes a file in one pass. A file with any error
yields no Config at all: nothing half-configured can start.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from .cors import origin_problem
from .http1 import HOP_BY_HOP, RESET_REQUEST_HEADERS
from .models import normalize_model

T = TypeVar("T")


class ConfigError(Exception):
    """An invalid config; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class NodeConfig:
    url: str  # scheme://host:port, no trailing slash
    name: str
    max_concurrency: int
    weight: float
    # Caps for single models on this node, tighter than max_concurrency (Ollama runs an
    # embedding model one request at a time). Keys are normalised model names.
    model_concurrency: dict[str, int] = field(default_factory=dict)
    # Sent with every request to this node (proxied, checks, discovery, fan-out), in place of
    # a client's header of the same name: its credentials. Never shown (repr, /-/nodes, logs).
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    # Models the node holds in memory at once (its OLLAMA_MAX_LOADED_MODELS); None: unknown,
    # and loading one more may push out any other (routing never does that to one in use).
    max_loaded_models: int | None = None


@dataclass(frozen=True)
class HealthCheckConfig:
    interval: float
    timeout: float
    rise: int  # consecutive passes that bring a down node back
    fall: int  # consecutive failed checks that take an up node out, or failed requests (apart)
    # A node taken out by failing requests (while its checks may still pass) stays out this
    # long, doubling at each repeat up to max_ejection_time, so it cannot flap in and out.
    ejection_time: float
    max_ejection_time: float


DEFAULT_CLIENT_TIMEOUT = 60.0
DEFAULT_MAX_IDLE_CONNECTIONS = 32
DEFAULT_IDLE_CONNECTION_TIMEOUT = 30.0
DEFAULT_QUEUE_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_OTHER_PER_NODE = 8


@dataclass(frozen=True)
class QueueConfig:
    max_size: int
    timeout: float
    # Request bodies held by queued requests, in bytes, all together: what the queue may cost
    # in memory is this, not max_size times max_body_size.
    max_body_bytes: int = DEFAULT_QUEUE_BODY_BYTES
    # Requests that take no slot (model information, paths the proxy does not know) sent to
    # one node at once, apart from its slots; the rest wait in a queue of their own.
    max_other_per_node: int = DEFAULT_OTHER_PER_NODE


@dataclass(frozen=True)
class UpstreamConfig:
    connect_timeout: float
    # Between two bytes from a node, not for the whole request: a model load can be silent
    # for minutes and a long generation can last hours.
    idle_timeout: float
    max_attempts: int  # a request goes to at most this many nodes (retries = attempts - 1)
    # A client that takes no byte of its answer for this long, while the node has more for
    # it, is dropped (nginx's send_timeout): it would hold a slot and the node's GPU.
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT
    # Kept-alive connections to one node: at most this many idle, none idle longer than this
    # (a node, or a middlebox, may close an idle one first: then it costs a retry).
    max_idle_connections: int = DEFAULT_MAX_IDLE_CONNECTIONS
    idle_connection_timeout: float = DEFAULT_IDLE_CONNECTION_TIMEOUT


@dataclass(frozen=True)
class AdminConfig:
    # When set, /-/ paths that change or reveal state (/-/nodes, /-/reload, drain) need
    # "Authorization: Bearer <token>"; /-/healthy and /-/ready stay open for probes.
    token: str


@dataclass(frozen=True)
class ShutdownConfig:
    drain_timeout: float  # seconds in-flight requests may run on after SIGTERM


@dataclass(frozen=True)
class AccessLogConfig:
    enabled: bool
    format: str  # "text" | "json"


@dataclass(frozen=True)
class ReloadConfig:
    watch: bool  # reload when the file changes
    poll_interval: float  # seconds between looks at the file


@dataclass(frozen=True)
class RoutingConfig:
    # The longest a request waits for a better node (one that holds its model, or finishes
    # it sooner) while another could take it; expected finish times decide before that.
    spill_after: float
    # Conversation affinity (affinity.py): how many conversations are remembered with the node
    # that served their last turn (0: none), for how long, and the header naming a session.
    affinity_entries: int = 100_000
    affinity_ttl: float = 600.0
    session_header: str = "X-Session-Id"
    default_load_seconds: float = 2.0  # a cold load's cost before any was seen
    affinity_margin: float = 2.0  # seconds a conversation's own node may be behind the best
    min_gain: float = 0.2  # a free slot is passed over only to finish this fraction sooner


@dataclass(frozen=True)
class DiscoveryConfig:
    interval: float  # seconds between refreshes of each node's /api/tags and /api/ps
    timeout: float
    # Seconds a request for a model no node lists waits for the nodes' /api/tags to be read
    # again before its 404 (a model pulled on a node straight); 0: answer at once.
    recheck_timeout: float = 2.0


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may hold of the proxy: connections, and time to send a request."""

    # Client connections open at once; None: sized from the descriptor limit at start (see
    # serving.py). More wait in the kernel's accept queue until one closes.
    max_client_connections: int | None
    header_timeout: float  # from accept, or the previous answer's end, to a whole request head
    body_timeout: float  # the longest wait for the next piece of a request body


@dataclass(frozen=True)
class KeyConfig:
    """One client key (a tenant). Its secret is never stored: only the SHA-256 of it."""

    name: str  # in metrics, the access log and /-/usage
    key_sha256: str = field(repr=False)  # 64 lower-case hex digits
    # Globs over normalised model names (fnmatch, compared in lower case): what it may use.
    models: tuple[str, ...] = ("*",)
    max_concurrency: int | None = None  # slots held at once, fleet-wide (None: no cap)
    max_queued: int | None = None  # of its requests waiting at once; past it 429
    requests_per_minute: int | None = None  # inference requests admitted
    tokens_per_minute: int | None = None  # prompt + completion, charged after the answer
    tokens_per_day: int | None = None
    weight: float = 1.0  # share of the slots when keys compete
    manage: bool = False  # pull, push, create, copy, delete, blob uploads
    admin: bool = False  # the /-/ admin paths


@dataclass(frozen=True)
class AuthConfig:
    keys: tuple[KeyConfig, ...] = ()  # those listed inline, then keys_file's
    keys_file: str = ""  # as written; read relative to the config file
    # Lift protected mode: without keys and admin.token, management and the admin paths
    # answer any client, not only those on loopback.
    open: bool = False


@dataclass(frozen=True)
class CorsConfig:
    # Browser origins allowed besides Ollama's defaults, as OLLAMA_ORIGINS lists them
    # (trimmed, lower case; one * each, "*" alone for any origin).
    origins: tuple[str, ...]


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the listener: both files, or neither (plain HTTP)."""

    cert_file: str = ""  # PEM: the certificate, then any intermediates
    key_file: str = ""  # PEM, not encrypted
    # Loaded from the two files when the config was read: each reload loads them afresh, so a
    # renewed certificate serves new connections, and one that does not load rejects the reload.
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class StateConfig:
    """Where replicas share state: Redis at ``redis_url``, or nothing (this process alone)."""

    redis_url: str = ""  # redis://, rediss:// or unix://; empty: in this process, as one
    lease_ttl: float = 10.0  # seconds a crashed replica's slots stay counted
    # Before every key the proxy writes, so several fleets (or tests) can share one Redis.
    key_prefix: str = "ollama-proxy"
    # Replicas each divides the caps among while Redis has not answered since it started
    # (after that: as many as it last saw registered).
    replicas: int = 1


@dataclass(frozen=True)
class CacheConfig:
    """The response cache of embedding answers."""

    max_bytes: int = 256 * 1024 * 1024  # 0: off
    ttl: float = 3600.0  # seconds an entry may be replayed


@dataclass(frozen=True)
class Config:
    listen_host: str
    listen_port: int
    nodes: tuple[NodeConfig, ...]
    health_check: HealthCheckConfig
    queue: QueueConfig
    upstream: UpstreamConfig
    max_body_size: int  # bytes; larger request bodies get 413
    admin: AdminConfig
    shutdown: ShutdownConfig
    access_log: AccessLogConfig
    reload: ReloadConfig
    routing: RoutingConfig
    discovery: DiscoveryConfig
    limits: LimitsConfig
    cors: CorsConfig
    # Model → names of the nodes an /api/pull of it goes to; others go to every healthy node.
    placement: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # SO_REUSEPORT: another process may listen on the same port (a zero-downtime upgrade on
    # one host); without it a second proxy on the port fails with "address in use".
    listen_reuse_port: bool = False
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = TlsConfig()
    state: StateConfig = StateConfig()
    cache: CacheConfig = CacheConfig()


DEFAULT_LISTEN = "0.0.0.0:11434"
DEFAULT_MAX_BODY = 64 * 1024 * 1024


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML file; raise ConfigError listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file): cannot read: {exc.strerror or exc}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise ConfigError([f"(file): not valid YAML{line}: {problem}"]) from exc
    return parse_config({} if data is None else data, Path(path).parent)


def parse_config(data: object, base: Path | None = None) -> Config:
    """Validate already-parsed YAML; raise ConfigError listing every problem. Files it names
    (``auth.keys_file``) are read relative to ``base``, the config file's directory."""
    r = _Reader()
    top = r.mapping(data, "")
    config = _read_config(r, top, base or Path())
    if r.errors:
        raise ConfigError(r.errors)
    return config


def _read_config(r: _Reader, top: dict[str, Any], base: Path) -> Config:
    top_keys = {"listen", "listen_reuse_port", "nodes", "max_body_size", "placement", "auth"}
    r.no_unknown_keys(top, "", set(_SECTIONS) | top_keys)
    host, port = _listen(r, top.get("listen", DEFAULT_LISTEN), "listen")
    nodes = _nodes(r, top.get("nodes"))
    section = {
        name: read(r, r.mapping(top.get(name, {}), name)) for name, read in _SECTIONS.items()
    }
    return Config(
        listen_host=host,
        listen_port=port,
        nodes=nodes,
        max_body_size=r.size(top.get("max_body_size", DEFAULT_MAX_BODY), "max_body_size"),
        placement=_placement(r, top.get("placement", {}), {n.name for n in nodes}),
        listen_reuse_port=r.boolean(top.get("listen_reuse_port", False), "listen_reuse_port"),
        auth=_auth(r, r.mapping(top.get("auth", {}), "auth"), base),
        **section,
    )


def parse_listen(value: str, path: str) -> tuple[str, int]:
    """``listen``'s reading, for ``--listen`` too (its errors name ``path``)."""
    r = _Reader()
    host_port = _listen(r, value, path)
    if r.errors:
        raise ConfigError(r.errors)
    return host_port


def _listen(r: _Reader, value: object, path: str) -> tuple[str, int]:
    text = r.string(value, path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        r.error(path, 'must be "host:port" with a port from 0 to 65535')
        return "127.0.0.1", 0
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:
        r.error(path, 'an IPv6 address goes in brackets, as in "[::1]:11434"')
        return "127.0.0.1", 0
    return (host[1:-1] if bracketed else host) or "0.0.0.0", int(port_text)


def _nodes(r: _Reader, value: object) -> tuple[NodeConfig, ...]:
    if value is None:
        r.error("nodes", "is required: a list of nodes, each with a url")
        return ()
    if not isinstance(value, list) or not value:
        r.error("nodes", "must be a list of at least one node, each with a url")
        return ()
    nodes = tuple(_node(r, item, f"nodes[{i}]") for i, item in enumerate(value))
    seen: dict[str, str] = {}
    for i, node in enumerate(nodes):
        if node.name in seen:
            r.error(f"nodes[{i}].name", f"{node.name!r} is already used by {seen[node.name]}")
        seen.setdefault(node.name, f"nodes[{i}]")
    return nodes


def _node(r: _Reader, value: object, path: str) -> NodeConfig:
    raw = r.mapping(value, path)
    known = {"url", "name", "max_concurrency", "weight", "model_concurrency", "headers"}
    known.add("max_loaded_models")
    r.no_unknown_keys(raw, path, known)
    url = _node_url(r, raw.get("url"), f"{path}.url")
    default_name = _netloc(url) or url
    name = r.string(raw.get("name", default_name), f"{path}.name")
    if not name:
        r.error(f"{path}.name", "must not be empty")
    return NodeConfig(
        url=url,
        name=name,
        max_concurrency=r.integer(raw.get("max_concurrency", 1), f"{path}.max_concurrency", 1),
        weight=r.number(raw.get("weight", 1.0), f"{path}.weight", minimum=0.001),
        model_concurrency=_model_caps(r, raw.get("model_concurrency", {}), path),
        headers=_node_headers(r, raw.get("headers", {}), f"{path}.headers"),
        max_loaded_models=_optional_count(
            r, raw.get("max_loaded_models"), f"{path}.max_loaded_models"
        ),
    )


def _model_caps(r: _Reader, value: object, node_path: str) -> dict[str, int]:
    path = f"{node_path}.model_concurrency"
    caps = {}
    for model, cap in r.mapping(value, path).items():
        caps[normalize_model(str(model))] = r.integer(cap, f"{path}.{model}", 1)
    return caps


# RFC 9110 §5.6.2: a header's name is a token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Written by the proxy itself for each request (Host, Content-Length, Expect), or meaningful for
# one connection only: a node's headers may not set them.
_NOT_NODE_HEADERS = frozenset(h.decode() for h in HOP_BY_HOP | RESET_REQUEST_HEADERS)
# Control characters (but tab) would end a header line early or smuggle in another one.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _node_headers(r: _Reader, value: object, path: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for name, text in r.mapping(value, path).items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not _TOKEN.match(name):
            r.error(where, "is not a header name (letters, digits and !#$%&'*+-.^_`|~)")
        elif name.lower() in _NOT_NODE_HEADERS:
            r.error(where, "is set by the proxy itself or only for one connection")
        elif name.lower() in seen:
            r.error(where, "is given twice (header names are not case-sensitive)")
        elif not isinstance(text, str):
            r.error(where, "must be a string")
        elif _CONTROL.search(text):
            r.error(where, "must not contain CR, LF or other control characters")
        else:
            headers[name] = text
        seen.add(str(name).lower())
    return headers


def _placement(r: _Reader, value: object, node_names: set[str]) -> dict[str, tuple[str, ...]]:
    placement = {}
    for model, names in r.mapping(value, "placement").items():
        path = f"placement.{model}"
        if not isinstance(names, list) or not names:
            r.error(path, "must be a list of node names")
            continue
        for i, name in enumerate(names):
            if name not in node_names:
                r.error(f"{path}[{i}]", f"no node is named {name!r}")
        placement[normalize_model(str(model))] = tuple(str(n) for n in names)
    return placement


def _node_url(r: _Reader, value: object, path: str) -> str:
    if value is None:
        r.error(path, "is required")
        return ""
    url = r.string(value, path).rstrip("/")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket
        r.error(path, "is not a valid URL")
        return url
    if parts.scheme not in ("http", "https"):
        r.error(path, "must start with http:// or https://")
    elif not parts.hostname:
        r.error(path, "must name a host")
    elif "@" in parts.netloc:  # the error never repeats the URL: it holds a secret
        headers = path.removesuffix(".url") + ".headers"
        r.error(path, f"must not hold credentials (user:password@); put them in {headers}")
    elif parts.query or parts.fragment:
        r.error(path, "must not have a query or fragment")
    else:
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            r.error(path, "has an invalid port")
    return url


def _netloc(url: str) -> str:
    try:
        return urlsplit(url).netloc
    except ValueError:  # reported by _node_url
        return ""


def _health_check(r: _Reader, raw: dict[str, Any]) -> HealthCheckConfig:
    p = "health_check"
    known = {"interval", "timeout", "rise", "fall", "ejection_time", "max_ejection_time"}
    r.no_unknown_keys(raw, p, known)
    return HealthCheckConfig(
        interval=r.number(raw.get("interval", 5), f"{p}.interval", minimum=0.05),
        timeout=r.number(raw.get("timeout", 2), f"{p}.timeout", minimum=0.01),
        rise=r.integer(raw.get("rise", 2), f"{p}.rise", 1),
        fall=r.integer(raw.get("fall", 3), f"{p}.fall", 1),
        ejection_time=r.number(raw.get("ejection_time", 30), f"{p}.ejection_time", minimum=0),
        max_ejection_time=r.number(
            raw.get("max_ejection_time", 300), f"{p}.max_ejection_time", minimum=0
        ),
    )


def _queue(r: _Reader, raw: dict[str, Any]) -> QueueConfig:
    r.no_unknown_keys(raw, "queue", {"max_size", "timeout", "max_body_bytes", "max_other_per_node"})
    return QueueConfig(
        max_size=r.integer(raw.get("max_size", 512), "queue.max_size", 0),
        timeout=r.number(raw.get("timeout", 300), "queue.timeout", minimum=0.001),
        max_body_bytes=r.size(
            raw.get("max_body_bytes", DEFAULT_QUEUE_BODY_BYTES), "queue.max_body_bytes"
        ),
        max_other_per_node=r.integer(
            raw.get("max_other_per_node", DEFAULT_OTHER_PER_NODE), "queue.max_other_per_node", 1
        ),
    )


def _upstream(r: _Reader, raw: dict[str, Any]) -> UpstreamConfig:
    p = "upstream"
    known = {"connect_timeout", "idle_timeout", "max_attempts", "client_timeout"}
    r.no_unknown_keys(raw, p, known | {"max_idle_connections", "idle_connection_timeout"})
    return UpstreamConfig(
        connect_timeout=r.number(raw.get("connect_timeout", 5), f"{p}.connect_timeout", 0.01),
        idle_timeout=r.number(raw.get("idle_timeout", 600), f"{p}.idle_timeout", 0.01),
        max_attempts=r.integer(raw.get("max_attempts", 3), f"{p}.max_attempts", 1),
        client_timeout=r.number(
            raw.get("client_timeout", DEFAULT_CLIENT_TIMEOUT), f"{p}.client_timeout", 0.01
        ),
        max_idle_connections=r.integer(
            raw.get("max_idle_connections", DEFAULT_MAX_IDLE_CONNECTIONS),
            f"{p}.max_idle_connections",
            0,
        ),
        idle_connection_timeout=r.number(
            raw.get("idle_connection_timeout", DEFAULT_IDLE_CONNECTION_TIMEOUT),
            f"{p}.idle_connection_timeout",
            0.01,
        ),
    )


def _admin(r: _Reader, raw: dict[str, Any]) -> AdminConfig:
    r.no_unknown_keys(raw, "admin", {"token"})
    return AdminConfig(token=r.string(raw.get("token", ""), "admin.token"))


_KEY_FIELDS = {"name", "key_sha256", "models", "max_concurrency", "max_queued", "weight"}
_KEY_FIELDS |= {"requests_per_minute", "tokens_per_minute", "tokens_per_day", "manage", "admin"}
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_GLOB_CHARS = frozenset("*?[")


def _auth(r: _Reader, raw: dict[str, Any], base: Path) -> AuthConfig:
    r.no_unknown_keys(raw, "auth", {"keys", "keys_file", "open"})
    keys_file = r.string(raw.get("keys_file", ""), "auth.keys_file")
    listed = [*_key_list(r, raw.get("keys", []), "auth.keys")]
    if keys_file:
        listed += _keys_from_file(r, base / keys_file, "auth.keys_file")
    keys = tuple(key for key, _ in listed)
    _unique_keys(r, listed)
    is_open = r.boolean(raw.get("open", False), "auth.open")
    if is_open and keys:
        r.error("auth.open", "must not be true while keys are configured: each request needs one")
    return AuthConfig(keys=keys, keys_file=keys_file, open=is_open)


def _keys_from_file(r: _Reader, path: Path, where: str) -> Iterator[tuple[KeyConfig, str]]:
    """A YAML file holding a list of keys, or a mapping with one: ``keys``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        r.error(where, f"cannot read {str(path)!r}: {exc.strerror or exc}")
        return iter(())
    except yaml.YAMLError as exc:
        r.error(where, f"{str(path)!r} is not valid YAML: {getattr(exc, 'problem', None) or exc}")
        return iter(())
    if isinstance(data, dict):
        r.no_unknown_keys(data, where, {"keys"})
        data = data.get("keys", [])
    return _key_list(r, [] if data is None else data, f"{where}.keys")


def _key_list(r: _Reader, value: object, path: str) -> Iterator[tuple[KeyConfig, str]]:
    if not isinstance(value, list):
        r.error(path, "must be a list of keys, each with a name and a key_sha256")
        return iter(())
    return ((_key(r, item, f"{path}[{i}]"), f"{path}[{i}]") for i, item in enumerate(value))


def _key(r: _Reader, value: object, path: str) -> KeyConfig:
    raw = r.mapping(value, path)
    r.no_unknown_keys(raw, path, _KEY_FIELDS)
    name = r.string(raw.get("name", ""), f"{path}.name")
    if not name:
        r.error(f"{path}.name", "is required and must not be empty")
    digest = r.string(raw.get("key_sha256", ""), f"{path}.key_sha256")
    if not _SHA256_HEX.match(digest):
        r.error(f"{path}.key_sha256", "must be the SHA-256 of the secret: 64 hex digits")
    limit = _optional_count
    return KeyConfig(
        name=name,
        key_sha256=digest.lower(),
        models=_model_globs(r, raw.get("models", ["*"]), f"{path}.models"),
        max_concurrency=limit(r, raw.get("max_concurrency"), f"{path}.max_concurrency", 1),
        max_queued=limit(r, raw.get("max_queued"), f"{path}.max_queued", 0),
        requests_per_minute=limit(r, raw.get("requests_per_minute"), f"{path}.requests_per_minute"),
        tokens_per_minute=limit(r, raw.get("tokens_per_minute"), f"{path}.tokens_per_minute"),
        tokens_per_day=limit(r, raw.get("tokens_per_day"), f"{path}.tokens_per_day"),
        weight=r.number(raw.get("weight", 1.0), f"{path}.weight", minimum=0.001),
        manage=r.boolean(raw.get("manage", False), f"{path}.manage"),
        admin=r.boolean(raw.get("admin", False), f"{path}.admin"),
    )


def _optional_count(r: _Reader, value: object, path: str, minimum: int = 1) -> int | None:
    return None if value is None else r.integer(value, path, minimum)


def _model_globs(r: _Reader, value: object, path: str) -> tuple[str, ...]:
    """Globs as given; a plain name is normalised (``llama3.2`` is ``llama3.2:latest``)."""
    if not isinstance(value, list) or not value:
        r.error(path, 'must be a list of model names or globs, such as ["llama3.2*"]')
        return ()
    globs = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            r.error(f"{path}[{i}]", "must be a model name or glob")
        elif _GLOB_CHARS & set(item):
            globs.append(item.strip())
        else:
            globs.append(normalize_model(item))
    return tuple(globs)


def _unique_keys(r: _Reader, listed: list[tuple[KeyConfig, str]]) -> None:
    """Names identify keys in metrics and logs, digests identify them on requests."""
    names: dict[str, str] = {}
    digests: dict[str, str] = {}
    for key, path in listed:
        if key.name in names:
            r.error(f"{path}.name", f"{key.name!r} is already used by {names[key.name]}")
        if key.key_sha256 in digests:
            r.error(f"{path}.key_sha256", f"is the same as {digests[key.key_sha256]}'s")
        names.setdefault(key.name, path)
        digests.setdefault(key.key_sha256, path)


def _shutdown(r: _Reader, raw: dict[str, Any]) -> ShutdownConfig:
    r.no_unknown_keys(raw, "shutdown", {"drain_timeout"})
    timeout = r.number(raw.get("drain_timeout", 30), "shutdown.drain_timeout", minimum=0)
    return ShutdownConfig(drain_timeout=timeout)


def _access_log(r: _Reader, raw: dict[str, Any]) -> AccessLogConfig:
    r.no_unknown_keys(raw, "access_log", {"enabled", "format"})
    fmt = r.string(raw.get("format", "text"), "access_log.format")
    if fmt not in ("text", "json"):
        r.error("access_log.format", 'must be "text" or "json"')
    return AccessLogConfig(
        enabled=r.boolean(raw.get("enabled", True), "access_log.enabled"), format=fmt
    )


def _reload(r: _Reader, raw: dict[str, Any]) -> ReloadConfig:
    r.no_unknown_keys(raw, "reload", {"watch", "poll_interval"})
    return ReloadConfig(
        watch=r.boolean(raw.get("watch", True), "reload.watch"),
        poll_interval=r.number(raw.get("poll_interval", 1), "reload.poll_interval", 0.05),
    )


def _routing(r: _Reader, raw: dict[str, Any]) -> RoutingConfig:
    affinity = {"affinity_entries", "affinity_ttl", "session_header"}
    keys = {"spill_after", "default_load_seconds", "affinity_margin", "min_gain", *affinity}
    r.no_unknown_keys(raw, "routing", keys)
    header = r.string(raw.get("session_header", "X-Session-Id"), "routing.session_header")
    if header and not _TOKEN.match(header):
        r.error("routing.session_header", "must be a header name (or empty: none)")
    min_gain = r.number(raw.get("min_gain", 0.2), "routing.min_gain", 0)
    if min_gain > 1:
        r.error("routing.min_gain", "must be at most 1 (a fraction of the free node's time)")
    return RoutingConfig(
        spill_after=r.number(raw.get("spill_after", 10), "routing.spill_after", 0),
        affinity_entries=r.integer(
            raw.get("affinity_entries", 100_000), "routing.affinity_entries", 0
        ),
        affinity_ttl=r.number(raw.get("affinity_ttl", 600), "routing.affinity_ttl", 0),
        session_header=header,
        default_load_seconds=r.number(
            raw.get("default_load_seconds", 2), "routing.default_load_seconds", 0
        ),
        affinity_margin=r.number(raw.get("affinity_margin", 2), "routing.affinity_margin", 0),
        min_gain=min_gain,
    )


def _discovery(r: _Reader, raw: dict[str, Any]) -> DiscoveryConfig:
    r.no_unknown_keys(raw, "discovery", {"interval", "timeout", "recheck_timeout"})
    return DiscoveryConfig(
        interval=r.number(raw.get("interval", 15), "discovery.interval", minimum=0.05),
        timeout=r.number(raw.get("timeout", 5), "discovery.timeout", minimum=0.01),
        recheck_timeout=r.number(
            raw.get("recheck_timeout", 2), "discovery.recheck_timeout", minimum=0
        ),
    )


def _limits(r: _Reader, raw: dict[str, Any]) -> LimitsConfig:
    p = "limits"
    r.no_unknown_keys(raw, p, {"max_client_connections", "header_timeout", "body_timeout"})
    return LimitsConfig(
        max_client_connections=_auto_or_count(
            r, raw.get("max_client_connections", "auto"), f"{p}.max_client_connections"
        ),
        header_timeout=r.number(raw.get("header_timeout", 30), f"{p}.header_timeout", 0.01),
        body_timeout=r.number(raw.get("body_timeout", 60), f"{p}.body_timeout", 0.01),
    )


def _tls(r: _Reader, raw: dict[str, Any]) -> TlsConfig:
    r.no_unknown_keys(raw, "tls", {"cert_file", "key_file"})
    cert = r.string(raw.get("cert_file", ""), "tls.cert_file")
    key = r.string(raw.get("key_file", ""), "tls.key_file")
    if not cert and not key:
        return TlsConfig()
    if not (cert and key):
        missing = "tls.key_file" if cert else "tls.cert_file"
        r.error(missing, "is required with the other (both, or neither for plain HTTP)")
        return TlsConfig()
    return TlsConfig(cert, key, _server_context(r, cert, key))


def _server_context(r: _Reader, cert: str, key: str) -> ssl.SSLContext | None:
    for path, name in ((cert, "tls.cert_file"), (key, "tls.key_file")):
        if not Path(path).is_file():
            r.error(name, f"no such file: {path}")
            return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])  # the only protocol served
    try:  # the password callback: an encrypted key fails here instead of prompting on a TTY
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        r.error("tls.cert_file", f"cannot load with tls.key_file: {exc}")
        return None
    return context


def _no_password() -> str:
    raise ValueError("the key is encrypted; give it unencrypted (readable by the proxy only)")


def _auto_or_count(r: _Reader, value: object, path: str) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        r.error(path, 'must be "auto" or an integer of at least 1')
        return None
    return value


def _state(r: _Reader, raw: dict[str, Any]) -> StateConfig:
    r.no_unknown_keys(raw, "state", {"redis_url", "lease_ttl", "key_prefix", "replicas"})
    url = r.string(raw.get("redis_url", ""), "state.redis_url")
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        r.error("state.redis_url", "must start with redis://, rediss:// or unix://")
    return StateConfig(
        redis_url=url,
        lease_ttl=r.number(raw.get("lease_ttl", 10), "state.lease_ttl", 1),
        key_prefix=r.string(raw.get("key_prefix", "ollama-proxy"), "state.key_prefix"),
        replicas=r.integer(raw.get("replicas", 1), "state.replicas", 1),
    )


def _cache(r: _Reader, raw: dict[str, Any]) -> CacheConfig:
    r.no_unknown_keys(raw, "cache", {"max_bytes", "ttl"})
    max_bytes = raw.get("max_bytes", CacheConfig.max_bytes)
    return CacheConfig(
        max_bytes=0 if max_bytes in (0, "0") else r.size(max_bytes, "cache.max_bytes"),
        ttl=r.number(raw.get("ttl", 3600), "cache.ttl", 0),
    )


def _cors(r: _Reader, raw: dict[str, Any]) -> CorsConfig:
    r.no_unknown_keys(raw, "cors", {"origins"})
    value = raw.get("origins", [])
    if not isinstance(value, list):
        r.error("cors.origins", 'must be a list of origins, such as ["https://chat.example.com"]')
        return CorsConfig(origins=())
    origins = []
    for i, item in enumerate(value):
        origin = r.string(item, f"cors.origins[{i}]").strip().lower()
        if isinstance(item, str) and (problem := origin_problem(origin)) is not None:
            r.error(f"cors.origins[{i}]", problem)
        origins.append(origin)
    return CorsConfig(origins=tuple(origins))


# Sections whose every key has a default: name → reader.
_SECTIONS: dict[str, Callable[[_Reader, dict[str, Any]], Any]] = {
    "health_check": _health_check,
    "queue": _queue,
    "upstream": _upstream,
    "admin": _admin,
    "shutdown": _shutdown,
    "access_log": _access_log,
    "reload": _reload,
    "routing": _routing,
    "discovery": _discovery,
    "limits": _limits,
    "cors": _cors,
    "tls": _tls,
    "state": _state,
    "cache": _cache,
}

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_UNITS |= {"kb": 1000, "mb": 1000**2, "gb": 1000**3}


class _Reader:
    """Type checks that record ``path: problem`` and return a harmless stand-in."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, problem: str) -> None:
        self.errors.append(f"{path or '(top level)'}: {problem}")

    def mapping(self, value: object, path: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        self.error(path, "must be a mapping of keys to values")
        return {}

    def no_unknown_keys(self, raw: dict[str, Any], path: str, known: set[str]) -> None:
        for key in raw:
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                self.error(where, f"unknown key (known: {', '.join(sorted(known))})")

    def string(self, value: object, path: str) -> str:
        return self._typed(value, path, str, "must be a string", "")

    def boolean(self, value: object, path: str) -> bool:
        return self._typed(value, path, bool, "must be true or false", False)

    def integer(self, value: object, path: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, "must be an integer")
            return minimum
        if value < minimum:
            self.error(path, f"must be at least {minimum}")
        return value

    def number(self, value: object, path: str, minimum: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(path, "must be a number")
            return minimum
        if value < minimum:
            self.error(path, f"must be at least {minimum:g}")
        return float(value)

    def size(self, value: object, path: str) -> int:
        """Bytes, as an integer or a string such as "64MiB"."""
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        match = _SIZE.match(value) if isinstance(value, str) else None
        if match is None or int(match[1]) <= 0:
            self.error(path, 'must be a positive number of bytes, such as 67108864 or "64MiB"')
            return 1
        return int(match[1]) * _UNITS[(match[2] or "").lower()]

    def _typed(self, value: object, path: str, kind: type[T], problem: str, stand_in: T) -> T:
        if isinstance(value, kind):
            return value
        self.error(path, problem)
        return stand_in


__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "HealthCheckConfig",
    "KeyConfig",
    "NodeConfig",
    "load_config",
    "parse_listen",
]
