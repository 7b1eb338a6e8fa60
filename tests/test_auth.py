"""Tenants as plain objects: the auth section of the config, the key policy, the windows and
``ollama-proxy key new``. What the running proxy does with them is in test_tenants.py."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import keys_cli
from proxy.__main__ import main as cli_main
from proxy.auth import Auth, KeyRefused, is_loopback, model_allowed, startup_notice
from proxy.config import ConfigError, load_config, parse_config
from proxy.errors import RateLimited
from proxy.quota import Quotas, Window, duration

NODES = [{"url": "http://127.0.0.1:11434"}]


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "key_sha256": digest(f"secret-{name}"), **extra}


def config_with(auth: dict[str, Any] | None = None, **top: Any) -> Any:
    return parse_config({"nodes": NODES, **({"auth": auth} if auth is not None else {}), **top})


def errors_of(data: dict[str, Any], base: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"nodes": NODES, **data}, base)
    return caught.value.errors


# -- config ----------------------------------------------------------------------------------


def test_keys_parse_with_defaults_and_normalised_models() -> None:
    config = config_with({"keys": [key("alice", models=["llama3.2", "qwen*"]), key("bob")]})
    alice, bob = config.auth.keys
    assert alice.models == ("llama3.2:latest", "qwen*")
    assert bob.models == ("*",) and bob.weight == 1.0 and not bob.manage and not bob.admin
    assert bob.requests_per_minute is None and bob.max_concurrency is None
    assert "key_sha256" not in repr(alice)  # a digest in a log line helps a guesser


def test_key_errors_name_their_dotted_path() -> None:
    bad = [
        {"name": "", "key_sha256": "abc"},
        key("x", models=[], max_concurrency=0, requests_per_minute="many", colour="red"),
        key("x"),
    ]
    errors = errors_of({"auth": {"keys": bad}})
    assert "auth.keys[0].name: is required and must not be empty" in errors
    assert any(e.startswith("auth.keys[0].key_sha256: must be the SHA-256") for e in errors)
    assert any(e.startswith("auth.keys[1].models: must be a list") for e in errors)
    assert "auth.keys[1].max_concurrency: must be at least 1" in errors
    assert "auth.keys[1].requests_per_minute: must be an integer" in errors
    assert any(e.startswith("auth.keys[1].colour: unknown key") for e in errors)
    assert "auth.keys[2].name: 'x' is already used by auth.keys[1]" in errors
    assert any(e.startswith("auth.keys[2].key_sha256: is the same as") for e in errors)


def test_open_with_keys_is_an_error() -> None:
    errors = errors_of({"auth": {"open": True, "keys": [key("a")]}})
    assert [e for e in errors if e.startswith("auth.open:")]


def test_keys_file_is_read_relative_to_the_config_and_joins_inline_keys(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [key("bob")]}))
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"nodes": NODES, "auth": {"keys_file": "keys.yaml", "keys": [key("a")]}})
    )
    config = load_config(tmp_path / "config.yaml")
    assert [k.name for k in config.auth.keys] == ["a", "bob"]
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump([key("a")]))  # a bare list does too
    errors = errors_of({"auth": {"keys_file": "keys.yaml", "keys": [key("a")]}}, tmp_path)
    assert "auth.keys_file.keys[0].name: 'a' is already used by auth.keys[0]" in errors


def test_a_missing_or_broken_keys_file_is_a_config_error(tmp_path: Path) -> None:
    errors = errors_of({"auth": {"keys_file": "nope.yaml"}}, tmp_path)
    assert len(errors) == 1 and errors[0].startswith("auth.keys_file: cannot read")
    (tmp_path / "keys.yaml").write_text("keys: [")
    errors = errors_of({"auth": {"keys_file": "keys.yaml"}}, tmp_path)
    assert len(errors) == 1 and "is not valid YAML" in errors[0]


# -- the policy ------------------------------------------------------------------------------


def keys_auth(**top: Any) -> Auth:
    keys = [
        key("alice", models=["llama3.2*"]),
        key("ops", manage=True),
        key("root", admin=True),
    ]
    return Auth(config_with({"keys": keys}, **top))


def refusal(call: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(KeyRefused) as caught:
        call(*args)
    return caught.value.status, caught.value.reason


def test_a_key_is_found_by_bearer_or_x_api_key() -> None:
    auth = keys_auth()
    bearer = {"Authorization": "bearer secret-alice"}
    assert auth.identify("POST", bearer).name == "alice"
    assert auth.identify("POST", {"x-api-key": "secret-ops"}).name == "ops"
    assert refusal(auth.identify, "POST", {}) == (401, "unauthorized")
    assert refusal(auth.identify, "POST", {"Authorization": "Bearer wrong"}) == (
        401,
        "unauthorized",
    )
    assert refusal(auth.identify, "POST", {"Authorization": "Basic secret-alice"}) == (
        401,
        "unauthorized",
    )
    assert auth.identify("OPTIONS", {}) is None  # a CORS preflight carries no credentials


def test_models_by_glob_and_management_by_manage() -> None:
    auth = keys_auth()
    alice = auth.identify("POST", {"Authorization": "Bearer secret-alice"})
    assert alice is not None
    assert model_allowed(alice.config, "llama3.2:latest")
    assert model_allowed(alice.config, "LLAMA3.2:1b")  # Ollama's names ignore case
    assert refusal(auth.check_model, alice, "qwen2:latest") == (403, "forbidden")
    ops = auth.identify("POST", {"x-api-key": "secret-ops"})
    for path in ("/api/pull", "/api/push", "/api/delete", "/api/blobs/sha256:00"):
        assert refusal(auth.check_path, alice, path, "127.0.0.1") == (403, "forbidden")
        auth.check_path(ops, path, "10.0.0.5")
    auth.check_path(alice, "/api/chat", "10.0.0.5")


def test_admin_paths_take_the_token_or_an_admin_key() -> None:
    auth = keys_auth(admin={"token": "tok"})
    auth.check_admin({"Authorization": "Bearer tok"}, "10.0.0.5")
    auth.check_admin({"Authorization": "Bearer secret-root"}, "10.0.0.5")
    assert refusal(auth.check_admin, {"Authorization": "Bearer secret-ops"}, "127.0.0.1") == (
        401,
        "unauthorized",
    )
    assert refusal(auth.check_admin, {}, "127.0.0.1") == (401, "unauthorized")


def test_protected_mode_answers_management_and_admin_on_loopback_only() -> None:
    auth = Auth(config_with())
    assert auth.mode == "protected"
    assert auth.identify("POST", {}) is None
    auth.check_path(None, "/api/chat", "10.0.0.5")  # inference stays open
    for local in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.8.9.1"):
        auth.check_path(None, "/api/pull", local)
        auth.check_admin({}, local)
    for remote in ("10.0.0.5", "::ffff:10.0.0.5", "", None, "fe80::1"):
        assert refusal(auth.check_path, None, "/api/delete", remote) == (403, "forbidden")
        assert refusal(auth.check_admin, {}, remote) == (403, "forbidden")


def test_open_mode_lets_everyone_manage() -> None:
    auth = Auth(config_with({"open": True}))
    assert auth.mode == "open" and auth.dropped_headers == frozenset()
    auth.check_path(None, "/api/pull", "10.0.0.5")
    auth.check_admin({}, "10.0.0.5")
    with_token = Auth(config_with(admin={"token": "tok"}))  # a token guards the admin paths
    assert with_token.mode == "open"
    assert refusal(with_token.check_admin, {}, "127.0.0.1") == (401, "unauthorized")


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.1.2.3") and not is_loopback("localhost") and not is_loopback(None)


def test_startup_notice_says_the_mode_and_warns_when_open_beyond_loopback() -> None:
    local = {"listen": "127.0.0.1:11434"}
    assert startup_notice(config_with(**local))[1].startswith("auth: protected mode")
    assert startup_notice(config_with({"keys": [key("a")]}))[1].startswith("auth: keys mode")
    level, line = startup_notice(config_with({"open": True}, **local))
    assert level == logging.INFO and line.startswith("auth: open mode")
    level, line = startup_notice(config_with({"open": True}, listen="0.0.0.0:11434"))
    assert level == logging.WARNING and "0.0.0.0:11434" in line


# -- windows ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_slides_bucket_by_bucket() -> None:
    window = Window(60, 1)
    window.add(1000.2, 1)
    window.add(1030.5, 2)
    assert window.used(1030.9) == 3
    assert window.wait(1031, limit=3) == pytest.approx(30)  # the first bucket leaves at 1061
    assert window.wait(1031, limit=4) == 0
    assert window.used(1061) == 2 and window.reset(1061) == pytest.approx(30)
    assert window.used(1091) == 0


def test_requests_per_minute_with_headers_and_retry_after() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    (alice,) = config_with({"keys": [key("alice", requests_per_minute=2)]}).auth.keys
    quotas.configure([alice])
    assert quotas.admit("alice")["X-RateLimit-Remaining-Requests"] == "1"
    clock.now += 10
    assert quotas.admit("alice")["X-RateLimit-Remaining-Requests"] == "0"
    with pytest.raises(RateLimited) as caught:
        quotas.admit("alice")
    assert caught.value.reason == "rate" and caught.value.retry_after == 51
    assert caught.value.headers["X-RateLimit-Limit-Requests"] == "2"
    assert caught.value.headers["X-RateLimit-Reset-Requests"] == "1m1s"
    clock.now += 51
    assert quotas.admit("alice")["X-RateLimit-Remaining-Requests"] == "0"


def test_tokens_are_charged_after_and_refuse_the_next_request() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    keys = [key("a", tokens_per_minute=100, tokens_per_day=150)]
    quotas.configure(config_with({"keys": keys}).auth.keys)
    assert quotas.admit("a")["X-RateLimit-Remaining-Tokens"] == "100"
    quotas.charge("a", 40, 80)  # past the minute's budget: the answer was never cut
    with pytest.raises(RateLimited) as caught:
        quotas.admit("a")
    assert caught.value.reason == "tokens" and caught.value.retry_after == 61
    clock.now += 61
    headers = quotas.admit("a")  # the day's window is the tighter one now
    assert headers["X-RateLimit-Limit-Tokens"] == "150"
    assert headers["X-RateLimit-Remaining-Tokens"] == "30"
    quotas.charge("a", 30, 0)
    with pytest.raises(RateLimited) as caught:
        quotas.admit("a")
    assert caught.value.retry_after > 86000


def test_windows_survive_reconfigure_for_keys_that_stay() -> None:
    quotas = Quotas(Clock())
    first = config_with({"keys": [key("a", requests_per_minute=1), key("b")]}).auth.keys
    quotas.configure(first)
    quotas.admit("a")
    quotas.answered("a", 200, None)
    second = config_with({"keys": [key("a", requests_per_minute=1)]}).auth.keys
    quotas.configure(second)
    with pytest.raises(RateLimited):
        quotas.admit("a")
    assert quotas.admit("b") == {}  # removed: nothing to count against
    (report,) = quotas.report()["keys"]
    assert report["name"] == "a" and report["requests"] == {"200": 1}
    assert report["windows"]["requests_per_minute"]["used"] == 1


def test_duration_as_openai_writes_it() -> None:
    assert [duration(s) for s in (0.02, 1, 59.5, 360, 3723)] == [
        "20ms",
        "1s",
        "1m0s",
        "6m0s",
        "1h2m3s",
    ]


# -- ollama-proxy key new --------------------------------------------------------------------


def test_key_new_prints_a_secret_and_an_entry_that_accepts_it(tmp_path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli_main(["key", "new", "team: a#1"])  # quoted in the entry: YAML reads it back
    text = out.getvalue()
    secret = text.splitlines()[0].rsplit(" ", 1)[1]
    assert secret.startswith(keys_cli.PREFIX) and len(secret) >= len(keys_cli.PREFIX) + 22
    entry = yaml.safe_load(text.split("\n\n", 1)[1])
    config = config_with({"keys": entry})
    assert config.auth.keys[0].name == "team: a#1"
    assert Auth(config).identify("POST", {"Authorization": f"Bearer {secret}"}) is not None
    assert keys_cli.new_secret() != keys_cli.new_secret()
