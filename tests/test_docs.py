"""docs/: every config key documented, every snippet valid, every name real, every link live.

The key list comes from the config parser itself, metric names from a live scrape, admin paths
from the app's router and flags from the command line's --help, so a change in the code that
the pages do not follow fails here.
"""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from proxy import config as config_module
from proxy.config import parse_config

from .conftest import StartNodes, StartProxy
from .test_deploy import (
    METRIC_NAME,
    ROOT,
    alert_rules,
    check_config_text,
    check_promql,
    exported_names,
    scrape_after_traffic,
)

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CONFIGURATION = DOCS / "configuration.md"
# A YAML block preceded by one of these comments is not a whole config of the proxy:
NOT_A_CONFIG = "<!-- not-a-config"  # another program's (Kubernetes, Prometheus): parsed only
FRAGMENT = "<!-- config-fragment"  # one section of the proxy's: checked with stand-in nodes
STAND_IN_NODES = [
    {"url": f"http://10.0.0.{i + 5}:11434", "name": name}
    for i, name in enumerate(["gpu-a", "gpu-b", "gpu-c"])
]
MINIMAL = {"nodes": [{"url": "http://127.0.0.1:11434"}]}
ONE_KEY = {"name": "k", "key_sha256": "0" * 64}  # so the parser reads a key's fields too
WITH_KEY = {**MINIMAL, "auth": {"keys": [ONE_KEY]}}
DOCS_HOST = "http://ollama-proxy:11434"


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str
    marker: str  # the HTML comment on the line before the fence, if any

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        before = lines[i - 1].strip() if i > 0 else ""
        marker = before if before.startswith("<!--") else ""
        blocks.append(Block(path, i + 1, fence[1], "\n".join(lines[i + 1 : end]) + "\n", marker))
        i = end + 1
    return blocks


def blocks_in(pages: list[Path], *langs: str) -> list[Block]:
    return [b for page in pages for b in code_blocks(page) if b.lang in langs]


# -- configuration.md ------------------------------------------------------------------------


def parser_keys() -> set[str]:
    """Every key the parser accepts, in the dotted form the page uses (``nodes[].url``).

    Read from the parser at work: each section reader declares its keys to
    ``_Reader.no_unknown_keys`` (that is how unknown keys become errors), so parsing a minimal
    config with a spy on it lists them all, new ones included.
    """
    declared: list[tuple[str, set[str]]] = []
    original = config_module._Reader.no_unknown_keys

    def spy(reader: Any, raw: dict[str, Any], path: str, known: set[str]) -> None:
        declared.append((path, set(known)))
        original(reader, raw, path, known)

    with mock.patch.object(config_module._Reader, "no_unknown_keys", spy):
        parse_config(WITH_KEY)
    paths = {path for path, _ in declared}
    assert "" in paths and "nodes[0]" in paths, f"the spy saw only {paths}: has the parser changed?"
    keys = set()
    for path, known in declared:
        prefix = re.sub(r"\[\d+\]", "[]", path)
        keys.update(f"{prefix}.{key}" if prefix else key for key in known)
    return keys


def key_rows() -> dict[str, list[str]]:
    """Key → the cells of its row, from the tables of configuration.md."""
    rows = {}
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = re.fullmatch(r"`([a-z0-9_\[\].]+)`", cells[0])
        if line.startswith("|") and key:
            rows[key[1]] = cells
    return rows


def test_configuration_md_documents_every_key_the_parser_knows() -> None:
    keys = parser_keys()
    rows = key_rows()
    assert sorted(keys - set(rows)) == [], "keys the parser knows and the page has no row for"
    assert sorted(set(rows) - keys) == [], "rows for keys the parser does not know"
    for key, cells in rows.items():
        assert len(cells) == 4 and all(cells[1:2] + cells[3:]), f"{key}: type and meaning"


def with_key(key: str, value: object) -> dict[str, Any]:
    data: dict[str, Any] = {"nodes": [dict(MINIMAL["nodes"][0])]}
    if key.startswith("nodes[]."):
        data["nodes"][0][key.removeprefix("nodes[].")] = value
    elif key.startswith("auth.keys[]."):
        data["auth"] = {"keys": [{**ONE_KEY, key.removeprefix("auth.keys[]."): value}]}
    elif "." in key:
        section, name = key.split(".", 1)
        data[section] = {name: value}
    else:
        data[key] = value
    return data


def test_documented_defaults_are_the_parsers() -> None:
    """Setting a key to the default the page states changes nothing."""
    checked = []
    for key, cells in key_rows().items():
        literal = re.fullmatch(r"`([^`]*)`", cells[2])
        if literal is None:
            continue  # required, computed ("the host:port of url") or a section
        value = yaml.safe_load(literal[1])
        base = WITH_KEY if key.startswith("auth.keys[].") else MINIMAL
        assert parse_config(with_key(key, value)) == parse_config(base), f"{key} = {value!r}"
        checked.append(key)
    assert len(checked) >= 20


def test_shipped_config_passes_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", "config.yaml", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


