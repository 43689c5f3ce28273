"""The import layers of ``fineclip/`` (docs/architecture.md): every import, lazy ones inside functions
included, points to the same package or to a lower layer; only entry points import ``fineclip.cli``;
the module graph has no cycle; no module grows past the size a reader takes in at once."""

import ast
from pathlib import Path

import fineclip

PACKAGE = Path(fineclip.__file__).parent
# lowest first; a module may import its own package and the layers below it
LAYERS = [
    ("fineclip", "fineclip.errors", "fineclip.timing"),
    ("fineclip.data",),
    ("fineclip.models",),
    ("fineclip.losses",),
    ("fineclip.methods",),
    ("fineclip.eval",),
    ("fineclip.engine",),
    ("fineclip.annotate", "fineclip.viz", "fineclip.detect"),
    ("fineclip.cli", "fineclip.train", "fineclip.evaluate", "fineclip.benchmark", "fineclip.export", "fineclip.convert",
     "fineclip.results",
     "fineclip.annotate.__main__", "fineclip.viz.__main__", "fineclip.detect.__main__"),
]
ENTRY_POINTS = set(LAYERS[-1])
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def unit(module: str) -> str:
    """The layer unit a module belongs to: an entry point itself, else its longest listed prefix."""
    if module in ENTRY_POINTS:
        return module
    names = [n for layer in LAYERS for n in layer if module == n or module.startswith(n + ".")]
    return max(names, key=len)


def rank(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit(module) in layer)


def imports(path: Path) -> set[str]:
    """Every fineclip module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fineclip")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fineclip"):
            for alias in node.names:  # `from fineclip.eval import maps` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for name in MODULES:
        assert rank(name) >= 0, name


def test_no_import_points_up_or_sideways():
    wrong = []
    for name, targets in GRAPH.items():
        for target in targets:
            same_package = unit(target) == unit(name) or (unit(name) not in ENTRY_POINTS and target.startswith(
                unit(name) + "."))
            if not same_package and (rank(target) > rank(name) or (rank(target) == rank(name) and rank(name) > 0
                                                                    and name not in ENTRY_POINTS)):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_only_entry_points_import_the_cli():
    importers = sorted(n for n, targets in GRAPH.items() if "fineclip.cli" in targets and n not in ENTRY_POINTS)
    assert not importers, importers


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH.get(name, ())):
            if target == name or target not in GRAPH:
                continue
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if state.get(target) is None:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_no_module_is_longer_than_a_reader_takes_in_at_once():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a data module that imports the engine is caught."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from fineclip.engine.rng import seed_everything\n")
    assert imports(source) == {"fineclip.engine.rng"}
    assert rank("fineclip.engine.rng") > rank("fineclip.data.synthetic")
