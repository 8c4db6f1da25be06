"""Fragment replay for `make_fx`: the runtime's adapter over private torch.

What it caches. Lowering (`dtplan.runtime.lower`) traces one call per op of
the captured graph under `make_fx`; each call appends a *fragment* of local
ATen ops and collectives to the traced graph. `Fragments` remembers, per key
(everything the traced fragment depends on: the op, its non-tensor
arguments, every input's DTensor spec and local layout, which inputs alias,
and what the caller adds), the nodes the call appended and how its result
was built from them. A later call with the same key is *replayed*: those
nodes are copied with the call's own inputs, and nothing is traced.

Why. A deep model lowers the same op on the same shapes and placements
layer after layer. Tracing a call costs DTensor dispatch, sharding
propagation and fake-tensor propagation per local op; replaying it costs a
node copy per local op. The replayed nodes are what tracing would have
appended, so the module is the same, node for node (a test lowers with
`Fragments.enabled = False` and compares the code). A fragment's nodes are
found as those appended after the graph's last node before the call
(public `reversed(graph.nodes)`, not `Graph._root`). A replayed result stays
a `Lazy` value (its node, local layout and spec) until a call that is really
traced reads it (`Fragments.real`). This module knows nothing of plans.

The runtime's private-torch adapter (the planner's is
`dtplan.planner.space._dtensor`): every private torch API the runtime's
lowering uses is here, so a torch upgrade touches this file (and
`dtplan.runtime._fake`, the fake process group of abstract lowering) only.

- `torch.fx._lazy_graph_module._use_lazy_graph_module` and
  `_LazyGraphModule.real_recompile` (`trace_lazily`, `generate_code`): the
  traced module generates its Python code once, after the stored tensors
  are attached, instead of once after tracing and again after attaching
  (one generation is about a quarter of the lowering time of the 32-layer
  Llama-3-8B training step).
- `torch.fx.experimental.proxy_tensor.get_proxy_mode`, `get_proxy_slot`,
  `track_tensor` (make_fx's tracer internals): the graph node of a traced
  tensor (to record and rewire a fragment), and tying a fresh FakeTensor to
  a replayed node so that a later traced call reads it.
- `torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)`,
  `FakeTensorMode.fake_tensor_converter.from_meta_and_device`,
  `torch._C._DisableTorchDispatch`, `torch._C.DisableTorchFunction`: a
  FakeTensor of a recorded layout made in make_fx's fake mode without being
  traced; layouts read without make_fx's torch-function mode seeing every
  attribute read.
- `torch._ops.OpOverload` and `OpOverload._schema.is_mutable`: only ATen
  overloads are replayed, and never mutating ones (nor random ones: DTensor
  advances its RNG state per call).
- `torch.utils._pytree`: flattening a call's result to record it, and
  rebuilding it on replay.
- DTensor's `_local_tensor`, `_spec` and its constructor on a spec
  (`local_tensor`, `spec_of`, `on_spec`): the public `to_local()` traces a
  `view_as` per call under grad mode and `from_local` an identity view, so
  they would change the lowered graph; the spec (a private `DTensorSpec`) is
  part of every key and rebuilds replayed DTensors.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
from torch.distributed.tensor import DTensor
from torch.fx._lazy_graph_module import _use_lazy_graph_module
from torch.fx.experimental.proxy_tensor import (
    get_proxy_mode,
    get_proxy_slot,
    make_fx,
    track_tensor,
)
from torch.utils import _pytree as pytree

from dtplan.ir.graph import base_name

__all__ = [
    "Fragments",
    "Lazy",
    "generate_code",
    "local_of",
    "local_tensor",
    "local_tensors",
    "on_spec",
    "replayable",
    "spec_of",
    "trace_lazily",
]


# --------------------------------------------------------------------------- tracing


def trace_lazily(fn: Callable[..., object], examples: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """`make_fx(fn, tracing_mode="fake")(*examples)` as a lazy GraphModule:
    its code is generated on first call, on `generate_code(gm)`, or on first read
    of `gm.code`, once (`gm.recompile()` only marks it stale)."""
    with _use_lazy_graph_module(True):
        return make_fx(fn, tracing_mode="fake")(*examples)


def generate_code(gm: torch.fx.GraphModule) -> None:
    """Generate the Python code of a module from `trace_lazily` now."""
    gm.real_recompile()


# --------------------------------------------------------------------------- DTensor internals


def local_tensor(value: DTensor) -> torch.Tensor:
    """A DTensor's local shard itself (`to_local()` would trace a view)."""
    return value._local_tensor


def local_tensors(value):
    """`value` (nested tuples, lists, dicts) with every DTensor replaced by
    its local shard."""
    return pytree.tree_map(lambda v: v._local_tensor if isinstance(v, DTensor) else v, value)


