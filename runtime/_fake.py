"""Adapter over torch's fake process group and fake tensors (abstract lowering).

`dtplan.runtime.abstract` lowers any rank of any mesh in one process: over
torch's *fake* process-group backend (every rank's groups exist here and
nothing is ever sent) and on FakeTensors (shapes, no storage). Both are
private torch APIs; they are imported here only, so a torch upgrade touches
this file (and `dtplan.runtime.replay`, the lowering's adapter) only:

- `torch.testing._internal.distributed.fake_pg.FakeStore`: importing the
  module registers the "fake" backend with `torch.distributed`, and a
  `FakeStore` is the store `init_process_group("fake", ...)` is given.
- `torch._subclasses.fake_tensor.FakeTensorMode`: the mode the example
  local shards are made in, so tracing allocates no memory.
"""
from __future__ import annotations

import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = ["FakeTensorMode", "init_fake_process_group"]


def init_fake_process_group(world_size: int, rank: int) -> None:
    """`dist.init_process_group` on the fake backend: `world_size` ranks,
    this process being `rank`."""
    from torch.testing._internal.distributed.fake_pg import (
        FakeStore,  # importing it registers the "fake" backend
    )

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
