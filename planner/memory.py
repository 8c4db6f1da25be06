"""Per-device memory: which values are resident together at each point of the schedule."""
from __future__ import annotations

from ir.graph import Graph, Node, Role

__all__ = ["STORED_ROLES", "is_allocation", "peak_rows"]

#: values that stay resident for the whole step
STORED_ROLES = (Role.PARAM, Role.BUFFER, Role.CONSTANT)


def is_allocation(n: Node) -> bool:
    """Values with storage of their own: activations and inputs, not views of
    another tensor nor tuples (their elements are counted through getitem)."""
    if n.tensor_meta is None or n.role in STORED_ROLES:
        return False
    return not getattr(n.target, "is_view", False)


def peak_rows(graph: Graph) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(stored values, allocations live at each candidate peak): per-device
    memory at a point t is the stored values plus that point's allocations.
    Points whose live set is contained in the next point's are dropped: their
    row is dominated."""
    stored = tuple(n.name for n in graph if n.role in STORED_ROLES and n.tensor_meta is not None)
    index = {n.name: k for k, n in enumerate(graph)}
    last = graph.last_use()
    allocs = [n.name for n in graph if is_allocation(n)]
    live = [frozenset(a for a in allocs if index[a] <= t <= last[a]) for t in range(len(graph))]
    rows = tuple(
        tuple(sorted(s, key=index.__getitem__))
        for t, s in enumerate(live)
        if not (t + 1 < len(live) and s <= live[t + 1])
    )
    return stored, rows or ((),)