YAML_BLOCKS = blocks_in([*PAGES, ROOT / "README.md"], "yaml", "yml")


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=[b.id for b in YAML_BLOCKS])
def test_yaml_snippet_passes_check(block: Block, tmp_path: Path) -> None:
    data = yaml.safe_load(block.text)
    if block.marker.startswith(NOT_A_CONFIG):
        return
    if block.marker.startswith(FRAGMENT):
        assert isinstance(data, dict)
        data.setdefault("nodes", STAND_IN_NODES)
        check_config_text(yaml.safe_dump(data), tmp_path)
    else:
        check_config_text(block.text, tmp_path)


def test_docs_yaml_snippets_exist() -> None:
    fragments = [b for b in YAML_BLOCKS if b.marker.startswith(FRAGMENT)]
    assert len(fragments) >= 10
    assert [b for b in YAML_BLOCKS if not b.marker and b.path == CONFIGURATION]


# -- metrics ---------------------------------------------------------------------------------


async def test_docs_name_only_metrics_the_proxy_exports(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    scrape = await scrape_after_traffic(start_nodes, start_proxy)
    exported = exported_names(scrape)
    unknown = {
        page.name: sorted(set(METRIC_NAME.findall(page.read_text())) - exported) for page in PAGES
    }
    assert {page: names for page, names in unknown.items() if names} == {}
    families = set(re.findall(r"^# TYPE (\S+) ", scrape, re.MULTILINE))
    table_rows = set(re.findall(r"^\| `(ollama_proxy_\w+)` \|", read("metrics.md"), re.MULTILINE))
    assert sorted(families - table_rows) == [], "exported but without a row in metrics.md"


def test_promql_in_docs_is_valid(tmp_path: Path) -> None:
    expressions = [b.text for b in blocks_in(PAGES, "promql")]
    assert len(expressions) >= 15
    check_promql(expressions, tmp_path)


# -- links and coverage ----------------------------------------------------------------------


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "").lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists() or (path.suffix == ".md" and anchor and anchor not in anchors(path)):
            broken.append(target)
    assert broken == []


def test_architecture_maps_every_module() -> None:
    text = read("architecture.md")
    modules = [p.name for p in (ROOT / "proxy").glob("*.py") if p.name != "__init__.py"]
    packages = [f"{p.name}/" for p in (ROOT / "proxy").iterdir() if (p / "__init__.py").exists()]
    assert [m for m in modules + packages if f"`{m}`" not in text] == []


async def test_operations_lists_every_admin_path(
    start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(await start_nodes(1))
    text = read("operations.md")
    paths = {
        f"{route.method} {route.resource.canonical}"
        for route in proxy.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith(("/-/", "/metrics"))
        and "{tail" not in route.resource.canonical
        and route.method not in ("HEAD", "*")  # "*": the 405 for other methods
    }
    assert len(paths) >= 7
    assert sorted(p for p in paths if f"`{p}`" not in text) == []


def test_docs_mention_every_command_line_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    options = set(re.findall(r"(--[a-z][a-z-]+)", result.stdout)) - {"--help"}
    text = read("configuration.md") + read("operations.md")
    assert len(options) >= 5
    assert sorted(o for o in options if f"`{o}" not in text) == []


def test_operations_explains_every_alert() -> None:
    text = read("operations.md")
    assert [r["alert"] for r in alert_rules() if f"`{r['alert']}`" not in text] == []


def test_clients_md_gives_each_clients_setting() -> None:
    text = read("clients.md")
    for setting in (
        f"OLLAMA_BASE_URL={DOCS_HOST}",
        f"OLLAMA_HOST={DOCS_HOST}",
        f'Client(host="{DOCS_HOST}")',
        f"new Ollama({{ host: '{DOCS_HOST}' }})",
        f'OpenAI(base_url="{DOCS_HOST}/v1"',
        f'ChatOllama(model="llama3.2", base_url="{DOCS_HOST}")',
        f"curl -N {DOCS_HOST}/api/generate",
    ):
        assert setting in text


PYTHON_BLOCKS = blocks_in(PAGES, "python")
RUNNABLE = {"ollama", "openai", "asyncio"}  # installed with the tests; langchain is not


def imported(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
async def test_python_snippet_runs_against_a_live_proxy(
    block: Block, start_nodes: StartNodes, start_proxy: StartProxy
) -> None:
    tree = ast.parse(block.text, filename=block.id)
    if not imported(tree) <= RUNNABLE:
        return  # compiled only: its library is not among the test dependencies
    proxy = await start_proxy(await start_nodes(2, tokens=5, token_interval=0.001))
    code = compile(block.text.replace(DOCS_HOST, proxy.url), block.id, "exec")
    namespace: dict[str, Any] = {"__name__": "__main__"}
    # The examples are synchronous clients (or run their own event loop): off this loop.
    await asyncio.wait_for(asyncio.to_thread(exec, code, namespace), 20)
    for value in namespace.values():  # the clients the example left open
        if type(value).__module__.startswith(("ollama", "openai")) and hasattr(value, "close"):
            value.close()
