"""The package's folders are its architecture: each imports only from the layers its package
docstring allows, no stage imports another, and the import graph has no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cifar_ensembles"

# What each part may import (besides itself and `errors`). Top-level modules are the
# numerical library and the public re-exports; `cli` may import anything.
NUMERICAL = {"models", "optim", "losses", "schedules", "ema"}
ALLOWED = {
    "config": set(),
    "analysis": set(),
    "transforms": {"config", "compute.device"},
    "compute": {"config", "transforms"},
    "files": {"config", "transforms.corruptions", "models", "analysis.uncertainty", "analysis.methods"},
    "numerical": {"config", "files.records"},
    "ensemble": {"analysis"},
    "metrics": {"analysis"},
    "training": {"config", "files", "compute", "transforms", "numerical"},
    "stages": {"config", "files", "compute", "transforms", "analysis", "training", "numerical", "__init__"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts) or "__init__"


def imports_of(path: Path) -> set[str]:
    """Modules of the package that `path` imports, anywhere in the file (dotted, package-relative)."""
    name = module_name(path).split(".")
    package = name if path.name == "__init__.py" else name[:-1]
    if path.name == "__init__.py" and package == ["__init__"]:
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
            elif node.module and node.module.split(".")[0] == "cifar_ensembles":
                base = []
            else:
                continue
            module = [*base, *((node.module or "").split(".") if node.module else [])]
            if module and module[0] == "cifar_ensembles":
                module = module[1:]
            for alias in node.names:
                candidate = [*module, alias.name]
                is_module = (PACKAGE.joinpath(*candidate).with_suffix(".py").exists()
                             or PACKAGE.joinpath(*candidate, "__init__.py").exists())
                found.add(".".join(candidate if is_module else module) or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cifar_ensembles."):
                    found.add(alias.name.removeprefix("cifar_ensembles."))
    return found


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def part(module: str) -> str:
    top = module.split(".")[0]
    return "numerical" if top in NUMERICAL else top


def allowed(importer: str, imported: str) -> bool:
    if imported in ("errors", "__init__") or imported.split(".")[0] == importer.split(".")[0]:
        return True
    rules = ALLOWED.get(part(importer))
    if rules is None:  # cli, __main__, errors
        return True
    targets = {imported, "numerical"} if part(imported) == "numerical" else {imported}
    return any(t == r or t.startswith(r + ".") for t in targets for r in rules)


def test_every_import_of_the_package_resolves():
    missing = sorted((m, i) for m, imported in GRAPH.items() for i in imported
                     if i != "__init__" and i not in GRAPH)
    assert not missing


def test_the_graph_is_read():
    assert "config.spec" in GRAPH["config.check"]
    assert "files.arrays" in GRAPH["stages.shift"]
    assert "stages.report.plotting" in GRAPH["stages.report.figures"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_what_its_layer_allows(module):
    bad = sorted(m for m in GRAPH[module] if not allowed(module, m))
    assert not bad, f"{module} imports {bad}"


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "stages" and len(parts) > 1 else None


def test_no_stage_imports_another():
    crossings = [(m, i) for m, imported in GRAPH.items() for i in imported
                 if stage_of(m) and stage_of(i) and stage_of(i) != stage_of(m)]
    assert not crossings


def test_the_import_graph_has_no_cycles():
    state: dict[str, int] = {}

    def visit(module, trail):
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, module]))
        if state.get(module) == 2 or module not in GRAPH:
            return
        state[module] = 1
        for imported in sorted(GRAPH[module]):
            if imported != module:
                visit(imported, [*trail, module])
        state[module] = 2

    for module in sorted(GRAPH):
        visit(module, [])


def test_the_public_api_imports_where_users_import_it():
    from cifar_ensembles.ensemble import hard_vote, soft_vote
    from cifar_ensembles.losses import AsymmetricLossSingleLabel
    from cifar_ensembles.metrics import expected_calibration_error
    from cifar_ensembles.optim import SAM

    assert callable(SAM.first_step) and callable(SAM.second_step)
    assert all(callable(f) for f in (hard_vote, soft_vote, expected_calibration_error))
    assert AsymmetricLossSingleLabel.__name__ == "AsymmetricLossSingleLabel"


def test_every_folder_says_what_lives_there_and_what_it_may_import():
    for folder in ("config", "files", "analysis", "transforms", "compute", "training", "stages"):
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text())) or ""
        assert len(doc) > 80, folder
