"""The shape of the code: one import root, dependencies that point down the
layers, no import cycle, and private torch APIs only in named adapters.

Reads the source (every import, at module level or inside a function), so it
sees what a lazy import would hide. docs/architecture.md draws the layers
and lists the adapters; keep the three in step.
"""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: installed name -> folder (pyproject's package-dir)
PACKAGES = {"dtplan": ROOT / "dtplan", "dtplan.ir": ROOT / "ir", "dtplan.planner": ROOT / "planner", "dtplan.runtime": ROOT / "runtime"}

#: lowest first: a module may import its own layer and those below it
LAYERS = [
    "dtplan.ir",
    "dtplan.planner.mesh",
    "dtplan.planner.space",
    "dtplan.planner.cost",
    "dtplan.planner.reduce",
    "dtplan.planner.evaluate",
    "dtplan.planner.solver",
    "dtplan.planner.output",
    "dtplan.planner",
    "dtplan.runtime",
    "dtplan",  # the API, the CLI and the model-file checks
]

#: the modules that may use private torch APIs (docs/architecture.md, "Adapters")
ADAPTERS = {
    "dtplan.ir.capture",  # torch.export's program, AOT autograd's joint trace, fake tensor modes
    "dtplan.ir.decompose",  # torch._decomp's decomposition table
    "dtplan.planner.space._dtensor",  # DTensor's strategies, specs and redistribute planner
    "dtplan.runtime.replay",  # make_fx fragment replay: dispatch-mode and lazy-graph-module internals
    "dtplan.runtime._fake",  # the fake process group (torch.testing._internal)
    "dtplan.runtime.gloo",  # gloo's base all-gather under the functional collectives' work registry
}
#: underscored torch modules that torch documents as their API: allowed anywhere
DOCUMENTED = {
    "torch.utils._pytree",  # pytree, what torch.export's output specs are made of
    "torch.utils._python_dispatch",  # TorchDispatchMode, the documented base of dispatch modes
    "torch._logging",  # torch._logging.set_logs, documented in torch's logging docs
    "torch._ops",  # OpOverload: the type of torch.ops.aten.<op>.<overload>
    "torch.distributed._functional_collectives",  # functional collectives, what fx graphs record
}


def _modules() -> dict[str, Path]:
    out = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if path.is_symlink():
                continue
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    out["dtplan.cli"] = ROOT / "cli.py"
    return out


def _imports(path: Path, name: str) -> set[str]:
    """Every module `name` imports (absolute names; `from a import b` counts
    as a.b when a.b is a module, else as a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(name.split(".")[: -node.level] + [node.module])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _layer(module: str) -> int:
    """Index of the most specific layer holding `module`."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS.index(best)


def test_one_import_root_is_installed():
    # from outside the repository (no checkout folder on sys.path)
    probe = "import importlib.util as u, dtplan, dtplan.planner, dtplan.cli; print([n for n in ('planner', 'runtime', 'ir', 'cli') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_imports_point_down_the_layers_without_cycles():
    mods = _modules()
    graph: dict[str, set[str]] = {}
    upward = []
    for name, path in mods.items():
        deps = {d for d in _imports(path, name) if d in mods and d != name}
        # a package's __init__ importing its own modules is not a dependency on itself
        deps = {d for d in deps if not (path.name == "__init__.py" and d.startswith(name + "."))}
        graph[name] = deps
        upward += [f"{name} -> {d}" for d in deps if name != "dtplan" and _layer(d) > _layer(name)]
    assert upward == []
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    # nothing imports the old top-level names
    stray = sorted(f"{n}: {d}" for n, p in mods.items() for d in _imports(p, n) if d.split(".")[0] in ("ir", "planner", "runtime", "cli"))
    assert stray == []


def test_private_torch_apis_only_in_adapters():
    def private(dotted: str) -> bool:
        parts = dotted.split(".")
        if parts[0] != "torch" or any(dotted == d or dotted.startswith(d + ".") for d in DOCUMENTED):
            return False
        return parts[1:2] != ["ops"] and any(p.startswith("_") and not p.startswith("__") for p in parts[1:])

    found = []
    for name, path in _modules().items():
        if name in ADAPTERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [f"{name}: import {a.name}" for a in node.names if private(a.name)]
            elif isinstance(node, ast.ImportFrom) and node.module:
                found += [f"{name}: from {node.module} import {a.name}" for a in node.names if private(f"{node.module}.{a.name}")]
            elif isinstance(node, ast.Attribute):
                chain, x = [], node
                while isinstance(x, ast.Attribute):
                    chain.append(x.attr)
                    x = x.value
                if isinstance(x, ast.Name) and x.id == "torch" and private(".".join(["torch", *reversed(chain)])):
                    found.append(f"{name}: torch.{'.'.join(reversed(chain))}")
    assert sorted(set(found)) == []


def test_every_adapter_exists_and_is_named_in_the_architecture_doc():
    mods, doc = _modules(), (ROOT / "docs" / "architecture.md").read_text()
    for name in ADAPTERS:
        assert name in mods, name
        assert f"`{name}`" in doc, f"docs/architecture.md does not name the adapter {name}"
