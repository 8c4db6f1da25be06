"""The Plan: a frozen record of every placement, the collectives the runtime
will issue and the predicted cost. JSON round trip with a schema version;
no pickle anywhere.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dtplan.ir.flops import FlopFallback
from dtplan.ir.graph import Graph, Role
from dtplan.ir.precision import Precision
from dtplan.ir.remat import Remat, recomputed_originals
from dtplan.planner.cost.device import COLLECTIVE_KINDS
from dtplan.planner.cost.pricing import Pricer, local_shape
from dtplan.planner.evaluate import HUB, OUTPUT, NodePlan, PlannedCollective
from dtplan.planner.mesh import MeshSpec
from dtplan.planner.space._dtensor import Placements, format_placements, is_multi_output, is_sharded, parse_placement, per_output, strided_form_ok
from dtplan.planner.output.schema import At, PlanError, typed
from dtplan.planner.space.strategies import Fallback

__all__ = [
    "plan_text", "PLAN_VERSION", "ComparisonRow", "CostSummary", "ModelInfo", "NodePlan", "ParameterInfo", "Plan", "SolverSummary",
    "PlanError", "PlannedCollective", "parameter_table",
]

PLAN_VERSION = 1


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
    #: the mixed-precision policy (dtplan.ir.precision.Precision.to_json; {}: float32)
    precision: Mapping[str, str] = field(default_factory=dict)
    #: the activation recomputation in the planned graph (dtplan.ir.remat.Remat.to_json; {}: none)
    remat: Mapping[str, object] = field(default_factory=dict)
    #: `--remat auto`: each policy the planner tried, with its predicted step
    #: and peak memory per device (null where no plan fits the budget)
    remat_search: tuple[Mapping[str, object], ...] = ()


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
    #: the step with communication overlapped as the runtime schedules it
    #: (`dtplan.planner.cost.overlap`), and the communication no compute
    #: hides; `total_s` is compute + communication, the integer program's
    #: objective and an upper bound of this (absent in files before overlap)
    overlapped_s: float | None = None
    exposed_comm_s: float | None = None


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
    #: the solve steps a time limit stopped: the plan may differ on a machine
    #: of another speed or load (`--time-limit`)
    time_limited: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ParameterInfo:
    """A parameter's or buffer's entry in the plan file's `parameter_info`."""

    shape: tuple[int, ...]
    dtype: str
    local_shape: tuple[int, ...]
    bytes_per_device: int
    role: str
    #: its placeholder node in `nodes` (absent in files of earlier plans)
    node: str | None = None


@dataclass(frozen=True, kw_only=True)
class ComparisonRow:
    """A classic plan in the plan file's `comparison` (see
    dtplan.planner.output.classic): its pins by parameter, its cost, whether
    it fits the budget."""

    name: str
    parameters: Mapping[str, tuple[str, ...]]
    #: null where planning the layout failed (then `error` says why)
    cost: Mapping[str, float] | None
    fits: bool
    #: a published recipe's source, precision, remat and whether it ran as published
    recipe: Mapping[str, object] | None = None
    #: why the layout could not be planned, one line (absent when it was)
    error: str | None = None


def plan_text(plan: Plan) -> str:
    """The plan file's text."""
    return json.dumps(plan.to_json(), indent=1) + "\n"


