"""Candidate placement strategies for every IR node on an N-D mesh.

Sources, in order: DTensor's registered rules (through `dtplan.planner.space._dtensor`),
dtplan's own rules (`dtplan.planner.space.rules`), and as a last resort Replicate, which
is recorded as a fallback and shown in the plan and report.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from dtplan.ir.graph import Graph, Node, Ref, Role, TensorMeta
from dtplan.planner.space import rules
from dtplan.planner.space._dtensor import (
    Placements,
    dtensor_rule_kind,
    expand_single_dim_rules,
    has_strided,
    is_multi_output,
    is_sharded,
    is_strided,
    unstrided,
    op_strategies,
    per_output,
    strided,
    strided_form_ok,
)

__all__ = ["Fallback", "NodeStrategies", "Source", "Strategy", "StrategySpace", "build_strategies", "hub_name", "strategies_around", "shard_factor", "valid_on"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Strategy:
    """Input placements (one per tensor the node reads, in `Node.refs()` order)
    and output placements (a tuple of them for multi-output ops)."""

    inputs: tuple[Placements, ...]
    output: Placements | tuple[Placements | None, ...]


@dataclass(frozen=True, slots=True)
class Fallback:
    node: str
    op: str
    reason: str


class Source(str, Enum):
    """Where a node's strategies come from (a str, so plan files and the
    report read it as text)."""

    PLACEHOLDER = "placeholder"  # inputs, parameters, buffers, constants
    DTENSOR = "dtensor"  # DTensor's registered rule
    DTPLAN = "dtplan"  # dtplan's own rule (planner.space.rules)
    FACTORY = "factory"  # reads no tensor: computed replicated
    FALLBACK = "fallback"  # no rule applies: every input and output replicated
    FOLLOW = "follow"  # shares another node's choice (tuple projections, followers)


@dataclass(frozen=True, slots=True)
class NodeStrategies:
    name: str
    options: tuple[Strategy, ...]
    source: Source
    #: for FOLLOW nodes (and folded layers): the node whose choice this one shares
    follows: str | None = None


@dataclass(frozen=True)
class StrategySpace:
    mesh_shape: tuple[int, ...]
    nodes: Mapping[str, NodeStrategies]
    fallbacks: tuple[Fallback, ...] = field(default=())
    #: values read by several consumers: candidate hub placements (see dtplan.planner.reduce.hubs)
    hubs: Mapping[str, tuple[Placements, ...]] = field(default_factory=dict)
    #: folded layers (see dtplan.planner.reduce.fold): node -> its twin in the template layer
    twins: Mapping[str, str] = field(default_factory=dict)
    #: hubs sharing the choice of their twin's hub
    hub_follows: Mapping[str, str] = field(default_factory=dict)


def hub_name(node: str) -> str:
    """The choice key of a value's hub."""
    return f"hub:{node}"


def shard_factor(placements: Placements, mesh_shape: tuple[int, ...]) -> int:
    """How many ways a value is split across the mesh (Shard and Partial axes)."""
    f = 1
    for p, n in zip(placements, mesh_shape, strict=True):
        if is_sharded(p) or isinstance(p, Partial):
            f *= n
    return f


def valid_on(placements: Placements | None, meta: TensorMeta | None, mesh_shape: tuple[int, ...]) -> bool:
    """Even sharding only: every sharded dim divides by the mesh axes sharding
    it; strided shards only in dtplan's strided form (`_dtensor.strided`)."""
    if placements is None or meta is None:
        return True
    split: dict[int, int] = {}
    strided_seen = False
    for p, n in zip(placements, mesh_shape, strict=True):
        if type(p) not in (Shard, Replicate, Partial):
            if not is_strided(p):
                return False  # masked partials: not lowered by our runtime
            strided_seen = True
        if is_sharded(p):
            d = p.dim if p.dim >= 0 else p.dim + len(meta.shape)
            if not 0 <= d < len(meta.shape):
                return False
            split[d] = split.get(d, 1) * n
    return all(meta.shape[d] % k == 0 for d, k in split.items()) and (not strided_seen or strided_form_ok(placements, mesh_shape))


def placeholder_options(meta: TensorMeta, mesh_shape: tuple[int, ...], *, with_strided: bool = False) -> tuple[Placements, ...]:
    """Every even Replicate/Shard combination for a stored tensor, and with
    `with_strided` (parameters) each one's strided variants (`strided_variants`)."""
    per_axis = [Replicate()] + [Shard(d) for d in range(len(meta.shape))]
    combos = [tuple(c) for c in itertools.product(per_axis, repeat=len(mesh_shape))]
    plain = [c for c in combos if valid_on(c, meta, mesh_shape)]
    if not with_strided:
        return tuple(plain)
    return tuple(plain + [v for c in plain for v in strided_variants(c, mesh_shape)])


