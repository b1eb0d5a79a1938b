"""The package's folders hold its design (docs/architecture.md): its imports, read with `ast`, form no cycle
and never reach up a floor; no file of speft_ds/ or bench/ is over 400 lines; every folder's __init__.py
says what lives there; bench/ uses only the package's public names.

The checks are small pure functions, each also run on a tiny made-up package that breaks it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "speft_ds"
MAX_LINES = 400
# A module may import only from its own floor or a lower one; a module's floor is its longest prefix here.
FLOORS = {
    "speft_ds.config": 0,
    "speft_ds.models": 1,
    "speft_ds.runtime": 2,
    "speft_ds.data": 3,
    "speft_ds.methods": 4,
    "speft_ds": 5,  # the top: __init__.py, recipe.py, train.py, cli.py and commands/
}


def module_name(path: Path, root: Path) -> str:
    """speft_ds/a/b.py -> speft_ds.a.b; speft_ds/a/__init__.py -> speft_ds.a (`root` holds the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package under `root`, by name."""
    return {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that `source` (module `module`) imports anywhere in its body, functions
    included: `import a.b`, `from a.b import name`, `from a import b` (b a module), and their relative forms."""
    found = set()

    def owner(name: str) -> str | None:  # the longest known module that `name` is or lies in
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(owner(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                found.add(owner(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else owner(base))
    found.discard(None)
    found.discard(module)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    known = set(modules)
    return {name: imported_modules(path.read_text(), name, path.name == "__init__.py", known)
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def floor(module: str, floors: dict[str, int]) -> int:
    """The floor of the longest prefix of `module` (by dotted parts) that `floors` names."""
    name = module
    while name not in floors:
        if "." not in name:
            raise KeyError(f"{module} has no floor")
        name = name.rpartition(".")[0]
    return floors[name]


def upward_imports(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    """Each import from a lower floor to a higher one, as "importer (floor) -> imported (floor)"."""
    return [f"{src} ({floor(src, floors)}) -> {dst} ({floor(dst, floors)})"
            for src in sorted(graph) for dst in sorted(graph[src]) if floor(dst, floors) > floor(src, floors)]


def long_files(paths: list[Path], limit: int = MAX_LINES) -> list[str]:
    return [f"{path.relative_to(REPO)}: {n} lines" for path in paths
            if (n := len(path.read_text().splitlines())) > limit]


def deepspeed_internals(source: str) -> list[str]:
    """The DeepSpeed modules `source` imports beyond its public top level and accelerator API."""
    public = {"deepspeed", "deepspeed.accelerator"}
    names = [alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.module]
    return sorted({name for name in names if name.split(".")[0] == "deepspeed" and name not in public})


def undocumented_folders(folders: list[Path]) -> list[str]:
    """The folders whose __init__.py is missing or has no docstring."""
    return [str(folder.relative_to(REPO)) for folder in folders if not (folder / "__init__.py").is_file()
            or not ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))]


def private_uses(source: str, package: str = PACKAGE) -> list[str]:
    """The package's private names that `source` uses: imported (`from speft_ds.x import _y`, `import
    speft_ds._x`) or read off an imported module (`zero3._y`)."""
    tree = ast.parse(source)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == package:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") or any(p.startswith("_") for p in node.module.split("."))]
            modules.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    found += [alias.name] if any(p.startswith("_") for p in alias.name.split(".")) else []
                    modules.add(alias.asname or alias.name.split(".")[0])
    found += [f"{node.value.id}.{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and isinstance(node.value, ast.Name) and node.value.id in modules and node.attr.startswith("_")
              and not node.attr.startswith("__")]
    return found


# --- the checks on a made-up package that breaks each of them

SYNTHETIC = {  # module -> (is a package, source)
    "p": (True, "from . import low\n"),
    "p.low": (False, "def f():\n    from .high import g  # an upward import, inside a function\n"),
    "p.high": (True, "from .mid import x\n"),
    "p.high.mid": (False, "from .. import high\nfrom ..low import f\n"),
    "p.other": (False, "import p.low\nfrom p.high import mid\nimport json\n"),
}
SYNTHETIC_FLOORS = {"p.low": 0, "p.high": 1, "p": 2}


def synthetic_graph() -> dict[str, set[str]]:
    return {name: imported_modules(source, name, is_package, set(SYNTHETIC))
            for name, (is_package, source) in SYNTHETIC.items()}


def test_imports_are_resolved_in_every_form():
    assert synthetic_graph() == {"p": {"p.low"}, "p.low": {"p.high"}, "p.high": {"p.high.mid"},
                                 "p.high.mid": {"p.high", "p.low"}, "p.other": {"p.low", "p.high.mid"}}


def test_a_cycle_is_found_and_named():
    assert find_cycle(synthetic_graph()) == ["p.high", "p.high.mid", "p.high"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_an_upward_import_is_found_and_named():
    assert upward_imports(synthetic_graph(), SYNTHETIC_FLOORS) == ["p.low (0) -> p.high (1)"]
    assert upward_imports({"p.high": {"p.low"}}, SYNTHETIC_FLOORS) == []


def test_a_private_name_is_found():
    source = ("from speft_ds.runtime import zero3\nfrom speft_ds.models.loading import _quantization_config, load_model\n"
              "import speft_ds.data.batches as batches\nzero3._hidden(); batches.pack(); zero3.gather_full()\n")
    assert private_uses(source) == ["speft_ds.models.loading._quantization_config", "zero3._hidden"]


# --- the checks on the real tree

@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(package_modules(REPO))


def test_the_package_imports_no_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_floor(graph):
    assert upward_imports(graph, FLOORS) == [], "imports up a floor (docs/architecture.md)"


def test_the_graph_sees_the_imports(graph):
    """A guard on the checks: the edges they must see are there (relative, `from . import`, in functions)."""
    assert {"speft_ds.runtime.zero3", "speft_ds.methods.speft.masks"} <= graph["speft_ds.methods.speft.method"]
    assert "speft_ds.models.bnb_weights" in graph["speft_ds.runtime.zero3"]
    assert "speft_ds.methods.adapters" in graph["speft_ds"]  # imported inside __getattr__
    config = {name for name in graph if name == "speft_ds.config" or name.startswith("speft_ds.config.")}
    assert {"speft_ds.config.settings", "speft_ds.config.errors"} <= graph["speft_ds.config"]
    assert all(graph[name] <= config for name in config)  # the lowest floor imports nothing else of the package


def test_zero3_is_the_one_door_to_deepspeed_internals():
    assert deepspeed_internals("import deepspeed\nfrom deepspeed.accelerator import get_accelerator\n") == []
    assert deepspeed_internals("def f():\n    from deepspeed.runtime.zero import GatheredParameters\n") == [
        "deepspeed.runtime.zero"]
    doors = {path.relative_to(REPO).as_posix() for path in (REPO / PACKAGE).rglob("*.py")
             if deepspeed_internals(path.read_text())}
    assert doors == {"speft_ds/runtime/zero3.py"}


def test_every_folder_says_what_lives_there():
    folders = sorted({path.parent for path in (REPO / PACKAGE).rglob("*.py")})
    assert undocumented_folders(folders) == [], "folders without an __init__.py docstring"


def test_no_file_is_over_400_lines():
    paths = sorted([*(REPO / PACKAGE).rglob("*.py"), *(REPO / "bench").rglob("*.py")])
    assert long_files(paths) == []


def test_bench_uses_only_public_names_of_the_package():
    known = set(package_modules(REPO))
    for path in sorted((REPO / "bench").rglob("*.py")):
        source = path.read_text()
        assert private_uses(source) == [], path.relative_to(REPO)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
                assert node.module in known, f"{path.relative_to(REPO)} imports {node.module}, no module of the package"