def _section_json(section) -> dict:
    """A section as the plan file holds it: tuples as lists, at any depth."""

    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return {k: plain(x) for k, x in v.items()} if isinstance(v, Mapping) else v

    return plain(dataclasses.asdict(section))


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
    #: ops whose FLOP formula raised, priced as one FLOP per output element
    #: (`dtplan.ir.flops.flop_fallbacks`); written only when there are some
    flop_fallbacks: tuple[FlopFallback, ...] = ()

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
            # absent when empty: such a plan stays readable by a dtplan from before the key
            **({"flop_fallbacks": [{"node": f.node, "op": f.op, "reason": f.reason} for f in self.flop_fallbacks]} if self.flop_fallbacks else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> Plan:
        """The plan of a plan file's JSON, every field checked against the
        schema (`dtplan.planner.output.schema`) and against the others (the
        nodes the model section counts, each parameter placed as its node,
        each collective on a mesh axis between planned nodes); a PlanError
        names the first field that is wrong."""
        if not isinstance(d, Mapping) or "version" not in d:
            raise PlanError("not a dtplan plan: no 'version' key")
        root = At(d)
        version = root.field("version")
        if type(version.value) is not int or version.value != PLAN_VERSION:
            raise version.error(f"{version.value!r} is not supported; this dtplan reads version {PLAN_VERSION}")
        top = root.mapping(allowed={f.name for f in dataclasses.fields(cls)})
        mesh = _mesh(root.field("mesh"))
        nodes = {name: _node(at, mesh) for name, at in root.field("nodes").mapping().items()}
        hubs = {name: _placements(at, mesh) for name, at in root.get("hubs", {}).mapping().items()}
        infos = {fqn: typed(at, ParameterInfo) for fqn, at in root.get("parameter_info", {}).mapping().items()}
        params = {}
        for fqn, at in root.field("parameters").mapping().items():
            info = infos.get(fqn)
            params[fqn] = _placements(at, mesh, None if info is None else len(info.shape))
        plan = cls(
            version=version.value,
            model=typed(root.field("model"), ModelInfo),
            mesh=mesh,
            profile=typed(root.field("profile"), Mapping[str, str]),
            memory_budget_bytes=typed(root.get("memory_budget_bytes", None), int | None),
            inputs={k: _placements(at, mesh) for k, at in root.field("inputs").mapping().items()},
            outputs=tuple(_placements(at, mesh, optional=True) for at in root.field("outputs").sequence()),
            parameters=params,
            parameter_info={fqn: _section_json(i) for fqn, i in infos.items()},
            nodes=nodes,
            hubs=hubs,
            collectives=tuple(typed(at, PlannedCollective) for at in root.field("collectives").sequence()),
            fallbacks=tuple(typed(at, Fallback) for at in root.get("fallbacks", []).sequence()),
            cost=typed(root.field("cost"), CostSummary),
            solver=typed(root.field("solver"), SolverSummary),
            stage_seconds=typed(root.get("stage_seconds", {}), Mapping[str, float]),
            comparison=tuple(_comparison_row(at) for at in root.get("comparison", []).sequence()),
            flop_fallbacks=tuple(typed(at, FlopFallback) for at in root.get("flop_fallbacks", []).sequence()),
        )
        plan._check_consistent(top)
        return plan

    def _check_consistent(self, top: Mapping[str, At]) -> None:
        """What the plan's fields say of each other, without the model."""
        if "profile" in top and "name" not in self.profile:
            raise top["profile"].error("'name' is missing")
        try:
            Precision.from_json(dict(self.model.precision))
        except (KeyError, ValueError) as e:
            raise At(self.model.precision, "model.precision").error(f"not a precision policy: {e}") from None
        try:
            Remat.from_json(dict(self.model.remat))
        except ValueError as e:
            raise At(self.model.remat, "model.remat").error(f"not a remat policy: {e}") from None
        if self.model.num_nodes != len(self.nodes):
            raise top["nodes"].error(f"holds {len(self.nodes)} node(s); model.num_nodes says {self.model.num_nodes}")
        entries = {k: top[k].mapping() for k in ("nodes", "inputs", "parameters")}
        for name, pl in self.inputs.items():
            node = self.nodes.get(name)
            if node is None:
                raise entries["inputs"][name].error("names no planned node")
            if node.output != pl:
                raise entries["inputs"][name].error(f"is {format_placements(pl)} but its node is placed {format_placements(node.output)}")
        placed_only = sorted(set(self.parameters) - set(self.parameter_info))
        info_only = sorted(set(self.parameter_info) - set(self.parameters))
        if placed_only or info_only:
            says = ([f"{placed_only[:5]} placed without parameter_info"] if placed_only else []) + (
                [f"{info_only[:5]} in parameter_info without placements"] if info_only else []
            )
            raise top["parameters"].error("; ".join(says))
        for fqn, pl in self.parameters.items():
            node_name = self.parameter_info[fqn]["node"]
            if node_name is None:
                continue  # a plan file from before parameter_info named the node: checked against the graph only
            node = self.nodes.get(node_name)
            if node is None:
                raise top["parameter_info"].mapping()[fqn].error(f"names node {node_name!r}, which the plan does not have")
            if node.output != pl:
                raise entries["parameters"][fqn].error(f"is {format_placements(pl)} but its node {node_name!r} is placed {format_placements(node.output)}")
        for name, node in self.nodes.items():
            if len(node.via_hub) not in (0, len(node.inputs)):
                raise entries["nodes"][name].error(f"via_hub has {len(node.via_hub)} entries for {len(node.inputs)} input(s)")
        for name in self.hubs:
            if name not in self.nodes:
                raise top["hubs"].mapping()[name].error("names no planned node")
        for c, at in zip(self.collectives, top["collectives"].sequence(), strict=True):
            if c.kind not in COLLECTIVE_KINDS:
                raise at.error(f"kind {c.kind!r} is not one of {list(COLLECTIVE_KINDS)}")
            if c.axis not in self.mesh.axis_names:
                raise at.error(f"axis {c.axis!r} is not an axis of mesh {self.mesh}")
            if c.producer not in self.nodes:
                raise at.error(f"producer {c.producer!r} names no planned node")
            if c.node not in self.nodes and c.node not in (HUB, OUTPUT):
                raise at.error(f"node {c.node!r} names no planned node (nor {HUB!r} or {OUTPUT!r})")
        for key, entries in (("fallbacks", self.fallbacks), ("flop_fallbacks", self.flop_fallbacks)):
            for f, at in zip(entries, top[key].sequence() if key in top else (), strict=True):
                if f.node not in self.nodes:
                    raise at.error(f"node {f.node!r} names no planned node")

    @property
    def precision(self) -> Precision:
        """The mixed-precision policy the plan was made under (model.precision)."""
        return Precision.from_json(dict(self.model.precision))

    @property
    def remat(self) -> Remat:
        """The activation recomputation the plan's graph holds (model.remat)."""
        return Remat.from_json(dict(self.model.remat))

    def recomputed(self) -> dict[str, str]:
        """Recomputed copy node -> the forward node it recomputes (remat)."""
        if not self.remat.active:
            return {}
        return recomputed_originals(self.nodes)

    def recompute_s(self) -> float:
        """Predicted seconds per step spent recomputing activations."""
        return sum(self.nodes[n].compute_s for n in self.recomputed())

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

    def check_matches(self, graph: Graph, mesh: MeshSpec, *, axis_names: bool = False) -> None:
        """Refuse a plan made for another model or mesh (with `axis_names`,
        also for a mesh whose axes are named otherwise)."""
        if tuple(self.mesh.shape) != tuple(mesh.shape) or (axis_names and tuple(self.mesh.axis_names) != tuple(mesh.axis_names)):
            raise PlanError(f"mesh: the plan is for mesh {self.mesh} but the run uses mesh {mesh}")
        sig = self.model.graph_signature
        if sig != graph.signature:
            raise PlanError(
                f"model.graph_signature: the plan does not match this model: its graph signature is {sig}, the model's is {graph.signature} "
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
            raise PlanError(f"nodes: not the graph's: missing {missing[:5]}, unknown {extra[:5]}")
        for n in graph:
            p, at = self.nodes[n.name], f"nodes[{json.dumps(n.name)}]"
            if p.op != n.op_name:
                raise PlanError(f"{at}.op: {p.op!r}, but the graph's node is {n.op_name}")
            if len(p.inputs) != len(n.refs()):
                raise PlanError(f"{at}.inputs: places {len(p.inputs)} input(s); the graph's {n.op_name} reads {len(n.refs())}")
            metas = n.meta if isinstance(n.meta, tuple) else (n.meta,)
            outs = per_output(p.output)
            if len(outs) != len(metas):
                raise PlanError(f"{at}.output: places {len(outs)} output(s); {n.op_name} has {len(metas)}")
            for i, (pl, meta) in enumerate(zip(outs, metas, strict=True)):
                if meta is not None and pl is not None:  # else no tensor there (an output the op did not compute)
                    _check_dims(pl, len(meta.shape), f"{at}.output" + (f"[{i}]" if len(outs) > 1 else ""))
            for i, (u, pl) in enumerate(zip(n.refs(), p.inputs, strict=True)):
                meta = graph[u].tensor_meta  # None for a tuple (a getitem reads one of its elements)
                if meta is not None:
                    _check_dims(pl, len(meta.shape), f"{at}.inputs[{i}]")
        by_fqn = {n.fqn: n.name for n in graph if n.role in (Role.PARAM, Role.BUFFER) and n.fqn}
        if set(self.parameters) != set(by_fqn):
            raise PlanError(
                f"parameters: not the model's: missing {sorted(set(by_fqn) - set(self.parameters))[:5]}, "
                f"unknown {sorted(set(self.parameters) - set(by_fqn))[:5]}"
            )
        for fqn, name in by_fqn.items():
            if tuple(self.parameters[fqn]) != tuple(self.nodes[name].output):
                raise PlanError(
                    f"parameters[{json.dumps(fqn)}]: is {format_placements(self.parameters[fqn])} but its node {name!r} is placed {format_placements(self.nodes[name].output)}"
                )
        inputs = {n.name for n in graph if n.role is Role.INPUT}
        if set(self.inputs) != inputs:
            raise PlanError(f"inputs: names {sorted(self.inputs)}; the model's inputs are {sorted(inputs)}")
        if len(self.outputs) != len(graph.outputs):
            raise PlanError(f"outputs: places {len(self.outputs)} output(s); the model has {len(graph.outputs)}")


def _check_dims(pl: Placements, rank: int, path: str) -> None:
    for i, p in enumerate(pl):
        if is_sharded(p) and p.dim >= rank:
            raise PlanError(f"{path}[{i}]: '{p}' — dim {p.dim} is out of range for a {rank}-d tensor")


def _comparison_row(at: At) -> dict:
    """A row of `comparison`: a cost, or an error and no cost (and, from a
    file before errors were recorded, no `error` key)."""
    row = typed(at, ComparisonRow)
    if (row.cost is None) == (row.error is None):
        raise at.error("has both a cost and an error" if row.error is not None else "has neither a cost nor an error")
    out = _section_json(row)
    return out if row.error is not None else {k: v for k, v in out.items() if k != "error"}


def _mesh(at: At) -> MeshSpec:
    at.mapping(allowed={"shape", "axis_names"})
    shape = typed(at.field("shape"), tuple[int, ...])
    names = typed(at.field("axis_names"), tuple[str, ...])
    try:
        return MeshSpec(shape, names)
    except ValueError as e:
        raise at.error(str(e)) from None


def _placements(at: At, mesh: MeshSpec, rank: int | None = None, *, optional: bool = False) -> Placements | None:
    """One placement per mesh axis, each R, S(dim) or P(op), shard dims in
    range (of a `rank`-d tensor where known); None only where `optional`."""
    if at.value is None and optional:
        return None
    items = at.sequence()
    if len(items) != mesh.ndim:
        raise at.error(f"has {len(items)} placement(s); mesh {mesh} has {mesh.ndim} axes")
    out = []
    for item in items:
        if not isinstance(item.value, str):
            raise item.error(f"{item.value!r} is not a placement (R, S(<dim>) or P(<reduce op>))")
        try:
            p = parse_placement(item.value)
        except ValueError as e:
            raise item.error(str(e)) from None
        if is_sharded(p) and p.dim < 0:
            raise item.error(f"{item.value!r} — dim {p.dim} is negative (plans name dims from 0)")
        out.append(p)
    if not strided_form_ok(out, mesh.shape):
        raise at.error(
            f"{[str(p) for p in out]}: a strided shard _S(dim, k) must come before the axes that shard its dim plainly, "
            "k being the product of their sizes"
        )
    if rank is not None:
        _check_dims(tuple(out), rank, at.path)
    return tuple(out)


def _node(at: At, mesh: MeshSpec) -> NodePlan:
    """A node of the plan file's `nodes`: a multi-output node's output is one
    placement list per output (None for a non-tensor one)."""
    entries = at.mapping(allowed={"op", "module", "inputs", "output", "multi_output", "compute_s", "via_hub"})
    multi = typed(at.get("multi_output", False), bool)
    out = entries.get("output")
    if out is None:
        raise at.error("'output' is missing")
    output = tuple(_placements(o, mesh, optional=True) for o in out.sequence()) if multi else _placements(out, mesh)
    return NodePlan(
        typed(at.field("op"), str),
        typed(at.field("module"), str),
        tuple(_placements(i, mesh) for i in at.field("inputs").sequence()),
        output,
        typed(at.field("compute_s"), float),
        typed(at.get("via_hub", []), tuple[bool, ...]),
    )


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


def _collective_json(c: PlannedCollective) -> dict:
    return {
        "kind": c.kind,
        "axis": c.axis,
        "bytes": c.bytes,
        "time_s": c.time_s,
        "producer": c.producer,
        "node": c.node,
        "module": c.module,
        **({"bucket": c.bucket} if c.bucket is not None else {}),
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
            "node": n.name,
        }
    return placements, info
