"""Activation checkpointing as a transform of the joint training graph.

A training step saves, for its backward, every forward value the backward
reads. Checkpointing a layer saves less and computes the rest again: the
layer's forward ops that produce what its backward reads are copied into
the backward, just before the first backward op that reads one of them, and
those backward reads are re-pointed at the copies. The forward values are
then freed as soon as the forward is done with them, and the copies live
only while the layer's backward runs. The planner sees the copies as
ordinary ops (placed, priced and counted in memory like any other) and the
runtime runs them: recomputation is real, not an accounting entry.

Modes (torchtitan's activation-checkpointing options):

* ``full``: each layer saves only what it reads from outside itself (its
  input, the residual stream); everything else it computes is recomputed.
* ``selective``: each layer also saves its matmul, convolution and
  attention outputs; the cheap ops between them (norms, activations,
  rotary products, residual adds, casts) are recomputed.
* ``none``: nothing is recomputed.

``auto`` is decided by the planner (`dtplan.api.plan_program`): it plans
under several of these `Remat` policies and keeps the fastest predicted
plan that fits the memory budget.

Random ops (dropout's draws) are never recomputed: their values are saved,
so the recomputed layer sees the same draws and a checked run stays exact.

A *layer* is one block of the model's repeated stack: the numbered children
of the container (``layers``, ``blocks``, ``transformer.h``, ...) with the
most numbered children among the forward ops' module paths; a model with no
such container has one layer per top-level child module. Ops outside every
layer (the embedding, the final norm, the loss) are not recomputed.
"""
from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from dtplan.ir.graph import Graph, to_ref

__all__ = ["MODES", "Remat", "RematError", "layer_of", "layers", "recomputed_originals", "remat"]

MODES = ("none", "full", "selective")
#: name suffix of a recomputed copy (the copy of `mm_3` is `mm_3_rc`)
SUFFIX = "_rc"

#: ops whose outputs `selective` saves (torchtitan's op-level policy saves
#: matmuls and attention; convolutions are the matmuls of a CNN)
_SAVED_BY_SELECTIVE = (
    "aten.mm.",
    "aten.addmm.",
    "aten.bmm.",
    "aten.baddbmm.",
    "aten._scaled_mm.",
    "aten.convolution.",
    "aten._scaled_dot_product",
    "aten.scaled_dot_product",
    "aten._flash_attention_forward.",
    "aten._efficient_attention_forward.",
)


class RematError(ValueError):
    """A remat policy that cannot be applied (unknown mode or layer)."""


@dataclass(frozen=True, slots=True)
class Remat:
    """Which layers recompute what. `layers` None: every layer."""

    mode: str = "none"
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RematError(f"remat mode {self.mode!r} is not one of {', '.join(MODES)} (or auto, when planning)")

    @classmethod
    def parse(cls, value: Remat | str | Mapping | None) -> Remat:
        if value is None or isinstance(value, Remat):
            return value or cls()
        if isinstance(value, Mapping):
            return cls.from_json(value)
        return cls(str(value))

    @property
    def active(self) -> bool:
        return self.mode != "none" and self.layers != ()

    def to_json(self) -> dict:
        """{} for none (what plan files without the field mean)."""
        if not self.active:
            return {}
        return {"mode": self.mode, **({"layers": list(self.layers)} if self.layers is not None else {})}

    @classmethod
    def from_json(cls, data: Mapping) -> Remat:
        if not data:
            return cls()
        unknown = sorted(set(data) - {"mode", "layers"})
        if unknown:
            raise RematError(f"unknown remat field(s) {unknown}; expected mode and layers")
        layers = data.get("layers")
        if layers is not None and (not isinstance(layers, (list, tuple)) or not all(isinstance(x, str) for x in layers)):
            raise RematError(f"remat layers must be a list of module paths, got {layers!r}")
        return cls(str(data.get("mode")), None if layers is None else tuple(layers))

    def __str__(self) -> str:
        if self.layers is None or not self.active:
            return self.mode
        return f"{self.mode} on {len(self.layers)} layer(s)"


def layer_of(module: str, container: str | None) -> str | None:
    """The layer a module path belongs to (None: outside every layer)."""
    if not module:
        return None
    if container is None:
        return module.split(".")[0]
    prefix = container + "." if container else ""
    if not module.startswith(prefix):
        return None
    index = module[len(prefix) :].split(".")[0]
    return prefix + index if index.isdigit() else None


def _container(modules) -> str | None:
    """The container with the most numbered children among `modules`."""
    children: dict[str, set[str]] = defaultdict(set)
    for m in modules:
        parts = m.split(".") if m else []
        for i, part in enumerate(parts):
            if part.isdigit():
                children[".".join(parts[:i])].add(part)
    best = max(children.items(), key=lambda kv: (len(kv[1]), -len(kv[0])), default=None)
    return best[0] if best and len(best[1]) >= 2 else None


def _forward(gm: torch.fx.GraphModule, updates: Mapping[str, str]) -> set[torch.fx.Node]:
    """The forward part of a joint graph: every node up to the last one the
    loss or a buffer update depends on (AOT autograd traces the whole forward
    before the backward; a forward op's extra outputs, such as a norm's saved
    statistics, sit in the forward although only the backward reads them)."""
    outs = gm.graph.output_node().args[0]
    todo = [outs[0], *(o for o in outs if isinstance(o, torch.fx.Node) and o.name in updates)]
    seen: set[torch.fx.Node] = set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    nodes = list(gm.graph.nodes)
    end = max(i for i, n in enumerate(nodes) if n in seen)
    return set(nodes[: end + 1])


