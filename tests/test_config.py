"""config.yaml → Config: defaults, and one dotted-path line per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def errors_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.errors


def test_minimal_file_gets_defaults() -> None:
    config = parse_config({"nodes": [{"url": "http://10.0.0.5:11434/"}]})
    node = config.nodes[0]
    assert (node.url, node.name, node.max_concurrency) == (
        "http://10.0.0.5:11434",
        "10.0.0.5:11434",
        1,
    )
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 11434)
    assert config.queue.max_size == 512 and config.queue.timeout == 300
    assert config.health_check.interval == 5
    assert config.max_body_size == 64 * 1024 * 1024


def test_shipped_config_is_valid() -> None:
    config = load_config(ROOT / "config.yaml")
    assert [n.name for n in config.nodes] == ["gpu-a", "gpu-b"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"nodes": [{"url": "ftp://x"}]}, "nodes[0].url: must start with http:// or https://"),
        (
            {"nodes": [{"url": "http://a:1"}, {"url": "10.0.0.5:11434"}]},
            "nodes[1].url: must start with http:// or https://",
        ),
        ({"nodes": [{"name": "x"}]}, "nodes[0].url: is required"),
        ({"nodes": [{"url": "http://[::1:11434"}]}, "nodes[0].url: is not a valid URL"),
        (
            {"nodes": [{"url": "http://a:1", "max_concurrency": 0}]},
            "nodes[0].max_concurrency: must be at least 1",
        ),
        (
            {"nodes": [{"url": "http://a:1", "max_concurrency": "4"}]},
            "nodes[0].max_concurrency: must be an integer",
        ),
        ({"nodes": []}, "nodes: must be a list of at least one node, each with a url"),
        ({}, "nodes: is required: a list of nodes, each with a url"),
        (
            {"listen": "localhost", "nodes": [{"url": "http://a:1"}]},
            'listen: must be "host:port" with a port from 0 to 65535',
        ),
        (
            {"nodes": [{"url": "http://a:1"}], "queue": {"timeout": "soon"}},
            "queue.timeout: must be a number",
        ),
        (
            {"nodes": [{"url": "http://a:1"}], "max_body_size": "lots"},
            'max_body_size: must be a positive number of bytes, such as 67108864 or "64MiB"',
        ),
        ([1, 2], "(top level): must be a mapping of keys to values"),
    ],
)
def test_each_error_names_its_dotted_path(data: object, expected: str) -> None:
    assert expected in errors_of(data)


def test_all_errors_reported_at_once() -> None:
    errors = errors_of(
        {
            "nodes": [{"url": "ftp://x"}, {"url": "http://a:1", "speed": 3}],
            "health_check": {"rise": 0},
        }
    )
    assert errors == [
        "nodes[0].url: must start with http:// or https://",
        "nodes[1].speed: unknown key"
        " (known: headers, max_concurrency, max_loaded_models, model_concurrency, name, url,"
        " weight)",
        "health_check.rise: must be at least 1",
    ]


def test_duplicate_names_rejected() -> None:
    errors = errors_of(
        {"nodes": [{"url": "http://a:1", "name": "x"}, {"url": "http://b:1", "name": "x"}]}
    )
    assert errors == ["nodes[1].name: 'x' is already used by nodes[0]"]


def test_sizes_with_units() -> None:
    config = parse_config({"nodes": [{"url": "http://a:1"}], "max_body_size": "100MiB"})
    assert config.max_body_size == 100 * 1024 * 1024


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_flag_exit_codes(tmp_path: Path) -> None:
    assert run_check(ROOT / "config.yaml").returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text('nodes:\n  - url: "http://a:1"\n  - url: "gpu-b:11434"\n')
    result = run_check(bad)
    assert result.returncode == 2
    assert result.stderr.strip() == f"{bad}: nodes[1].url: must start with http:// or https://"


def test_unparsable_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [\n")
    result = run_check(bad)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not valid YAML" in result.stderr
