"""The layout's rules (docs/ARCHITECTURE.md): layers only point down, serving stays free of
torch and training code, the import graph has no cycle, and files and functions stay short."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("recstack", "retrieval", "coarse_rank", "fine_rank")
GENERATED = ("recstack/v1/",)

# layer -> the layers its modules may import (its own included)
FOUNDATION = {"foundation"}
ALLOWED = {
    "foundation": FOUNDATION,
    "data": FOUNDATION | {"data"},
    "serving": FOUNDATION | {"serving"},
    "training": FOUNDATION | {"data", "training"},
    "evaluation": FOUNDATION | {"data", "serving", "evaluation"},
    "stage": FOUNDATION | {"data", "training", "evaluation", "stage"},
    "pipeline": FOUNDATION | {"data", "training", "evaluation", "serving", "stage", "pipeline"},
    "bench": FOUNDATION | {"data", "training", "evaluation", "serving", "stage", "pipeline", "bench"},
    "app": FOUNDATION | {"data", "training", "evaluation", "serving", "stage", "pipeline", "bench", "app"},
}
# third-party packages a layer must never load
FORBIDDEN_THIRD_PARTY = {
    "serving": {"torch", "sklearn", "scipy", "matplotlib"},
    "foundation": {"torch", "sklearn", "scipy", "matplotlib", "onnxruntime", "faiss"},
}


def layer_of(module: str) -> str:
    top, _, rest = module.partition(".")
    if top in ("retrieval", "coarse_rank", "fine_rank"):
        return "stage"
    sub = rest.split(".")[0]
    if sub in ("data", "training", "evaluation", "serving", "pipeline", "bench"):
        return sub
    if sub in ("cli", "cli_bench", "cli_rpc", "__main__"):
        return "app"
    return "foundation"  # recstack itself, config, features, bundle, bundle_files, world, v1


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


SOURCES = _sources()


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every module this file imports (function-level imports included), resolved to the
    project's module names where they are project modules; (name, line)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import module` names a module when one exists
                full = f"{base}.{a.name}"
                out.append((full if full in SOURCES else base, node.lineno))
    return out


def _project(name: str) -> str | None:
    """The project module `name` refers to (a name inside a module resolves to the module)."""
    while name:
        if name in SOURCES:
            return name
        name = name.rpartition(".")[0]
    return None


GRAPH = {m: sorted({p for n, _ in _imports(m, f) if (p := _project(n)) and p != m}) for m, f in SOURCES.items()}


def test_every_module_is_in_a_known_layer_and_the_stage_packages_are_found():
    assert {layer_of(m) for m in SOURCES} == set(ALLOWED)
    assert "recstack.serving.cascade" in SOURCES and "fine_rank.train" in SOURCES


def test_layers_only_point_down():
    bad = []
    for m, f in SOURCES.items():
        for name, line in _imports(m, f):
            p = _project(name)
            if p and layer_of(p) not in ALLOWED[layer_of(m)]:
                bad.append(f"{f.relative_to(REPO)}:{line} ({layer_of(m)}) imports {p} ({layer_of(p)})")
    bad = sorted(set(bad))
    assert not bad, "\n".join(bad)


def test_stage_packages_do_not_import_each_other():
    bad = [f"{m} imports {p}" for m, deps in GRAPH.items() for p in deps
           if layer_of(m) == layer_of(p) == "stage" and m.split(".")[0] != p.split(".")[0]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_THIRD_PARTY))
def test_lower_layers_never_import_heavy_third_party_packages(layer):
    bad = [f"{f.relative_to(REPO)}:{line} imports {name}" for m, f in SOURCES.items() if layer_of(m) == layer
           for name, line in _imports(m, f) if name.split(".")[0] in FORBIDDEN_THIRD_PARTY[layer]]
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def test_no_source_file_over_500_lines_and_no_function_over_80():
    bad = []
    for m, f in SOURCES.items():
        rel = f.relative_to(REPO).as_posix()
        if rel.startswith(GENERATED):
            continue
        text = f.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            bad.append(f"{rel}: {len(text.splitlines())} lines")
        for fn in _functions(ast.parse(text)):
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                bad.append(f"{rel}:{fn.lineno} {fn.name}: {n} lines")
    assert not bad, "\n".join(bad)


def test_test_modules_never_import_each_other():
    """What two test modules share lives in a conftest.py as fixtures; no test file imports
    another (importing one runs its module-level set-up and ties the two files' orders)."""
    bad = []
    for f in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # a relative import is one of tests' own modules
                names = ["." * node.level + (node.module or "")] if node.level else [node.module or ""]
            else:
                continue
            bad += [f"{f.relative_to(REPO).as_posix()}: imports {n}" for n in names
                    if n == "tests" or n.startswith(("tests.", "."))]
    assert not bad, "\n".join(bad)
