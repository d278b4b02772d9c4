"""The package's layers point one way (docs/architecture.md, "Layers"): a module imports only from
its own layer or below, raydpo's own imports sit at the top of modules, and there is no import cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "raydpo"

# Lowest first. A module belongs to the first layer whose prefix names it or its package.
LAYERS = [
    ("foundation", ["raydpo", "raydpo.errors", "raydpo.reporting", "raydpo.redact"]),
    ("maths", ["raydpo.losses", "raydpo.ops"]),
    ("config", ["raydpo.config"]),
    ("data, models, tracking", ["raydpo.data", "raydpo.models", "raydpo.tracking"]),
    ("engine", ["raydpo.engine"]),
    ("methods", ["raydpo.methods"]),
    ("applications", ["raydpo.sweep", "raydpo.evaluate", "raydpo.tasks", "raydpo.cluster"]),
    ("entry points", ["raydpo.demo", "raydpo.cli", "raydpo.__main__"]),
]
DEFERRED_OK = {
    "raydpo.cli",  # each verb imports its module when it runs (`raydpo --help` stays fast)
    "raydpo.config",  # LOSSES (torch) only when loss names are checked: a misspelt key is reported at once
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer(name: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (name == pre or name.startswith(pre + ".")) and (best is None or len(pre) > len(best[1])):
                best = (i, pre)
    assert best is not None, f"{name} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def imports(name: str) -> list[tuple[str, bool]]:
    """(imported raydpo module, at module top level?) for every raydpo import in `name`."""
    tree = ast.parse(MODULES[name].read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raydpo"):
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names]  # fmt: skip
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("raydpo")]
        else:
            continue
        out += [(t, id(node) in top) for t in targets if t in MODULES]
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_is_in_a_layer():
    for m in MODULES:
        layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_sit_at_the_top(module):
    for target, at_top in GRAPH[module]:
        assert layer(target) <= layer(module), (
            f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]}), higher up"
        )
        assert at_top or module in DEFERRED_OK, f"{module} imports {target} inside a function"


def test_no_import_cycles():
    edges = {m: {t for t, _ in GRAPH[m] if t != m} for m in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation():
    """The walker must catch an upward import and a cycle, or the tests above prove nothing."""
    assert layer("raydpo.engine.loop") > layer("raydpo.models.loading")
    assert ("raydpo.engine.loop", True) in GRAPH["raydpo.engine.local"]
    assert any(not top for _, top in GRAPH["raydpo.cli"])  # cli's deferred imports are seen as such
