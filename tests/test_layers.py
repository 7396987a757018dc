"""The package's import layers: each folder (or top-level module) imports only from lower layers,
and no module imports itself back through others (no cycles, function-level imports included)."""
import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. An import may go to its own group or to any group of a lower layer.
LAYERS = (
    ("errors", "files", "host", "loss", "sharding"),  # no hbpo_jax imports but errors
    ("models", "objectives", "config", "workdir"),
    ("checkpoint", "rollout", "data", "grading"),
    ("cli", "spec", "policy"),
    ("tasks",),
    ("eval",),
    ("train",),
    ("plan",),
    ("bench",),  # timed benchmarks (the TPU probe sets its times against the plan)
    ("scripts",),  # the launchers' code
)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in (ROOT / "hbpo_jax").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules) -> dict[str, set[str]]:
    """module -> the hbpo_jax modules it imports (at any depth of its code)."""
    edges = collections.defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hbpo_jax"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges[name].add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name.startswith("hbpo_jax"))
    return edges


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hbpo_jax"


def test_every_import_goes_down_the_layers():
    modules = _modules()
    layer = {g: i for i, groups in enumerate(LAYERS) for g in groups}
    groups = {_group(m) for m in modules} - {"hbpo_jax"}
    assert groups <= set(layer), f"put {sorted(groups - set(layer))} in LAYERS"
    upward = [f"{a} -> {b}" for a, bs in _imports(modules).items() for b in bs
              if _group(a) != _group(b) and _group(a) in layer and layer[_group(b)] >= layer[_group(a)]]
    assert not upward, upward


def test_no_import_cycles():
    modules = _modules()
    edges = _imports(modules)
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if n not in modules:
                continue
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n):] + [m, n]))
            elif n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles


def test_the_top_of_the_package_stays_small():
    top = sorted(p.stem for p in (ROOT / "hbpo_jax").glob("*.py") if p.stem != "__init__")
    assert len(top) <= 12, top
