"""An all-gather that gloo can run several of at once.

The functional `all_gather_into_tensor` reaches gloo through its coalesced
all-gather (`ProcessGroupGloo::allgather_coalesced`), and with more than one
of those in flight a rank's heap was corrupted (torch 2.14: a worker thread
allocating in `AsyncAllgatherCoalescedWork` while the caller enqueued the
next; ranks died with SIGSEGV or `malloc(): unaligned tcache chunk
detected`; docs/architecture.md, "Overlap", has the measurements). Gloo's
plain all-gather into one tensor (`_allgather_base`) has run the same
pattern without fault. `all_gather` issues that one and
registers its work with the functional collectives' registry, so the
lowered module's `wait_tensor` waits for it as for any functional
collective; `use_base_gathers` puts it in place of the functional gather
wherever the group's backend is gloo. NCCL keeps the functional op.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

__all__ = ["all_gather", "use_base_gathers"]

_FUNCTIONAL = torch.ops._c10d_functional.all_gather_into_tensor.default


@torch.library.custom_op("dtplan::all_gather_into_tensor", mutates_args=())
def all_gather(input: torch.Tensor, group_size: int, group_name: str) -> torch.Tensor:
    """`_c10d_functional.all_gather_into_tensor` over `_allgather_base`: same
    arguments, same result, asynchronous until `wait_tensor`."""
    out = input.new_empty((input.shape[0] * group_size, *input.shape[1:]))
    # a non-contiguous input's copy is held by nothing here once this
    # returns: gloo's work keeps the tensors it was given until it is
    # destroyed, after the wait (tests/test_gloo_stress.py checks it)
    work = _resolve_process_group(group_name)._allgather_base(out, input.contiguous())
    torch._C._distributed_c10d._register_work(out, work)
    return out


@all_gather.register_fake
def _(input: torch.Tensor, group_size: int, group_name: str) -> torch.Tensor:
    return input.new_empty((input.shape[0] * group_size, *input.shape[1:]))


#: the op a lowered module calls
OP = torch.ops.dtplan.all_gather_into_tensor.default


def use_base_gathers(gm: torch.fx.GraphModule) -> int:
    """Put `all_gather` in place of each functional all-gather of `gm` whose
    group runs on gloo (in place; recompiles only when one changed). Returns
    how many."""
    backends: dict[str, str] = {}
    changed = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is _FUNCTIONAL:
            group = n.args[2] if len(n.args) > 2 else n.kwargs["group_name"]
            if group not in backends:
                backends[group] = str(dist.get_backend(_resolve_process_group(group)))
            if backends[group] == "gloo":
                n.target = OP
                changed += 1
    if changed:
        gm.recompile()
    return changed
