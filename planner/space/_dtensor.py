"""Adapter over DTensor's private sharding machinery (torch 2.13).

Every private torch.distributed.tensor import of the planner lives here, so a
torch upgrade touches this file only.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor._dtensor_spec import TensorMeta as DTMeta
from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy, TupleStrategy
from torch.distributed.tensor._ops import utils as _ops_utils
from torch.distributed.tensor._ops.single_dim_strategy import _ShardingPlaceholder
from torch.distributed.tensor._redistribute import _gen_transform_infos
from torch.distributed.tensor.placement_types import Placement, _StridedShard
from torch.utils._python_dispatch import _disable_current_modes

from dtplan.ir.graph import Ref, TensorMeta

__all__ = [
    "Placements",
    "TransformStep",
    "local_shape",
    "unstrided",
    "dtensor_rule_kind",
    "dtensor_spec",
    "is_multi_output",
    "per_output",
    "format_placements",
    "has_strided",
    "is_sharded",
    "is_strided",
    "op_strategies",
    "parse_placement",
    "planning_mesh",
    "strided",
    "strided_form_ok",
    "transform_steps",
    "expand_single_dim_rules",
]

#: One placement per mesh axis.
Placements = tuple[Placement, ...]
#: A per-axis rule: [output placement(s)..., input placements...]; None for absent values.
AxisRule = Sequence[Placement | None]


@functools.cache
def planning_mesh(shape: tuple[int, ...]) -> DeviceMesh:
    """A DeviceMesh of this shape with no process group: enough to enumerate
    strategies and redistribution steps for any world size in one process."""
    n = 1
    for s in shape:
        n *= s
    # built outside any active tracing/fake mode: the runtime may first ask while tracing
    with _disable_current_modes():
        return DeviceMesh("cpu", torch.arange(n).reshape(shape), _init_backend=False, _rank=0)


#: the reductions a Partial placement can owe (DTensor's)
_REDUCE_OPS = ("sum", "avg", "max", "min")
_PLACEMENT_RE = re.compile(r"^(R|S\((-?\d+)\)|P\((\w+)\)|_S\((-?\d+),\s*(\d+)\))$")


def parse_placement(text: str) -> Placement:
    """"R" / "S(0)" / "P(sum)" / "_S(0, 8)" -> Placement (DTensor's short
    forms; the last a `_StridedShard` of split factor 8, see `strided`)."""
    m = _PLACEMENT_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad placement {text!r}; expected R, S(<dim>), _S(<dim>, <split factor>) or P(<reduce op>)")
    if m.group(4) is not None:
        return strided(int(m.group(4)), int(m.group(5)))
    if m.group(2) is not None:
        return Shard(int(m.group(2)))
    if m.group(3) is not None:
        if m.group(3) not in _REDUCE_OPS:
            raise ValueError(f"bad placement {text!r}: Partial's reduce op must be one of {', '.join(_REDUCE_OPS)}")
        return Partial(m.group(3))
    return Replicate()


# --------------------------------------------------------------------------- strided shards


def strided(dim: int, split_factor: int) -> Placement:
    """DTensor's `_StridedShard`: this mesh axis splits `dim` *within* the
    split the later axes make of it (FSDP2 over tensor parallelism shards
    each tp shard again on dp). `split_factor` is the number of pieces the
    later axes cut the dim into.

    dtplan's strided form (`strided_form_ok`): the axes sharding a dim
    strided all come before the axes sharding it plainly (at least one),
    and each split factor is the product of those plain axes' sizes. Rank
    coordinates then hold piece ``i_plain * n_strided + i_strided`` of the
    ``n_plain * n_strided`` pieces of the dim (each index row-major over its
    axes), as DTensor lays it out (`tests/test_strided.py` checks it
    against DTensor's offsets)."""
    return _StridedShard(dim, split_factor=split_factor)


#: (sharded, strided) by a placement's exact class. torch's placements are
#: custom classes whose metaclass makes `isinstance` run Python code, and
#: the planner asks it millions of times per plan; another class (a
#: subclass, a stand-in) takes `isinstance`.
_KINDS: dict[type, tuple[bool, bool]] = {Shard: (True, False), _StridedShard: (True, True), Replicate: (False, False), Partial: (False, False)}


def is_strided(p: object) -> bool:
    kind = _KINDS.get(type(p))
    return kind[1] if kind is not None else isinstance(p, _StridedShard)


def is_sharded(p: object) -> bool:
    """Shard or strided shard: the axis divides the value's storage."""
    kind = _KINDS.get(type(p))
    return kind[0] if kind is not None else isinstance(p, (Shard, _StridedShard))


def unstrided(p: object) -> object:
    """A strided shard as its plain shard on the same dim (the runtime runs a
    strided step as its plain twin on the local shard; on a mesh of some axes
    alone, the axes a strided shard is strided over are gone)."""
    return Shard(p.dim) if is_strided(p) else p


def has_strided(placements: Sequence[object] | None) -> bool:
    return placements is not None and any(is_strided(p) for p in placements)


def strided_form_ok(placements: Sequence[Placement], mesh_shape: Sequence[int]) -> bool:
    """Whether every strided shard in `placements` is in dtplan's strided
    form (see `strided`); placements without one are."""
    for a, p in enumerate(placements):
        if not is_strided(p):
            continue
        later = [(b, q) for b, q in enumerate(placements) if b > a and is_sharded(q) and q.dim == p.dim]
        plain = [b for b, q in later if not is_strided(q)]
        if not plain or any(is_strided(q) and b > plain[0] for b, q in later):
            return False
        if any(not is_strided(q) and q.dim == p.dim for q in placements[:a] if isinstance(q, Shard)):
            return False
        if p.split_factor != math.prod(mesh_shape[b] for b in plain):
            return False
    return True


def is_multi_output(output: Placements | tuple[Placements | None, ...]) -> bool:
    """A strategy's (or plan node's) output holds one Placements per output of
    a multi-output op (None for a non-tensor output), else one Placements."""
    return bool(output) and (output[0] is None or isinstance(output[0], tuple))


def per_output(output: Placements | tuple[Placements | None, ...]) -> tuple[Placements | None, ...]:
    """The placements of each output (a single-output op's as a 1-tuple)."""
    return tuple(output) if is_multi_output(output) else (output,)


def format_placements(p: Placements | None) -> list[str] | None:
    return None if p is None else [str(x) for x in p]


def dtensor_spec(mesh: DeviceMesh, placements: Placements, meta: TensorMeta) -> DTensorSpec:
    """The DTensorSpec of a tensor with this metadata and these placements."""
    return DTensorSpec(mesh, tuple(placements), tensor_meta=DTMeta(meta.shape, meta.stride, meta.dtype))


# --------------------------------------------------------------------------- redistribution


@dataclass(frozen=True, slots=True)
class TransformStep:
    """One per-axis step of a redistribution, in the order DTensor performs it."""

    axis: int
    src: Placement
    dst: Placement

    @property
    def kind(self) -> str | None:
        """The collective this step issues, or None for a local op."""
        s, d = self.src, self.dst
        if s.is_partial():
            return "all_reduce" if d.is_replicate() else ("reduce_scatter" if is_sharded(d) else None)
        if is_sharded(s):
            if d.is_replicate():
                return "all_gather"
            return "all_to_all" if isinstance(s, Shard) and isinstance(d, Shard) else "invalid"
        return None


def transform_steps(mesh_shape: tuple[int, ...], meta: TensorMeta, src: Placements, dst: Placements) -> tuple[TransformStep, ...]:
    """The per-axis steps DTensor's redistribute planner takes from `src` to `dst`.

    For placements in their default order (Shard, Replicate and Partial: all
    dtplan plans), DTensor plans greedily from the placements alone; the
    tensor's shape only sizes its logical shapes, which the steps do not
    need. So the steps are asked once per (mesh, rank of the tensor,
    placements), not per shape: the 8B step prices 13k redistributions that
    reduce to 2k.

    Strided shards (`strided`) are left and entered by dtplan's own steps
    (`_strided_steps`), DTensor planning the plain part between."""
    if src == dst:
        return ()
    if has_strided(src) or has_strided(dst):
        return _strided_steps(tuple(mesh_shape), len(meta.shape), tuple(src), tuple(dst))
    steps = _steps(tuple(mesh_shape), len(meta.shape), tuple(src), tuple(dst))
    return _hierarchical(steps, tuple(mesh_shape), meta, tuple(src), tuple(dst))


#: a sum over two or more mesh axes of a value at least this large (bytes
#: per device) is reduced hierarchically (`_hierarchical`)
HIERARCHICAL_MIN_BYTES = 1 << 20


def _hierarchical(steps: tuple[TransformStep, ...], mesh_shape: tuple[int, ...], meta: TensorMeta, src: Placements, dst: Placements) -> tuple[TransformStep, ...]:
    """Reductions over several mesh axes, ordered to move fewer bytes than
    DTensor's per-axis order (the gradients of data parallel or HSDP over
    two or more axes are these).

    - Reduce-scatters first: DTensor may all-reduce the whole value on one
      axis before reduce-scattering it on another (HSDP's gradient, Partial
      on both axes to Replicate then Shard); scattered first, the sum runs
      on the shard. Sums over distinct axes commute, so only the order moves.
    - A value summed on two or more axes and scattered on none, DTensor
      all-reduces whole once per axis: 2(n0-1)/n0 + 2(n1-1)/n1 of its bytes
      per device over two axes. Reduce-scattered on the innermost of them,
      summed over the others on that shard and gathered back, it moves
      2(n1-1)/n1 + 2(n0-1)/(n0 n1): what one all-reduce over all n0 n1
      ranks moves, the full-size traffic on the fastest (innermost) axis.
      Done for values of `HIERARCHICAL_MIN_BYTES` or more (two more
      collectives' latency against the bytes saved), on a dim no placement
      touches that the inner axis divides evenly (dim 0 first: no copies)."""
    sums = [k for k, st in enumerate(steps) if st.src.is_partial() and st.dst.is_replicate() and mesh_shape[st.axis] > 1]
    if not sums or len({st.src.reduce_op for st in steps if st.src.is_partial()}) != 1:
        return steps
    if all(st.src.is_partial() and not st.dst.is_partial() for st in steps):
        scatters = [st for st in steps if is_sharded(st.dst)]
        if scatters:
            return tuple(scatters + [st for st in steps if not is_sharded(st.dst)])
    if len(sums) < 2:
        return steps
    local = local_shape(meta.shape, mesh_shape, src)
    if math.prod(local) * meta.itemsize < HIERARCHICAL_MIN_BYTES:
        return steps
    inner = max(steps[k].axis for k in sums)
    used = {p.dim for p in (*src, *dst) if is_sharded(p)}
    dim = next((d for d, n in enumerate(local) if d not in used and n % mesh_shape[inner] == 0), None)
    if dim is None:
        return steps
    partial = steps[sums[0]].src
    block = [TransformStep(inner, partial, Shard(dim))]
    block += [steps[k] for k in sums if steps[k].axis != inner]
    block += [TransformStep(inner, Shard(dim), Replicate())]
    rest = [st for k, st in enumerate(steps) if k not in sums]
    at = sums[0]
    return tuple(rest[:at] + block + rest[at:])


def local_shape(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: Placements) -> tuple[int, ...]:
    """The per-rank shape of an evenly sharded tensor."""
    out = list(shape)
    for p, n in zip(placements, mesh_shape, strict=True):
        if is_sharded(p):
            out[p.dim] //= n
    return tuple(out)


@functools.lru_cache(maxsize=1 << 12)
def _strided_steps(mesh_shape: tuple[int, ...], ndim: int, src: Placements, dst: Placements) -> tuple[TransformStep, ...]:
    """Out of a strided layout, each strided axis is gathered, innermost
    first: each gather concatenates consecutive pieces (see `strided`), so
    it is one all-gather of the local shard, and what is left is strided or
    plain nested shards again. Into one, plain steps reach the target with
    each strided axis holding its Partial (if the value owes one there) or
    Replicate, then each strided axis, outermost first, reduce-scatters
    (or takes its local chunk of) the piece the later axes left it. So
    FSDP over TP costs one dp all-gather of the tp shard and one dp
    reduce-scatter of the tp-sharded gradient, as FSDP2 runs it."""
    steps: list[TransformStep] = []
    cur = list(src)
    for a in reversed(range(len(cur))):
        if is_strided(cur[a]):
            steps.append(TransformStep(a, cur[a], Replicate()))
            cur[a] = Replicate()
    mid = [(cur[a] if cur[a].is_partial() else Replicate()) if is_strided(p) else p for a, p in enumerate(dst)]
    if tuple(cur) != tuple(mid):
        steps += _steps(mesh_shape, ndim, tuple(cur), tuple(mid))
    steps += [TransformStep(a, mid[a], p) for a, p in enumerate(dst) if is_strided(p)]
    return tuple(steps)


@functools.lru_cache(maxsize=1 << 16)  # bounded: shared by every plan in a process
def _steps(mesh_shape: tuple[int, ...], ndim: int, src: Placements, dst: Placements) -> tuple[TransformStep, ...]:
    mesh = planning_mesh(mesh_shape)
    # a shape every axis divides evenly (the steps do not depend on it)
    n = math.prod(mesh_shape)
    meta = TensorMeta(shape=(n,) * ndim, stride=tuple(n ** (ndim - 1 - d) for d in range(ndim)), dtype=torch.float32)
    infos = _gen_transform_infos(dtensor_spec(mesh, src, meta), dtensor_spec(mesh, dst, meta))
    steps = []
    for i in infos:
        a, b = i.src_dst_placements
        if a.is_shard() and b.is_partial():  # DTensor does this as gather, then a local partition
            steps.append(TransformStep(i.mesh_dim, a, Replicate()))
            a = Replicate()
        steps.append(TransformStep(i.mesh_dim, a, b))
    return tuple(steps)


# --------------------------------------------------------------------------- strategies


def dtensor_rule_kind(op: object) -> str | None:
    """"single_dim" / "strategy" when DTensor has a rule for `op`, else None."""
    prop = DTensor._op_dispatcher.sharding_propagator
    if op in prop.op_single_dim_strategy_funcs:
        return "single_dim"
    if op in prop.op_strategy_funcs:
        return "strategy"
    return None


def _materialise(args: tuple, fn: Callable[[Ref], object], tensor_list: Callable[[list], object] = list) -> tuple:
    """Rebuild a call's arguments for DTensor: refs through `fn`, nested
    sequences as lists (the IR stores fx's lists as tuples), lists of tensors
    through `tensor_list`."""

    def one(a: object) -> object:
        if isinstance(a, Ref):
            return fn(a)
        if isinstance(a, tuple):
            items = [one(x) for x in a]
            return tensor_list(items) if a and all(isinstance(x, Ref) for x in a) else items
        return a

    return tuple(one(a) for a in args)


def _to_dt_meta(meta: TensorMeta) -> DTMeta:
    return DTMeta(meta.shape, meta.stride, meta.dtype)


def op_strategies(
    mesh_shape: tuple[int, ...],
    op: object,
    args: tuple,
    kwargs: tuple[tuple[str, object], ...],
    metas: dict[str, TensorMeta],
    candidates: dict[str, tuple[Placements, ...]],
    out_meta: TensorMeta | tuple[TensorMeta | None, ...] | None,
) -> list[tuple[tuple[Placements, ...], object]]:
    """DTensor's strategies for one op: [(input placements per tensor ref, output placements)].

    `candidates[name]` are the placements the producer of each input may output;
    strategy functions that follow their input enumerate over them.
    """
    mesh = planning_mesh(mesh_shape)
    prop = DTensor._op_dispatcher.sharding_propagator
    kind = dtensor_rule_kind(op)
    if kind == "single_dim":
        to_meta = lambda r: _to_dt_meta(metas[r.name])  # noqa: E731
        args_meta = _materialise(args, to_meta)
        kwargs_meta = {k: _materialise((v,), to_meta)[0] for k, v in kwargs}
        rules = prop.op_single_dim_strategy_funcs[op].func(op, args_meta, kwargs_meta)
        n_in = _count_refs((args, tuple(v for _, v in kwargs)))
        return expand_single_dim_rules(mesh_shape, rules, n_in, out_meta)
    if kind != "strategy":
        raise KeyError(op)

    def strategy_of(r: Ref) -> OpStrategy:
        return OpStrategy([OpSpec(dtensor_spec(mesh, p, metas[r.name])) for p in candidates[r.name]])

    schema = OpSchema(
        op,
        _materialise(args, strategy_of, TupleStrategy),
        {k: _materialise((v,), strategy_of, TupleStrategy)[0] for k, v in kwargs},
    )
    with _unpriced():
        result = prop.op_strategy_funcs[op](schema)
    n_in = _count_refs((args, tuple(v for _, v in kwargs)))
    if isinstance(result, TupleStrategy):
        raise KeyError(op)  # list-of-tensor ops: not planned yet; caller falls back
    out: list[tuple[tuple[Placements, ...], object]] = []
    for spec in result.strategies:
        outs = spec.output_specs
        if isinstance(outs, DTensorSpec):
            out_pl: object = outs.placements
        else:
            out_pl = tuple(None if s is None else s.placements for s in outs)
        if spec.input_specs is None:
            ins = tuple(outs.placements for _ in range(n_in))
        else:
            ins = tuple(s.placements for s in spec.input_specs)
        out.append((ins, out_pl))
    return out


@contextlib.contextmanager
def _unpriced() -> Iterator[None]:
    """DTensor's strategy functions price every input redistribution of
    every strategy (`generate_redistribute_costs`) for its own sharding
    propagator to choose by; the planner reads only the placements and
    prices with its own cost model, and that pricing was the largest part of
    building strategies. While a strategy function runs, a redistribution
    costs it nothing to price. (Module state: eager DTensor dispatch in
    another thread of the same process, while a plan is made, would see the
    zero too; dtplan plans before its ranks run DTensors, never beside them.)"""
    saved = _ops_utils.redistribute_cost
    _ops_utils.redistribute_cost = _no_cost
    try:
        yield
    finally:
        _ops_utils.redistribute_cost = saved


def _no_cost(src: DTensorSpec, dst: DTensorSpec) -> float:
    return 0.0


def _count_refs(value: object) -> int:
    if isinstance(value, Ref):
        return 1
    if isinstance(value, tuple):
        return sum(_count_refs(v) for v in value)
    return 0


def expand_single_dim_rules(
    mesh_shape: tuple[int, ...],
    rules: Sequence[AxisRule],
    n_inputs: int,
    out_meta: TensorMeta | tuple[TensorMeta | None, ...] | None,
) -> list[tuple[tuple[Placements, ...], object]]:
    """Combine per-axis rules over every mesh axis (placeholders become Shard)."""
    concrete = [[Shard(p.dim) if isinstance(p, _ShardingPlaceholder) else p for p in r] for r in rules]
    n_out = len(out_meta) if isinstance(out_meta, tuple) else 1
    concrete = [r for r in concrete if len(r) == n_out + n_inputs]  # rules listing a scalar argument: not ours
    if not any(all(p is None or isinstance(p, Replicate) for p in r) for r in concrete):
        concrete.insert(0, [None if _masked(out_meta, i) else Replicate() for i in range(n_out)] + [Replicate()] * n_inputs)
    result = []
    for combo in itertools.product(concrete, repeat=len(mesh_shape)):
        cols = list(zip(*combo, strict=True))  # per position: placements over axes
        if any(_unsupported_partials(c) for c in cols):
            continue
        outs = tuple(None if c[0] is None else tuple(c) for c in cols[:n_out])
        ins = tuple(tuple(c) for c in cols[n_out:])
        if any(None in i for i in ins):
            continue
        result.append((ins, outs[0] if n_out == 1 else outs))
    return result


def _masked(out_meta: object, i: int) -> bool:
    return isinstance(out_meta, tuple) and i < len(out_meta) and out_meta[i] is None


def _unsupported_partials(col: Sequence[Placement | None]) -> bool:
    """Mixed reduce ops on one tensor, or Partial subclasses (masked partials of
    embedding) whose reduction needs runtime state the plan cannot express."""
    kinds = {(type(p), p.reduce_op) for p in col if isinstance(p, Partial)}
    return len(kinds) > 1 or any(type(p) is not Partial for p in col if isinstance(p, Partial))
