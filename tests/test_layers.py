"""Imports flow one way (DESIGN §1): core ← engine ← executors ← server, command line, sinks.

Read from the source with `ast` (nothing is imported), so a lazy import inside a function
counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cryomamba"
CLI = ("cli", "cli_copick", "cli_data", "cli_segment", "cli_server", "cli_threshold", "cli_ui")
ABOVE_CORE = ("engine", "executors", "server", "serve", "batch", "cohort", *CLI)

# layer (a top-level module or package of cryomamba) -> what it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("volume", "config", "events", "errors", "job"), ABOVE_CORE),
    "engine": ("executors", "server", "serve", "sinks", "batch", "cohort", *CLI, "napari"),
    "executors": ("server", "serve", "batch", "cohort", *CLI, "napari"),
    "server": (*CLI, "napari", "sinks.napari"),
}


def _module(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, src: Path = SRC) -> set[str]:
    """Every module `path` imports, relative imports resolved (``a.b`` also yields ``a``)."""
    module = _module(path, src)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {p for name in found for p in _prefixes(name)}


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _layer_files(layer: str) -> list[Path]:
    folder = PACKAGE / layer
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{layer}.py"]


def _target(name: str) -> str:
    """'napari.layers' stays itself; 'cryomamba.server.app' becomes 'server.app'."""
    return name.removeprefix("cryomamba.") if name.startswith("cryomamba.") else name


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    files = _layer_files(layer)
    assert files and all(f.is_file() for f in files), f"no source for {layer}"
    wrong = sorted(
        f"{f.relative_to(SRC)} imports {name}"
        for f in files
        for name in imports(f)
        if _target(name) in FORBIDDEN[layer]
    )
    assert not wrong, "imports against DESIGN §1:\n" + "\n".join(wrong)


def test_only_the_command_line_imports_its_modules():
    cli = {f"cryomamba.{m}" for m in CLI}
    users = {
        _module(f)
        for f in PACKAGE.rglob("*.py")
        if "bundled_models" not in f.parts and imports(f) & cli
    }
    assert users <= cli | {"cryomamba.batch", "cryomamba.__main__"}, sorted(users - cli)


def test_the_scan_sees_a_lazy_relative_import(tmp_path):
    """A `from ..server import app` inside a function is found, resolved to its module."""
    fake = tmp_path / "cryomamba" / "engine"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from ..server import app\n    from . import x\n")
    found = imports(fake / "bad.py", src=tmp_path)
    assert {"cryomamba.server", "cryomamba.server.app", "cryomamba.engine.x"} <= found
    assert _target("cryomamba.server.app") == "server.app" and "server" in FORBIDDEN["engine"]
