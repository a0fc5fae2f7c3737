"""The shape of the package, checked so that it stays: short functions (or a stated reason), Ray in one module,
a numerical core without IO, and a library that speaks in option names, never in CLI flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lorascale

PACKAGE = Path(lorascale.__file__).parent
MAX_LINES, MAX_PARAMETERS = 60, 8
# A docstring may give the reason a function is longer or takes more: "Long because ..." / "Many parameters
# because ...".
REASON = re.compile(r"\b(long|many parameters) because\b", re.IGNORECASE)


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for path in sorted(PACKAGE.rglob("*.py"))]


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    count = len(names) - (1 if names and names[0] in ("self", "cls") else 0)
    return count + bool(args.vararg)  # **kwargs forwards options: not a parameter list of its own


def test_functions_are_short_or_say_why():
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if (lines > MAX_LINES or _parameters(node) > MAX_PARAMETERS) and not REASON.search(
                    ast.get_docstring(node) or ""):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} "
                                 f"({lines} lines, {_parameters(node)} parameters)")
    assert not offenders, "\n".join(offenders)


def _imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_ray_is_imported_in_one_module():
    users = [str(path.relative_to(PACKAGE)) for path, tree in _modules()
             if any(name == "ray" or name.startswith("ray.") for name in _imports(tree))]
    assert users == ["execute/ray_executor.py"]


def test_the_numerical_core_does_no_io():
    """numerics/ is handed tensors and a resolved Routes: it imports nothing that reads files, the
    environment, the store, the executors or the CLI."""
    forbidden = ("lorascale.io", "lorascale.store", "lorascale.settings", "lorascale.execute", "lorascale.cli",
                 "lorascale.pipeline", "lorascale.request", "os", "pathlib", "shutil", "tempfile", "ray", "click")
    for path, tree in _modules():
        if path.parent.name != "numerics":
            continue
        bad = {name for name in _imports(tree) if any(name == f or name.startswith(f"{f}.") for f in forbidden)}
        assert not bad, (path.name, bad)


_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def _message_texts(node: ast.AST) -> list[str]:
    """The literal text of every string (and f-string part) inside `node`."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_library_errors_name_options_not_flags():
    """Outside cli/, a raised error names an option with errors.option() (spelled as a keyword or a flag by
    whoever shows it), never as a literal `--flag`."""
    offenders = []
    for path, tree in _modules():
        if path.parent.name == "cli":
            continue
        fixes = {node.targets[0].id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                 and node.targets[0].id.endswith("_FIX")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                texts = _message_texts(node.exc)
                texts += [t for name in {n.id for n in ast.walk(node.exc) if isinstance(n, ast.Name)} & fixes.keys()
                          for t in _message_texts(fixes[name])]
                offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {t!r}" for t in texts if _FLAG.search(t)
                              and "ray start" not in t]
    assert not offenders, "\n".join(offenders)


