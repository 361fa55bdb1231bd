"""The code's shape, checked: functions that read in one screen, no import cycles, values written once.

These scan the source with :mod:`ast` (nothing is imported or run), so they hold for every module, including
the ones no other test imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mimbench", "pretrain")
MAX_FUNCTION_LINES = 80


def _sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "configs" in path.relative_to(ROOT).parts:
                continue
            yield path, ast.parse(path.read_text(), filename=str(path))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Project modules imported anywhere in ``tree`` (inside functions too)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def test_no_function_is_longer_than_one_screen():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _sources() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_no_two_modules_import_each_other():
    trees = {_module_name(path): (path, tree) for path, tree in _sources()}
    graph = {}
    for name, (path, tree) in trees.items():
        targets = _imports(tree, name, path.name == "__init__.py")
        # "from pkg import mod" names a module; "from mod import func" names the module itself
        graph[name] = {t for t in targets if t in trees and t != name} | \
                      {t.rpartition(".")[0] for t in targets if t not in trees and t.rpartition(".")[0] in trees
                       and t.rpartition(".")[0] != name}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert not pairs, "modules that import each other: " + ", ".join(f"{a} <-> {b}" for a, b in pairs)


def _literal_get_fallbacks(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and isinstance(node.args[1], (ast.Constant, ast.Tuple, ast.List, ast.UnaryOp))):
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno} .get({node.args[0].value!r}, ...)")
    return bad


@pytest.mark.parametrize("where", [
    "mimbench/evals", "mimbench/bench.py", "pretrain/main.py"])
def test_config_values_have_no_literal_fallbacks(where):
    target = ROOT / where
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    bad = [line for f in files for line in _literal_get_fallbacks(f)]
    assert not bad, "config keys read with a literal fallback (the schema default is the one place): " + "; ".join(bad)


#: The layers of docs/architecture.md, bottom (foundations) to top (the CLI): a module may import from its own
#: layer and the layers below it. A module belongs to the layer of its longest matching prefix.
LAYERS = (
    ("foundations", ("mimbench.errors", "mimbench.atomic", "mimbench.env", "mimbench.paths", "mimbench.config",
                     "mimbench.schema", "mimbench.rng", "mimbench.dist", "mimbench.batching", "mimbench.fastpath",
                     "mimbench.trackers")),
    ("data", ("mimbench.data",)),
    ("encoders", ("mimbench.encoders", "mimbench.testing")),
    ("training loop", ("mimbench.engine",)),
    ("records", ("mimbench.results.records", "mimbench.evals.metrics")),
    ("pre-training", ("pretrain",)),
    ("evaluations", ("mimbench.evals", "mimbench.seg", "mimbench.analysis")),
    ("results", ("mimbench.results",)),
    ("pipelines", ("mimbench.steps", "mimbench.control", "mimbench.demo", "mimbench.reproduce", "mimbench.jobs",
                   "mimbench.bench", "mimbench.partial_ft")),
    ("cli", ("mimbench.cli", "mimbench")),
)


def _layer(module: str) -> int:
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of docs/architecture.md"
    return max(matches)[1]


def test_modules_import_only_from_their_layer_or_below():
    trees = {_module_name(path): (path, tree) for path, tree in _sources()}
    upward = []
    for name, (path, tree) in trees.items():
        for target in _imports(tree, name, path.name == "__init__.py"):
            while target not in trees and "." in target:
                target = target.rpartition(".")[0]
            # ``from mimbench import dist`` names the package too; a module reading its own package's attributes
            # (``from mimbench import __version__``) is not a layer edge either
            if target not in trees or target == name or name.startswith(target + ".") or target in PACKAGES:
                continue
            if _layer(target) > _layer(name):
                upward.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not upward, "imports from a higher layer: " + "; ".join(sorted(set(upward)))
