"""Per-device memory: which values are resident together at each point of the schedule.

Everything here is one sweep over the schedule: allocations enter at their
producer and leave after their last reader, so the candidate peaks are the
points just before something is freed. The integer program gets one row per
candidate peak (`live_multisets`, which merges the copies of folded layers);
`peak_bytes` prices one concrete choice.
"""
from __future__ import annotations

import operator
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable

from dtplan.ir.graph import Graph, Node, Role

__all__ = ["STORED_ROLES", "is_allocation", "live_multisets", "peak_bytes", "stored_values"]

#: values that stay resident for the whole step
STORED_ROLES = (Role.PARAM, Role.BUFFER, Role.CONSTANT)


def is_allocation(n: Node) -> bool:
    """Values with storage of their own: activations and inputs, not views of
    another tensor nor tuples (their elements are counted through getitem)."""
    if n.tensor_meta is None or n.role in STORED_ROLES:
        return False
    return not getattr(n.target, "is_view", False)


def stored_values(graph: Graph) -> tuple[str, ...]:
    return tuple(n.name for n in graph if n.role in STORED_ROLES and n.tensor_meta is not None)


def _lifetimes(graph: Graph) -> tuple[list[bool], dict[int, list[str]]]:
    """Per node in schedule order, whether it allocates; and schedule index ->
    allocations whose last reader is that node. A view (and an element of a
    view op's tuple, such as one piece of a split) reads its base's storage:
    it allocates nothing, and the base lives until the last reader of any
    view of it (a saved activation is often a reshape of a norm's output)."""
    last = graph.last_use()
    base = _bases(graph)
    end: dict[str, int] = {}
    for n in graph:
        root = base.get(n.name, n.name)
        end[root] = max(end.get(root, 0), last[n.name])
    allocates = [is_allocation(n) and n.name not in base for n in graph]
    frees: dict[int, list[str]] = defaultdict(list)
    for n, allocated in zip(graph, allocates, strict=True):
        if allocated:
            frees[end[n.name]].append(n.name)
    return allocates, frees


def _bases(graph: Graph) -> dict[str, str]:
    """Aliasing node -> the node whose storage it reads."""
    base: dict[str, str] = {}
    for n in graph:
        if n.target is not None and n.refs() and _aliases(n, graph):
            source = n.refs()[0]
            base[n.name] = base.get(source, source)
    return base


def _aliases(n: Node, graph: Graph) -> bool:
    """A view op, or an element of a view op's tuple (getitem of split)."""
    if getattr(n.target, "is_view", False):
        return True
    if n.target is operator.getitem:
        source = graph[n.refs()[0]]
        return bool(getattr(source.target, "is_view", False))
    return False


def _sweep(graph: Graph, key: Callable[[str], Hashable]):
    """Yield, at each candidate peak, the live allocations keyed by `key`
    (a Counter, in order of first allocation)."""
    allocates, frees = _lifetimes(graph)
    live: Counter = Counter()
    end = len(graph) - 1
    for t, n in enumerate(graph):
        if allocates[t]:
            live[key(n.name)] += 1
        dying = frees.get(t)
        if dying or t == end:
            yield live
        if dying:
            for name in dying:
                k = key(name)
                live[k] -= 1
                if not live[k]:
                    del live[k]


def live_multisets(graph: Graph, key: Callable[[str], Hashable]) -> list[dict[Hashable, int]]:
    """The candidate peaks as multisets of `key(allocation)`, dominated ones
    dropped: with repeated layers sharing variables, layer k's rows repeat
    layer k-1's with more saved activations, and only the largest survives.
    A row is dropped when another row with the same keys counts each key at
    least as often."""
    by_support: dict[frozenset, list[dict]] = defaultdict(list)
    for live in _sweep(graph, key):
        row = dict(live)
        kept = by_support[frozenset(row)]
        if any(all(row[k] <= other[k] for k in row) for other in kept):
            continue
        kept[:] = [o for o in kept if not all(o[k] <= row[k] for k in row)]
        kept.append(row)
    rows = [r for group in by_support.values() for r in group]
    return rows or [{}]


def peak_bytes(graph: Graph, size: Callable[[str], int]) -> int:
    """The largest sum of `size` over the allocations live at one point."""
    allocates, frees = _lifetimes(graph)
    current = peak = 0
    for t, n in enumerate(graph):
        if allocates[t]:
            current += size(n.name)
        peak = max(peak, current)
        current -= sum(size(name) for name in frees.get(t, ()))
    return peak
