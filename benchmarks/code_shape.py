"""The figures of docs/ARCHITECTURE.md's before -> after table, measured from a source tree (not guessed).

    python benchmarks/code_shape.py [ROOT]     # ROOT holds lorascale/ (default: this checkout)

For an earlier commit: `git archive COMMIT lorascale | tar -x -C /tmp/before && python benchmarks/code_shape.py
/tmp/before`.  Figures:
  import cycles        strongly connected groups of lorascale modules importing each other (lazy imports count)
  upward imports       imports against tests/test_code_shape.LAYERS (0 once that test exists and passes)
  longest function     lines, and the function
  most parameters      count (self/cls not counted, *args counted, **kwargs not), and the function
  manifest guesses     reads of a manifest field with a fallback (`options.get(`, `.base.get(`, `entry.get(`,
                       `t.get("label"`, ...) outside store/manifest.py, where upgrade() owns the older layouts
  private imports      `from X import _name` of another module's private name inside lorascale/
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_code_shape import LAYERS, _cycles, _parameters  # noqa: E402 - one definition of each measure

GUESS = re.compile(r"\b(options|base|entry|manifest\.base|manifest\.options|t|execution)\.get\(")


def _modules(package: Path) -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = (path, ast.parse(path.read_text()))
    return found


def _graph(modules: dict[str, tuple[Path, ast.Module]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, (_, tree) in modules.items():
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                names = subs + ([node.module] if len(subs) < len(node.names) else [])
            else:
                continue
            for target in names:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return next((i for i, layer in enumerate(LAYERS) if key in layer), None)


def measure(root: Path) -> dict[str, object]:
    package = root / "lorascale"
    modules = _modules(package)
    graph = _graph(modules)
    functions = [(node.end_lineno - node.lineno + 1, _parameters(node), f"{path.relative_to(root)}:{node.name}")
                 for path, tree in modules.values() for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    longest = max(functions)
    widest = max(functions, key=lambda f: f[1])
    upward = sum(1 for m, ts in graph.items() for t in ts
                 if None not in (_layer(m), _layer(t)) and _layer(t) > _layer(m))  # type: ignore[operator]
    guesses = sum(len(GUESS.findall(path.read_text())) for name, (path, _) in modules.items()
                  if name.startswith(("lorascale.report", "lorascale.results", "lorascale.store.reader",
                                      "lorascale.store.run_directory", "lorascale.api", "lorascale.cli")))
    private = sum(1 for _, tree in modules.values() for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorascale")
                  for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__"))
    return {"modules": len(modules), "import cycles": len(_cycles(graph)),
            "modules in cycles": sum(len(c) for c in _cycles(graph)), "upward imports": upward,
            "longest function": f"{longest[0]} lines ({longest[2]})",
            "most parameters": f"{widest[1]} ({widest[2]})", "manifest guesses": guesses,
            "private imports": private}


if __name__ == "__main__":
    for key, value in measure(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])).items():
        print(f"{key}: {value}")
