"""The dtplan pipeline: model -> captured IR -> strategies -> plan -> sharded GraphModule.

`plan_program` owns the order of the planning stages; each stage is also
callable on its own (`ir.capture`, `planner.strategies.build_strategies`,
`planner.ilp.solve`, `runtime.lower.lower`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.utils import _pytree as pytree

from ir.capture import Captured, capture
from ir.graph import Role
from planner._dtensor import Placements, parse_placement
from planner.classic import compare_classic
from planner.coarsen import coarse_mesh, narrow_all, widen, widen_choice
from planner.cost import DeviceProfile, load_profile
from planner.ilp import SolverOptions, solve
from planner.mesh import MeshSpec, parse_mesh, parse_size
from planner.plan import PLAN_VERSION, Plan, evaluate, parameter_table
from planner.pricing import Pricer, optimizer_state_factor
from planner.fold import fold_layers
from planner.hubs import add_hubs
from planner.shrink import merge_followers
from planner.strategies import build_strategies
from runtime.lower import lower
from runtime.params import local_shard

__all__ = ["PlacementSpec", "ShardedProgram", "compile", "plan_program", "shard", "sharded_program"]

log = logging.getLogger(__name__)

#: Per value: one placement string per mesh axis, e.g. ["S(0)", "R"].
PlacementSpec = Sequence[str]
Progress = Callable[[str], None]


def _placements(spec: PlacementSpec | Placements, mesh: MeshSpec, what: str) -> Placements:
    items = tuple(parse_placement(p) if isinstance(p, str) else p for p in spec)
    if len(items) != mesh.ndim:
        raise ValueError(f"{what} declares {len(items)} placement(s) {list(map(str, items))}; mesh {mesh} needs {mesh.ndim}, one per axis")
    return items


def _resolve(
    names: Sequence[str], given: Mapping[str, PlacementSpec] | PlacementSpec | None, mesh: MeshSpec, what: str
) -> dict[str, Placements]:
    """Placements for each named value: one spec for all, or a mapping by name
    or position; Replicate where nothing is said."""
    rep = tuple(parse_placement("R") for _ in range(mesh.ndim))
    if given is None:
        return {n: rep for n in names}
    if not isinstance(given, Mapping):
        return {n: _placements(given, mesh, f"{what} {n!r}") for n in names}
    out = {}
    for key, spec in given.items():
        name = names[int(key)] if str(key).isdigit() and str(key) not in names else str(key)
        if name not in names:
            raise ValueError(f"{what} {key!r} is not one of the model's: {list(names)}")
        out[name] = _placements(spec, mesh, f"{what} {name!r}")
    return {n: out.get(n, rep) for n in names}


def plan_program(
    captured: Captured,
    *,
    mesh: MeshSpec | str,
    profile: DeviceProfile | str = "cpu",
    memory: int | str | None = None,
    input_placements: Mapping[str, PlacementSpec] | PlacementSpec | None = None,
    output_placements: Mapping[str, PlacementSpec] | PlacementSpec | None = None,
    parameter_placements: Mapping[str, PlacementSpec] | None = None,
    solver: SolverOptions = SolverOptions(),
    optimizer: str = "adamw",
    compare: bool = False,
    fold: bool = True,
    coarsen: bool | None = None,
    model_info: Mapping[str, object] | None = None,
    progress: Progress | None = None,
) -> Plan:
    """Choose placements for a captured program (a forward program, or a
    training step from `ir.capture_training`). See README for the arguments.

    For a training step the outputs are the loss (placements as given, else
    Replicate) and the gradients, each of which must end in its parameter's
    placement; `optimizer` sizes the optimizer state in the memory model.
    `parameter_placements` pins parameters (by FQN) to given placements, for
    hand-written plans and for comparing against them. `compare` also plans
    the classic layouts (`planner.classic`) and records them in the plan.
    `fold` shares repeated layers' choices (`planner.fold`), so the program
    hardly grows with depth. `coarsen` (default: on meshes of three or more
    axes) plans on the mesh with its outer axes merged into one and gives
    every merged axis the merged axis's placement (`planner.coarsen`)."""
    say = progress or (lambda _m: None)
    mesh = parse_mesh(mesh) if isinstance(mesh, str) else mesh
    prof = load_profile(profile) if isinstance(profile, str) else profile
    budget = parse_size(memory) if isinstance(memory, str) else memory
    graph = captured.graph
    ins = _resolve(captured.user_inputs, input_placements, mesh, "input")
    n_free = 1 if captured.train else len(graph.outputs)
    out_names = [str(i) for i in range(n_free)]
    outs = _resolve(out_names, output_placements, mesh, "output")
    pins = _pinned(captured, parameter_placements, mesh)
    stages: dict[str, float] = dict(captured_stage_seconds(captured))
    coarsen = mesh.ndim >= 3 if coarsen is None else coarsen
    planned = coarse_mesh(mesh) if coarsen and mesh.ndim >= 3 else mesh
    if planned is not mesh:
        say(f"planning on {planned} (outer axes of {mesh} merged)")
        ins, outs, pins = (narrow_all(d, mesh) for d in (ins, outs, pins))

    t = time.perf_counter()
    say(f"strategies for {len(graph)} nodes on mesh {planned}")
    space = build_strategies(graph, tuple(planned.shape), {**ins, **pins})
    stages["strategies"] = time.perf_counter() - t

    t = time.perf_counter()
    pricer = Pricer(tuple(planned.shape), prof, optimizer_state_factor(optimizer if captured.train else None))
    space = merge_followers(graph, space, pricer)
    folded = fold_layers(graph, space) if fold else None
    space = folded.space if folded else space
    stages["shrink"] = time.perf_counter() - t

    t = time.perf_counter()
    wants = tuple(outs[n] for n in out_names) + tuple(captured.pinned_outputs[g] for g in graph.outputs[n_free:])
    space = add_hubs(graph, space, wants)
    say("solving the integer program")
    result = solve(graph, space, pricer, output_placements=wants, memory_budget=budget, options=solver)
    stages["build"] = result.build_s
    stages["solve"] = time.perf_counter() - t - result.build_s

    t = time.perf_counter()
    choice = result.choice
    if planned is not mesh:  # the chosen strategies, widened to every axis of the real mesh
        space, choice, wants = widen_choice(space, result.choice, wants, mesh)
        pricer = Pricer(tuple(mesh.shape), prof, pricer.state_factor)
        ins = {k: widen(v, mesh) for k, v in ins.items()}
    ev = evaluate(graph, space, pricer, mesh, choice, wants)
    out_pl = tuple(ev.nodes[w].output if isinstance(w, str) else w for w in wants)
    params, info = parameter_table(graph, mesh, ev.nodes, pricer)
    stages["evaluate"] = time.perf_counter() - t
    model = {"name": "model", "num_nodes": len(graph), "graph_signature": graph.signature, "train": captured.train}
    if captured.train:
        model["optimizer"] = optimizer
        model["gradients"] = {graph[p].fqn: g for g, p in captured.gradients.items()}
    model.update(model_info or {})
    comparison: tuple[dict, ...] = ()
    if compare:
        t = time.perf_counter()
        say("evaluating the classic plans for comparison")
        kwargs = dict(
            profile=prof, input_placements=input_placements, output_placements=output_placements, solver=solver, optimizer=optimizer, fold=fold, coarsen=coarsen
        )
        comparison = tuple(r.to_json() for r in compare_classic(captured, mesh=mesh, budget=budget, plan_kwargs=kwargs))
        stages["compare"] = time.perf_counter() - t
    return Plan(
        version=PLAN_VERSION,
        comparison=comparison,
        model=model,
        mesh=mesh,
        profile={"name": prof.name, "description": prof.description},
        memory_budget_bytes=budget,
        inputs=ins,
        outputs=out_pl,
        parameters=params,
        parameter_info=info,
        nodes=ev.nodes,
        hubs=ev.hubs,
        collectives=ev.collectives,
        fallbacks=space.fallbacks,
        cost={
            "total_s": ev.compute_s + ev.comm_s,
            "compute_s": ev.compute_s,
            "comm_s": ev.comm_s,
            "comm_bytes": ev.comm_bytes,
            "peak_memory_bytes": ev.peak_memory_bytes,
            "parameter_bytes": ev.parameter_bytes,
            "optimizer_bytes": ev.optimizer_bytes,
            "gradient_bytes": _gradient_bytes(captured, ev, pricer) if captured.train else 0,
            "activation_bytes": ev.peak_memory_bytes - ev.parameter_bytes - ev.optimizer_bytes,
        },
        solver={
            "status": result.status,
            "objective": result.objective_ns,
            "bound": result.bound_ns,
            "gap": result.gap,
            "wall_s": result.wall_s,
            "method": result.method,
            "variables": result.variables,
            "constraints": result.constraints,
            "layers_folded": folded.layers_folded if folded else 0,
            "nodes_folded": folded.nodes_folded if folded else 0,
            "planned_mesh": list(planned.shape),
        },
        stage_seconds=stages,
    )


