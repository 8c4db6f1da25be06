"""Price strategies and edges under a DeviceProfile: compute time per strategy,
and the collectives (with their times) that turn one placement into another.

The collectives come from the same per-axis transform steps the runtime
executes (`dtplan.planner.space._dtensor.transform_steps`), so what the plan predicts is
what a run issues.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from dtplan.ir.graph import Node, Role, TensorMeta, dtype_name
from dtplan.planner.space._dtensor import Placements, is_sharded, local_shape, per_output, transform_steps
from dtplan.planner.cost.device import DeviceProfile, compute_time
from dtplan.planner.space.strategies import Strategy, shard_factor

__all__ = ["BUCKET_BYTES", "BUCKETED", "Collective", "Pricer", "bucket_key", "local_shape", "optimizer_state_factor", "primary_output"]

#: the most bytes one gradient bucket holds (`dtplan.planner.evaluate`
#: buckets the gradients' reductions): DDP's first bucket is 1 MiB and the
#: rest 25 MiB; a few MiB amortise a collective's latency (a gloo all-reduce
#: of 4 KiB costs a quarter of one of 4 MiB) while the first buckets still
#: start under the rest of backward. A larger gradient is a bucket alone.
BUCKET_BYTES = 4 << 20
#: the collectives a bucket can merge: their buffers concatenate
BUCKETED = frozenset({"all_reduce", "reduce_scatter"})


@dataclass(frozen=True, slots=True)
class Collective:
    """One collective on one mesh axis. `bytes` follows the plan-file convention:
    the full buffer (all-reduce), the output (all-gather), the input
    (reduce-scatter) or the per-rank send buffer (all-to-all)."""

    kind: str
    axis: int
    bytes: int
    time_s: float


#: ops whose elements each cost many instructions (a profile may measure
#: their bandwidth apart: `DeviceProfile.bandwidth_at(kind="transcendental")`)
_TRANSCENDENTAL = frozenset(
    {
        "gelu", "gelu_backward", "silu", "silu_backward", "_softmax", "_softmax_backward_data", "_log_softmax",
        "_log_softmax_backward_data", "native_layer_norm", "native_layer_norm_backward", "exp", "log", "tanh",
        "tanh_backward", "sigmoid", "sigmoid_backward", "erf", "rsqrt", "sqrt", "pow", "sin", "cos",
    }
)


def primary_output(strategy: Strategy) -> Placements | None:
    """The output placements, or the first tensor output's for multi-output ops."""
    return next((o for o in per_output(strategy.output) if o is not None), None)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class Pricer:
    """Costs on one mesh under one profile."""

    mesh_shape: tuple[int, ...]
    profile: DeviceProfile
    #: optimizer state bytes per parameter byte, sharded as the parameter
    #: (AdamW: two fp32 moments; plain SGD: none)
    state_factor: float = 0.0
    #: the bucket size whose per-byte rate a bucketed gradient reduction is
    #: charged (`gradient_collectives`); 0: no bucketing
    bucket_bytes: int = 0
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @functools.cached_property
    def links(self):
        return self.profile.axis_links(self.mesh_shape)

    def compute_s(self, node: Node, strategy: Strategy) -> float:
        """Roofline time of the node's local share of work (an op without
        work: its dispatch where the profile's host dispatches serially)."""
        if node.flops == 0 and node.bytes == 0:
            serial = self.profile.dispatch_serial and not node.is_placeholder and not node.is_getitem
            return self.profile.op_launch_s if serial else 0.0
        first = primary_output(strategy)
        f = shard_factor(first, self.mesh_shape) if first is not None else 1
        metas = node.meta if isinstance(node.meta, tuple) else (node.meta,)
        meta = next((m for m in metas if m is not None), None)
        dt = dtype_name(meta.dtype) if meta is not None else "float32"
        op = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        kind, size, rows = "matmul", None, 0.0
        if "attention" in op and meta is not None and meta.shape:
            # fused attention: its efficiency follows the head dimension, the
            # output's last; its per-row work the output's rows (queries)
            kind, size = ("attention_backward" if "backward" in op else "attention"), meta.shape[-1]
            rows = _numel(meta.shape) / max(1, meta.shape[-1]) / f
        elif op in ("convolution", "convolution_backward"):
            kind = op
        elif op in _TRANSCENDENTAL:
            kind = "transcendental"
        elif op == "_to_copy":
            kind = "cast"
        return compute_time(node.flops / f, node.bytes / f, self.profile, dt, kind, size, rows)

    def redistribute(self, meta: TensorMeta, src: Placements, dst: Placements) -> tuple[Collective, ...]:
        """The collectives taking a tensor from `src` to `dst` placements
        (memoised per pricer: every edge of a repeated layer asks the same)."""
        key = (meta, src, dst)
        if key not in self._memo:
            self._memo[key] = self._redistribute(meta, src, dst)
        return self._memo[key]

    def _redistribute(self, meta: TensorMeta, src: Placements, dst: Placements) -> tuple[Collective, ...]:
        if src == dst:
            return ()
        out: list[Collective] = []
        current = list(src)
        for step in transform_steps(self.mesh_shape, meta, src, dst):
            kind = step.kind
            if kind == "invalid":
                raise ValueError(f"cannot redistribute {step.src} -> {step.dst} on mesh axis {step.axis}")
            before = local_shape(meta.shape, self.mesh_shape, tuple(current))
            current[step.axis] = step.dst
            if kind is None:
                continue
            after = local_shape(meta.shape, self.mesh_shape, tuple(current))
            p = self.mesh_shape[step.axis]
            if p == 1:
                continue  # one rank on the axis: nothing moves (`runtime.redistribute`)
            shape = after if kind == "all_gather" else before
            nbytes = _numel(shape) * meta.itemsize
            if kind == "all_to_all":
                nbytes = _numel(before) * meta.itemsize
            t = self.profile.collective_seconds(kind, nbytes, p, self.links[step.axis]) + self._rearrange_s(kind, step, nbytes)
            out.append(Collective(kind, step.axis, nbytes, t))
        return tuple(out)

    def _rearrange_s(self, kind: str, step, nbytes: int) -> float:
        """Local copies around the collective: collectives work on dim 0, so
        gathering or scattering another dim costs a read and a write of the
        buffer, and all-to-all packs and unpacks it."""
        if kind == "all_gather" and step.src.dim != 0 or kind == "reduce_scatter" and step.dst.dim != 0:
            return 2 * nbytes / self.profile.memory_bandwidth
        if kind == "all_to_all":
            return 4 * nbytes / self.profile.memory_bandwidth
        return 0.0

    def redistribute_s(self, meta: TensorMeta, src: Placements, dst: Placements) -> float:
        return sum(c.time_s for c in self.redistribute(meta, src, dst))

    def gradient_collectives(self, meta: TensorMeta, src: Placements, dst: Placements) -> tuple[Collective, ...]:
        """The collectives a gradient output takes to its parameter's
        placements. Where that is one bucketable reduction (`gradient_key`),
        it travels in a bucket with others (`dtplan.planner.evaluate.buckets`)
        and is charged its bytes at the per-byte rate of a bucket of
        `bucket_bytes`: its share of the bucket's time, the bucket's latency
        spread over its members (one larger than that: its own time). The
        integer program prices gradients so, and the overlap simulation
        times each bucket whole."""
        colls = self.redistribute(meta, src, dst)
        return colls if self.gradient_key(meta, src, dst) is None else tuple(map(self._bucket_share, colls))

    def gradient_key(self, meta: TensorMeta, src: Placements, dst: Placements) -> tuple | None:
        """The gradient's `bucket_key`; None where it is not bucketable or
        this pricer does not bucket."""
        return bucket_key(self.mesh_shape, meta, src, dst) if self.bucket_bytes else None

    def _bucket_share(self, c: Collective) -> Collective:
        size = max(self.bucket_bytes, c.bytes)  # one larger than a bucket travels alone
        return Collective(c.kind, c.axis, c.bytes, self.bucket_s(c.kind, c.axis, size) * c.bytes / size)

    def gradient_s(self, meta: TensorMeta, src: Placements, dst: Placements) -> float:
        return sum(c.time_s for c in self.gradient_collectives(meta, src, dst))

    def bucket_s(self, kind: str, axis: int, nbytes: int) -> float:
        """Seconds of one bucket's collective of `nbytes` on mesh axis `axis`."""
        return self.profile.collective_seconds(kind, nbytes, self.mesh_shape[axis], self.links[axis])

    def bytes_per_device(self, meta: TensorMeta, placements: Placements) -> int:
        """Bytes one device holds of a tensor with these placements."""
        return meta.nbytes // _storage_factor(placements, self.mesh_shape)

    def resident_bytes(self, node: Node, placements: Placements) -> int:
        """Bytes a stored value keeps on one device for the whole step: its
        shard, plus the optimizer state of a trained parameter."""
        own = self.bytes_per_device(node.tensor_meta, placements)
        return own + int(own * self.state_factor) if node.role is Role.PARAM else own