def strided_variants(placements: Placements, mesh_shape: tuple[int, ...]) -> list[Placements]:
    """The strided layouts of the same pieces' sizes: for a dim sharded on
    axes a1 < ... < ak (k >= 2), the first m of them (0 < m < k) made
    strided, so the later axes split the dim first (FSDP over TP: the dp
    axis shards within the tp shard)."""
    out = []
    for d in sorted({p.dim for p in placements if isinstance(p, Shard)}):
        axes = [a for a, p in enumerate(placements) if isinstance(p, Shard) and p.dim == d]
        for m in range(1, len(axes)):
            sf = math.prod(mesh_shape[a] for a in axes[m:])
            v = list(placements)
            for a in axes[:m]:
                v[a] = strided(d, sf)
            out.append(tuple(v))
    return out


def build_strategies(graph: Graph, mesh_shape: tuple[int, ...], fixed: Mapping[str, Placements]) -> StrategySpace:
    """Enumerate strategies for every node. `fixed` pins placeholders (user inputs).

    A node's strategies depend only on its op, arguments, output metadata and
    the placements its inputs may arrive in (its context), so they are
    enumerated once per distinct context: the 31 later layers of a 32-layer
    model reuse the options (the very same tuple) of their first twin."""
    metas: dict[str, TensorMeta] = {}
    candidates: dict[str, tuple[Placements, ...]] = {}
    out: dict[str, NodeStrategies] = {}
    fallbacks: list[Fallback] = []
    memo: dict[object, tuple[tuple[Strategy, ...], str, str | None]] = {}
    interned: dict[tuple, tuple] = {}
    outputs_of: dict[int, tuple] = {}
    for node in graph:
        key = _context(node, fixed, metas, candidates, out)
        hit = memo.get(key) if key is not None else None
        if hit is not None:
            options, source, reason = hit
            parent = out[node.args[0].name] if node.is_getitem else None
            ns = NodeStrategies(node.name, options, source, follows=parent and (parent.follows or parent.name))
            fb = None if reason is None else Fallback(node.name, node.op_name, reason)
        else:
            ns, fb = _node_strategies(node, mesh_shape, fixed, metas, candidates, out)
            if key is not None:
                memo[key] = (ns.options, ns.source, None if fb is None else fb.reason)
        if fb is not None:
            fallbacks.append(fb)
            log.info("fallback to Replicate: %s (%s): %s", node.name, node.op_name, fb.reason)
        out[node.name] = ns
        if node.tensor_meta is not None:
            metas[node.name] = node.tensor_meta
            if id(ns.options) not in outputs_of:
                cands = tuple(dict.fromkeys(s.output for s in ns.options))
                outputs_of[id(ns.options)] = (interned.setdefault(cands, cands), ns.options)
            candidates[node.name] = outputs_of[id(ns.options)][0]
    return StrategySpace(mesh_shape, out, tuple(fallbacks))


def strategies_around(
    graph: Graph, mesh_shape: tuple[int, ...], fixed: Mapping[str, Placements], within: Mapping[str, Strategy], free: Sequence[int]
) -> StrategySpace:
    """The strategies that agree with a plan (`within`: a strategy per node
    on this mesh) on every axis outside `free`: a block of axes planned
    again with the others fixed (`dtplan.api._plan_outer_axes`).

    The block's own strategies are enumerated on a mesh of the block's axes
    alone (a plan of that mesh's size, quick at any depth), and each is
    joined with the node's `within` strategy on the fixed axes, as DTensor
    joins per-axis strategies into a mesh's (`expand_single_dim_rules`);
    joins that do not shard evenly on the real mesh are dropped. A node
    keeps its `within` strategy, so the plan is one of the space's."""
    free = tuple(free)
    sub = build_strategies(graph, tuple(mesh_shape[a] for a in free), {n: tuple(unstrided(pl[a]) for a in free) for n, pl in fixed.items()})  # on the block's axes alone a strided shard's other axes are gone: its plain shard seeds the consumers' options (a pinned placeholder keeps its real placements)
    metas = {n.name: n.tensor_meta for n in graph if n.tensor_meta is not None}
    joined: dict[tuple[int, Strategy], tuple[Strategy, ...]] = {}
    nodes = {}
    for node in graph:
        ns, w = sub.nodes[node.name], within[node.name]
        if node.is_placeholder and node.name in fixed:
            nodes[node.name] = NodeStrategies(node.name, (Strategy((), tuple(fixed[node.name])),), ns.source)
            continue
        key = (id(ns.options), w)
        if key not in joined:
            refs = node.refs()
            opts: dict[Strategy, None] = {w: None}
            for s in ns.options:
                j = _join(w, s, free)
                if j is not None and _even(j, node, refs, metas, mesh_shape):
                    opts[j] = None
            joined[key] = tuple(opts)
        nodes[node.name] = dataclasses.replace(ns, options=joined[key])
    return StrategySpace(tuple(mesh_shape), nodes, sub.fallbacks)


