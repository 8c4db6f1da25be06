"""The Plan: a frozen record of every placement, the collectives the runtime
will issue and the predicted cost. JSON round trip with a schema version;
no pickle anywhere.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ir.graph import Graph, Role
from planner._dtensor import Placements, format_placements, parse_placement
from planner.cost import bytes_sent_per_rank
from planner.memory import peak_bytes, stored_values
from planner.mesh import MeshSpec
from planner.pricing import Pricer, local_shape
from planner.hubs import reads_via_hub
from planner.strategies import Fallback, Strategy, StrategySpace, hub_name

__all__ = ["PLAN_VERSION", "NodePlan", "Plan", "PlanError", "PlannedCollective", "evaluate"]

PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan file that is malformed or does not match the model or mesh."""


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


@dataclass(frozen=True, kw_only=True)
class Plan:
    version: int = PLAN_VERSION
    model: Mapping[str, object]
    mesh: MeshSpec
    profile: Mapping[str, str]
    memory_budget_bytes: int | None
    inputs: Mapping[str, Placements]
    outputs: tuple[Placements, ...]
    parameters: Mapping[str, Placements]
    parameter_info: Mapping[str, Mapping[str, object]]
    nodes: Mapping[str, NodePlan]
    #: values redistributed once for all their readers (see planner.hubs)
    hubs: Mapping[str, Placements]
    collectives: tuple[PlannedCollective, ...]
    fallbacks: tuple[Fallback, ...]
    cost: Mapping[str, float]
    solver: Mapping[str, object]
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    #: the classic plans under the same cost model (planner.classic), if asked
    comparison: tuple[Mapping[str, object], ...] = ()

    # ------------------------------------------------------------------ json
    def to_json(self) -> dict:
        return {
            "version": self.version,
            "model": dict(self.model),
            "mesh": self.mesh.to_json(),
            "profile": dict(self.profile),
            "memory_budget_bytes": self.memory_budget_bytes,
            "inputs": {k: format_placements(v) for k, v in self.inputs.items()},
            "outputs": [format_placements(o) for o in self.outputs],
            "parameters": {k: format_placements(v) for k, v in self.parameters.items()},
            "parameter_info": {k: dict(v) for k, v in self.parameter_info.items()},
            "nodes": {k: _node_json(v) for k, v in self.nodes.items()},
            "hubs": {k: format_placements(v) for k, v in self.hubs.items()},
            "collectives": [_collective_json(c) for c in self.collectives],
            "fallbacks": [{"node": f.node, "op": f.op, "reason": f.reason} for f in self.fallbacks],
            "cost": dict(self.cost),
            "solver": dict(self.solver),
            "stage_seconds": dict(self.stage_seconds),
            "comparison": [dict(c) for c in self.comparison],
        }

    @classmethod
    def from_json(cls, d: Mapping) -> Plan:
        if not isinstance(d, Mapping) or "version" not in d:
            raise PlanError("not a dtplan plan: no 'version' key")
        if d["version"] != PLAN_VERSION:
            raise PlanError(f"plan schema version {d['version']!r} is not supported; this dtplan reads version {PLAN_VERSION}")
        try:
            return cls(
                version=d["version"],
                model=d["model"],
                mesh=MeshSpec.from_json(d["mesh"]),
                profile=d["profile"],
                memory_budget_bytes=d.get("memory_budget_bytes"),
                inputs={k: _pl(v) for k, v in d["inputs"].items()},
                outputs=tuple(_pl(o) for o in d["outputs"]),
                parameters={k: _pl(v) for k, v in d["parameters"].items()},
                parameter_info=d.get("parameter_info", {}),
                nodes={k: _node_from_json(v) for k, v in d["nodes"].items()},
                hubs={k: _pl(v) for k, v in d.get("hubs", {}).items()},
                collectives=tuple(PlannedCollective(**c) for c in d["collectives"]),
                fallbacks=tuple(Fallback(**f) for f in d.get("fallbacks", [])),
                cost=d["cost"],
                solver=d["solver"],
                stage_seconds=d.get("stage_seconds", {}),
                comparison=tuple(d.get("comparison", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan file: {type(e).__name__}: {e}") from e

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {str(path)!r} is not JSON: {e}") from None
        return cls.from_json(data)

    def check_matches(self, graph: Graph, mesh: MeshSpec) -> None:
        """Refuse a plan made for another model or mesh."""
        if tuple(self.mesh.shape) != tuple(mesh.shape):
            raise PlanError(f"the plan is for mesh {self.mesh} but the run uses mesh {mesh}")
        sig = self.model.get("graph_signature")
        if sig != graph.signature:
            raise PlanError(
                f"the plan does not match this model: its graph signature is {sig}, the model's is {graph.signature} "
                "(the model, its options or its example inputs changed; plan again)"
            )


def _pl(v) -> Placements | None:
    return None if v is None else tuple(parse_placement(x) for x in v)


def _node_json(n: NodePlan) -> dict:
    multi = bool(n.output) and (n.output[0] is None or isinstance(n.output[0], tuple))
    out = [format_placements(o) for o in n.output] if multi else format_placements(n.output)
    return {
        "op": n.op,
        "module": n.module,
        "inputs": [format_placements(i) for i in n.inputs],
        "output": out,
        "multi_output": multi,
        "compute_s": n.compute_s,
        "via_hub": list(n.via_hub),
    }


def _node_from_json(d: Mapping) -> NodePlan:
    out = tuple(_pl(o) for o in d["output"]) if d.get("multi_output") else _pl(d["output"])
    return NodePlan(d["op"], d["module"], tuple(_pl(i) for i in d["inputs"]), out, float(d["compute_s"]), tuple(d.get("via_hub", ())))


def _collective_json(c: PlannedCollective) -> dict:
    return {
        "kind": c.kind,
        "axis": c.axis,
        "bytes": c.bytes,
        "time_s": c.time_s,
        "producer": c.producer,
        "node": c.node,
        "module": c.module,
    }


# ---------------------------------------------------------------------- evaluation


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

    def edge(u: str, src: Placements, want: Placements, consumer: str, module: str) -> None:
        for c in pricer.redistribute(graph[u].tensor_meta, src, want):
            colls.append(PlannedCollective(c.kind, mesh.axis_names[c.axis], c.bytes, c.time_s, u, consumer, module))

    for u, h in hubs.items():  # once per shared value, before its readers
        edge(u, chosen[u].output, h, "hub", graph[u].module)
    for v in graph:
        if space.nodes[v.name].source == "follow":
            continue
        for i, u in enumerate(v.refs()):
            src = hubs[u] if reads_via_hub(space, u, v.name) else chosen[u].output
            edge(u, src, chosen[v.name].inputs[i], v.name, v.module)
    for u, want in zip(graph.outputs, output_placements, strict=True):
        src = hubs.get(u, chosen[u].output)
        edge(u, src, chosen[want].output if isinstance(want, str) else want, "output", graph[u].module)
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
    )


def parameter_table(graph: Graph, mesh: MeshSpec, nodes: Mapping[str, NodePlan], pricer: Pricer) -> tuple[dict, dict]:
    """Placements and per-device sizes of every parameter and buffer, by FQN."""
    placements, info = {}, {}
    for n in graph:
        if n.role not in (Role.PARAM, Role.BUFFER) or n.fqn is None:
            continue
        pl = nodes[n.name].output
        placements[n.fqn] = pl
        meta = n.tensor_meta
        info[n.fqn] = {
            "shape": list(meta.shape),
            "dtype": str(meta.dtype).removeprefix("torch."),
            "local_shape": list(local_shape(meta.shape, tuple(mesh.shape), pl)),
            "bytes_per_device": pricer.bytes_per_device(meta, pl),
            "role": n.role.value,
        }
    return placements, info
