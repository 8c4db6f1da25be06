"""Redistribute a local shard from one placement to another with explicit
functional collectives, one per-axis step at a time.

The steps are the planner's (`dtplan.planner.space._dtensor.transform_steps`), so the
collectives a run issues are exactly the ones the plan lists. We issue them
ourselves rather than through DTensor's redistribute because on CPU DTensor
replaces all-to-all by all-gather + slice, which would break that contract
(gloo runs all-to-all fine).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard

from dtplan.ir.graph import TensorMeta
from dtplan.planner.space._dtensor import Placements, transform_steps, unstrided

__all__ = ["RankMesh", "reduce_bucket", "redistribute_local"]


@dataclass(frozen=True, slots=True)
class RankMesh:
    """What a rank needs of its mesh while tracing: resolved before tracing,
    because computing coordinates from the mesh tensor under fake tensors
    is data-dependent."""

    shape: tuple[int, ...]
    group_names: tuple[str, ...]
    coords: tuple[int, ...]

    @classmethod
    def of(cls, mesh: DeviceMesh) -> RankMesh:
        return cls(
            tuple(mesh.shape),
            tuple(mesh.get_group(i).group_name for i in range(mesh.ndim)),
            tuple(mesh.get_local_rank(i) for i in range(mesh.ndim)),
        )


def redistribute_local(local: torch.Tensor, mesh: RankMesh, meta: TensorMeta, src: Placements, dst: Placements) -> torch.Tensor:
    """This rank's shard of the value after moving it from `src` to `dst`."""
    for step in transform_steps(mesh.shape, meta, tuple(src), tuple(dst)):
        local = _apply(local, mesh, step.axis, step.src, step.dst)
    return local


def _apply(x: torch.Tensor, mesh: RankMesh, axis: int, src, dst) -> torch.Tensor:
    # a strided step is its plain twin on the local shard: the steps order
    # the axes so that it gathers, scatters or chunks consecutive pieces
    src, dst = unstrided(src), unstrided(dst)
    group = mesh.group_names[axis]
    p = mesh.shape[axis]
    if p == 1:
        return x  # one rank on the axis: its shard, its sum and its copy are the value
    if isinstance(src, Partial):
        if isinstance(dst, Partial):
            if src.reduce_op == dst.reduce_op:
                return x
            # a local rescale: the p pieces of an average are each 1/p of a sum's
            scale = {("avg", "sum"): 1 / p, ("sum", "avg"): float(p)}.get((src.reduce_op, dst.reduce_op))
            if scale is not None:
                return x * scale
        if isinstance(dst, Replicate):
            return _sync(funcol.all_reduce(x.contiguous(), src.reduce_op, group))
        if isinstance(dst, Shard):
            return _sync(funcol.reduce_scatter_tensor(x.contiguous(), src.reduce_op, dst.dim, group))
    elif isinstance(src, Shard):
        if isinstance(dst, Replicate):
            return _sync(funcol.all_gather_tensor(x.contiguous(), src.dim, group))
        if isinstance(dst, Shard):
            return _all_to_all(x, src.dim, dst.dim, p, group)
        if isinstance(dst, Partial):
            raise ValueError(f"no direct Shard -> Partial step on mesh axis {axis}")
    elif isinstance(src, Replicate):
        coord = mesh.coords[axis]
        if isinstance(dst, Shard):
            return x.chunk(p, dst.dim)[coord].contiguous()
        if isinstance(dst, Partial):
            keep = dst.reduce_op != "sum" or coord == 0
            return x if keep else torch.zeros_like(x)
    raise ValueError(f"unsupported redistribution step {src} -> {dst} on mesh axis {axis}")



def _sync(t: torch.Tensor) -> torch.Tensor:
    """Wait for an eager async result; under tracing funcol already waited."""
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _all_to_all(x: torch.Tensor, gather_dim: int, shard_dim: int, p: int, group) -> torch.Tensor:
    """S(gather_dim) -> S(shard_dim): send chunk k of `shard_dim` to rank k,
    concatenate what arrives along `gather_dim` in rank order."""
    chunks = x.chunk(p, shard_dim)
    send = torch.stack([c.contiguous() for c in chunks], 0).flatten(0, 1)
    recv = _sync(funcol.all_to_all_single(send, None, None, group))
    pieces = recv.reshape(p, *chunks[0].shape).unbind(0)
    return torch.cat(pieces, gather_dim)


def reduce_bucket(locals_: list[torch.Tensor], mesh: RankMesh, kind: str, axis: int, reduce_op: str) -> list[torch.Tensor]:
    """One collective for several reductions on mesh axis `axis` (a gradient
    bucket, `dtplan.planner.evaluate.buckets`): the local values flattened
    into one buffer, reduced at once, and each result a view of its piece.

    all_reduce: the buffer is the values end to end. reduce_scatter (to a
    shard of dim 0): rank k's piece of every value is its k-th block of
    rows, so the buffer is, rank by rank, each value's block for that rank
    (`[x.view(p, -1) ...]` side by side); what comes back is this rank's
    blocks end to end. Same values as one collective per tensor."""
    group, p = mesh.group_names[axis], mesh.shape[axis]
    if kind == "all_reduce":
        flat = torch.cat([x.reshape(-1) for x in locals_])
        out = _sync(funcol.all_reduce(flat, reduce_op, group))
        pieces = out.split([x.numel() for x in locals_])
        return [piece.view(x.shape) for piece, x in zip(pieces, locals_, strict=True)]
    if kind == "reduce_scatter":
        flat = torch.cat([x.reshape(p, -1) for x in locals_], 1).reshape(-1)
        out = _sync(funcol.reduce_scatter_tensor(flat, reduce_op, 0, group))
        pieces = out.split([x.numel() // p for x in locals_])
        return [piece.view(x.shape[0] // p, *x.shape[1:]) for piece, x in zip(pieces, locals_, strict=True)]
    raise ValueError(f"cannot bucket {kind}")
