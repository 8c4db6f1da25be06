"""Shard full tensors (parameters, buffers, inputs) into this rank's local pieces."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard

from dtplan.planner.space._dtensor import Placements, is_strided

__all__ = ["local_shard", "piece"]


def piece(full: torch.Tensor, sizes: Sequence[int], coords: Sequence[int], placements: Placements) -> torch.Tensor:
    """The piece of `full` at mesh coordinates `coords` on a mesh of axis
    sizes `sizes` (even sharding; axis 0 splits first, as DTensor does, and
    strided axes split within the piece the plain ones leave: see
    `dtplan.planner.space._dtensor.strided`): a view, traceable with the
    coordinates known ahead (`dtplan.runtime.redistribute.RankMesh`)."""
    x = full
    for axis, p in enumerate(placements):
        if isinstance(p, Shard):
            x = x.chunk(sizes[axis], p.dim)[coords[axis]]
        elif not p.is_replicate() and not is_strided(p):
            raise ValueError(f"cannot shard a full tensor to {p} on mesh axis {axis}")
    for axis, p in enumerate(placements):
        if is_strided(p):
            x = x.chunk(sizes[axis], p.dim)[coords[axis]]
    return x


def local_shard(full: torch.Tensor, mesh: DeviceMesh, placements: Placements) -> torch.Tensor:
    """This rank's piece of `full` as a fresh contiguous tensor, so the full
    tensor can be freed."""
    sizes = [mesh.size(a) for a in range(mesh.ndim)]
    coords = [mesh.get_local_rank(a) for a in range(mesh.ndim)]
    return piece(full, sizes, coords, placements).detach().clone(memory_format=torch.contiguous_format)
