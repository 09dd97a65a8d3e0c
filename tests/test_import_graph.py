"""No import circles: within spare_core (and within the bundled benchmark, bench.minicanvas) no module imports one
that imports it back, directly or around a longer loop. Every import statement counts, wherever it stands (top level,
inside a function, under `if TYPE_CHECKING:`), and a name taken from the package (`from . import x`, where x is not a
submodule) is an import of its __init__.py, which imports the submodules. Read from the source with `ast`: no module
is executed, so this needs neither torch nor ComfyUI.

A circle found fails with its loop, e.g. "spare_core.adapters -> spare_core.lora -> spare_core.adapters": move the
names both sides need into the more basic module of the two (or a small one of their own) instead.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("spare_core", "spare_core.minicanvas", "bench.minicanvas")


def modules(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for the package itself (its __init__.py) and each of its .py modules."""
    folder = root.joinpath(*package.split("."))
    out = {package: folder / "__init__.py"}
    for path in sorted(folder.glob("*.py")):
        if path.name != "__init__.py":
            out[f"{package}.{path.stem}"] = path
    return out


def imported(name: str, path: Path, package: str, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that the file of module `name` imports."""
    here = package if path.name == "__init__.py" else name.rsplit(".", 1)[0]  # what `from . import` is relative to
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from source import x`: x is either a submodule (source.x) or a name of source's own file
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import spare_core.lora.x` -> spare_core.lora
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(package, root)
    return {name: imported(name, path, package, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One loop per import circle met by a depth-first search (empty: the graph is acyclic)."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package):
    edges = graph(package)
    assert len(edges) > 3, edges  # the package was found and read
    loops = circles(edges)
    assert not loops, "import circles:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_the_check_sees_every_kind_of_import(tmp_path):
    """Top-level, in-function and TYPE_CHECKING imports, absolute and relative, and a name taken from the package's
    __init__.py all make edges; each loop is reported."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    files = {
        "__init__.py": "VERSION = 1\nfrom .a import f\n",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
                "def f():\n    import pkg.c\n",
        "b.py": "from pkg.a import f\nclass B: pass\n",
        "c.py": "from . import VERSION\n",
        "d.py": "import os\nfrom . import c\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    edges = graph("pkg", tmp_path)
    assert edges == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg"},
                     "pkg.d": {"pkg.c"}}
    assert circles(edges) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg", "pkg.a", "pkg.c", "pkg"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    # the real graph was read: the package imports its stages, the hooks import the file format
    core = graph("spare_core")
    assert "spare_core.distill" in core["spare_core"] and "spare_core.lora" in core["spare_core.adapters"]


# The MiniCanvas harness, split by job (bench/minicanvas/harness.py's docstring): each module imports only the ones
# listed before it here, and nothing in the package imports the front door (harness.py) or the CLI except those two.
HARNESS_LAYERS = ("budgets", "memory", "judge", "methods", "summary", "dispatch", "cli", "harness")


def test_harness_modules_are_layered():
    edges = graph("bench.minicanvas")
    names = [f"bench.minicanvas.{m}" for m in HARNESS_LAYERS]
    for i, name in enumerate(names):
        later = set(names[i + 1:]) & edges[name]
        assert not later, f"{name} imports {sorted(later)}, which come after it in HARNESS_LAYERS"
    front = {"bench.minicanvas.harness", "bench.minicanvas.cli"}
    users = {n for n, e in edges.items() if e & front} - front - {"bench.minicanvas.__main__"}
    assert not users, f"{sorted(users)} import the harness' front door or CLI: import from the module of the job"


def private_reach_ins(package: str, root: Path = ROOT) -> list[str]:
    """`module._name` or `from .module import _name` across the modules of `package` (a module's own underscore names
    are its business; another module's are not)."""
    known = modules(package, root)
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        siblings = set()  # local names bound to a module of the package
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                here = package if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                base = here.split(".")[: len(here.split(".")) - max(node.level - 1, 0)] if node.level else []
                source = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                for a in node.names:
                    if f"{source}.{a.name}" in known:
                        siblings.add(a.asname or a.name)
                    elif source in known and a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{name}: from {source} import {a.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in siblings
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_reach_ins():
    assert not private_reach_ins("bench.minicanvas")


def test_the_reach_in_check_sees_both_forms(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    files = {"__init__.py": "", "a.py": "_STATE = {}\ndef f(): pass\n",
             "b.py": "from . import a\nfrom .a import _STATE, f\nx = a._STATE\ny = a.f\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert private_reach_ins("pkg", tmp_path) == ["pkg.b: from pkg.a import _STATE", "pkg.b:3: a._STATE"]


# The product (the ComfyUI nodes and the engine) ships without the benchmark: the MiniCanvas models it serves live in
# spare_core.minicanvas. A file-path import of bench/ (importlib's spec_from_file_location on a path built from
# "bench", "minicanvas") would work in a checkout and break in an install without bench/.
PRODUCT = ("nodes", "spare_core")


EVIDENCE = re.compile(r"bench/[\w/.-]*\.md")  # a help text's pointer to a results document is a reference, not a path


def names_bench(text: str) -> bool:
    return text == "bench" or "bench/" in text or "bench\\" in text or text.startswith("bench.")


def bench_reach_ins(folder: Path) -> list[str]:
    """Imports of `bench` and string literals naming the bench folder (outside docstrings) in the .py files under
    `folder`, as "path:line: what"."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
        where = f"{path.relative_to(folder.parent)}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [((where, node.lineno), f"{where}:{node.lineno}: import {a.name}") for a in node.names
                          if a.name.split(".")[0] == "bench"]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "bench":
                found.append(((where, node.lineno), f"{where}:{node.lineno}: from {node.module} import ..."))
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and names_bench(EVIDENCE.sub("", node.value))):
                found.append(((where, node.lineno), f"{where}:{node.lineno}: {node.value!r}"))
    return [text for _, text in sorted(found)]


@pytest.mark.parametrize("folder", PRODUCT)
def test_the_product_never_imports_bench(folder):
    assert (ROOT / folder / "__init__.py").is_file()
    found = bench_reach_ins(ROOT / folder)
    assert not found, "the product reaches into bench/ (use spare_core.minicanvas):\n" + "\n".join(found)


def test_the_bench_check_sees_path_and_module_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        '"""Docstrings may name bench/minicanvas."""\nimport os\nimport importlib.util\n'
        'D = os.path.join(os.path.dirname(__file__), "bench", "minicanvas")\n'
        'S = importlib.util.spec_from_file_location("x", "bench/minicanvas/judge.py")\n'
        'from bench.minicanvas import judge\nimport bench.minicanvas.harness\n')
    assert bench_reach_ins(pkg) == ["pkg/a.py:4: 'bench'", "pkg/a.py:5: 'bench/minicanvas/judge.py'",
                                    "pkg/a.py:6: from bench.minicanvas import ...",
                                    "pkg/a.py:7: import bench.minicanvas.harness"]