# The layer order, lowest first: a module may import its own layer and the layers below it, never one above.
# The first element of a module's dotted name below `lorascale` names its layer (a package, or a top module).
# errors/records/version/settings/labels are the foundations; numerics imports none of the other packages;
# cli, api and the package's own __init__ sit on top.  Adding a package means adding it here, on purpose.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "records", "version", "settings", "labels", "scrub", "optionspec", "extras", "sizes"),
    ("numerics",),
    ("io",),
    ("plan",),
    ("naming", "request", "run_identity"),
    ("store",),
    ("analyses",),
    ("execute",),
    ("report", "inspect", "demo", "calibrate"),
    ("pipeline",),
    ("api", "cli", "__init__"),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_imports(module: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """The lorascale modules `module` imports, at its top or inside a function (a lazy import is still a
    dependency).  `from lorascale import settings` imports the module lorascale.settings."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            names = submodules + ([target] if len(submodules) < len(node.names) else [])
        else:
            continue
        for name in names:
            while name not in known and "." in name:
                name = name.rpartition(".")[0]
            if name in known and name != module:
                found.add(name)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): (path, tree) for path, tree in _modules()}
    known = set(modules)
    return {name: _internal_imports(name, path, tree, known) for name, (path, tree) in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for index, layer in enumerate(LAYERS):
        if key in layer:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add its package where it belongs")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each one import cycle or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert not _cycles(_import_graph())


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_follow_the_layer_order():
    """Each import goes down the layers (or stays in its layer): numerics imports only the foundations, nothing
    below the top imports cli or api."""
    upward = [f"{module} -> {target}" for module, targets in sorted(_import_graph().items())
              for target in sorted(targets) if _layer(target) > _layer(module)]
    assert not upward, "\n".join(upward)


# Who may read the environment (settings.py): the edge, and two readers that run where the files are, which is a
# Ray worker's node as often as the driver's machine.  Everything else gets what it needs in the request.
SETTINGS_READERS = {
    "lorascale.cli", "lorascale.cli.progress", "lorascale.cli.cache", "lorascale.api",  # the edge
    "lorascale.request",  # the type RunEnvironment only: the values come from the edge (test below)
    "lorascale.io.resolve",  # the hub settings, on whichever node fetches the files (not yet carried in the request)
    "lorascale.store.overlap",  # the hub cache an --out must not lie in (the same hub settings as io.resolve)
    "lorascale.execute.ray_executor",  # a Ray worker's base-SVD cache is its own node's
}


def test_the_environment_is_read_at_the_edge():
    readers = {module for module, targets in _import_graph().items() if "lorascale.settings" in targets}
    assert readers <= SETTINGS_READERS, sorted(readers - SETTINGS_READERS)
    request = next(tree for path, tree in _modules() if path == PACKAGE / "request.py")
    calls = [node.func.attr for node in ast.walk(request) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
             and node.func.value.id == "settings"]
    assert not calls


def _private_imports(tree: ast.Module) -> list[str]:
    """`from lorascale.x import _name`: another module's private name (a module's own names need no import)."""
    return [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("lorascale") for alias in node.names
            if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{path.relative_to(PACKAGE)}: {name}" for path, tree in _modules() for name in _private_imports(tree)]
    assert not offenders, "\n".join(offenders)
    assert _private_imports(ast.parse("from lorascale.analyses.compare import _cache")) == [
        "lorascale.analyses.compare._cache"]


def test_executors_know_no_analysis():
    """execute/ runs what analyses.analysis_for() names: it imports the analyses package's interface, never an
    analysis module."""
    graph = _import_graph()
    offenders = sorted(f"{module} -> {target}" for module, targets in graph.items()
                       if module.startswith("lorascale.execute") for target in targets
                       if target.startswith("lorascale.analyses.") and target != "lorascale.analyses.options")
    assert not offenders, "\n".join(offenders)


def _option_defaults() -> dict[str, object]:
    """Every option's default as request.py declares it (the sub-records' fields), plus DEFAULT_TOP_K."""
    from dataclasses import MISSING, fields

    from lorascale import request

    defaults: dict[str, object] = {"top_k": request.DEFAULT_TOP_K}
    for record in (request.References, request.Selection, request.Analysis, request.Execution, request.Output,
                   request.Mitigation):
        for f in fields(record):
            if f.default is not MISSING and f.default is not None and not isinstance(f.default, bool):
                defaults[f.name] = f.default
    return defaults


# Where a default may be written a second time, and why.
DEFAULT_COPIES_ALLOWED = {
    "request.py": "the declaration itself",
    "store/manifest.py": "_UNVERSIONED_OPTIONS: what old runs used, which stays when today's default moves",
}


def _default_copies(tree: ast.Module, defaults: dict[str, object]) -> list[str]:
    """`name=<literal>` (a parameter's default), `"name": <literal>` (a dict entry) or `click.option("--flag",
    default=<literal>)` equal to option `name`'s default."""
    found = []
    for node in ast.walk(tree):
        pairs: list[tuple[str, ast.AST]] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            pairs += [(a.arg, d) for a, d in zip(positional[len(positional) - len(args.defaults):], args.defaults)]
            pairs += [(a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "option"
              and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")):
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and not str(a.value).startswith("-")]
            name = names[0] if names else str(node.args[0].value).lstrip("-").replace("-", "_")
            pairs += [(name, k.value) for k in node.keywords if k.arg == "default"]
        elif isinstance(node, ast.Dict):
            pairs += [(k.value, v) for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and isinstance(k.value, str)]
        found += [f"{name}={value.value!r} (line {value.lineno})" for name, value in pairs
                  if name in defaults and isinstance(value, ast.Constant) and type(value.value) is type(defaults[name])
                  and value.value == defaults[name]]
    return found


def test_no_option_default_is_written_twice():
    defaults = _option_defaults()
    offenders = [f"{path.relative_to(PACKAGE)}: {copy}" for path, tree in _modules()
                 if str(path.relative_to(PACKAGE)) not in DEFAULT_COPIES_ALLOWED
                 for copy in _default_copies(tree, defaults)]
    assert not offenders, "\n".join(offenders)
    example = "def f(*, epsilon: float = 0.5): click.option('--device', default='auto'); g({'k': 10}, side='left')"
    assert sorted(_default_copies(ast.parse(example), defaults)) == [
        "device='auto' (line 1)", "epsilon=0.5 (line 1)", "k=10 (line 1)"]
