"""Shard full tensors (parameters, buffers, inputs) into this rank's local pieces."""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard

from planner._dtensor import Placements

__all__ = ["local_shard"]


def local_shard(full: torch.Tensor, mesh: DeviceMesh, placements: Placements) -> torch.Tensor:
    """This rank's piece of `full` (even sharding; axis 0 splits first, as DTensor does).

    Returns a fresh contiguous tensor, so the full tensor can be freed."""
    x = full
    for axis, p in enumerate(placements):
        if isinstance(p, Shard):
            x = x.chunk(mesh.size(axis), p.dim)[mesh.get_local_rank(axis)]
        elif not p.is_replicate():
            raise ValueError(f"cannot shard a full tensor to {p} on mesh axis {axis}")
    return x.detach().clone(memory_format=torch.contiguous_format)
