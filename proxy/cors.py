"""Browser requests as Ollama judges them: which origins may call, what a preflight is
answered, which CORS headers every answer carries, and which ``Host`` a loopback proxy takes.

Pure rules, copied from Ollama: its default origins (``envconfig.AllowedOrigins``), its
allowed request headers and gin-contrib/cors's matching and headers (``server/routes.go``,
``GenerateRoutes``), and its DNS-rebinding guard (``allowedHostsMiddleware``). ``app.py``
applies them; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Ollama's AllowedOrigins(), after any OLLAMA_ORIGINS: these hosts with http and https, with
# and without any port, and the schemes of desktop shells and editors' webviews.
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0")
DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for host in _LOCAL_HOSTS
        for port in ("", ":*")
        for scheme in ("http", "https")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
# gin-contrib/cors accepts an origin without a wildcard only with one of these schemes
# (AllowBrowserExtensions, as Ollama sets it); Ollama refuses to start on any other.
EXACT_SCHEMES = (
    "http://",
    "https://",
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)
# Ollama's AllowHeaders, then what the Anthropic SDK sends from a browser and the keys the
# proxy's tenants send (Authorization is Ollama's already), and the proxy's request id.
ALLOWED_HEADERS = (
    "Authorization",
    "Content-Type",
    "User-Agent",
    "Accept",
    "X-Requested-With",
    "OpenAI-Beta",
    "x-stainless-arch",
    "x-stainless-async",
    "x-stainless-custom-poll-interval",
    "x-stainless-helper-method",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-poll-helper",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
    "x-stainless-helper",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    "X-Request-Id",
)
# gin-contrib/cors's DefaultConfig, which Ollama keeps: methods and a preflight's lifetime.
ALLOWED_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
MAX_AGE = str(12 * 3600)
# Ollama exposes none; the proxy's own request id and its 429/503 wait are worth reading.
EXPOSED_HEADERS = "X-Request-Id,Retry-After"
# Host names Ollama on loopback answers besides IP addresses and the machine's own name.
_LOCAL_NAMES = ("localhost",)
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# Go's netip.Addr.IsPrivate: RFC 1918 and RFC 4193 only (Python's is_private is wider).
_PRIVATE_NETS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def origin_problem(origin: str) -> str | None:
    """Why Ollama would refuse ``origin`` in OLLAMA_ORIGINS (it does not start), or None."""
    stars = origin.count("*")
    if stars > 1:
        return "only one * is allowed"
    if stars == 0 and not origin.startswith(EXACT_SCHEMES):
        return f"must contain a * or start with one of {', '.join(EXACT_SCHEMES)}"
    return None


def canonical_header(name: str) -> str:
    """Go's http.CanonicalHeaderKey, as gin-contrib/cors writes Allow-Headers."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _normalized(values: Iterable[str]) -> list[str]:
    """gin-contrib/cors's normalize: trimmed, lower case, first of each kept."""
    return list(dict.fromkeys(v.strip().lower() for v in values))


@dataclass(frozen=True)
class Policy:
    """Which origins may call the proxy from a browser; built once per config."""

    exact: frozenset[str]
    wildcards: tuple[tuple[str, str], ...]  # (before the *, after it)
    allow_all: bool  # "*" among the origins: Allow-Origin is "*"

    @classmethod
    def of(cls, extra_origins: Iterable[str] = ()) -> Policy:
        """The configured origins (OLLAMA_ORIGINS's meaning) and Ollama's defaults."""
        origins = _normalized([*extra_origins, *DEFAULT_ORIGINS])
        wildcards = tuple(_split_wildcard(o) for o in origins if "*" in o)
        return cls(frozenset(origins), wildcards, allow_all="*" in origins)

    def allows(self, origin: str) -> bool:
        """gin-contrib/cors's validateOrigin, with Ollama's AllowWildcard."""
        if self.allow_all or origin in self.exact:
            return True
        return any(_matches(origin, before, after) for before, after in self.wildcards)