def _join(w: Strategy, s: Strategy, free: tuple[int, ...]) -> Strategy | None:
    """`w` with its placements on the `free` axes taken from `s` (a strategy
    on those axes alone)."""
    if len(w.inputs) != len(s.inputs):
        return None

    def one(a, b):
        if a is None or b is None:
            return None
        return tuple(b[free.index(k)] if k in free else p for k, p in enumerate(a))

    if is_multi_output(w.output) != is_multi_output(s.output):
        return None
    out = tuple(one(a, b) for a, b in zip(w.output, s.output, strict=True)) if is_multi_output(w.output) else one(w.output, s.output)
    return Strategy(tuple(one(a, b) for a, b in zip(w.inputs, s.inputs, strict=True)), out)


def _even(s: Strategy, node: Node, refs, metas, mesh_shape) -> bool:
    if not all(valid_on(p, metas.get(r), mesh_shape) for p, r in zip(s.inputs, refs, strict=True)):
        return False
    return _output_valid(s.output, node.meta, mesh_shape)


def _context(node: Node, fixed, metas, candidates, done) -> object | None:
    """What a node's strategies depend on, hashable (None: not memoised)."""
    if node.is_getitem:
        return ("getitem", id(done[node.args[0].name].options), node.args[1])
    if node.is_placeholder:
        return ("placeholder", node.role, node.tensor_meta, fixed.get(node.name))

    def ctx(a: object) -> object:
        if isinstance(a, Ref):
            cands = candidates.get(a.name)
            return ("ref", metas.get(a.name), None if cands is None else id(cands))
        if isinstance(a, tuple):
            return tuple(ctx(x) for x in a)
        return a

    key = (node.target, ctx(node.args), ctx(node.kwargs), node.meta)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _node_strategies(node, mesh_shape, fixed, metas, candidates, done) -> tuple[NodeStrategies, Fallback | None]:
    if node.is_placeholder:
        return _placeholder(node, mesh_shape, fixed), None
    if node.is_getitem:
        parent = done[node.args[0].name]
        idx = node.args[1]
        opts = tuple(Strategy((s.output[idx],), s.output[idx]) for s in parent.options)
        return NodeStrategies(node.name, opts, Source.FOLLOW, follows=parent.follows or parent.name), None
    refs = node.refs()
    if not refs:
        return NodeStrategies(node.name, (_replicated(node, 0, mesh_shape),), Source.FACTORY), None
    if rules.is_random(node.target) and rules.lookup(node.target) is None:
        # drawn whole on every rank from the same generator state: the values
        # one device draws (DTensor's rules would draw each shard apart)
        return NodeStrategies(node.name, (_replicated(node, len(refs), mesh_shape),), Source.DTPLAN), None
    # rules read only this node's inputs' candidates, never strided ones
    plain = {r: tuple(c for c in candidates[r] if not has_strided(c)) for r in set(refs) if r in candidates}
    raw, source, reason = _rule_strategies(node, mesh_shape, metas, plain)
    opts = _filter(node, raw, mesh_shape, metas, candidates) if raw else ()
    opts += _strided_follow(node, candidates, metas)
    if not opts:
        reason = reason or "no strategy with even shards on this mesh"
        return (
            NodeStrategies(node.name, (_replicated(node, len(refs), mesh_shape),), Source.FALLBACK),
            Fallback(node.name, node.op_name, reason),
        )
    return NodeStrategies(node.name, opts, source), None


def _strided_follow(node: Node, candidates, metas) -> tuple[Strategy, ...]:
    """A cast or other one-input elementwise op may run on a strided shard
    and keep it (a bf16 cast of an FSDP-over-TP weight: cast, then gather
    half the bytes, as FSDP2 does). DTensor's rules never see strided
    layouts (the runtime runs these ops on local shards)."""
    refs = node.refs()
    if len(refs) != 1 or not isinstance(node.meta, TensorMeta) or not _same_layout_op(node.target):
        return ()
    src = metas.get(refs[0])
    if src is None or src.shape != node.meta.shape:
        return ()
    return tuple(Strategy((c,), c) for c in candidates.get(refs[0], ()) if has_strided(c))


def _same_layout_op(op: object) -> bool:
    return op is _TO_COPY or rules.is_elementwise(op)


_TO_COPY = torch.ops.aten._to_copy.default


