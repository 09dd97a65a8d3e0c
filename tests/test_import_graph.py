"""No import circles: within spare_core (and within the bundled benchmark, bench.minicanvas) no module imports one
that imports it back, directly or around a longer loop. Every import statement counts, wherever it stands (top level,
inside a function, under `if TYPE_CHECKING:`), and a name taken from the package (`from . import x`, where x is not a
submodule) is an import of its __init__.py, which imports the submodules. Read from the source with `ast`: no module
is executed, so this needs neither torch nor ComfyUI.

A circle found fails with its loop, e.g. "spare_core.adapters -> spare_core.lora -> spare_core.adapters": move the
names both sides need into the more basic module of the two (or a small one of their own) instead.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("spare_core", "bench.minicanvas")


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