def _split_wildcard(origin: str) -> tuple[str, str]:
    before, _, after = origin.partition("*")
    return before, after


def _matches(origin: str, before: str, after: str) -> bool:
    # Prefix and suffix are checked apart, as gin-contrib/cors does: they may overlap.
    return origin.startswith(before) and origin.endswith(after)


def is_cross_origin(origin: str | None, host: str) -> bool:
    """A CORS request, as gin-contrib/cors tells one: an Origin that is not the page's own
    (a same-origin ``fetch`` sends one too, naming the Host it calls)."""
    return bool(origin) and origin not in (f"http://{host}", f"https://{host}")


def preflight_headers(policy: Policy, origin: str) -> dict[str, str]:
    """The proxy's answer to an allowed origin's OPTIONS (status 204)."""
    headers = {
        "Access-Control-Allow-Methods": ALLOWED_METHODS,
        "Access-Control-Allow-Headers": ",".join(
            canonical_header(h) for h in _normalized(ALLOWED_HEADERS)
        ),
        "Access-Control-Max-Age": MAX_AGE,
    }
    if not policy.allow_all:
        headers["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    return headers | _allow_origin(policy, origin)


def answer_headers(policy: Policy, origin: str) -> dict[str, str]:
    """The CORS headers of any other answer to an allowed origin."""
    headers = {"Access-Control-Expose-Headers": EXPOSED_HEADERS}
    if not policy.allow_all:
        headers["Vary"] = "Origin"
    return headers | _allow_origin(policy, origin)


def _allow_origin(policy: Policy, origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": "*" if policy.allow_all else origin}


def is_cors_header(name: str) -> bool:
    """A node's own CORS header: the proxy's replace it, so no answer carries two."""
    return name.lower().startswith("access-control-")


def merged_vary(existing: str | None, wanted: str) -> str:
    """``Vary`` with ``wanted``'s fields added to those the answer has (the node's own
    ``Vary: Origin`` is not written twice)."""
    fields = [f.strip() for f in (existing or "").split(",") if f.strip()]
    have = {f.lower() for f in fields}
    fields += [f.strip() for f in wanted.split(",") if f.strip().lower() not in have]
    return ", ".join(fields)


def listens_on_loopback(listen_host: str) -> bool:
    """The proxy is reachable from this machine only: Ollama then guards ``Host``."""
    if listen_host.lower() in _LOCAL_NAMES or listen_host.lower().endswith(".localhost"):
        return True
    address = _address(listen_host)
    return address is not None and address.is_loopback


def host_allowed(host: str, hostname: str, is_local_ip: Callable[[IPAddress], bool]) -> bool:
    """Ollama's allowedHostsMiddleware, for a proxy on loopback: the ``Host`` a request names
    must be an IP address that is loopback, private, unspecified or this machine's, or
    ``localhost``, this machine's name, or a name under .localhost, .local or .internal.
    A web page that rebinds its own name to 127.0.0.1 names its own host, and is refused."""
    name = _host_name(host).lower()
    address = _address(name)
    if address is not None:
        return _local_address(address) or is_local_ip(address)
    if name in ("", *_LOCAL_NAMES) or name == hostname.lower():
        return True
    return name.endswith(_LOCAL_SUFFIXES)


def _local_address(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # Go's netip unmaps before these tests
    private = any(address in net for net in _PRIVATE_NETS if net.version == address.version)
    return address.is_loopback or address.is_unspecified or private


def _host_name(host: str) -> str:
    """``Host`` without its port; an IPv6 literal without its brackets."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, _ = host.rpartition(":")  # Go's net.SplitHostPort: any port, one colon
    return name if colon and ":" not in name else host


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


__all__ = [
    "DEFAULT_ORIGINS",
    "Policy",
    "answer_headers",
    "host_allowed",
    "is_cors_header",
    "is_cross_origin",
    "listens_on_loopback",
    "merged_vary",
    "origin_problem",
    "preflight_headers",
]
