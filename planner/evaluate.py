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

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from dtplan.ir.graph import Graph
from dtplan.planner.cost.device import bytes_sent_per_rank
from dtplan.planner.cost.memory import peak_bytes, stored_values
from dtplan.planner.cost.overlap import Overlap, simulate
from dtplan.planner.cost.pricing import BUCKET_BYTES, Pricer
from dtplan.planner.mesh import MeshSpec
from dtplan.planner.reduce.hubs import reads_via_hub
from dtplan.planner.space._dtensor import Placements
from dtplan.planner.space.strategies import Source, Strategy, StrategySpace, hub_name

__all__ = ["HUB", "OUTPUT", "Edge", "Evaluation", "NodePlan", "PlannedCollective", "buckets", "edges", "evaluate", "issued"]

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
    #: the gradient bucket it travels in (`buckets`): one collective issues
    #: every member's bytes at once; None: issued alone
    bucket: int | None = None


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
    grads: dict[int, tuple] = {}  # collective index -> its bucket key
    for e in edges(graph, space):
        u = e.producer
        price = pricer.redistribute
        if e.consumer == HUB:
            src, want, module = chosen[u].output, hubs[u], graph[u].module
        elif e.consumer == OUTPUT:
            w = output_placements[e.index]
            src, want, module = hubs.get(u, chosen[u].output), (chosen[w].output if isinstance(w, str) else w), graph[u].module
            if isinstance(w, str):  # a gradient, to its parameter's placements
                key = pricer.gradient_key(graph[u].tensor_meta, src, want)
                if key is not None:
                    price = pricer.gradient_collectives
                    grads[len(colls)] = key
        else:
            src, want, module = (hubs[u] if e.via_hub else chosen[u].output), chosen[e.consumer].inputs[e.index], graph[e.consumer].module
        for c in price(graph[u].tensor_meta, src, want):
            colls.append(PlannedCollective(c.kind, mesh.axis_names[c.axis], c.bytes, c.time_s, u, e.consumer, module))
    order = {n.name: i for i, n in enumerate(graph)}
    for b, members in enumerate(buckets([(k, order[colls[k].producer], colls[k].bytes, key) for k, key in grads.items()], BUCKET_BYTES)):
        for k in members:
            colls[k] = dataclasses.replace(colls[k], bucket=b)
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
        overlap=overlapped(graph, nodes, colls, pricer, mesh),
    )


def buckets(members: Sequence[tuple[int, int, int, tuple]], cap: int = BUCKET_BYTES) -> list[list[int]]:
    """Gradient reductions grouped into buckets, in the order they are issued.

    `members`: (id, position of the producer in the graph, bytes, bucket
    key). Reductions sharing a key (kind, mesh axis, dtype, reduce op) are
    taken in the order their gradients are produced (ties by id) and filled
    into buckets of at most `cap` bytes (a larger one is a bucket alone), as
    DDP fills its buckets in the order backward produces gradients. Buckets
    are issued in the order they are ready (their last gradient produced),
    so the first ones run under the rest of backward. Returns each bucket's
    ids; a bucket of one is issued in its place as its own collective."""
    by_key: dict[tuple, list[tuple[int, int, int]]] = {}
    for k, pos, nbytes, key in members:
        by_key.setdefault(key, []).append((pos, k, nbytes))
    out: list[tuple[int, int, list[int]]] = []
    for key_index, group in enumerate(by_key.values()):
        current: list[int] = []
        size = ready = 0
        for pos, k, nbytes in sorted(group):
            if current and size + nbytes > cap:
                out.append((ready, key_index, current))
                current, size = [], 0
            current.append(k)
            size += nbytes
            ready = pos
        if current:
            out.append((ready, key_index, current))
    out.sort(key=lambda r: (r[0], r[1]))
    return [ids for _, _, ids in out]


def issued(colls: Sequence[PlannedCollective]) -> list[tuple[str, str, int, tuple[PlannedCollective, ...]]]:
    """The collectives as a run issues them: (kind, axis, bytes, members),
    a bucket once (its members' bytes summed, at the place of its first
    member in the plan's list), every other collective alone."""
    out: list[tuple[str, str, int, tuple[PlannedCollective, ...]]] = []
    seen: dict[int, int] = {}
    for c in colls:
        if c.bucket is None:
            out.append((c.kind, c.axis, c.bytes, (c,)))
        elif c.bucket in seen:
            kind, axis, nbytes, members = out[seen[c.bucket]]
            out[seen[c.bucket]] = (kind, axis, nbytes + c.bytes, (*members, c))
        else:
            seen[c.bucket] = len(out)
            out.append((c.kind, c.axis, c.bytes, (c,)))
    return out


def overlapped(
    graph: Graph, nodes: Mapping[str, NodePlan], colls: list[PlannedCollective], pricer: Pricer, mesh: MeshSpec
) -> Overlap:
    """The step simulated with communication overlapped (`cost.overlap`): each
    collective waits where lowering puts it, before the node reading the
    redistributed value (a hub's conversion: before the value's first
    reader; a graph output's: at the end). A gradient bucket is one
    collective of its members' bytes (timed whole, `Pricer.bucket_s`),
    issued once its last gradient is produced, after the outputs that are
    not bucketed, buckets in their order (as lowering issues them). The
    profile's overlap slowdown and rank skew apply (`simulate`)."""
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

    plain = [(c.kind, c.producer, position(c), c.time_s) for c in colls if c.bucket is None]
    grouped: dict[int, list[PlannedCollective]] = {}
    for c in colls:
        if c.bucket is not None:
            grouped.setdefault(c.bucket, []).append(c)
    for b in sorted(grouped):
        members = grouped[b]
        last = max(members, key=lambda c: index[c.producer]).producer
        first = members[0]
        secs = pricer.bucket_s(first.kind, mesh.axis_index(first.axis), sum(c.bytes for c in members))
        plain.append((first.kind, last, end, secs))
    return simulate(
        order,
        {name: p.compute_s for name, p in nodes.items()},
        plain,
        slowdown=pricer.profile.overlap_slowdown,
        skew=pricer.profile.rank_skew,
    )