def bucket_key(mesh_shape: tuple[int, ...], meta: TensorMeta, src: Placements, dst: Placements) -> tuple | None:
    """What a redistribution shares with those it may be bucketed with, or
    None where it cannot be: it must be one step, a reduction on one mesh
    axis (all-reduce to Replicate, or reduce-scatter to a shard of dim 0,
    whose pieces concatenate rank by rank). Key: (kind, axis, dtype, reduce op)."""
    steps = transform_steps(mesh_shape, meta, src, dst)
    if len(steps) != 1 or mesh_shape[steps[0].axis] == 1:
        return None
    step = steps[0]
    kind = step.kind
    if kind not in BUCKETED or kind == "reduce_scatter" and step.dst.dim != 0:
        return None
    return (kind, step.axis, dtype_name(meta.dtype), step.src.reduce_op)


def optimizer_state_factor(optimizer: str | None, dtype_itemsize: int = 4) -> float:
    """Optimizer state bytes per parameter byte: AdamW keeps two fp32 moments."""
    if optimizer is None or optimizer == "sgd":
        return 0.0
    if optimizer == "adamw":
        return 2 * 4 / dtype_itemsize
    raise ValueError(f"unknown optimizer {optimizer!r}; dtplan knows adamw and sgd")


def _storage_factor(placements: Placements, mesh_shape: tuple[int, ...]) -> int:
    # a Partial value is full-size on every rank; only Shard divides storage
    f = 1
    for p, n in zip(placements, mesh_shape, strict=True):
        if is_sharded(p):
            f *= n
    return f

