"""The package's import graph has no circles and no arrow up.

Every ``import`` of flowrl code in ``flowrl/``, ``pipelines/`` (``flowrl.pipelines``) and
``rewards/`` (``flowrl.rewards``) is read with :mod:`ast` — at module level and inside functions,
absolute and relative; only imports under ``if TYPE_CHECKING:`` (never run) are left out. Each
module sits in one layer of :data:`LAYERS`; a module may import its own layer and the layers below,
and no two files may import each other, directly or through others. Imports done by name at run
time (``importlib.import_module("flowrl....")``, the plug-in registries' discovery) are not
arrows: they are how a lower layer finds what registers itself above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"flowrl": ROOT / "flowrl", "flowrl.pipelines": ROOT / "pipelines", "flowrl.rewards": ROOT / "rewards"}

# Lowest first. A module may import modules of its own layer and of the layers before it.
LAYERS: list[tuple[str, set[str]]] = [
    # kernels and the policy interface: math, seeds, sharding, paths, media, trackers, prompt files
    ("kernels", {
        "flowrl.errors", "flowrl.registry", "flowrl.seeding", "flowrl.sde", "flowrl.policy", "flowrl.sharding",
        "flowrl.ema", "flowrl.paths", "flowrl.safeload", "flowrl.media", "flowrl.tracking", "flowrl.overlap",
        "flowrl.digits_data", "flowrl.prompts", "flowrl.answers", "flowrl.normalization", "flowrl.devices",
        "flowrl.secrets", "flowrl.atomic", "flowrl.preflight", "flowrl.preemption",
    }),
    # the registries components plug into
    ("plugs", {"flowrl.plugins"}),
    # methods: advantages, losses, objectives, rollout schedules, presets
    ("methods", {
        "flowrl.advantages", "flowrl.losses", "flowrl.objectives", "flowrl.care", "flowrl.nft", "flowrl.matching", "flowrl.reference", "flowrl.gardo", "flowrl.trpa", "flowrl.tree",
        "flowrl.co_grpo", "flowrl.trust_region", "flowrl.rollout", "flowrl.prompt_selection", "flowrl.algorithms",
    }),
    # model adapters and reward models
    ("adapters", {"flowrl.pipelines", "flowrl.pipelines.*", "flowrl.rewards", "flowrl.rewards.*"}),
    # the loop: configs, builders, the trainer and its parts
    ("loop", {
        "flowrl.config", "flowrl.builders", "flowrl.trainer", "flowrl.distributed", "flowrl.estimation",
        "flowrl.evaluation", "flowrl.reporting", "flowrl.checkpointing", "flowrl.track", "flowrl.rules",
    }),
    # the face: command line, run inspection, the gallery, the digits pretraining script
    ("face", {"flowrl", "flowrl.__main__", "flowrl.cli", "flowrl.gallery", "flowrl.runs", "flowrl.pretrain_digits", "flowrl.testing", "flowrl.benchmarks", "flowrl.export"}),
]


def layer_of(module: str, layers: list[tuple[str, set[str]]] = LAYERS) -> int:
    """Index of ``module``'s layer (exact names first, then ``package.*`` patterns)."""
    for i, (_, names) in enumerate(layers):
        if module in names:
            return i
    for i, (_, names) in enumerate(layers):
        if any(n.endswith(".*") and module.startswith(n[:-1]) for n in names):
            return i
    raise KeyError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")


def _module_files() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The flowrl modules ``tree`` imports (names resolved to modules where they are modules)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in known:  # ``flowrl.x.Name`` -> ``flowrl.x``
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "flowrl" or alias.name.startswith("flowrl."):
                    found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "flowrl" or target.startswith("flowrl."):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in known else resolve(target))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(None)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = _module_files()
    known = set(files)
    return {m: _imports(ast.parse(p.read_text(), str(p)), m, p.stem == "__init__", known) for m, p in files.items()}


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, set[str]]] = LAYERS) -> list[str]:
    out = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            if layer_of(dst, layers) > layer_of(src, layers):
                out.append(f"{src} ({layers[layer_of(src, layers)][0]}) imports {dst} ({layers[layer_of(dst, layers)][0]})")
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


# ------------------------------------------------------------------------------------ the package
def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_the_graph_reads_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "flowrl.errors" in graph["flowrl.rewards.base"] or "flowrl.registry" in graph["flowrl.rewards.base"]
    assert "flowrl.rewards.base" in graph["flowrl.rewards"]  # ``from .base import ...``
    assert "flowrl.pipelines.flow_policy" in graph["flowrl.builders"]  # inside build_flow_policy


def test_no_import_points_up():
    assert upward_imports(import_graph()) == []


def test_no_circles_between_files():
    assert circles(import_graph()) == []


# --------------------------------------------------------------------------- the checks themselves
TOY_LAYERS = [("low", {"pkg.a", "pkg.b"}), ("high", {"pkg.c", "pkg.sub.*"})]


def _toy(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    known = set(files)
    graph = {}
    for name, text in files.items():
        path = tmp_path / (name.replace(".", "_") + ".py")
        path.write_text(text)
        graph[name] = _imports(ast.parse(path.read_text()), name, False, known)
    return {k: {d.replace("flowrl", "pkg", 1) for d in v} for k, v in graph.items()}


def test_a_planted_upward_import_inside_a_function_fails(tmp_path):
    files = {
        "flowrl.a": "import torch\n",
        "flowrl.b": "from flowrl.a import x\n\ndef f():\n    from flowrl.sub.d import y\n    return y\n",
        "flowrl.c": "from flowrl import a, b\n",
        "flowrl.sub.d": "from . import e\n",
        "flowrl.sub.e": "",
    }
    graph = {k.replace("flowrl", "pkg", 1): v for k, v in _toy(tmp_path, files).items()}
    assert graph["pkg.sub.d"] == {"pkg.sub.e"}  # relative import resolved
    assert graph["pkg.c"] == {"pkg.a", "pkg.b"}  # ``from package import module``
    assert upward_imports(graph, TOY_LAYERS) == ["pkg.b (low) imports pkg.sub.d (high)"]


def test_a_planted_circle_fails_and_type_checking_imports_do_not_count(tmp_path):
    files = {
        "flowrl.a": "from flowrl.b import x\n",
        "flowrl.b": "def f():\n    import flowrl.c\n",
        "flowrl.c": "from flowrl.a import z\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from flowrl.b import w\n",
    }
    graph = {k.replace("flowrl", "pkg", 1): v for k, v in _toy(tmp_path, files).items()}
    assert graph["pkg.c"] == {"pkg.a"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert circles({"pkg.a": {"pkg.b"}, "pkg.b": set()}) == []
    with pytest.raises(KeyError, match="no layer"):
        layer_of("pkg.zzz", TOY_LAYERS)