def _pinned(captured: Captured, given: Mapping[str, PlacementSpec] | None, mesh: MeshSpec) -> dict[str, Placements]:
    """Placeholder node -> placements for the parameters (by FQN) the caller pins."""
    if not given:
        return {}
    by_fqn = {fqn: name for name, role, fqn in captured.placeholders if role in (Role.PARAM, Role.BUFFER)}
    unknown = sorted(set(given) - set(by_fqn))
    if unknown:
        raise ValueError(f"pinned parameters {unknown} are not in the model; it has {sorted(by_fqn)[:8]}...")
    return {by_fqn[f]: _placements(spec, mesh, f"parameter {f!r}") for f, spec in given.items()}


def _gradient_bytes(captured: Captured, ev, pricer: Pricer) -> int:
    """Per device, the gradients once reduced to their parameters' placements
    (they are inside `activation_bytes` too: live from their producer on)."""
    graph = captured.graph
    return sum(pricer.bytes_per_device(graph[p].tensor_meta, ev.nodes[p].output) for p in captured.gradients.values())


def captured_stage_seconds(captured: Captured) -> dict[str, float]:
    return {"capture": captured.seconds} if captured.seconds is not None else {}


def compile(model: torch.nn.Module, example_inputs: tuple, **plan_kwargs) -> Plan:  # noqa: A001 - the verb users expect
    """Capture `model(*example_inputs)` and plan it (see `plan_program`)."""
    return plan_program(capture(model, example_inputs), **plan_kwargs)


