"""Imports run one way: every module sits on a floor and imports only from its floor or below, and no module
imports, even inside a function, a module that imports it back. docs/walkthrough.md draws the house. And
every line of code fits 110 columns."""
import ast
import shutil
import subprocess

import pytest

from conftest import ROOT

FLOORS = {  # what each floor knows; a new module is placed here by what it is
    # math, data, ranks; world names
    0: ("loss", "plumbing", "plumbing.loss_fused", "plumbing.data", "plumbing.distributed", "plumbing.ema",
        "plots", "worlds"),
    # contexts, loading, runs
    1: ("rollout", "plumbing.models", "plumbing.config", "plumbing.checkpoints", "plumbing.adapters",
        "plumbing.trackers", "plumbing.grading", "plumbing.guards"),
    2: ("engines", "engines.sampling", "engines.hf", "engines.graph", "engines.vllm_engine",
        "engines.server_pool", "engines.client", "engines.ahead"),
    # benchmarks; worlds sample
    3: ("eval", "plumbing.remote", "worlds.common", "worlds.toyworld", "worlds.carryworld",
        "worlds.habitworld", "worlds.legendworld"),
    4: ("popsd", "plumbing.session"),  # the algorithm's loop and the run around it
    # the worlds' command line, what it measures of students, the per-token view: drive popsd
    5: ("compare", "measure", "explain"),
}
FLOOR = {name: floor for floor, names in FLOORS.items() for name in names}


def project_modules() -> dict:
    files = [*ROOT.glob("*.py"), *(ROOT / "worlds").glob("*.py"), *(ROOT / "engines").glob("*.py"),
             *(ROOT / "plumbing").glob("*.py")]
    return {(f"{p.parent.name}.{p.stem}" if p.parent != ROOT else p.stem).replace(".__init__", ""): p
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


def test_every_module_has_a_floor_and_no_import_goes_up():
    modules = project_modules()
    assert sorted(modules) == sorted(FLOOR), "place each module on a floor (FLOORS)"
    for name, path in modules.items():
        for other in imports_of(path, modules) - {name}:
            assert FLOOR[other] <= FLOOR[name], (f"{name} (floor {FLOOR[name]}) imports {other} "
                                                 f"({FLOOR[other]})")


def test_the_import_graph_has_no_circle():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    # worlds are looked up by name
    assert "worlds" not in graph["plumbing.grading"] and "worlds" in graph["eval"]
    for name in graph:
        if name.startswith("worlds"):
            # a world knows none
            assert not graph[name] & {"popsd", "eval", "compare", "plumbing.grading", "plots"}, name
        if name.startswith("engines"):
            # nor an engine the run's plumbing
            assert not graph[name] & {"popsd", "plumbing.session", "plumbing.guards", "eval"}, name
    assert "loss" in graph["plumbing.loss_fused"] and "plumbing.loss_fused" not in graph["loss"]
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


def test_every_line_of_code_fits_110_columns():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git checkout: the tracked files are the code")
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.sh", ".ci/run"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    long = [f"{name}:{i}" for name in tracked
            for i, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > 110]
    assert len(tracked) > 50 and not long, long
