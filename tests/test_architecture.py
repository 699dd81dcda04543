"""The layout is the architecture, and stays so: backend/ is a set of rooms (subpackages), each saying in
its ``__init__`` docstring which rooms it may import ("May import: ..."); this walks every import in
backend/ (those inside functions too; only ``if TYPE_CHECKING:`` blocks are left out, they never run) and
fails on an import a room did not declare, on declarations that are not a layering (a room reachable
from itself), on a circle between modules, and on anything in backend/ importing the tools around it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "backend"
OUTSIDE = ("orchestrator", "lsmlflow", "bench", "harness", "tests", "examples")
TOP = {"backend", "backend.app"}  # the package itself and the app factory, which puts the rooms together


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(path): path for path in BACKEND.rglob("*.py")}
ROOMS = sorted({name.split(".")[1] for name in MODULES if name.count(".") >= 1 and name not in TOP})


def room_of(module: str) -> str | None:
    return None if module in TOP else module.split(".")[1]


def declared(room: str) -> set[str]:
    """The rooms ``room`` says it may import, from its docstring's "May import:" line."""
    doc = ast.get_docstring(ast.parse((BACKEND / room / "__init__.py").read_text())) or ""
    found = re.search(r"May import: ([^\n]*)", doc)
    assert found, f"backend/{room}/__init__.py: its docstring does not say what it may import ('May import: ...')"
    words = re.findall(r"[a-z_]+", found.group(1).split("(")[0])
    return set() if words[:2] == ["nothing", "else"] else set(words)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str) -> set[str]:
    """The top-level packages and backend modules ``module`` imports."""
    path = MODULES[module]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                found.add(target)
            elif target.split(".")[0] in OUTSIDE:
                found.add(target.split(".")[0])
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_room_says_what_it_owns_and_may_import():
    assert {"core", "config", "serving", "isolation", "web", "training", "antenna"} <= set(ROOMS)
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((BACKEND / room / "__init__.py").read_text())) or ""
        assert len(doc.split("May import:")[0].strip()) > 40, f"backend/{room}: say what the room owns"
        assert declared(room) <= set(ROOMS), f"backend/{room} names rooms that do not exist"


def test_the_rooms_declarations_are_a_layering():
    """Following "may import" never leads back to where it started."""
    for room in ROOMS:
        seen, frontier = set(), set(declared(room))
        while frontier:
            step = frontier.pop()
            assert step != room, f"backend/{room} may import itself through {sorted(seen)}"
            if step not in seen:
                seen.add(step)
                frontier |= declared(step)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in TOP))
def test_imports_point_only_down(module):
    room = room_of(module)
    allowed = declared(room) | {room}
    for target in GRAPH[module]:
        assert target not in OUTSIDE, f"{module} imports {target}: backend/ must run without the tools around it"
        assert target not in TOP, f"{module} imports {target}, which puts the rooms together"
        assert room_of(target) in allowed, (
            f"{module} imports {target}, but backend/{room} may import only {sorted(declared(room))}")


def test_no_module_imports_itself_round_a_circle():
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in MODULES:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert circles == []


def test_the_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The walk finds lazy imports and relative ones (or the tests above prove nothing)."""
    source = "def later():\n    from ..serving import runtime\n    import orchestrator\n"
    monkeypatch.setitem(MODULES, "backend.core._probe", tmp_path / "probe.py")
    (tmp_path / "probe.py").write_text(source)
    found = imports_of("backend.core._probe")
    assert {"backend.serving.runtime", "orchestrator"} <= found
    with pytest.raises(AssertionError, match="may import only"):
        monkeypatch.setitem(GRAPH, "backend.core._probe", found - {"orchestrator"})
        test_imports_point_only_down("backend.core._probe")
