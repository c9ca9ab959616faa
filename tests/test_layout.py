"""Imports run one way: no module imports, even inside a function, a module that imports it back."""
import ast

from conftest import ROOT


def project_modules() -> dict:
    files = [*ROOT.glob("*.py"), *(ROOT / "worlds").glob("*.py")]
    return {(f"worlds.{p.stem}" if p.parent.name == "worlds" else p.stem).replace(".__init__", ""): p
            for p in files}


def imports_of(path, known) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # every import, at the top or inside a function
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def test_the_import_graph_has_no_circle():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert "toyworld" not in graph["grading"] and "worlds" in graph["grading"]  # worlds are looked up by name
    for name in graph:
        if name.startswith("worlds"):
            assert not graph[name] & {"popsd", "eval", "compare", "grading", "plots"}, name  # a world knows none
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            raise AssertionError("import circle: " + " → ".join(path[path.index(node):] + [node]))
        if state.get(node) == "done":
            return
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        state[node] = "done"
    for name in sorted(graph):
        visit(name, [])