def on_spec(local, spec):
    """A DTensor of `spec` on the local shard `local` (`Lazy`: a `Lazy` of
    that spec), without `from_local`'s traced identity view."""
    if isinstance(local, Lazy):
        return Lazy(local.node, local.layout, spec)
    return DTensor(local, spec, requires_grad=local.requires_grad)


def spec_of(value):
    """The spec of a DTensor or of a `Lazy` DTensor."""
    return value._spec if isinstance(value, DTensor) else value.spec


def local_of(value):
    """The local shard of a DTensor or a `Lazy` DTensor (a `Lazy` without spec)."""
    if isinstance(value, DTensor):
        return value._local_tensor
    return Lazy(value.node, value.layout) if value.spec is not None else value


@functools.cache
def replayable(op: object) -> bool:
    """An ATen overload whose traced fragment may be replayed: not random
    (DTensor advances RNG state for each call) and not mutating."""
    if not isinstance(op, torch._ops.OpOverload):
        return False
    return torch.Tag.nondeterministic_seeded not in op.tags and not op._schema.is_mutable


def _local_key(t: torch.Tensor) -> tuple:
    """Everything of a local tensor that tracing an op on it can depend on."""
    with torch._C.DisableTorchFunction():  # make_fx's metadata mode would see every attribute read
        return (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device, t.requires_grad)


def _fake_like(layout: tuple) -> torch.Tensor:
    """A fresh FakeTensor of the layout `_local_key` recorded, untraced."""
    shape, stride, offset, dtype, device, requires_grad = layout
    mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
    with torch._C._DisableTorchDispatch(), torch._C.DisableTorchFunction():
        span = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if all(shape) else 0
        meta = torch.empty(offset + span, dtype=dtype, device="meta").as_strided(shape, stride, offset)
        out = mode.fake_tensor_converter.from_meta_and_device(mode, meta, device)
        if requires_grad:
            out.requires_grad_(True)
    return out


# --------------------------------------------------------------------------- fragments


class Lazy:
    """A replayed result not materialised as a tensor: its graph node, its
    local layout (`_local_key`) and, for a DTensor, its spec."""

    __slots__ = ("layout", "node", "spec")

    def __init__(self, node: torch.fx.Node, layout: tuple, spec=None) -> None:
        self.node, self.layout, self.spec = node, layout, spec

    @property
    def placements(self):
        return self.spec.placements

    @property
    def dtype(self) -> torch.dtype:
        """The local shard's dtype."""
        return self.layout[3]


@dataclasses.dataclass(frozen=True, slots=True)
class Fragment:
    """The nodes one call appended to the traced graph, and how to rebuild
    its result: per leaf of the result, None, ("input", k, spec) or
    ("node", node, local layout, spec); spec is the DTensor spec or None."""

    inputs: tuple[torch.fx.Node, ...]
    nodes: tuple[torch.fx.Node, ...]
    leaves: tuple
    tree: pytree.TreeSpec


