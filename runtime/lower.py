"""Lower a Plan into this rank's sharded fx GraphModule.

We interpret the captured ATen graph (`_PlanInterpreter`, a
`torch.fx.Interpreter`) on DTensors whose placements the plan fixes: before
each op its inputs are redistributed (explicit functional collectives,
`dtplan.runtime.redistribute`) to the placements the chosen strategy wants,
then DTensor runs the op on local shards (rewriting shape arguments of
views). Tracing that interpretation with `make_fx` leaves a graph of local
ATen ops and `_c10d_functional` collectives. Stored tensors (parameters,
buffers, constants) become attributes of the module, so it is called with the
user inputs only.

Lowering time: DTensors are built directly on their spec (`from_local`
traces an identity view per call), and a call whose traced fragment is
already known -- the same op on the same local layouts and placements, as in
every repeated layer -- is replayed as a copy of those nodes instead of being
traced again (`dtplan.runtime.replay`, which also holds every private torch
API lowering uses); the module is the same, node for node.
"""
from __future__ import annotations

import dataclasses
import logging
import operator
import re
import time
from collections.abc import Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.fx.operator_schemas import normalize_function

from dtplan.ir.capture import Captured
from dtplan.ir.graph import Role, TensorMeta
from dtplan.planner.cost.pricing import bucket_key, local_shape
from dtplan.planner.evaluate import OUTPUT
from dtplan.planner.output.plan import NodePlan, Plan
from dtplan.planner.space import rules
from dtplan.planner.space._dtensor import dtensor_spec, has_strided, per_output
from dtplan.runtime import gloo, replay, watch
from dtplan.runtime.overlap import overlap
from dtplan.runtime.params import piece
from dtplan.runtime.redistribute import RankMesh, reduce_bucket, redistribute_local

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
    axes = {mesh.get_group(i).group_name: (plan.mesh.axis_names[i], mesh.size(i)) for i in range(mesh.ndim)}
    watch.mark_collectives(gm, axes, plan.collectives)  # a rank that times out names its collective
    overlap(gm)  # collectives issued early, waited for late (`dtplan.runtime.overlap`)
    gloo.use_base_gathers(gm)  # gloo's functional gather faults with several in flight
    replay.generate_code(gm)  # one code generation, here, as before the lazy module
    log.debug("lowering: %.3fs, %d nodes", time.perf_counter() - t0, len(gm.graph.nodes))
    return gm


def stored_names(captured: Captured) -> list[str]:
    """The stored placeholders (parameters, buffers, constants), in call order."""
    return [n for n, role, _ in captured.placeholders if role is not Role.INPUT]


def trace(captured: Captured, plan: Plan, mesh: DeviceMesh, examples: list[torch.Tensor]) -> torch.fx.GraphModule:
    """The traced local graph, one placeholder per stored tensor (in
    `stored_names` order), then per user input. `examples` are this rank's
    local shards in that order (real or fake tensors). The module is lazy:
    its code is generated on first call (or `replay.generate_code`), once.
    `gm.meta["dtplan_fragments"]` counts the calls traced and replayed."""
    interp = _PlanInterpreter(captured, plan, mesh)
    gm = replay.trace_lazily(lambda *a: interp.run_local(*a), examples)
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


