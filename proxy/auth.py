"""Who is asking, and may they ask this: client keys and their permissions (tenants). Pure.

Three modes, from the config alone (``mode_of``):

- ``keys``: keys are configured, and every request but CORS preflights needs one
  (``Authorization: Bearer <secret>`` or ``x-api-key``), or gets 401. A key may use the models
  its globs allow, manage models with ``manage``, and reach the admin paths with ``admin``.
- ``protected``: no keys and no ``admin.token``: the proxy is open for inference, but
  management and the admin paths answer only clients on loopback (Redis's protected mode).
- ``open``: no keys, and ``auth.open`` (or ``admin.token``, which guards the admin paths):
  every client may do everything but the admin paths the token guards.

A key is found by the SHA-256 of the presented secret, looked up in a dict keyed by digest.
That leaks nothing through timing: what the lookup's time depends on is the digest of what the
client sent, which the client cannot steer towards a configured digest byte by byte (finding a
secret for a chosen digest prefix is a preimage search), so learning when digests share a
prefix tells it nothing about any secret.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from .api import BLOBS_PREFIX, FANOUT_PATHS
from .config import Config, KeyConfig
from .errors import ProxyError, RateLimited, RejectionReason, go_quoted, shown
from .fairshare import OPEN, Tenant
from .models import normalize_model

Mode = Literal["open", "protected", "keys"]

# The headers that carry a key: never forwarded to a node while keys are configured.
KEY_HEADERS = frozenset({b"authorization", b"x-api-key"})
# Model management: pull, push, create, copy, delete (fleet.py, but push) and blob uploads.
MANAGEMENT_PATHS = FANOUT_PATHS | {"/api/push"}
ADMIN_PREFIX = "/-/"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class Key:
    """A configured key as requests see it: its settings and its share of the queue."""

    config: KeyConfig
    tenant: Tenant

    @property
    def name(self) -> str:
        return self.config.name


class KeyRefused(ProxyError):
    """401 (no key, or an unknown one) or 403 (not allowed; 404 where a listing hides the
    model), counted with its reason."""

    def __init__(self, status: int, message: str, reason: RejectionReason) -> None:
        unauthorized = status == 401
        super().__init__(
            status,
            message,
            headers={"WWW-Authenticate": "Bearer"} if unauthorized else None,
            code="invalid_api_key" if unauthorized else None,
        )
        self.reason: RejectionReason = reason


def mode_of(config: Config) -> Mode:
    if config.auth.keys:
        return "keys"
    if config.auth.open or config.admin.token:
        return "open"
    return "protected"


class Auth:
    """The policy of one config: built at start and on each reload, read by requests."""

    def __init__(self, config: Config) -> None:
        self.mode = mode_of(config)
        self.admin_token = config.admin.token
        self._by_digest = {bytes.fromhex(k.key_sha256): _key(k) for k in config.auth.keys}
        # Without keys, a client's Authorization is not the proxy's: it passes on as before.
        self.dropped_headers = KEY_HEADERS if self.mode == "keys" else frozenset()

    def identify(self, method: str, headers: Mapping[str, str]) -> Key | None:
        """The request's key (None without keys); 401 when keys are configured and it has
        none, or an unknown one."""
        if self.mode != "keys":
            return None
        secret = presented_secret(headers)
        if secret is None:
            if method == "OPTIONS":
                return None  # a CORS preflight never carries credentials (Fetch standard)
            raise KeyRefused(401, MISSING_KEY, "unauthorized")
        key = self._by_digest.get(hashlib.sha256(secret.encode()).digest())
        if key is None:
            raise KeyRefused(401, "invalid API key", "unauthorized")
        return key

    def check_path(self, key: Key | None, path: str, remote: str | None) -> None:
        """403 for management without ``manage`` (or, in protected mode, off loopback)."""
        if is_management(path) and not (key.config.manage if key else self._local(remote)):
            raise KeyRefused(403, _forbidden_to_manage(key), "forbidden")

    def check_model(self, key: Key | None, model: str) -> None:
        """403 unless the key's globs allow the model (a normalised name)."""
        if key is not None and not model_allowed(key.config, model):
            raise KeyRefused(
                403, f"key {key.name!r} may not use model '{shown(model)}'", "forbidden"
            )

    def check_listed(self, key: Key | None, model: str) -> None:
        """``GET /v1/models/{model}`` of a model the key may not use: 404, as for a model no
        node has, since the listings leave it out."""
        if not may_see(key, model):
            raise KeyRefused(404, model_not_found(shown(model)), "forbidden")

    def check_admin(self, headers: Mapping[str, str], remote: str | None) -> None:
        """The admin paths: admin.token, a key with ``admin``, or loopback in protected mode."""
        secret = presented_secret(headers)
        if secret is not None and self._opens_admin(secret):
            return
        if self.mode == "protected":
            if is_loopback(remote):
                return
            raise KeyRefused(403, PROTECTED_ADMIN, "forbidden")
        if self.mode == "open" and not self.admin_token:
            return
        raise KeyRefused(401, "admin token or admin key missing or wrong", "unauthorized")

    def _opens_admin(self, secret: str) -> bool:
        if self.admin_token and hmac.compare_digest(secret.encode(), self.admin_token.encode()):
            return True
        key = self._by_digest.get(hashlib.sha256(secret.encode()).digest())
        return key is not None and key.config.admin

    def _local(self, remote: str | None) -> bool:
        return self.mode != "protected" or is_loopback(remote)


