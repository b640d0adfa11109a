"""The seams hold: the module import graph has no cycle; `pruning` needs only torch and the
standard library; `sinks` takes from `stream` only the vocabulary and the camera protocol and
never imports torch; only the CLI (the top of the dependency order) imports `sinks`."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stream", "sinks", "pruning")
SINKS_MAY_USE = {"stream.events", "stream.errors", "stream.bus", "stream.camera_api", "stream.door", "stream.watches",
                 "stream.validation", "stream.mqtt_settings", "stream.http_settings"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `name` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {i for i in imports(name, path) if i in mods} for name, path in mods.items()}


def test_no_import_cycle_between_modules():
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in g[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in g:
        if node not in state:
            visit(node, [node])


def test_pruning_imports_only_torch_and_the_standard_library():
    mods = modules()
    for name, path in mods.items():
        if not name.startswith("pruning"):
            continue
        for imported in imports(name, path):
            top = imported.split(".")[0]
            assert top in ("torch", "pruning", "__future__") or top in sys.stdlib_module_names, (name, imported)


def test_sinks_use_only_the_vocabulary_of_stream_and_only_the_cli_imports_sinks():
    for name, deps in graph().items():
        if name.startswith("sinks"):
            used = {d for d in deps if d.startswith("stream")} - {"stream"}
            assert used <= SINKS_MAY_USE, (name, used - SINKS_MAY_USE)
        elif not name.startswith("sinks") and any(d.startswith("sinks") for d in deps):
            assert name == "stream.cli", f"{name} imports sinks: only the CLI may"


def test_importing_every_sink_does_not_import_torch():
    code = ("import sys, importlib, pkgutil, sinks\n"
            "for m in pkgutil.walk_packages(sinks.__path__, 'sinks.'): importlib.import_module(m.name)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
