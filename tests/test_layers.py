"""The package's layers: no module imports from a layer above its own, and no import cycles.

A module may import from its own layer and the layers below. What two layers both need moves
down, or is passed in as an argument (DESIGN.md, "Layers"):

| layer | modules                                       | what lives there                        |
|-------|-----------------------------------------------|-----------------------------------------|
| 0     | config, ops, runtime                          | schema and validation; custom ops with  |
|       |                                               | their references; the device's choices  |
| 1     | data, visualize                               | COCO, transforms, batches, loaders;     |
|       |                                               | drawing images                          |
| 2     | model                                         | backbone, FPN, RPN, RoI heads, sampling |
| 3     | engine                                        | step, loop and hooks, solver,           |
|       |                                               | checkpoints, evaluation, distributed    |
| 4     | bench                                         | the benchmark's parts (build TrainStep) |
| 5     | train, eval, predict, benchmark, check, cli   | the commands                            |

Every import counts, also one inside a function (a lazy import is still a dependency). An
import `from maskrcnn.a import b` depends on the module maskrcnn.a.b where there is one, else
on maskrcnn.a.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "maskrcnn"

# Module (or package) name -> layer; a module takes the layer of its longest listed prefix.
LAYERS = {
    "maskrcnn": 5,  # the package's __init__ (empty)
    "maskrcnn.config": 0,
    "maskrcnn.ops": 0,
    "maskrcnn.runtime": 0,
    "maskrcnn.data": 1,
    "maskrcnn.visualize": 1,
    "maskrcnn.model": 2,
    "maskrcnn.engine": 3,
    "maskrcnn.bench": 4,
    "maskrcnn.train": 5,
    "maskrcnn.eval": 5,
    "maskrcnn.predict": 5,
    "maskrcnn.benchmark": 5,
    "maskrcnn.check": 5,
    "maskrcnn.cli": 5,
}

Edge = tuple[str, str, int, str]  # (importer, imported, line, the import as written)


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package` (a package's name for
    its __init__.py)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_edges(package: Path) -> list[Edge]:
    """Every import of a module of `package` by a module of `package`, anywhere in the file."""
    known = modules(package)
    root = package.name
    edges = []
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package, `level` up
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                           for alias in node.names]
            else:
                continue
            written = ast.unparse(node)
            for target in targets:
                if target != root and not target.startswith(root + "."):
                    continue
                while target not in known:  # `import a.b.name` of a function or class
                    target = target.rpartition(".")[0]
                edges.append((name, target, node.lineno, written))
    return edges


def layer_of(module: str, layers: dict[str, int]) -> int:
    prefixes = [p for p in layers if module == p or module.startswith(p + ".")]
    if not prefixes:
        raise KeyError(f"{module} has no layer: add it to the table")
    return layers[max(prefixes, key=len)]


def upward_imports(edges: list[Edge], layers: dict[str, int], package: Path) -> list[str]:
    """One line per import of a higher layer: file:line: the import (layers)."""
    files = modules(package)
    found = []
    for importer, imported, line, written in edges:
        low, high = layer_of(importer, layers), layer_of(imported, layers)
        if high > low:
            found.append(f"{files[importer].relative_to(package.parent)}:{line}: {written} "
                         f"({importer}, layer {low}, imports {imported}, layer {high})")
    return found


def import_cycles(edges: list[Edge], package: Path) -> list[str]:
    """One line per import cycle (a strongly connected group of modules): each import of the
    cycle as file:line: the import."""
    files = modules(package)
    graph: dict[str, dict[str, tuple[int, str]]] = {}
    for importer, imported, line, written in edges:
        if importer != imported:
            graph.setdefault(importer, {}).setdefault(imported, (line, written))
    # Tarjan's strongly connected components, iteratively.
    index, low, on_stack, stack, groups = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, {})))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    found = []
    for group in groups:
        members = set(group)
        links = [f"{files[a].relative_to(package.parent)}:{line}: {written}"
                 for a in group for b, (line, written) in sorted(graph[a].items())
                 if b in members]
        found.append(f"cycle among {', '.join(group)}: " + "; ".join(links))
    return found


def test_no_module_imports_from_a_higher_layer():
    """If this fails, a module depends on a layer above its own (e.g. the model on the
    engine): move what both need down a layer, or pass it in as an argument."""
    found = upward_imports(import_edges(PACKAGE), LAYERS, PACKAGE)
    assert not found, "upward imports:\n" + "\n".join(found)


def test_no_import_cycles():
    """If this fails, modules import each other (directly or through others), also through
    imports inside functions: what both need belongs in a third module below them."""
    found = import_cycles(import_edges(PACKAGE), PACKAGE)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_every_module_has_a_layer():
    """If this fails, a new top-level module or package is missing from LAYERS."""
    for module in modules(PACKAGE):
        layer_of(module, LAYERS)


@pytest.fixture
def toy(tmp_path):
    """A package `toy` of two layers: low (0) and high (1), written by the test."""
    root = tmp_path / "toy"
    (root / "low").mkdir(parents=True)
    for path in ("__init__.py", "low/__init__.py", "high.py"):
        (root / path).write_text("")
    return root


def test_the_walk_finds_upward_and_lazy_imports(toy):
    """If this fails, the checks above pass whatever the package imports: an upward import
    inside a function, or written relatively, goes unseen."""
    (toy / "low" / "a.py").write_text("import os\n\n\ndef f():\n    from toy.high import g\n")
    (toy / "low" / "b.py").write_text("from ..high import g\nfrom . import a\n")
    layers = {"toy": 1, "toy.low": 0, "toy.high": 1}
    found = upward_imports(import_edges(toy), layers, toy)
    assert found == [
        "toy/low/a.py:5: from toy.high import g (toy.low.a, layer 0, imports toy.high, layer 1)",
        "toy/low/b.py:1: from ..high import g (toy.low.b, layer 0, imports toy.high, layer 1)",
    ]
    assert import_cycles(import_edges(toy), toy) == []


def test_the_walk_finds_cycles(toy):
    """If this fails, modules that import each other (here through a third) pass the cycle
    check."""
    (toy / "low" / "a.py").write_text("from toy.low.b import x\n")
    (toy / "low" / "b.py").write_text("import toy.low.c\n")
    (toy / "low" / "c.py").write_text("def f():\n    from toy.low import a\n")
    found = import_cycles(import_edges(toy), toy)
    assert found == ["cycle among toy.low.a, toy.low.b, toy.low.c: "
                     "toy/low/a.py:1: from toy.low.b import x; "
                     "toy/low/b.py:1: import toy.low.c; "
                     "toy/low/c.py:2: from toy.low import a"]