class _PlanInterpreter(torch.fx.Interpreter):
    """Runs the captured graph on DTensors following the plan, node by node.

    `run_local` gives the placeholders their values (the local shards as
    DTensors of their planned placements) and runs `captured.gm`;
    `run_node` lowers each call (`_call`: its inputs redistributed to the
    placements the plan wants, then the op) and the output (`_outputs`).
    `run_node` is overridden whole, not `call_function`: a call's arguments
    are redistributed per argument node, each to its own planned placements
    (or read from a hub), so the generic fetch from the environment does not
    fit, and the plan is keyed by node name.

    Under `make_fx` a call whose traced fragment is already known (the same
    op on the same layouts and placements, as in every repeated layer) is
    replayed instead (`replay.Fragments`); its results are then
    `replay.Lazy` values, which become DTensors only where a later call must
    really be traced."""

    def __init__(self, captured: Captured, plan: Plan, mesh: DeviceMesh) -> None:
        super().__init__(captured.gm)
        self.extra_traceback = False  # a LoweringError names its node already
        self.captured, self.plan, self.mesh = captured, plan, mesh
        self.rank_mesh = RankMesh.of(mesh)
        #: the IR graph (`self.graph` is the fx graph the Interpreter runs)
        self.ir = captured.graph
        #: the fx nodes by name (the plan's and the IR's key)
        self.nodes = {n.name: n for n in self.graph.nodes}
        #: the placeholders in `run_local`'s argument order
        self.inputs = [self.nodes[n] for n in stored_names(captured) + list(captured.user_inputs)]
        self.specs: dict[tuple, object] = {}
        self.fragments = replay.Fragments(None)
        self.hub_values: dict[str, object] = {}

    def run_local(self, *shards: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs' local shards, in the plan's output placements, for
        this rank's local shards of the stored inputs (`stored_names` order)
        then the user inputs (what `trace` has `make_fx` trace)."""
        self.hub_values = {}
        self.fragments = replay.Fragments.for_current_trace()
        env = {
            node: self._wrap(local, self.plan.nodes[node.name].output, self.ir[node.name].tensor_meta)
            for node, local in zip(self.inputs, shards, strict=True)
        }
        return self.run(initial_env=env, enable_io_processing=False)

    def run_node(self, n: torch.fx.Node) -> object:
        """A call's result as a DTensor (tuple: DTensors) of the plan's
        placements, or a `replay.Lazy` standing for one; the output node's
        value: the outputs' local shards (see `run_local`)."""
        if n.op == "call_function":
            return self._call(n)
        if n.op == "output":
            return self._outputs()
        raise LoweringError(f"cannot lower node={n.format_node()}: {n.op} nodes are not interpreted")

    def _outputs(self) -> tuple[torch.Tensor, ...]:
        """The outputs in their planned placements: each redistributed in
        turn, then the gradient buckets (`PlannedCollective.bucket`), one
        collective each, in the plan's bucket order."""
        slots: dict[str, list[int]] = {}  # output value -> its buckets, in output order
        for c in self.plan.collectives:
            if c.node == OUTPUT and c.bucket is not None:
                slots.setdefault(c.producer, []).append(c.bucket)
        outs: list[torch.Tensor | None] = []
        pending: dict[int, list[tuple[int, torch.Tensor, TensorMeta, tuple, tuple]]] = {}
        for i, (name, want) in enumerate(zip(self.ir.outputs, self.plan.outputs, strict=True)):
            src = self._hub(name) if name in self.plan.hubs else self.env[self.nodes[name]]
            meta = self.ir[name].tensor_meta
            if slots.get(name):
                local = self.fragments.real(replay.local_of(src))
                pending.setdefault(slots[name].pop(0), []).append((i, local, meta, tuple(src.placements), tuple(want)))
                outs.append(None)
                continue
            outs.append(self.fragments.real(self._to(src, want, meta)))
        for b in sorted(pending):
            members = pending[b]
            if len(members) == 1:  # alone: its own collective, no flattening copy
                i, local, meta, src, want = members[0]
                outs[i] = redistribute_local(local, self.rank_mesh, meta, src, want)
                continue
            keys = {bucket_key(self.rank_mesh.shape, meta, src, want) for _, _, meta, src, want in members}
            if len(keys) != 1 or None in keys:
                raise LoweringError(f"gradient bucket {b} holds reductions that cannot travel together: {sorted(map(str, keys))}")
            (kind, axis, _, op), = keys
            reduced = reduce_bucket([local for _, local, _, _, _ in members], self.rank_mesh, kind, axis, op)
            for (i, *_), value in zip(members, reduced, strict=True):
                outs[i] = value
        return tuple(outs)

    def spec(self, placements, meta: TensorMeta, dtype: torch.dtype):
        """The DTensor spec of a value of `meta` (local dtype `dtype`) on this
        mesh with `placements` (one object per distinct triple)."""
        key = (tuple(placements), meta, dtype)
        spec = self.specs.get(key)
        if spec is None:
            dt_meta = dataclasses.replace(meta, shape=torch.Size(meta.shape), dtype=dtype)
            spec = self.specs[key] = dtensor_spec(self.mesh, tuple(placements), dt_meta)
        return spec

    def _wrap(self, local, placements, meta: TensorMeta):
        """`DTensor.from_local(local, ..., run_check=False, shape, stride)`
        without its autograd function: that traces an identity `view` per
        call (most of a lowered graph's nodes, and of the lowering time)."""
        return replay.on_spec(local, self.spec(placements, meta, local.dtype))

    def _to(self, value, placements, meta: TensorMeta):
        """The local shard of `value` redistributed to `placements`."""
        local, src = replay.local_of(value), tuple(value.placements)
        placements = tuple(placements)
        if src == placements:
            return local
        key = ("redistribute", meta, src, placements, self.fragments.layout(local))
        return self.fragments.call(key, (local,), lambda x: redistribute_local(x, self.rank_mesh, meta, src, placements))

    def _hub(self, name: str):
        """The shared value in its hub placement, redistributed on first read
        (the value itself is read while a reader runs, so it is in `env`)."""
        if name not in self.hub_values:
            meta, want = self.ir[name].tensor_meta, self.plan.hubs[name]
            value = self.env[self.nodes[name]]
            self.hub_values[name] = self._wrap(self._to(value, want, meta), want, meta)
        return self.hub_values[name]

    def _call(self, fx_node: torch.fx.Node) -> object:
        np = self.plan.nodes[fx_node.name]
        if fx_node.target is operator.getitem:
            return self.env[fx_node.args[0]][fx_node.args[1]]
        counter = iter(range(len(np.inputs)))

        def arg(a: torch.fx.Node):
            k = next(counter)
            meta = self.ir[a.name].tensor_meta
            src = self._hub(a.name) if np.via_hub and np.via_hub[k] else self.env[a]
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
        if not self.fragments.active or not replay.replayable(target):
            return None, ()
        try:
            arguments, inputs = self.fragments.arguments_key(call)
            key = ("op", target, arguments, np.output, self.ir[fx_node.name].meta)
            hash(key)
        except (TypeError, KeyError, RuntimeError):
            return None, ()
        return key, inputs

    def _execute(self, fx_node, np: NodePlan, args, kwargs) -> object:
        target = fx_node.target
        meta = self.ir[fx_node.name].meta
        replicated = all(all(p.is_replicate() for p in pl) for pl in np.inputs) and _replicated(np.output)
        strided = any(has_strided(pl) for pl in (*np.inputs, *per_output(np.output)))
        if target in _VIEWS and isinstance(args[0], DTensor) and not replay.local_tensor(args[0]).is_contiguous():
            # the local shard can be in another memory layout than the
            # captured program had: a redistribution's (an all-to-all over
            # nested shards returns it contiguous before a transpose) or a
            # kernel's (CPU flash attention's output is contiguous, its meta
            # function's heads-inner): copy it so the view is valid, as
            # reshape would
            src = self.ir[fx_node.args[0].name].tensor_meta
            args = (self._wrap(replay.local_tensor(args[0]).contiguous(), args[0].placements, src), *args[1:])
        if target in _LOCAL or rules.lookup(target) is not None or replicated or strided:
            # our own rules, factories, fully replicated ops and casts of
            # strided shards: the op on local tensors (ours where it needs
            # more than the op: `_LOCAL`)
            la, lk = replay.local_tensors((args, kwargs))
            out = _LOCAL[target](self, fx_node, np, *la, **lk) if target in _LOCAL else target(*la, **lk)
            return self._wrap_outputs(out, np.output, meta)
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


def _dropout(interp: _PlanInterpreter, fx_node, np: NodePlan, x: torch.Tensor, p: float, train: bool | None):
    """`native_dropout` on this rank's piece, with the mask one device would
    draw: the whole mask is drawn here (every rank draws the same one from
    the same generator state) and this rank keeps its piece. Costs a
    full-size mask's time and memory per call."""
    if train is False:
        return torch.ops.aten.native_dropout.default(x, p, train)
    full = interp.ir[fx_node.args[0].name].tensor_meta
    _, mask = torch.ops.aten.native_dropout.default(torch.zeros(full.shape, dtype=x.dtype, device=x.device), p, True)
    mask = piece(mask, interp.rank_mesh.shape, interp.rank_mesh.coords, np.output[1])
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    return x.mul(mask).mul_(scale), mask


#: attention ops, and which input is the queries
_ATTENTION_Q = {
    torch.ops.aten.scaled_dot_product_attention.default: 0,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: 0,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default: 1,
}


def _attention(interp: _PlanInterpreter, fx_node, np: NodePlan, *args, **kwargs):
    """Attention on local shards; with the queries split on the sequence
    (context parallel: `planner.space.rules._sequence`) a causal op attends
    by its rows' global positions: `is_causal` (which aligns a rank's rows
    with the first keys) becomes an additive mask of -inf where a key comes
    after the row, as one device masks that row."""
    target = fx_node.target
    qi = _ATTENTION_Q[target]
    split = tuple(Shard(0) if isinstance(p, Shard) and p.dim == 2 else Replicate() for p in np.inputs[qi])
    normalized = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True) if any(isinstance(p, Shard) for p in split) else None
    if normalized is None or not normalized.kwargs.get("is_causal"):
        return target(*args, **kwargs)
    kw = dict(normalized.kwargs)
    if kw.get("attn_mask") is not None:
        raise LoweringError(f"causal attention with a mask, its queries split on the sequence: {fx_node.format_node()}")
    q, k = kw["query"], kw["key"]
    rows = interp.ir[interp.ir[fx_node.name].refs()[qi]].tensor_meta.shape[2]
    positions = piece(torch.arange(rows, device=q.device), interp.rank_mesh.shape, interp.rank_mesh.coords, split)
    keys = torch.arange(k.shape[2], device=q.device)
    kw["attn_mask"] = torch.zeros(len(positions), k.shape[2], dtype=q.dtype, device=q.device).masked_fill(keys[None, :] > positions[:, None], float("-inf"))
    kw["is_causal"] = False
    return target(**kw)


#: ops run by our own local implementation (see each function)
_LOCAL = {torch.ops.aten.native_dropout.default: _dropout, **{op: _attention for op in _ATTENTION_Q}}


def _replicated(output) -> bool:
    return all(o is None or all(p.is_replicate() for p in o) for o in per_output(output))


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
