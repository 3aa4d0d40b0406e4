"""Imports flow one way (ARCHITECTURE.md, "What each room may import"): every import between ke_fast's modules,
function bodies included, read with ast, must be an allowed arrow; kernels/ imports nothing of ke_fast outside
itself; the module graph has no circle.

Not counted as imports: a module-level ``__getattr__`` (PEP 562), the hook that keeps old names readable for one
release and resolves them at attribute access from the module that now holds them (``ops.sparse_conv2d``,
``ops.ReinitPlan``, ``metric.TASKS``); those modules import the one with the hook, not the other way."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ke_fast"
KERNELS = ROOT / "kernels"

# module -> the ke_fast modules it may import (``kernels`` is the kernels/ package, ``__init__`` imports freely).
# Every module may import ``kernels``. Read top to bottom: a module only imports modules listed below it.
ALLOWED = {
    "__main__": {"cli"},
    "cli": {"runner", "study", "evolve", "config", "tasks", "rundir", "processes", "models", "data", "synth",
            "metric", "variants", "recipes", "step"},
    "runner": {"recipes", "study", "evolve", "config", "tasks", "rundir", "processes", "models", "data"},
    "recipes": set(),
    "study": {"evolve", "config", "tasks", "rundir", "processes", "models", "data", "step"},
    "evolve": {"config", "tasks", "rundir", "processes", "convert", "masks", "variants", "batches", "data", "metric",
               "nn", "state", "step", "models", "graph", "extract"},
    "step": {"config", "tasks", "batches", "convert", "nn"},
    "processes": {"config"},
    "tasks": {"metric", "data", "batches", "convert", "models", "imageset"},
    "rundir": {"config", "tasks", "plots"},
    "plots": set(),
    "config": {"tasks", "models", "variants", "masks", "recipes"},
    "metric": {"data", "batches"},
    "variants": {"convert", "masks", "graph", "state", "nn", "ops", "reset"},
    "extract": {"convert", "masks", "nn", "graph", "dispatch", "ops", "state"},
    "convert": {"nn", "masks", "state", "graph", "ops", "reset"},
    "nn": {"masks", "state", "ops"},
    "masks": {"state", "ops"},
    "state": {"ops", "reset"},
    "reset": {"ops"},
    "dispatch": {"ops"},
    "ops": set(),
    "graph": set(),
    "models": {"architectures"},
    "architectures": set(),
    "batches": {"data", "imageset"},
    "data": {"imageset"},
    "imageset": set(),
    "synth": set(),
}


def _imports(path: Path, package: str) -> set[str]:
    """Top-level names of ``package`` that ``path`` imports anywhere (module level and function bodies)."""
    found = set()
    tree = ast.parse(path.read_text())
    hooks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    skip = {id(n) for h in hooks for n in ast.walk(h)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == package and len(parts) > 1:
                    found.add(parts[1])
                elif parts[0] == package:
                    found.add("__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != package:
                    continue
                base = parts[1:]
            elif node.level > 1:  # above the package
                base = [".."]
            else:
                base = (node.module or "").split(".") if node.module else []
            if base == [".."]:
                found.add("..")
            elif base and base[0]:
                found.add(base[0])
            else:  # from . import a, b
                found.update(a.name for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p, "ke_fast") - {p.stem} for p in sorted(PKG.glob("*.py")) if p.stem != "__init__"}


def test_every_module_has_a_rule():
    assert set(_graph()) <= set(ALLOWED), sorted(set(_graph()) - set(ALLOWED))


def test_imports_follow_the_allowed_arrows():
    bad = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets
           if t != "kernels" and t not in ALLOWED.get(m, set())]
    assert not bad, "imports against the one-way rule (ARCHITECTURE.md): " + ", ".join(bad)


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of ``graph`` (module -> the modules it imports) as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        if state.get(m) == 1:
            return path[path.index(m):] + [m]
        if state.get(m) == 2:
            return None
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if (found := visit(t, path + [m])) is not None:
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if (found := visit(m, [])) is not None:
            return found
    return None


def test_no_import_circle():
    circle = _circle({m: {t for t in ts if t in ALLOWED} for m, ts in _graph().items()})
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_allowed_arrows_themselves_have_no_circle():
    circle = _circle(ALLOWED)
    assert circle is None, "circle in ALLOWED: " + " -> ".join(circle)


def test_circle_finder_finds_one():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


def test_kernels_import_nothing_of_ke_fast():
    bad = []
    for path in sorted(KERNELS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 1:  # from .. import x: the package above kernels/ is ke_fast
                    names = ["ke_fast (relative)"]
                elif node.level == 0:
                    names = [node.module or ""]
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names
                    if n.startswith("ke_fast") and not n.startswith("ke_fast.kernels")]
    assert not bad, bad


def test_the_reader_sees_function_body_imports(tmp_path):
    # the parser must count an import inside a function, or a lazy import could hide a circle
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from .nn import MaskedLinear\n    from . import ops\n    import ke_fast.graph\n")
    assert _imports(src, "ke_fast") == {"nn", "ops", "graph"}
    src.write_text("def __getattr__(name):\n    from .tasks import TASKS\n    return TASKS\n")
    assert _imports(src, "ke_fast") == set()  # the alias hook alone is not an import
