"""MkDocs hook: the settings and API reference pages, generated from the code so they cannot drift.

- ``<!-- generated: settings -->``: every environment variable the settings objects read
  (``backend/core/settings.py``, ``orchestrator/settings.py``), with its default as the code has it.
  A variable the code reads that the page's tables do not describe, or one they describe that the code
  does not read, is a warning, which ``mkdocs build --strict`` (``make docs``, CI) turns into a failure.
- ``<!-- generated: routes -->``: every route of the backend and the orchestrator, from their
  blueprints, with the first line of its handler's docstring.

It reads the source with ``ast`` and imports nothing, so the docs build needs no model, server or GPU.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_SOURCES = {"backend": ROOT / "backend/core/settings.py", "orchestrator": ROOT / "orchestrator/settings.py"}
ROUTE_SOURCES = {
    "backend": [ROOT / "backend/web/api.py", ROOT / "backend/antenna/routes.py"],
    "orchestrator": [ROOT / "orchestrator/api.py", ROOT / "orchestrator/antenna.py"],
}
READERS = {"env_int", "env_float", "env_switch", "env_megabytes", "env_bytes"}
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]+$")
log = logging.getLogger("mkdocs.plugins.generate")


def environment_variables(path: Path) -> dict[str, str]:
    """{variable: its default as written in the code ("" where it has none)} of one settings module."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name, default = _read(node, parents)
        if name and ENV_NAME.match(name):
            found.setdefault(name, default)
    return found


def _read(call: ast.Call, parents: dict[ast.AST, ast.AST]) -> tuple[str, str]:
    """(variable, default) when ``call`` reads one: ``env_int(env, "X", 3)``, ``env.get("X", d)``, ``env.get("X") or d``."""
    func = call.func
    literal = lambda n: n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) else ""
    if isinstance(func, ast.Name) and func.id in READERS and len(call.args) >= 3:
        return literal(call.args[1]), ast.unparse(call.args[2])
    if isinstance(func, ast.Attribute) and func.attr == "get" and call.args and ast.unparse(func.value) in ("env", "os.environ"):
        if len(call.args) > 1:
            return literal(call.args[0]), ast.unparse(call.args[1])
        parent = parents.get(call)
        if isinstance(parent, ast.BoolOp) and isinstance(parent.op, ast.Or) and parent.values[0] is call:
            return literal(call.args[0]), ast.unparse(parent.values[1])
        return literal(call.args[0]), ""
    return "", ""


def routes(paths: list[Path]) -> list[tuple[str, str, str, str]]:
    """(methods, path, handler, first line of its docstring) of every route decorator in these modules."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text())
        constants = _constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            doc = (ast.get_docstring(node) or "").strip().split("\n\n")[0].replace("\n", " ")
            for decorator in node.decorator_list:
                if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute) and decorator.args):
                    continue
                verb = decorator.func.attr
                if verb not in ("get", "post", "put", "patch", "delete", "route"):
                    continue
                first = decorator.args[0]
                rule = first.value if isinstance(first, ast.Constant) else _evaluate(first, constants)
                methods = verb.upper()
                for keyword in decorator.keywords:
                    if keyword.arg == "methods":
                        methods = ", ".join(ast.literal_eval(keyword.value))
                found.append((methods, str(rule), f"{path.relative_to(ROOT)}:{node.name}", doc))
    return found


def _constants(tree: ast.Module) -> dict[str, object]:
    """The module's literal constants (``LABEL_STUDIO_ROUTES = ("health", ...)``), which route f-strings use."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return found


def _evaluate(expression: ast.expr, constants: dict[str, object]) -> str:
    """A route built from constants (an f-string of this project's own source), as Flask sees it."""
    try:
        return str(eval(compile(ast.Expression(expression), "<route>", "eval"), {"__builtins__": {}}, constants))
    except Exception:  # noqa: BLE001 - anything else is shown as written
        return ast.unparse(expression)


def described(markdown: str) -> set[str]:
    """The variables the page's hand-written tables describe (the backquoted names of each row's first cell)."""
    names = set()
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("| ---"):
            first = line.split("|")[1]
            names |= {n for n in re.findall(r"`([A-Z][A-Z0-9_]+)`", first)}
    return names


def settings_page(markdown: str, page_path: str) -> str:
    tables, every = [], set()
    for component, path in SETTINGS_SOURCES.items():
        variables = environment_variables(path)
        every |= set(variables)
        rows = "\n".join(f"| `{name}` | `{default}` |" if default else f"| `{name}` | |"
                         for name, default in sorted(variables.items()))
        tables.append(f"### Read by the {component} (`{path.relative_to(ROOT)}`)\n\n| variable | default in the code |\n"
                      f"| --- | --- |\n{rows}\n")
    hand = described(markdown)
    for name in sorted(every - hand):
        log.warning("%s: %s is read by the code but not described on this page", page_path, name)
    for name in sorted(n for n in hand - every if not n.startswith("MLFLOW_")):  # MLflow reads its own
        log.warning("%s: %s is described on this page but no settings object reads it", page_path, name)
    return markdown.replace("<!-- generated: settings -->", "\n".join(tables))


def routes_page(markdown: str) -> str:
    tables = []
    for component, paths in ROUTE_SOURCES.items():
        rows = "\n".join(f"| {methods} | `{rule}` | {doc} | `{handler}` |"
                         for methods, rule, handler, doc in routes(paths))
        tables.append(f"### The {component}'s routes\n\n| method | path | what it does | handler |\n"
                      f"| --- | --- | --- | --- |\n{rows}\n")
    return markdown.replace("<!-- generated: routes -->", "\n".join(tables))


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- generated: settings -->" in markdown:
        markdown = settings_page(markdown, page.file.src_path)
    if "<!-- generated: routes -->" in markdown:
        markdown = routes_page(markdown)
    return markdown
