"""The import structure of peft_fast, read from the source with `ast` (nothing is imported).

Rules (issue 10): `peft_fast/config.py` is the bottom layer and imports nothing from `mapping`,
`peft_model` or `tuners`, at any level; module-level imports between peft_fast modules form no
cycle; and no import inside a function closes a cycle, that is, dodges one that a module-level
import would create. Imports inside functions that close no cycle (optional backends loaded
lazily) are allowed.

Package `__init__` modules are graph nodes of their own; the implicit import of a parent package
when a submodule is imported is not an edge (Python runs the parent's `__init__` first, so it
cannot form a cycle through the child).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import peft_fast

ROOT = "peft_fast"
# Where each part of the package lives: `kernels/` at the repo root installs as peft_fast.kernels
# (found without running its __init__).
SOURCE_DIRS: dict[str, Path] = {
    ROOT: Path(peft_fast.__file__).parent,
    f"{ROOT}.kernels": Path(importlib.util.find_spec(f"{ROOT}.kernels").submodule_search_locations[0]),
}


def _module_name(package: str, directory: Path, path: Path) -> str:
    parts = [package, *path.relative_to(directory).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {
    _module_name(package, directory, p): p
    for package, directory in SOURCE_DIRS.items()
    for p in directory.rglob("*.py")
}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The peft_fast modules an import statement in `module` imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == ROOT or a.name.startswith(ROOT + ".")]
    if node.level:
        package = module if _is_package(module) else module.rpartition(".")[0]
        base_parts = package.split(".")
        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base != ROOT and not base.startswith(ROOT + "."):
        return []
    # `from pkg import sub` imports the submodule `pkg.sub` where there is one.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _string_imports(node: ast.Call) -> list[str]:
    """`importlib.import_module("peft_fast....")` / `__import__("peft_fast....")` with a literal name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("import_module", "__import__") or not node.args:
        return []
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith(ROOT):
        return [arg.value]
    return []


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported peft_fast module, inside a function, line) for every import in `module` that
    runs; imports under `if TYPE_CHECKING:` are left out."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.extend((target, in_function, node.lineno) for target in _resolve(module, node))
        elif isinstance(node, ast.Call):
            found.extend((target, in_function, node.lineno) for target in _string_imports(node))
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return found


IMPORTS = {m: _imports(m) for m in MODULES}
TOP_LEVEL: dict[str, set[str]] = {m: {t for t, deferred, _ in found if not deferred} for m, found in IMPORTS.items()}


def _reaches(start: str, goal: str) -> bool:
    """Whether importing `start` imports `goal`, through module-level imports."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(TOP_LEVEL.get(m, ()))
    return False


def test_the_source_is_read():
    # The reader finds the modules and edges this test relies on (a guard against a reader that sees nothing).
    assert {"peft_fast.config", "peft_fast.peft_model", "peft_fast.tuners.lora.layer"} <= set(MODULES)
    assert "peft_fast.kernels.lora_shrink" in MODULES
    assert "peft_fast.config" in TOP_LEVEL["peft_fast.peft_model"]
    assert "peft_fast.ops" in TOP_LEVEL["peft_fast.tuners.lora.layer"]  # `from ... import ops`
    assert _reaches("peft_fast", "peft_fast.tuners.lora.model")


def test_config_imports_nothing_from_the_layers_above():
    forbidden = ("peft_fast.mapping", "peft_fast.peft_model", "peft_fast.tuners")
    bad = [
        f"line {line}: {target}" + (" (inside a function)" if deferred else "")
        for target, deferred, line in IMPORTS["peft_fast.config"]
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    ]
    assert not bad, f"peft_fast/config.py must not import mapping, peft_model or tuners: {bad}"


def test_module_level_imports_form_no_cycle():
    cycles = sorted(f"{m} -> {t}" for m, targets in TOP_LEVEL.items() for t in targets if t != m and _reaches(t, m))
    assert not cycles, f"module-level import cycles: {cycles}"


def test_no_import_inside_a_function_dodges_a_cycle():
    dodges = sorted(
        f"{m}:{line} imports {target}"
        for m, found in IMPORTS.items()
        for target, deferred, line in found
        if deferred and target in MODULES and _reaches(target, m)
    )
    assert not dodges, (
        "imports inside functions that dodge a cycle (the imported module imports the importer back); "
        f"move the shared code down a layer instead: {dodges}"
    )
