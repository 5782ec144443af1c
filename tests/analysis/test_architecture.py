"""The shape of the tree: no import cycle among the project's modules (imports inside
functions included: a lazy import still ties two modules together), no module importing
another's private name, and ``python -m analysis`` a thin entry point."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

from analysis.specs import MODULES

PACKAGES = ("analysis", "kernels", "ui")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module -> project modules it imports, [(module, private name it imports from another)])."""
    graph, private = {m: set() for m in mods}, []
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                    if target in mods and target != m:
                        graph[m].add(target)
                    if (alias.name.startswith("_") and not alias.name.startswith("__")
                            and base.split(".")[0] in PACKAGES):
                        private.append((m, f"{base}.{alias.name}"))
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return graph, private


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search with colours)."""
    colour, path = {}, []

    def visit(v):
        colour[v] = "grey"
        path.append(v)
        for w in sorted(graph[v]):
            if colour.get(w) == "grey":
                return path[path.index(w):] + [w]
            if w not in colour:
                found = visit(w)
                if found:
                    return found
        colour[v] = "black"
        path.pop()
        return None

    for v in sorted(graph):
        if v not in colour:
            found = visit(v)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph, _ = _imports(_modules())
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_imports_across_modules():
    _, private = _imports(_modules())
    assert private == [], private


def test_main_is_a_thin_entry_point():
    text = (ROOT / "analysis" / "__main__.py").read_text()
    assert len(text.splitlines()) <= 10 and "from analysis.cli import main" in text


# The layers, bottom to top (the specs' framework and registry beside the jobs that run them, each
# analysis's spec above everything it runs): a module imports only from its own layer or the layers below. A module
# belongs to the longest prefix listed (``analysis.families.demo_task`` is the task the selectors'
# calibration and the trainer read; the rest of ``analysis.families`` builds checkpoints by training).
LAYERS = (
    ("kernels",),
    ("analysis", "analysis.errors", "analysis.paths", "analysis.definitions", "analysis.io", "analysis.training",
     "analysis.attribution.options", "analysis.jobs.progress", "analysis.jobs.process"),
    ("analysis.checkpoints", "analysis.families.demo_task"),
    ("analysis.sparsity", "analysis.jobs", "analysis.specs"),
    ("analysis.attribution",),
    ("analysis.importance",),
    ("analysis.behaviour",),
    ("analysis.finetune",),
    ("analysis.families", "analysis.jobs.queue", *MODULES.values()),
    ("analysis.cli", "analysis.__main__"),
    ("ui",),
    ("app_pages", "app"),
)


def layer_of(module: str) -> int:
    best = max(((len(p), i) for i, names in enumerate(LAYERS) for p in names
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module}: in no layer of LAYERS"
    return best[1]


def test_imports_only_go_down_the_layers():
    graph, _ = _imports(_modules())
    up = [f"{a} -> {b}" for a, bs in graph.items() for b in bs if layer_of(b) > layer_of(a)]
    assert up == []


def test_the_layer_checker_finds_an_upward_import():
    assert layer_of("analysis.sparsity.diff") < layer_of("analysis.importance.scores") < layer_of("ui.work")
    assert layer_of("analysis.families.demo_task") < layer_of("analysis.importance.calibration") \
        < layer_of("analysis.families.demo")
    graph = {"analysis.checkpoints.open": {"analysis.sparsity.diff"}}
    assert [f"{a} -> {b}" for a, bs in graph.items() for b in bs if layer_of(b) > layer_of(a)] != []


def test_the_folders_are_the_layers():
    """Every module of analysis/ lies in a group's folder, but the foundation's few modules."""
    flat = sorted(p.name for p in (ROOT / "analysis").glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "definitions.py", "errors.py", "io.py", "paths.py", "training.py"]


# methods only a tensor (or an array) has: a page that calls them does tensor math
TENSOR_METHODS = {"numel", "float", "item", "tolist", "detach", "any", "all", "nonzero", "count_nonzero", "abs",
                  "cpu", "cuda", "view", "reshape", "flatten", "topk", "argsort", "bool", "norm", "svd"}


def _page_sources():
    return sorted([*(ROOT / "app_pages").glob("*.py"), *(ROOT / "ui").glob("*.py"), ROOT / "app.py"])


def test_pages_hold_no_tensor_code():
    """Pages and UI glue call analysis/; torch, numpy, kernels and tensor math stay there."""
    found = []
    for p in _page_sources():
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{p.name}: import {n}" for n in names if n.split(".")[0] in ("torch", "numpy", "kernels")]
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in TENSOR_METHODS):
                found.append(f"{p.name}:{node.lineno}: .{node.func.attr}()")
    assert found == []


def test_the_tensor_math_checker_sees_a_method_call():
    tree = ast.parse("n = int(m.sum()) + m.numel()")
    calls = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert set(calls) & TENSOR_METHODS == {"numel"}


def test_text_cites_only_what_the_repository_holds():
    """Code, pages, tests and docs cite docs/design.md or the papers, never the design notes outside
    the repository, and no issue tracker numbers (a reader of the repository has neither)."""
    import re
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    bad = []
    for name in tracked:
        if name.startswith("bench/RESULTS") or not (ROOT / name).is_file():
            continue  # the benchmark log records the history it measured
        text = (ROOT / name).read_text(encoding="utf-8")
        for pattern in (r"shared/(DESIGN|STYLE)\.md", r"(?<![/\w])DESIGN\.md", r"\b[Ii]ssue \d+"):
            bad += [f"{name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert bad == []
    cited = {int(n) for n in re.findall(r"docs/design\.md §(\d+)", " ".join(
        (ROOT / n).read_text(encoding="utf-8") for n in tracked if (ROOT / n).is_file()))}
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert cited and all(f"## {n}." in design for n in cited), cited  # every cited section exists


def test_the_papers_tolerance_is_written_once():
    """τ = 1e-5 is analysis.definitions.PAPER_TOL everywhere else: no float constant 1e-5 and no text
    "1e-5" in analysis/, app_pages/ or ui/ but its definition (learning rates, keyword `lr`, aside)."""
    files = sorted([*(ROOT / "analysis").rglob("*.py"), *(ROOT / "app_pages").glob("*.py"),
                    *(ROOT / "ui").glob("*.py")])
    found = []
    for p in files:
        tree = ast.parse(p.read_text())
        lrs = set()
        for node in ast.walk(tree):  # lr=1e-5 and {"lr": 1e-5} are learning rates, not τ
            if isinstance(node, ast.keyword) and node.arg == "lr":
                lrs.add(id(node.value))
            if isinstance(node, ast.Dict):
                lrs |= {id(v) for k, v in zip(node.keys, node.values)
                        if isinstance(k, ast.Constant) and k.value == "lr"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in lrs and (
                    (type(node.value) is float and node.value == 1e-5)
                    or (isinstance(node.value, str) and ("1e-5" in node.value or "1e-05" in node.value))):
                found.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert [f.split(":")[0] for f in found] == ["analysis/definitions.py"], found  # PAPER_TOL = 1e-5


def test_granularities_and_budgets_are_defined_once():
    """The tuples of analysis.definitions are the only spelled-out lists of them."""
    import re

    files = sorted([*(ROOT / "analysis").rglob("*.py"), *(ROOT / "app_pages").glob("*.py"),
                    *(ROOT / "ui").glob("*.py")])
    spelled = {"granularities": r'"element",\s*"row",\s*"head",\s*"channel",\s*"layer"',
               "budgets": r'"global",\s*"per_layer",\s*"structured"'}
    for what, pattern in spelled.items():
        hits = [str(p.relative_to(ROOT)) for p in files if re.search(pattern, p.read_text())]
        assert hits == ["analysis/definitions.py"], (what, hits)
