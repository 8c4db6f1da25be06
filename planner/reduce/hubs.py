"""Hubs: a value several consumers read is redistributed once.

Without a hub every consumer edge pays for its own redistribution, so a
partial sum read by the loss and by its backward is all-reduced twice in the
model (and would be at run time). A hub is a choice of one placement for the
value; the value is converted to it once (`u -> hub`), and every consumer
reads the hub (`hub -> v`), paying only for a further change it still wants.
Followers (views, tuple projections sharing the producer's choice) read the
value directly.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

from dtplan.ir.graph import Graph
from dtplan.planner.space._dtensor import Placements
from dtplan.planner.space.strategies import Source, StrategySpace

__all__ = ["add_hubs", "reads_via_hub"]


def reads_via_hub(space: StrategySpace, producer: str, consumer: str) -> bool:
    """Does `consumer` read `producer` through its hub (not as a follower)?"""
    return producer in space.hubs and not _reads_directly(space, producer, consumer)


def _reads_directly(space: StrategySpace, producer: str, consumer: str) -> bool:
    """A follower sharing its producer's choice reads the value as it is."""
    return space.nodes[consumer].source is Source.FOLLOW and _group(space, consumer) == _group(space, producer)


def _group(space: StrategySpace, name: str) -> str:
    return space.nodes[name].follows or name


def add_hubs(graph: Graph, space: StrategySpace, output_wants: Sequence[Placements | str]) -> StrategySpace:
    """Give every value read by two or more non-follower edges a hub whose
    candidates are its own outputs and every placement its readers want."""
    wants: dict[str, dict[Placements, None]] = {}
    edges: Counter[str] = Counter()
    for v in graph:
        for i, u in enumerate(v.refs()):
            if _reads_directly(space, u, v.name):
                continue
            edges[u] += 1
            for s in space.nodes[v.name].options:
                wants.setdefault(u, {})[s.inputs[i]] = None
    for u, want in zip(graph.outputs, output_wants, strict=True):
        edges[u] += 1
        targets = [s.output for s in space.nodes[want].options] if isinstance(want, str) else [want]
        for t in targets:
            wants.setdefault(u, {})[t] = None
    hubs = {}
    for u, count in edges.items():
        if count < 2 or graph[u].tensor_meta is None:
            continue
        own = {s.output: None for s in space.nodes[u].options}
        hubs[u] = tuple(dict.fromkeys([*own, *wants[u]]))
    # a folded layer's hub takes its twin's choice when both offer the same
    # candidates from the same choice variables
    follows = {
        u: t
        for u in hubs
        if (t := space.twins.get(u)) is not None and t in hubs and hubs[t] == hubs[u] and _group(space, u) == _group(space, t)
    }
    return dataclasses.replace(space, hubs=hubs, hub_follows=follows)
