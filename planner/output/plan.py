"""The Plan: a frozen record of every placement, the collectives the runtime
will issue and the predicted cost. JSON round trip with a schema version;
no pickle anywhere.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dtplan.ir.graph import Graph, Role
from dtplan.planner.cost.pricing import Pricer, local_shape
from dtplan.planner.evaluate import NodePlan, PlannedCollective
from dtplan.planner.mesh import MeshSpec
from dtplan.planner.space._dtensor import Placements, format_placements, is_multi_output, parse_placement, per_output
from dtplan.planner.space.strategies import Fallback

__all__ = ["plan_text", "PLAN_VERSION", "CostSummary", "ModelInfo", "NodePlan", "Plan", "SolverSummary", "PlanError", "PlannedCollective", "parameter_table"]

PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan file that is malformed or does not match the model or mesh."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What was planned: the plan file's `model` section."""

    name: str = "model"
    num_nodes: int = 0
    #: the captured graph's signature: a plan runs only on the graph it was made for
    graph_signature: str = ""
    train: bool = False
    #: training: the optimizer whose state the memory model sizes, and
    #: parameter FQN -> the graph output holding its gradient
    optimizer: str | None = None
    gradients: Mapping[str, str] = field(default_factory=dict)
    #: the model file and its options, when planned from one (CLI)
    source: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CostSummary:
    """The predicted step per device: the plan file's `cost` section."""

    total_s: float
    compute_s: float
    comm_s: float
    #: bytes each device sends over the step
    comm_bytes: float
    peak_memory_bytes: int
    #: parts of the peak: parameters and buffers, their optimizer state,
    #: gradients in their parameters' placements (inside activation_bytes too)
    parameter_bytes: int
    optimizer_bytes: int
    gradient_bytes: int
    activation_bytes: int


@dataclass(frozen=True, kw_only=True)
class SolverSummary:
    """How the plan was found: the plan file's `solver` section."""

    status: str
    #: objective and bound of the integer program, in nanoseconds
    objective: int
    bound: int
    gap: float
    wall_s: float
    #: the ladder step that returned (see dtplan.planner.solver)
    method: str
    variables: int
    constraints: int
    layers_folded: int = 0
    nodes_folded: int = 0
    #: the mesh the program was solved on (outer axes merged on 3-axis meshes)
    planned_mesh: tuple[int, ...] = ()


def plan_text(plan: Plan) -> str:
    """The plan file's text."""
    return json.dumps(plan.to_json(), indent=1) + "\n"


def _section(cls, d: object, name: str):
    if not isinstance(d, Mapping):
        raise PlanError(f"malformed plan file: '{name}' is not an object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise PlanError(f"malformed plan file: unknown key(s) {unknown} in '{name}'")
    return cls(**d)


def _section_json(section) -> dict:
    out = dataclasses.asdict(section)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True, kw_only=True)
