"""The package layout is a contract: `common/` sub-packages import only the ones below them, no module import
cycles, and the front ends are thin scripts over the installed `common` (no sys.path edits, no imports of each
other)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# lowest first: a sub-package may import itself and the ones before it, never one after it
LAYERS = ["quant", "solver", "models", "data", "eval", "io", "pipeline", "api", "cli", "runs"]
FRONT_ENDS = ["fake_quant", "vit_quant", "spinquant"]


def _imports(path: Path) -> list[str]:
    """Every `common...` module a file imports (module level or inside functions), as dotted names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            if base == "common" or base.startswith("common."):
                out += [f"{base}.{a.name}" for a in node.names]
            elif base.split(".")[0] in FRONT_ENDS:
                out.append(base)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
    return out


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (ROOT / "common").rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = p
    return mods


def test_common_is_sub_packages_only():
    loose = [p.name for p in (ROOT / "common").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules directly under common/: {loose}"
    subs = {p.name for p in (ROOT / "common").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subs == set(LAYERS)


def test_no_upward_imports_and_no_cycles():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        layer = name.split(".")[1] if name.count(".") else None
        deps = set()
        for imp in _imports(path):
            target = next((m for m in (imp, imp.rsplit(".", 1)[0]) if m in mods), None)
            if target is None or target == name:
                continue
            deps.add(target)
            if layer is not None and target.count("."):
                assert LAYERS.index(target.split(".")[1]) <= LAYERS.index(layer), f"{name} imports {target} (upward)"
        graph[name] = deps - {n for n in deps if n.count(".") < 2}  # package __init__s re-export, not cycles

    done, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in done:
            return
        stack.append(n)
        for d in graph.get(n, ()):
            visit(d)
        stack.pop()
        done.add(n)

    for n in graph:
        visit(n)


def test_front_ends_import_only_the_installed_package():
    for fe in FRONT_ENDS:
        for p in (ROOT / fe).glob("*.py"):
            src = p.read_text()
            assert "sys.path" not in src, f"{p.relative_to(ROOT)} edits sys.path"
            others = [i for i in _imports(p) if i.split(".")[0] in FRONT_ENDS]
            assert not others, f"{p.relative_to(ROOT)} imports front-end modules {others}"
