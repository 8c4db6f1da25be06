"""What a rank was doing when it failed: the last collective it entered.

`mark_collectives` puts a call to `entering` before every functional
collective of a lowered module, with a description of that collective
(kind, mesh axis, bytes, the planned value and reader, its place in the
step). A rank whose collective times out, because another rank hung or
died, then says which collective it waited in (`last_entered`), and the
launcher reports it with the rank's error. A call costs one assignment.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dtplan.planner.evaluate import PlannedCollective, issued
from dtplan.runtime import gloo

__all__ = ["entering", "last_entered", "mark_collectives"]

_c10d = torch.ops._c10d_functional
#: functional collective -> the plan's kind of collective
KINDS = {
    _c10d.all_reduce.default: "all_reduce",
    _c10d.all_gather_into_tensor.default: "all_gather",
    _c10d.reduce_scatter_tensor.default: "reduce_scatter",
    _c10d.all_to_all_single.default: "all_to_all",
    gloo.OP: "all_gather",  # what gloo runs in place of the functional gather
}

_last: str | None = None


def entering(description: str) -> None:
    """Called by a lowered module right before it issues a collective."""
    global _last
    _last = description


def last_entered() -> str | None:
    """The description of the last collective this process entered, if any."""
    return _last


def mark_collectives(gm: torch.fx.GraphModule, axes: Mapping[str, tuple[str, int]], planned: Sequence[PlannedCollective]) -> int:
    """Insert `entering(...)` before each collective of `gm`; `axes` maps a
    process group's name to its mesh axis (name, size). Returns how many."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in KINDS]
    runs = issued(planned)  # as issued: a gradient bucket once
    for i, node in enumerate(calls):
        kind = KINDS[node.target]
        group = node.args[-1] if isinstance(node.args[-1], str) else node.kwargs.get("group_name")
        axis, size = axes.get(group, (str(group), 1))
        val = node.args[0].meta.get("val")
        nbytes = 0 if val is None else val.numel() * val.element_size() * (size if kind == "all_gather" else 1)
        text = f"{kind} on mesh axis {axis!r}, {nbytes} bytes (collective {i + 1} of {len(calls)} in the step"
        match = [members for k, a, b, members in runs if (k, a, b) == (kind, axis, nbytes)]
        first = match[0][0] if match else None
        bucket = f"the gradient bucket of {len(match[0])}, e.g. " if match and len(match[0]) > 1 else ""
        if len(match) == 1:
            text += f"; {bucket}{first.producer} read by {first.node}"
        elif match:
            text += f"; one of {len(match)} planned alike, e.g. {bucket}{first.producer} read by {first.node}"
        with gm.graph.inserting_before(node):
            gm.graph.call_function(entering, (text + ")",))
    gm.recompile()
    return len(calls)