def layers(graph: Graph, container: str | None = None) -> tuple[str, ...]:
    """The graph's layers in forward order (see the module docstring);
    `container` if already found (`_container`)."""
    if container is None:
        container = _container(n.module for n in graph if n.target is not None)
    out: dict[str, None] = {}
    for n in graph:
        if n.target is not None:
            layer = layer_of(n.module, container)
            if layer is not None:
                out.setdefault(layer, None)
    return tuple(out)


def _random(n: torch.fx.Node) -> bool:
    """Does the op draw random numbers? (Attention kernels are tagged so for
    their dropout; at dropout_p 0 they draw none.)"""
    if not isinstance(n.target, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded not in n.target.tags:
        return False
    for i, arg in enumerate(n.target._schema.arguments):
        if arg.name == "dropout_p":
            p = n.kwargs.get("dropout_p", n.args[i] if i < len(n.args) else arg.default_value)
            return p != 0
    return True


def _saved_by_selective(n: torch.fx.Node) -> bool:
    name = str(n.target)
    return any(name.startswith(p) for p in _SAVED_BY_SELECTIVE) and "backward" not in name


def remat(captured, policy: Remat | str | Mapping | None):
    """The captured training step with `policy`'s recomputation in its graph
    (a new `Captured`; the given one is left as it is). Node names of the
    originals do not change; a copy is named after its original with
    `SUFFIX`."""
    policy = Remat.parse(policy)
    if not captured.train:
        if policy.active:
            raise RematError("activation checkpointing applies to training steps; this capture is a forward program")
        return captured
    if not policy.active:
        return dataclasses.replace(captured, remat=policy)
    if captured.remat.active:
        raise RematError(f"the capture already recomputes ({captured.remat}); apply one policy to a fresh capture")
    graph: Graph = captured.graph
    container = _container(n.module for n in graph if n.target is not None)
    known = layers(graph, container)
    chosen = set(known if policy.layers is None else policy.layers)
    unknown = sorted(chosen - set(known))
    if unknown:
        raise RematError(f"remat layers {unknown[:3]} are not layers of this model; its layers are {list(known[:4])}{'...' if len(known) > 4 else ''}")

    gm = _copy_module(captured.gm)
    fwd = _forward(gm, captured.updates)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    layer = {n: layer_of(graph[n.name].module, container) for n in gm.graph.nodes if n.op == "call_function"}
    members: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n in fwd and layer.get(n) in chosen:
            members[layer[n]].append(n)

    copies: dict[str, str] = {}
    for name in known:
        if name not in chosen or not members[name]:
            continue
        own = set(members[name])
        kept = {n for n in own if _random(n) or (policy.mode == "selective" and _saved_by_selective(n))}
        # what leaves the layer forward (its output, the next layer's input)
        # is saved as a checkpoint's output is
        kept |= {n for n in own if any(u in fwd and u not in own for u in n.users)}
        kept |= {n for n in own if n.target is operator.getitem and n.args[0] in kept}
        # forward values of this layer that its backward (or a later layer's) reads
        readers: dict[torch.fx.Node, list[torch.fx.Node]] = {
            n: [u for u in n.users if u not in fwd] for n in own if n not in kept
        }
        readers = {n: us for n, us in readers.items() if us}
        if not readers:
            continue
        needed: set[torch.fx.Node] = set()
        todo = list(readers)
        while todo:
            n = todo.pop()
            if n in needed or n not in own or n in kept:
                continue
            needed.add(n)
            todo.extend(n.all_input_nodes)
        first = min((u for us in readers.values() for u in us), key=order.__getitem__)
        made: dict[torch.fx.Node, torch.fx.Node] = {}
        with gm.graph.inserting_before(first):
            for n in sorted(needed, key=order.__getitem__):
                new = gm.graph.create_node(
                    n.op, n.target, torch.fx.node.map_arg(n.args, lambda a: made.get(a, a)),
                    torch.fx.node.map_arg(n.kwargs, lambda a: made.get(a, a)), name=n.name + SUFFIX,
                )
                new.meta = dict(n.meta)
                made[n] = new
                copies[new.name] = n.name
        for n, us in readers.items():
            for u in us:
                u.replace_input_with(n, made[n])
    gm.graph.lint()
    gm.recompile()
    missing = [new for new, old in copies.items() if new != old + SUFFIX]
    if missing:
        raise RematError(f"recomputed copies were renamed by fx ({missing[:3]}); a node of the model already ends in {SUFFIX!r}")
    nodes = []
    for fx_node in gm.graph.nodes:
        if fx_node.op == "output":
            continue
        old = graph[copies.get(fx_node.name, fx_node.name)]
        if fx_node.op == "call_function":
            old = dataclasses.replace(
                old, name=fx_node.name, args=to_ref(tuple(fx_node.args)), kwargs=tuple((k, to_ref(v)) for k, v in fx_node.kwargs.items())
            )
        nodes.append(old)
    return dataclasses.replace(captured, gm=gm, graph=Graph(tuple(nodes), graph.outputs), remat=policy)


def _copy_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with its own copy of the graph (same attributes)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def recomputed_originals(graph: Graph | Iterable[str]) -> dict[str, str]:
    """Copy node -> the forward node it recomputes, from a graph or the node
    names of one (a plan's)."""
    names = [n if isinstance(n, str) else n.name for n in graph]
    known = set(names)
    return {n: n[: -len(SUFFIX)] for n in names if n.endswith(SUFFIX) and n[: -len(SUFFIX)] in known}
