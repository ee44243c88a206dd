"""The import graph of src/sftlab: no circles, and no arrow from a lower layer to a higher one.

Layers, low to high (a module may import its own layer and those below; lazy imports inside functions count):
each entry is a module or a package prefix. Moving a module up or down is a design decision: change LAYERS here
on purpose, never to make this test pass.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "src" / "sftlab"

LAYERS = [
    # leaves
    ["sftlab.strict", "sftlab.gemm", "sftlab.errors", "sftlab.threads", "sftlab.files", "sftlab.scores"],
    ["sftlab.quant"],  # quantised frozen weights (QLoRA): LoRA wraps them, models loads into them
    ["sftlab.data", "sftlab.methods", "sftlab.models", "sftlab.convert"],  # what a run is made of
    ["sftlab.config"],  # the run config (knows the methods' configs)
    ["sftlab.train", "sftlab.generate", "sftlab.demo_model"],  # the loop; building the demo model
    ["sftlab.hub"],  # user-facing model names (aliases) -> models
    [
        "sftlab.runs",
        "sftlab.rundir",
        "sftlab.merged",
    ],  # run directories: save final/, load or merge a run, who owns one
    ["sftlab.eval", "sftlab.recipe"],  # evaluation of a model; the train recipe
    [
        "sftlab.selftrain"
    ],  # self-training rounds (teacher -> pseudo-labels -> student), each a run of the recipe
    ["sftlab.quickstart", "sftlab.pipeline", "sftlab.plan"],  # quickstart; stages of runs; the planner
    ["sftlab.ui"],  # the web page over the commands' library code and subprocesses
    ["sftlab.cli", "sftlab.__main__"],  # commands; `python -m sftlab` (what torchrun starts)
]


def _module(path: Path) -> str:
    parts = ("sftlab",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> sftlab modules it imports (package imports of submodules resolved to the submodule)."""
    known = {_module(p) for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        mod = _module(path)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out: set[str] = set()
        tree = ast.parse(path.read_text())
        typing_only = {  # `if TYPE_CHECKING:` imports are annotations, not runtime arrows
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith("sftlab")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("sftlab"):
                    continue
                subs = {f"{target}.{a.name}" for a in node.names} & known
                out |= subs or {target}
        graph[mod] = out - {mod}
    return graph


def _rank(mod: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if mod == prefix or mod.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None or mod == "sftlab", f"{mod} is in no layer: add it to LAYERS"
    return best[0] if best else len(LAYERS)


def test_no_arrow_points_up():
    bad = [
        f"{a} (layer {_rank(a)}) imports {b} (layer {_rank(b)})"
        for a, bs in sorted(_imports().items())
        for b in sorted(bs)
        if b != "sftlab" and _rank(b) > _rank(a)
    ]
    assert not bad, "\n".join(bad)


def test_train_does_not_import_eval_and_models_never_reach_the_quickstart():
    graph = _imports()
    for mod, targets in graph.items():
        if mod.startswith("sftlab.train"):
            assert not any(t.startswith("sftlab.eval") for t in targets), mod
        if mod == "sftlab.models":
            assert not any(t.startswith(("sftlab.quickstart", "sftlab.hub")) for t in targets), targets


def test_no_import_circles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [mod])


def test_no_two_top_level_parts_import_each_other():
    """At package granularity too (sftlab.X and sftlab.Y): one direction only."""

    def top(mod: str) -> str:
        return ".".join(mod.split(".")[:2])

    arrows = {
        (top(a), top(b)) for a, bs in _imports().items() for b in bs if top(a) != top(b) and b != "sftlab"
    }
    both = sorted(f"{a} <-> {b}" for a, b in arrows if (b, a) in arrows and a < b)
    assert not both, both
