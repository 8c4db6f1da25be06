"""Lower a Plan into this rank's sharded fx GraphModule.

We interpret the captured ATen graph on DTensors whose placements the plan
fixes: before each op its inputs are redistributed (explicit functional
collectives, `runtime.redistribute`) to the placements the chosen strategy
wants, then DTensor runs the op on local shards (rewriting shape arguments of
views). Tracing that interpretation with `make_fx` leaves a graph of local
ATen ops and `_c10d_functional` collectives. Stored tensors (parameters,
buffers, constants) become attributes of the module, so it is called with the
user inputs only.

Lowering time: DTensors are built directly on their spec (`from_local`
traces an identity view per call), and a call whose traced fragment is
already known -- the same op on the same local layouts and placements, as in
every repeated layer -- is replayed as a copy of those nodes instead of being
traced again (`_Fragments`); the module is the same, node for node.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import re
import time
from collections.abc import Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.fx._lazy_graph_module import _use_lazy_graph_module
from torch.fx.experimental.proxy_tensor import (
    get_proxy_mode,
    get_proxy_slot,
    make_fx,
    track_tensor,
)
from torch.utils import _pytree as pytree
from torch.utils._pytree import tree_map

from ir.capture import Captured
from ir.graph import Role, TensorMeta
from planner import rules
from planner._dtensor import _spec as dtensor_spec
from planner.plan import NodePlan, Plan
from planner.pricing import local_shape
from runtime.params import piece
from runtime.redistribute import RankMesh, redistribute_local

__all__ = ["LoweringError", "attr_name", "lower"]

log = logging.getLogger(__name__)


class LoweringError(RuntimeError):
    """The plan could not be executed as written for a node."""


def lower(captured: Captured, plan: Plan, mesh: DeviceMesh, stored: Mapping[str, torch.Tensor]) -> torch.fx.GraphModule:
    """This rank's sharded GraphModule. `stored[name]` is the local shard of
    each stored placeholder (parameter, buffer, constant); the module takes
    the user inputs' local shards, in order, and returns the outputs' local
    shards with the plan's output placements."""
    t0 = time.perf_counter()
    names = stored_names(captured)
    user = list(captured.user_inputs)
    device = mesh.device_type
    examples = [stored[n] for n in names] + [
        torch.empty(_local(captured.graph[n].tensor_meta, plan.nodes[n].output, mesh), dtype=captured.graph[n].tensor_meta.dtype, device=device)
        for n in user
    ]
    gm = trace(captured, plan, mesh, examples)
    params = {n for n, role, _ in captured.placeholders if role is Role.PARAM}
    _attach_stored(gm, names, stored, params)
    gm.real_recompile()  # one code generation, here, as before the lazy module
    log.debug("lowering: %.3fs, %d nodes", time.perf_counter() - t0, len(gm.graph.nodes))
    return gm


def stored_names(captured: Captured) -> list[str]:
    """The stored placeholders (parameters, buffers, constants), in call order."""
    return [n for n, role, _ in captured.placeholders if role is not Role.INPUT]


def trace(captured: Captured, plan: Plan, mesh: DeviceMesh, examples: list[torch.Tensor]) -> torch.fx.GraphModule:
    """The traced local graph, one placeholder per stored tensor (in
    `stored_names` order), then per user input. `examples` are this rank's
    local shards in that order (real or fake tensors). The module is lazy:
    its code is generated on first call (or `real_recompile()`), once.
    `gm.meta["dtplan_fragments"]` counts the calls traced and replayed."""
    interp = _Interpreter(captured, plan, mesh)
    names = stored_names(captured) + list(captured.user_inputs)
    with _use_lazy_graph_module(True):
        gm = make_fx(lambda *a: interp.run(dict(zip(names, a, strict=True))), tracing_mode="fake")(*examples)
    fragments = interp.fragments
    gm.meta["dtplan_fragments"] = {"traced": len(fragments.memo), "replayed": fragments.hits}
    return gm


def _local(meta: TensorMeta, placements, mesh: DeviceMesh) -> tuple[int, ...]:
    return local_shape(meta.shape, tuple(mesh.shape), placements)