MISSING_KEY = "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
PROTECTED_ADMIN = (
    "protected mode: no keys and no admin.token are configured, so the admin paths answer "
    "only clients on loopback (configure keys or admin.token, or set auth.open: true)"
)


def model_not_found(shown_name: str) -> str:
    """Ollama's words for a model it cannot load (the client's name, ``shown`` already)."""
    return f"model {go_quoted(shown_name)} not found, try pulling it first"


def _forbidden_to_manage(key: Key | None) -> str:
    if key is None:
        return (
            "protected mode: no keys and no admin.token are configured, so model management "
            "answers only clients on loopback (configure keys, or set auth.open: true)"
        )
    return f"key {key.name!r} may not manage models (pull, push, create, copy, delete, blobs)"


def _key(config: KeyConfig) -> Key:
    tenant = Tenant(config.name, config.weight, config.max_concurrency, config.max_queued)
    return Key(config, tenant)


def tenant_of(key: Key | None) -> Tenant:
    """Requests without a key (no keys configured) share the queue as one tenant."""
    return key.tenant if key is not None else OPEN


def presented_secret(headers: Mapping[str, str]) -> str | None:
    """``Authorization: Bearer <secret>`` (OpenAI SDKs, the ollama libraries' headers), else
    ``x-api-key`` (the Anthropic SDK); None when neither is there."""
    scheme, _, secret = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and secret.strip():
        return secret.strip()
    return headers.get("x-api-key", "").strip() or None


def may_see(key: Key | None, model: str) -> bool:
    """Whether a listing shows the model (any spelling) to the key: every model without keys."""
    return key is None or model_allowed(key.config, normalize_model(model))


def model_allowed(key: KeyConfig, model: str) -> bool:
    name = model.lower()
    return any(fnmatchcase(name, glob.lower()) for glob in key.models)


def is_management(path: str) -> bool:
    return path in MANAGEMENT_PATHS or path.startswith(BLOBS_PREFIX)


def is_loopback(remote: str | None) -> bool:
    """The peer's address is this host's own (an IPv4-mapped 127.x counts too)."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False  # no address (a Unix socket's peer is unknown): not to be trusted
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def rejection_reason(exc: ProxyError) -> RejectionReason | None:
    """Why a key was refused, for ollama_proxy_key_rejections_total (None: not a refusal)."""
    if isinstance(exc, KeyRefused | RateLimited):
        return exc.reason
    return None


def startup_notice(config: Config) -> tuple[int, str]:
    """The log level and line that say which mode is in force."""
    mode = mode_of(config)
    where = f"{config.listen_host}:{config.listen_port}"
    if mode == "keys":
        return logging.INFO, f"auth: keys mode, {len(config.auth.keys)} keys; requests need one"
    if mode == "protected":
        return logging.INFO, (
            "auth: protected mode (no keys, no admin.token): model management and the admin "
            "paths answer only clients on loopback; set auth.open: true to lift it"
        )
    if config.listen_host in LOOPBACK_HOSTS:
        return logging.INFO, "auth: open mode (no keys): every client may do everything"
    return logging.WARNING, (
        f"auth: open mode (no keys): anyone who can reach {where} may run every model and "
        "manage models on every node; configure auth.keys to require keys"
    )