def _placeholder(node: Node, mesh_shape, fixed) -> NodeStrategies:
    meta = node.tensor_meta
    if node.name in fixed:
        pl = tuple(fixed[node.name])
        if not valid_on(pl, meta, mesh_shape):
            raise ValueError(
                f"placement {[str(p) for p in pl]} for input {node.name!r} of shape {list(meta.shape)} "
                f"does not shard evenly on mesh {list(mesh_shape)}"
            )
        return NodeStrategies(node.name, (Strategy((), pl),), Source.PLACEHOLDER)
    if node.role in (Role.PARAM, Role.BUFFER):
        options = placeholder_options(meta, mesh_shape, with_strided=node.role is Role.PARAM)
        return NodeStrategies(node.name, tuple(Strategy((), p) for p in options), Source.PLACEHOLDER)
    return NodeStrategies(node.name, (Strategy((), (Replicate(),) * len(mesh_shape)),), Source.PLACEHOLDER)


def _replicated(node: Node, n_inputs: int, mesh_shape) -> Strategy:
    r = (Replicate(),) * len(mesh_shape)
    out = r if not isinstance(node.meta, tuple) else tuple(None if m is None else r for m in node.meta)
    return Strategy((r,) * n_inputs, out)


def _rule_strategies(node: Node, mesh_shape, metas, candidates):
    own = rules.lookup(node.target)
    if own is not None:
        per_axis = own(node, metas)
        if not per_axis:
            return [], Source.FALLBACK, "dtplan's rule for this op does not cover these shapes"
        return expand_single_dim_rules(mesh_shape, per_axis, len(node.refs()), node.meta), Source.DTPLAN, None
    if dtensor_rule_kind(node.target) is None:
        return [], Source.FALLBACK, "no sharding rule for this op (DTensor or dtplan)"
    try:
        return op_strategies(mesh_shape, node.target, node.args, node.kwargs, metas, candidates, node.meta), Source.DTENSOR, None
    except Exception as e:  # noqa: BLE001 - a rule that rejects these args is a fallback, listed
        why = f"DTensor rule failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    refs = node.refs()
    if len(set(refs)) == 1 and len(candidates.get(refs[0], ())) > 1:
        # a rule that follows its input may reject one placement it may
        # arrive in (a view that cannot unflatten that split): ask per placement
        found = []
        for c in candidates[refs[0]]:
            try:
                found += op_strategies(mesh_shape, node.target, node.args, node.kwargs, metas, {refs[0]: (c,)}, node.meta)
            except Exception:  # noqa: BLE001 - that placement has no strategy; the others may
                continue
        if found:
            return found, Source.DTENSOR, None
    return [], Source.FALLBACK, why


def _filter(node: Node, raw, mesh_shape, metas, candidates) -> tuple[Strategy, ...]:
    """Even shards only, and no input Partial(max/min/avg) its producer never
    makes: turning a value into such a Partial is a free local op whose only
    effect is a reduction owed later. Partial(sum) always stays: a bias added
    to a row-parallel matmul's partial sum enters as one."""
    refs = node.refs()
    made = {r: _partials_by_axis(candidates.get(r, ())) for r in set(refs)}
    keep: dict[Strategy, None] = {}
    for ins, outp in raw:
        if len(ins) != len(refs):
            continue
        if not all(valid_on(p, metas.get(r), mesh_shape) for p, r in zip(ins, refs, strict=True)):
            continue
        if any(has_strided(p) for p in ins) or any(has_strided(o) for o in per_output(outp) if o is not None):
            continue  # strided layouts are dtplan's (`_strided_follow`), never a rule's
        if any(isinstance(p, Partial) and p != _SUM and p not in made[r].get(a, ()) for pl, r in zip(ins, refs, strict=True) for a, p in enumerate(pl)):
            continue
        if not _output_valid(outp, node.meta, mesh_shape):
            continue
        if isinstance(node.meta, tuple):
            # an output the op does not make (convolution_backward's masked
            # grad_input) has no placements, on any axis: rules combined per
            # axis can give it some on one axis and None on another
            outp = tuple(None if m is None else o for o, m in zip(outp, node.meta, strict=True))
        keep[Strategy(tuple(ins), outp)] = None
    return tuple(keep)


_SUM = Partial("sum")


def _partials_by_axis(outputs) -> dict[int, set]:
    axes: dict[int, set] = {}
    for out in outputs:
        for a, p in enumerate(out):
            if isinstance(p, Partial):
                axes.setdefault(a, set()).add(p)
    return axes


def _output_valid(outp, meta, mesh_shape) -> bool:
    if isinstance(meta, tuple):
        if not isinstance(outp, tuple) or len(outp) != len(meta) or (outp and not isinstance(outp[0], (tuple, type(None)))):
            return False
        return all(m is None or p is None or None not in p and valid_on(p, m, mesh_shape) for p, m in zip(outp, meta, strict=True))
    if not isinstance(outp, tuple) or len(outp) != len(mesh_shape) or any(isinstance(p, tuple) or p is None for p in outp):
        return False  # a rule's output of another arity than the node's
    return valid_on(outp, meta, mesh_shape)