def _attach_stored(gm: torch.fx.GraphModule, names: list[str], stored: Mapping[str, torch.Tensor], params: set[str]) -> None:
    """Replace the stored placeholders by attributes holding the local shards
    (parameters as nn.Parameter, so an optimizer can update them in place)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][: len(names)]
    first_real = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    for node, name in zip(placeholders, names, strict=True):
        attr = attr_name(name)
        if name in params:
            gm.register_parameter(attr, torch.nn.Parameter(stored[name]))
        else:
            gm.register_buffer(attr, stored[name])
        with gm.graph.inserting_before(first_real):
            getter = gm.graph.get_attr(attr)
        getter.meta.update(node.meta)  # the traced value ("val"), as the placeholder had it
        node.replace_all_uses_with(getter)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()  # lazy (see `trace`): marks the code stale, generates nothing yet


def attr_name(name: str) -> str:
    """The GraphModule attribute holding a stored placeholder's local shard."""
    return "s_" + re.sub(r"\W", "_", name)


class _Interpreter:
    """Runs the captured graph on DTensors following the plan, node by node.

    Under `make_fx` a call whose traced fragment is already known (the same
    op on the same layouts and placements, as in every repeated layer) is
    replayed instead (`_Fragments`); its results are then `_Lazy` values,
    which become DTensors only where a later call must really be traced."""

    def __init__(self, captured: Captured, plan: Plan, mesh: DeviceMesh) -> None:
        self.captured, self.plan, self.mesh = captured, plan, mesh
        self.rank_mesh = RankMesh.of(mesh)
        self.graph = captured.graph
        self._specs: dict[tuple, object] = {}

    def run(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        env: dict[str, object] = {}
        self.hub_values: dict[str, object] = {}
        self.fragments = _Fragments.for_current_trace()
        for name, local in inputs.items():
            env[name] = self._wrap(local, self.plan.nodes[name].output, self.graph[name].tensor_meta)
        for fx_node in self.captured.gm.graph.nodes:
            if fx_node.op == "call_function":
                env[fx_node.name] = self._call(fx_node, env)
        outs = []
        for name, want in zip(self.graph.outputs, self.plan.outputs, strict=True):
            src = self._hub(name, env) if name in self.plan.hubs else env[name]
            outs.append(self.fragments.real(self._to(src, want, self.graph[name].tensor_meta)))
        return tuple(outs)

    def _spec(self, placements, meta: TensorMeta, dtype: torch.dtype):
        key = (tuple(placements), meta, dtype)
        spec = self._specs.get(key)
        if spec is None:
            dt_meta = dataclasses.replace(meta, shape=torch.Size(meta.shape), dtype=dtype)
            spec = self._specs[key] = dtensor_spec(self.mesh, tuple(placements), dt_meta)
        return spec

    def _wrap(self, local, placements, meta: TensorMeta):
        """`DTensor.from_local(local, ..., run_check=False, shape, stride)`
        without its autograd function: that traces an identity `view` per
        call (most of a lowered graph's nodes, and of the lowering time)."""
        if isinstance(local, _Lazy):
            return _Lazy(local.node, local.layout, self._spec(placements, meta, local.layout[3]))
        return DTensor(local, self._spec(placements, meta, local.dtype), requires_grad=local.requires_grad)

    def _to(self, value, placements, meta: TensorMeta):
        """The local shard of `value` redistributed to `placements`."""
        local, src = _local_of(value), tuple(value.placements)
        placements = tuple(placements)
        if src == placements:
            return local
        key = ("redistribute", meta, src, placements, self.fragments.layout(local))
        return self.fragments.call(key, (local,), lambda x: redistribute_local(x, self.rank_mesh, meta, src, placements))

    def _hub(self, name: str, env: dict[str, object]):
        """The shared value in its hub placement, redistributed on first read."""
        if name not in self.hub_values:
            meta, want = self.graph[name].tensor_meta, self.plan.hubs[name]
            self.hub_values[name] = self._wrap(self._to(env[name], want, meta), want, meta)
        return self.hub_values[name]

    def _call(self, fx_node: torch.fx.Node, env: dict[str, object]) -> object:
        np = self.plan.nodes[fx_node.name]
        if fx_node.target is operator.getitem:
            return env[fx_node.args[0].name][fx_node.args[1]]
        counter = iter(range(len(np.inputs)))

        def arg(a):
            k = next(counter)
            meta = self.graph[a.name].tensor_meta
            src = self._hub(a.name, env) if np.via_hub and np.via_hub[k] else env[a.name]
            return self._wrap(self._to(src, np.inputs[k], meta), np.inputs[k], meta)

        args, kwargs = _map_nodes((tuple(fx_node.args), dict(fx_node.kwargs)), arg)
        if "device" in kwargs:  # factories traced on meta run on this rank's device
            kwargs["device"] = torch.device(self.mesh.device_type)
        try:
            key, inputs = self._op_key(fx_node, np, (args, kwargs))
            if key is None:
                return self._execute(fx_node, np, *self.fragments.real((args, kwargs)))
            return self.fragments.call(key, inputs, lambda *_: self._execute(fx_node, np, *self.fragments.real((args, kwargs))))
        except LoweringError:
            raise
        except Exception as e:
            raise LoweringError(f"lowering failed at node={fx_node.format_node()}: {type(e).__name__}: {e}") from e

    def _op_key(self, fx_node, np: NodePlan, call) -> tuple[tuple | None, tuple]:
        """What the traced fragment of an op depends on (the op, its
        non-tensor arguments, every input's spec and local layout, the
        planned output), and its inputs' local shards; None where a
        fragment must not be replayed."""
        target = fx_node.target
        if self.fragments.mode is None or not isinstance(target, torch._ops.OpOverload) or _unreplayable(target):
            return None, ()
        inputs: list = []
        seen: dict[torch.fx.Node, int] = {}
        fragments = self.fragments

        def one(a):
            if isinstance(a, (DTensor, _Lazy)):
                local = _local_of(a)
                inputs.append(local)
                alias = seen.setdefault(fragments.node(local), len(seen))
                return ("dtensor", _spec_of(a), fragments.layout(local), alias)
            if isinstance(a, (list, tuple)):
                return (type(a).__name__, *map(one, a))
            if isinstance(a, dict):
                return ("dict", *((k, one(v)) for k, v in a.items()))
            if isinstance(a, torch.Tensor):
                raise TypeError  # a plain tensor argument: not replayed
            return a

        try:
            key = ("op", target, one(call), np.output, self.graph[fx_node.name].meta)
            hash(key)
        except (TypeError, KeyError, RuntimeError):
            return None, ()
        return key, tuple(inputs)

    def _execute(self, fx_node, np: NodePlan, args, kwargs) -> object:
        target = fx_node.target
        meta = self.graph[fx_node.name].meta
        replicated = all(all(p.is_replicate() for p in pl) for pl in np.inputs) and _replicated(np.output)
        if target in _LOCAL or rules.lookup(target) is not None or replicated:
            # our own rules, factories and fully replicated ops: the op on
            # local tensors (ours where it needs more than the op: `_LOCAL`)
            la, lk = tree_map(lambda v: v._local_tensor if isinstance(v, DTensor) else v, (args, kwargs))
            out = _LOCAL[target](self, fx_node, np, *la, **lk) if target in _LOCAL else target(*la, **lk)
            return self._wrap_outputs(out, np.output, meta)
        if target in _VIEWS and isinstance(args[0], DTensor) and not args[0]._local_tensor.is_contiguous():
            # a redistribution can leave the local shard in another memory
            # layout than the single-device program had (an all-to-all over
            # nested shards returns it contiguous before a transpose): copy it
            # so the view is valid, as reshape would
            src = self.graph[fx_node.args[0].name].tensor_meta
            args = (self._wrap(args[0]._local_tensor.contiguous(), args[0].placements, src), *args[1:])
        out = target(*args, **kwargs)
        self._check(fx_node, out, np.output)
        return out

    def _wrap_outputs(self, out, placements, meta):
        if isinstance(out, torch.Tensor):
            return self._wrap(out, placements, meta)
        return tuple(
            None if o is None or p is None else self._wrap(o, p, m) for o, p, m in zip(out, placements, meta, strict=True)
        )

    def _check(self, fx_node, out, want) -> None:
        got = out.placements if isinstance(out, DTensor) else tuple(o.placements if isinstance(o, DTensor) else None for o in out)
        if isinstance(out, DTensor):
            ok = tuple(got) == tuple(want)
        else:
            ok = all(w is None or tuple(g) == tuple(w) for g, w in zip(got, want, strict=False))
        if not ok:
            raise LoweringError(
                f"DTensor produced placements {got} for node={fx_node.format_node()}, the plan says {want}"
            )


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _dropout(interp: _Interpreter, fx_node, np: NodePlan, x: torch.Tensor, p: float, train: bool | None):
    """`native_dropout` on this rank's piece, with the mask one device would
    draw: the whole mask is drawn here (every rank draws the same one from
    the same generator state) and this rank keeps its piece. Costs a
    full-size mask's time and memory per call."""
    if train is False:
        return torch.ops.aten.native_dropout.default(x, p, train)
    full = interp.graph[fx_node.args[0].name].tensor_meta
    _, mask = torch.ops.aten.native_dropout.default(torch.zeros(full.shape, dtype=x.dtype, device=x.device), p, True)
    mask = piece(mask, interp.rank_mesh.shape, interp.rank_mesh.coords, np.output[1])
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    return x.mul(mask).mul_(scale), mask


#: ops run by our own local implementation (see each function)
_LOCAL = {torch.ops.aten.native_dropout.default: _dropout}


def _replicated(output) -> bool:
    if output and (output[0] is None or isinstance(output[0], tuple)):
        return all(o is None or all(p.is_replicate() for p in o) for o in output)
    return all(p.is_replicate() for p in output)


def _map_nodes(value, fn):
    """`value` (fx arguments: nested lists, tuples and dicts) with every
    fx Node replaced by `fn(node)`; lists come back as lists, tuples as
    tuples (what pytree's tree_map gives, without its per-leaf overhead)."""
    if isinstance(value, torch.fx.Node):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_nodes(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_nodes(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_nodes(v, fn) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- fragment replay


class _Lazy:
    """A replayed result not materialised as a tensor: its graph node, its
    local layout (`_local_key`) and, for a DTensor, its spec."""

    __slots__ = ("layout", "node", "spec")

    def __init__(self, node: torch.fx.Node, layout: tuple, spec=None) -> None:
        self.node, self.layout, self.spec = node, layout, spec

    @property
    def placements(self):
        return self.spec.placements


def _local_of(value):
    if isinstance(value, DTensor):
        return value._local_tensor
    return _Lazy(value.node, value.layout) if value.spec is not None else value


def _spec_of(value):
    return value._spec if isinstance(value, DTensor) else value.spec


def _local_key(t: torch.Tensor) -> tuple:
    """Everything of a local tensor that tracing an op on it can depend on."""
    with torch._C.DisableTorchFunction():  # make_fx's metadata mode would see every attribute read
        return (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device, t.requires_grad)


@functools.cache
def _unreplayable(op: torch._ops.OpOverload) -> bool:
    """Random ops (DTensor advances RNG state for each) and mutating ops."""
    return torch.Tag.nondeterministic_seeded in op.tags or op._schema.is_mutable


@dataclasses.dataclass(frozen=True, slots=True)
class _Fragment:
    """The nodes one call appended to the traced graph, and how to rebuild
    its result: per leaf of the result, None, ("input", k, spec) or
    ("node", node, local layout, spec); spec is the DTensor spec or None."""

    inputs: tuple[torch.fx.Node, ...]
    nodes: tuple[torch.fx.Node, ...]
    leaves: tuple
    tree: pytree.TreeSpec


class _Fragments:
    """Replays the graph fragment traced for an earlier call with the same
    key instead of tracing the call again.

    A deep model lowers the same op on the same shapes and placements layer
    after layer; tracing one costs DTensor dispatch, sharding propagation
    and fake-tensor propagation per local op, replaying it a node copy per
    local op. The key must hold everything the traced fragment depends on,
    given this rank and mesh; the replayed nodes then equal what tracing
    would have appended, with the call's own inputs. Replayed results stay
    `_Lazy` until a call that is really traced reads them (`real`)."""

    #: off: trace every call (for comparing the two)
    enabled = True

    def __init__(self, mode) -> None:
        self.mode = mode
        self.memo: dict[object, _Fragment | None] = {}
        #: the FakeTensor materialised for a replayed node
        self.tensors: dict[torch.fx.Node, torch.Tensor] = {}
        self.hits = 0

    @classmethod
    def for_current_trace(cls) -> _Fragments:
        return cls(get_proxy_mode() if cls.enabled else None)

    def node(self, local) -> torch.fx.Node:
        """The graph node of a local shard (tensor or `_Lazy`)."""
        if isinstance(local, _Lazy):
            return local.node
        return get_proxy_slot(local, self.mode.tracer).proxy.node

    def layout(self, local) -> tuple:
        return local.layout if isinstance(local, _Lazy) else _local_key(local)

    def real(self, value):
        """`value` (nested tuples, lists, dicts) with every `_Lazy` made a
        tensor or DTensor tracked to its node."""
        if isinstance(value, _Lazy):
            t = self.tensors.get(value.node)
            if t is None:
                t = self.tensors[value.node] = _fake_like(value.layout)
                track_tensor(t, torch.fx.Proxy(value.node, self.mode.tracer), constant=None, tracer=self.mode.tracer)
            return t if value.spec is None else DTensor(t, value.spec, requires_grad=t.requires_grad)
        if isinstance(value, tuple):
            return tuple(self.real(v) for v in value)
        if isinstance(value, list):
            return [self.real(v) for v in value]
        if isinstance(value, dict):
            return {k: self.real(v) for k, v in value.items()}
        return value

    def call(self, key, inputs: tuple, fn):
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
        last = graph._root.prev
        out = fn(*inputs)
        if frag is False:
            self.memo[key] = self._record(graph, last, inputs, out)
        return out

    def _record(self, graph: torch.fx.Graph, last: torch.fx.Node, inputs, out) -> _Fragment | None:
        """The fragment `out` came from, or None when it cannot be replayed."""
        try:
            in_nodes = tuple(self.node(t) for t in inputs)
        except (KeyError, RuntimeError, AttributeError):
            return None
        nodes, n = [], last.next
        while n is not graph._root:
            nodes.append(n)
            n = n.next
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
        return _Fragment(in_nodes, tuple(nodes), tuple(leaves), tree)

    def _replay(self, frag: _Fragment, inputs):
        graph = self.mode.tracer.graph
        env = dict(zip(frag.inputs, (self.node(t) for t in inputs), strict=True))
        lookup = env.get
        for n in frag.nodes:
            args = torch.fx.node.map_arg(n.args, lambda x: lookup(x, x))
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda x: lookup(x, x))
            new = graph.create_node(n.op, n.target, args, kwargs, _base_name(n.name), n.type)
            new.meta = dict(n.meta)  # "val" and "tensor_meta": the same layout
            env[n] = new
        flat = []
        for leaf in frag.leaves:
            if leaf is None:
                flat.append(None)
            elif leaf[0] == "input":
                local, spec = inputs[leaf[1]], leaf[2]
                if spec is None:
                    flat.append(local)
                elif isinstance(local, _Lazy):
                    flat.append(_Lazy(local.node, local.layout, spec))
                else:
                    flat.append(DTensor(local, spec, requires_grad=local.requires_grad))
            else:
                _, node, layout, spec = leaf
                flat.append(_Lazy(env[node], layout, spec))
        return pytree.tree_unflatten(flat, frag.tree)


def _base_name(name: str) -> str:
    """The name tracing would have asked for ("mm" for "mm_12"); the graph
    makes it unique."""
    return re.sub(r"_\d+$", "", name)


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