class Fragments:
    """Replays the graph fragment traced for an earlier call with the same
    key instead of tracing the call again (see the module docstring).

    The key must hold everything the traced fragment depends on, given this
    rank and mesh; the replayed nodes then equal what tracing would have
    appended, with the call's own inputs. Outside `make_fx` (`active` is
    False) every call just runs."""

    #: off: trace every call (for comparing the two)
    enabled = True

    def __init__(self, mode) -> None:
        self.mode = mode
        self.memo: dict[object, Fragment | None] = {}
        #: the FakeTensor materialised for a replayed node
        self.tensors: dict[torch.fx.Node, torch.Tensor] = {}
        self.hits = 0

    @classmethod
    def for_current_trace(cls) -> Fragments:
        """Fragments of the `make_fx` trace under way (inactive if none, or
        if replay is disabled)."""
        return cls(get_proxy_mode() if cls.enabled else None)

    @property
    def active(self) -> bool:
        return self.mode is not None

    def node(self, local) -> torch.fx.Node:
        """The graph node of a local shard (tensor or `Lazy`)."""
        if isinstance(local, Lazy):
            return local.node
        return get_proxy_slot(local, self.mode.tracer).proxy.node

    def layout(self, local) -> tuple:
        """A local shard's layout (`_local_key`), tensor or `Lazy`."""
        return local.layout if isinstance(local, Lazy) else _local_key(local)

    def arguments_key(self, value) -> tuple[tuple, tuple]:
        """What tracing a call depends on in its arguments `value` (nested
        tuples, lists, dicts): per DTensor or `Lazy` DTensor its spec, local
        layout and which earlier argument's node it shares; other values as
        they are. With it, the arguments' local shards in order (the
        fragment's inputs). Raises TypeError for a plain tensor argument
        (not replayed); KeyError or RuntimeError for an untraced shard."""
        inputs: list = []
        seen: dict[torch.fx.Node, int] = {}

        def one(a):
            if isinstance(a, (DTensor, Lazy)):
                local = local_of(a)
                inputs.append(local)
                alias = seen.setdefault(self.node(local), len(seen))
                return ("dtensor", spec_of(a), self.layout(local), alias)
            if isinstance(a, (list, tuple)):
                return (type(a).__name__, *map(one, a))
            if isinstance(a, dict):
                return ("dict", *((k, one(v)) for k, v in a.items()))
            if isinstance(a, torch.Tensor):
                raise TypeError  # a plain tensor argument: not replayed
            return a

        return one(value), tuple(inputs)

    def real(self, value):
        """`value` (nested tuples, lists, dicts) with every `Lazy` made a
        tensor or DTensor tracked to its node."""
        if isinstance(value, Lazy):
            t = self.tensors.get(value.node)
            if t is None:
                t = self.tensors[value.node] = _fake_like(value.layout)
                track_tensor(t, torch.fx.Proxy(value.node, self.mode.tracer), constant=None, tracer=self.mode.tracer)
            return t if value.spec is None else on_spec(t, value.spec)
        if isinstance(value, tuple):
            return tuple(self.real(v) for v in value)
        if isinstance(value, list):
            return [self.real(v) for v in value]
        if isinstance(value, dict):
            return {k: self.real(v) for k, v in value.items()}
        return value

    def call(self, key, inputs: tuple, fn: Callable[..., object]):
        """`fn(*inputs)` (inputs made real), or the replay of the fragment it
        traced when called before with the same key."""
        if self.mode is None:  # not under make_fx: just run it
            return fn(*inputs)
        frag = self.memo.get(key, False)
        if frag:
            self.hits += 1
            return self._replay(frag, inputs)
        inputs = self.real(inputs)
        graph = self.mode.tracer.graph
        last = next(reversed(graph.nodes), None)
        out = fn(*inputs)
        if frag is False:
            self.memo[key] = self._record(_appended(graph, last), inputs, out)
        return out

    def _record(self, nodes: list[torch.fx.Node], inputs, out) -> Fragment | None:
        """The fragment `out` came from (`nodes`: those its call appended),
        or None when it cannot be replayed."""
        try:
            in_nodes = tuple(self.node(t) for t in inputs)
        except (KeyError, RuntimeError, AttributeError):
            return None
        inside, outside = set(nodes), set(in_nodes)
        for node in nodes:
            for x in node.all_input_nodes:
                if x not in inside and x not in outside and x.op not in ("placeholder", "get_attr"):
                    return None  # reads a value it was not given
        flat, tree = pytree.tree_flatten(out)
        leaves = []
        for leaf in flat:
            if leaf is None:
                leaves.append(None)
                continue
            if not isinstance(leaf, torch.Tensor):
                return None
            spec = leaf._spec if isinstance(leaf, DTensor) else None
            local = leaf._local_tensor if isinstance(leaf, DTensor) else leaf
            slot = get_proxy_slot(local, self.mode.tracer, None)
            if slot is None or slot.constant is not None:
                return None
            if slot.proxy.node in outside:
                leaves.append(("input", in_nodes.index(slot.proxy.node), spec))
            elif slot.proxy.node in inside:
                leaves.append(("node", slot.proxy.node, _local_key(local), spec))
            else:
                return None
        return Fragment(in_nodes, tuple(nodes), tuple(leaves), tree)

    def _replay(self, frag: Fragment, inputs):
        graph = self.mode.tracer.graph
        env = dict(zip(frag.inputs, (self.node(t) for t in inputs), strict=True))
        lookup = env.get
        for n in frag.nodes:
            args = torch.fx.node.map_arg(n.args, lambda x: lookup(x, x))
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda x: lookup(x, x))
            new = graph.create_node(n.op, n.target, args, kwargs, base_name(n.name), n.type)
            new.meta = dict(n.meta)  # "val" and "tensor_meta": the same layout
            env[n] = new
        flat = []
        for leaf in frag.leaves:
            if leaf is None:
                flat.append(None)
            elif leaf[0] == "input":
                local, spec = inputs[leaf[1]], leaf[2]
                flat.append(local if spec is None else on_spec(local, spec))
            else:
                _, node, layout, spec = leaf
                flat.append(Lazy(env[node], layout, spec))
        return pytree.tree_unflatten(flat, frag.tree)


def _appended(graph: torch.fx.Graph, last: torch.fx.Node | None) -> list[torch.fx.Node]:
    """The nodes of `graph` after `last` (all of them if None), in order."""
    nodes = []
    for n in reversed(graph.nodes):
        if n is last:
            break
        nodes.append(n)
    nodes.reverse()
    return nodes