class Plan:
    version: int = PLAN_VERSION
    model: ModelInfo
    mesh: MeshSpec
    profile: Mapping[str, str]
    memory_budget_bytes: int | None
    inputs: Mapping[str, Placements]
    outputs: tuple[Placements, ...]
    parameters: Mapping[str, Placements]
    parameter_info: Mapping[str, Mapping[str, object]]
    nodes: Mapping[str, NodePlan]
    #: values redistributed once for all their readers (see dtplan.planner.reduce.hubs)
    hubs: Mapping[str, Placements]
    collectives: tuple[PlannedCollective, ...]
    fallbacks: tuple[Fallback, ...]
    cost: CostSummary
    solver: SolverSummary
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    #: the classic plans under the same cost model (dtplan.planner.output.classic), if asked
    comparison: tuple[Mapping[str, object], ...] = ()

    # ------------------------------------------------------------------ json
    def to_json(self) -> dict:
        return {
            "version": self.version,
            "model": _section_json(self.model),
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
            "cost": _section_json(self.cost),
            "solver": _section_json(self.solver),
            "stage_seconds": dict(self.stage_seconds),
            "comparison": [dict(c) for c in self.comparison],
        }

    @classmethod
    def from_json(cls, d: Mapping) -> Plan:
        if not isinstance(d, Mapping) or "version" not in d:
            raise PlanError("not a dtplan plan: no 'version' key")
        if type(d["version"]) is not int or d["version"] != PLAN_VERSION:
            raise PlanError(f"plan schema version {d['version']!r} is not supported; this dtplan reads version {PLAN_VERSION}")
        try:
            plan = cls(
                version=d["version"],
                model=_section(ModelInfo, d["model"], "model"),
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
                cost=_section(CostSummary, d["cost"], "cost"),
                solver=dataclasses.replace(
                    _section(SolverSummary, d["solver"], "solver"), planned_mesh=tuple(d["solver"].get("planned_mesh", ()))
                ),
                stage_seconds=d.get("stage_seconds", {}),
                comparison=tuple(d.get("comparison", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"malformed plan file: {type(e).__name__}: {e}") from e
        plan._check_values()
        return plan

    def _check_values(self) -> None:
        """What a plan file must hold whatever the model: one placement per mesh
        axis everywhere, shard dims that exist, sizes and costs that are
        finite and not negative."""
        ndim = self.mesh.ndim

        def placements(pl, where: str, rank: int | None = None) -> None:
            if pl is None:
                return
            if not isinstance(pl, tuple) or len(pl) != ndim:
                raise PlanError(f"malformed plan file: {where} has {len(pl) if isinstance(pl, tuple) else pl!r} placement(s); mesh {self.mesh} needs {ndim}")
            dim = _dim_outside(pl, rank)
            if dim is not None:
                raise PlanError(f"malformed plan file: {where} shards dim {dim} of a tensor with {rank} dims")

        budget = self.memory_budget_bytes
        if budget is not None and (type(budget) is not int or not 0 <= budget < 2**63):
            raise PlanError(f"malformed plan file: memory_budget_bytes {str(budget)[:40]} is not a byte count (0 to 2**63)")
        for f in dataclasses.fields(CostSummary):
            v = getattr(self.cost, f.name)
            if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
                raise PlanError(f"malformed plan file: cost.{f.name} is {v!r}, not a finite non-negative number")
        for name, pl in self.inputs.items():
            placements(pl, f"input {name!r}")
        for i, pl in enumerate(self.outputs):
            placements(pl, f"output {i}")
        for fqn, pl in self.parameters.items():
            shape = self.parameter_info.get(fqn, {}).get("shape")
            placements(pl, f"parameter {fqn!r}", len(shape) if isinstance(shape, list) else None)
        for name, pl in self.hubs.items():
            placements(pl, f"hub of {name!r}")
        for name, n in self.nodes.items():
            for i, pl in enumerate(n.inputs):
                placements(pl, f"node {name!r} input {i}")
            for pl in per_output(n.output):
                placements(pl, f"node {name!r} output")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(plan_text(self))
        tmp.replace(path)  # whole or not at all
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {str(path)!r} is not JSON: {e}") from None
        except UnicodeDecodeError:
            raise PlanError(f"plan file {str(path)!r} is not JSON text (it does not decode as UTF-8)") from None
        return cls.from_json(data)

    def check_matches(self, graph: Graph, mesh: MeshSpec) -> None:
        """Refuse a plan made for another model or mesh."""
        if tuple(self.mesh.shape) != tuple(mesh.shape):
            raise PlanError(f"the plan is for mesh {self.mesh} but the run uses mesh {mesh}")
        sig = self.model.graph_signature
        if sig != graph.signature:
            raise PlanError(
                f"the plan does not match this model: its graph signature is {sig}, the model's is {graph.signature} "
                "(the model, its options or its example inputs changed; plan again)"
            )
        self._check_against(graph)

    def _check_against(self, graph: Graph) -> None:
        """Every node planned as the graph has it (op, inputs, outputs, shard
        dims within its tensors), every parameter named and placed as its
        node, every input and output placed: a damaged plan stops here, not
        inside the ranks."""
        missing = [n.name for n in graph if n.name not in self.nodes]
        extra = sorted(set(self.nodes) - {n.name for n in graph})
        if missing or extra:
            raise PlanError(f"the plan's nodes are not the graph's: missing {missing[:5]}, unknown {extra[:5]}")
        for n in graph:
            p = self.nodes[n.name]
            if p.op != n.op_name or len(p.inputs) != len(n.refs()):
                raise PlanError(f"plan node {n.name!r} is {p.op} reading {len(p.inputs)} tensor(s); the graph's is {n.op_name} reading {len(n.refs())}")
            metas = n.meta if isinstance(n.meta, tuple) else (n.meta,)
            outs = per_output(p.output)
            if len(outs) != len(metas):
                raise PlanError(f"plan node {n.name!r} places {len(outs)} output(s); {n.op_name} has {len(metas)}")
            for pl, meta in zip(outs, metas, strict=True):
                if meta is None or pl is None:  # no tensor there (an output the op did not compute)
                    continue
                if _dim_outside(pl, len(meta.shape)) is not None:
                    raise PlanError(f"plan node {n.name!r} shards a dim its {len(meta.shape)}-dim output does not have: {format_placements(pl)}")
            for i, (u, pl) in enumerate(zip(n.refs(), p.inputs, strict=True)):
                meta = graph[u].tensor_meta  # None for a tuple (a getitem reads one of its elements)
                if meta is not None and _dim_outside(pl, len(meta.shape)) is not None:
                    raise PlanError(f"plan node {n.name!r} reads input {i} sharded on a dim its {len(meta.shape)}-dim tensor does not have")
        by_fqn = {n.fqn: n.name for n in graph if n.role in (Role.PARAM, Role.BUFFER) and n.fqn}
        if set(self.parameters) != set(by_fqn):
            raise PlanError(
                f"the plan's parameters are not the model's: missing {sorted(set(by_fqn) - set(self.parameters))[:5]}, "
                f"unknown {sorted(set(self.parameters) - set(by_fqn))[:5]}"
            )
        for fqn, name in by_fqn.items():
            if tuple(self.parameters[fqn]) != tuple(self.nodes[name].output):
                raise PlanError(f"parameter {fqn!r} is placed {format_placements(self.parameters[fqn])} but its node {name!r} {format_placements(self.nodes[name].output)}")
        inputs = {n.name for n in graph if n.role is Role.INPUT}
        if set(self.inputs) != inputs:
            raise PlanError(f"the plan's inputs {sorted(self.inputs)} are not the model's {sorted(inputs)}")
        if len(self.outputs) != len(graph.outputs):
            raise PlanError(f"the plan places {len(self.outputs)} output(s); the model has {len(graph.outputs)}")


def _dim_outside(pl: Placements, rank: int | None) -> int | None:
    """The first shard dim that is negative or (rank given) not below `rank`."""
    return next((p.dim for p in pl if p.is_shard() and not (0 <= p.dim and (rank is None or p.dim < rank))), None)


def _pl(v) -> Placements | None:
    return None if v is None else tuple(parse_placement(x) for x in v)


def _node_json(n: NodePlan) -> dict:
    multi = is_multi_output(n.output)
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
