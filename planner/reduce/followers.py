"""Make the integer program small before solving it.

`merge_followers`: a node with a single tensor input that can take every
placement its input may arrive in, unchanged (views, elementwise ops),
follows its input: it shares the input's choice variable and takes, for each
of the input's options, its cheapest strategy that consumes that placement
as is. Its edge from the input then costs nothing.
"""
from __future__ import annotations

import dataclasses
import logging

from dtplan.ir.graph import Graph
from dtplan.planner.cost.pricing import Pricer
from dtplan.planner.space.strategies import NodeStrategies, Source, StrategySpace

__all__ = ["merge_followers"]

log = logging.getLogger(__name__)


def merge_followers(graph: Graph, space: StrategySpace, pricer: Pricer) -> StrategySpace:
    nodes = dict(space.nodes)
    merged = 0
    # repeated layers ask the same question: answer it once (the same tuple
    # of options then lets the integer program share work between copies)
    memo: dict[tuple, tuple | None] = {}
    for v in graph:
        ns = nodes[v.name]
        refs = v.refs()
        if v.is_placeholder or ns.source in (Source.FOLLOW, Source.FALLBACK) or len(refs) != 1 or len(ns.options) == 1:
            continue
        if isinstance(v.meta, tuple):  # its tuple projections follow its own options, index by index
            continue
        u = nodes[refs[0]]
        key = (id(ns.options), id(u.options), v.flops, v.bytes, v.meta)
        if key not in memo:
            memo[key] = _aligned(v, ns, u, pricer)
        aligned = memo[key]
        if aligned is not None:
            nodes[v.name] = NodeStrategies(v.name, aligned, Source.FOLLOW, follows=u.follows or u.name)
            merged += 1
    log.debug("merged %d follower nodes", merged)
    return dataclasses.replace(space, nodes=nodes)


def _aligned(v, ns: NodeStrategies, u: NodeStrategies, pricer: Pricer) -> tuple | None:
    """Per option of the input, v's cheapest strategy taking it as is (None
    when some input placement has none)."""
    aligned = []
    for opt in u.options:
        same = [s for s in ns.options if s.inputs[0] == opt.output]
        if not same:
            return None
        aligned.append(min(same, key=lambda s: pricer.compute_s(v, s)))
    return tuple(aligned)