@dataclass(frozen=True)
class ShardedProgram:
    """This rank's sharded program: the GraphModule and how to feed it."""

    graph_module: torch.fx.GraphModule
    plan: Plan
    mesh: DeviceMesh
    captured: Captured

    def shard_inputs(self, *full_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Cut full inputs to this rank's pieces per the plan's input placements."""
        names = self.captured.user_inputs
        if len(full_inputs) != len(names):
            raise ValueError(f"the program takes {len(names)} input(s) {list(names)}, got {len(full_inputs)}")
        device = self.mesh.device_type
        return tuple(local_shard(x.to(device), self.mesh, self.plan.inputs[n]) for n, x in zip(names, full_inputs, strict=True))

    def __call__(self, *full_inputs: torch.Tensor) -> object:
        """This rank's outputs, nested as the model returns them (a tensor, a
        tuple, a dict, a ModelOutput ...); a training step returns the flat
        tuple (loss, gradients..., buffer updates...)."""
        with torch.no_grad():  # the program is its own backward where it has one
            outs = self.graph_module(*self.shard_inputs(*full_inputs))
        if self.captured.train or self.captured.out_spec is None:
            return outs
        return pytree.tree_unflatten(list(outs), self.captured.out_spec)


def sharded_program(model: torch.nn.Module, captured: Captured, plan: Plan, mesh: DeviceMesh) -> ShardedProgram:
    """Shard the real model's stored tensors and lower the plan for this rank."""
    plan.check_matches(captured.graph, plan.mesh)
    stored = {}
    device = mesh.device_type
    for name, role, fqn in captured.placeholders:
        if role is Role.INPUT:
            continue
        full = captured.constants[fqn] if role is Role.CONSTANT else _state(model, fqn)
        stored[name] = local_shard(full.to(device), mesh, plan.nodes[name].output)
    return ShardedProgram(lower(captured, plan, mesh, stored), plan, mesh, captured)


def _state(model: torch.nn.Module, fqn: str) -> torch.Tensor:
    try:
        return model.get_parameter(fqn)
    except AttributeError:
        return model.get_buffer(fqn)


def shard(
    model: torch.nn.Module,
    example_inputs: tuple,
    *,
    mesh: DeviceMesh,
    plan: Plan | None = None,
    **plan_kwargs,
) -> ShardedProgram:
    """Plan (unless a plan is given) and return this rank's sharded program.

    `mesh` is the initialised DeviceMesh this rank runs on; `model` holds the
    real (full) weights, which every rank builds identically.
    """
    captured = capture(model, example_inputs)
    if plan is None:
        spec = MeshSpec(tuple(mesh.shape), tuple(mesh.mesh_dim_names or (f"d{i}" for i in range(mesh.ndim))))
        plan = plan_program(captured, mesh=spec, **plan_kwargs)
    return sharded_program(model, captured, plan, mesh)
