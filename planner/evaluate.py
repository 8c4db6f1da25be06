"""One choice of strategies priced whole: the edges of the program, and the
itemised cost the integer program minimises.

`edges` is the one walk over the reads that may need a redistribution: each
shared value's conversion to its hub, every non-follower read (through the
producer's hub or of its output as it is) and each graph output. The
integer program (`planner.solver`) prices every edge for every pair of
placements; `evaluate` prices the edges of one choice and lists their
collectives, which the plan records and the runtime must issue.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from dtplan.ir.graph import Graph
from dtplan.planner.cost.device import bytes_sent_per_rank
from dtplan.planner.cost.memory import peak_bytes, stored_values
from dtplan.planner.cost.overlap import Overlap, simulate
from dtplan.planner.cost.pricing import Pricer
from dtplan.planner.mesh import MeshSpec
from dtplan.planner.reduce.hubs import reads_via_hub
from dtplan.planner.space._dtensor import Placements
from dtplan.planner.space.strategies import Source, Strategy, StrategySpace, hub_name

__all__ = ["HUB", "OUTPUT", "Edge", "Evaluation", "NodePlan", "PlannedCollective", "edges", "evaluate"]

#: the consumer of an edge into a value's hub, and of a graph output
HUB, OUTPUT = "hub", "output"


@dataclass(frozen=True, slots=True)
class Edge:
    """A value read where its placement may have to change."""

    producer: str
    #: the reading node, HUB (the value's one conversion to its hub) or OUTPUT
    consumer: str
    #: the input position in the consumer (the output position for OUTPUT)
    index: int
    #: the value is read from its hub (else the producer's output as it is)
    via_hub: bool


def edges(graph: Graph, space: StrategySpace) -> Iterator[Edge]:
    """Hub conversions first, then every read by a non-follower in graph
    order, then the graph outputs. Followers read their producer's value as
    it is, so their reads cost nothing and are not edges."""
    for u in space.hubs:
        yield Edge(u, HUB, 0, False)
    for v in graph:
        if space.nodes[v.name].source is Source.FOLLOW:
            continue
        for i, u in enumerate(v.refs()):
            yield Edge(u, v.name, i, reads_via_hub(space, u, v.name))
    for i, u in enumerate(graph.outputs):
        yield Edge(u, OUTPUT, i, u in space.hubs)


@dataclass(frozen=True, slots=True)
class NodePlan:
    op: str
    module: str
    inputs: tuple[Placements, ...]
    output: Placements | tuple[Placements | None, ...]
    compute_s: float
    #: per input: read through the producer's hub (else its output as is)
    via_hub: tuple[bool, ...] = ()


@dataclass(frozen=True, slots=True)
class PlannedCollective:
    kind: str
    axis: str
    bytes: int
    time_s: float
    #: the value being redistributed and the node (or "output") that wants it
    producer: str
    node: str
    module: str


@dataclass(frozen=True, slots=True)
class Evaluation:
    nodes: Mapping[str, NodePlan]
    #: shared values and the placement each is redistributed to once
    hubs: Mapping[str, Placements]
    collectives: tuple[PlannedCollective, ...]
    compute_s: float
    comm_s: float
    comm_bytes: float
    #: parameters and buffers per device; optimizer state beside them
    parameter_bytes: int
    optimizer_bytes: int
    peak_memory_bytes: int
    #: the step with communication overlapped as the runtime schedules it
    overlap: Overlap


def evaluate(
    graph: Graph,
    space: StrategySpace,
    pricer: Pricer,
    mesh: MeshSpec,
    choice: Mapping[str, int],
    output_placements: tuple[Placements, ...],
) -> Evaluation:
    """Price one choice of strategies under the cost model: the same numbers
    the integer program minimises, itemised."""
    chosen: dict[str, Strategy] = {n.name: space.nodes[n.name].options[choice[n.name]] for n in graph}
    nodes = {
        n.name: NodePlan(
            n.op_name, n.module, s.inputs, s.output, pricer.compute_s(n, s), tuple(reads_via_hub(space, u, n.name) for u in n.refs())
        )
        for n, s in ((n, chosen[n.name]) for n in graph)
    }
    colls: list[PlannedCollective] = []

    hubs = {u: space.hubs[u][choice[hub_name(u)]] for u in space.hubs}
    for e in edges(graph, space):
        u = e.producer
        if e.consumer == HUB:
            src, want, module = chosen[u].output, hubs[u], graph[u].module
        elif e.consumer == OUTPUT:
            w = output_placements[e.index]
            src, want, module = hubs.get(u, chosen[u].output), (chosen[w].output if isinstance(w, str) else w), graph[u].module
        else:
            src, want, module = (hubs[u] if e.via_hub else chosen[u].output), chosen[e.consumer].inputs[e.index], graph[e.consumer].module
        for c in pricer.redistribute(graph[u].tensor_meta, src, want):
            colls.append(PlannedCollective(c.kind, mesh.axis_names[c.axis], c.bytes, c.time_s, u, e.consumer, module))
    per_node = {n.name: pricer.bytes_per_device(n.tensor_meta, chosen[n.name].output) for n in graph if n.tensor_meta is not None}
    stored_names = stored_values(graph)
    stored = sum(per_node[name] for name in stored_names)
    resident = sum(pricer.resident_bytes(graph[name], chosen[name].output) for name in stored_names)
    peak = resident + peak_bytes(graph, per_node.__getitem__)
    return Evaluation(
        nodes=nodes,
        hubs=hubs,
        collectives=tuple(colls),
        compute_s=sum(p.compute_s for p in nodes.values()),
        comm_s=sum(c.time_s for c in colls),
        comm_bytes=sum(bytes_sent_per_rank(c.kind, c.bytes, mesh.shape[mesh.axis_index(c.axis)]) for c in colls),
        parameter_bytes=stored,
        optimizer_bytes=resident - stored,
        peak_memory_bytes=peak,
        overlap=overlapped(graph, nodes, colls, slowdown=pricer.profile.overlap_slowdown, skew=pricer.profile.rank_skew),
    )


def overlapped(
    graph: Graph, nodes: Mapping[str, NodePlan], colls: list[PlannedCollective], *, slowdown: float = 0.0, skew: float = 0.0
) -> Overlap:
    """The step simulated with communication overlapped (`cost.overlap`): each
    collective waits where lowering puts it, before the node reading the
    redistributed value (a hub's conversion: before the value's first
    reader; a graph output's: at the end)."""
    order = [n.name for n in graph]
    index = {name: i for i, name in enumerate(order)}
    first_reader: dict[str, int] = {}
    for i, n in enumerate(graph):
        for u in n.refs():
            first_reader.setdefault(u, i)
    end = len(order)

    def position(c: PlannedCollective) -> int:
        if c.node == OUTPUT:
            return end
        if c.node == HUB:
            return first_reader.get(c.producer, end)
        return index[c.node]

    return simulate(
        order,
        {name: p.compute_s for name, p in nodes.items()},
        [(c.kind, c.producer, position(c), c.time_s) for c in colls],
        slowdown=slowdown,
        skew=skew,
    )
