"""The layout shows the architecture.

* Layering: each sub-package of ``reddiff/`` (``baselines/`` is ``reddiff.baselines``, through the link
  ``reddiff/baselines``; and each top-level command module) declares in its
  docstring the line ``May import: ...``; every ``import`` of every module (also the ones inside functions) stays
  within its own sub-package or the ones declared.  ``docs/ARCHITECTURE.md`` opens with the same rules as a table.
* No cycle in the import graph; no folder over twelve modules; no source file outside ``benchmarks/`` over 400
  lines.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folder -> its dotted name (``baselines/`` sits at the root and is imported as ``reddiff.baselines``)
PACKAGES = {"reddiff": "reddiff", "baselines": "reddiff.baselines"}
MAX_LINES = 400
MAX_MODULES = 12


def modules() -> dict[str, Path]:
    out = {}
    for pkg, dotted in PACKAGES.items():
        for p in (ROOT / pkg).rglob("*.py"):  # rglob does not enter the link reddiff/baselines
            parts = [dotted, *p.relative_to(ROOT / pkg).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Harness modules imported by ``name`` (relative imports resolved; ``from pkg import mod`` counts as mod)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                mod = ".".join(stem + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not an edge back
                found.add(t)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


# ---------------------------------------------------------------------------------------------------- layering
MAY_IMPORT = re.compile(r"^May import:(.*?)(?:\n\s*\n|\Z)", re.M | re.S)


def declared_units(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every unit that declares its imports: each package (its ``__init__`` docstring) and each module directly in
    ``reddiff/`` (its own docstring).  ``{unit: the units it may import}``; a unit may always import itself."""
    out = {}
    for name, path in mods.items():
        is_unit = path.name == "__init__.py" or name.count(".") == 1 and name.startswith("reddiff.")
        if not is_unit:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        m = MAY_IMPORT.search(doc)
        out[name] = None if m is None else set(re.findall(r"\b(?:reddiff|baselines)(?:\.\w+)*", m.group(1)))
    return out


def unit_of(module: str, units) -> str:
    """The innermost declaring unit that contains ``module`` (``reddiff.priors.training.train`` ->
    ``reddiff.priors.training``)."""
    return max((u for u in units if module == u or module.startswith(u + ".")), key=len)


def layering_violations(graph: dict[str, set[str]], units: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in graph.items():
        u = unit_of(mod, units)
        allowed = units[u] | {u}
        for t in targets:
            tu = unit_of(t, units)
            if tu in allowed:  # a sub-package is a unit of its own: declaring its parent does not allow it
                continue
            bad.append(f"{mod} ({u}) imports {t} ({tu}); {u} may import: {sorted(units[u]) or 'nothing'}")
    return sorted(bad)


def test_every_unit_declares_what_it_may_import():
    units = declared_units(modules())
    missing = sorted(u for u, allowed in units.items() if allowed is None)
    assert not missing, f"no 'May import:' line in the docstring of {missing}"


def test_no_module_imports_above_its_layer():
    mods = modules()
    graph = {n: imports(n, p, set(mods)) for n, p in mods.items()}
    units = declared_units(mods)
    assert layering_violations(graph, units) == []


def test_layering_check_catches_an_upward_import():
    units = {"reddiff": set(), "reddiff.core": set(), "reddiff.run": {"reddiff.core"}, "reddiff.priors": {"reddiff.core"},
             "reddiff.priors.training": {"reddiff.core", "reddiff.priors"}}
    ok = {"reddiff.run.entry": {"reddiff.core.rng"}, "reddiff.priors.training.train": {"reddiff.priors.unet"}}
    assert layering_violations(ok, units) == []
    up = {"reddiff.core.rng": {"reddiff.run.entry"}}
    assert layering_violations(up, units) == [
        "reddiff.core.rng (reddiff.core) imports reddiff.run.entry (reddiff.run); reddiff.core may import: nothing"]
    child = {"reddiff.priors.unet": {"reddiff.priors.training.train"}}  # a package may not reach into its trainer
    assert len(layering_violations(child, units)) == 1


def test_architecture_doc_table_matches_the_declarations():
    """The first table of docs/ARCHITECTURE.md (folder | role | may import) states the same rules."""
    units = declared_units(modules())
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = {}
    for line in text.split("\n## ")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            unit = cells[0].strip("`").removesuffix("__init__.py").rstrip("/").removesuffix(".py").replace("/", ".")
            table[unit] = set(re.findall(r"\b(?:reddiff|baselines)(?:\.\w+)*", cells[2].replace("/", ".")))
    assert set(table) == set(units), (sorted(set(units) - set(table)), sorted(set(table) - set(units)))
    for u in units:
        assert table[u] == units[u], (u, sorted(table[u]), sorted(units[u]))


# ------------------------------------------------------------------------------------------------- the rest
def test_import_graph_has_no_cycle():
    mods = modules()
    graph = {n: imports(n, p, set(mods)) for n, p in mods.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES
            for p in (ROOT / pkg).rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("pkg", list(PACKAGES))
def test_no_folder_over_twelve_modules(pkg):
    crowded = {}
    for d in [ROOT / pkg, *(p for p in (ROOT / pkg).rglob("*") if p.is_dir())]:
        n = len([p for p in d.glob("*.py") if p.name != "__init__.py"])
        if n > MAX_MODULES:
            crowded[str(d.relative_to(ROOT))] = n
    assert not crowded, crowded


def test_baselines_are_imported_only_as_reddiff_baselines():
    """``baselines/`` is one package under one name: a top-level ``import baselines`` would load a second copy of
    every class (and is what an installed harness does not have)."""
    pat = re.compile(r"^\s*(?:from|import)\s+baselines\b", re.M)
    where = [str(p.relative_to(ROOT)) for d in ("reddiff", "baselines", "benchmarks", "tests") for p in
             (ROOT / d).rglob("*.py") if pat.search(p.read_text())]
    where += [str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")
              if re.search(r"_target_:\s*baselines\.", p.read_text())]
    assert not where, where
    assert (ROOT / "reddiff" / "baselines").resolve() == (ROOT / "baselines").resolve()
