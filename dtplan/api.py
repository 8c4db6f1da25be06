"""The dtplan pipeline: model -> captured IR -> strategies -> plan -> sharded GraphModule.

`plan_program` owns the order of the planning stages; each stage is also
callable on its own (`dtplan.ir.capture`, `dtplan.planner.space.strategies.build_strategies`,
`dtplan.planner.solver.solve`, `dtplan.runtime.lower.lower`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate

from dtplan.ir.capture import Captured, capture, capture_training
from dtplan.ir.flops import flop_fallbacks
from dtplan.ir.graph import Role
from dtplan.ir.precision import Precision
from dtplan.ir.remat import Remat, RematError, recomputed_originals
from dtplan.ir.remat import layers as remat_layers
from dtplan.ir.remat import remat as apply_remat
from dtplan.planner.space._dtensor import Placements, parse_placement
from dtplan.planner.output.classic import compare_classic
from dtplan.planner.reduce.coarsen import WidenedPricer, coarse_mesh, narrow_all, widen_choice
from dtplan.planner.cost.device import DeviceProfile, load_profile
from dtplan.planner.solver import MemoryBudgetError, SolveResult, SolverOptions, solve, solve_pinned
from dtplan.planner.mesh import MeshSpec, format_bytes, parse_mesh, parse_size
from dtplan.planner.evaluate import Evaluation, evaluate
from dtplan.planner.output.plan import PLAN_VERSION, CostSummary, ModelInfo, Plan, SolverSummary, parameter_table
from dtplan.planner.cost.pricing import BUCKET_BYTES, Pricer, optimizer_state_factor
from dtplan.planner.reduce.fold import FoldResult, fold_layers
from dtplan.planner.reduce.hubs import add_hubs
from dtplan.planner.reduce.followers import merge_followers
from dtplan.planner.space._dtensor import is_multi_output, per_output, unstrided
from dtplan.planner.space.strategies import Strategy, build_strategies, hub_name, strategies_around
from dtplan.runtime.agree import agreed_plan
from dtplan.runtime.parallel import parallelized
from dtplan.runtime.program import ShardedProgram, mesh_spec, sharded_program

__all__ = ["PlacementSpec", "ShardedProgram", "compile", "parallelize", "plan_program", "shard", "sharded_program"]

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
    remat: Remat | str | None = None,
) -> Plan:
    """Choose placements for a captured program (a forward program, or a
    training step from `dtplan.ir.capture_training`). See README for the arguments.

    For a training step the outputs are the loss (placements as given, else
    Replicate) and the gradients, each of which must end in its parameter's
    placement; `optimizer` sizes the optimizer state in the memory model.
    `parameter_placements` pins parameters (by FQN) to given placements, for
    hand-written plans and for comparing against them. `compare` also plans
    the classic layouts (`dtplan.planner.output.classic`) and records them in the plan.
    `fold` shares repeated layers' choices (`dtplan.planner.reduce.fold`), so the program
    hardly grows with depth. `coarsen` (default: on meshes of three or more
    axes) plans on the mesh with its outer axes merged into one, then plans
    blocks of the real axes again around that plan (`_plan_outer_axes`,
    `dtplan.planner.reduce.coarsen`); off, every axis is one program.
    `remat` (training steps) recomputes activations in the backward:
    `"full"`, `"selective"` or a `dtplan.ir.remat.Remat` for those layers, or
    `"auto"`: the fastest predicted of the policies `_plan_remat_auto` tries
    that fits the memory budget."""
    say = progress or (lambda _m: None)
    if remat == "auto":
        return _plan_remat_auto(
            captured, mesh=mesh, profile=profile, memory=memory, input_placements=input_placements, output_placements=output_placements,
            parameter_placements=parameter_placements, solver=solver, optimizer=optimizer, compare=compare, fold=fold, coarsen=coarsen,
            model_info=model_info, progress=progress,
        )
    if remat is not None:
        t = time.perf_counter()
        captured = apply_remat(captured, remat)
        say(f"activation recomputation: {captured.remat} ({len(recomputed_originals(captured.graph))} ops recomputed)")
        log.debug("remat %s: %.3fs", captured.remat, time.perf_counter() - t)
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
    real = (ins, outs, pins)
    if planned is not mesh:
        say(f"planning on {planned} (outer axes of {mesh} merged)")
        ins, outs, pins = (narrow_all(d, mesh) for d in (ins, outs, pins))

    t = time.perf_counter()
    say(f"strategies for {len(graph)} nodes on mesh {planned}")
    space = build_strategies(graph, tuple(planned.shape), {**ins, **pins})
    stages["strategies"] = time.perf_counter() - t

    t = time.perf_counter()
    # on a merged mesh a gradient's reduction over the merged axis is one step
    # there but one per real axis after widening, which buckets do not take:
    # the merged program prices gradients unbucketed
    bucket = _bucket_bytes(captured)
    state = optimizer_state_factor(optimizer if captured.train else None)
    pricer = Pricer(tuple(planned.shape), prof, state, bucket) if planned is mesh else WidenedPricer(tuple(planned.shape), prof, state, 0, tuple(mesh.shape))
    space = merge_followers(graph, space, pricer)
    folded = fold_layers(graph, space) if fold else None
    space = folded.space if folded else space
    stages["shrink"] = time.perf_counter() - t

    t = time.perf_counter()
    wants = tuple(outs[n] for n in out_names) + tuple(captured.pinned_outputs[g] for g in graph.outputs[n_free:])
    space = add_hubs(graph, space, wants)
    say("solving the integer program")
    # a merged program is only the start of the real axes' blocks, which carry
    # the budget: under one it can defeat the solvers (the 70b on 4x8x8x2 at
    # 80 GiB: HiGHS gave up, CP-SAT called the model invalid)
    result = solve(graph, space, pricer, output_placements=wants, memory_budget=budget if planned is mesh else None, options=solver)
    stages["build"] = result.build_s
    stages["solve"] = time.perf_counter() - t - result.build_s

    choice = result.choice
    if planned is not mesh:  # every outer axis chosen again around the widened plan
        t = time.perf_counter()
        ins, outs, pins = real
        wants = tuple(outs[n] for n in out_names) + wants[n_free:]
        pricer = Pricer(tuple(mesh.shape), prof, pricer.state_factor, bucket)
        space, choice, result, refolded = _plan_outer_axes(
            graph, space, result, wants, mesh, {**ins, **pins}, pricer, budget, solver, fold, say
        )
        folded = refolded or folded
        stages["outer_axes"] = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate(graph, space, pricer, mesh, choice, wants)
    if planned is not mesh and budget is not None and ev.peak_memory_bytes > budget:
        raise MemoryBudgetError(budget, ev.peak_memory_bytes, found=True)  # no block of axes found a plan that fits
    ev, reranked = _rerank_replicated(graph, space, pricer, mesh, choice, wants, ev, budget)
    if reranked:
        say(f"not sharding is faster with communication overlapped ({ev.overlap.step_s * 1e3:.3g} ms): every op replicated")
    params, info = parameter_table(graph, mesh, ev.nodes, pricer)
    stages["evaluate"] = time.perf_counter() - t
    plan = Plan(
        version=PLAN_VERSION,
        comparison=(),
        model=_model_info(captured, optimizer, model_info),
        mesh=mesh,
        profile={"name": prof.name, "description": prof.description},
        memory_budget_bytes=budget,
        inputs=ins,
        outputs=tuple(ev.nodes[w].output if isinstance(w, str) else w for w in wants),
        parameters=params,
        parameter_info=info,
        nodes=ev.nodes,
        hubs=ev.hubs,
        collectives=ev.collectives,
        fallbacks=space.fallbacks,
        flop_fallbacks=flop_fallbacks(graph),
        cost=_cost_summary(captured, ev, pricer),
        solver=_solver_summary(result, folded, planned, reranked),
        stage_seconds=stages,
    )
    # the same program with parameters pinned: the data-parallel layout, the classic plans
    same = dict(profile=prof, input_placements=input_placements, output_placements=output_placements, solver=solver, optimizer=optimizer, fold=fold, coarsen=coarsen)
    if captured.train and not pins and planned is mesh and mesh.size > 1 and (prof.rank_skew or prof.overlap_slowdown):
        plan = _rerank_data_parallel(plan, captured, budget, same, say)
    if compare:
        built = _Built(captured, space, pricer, mesh, wants, result.state) if planned is mesh and result.state is not None else None
        plan = _with_comparison(plan, captured, same, say, built)
    return plan


def _plan_outer_axes(
    graph, space, coarse: SolveResult, wants: tuple, mesh: MeshSpec, fixed: Mapping[str, Placements], pricer: Pricer,
    budget: int | None, solver: SolverOptions, fold: bool, say: Progress,
) -> tuple[object, dict[str, int], SolveResult, FoldResult | None]:
    """A plan on every axis of a mesh of three or more, improved one block
    of axes at a time from two starts (`dtplan.planner.reduce.coarsen`).

    A block is planned again with every other axis fixed: each node keeps
    the strategies that agree with its current one off the block
    (`strategies_around`), a program about the size of a
    plan on the block's axes alone, priced on the real mesh. The current plan
    is one of its solutions, and a block's plan is kept only where its
    objective is lower. The blocks: each outer axis but the last two alone,
    and the last two together.

    - From the merged plan widened: every outer axis holds the merged axis's
      placement (a parameter sharded over it is sharded over all: FSDP over
      every data-parallel rank); each outer axis is then chosen again, so
      one can keep a parameter replicated while the next shards it (HSDP).
    - From data parallel over the outer axes (batch split, parameters
      replicated: the placements of a one-axis plan with its parameters
      pinned Replicate): the last two axes are planned for the data each of
      them gets, as a plan of the inner two-axis mesh at the local batch
      would be, then each outer axis is chosen again (its parameters may
      become sharded where memory asks).

    The lower objective of the two is the plan. What this gives up: choices
    that pay only when two blocks change together, and starts other than
    these two."""
    wide_space, wide_choice, _ = widen_choice(space, coarse.choice, wants, mesh)
    outer = [(a,) for a in range(mesh.ndim - 2)]
    inner = tuple(range(mesh.ndim - 2, mesh.ndim))
    merged = {n: ns.options[wide_choice[n]] for n, ns in wide_space.nodes.items()}
    start = _data_parallel_outer(graph, mesh, fixed, wants, pricer, fold)
    # unbudgeted first: where its plan fits, it is the budget's optimum too
    # (and the budget's rows cost the blocks' solves much: 125 s against 12 s
    # for the 70b's inner block on 4x8x8x2)
    for b in (None, budget) if budget is not None else (None,):
        runs = [_descend(graph, mesh, fixed, wants, pricer, b, solver, fold, say, merged, outer)]
        if start is not None:
            runs.append(_descend(graph, mesh, fixed, wants, pricer, b, solver, fold, say, start, [inner, *outer]))
        found = [r for r in runs if r is not None]
        if not found:
            continue
        best = min(found, key=lambda r: r[2].objective_ns)
        if budget is None or evaluate(graph, best[0], pricer, mesh, best[1], wants).peak_memory_bytes <= budget:
            break
        say(f"the plan of the real axes needs more than {format_bytes(budget)}: planning them again under the budget")
    if not found:
        return wide_space, wide_choice, coarse, None
    sp, choice, res, folded = best
    method = f"{coarse.method} on the merged mesh, then {res.method} per block of axes"
    return sp, choice, dataclasses.replace(res, method=method), folded


def _descend(graph, mesh: MeshSpec, fixed, wants, pricer, budget, solver, fold, say, plan: dict, blocks) -> tuple | None:
    """Each block of axes planned again around `plan` in turn (see
    `_plan_outer_axes`); the last block's result that lowered the objective."""
    best = None
    for free in blocks:
        names = ", ".join(mesh.axis_names[a] for a in free)
        say(f"planning mesh axes {names} again around the plan of the others")
        sp = strategies_around(graph, tuple(mesh.shape), fixed, plan, free)
        sp = merge_followers(graph, sp, pricer)
        folded = fold_layers(graph, sp) if fold else None
        sp = add_hubs(graph, folded.space if folded else sp, wants)
        try:
            res = solve(graph, sp, pricer, output_placements=wants, memory_budget=budget, options=solver)
        except MemoryBudgetError as e:
            log.info("axes %s kept: %s", names, e)
            continue
        log.info("axes %s: %s, %d variables, objective %d ns, %.2fs", names, res.method, res.variables, res.objective_ns, res.wall_s)
        if best is not None and res.objective_ns >= best[2].objective_ns:
            continue
        plan = {n: ns.options[res.choice[n]] for n, ns in sp.nodes.items()}
        best = (sp, dict(res.choice), res, folded)
    return best


def _data_parallel_outer(graph, mesh: MeshSpec, fixed: Mapping[str, Placements], wants: tuple, pricer: Pricer, fold: bool) -> dict | None:
    """Per node, a strategy that is data parallel over the outer axes (all
    but the last two) and replicated on the last two: a one-axis plan over
    the outer axes' ranks with every parameter pinned Replicate (inputs as
    given on the first axis), widened. None where that plan has no solution."""
    k = mesh.ndim - 2
    ones = (math.prod(mesh.shape[:k]),)
    params = {n.name for n in graph if n.role in (Role.PARAM, Role.BUFFER)}
    pins = {**{n: (Replicate(),) for n in params}, **{n: (unstrided(pl[0]),) for n, pl in fixed.items()}}
    one_wants = tuple(w if isinstance(w, str) else (w[0],) for w in wants)
    small = Pricer(ones, pricer.profile, pricer.state_factor, pricer.bucket_bytes)
    try:
        sp = build_strategies(graph, ones, pins)
        sp = merge_followers(graph, sp, small)
        folded = fold_layers(graph, sp) if fold else None
        sp = add_hubs(graph, folded.space if folded else sp, one_wants)
        res = solve(graph, sp, small, output_placements=one_wants, memory_budget=None, options=SolverOptions(time_limit_s=30))
    except (MemoryBudgetError, ValueError) as e:
        log.info("no data-parallel start for the outer axes: %s", e)
        return None
    rest = (Replicate(),) * 2

    def wide(pl):
        return None if pl is None else (pl[0],) * k + rest

    out = {}
    for n, ns in sp.nodes.items():
        st = ns.options[res.choice[n]]
        o = tuple(wide(x) for x in st.output) if is_multi_output(st.output) else wide(st.output)
        out[n] = Strategy(tuple(wide(i) for i in st.inputs), o)
    return out


@dataclasses.dataclass(frozen=True)
class _Built:
    """The free plan's program, built and solved: a classic plan is that
    program with its parameters' choices pinned (`solve_pinned`), solved from
    the free plan's LP basis, instead of a program built again."""

    captured: Captured
    space: object
    pricer: Pricer
    mesh: MeshSpec
    wants: tuple
    state: object

    def cost(self, pins: Mapping[str, PlacementSpec]) -> CostSummary | None:
        """The pinned plan's cost, None where the program cannot take the pins
        (a placement the free plan's space lacks, twins pinned apart)."""
        nodes = self.space.nodes
        allowed = {}
        for name, want in _pinned(self.captured, pins, self.mesh).items():
            ks = frozenset(k for k, st in enumerate(nodes[name].options) if tuple(st.output) == tuple(want))
            if not ks:
                return None
            allowed[name] = ks
        result = solve_pinned(self.state, allowed)
        if result is None:
            return None
        log.debug("pinned plan: %s in %.2fs, %d ns (bound %d)", result.method, result.wall_s, result.objective_ns, result.bound_ns)
        ev = evaluate(self.captured.graph, self.space, self.pricer, self.mesh, result.choice, self.wants)
        return _cost_summary(self.captured, ev, self.pricer)


def _rerank_data_parallel(plan: Plan, captured: Captured, budget: int | None, same: Mapping[str, object], say: Progress) -> Plan:
    """The plan, or the data-parallel layout's where that is faster with
    communication overlapped. Like `_rerank_replicated`, for a profile that
    charges what the integer program cannot see (the ranks' drift before each
    collective, compute slowed under communication): the program minimises
    the serial step, and a plan with fewer, later collectives (every
    parameter replicated, its gradients reduced in buckets under backward)
    can simulate faster than the program's choice. That layout is planned
    (parameters pinned Replicate, the rest the planner's) under the same
    budget and kept if it simulates faster: one more solve, for training
    steps under calibrated profiles only."""
    t = time.perf_counter()
    pins = {fqn: ["R"] * plan.mesh.ndim for fqn in plan.parameters}
    try:
        dp = plan_program(captured, mesh=plan.mesh, parameter_placements=pins, memory=budget, compare=False, **same)
    except (MemoryBudgetError, ValueError) as e:
        log.info("data-parallel layout not weighed: %s", e)
        return plan
    stages = {**plan.stage_seconds, "rerank": time.perf_counter() - t}
    if dp.cost.overlapped_s >= plan.cost.overlapped_s:
        return dataclasses.replace(plan, stage_seconds=stages)
    say(f"the data-parallel layout is faster with communication overlapped ({dp.cost.overlapped_s * 1e3:.3g} ms)")
    solver_summary = dataclasses.replace(dp.solver, method=f"{dp.solver.method}, data-parallel layout (faster overlapped than {plan.solver.method})")
    return dataclasses.replace(dp, solver=solver_summary, model=plan.model, stage_seconds={**stages, **{k: v for k, v in dp.stage_seconds.items() if k not in stages}})


def _plan_remat_auto(captured: Captured, *, memory, compare: bool, progress: Progress | None, model_info, **kwargs) -> Plan:
    """`remat="auto"`: plan under each candidate policy and keep the fastest
    predicted plan that fits the budget. Candidates: none, selective, full;
    when none does not fit but full does, full on only the first k layers
    for the smallest k that fits (by bisection: the saved activations shrink
    with every layer recomputed). Each try is recorded in the plan
    (`model.remat_search`)."""
    say = progress or (lambda _m: None)
    if not captured.train:
        raise RematError("activation checkpointing applies to training steps; plan a training step (capture_training, --train)")
    t0 = time.perf_counter()
    tried: dict[Remat, Plan | None] = {}
    recomputing: dict[Remat, Captured] = {}
    errors: dict[Remat, MemoryBudgetError] = {}

    def attempt(policy: Remat) -> Plan | None:
        if policy not in tried:
            say(f"remat auto: planning with {policy}")
            recomputing[policy] = apply_remat(captured, policy)
            try:
                tried[policy] = plan_program(recomputing[policy], memory=memory, compare=False, model_info=model_info, **kwargs)
            except MemoryBudgetError as e:
                tried[policy], errors[policy] = None, e
        return tried[policy]

    for mode in ("none", "selective", "full"):
        attempt(Remat(mode))
    names = remat_layers(captured.graph)
    if tried[Remat("none")] is None and tried[Remat("full")] is not None and len(names) > 1:
        lo, hi = 1, len(names)  # full on names[:hi] fits; find the least such hi
        while lo < hi:
            mid = (lo + hi) // 2
            if attempt(Remat("full", names[:mid])) is None:
                lo = mid + 1
            else:
                hi = mid
        attempt(Remat("full", names[:hi]))
    fitting = {p: plan for p, plan in tried.items() if plan is not None}
    if not fitting:
        raise errors[Remat("full")]  # the least memory of the policy that saves the most
    best_policy, best = min(fitting.items(), key=lambda kv: kv[1].cost.total_s)
    search = tuple(
        {
            "policy": str(p),
            **p.to_json(),
            "step_s": None if plan is None else plan.cost.total_s,
            "peak_memory_bytes": None if plan is None else plan.cost.peak_memory_bytes,
            "chosen": p == best_policy,
        }
        for p, plan in tried.items()
    )
    stages = {**best.stage_seconds, "remat_search": time.perf_counter() - t0}
    model = dataclasses.replace(best.model, remat_search=search)
    best = dataclasses.replace(best, model=model, stage_seconds=stages)
    if compare:
        same = {k: kwargs[k] for k in ("profile", "input_placements", "output_placements", "solver", "optimizer", "fold", "coarsen")}
        best = _with_comparison(best, recomputing[best_policy], same, say)
    say(f"remat auto: {best_policy} ({best.cost.total_s * 1e3:.1f} ms predicted)")
    return best


def _with_comparison(plan: Plan, captured: Captured, same: Mapping[str, object], say: Progress, built: _Built | None = None) -> Plan:
    """The plan with the classic plans of the same program beside it."""
    t = time.perf_counter()
    say("evaluating the classic plans for comparison")
    comparison = _classic_comparison(captured, plan.mesh, plan.memory_budget_bytes, same, built)
    return dataclasses.replace(plan, comparison=comparison, stage_seconds={**plan.stage_seconds, "compare": time.perf_counter() - t})


def _classic_comparison(captured: Captured, mesh: MeshSpec, budget: int | None, same: Mapping[str, object], built: _Built | None = None) -> tuple[dict, ...]:
    """The classic plans, each the same program with its parameters pinned:
    the free plan's program with bounds (`_Built`) where there is one that
    takes the pins, else planned again."""

    def plan_pinned(pins: Mapping[str, PlacementSpec]) -> Plan | CostSummary:
        cost = built.cost(pins) if built is not None else None
        return cost if cost is not None else plan_program(captured, mesh=mesh, parameter_placements=pins, memory=None, **same)

    return tuple(r.to_json() for r in compare_classic(captured, mesh=mesh, budget=budget, plan_pinned=plan_pinned))


def _model_info(captured: Captured, optimizer: str, given: Mapping[str, object] | None) -> ModelInfo:
    fields = {f.name for f in dataclasses.fields(ModelInfo)}
    unknown = sorted(set(given or {}) - fields)
    if unknown:
        raise ValueError(f"model_info keys {unknown} are not fields of ModelInfo ({sorted(fields)})")
    graph = captured.graph
    trained = {"optimizer": optimizer, "gradients": {graph[p].fqn: g for g, p in captured.gradients.items()}} if captured.train else {}
    return ModelInfo(
        **{"num_nodes": len(graph), "graph_signature": graph.signature, "train": captured.train, "precision": captured.precision.to_json(), "remat": captured.remat.to_json(), **trained, **(given or {})}
    )


def _bucket_bytes(captured: Captured) -> int:
    """The bucket a gradient reduction is priced in (`Pricer.bucket_bytes`):
    full, or all the gradients where they fill less (a small model's
    reductions all travel in one bucket)."""
    if not captured.train:
        return 0
    graph = captured.graph
    total = sum(graph[g].tensor_meta.nbytes for g in captured.gradients)
    return min(BUCKET_BYTES, total)


def _cost_summary(captured: Captured, ev: Evaluation, pricer: Pricer) -> CostSummary:
    return CostSummary(
        total_s=ev.compute_s + ev.comm_s,
        compute_s=ev.compute_s,
        comm_s=ev.comm_s,
        comm_bytes=ev.comm_bytes,
        peak_memory_bytes=ev.peak_memory_bytes,
        parameter_bytes=ev.parameter_bytes,
        optimizer_bytes=ev.optimizer_bytes,
        gradient_bytes=_gradient_bytes(captured, ev, pricer) if captured.train else 0,
        activation_bytes=ev.peak_memory_bytes - ev.parameter_bytes - ev.optimizer_bytes,
        overlapped_s=ev.overlap.step_s,
        exposed_comm_s=ev.overlap.exposed_s,
    )


def _rerank_replicated(graph, space, pricer: Pricer, mesh: MeshSpec, choice, wants, ev: Evaluation, budget: int | None) -> tuple[Evaluation, bool]:
    """The plan, or not sharding where that is faster with communication
    overlapped. The integer program minimises compute + communication; where
    the profile charges what it cannot see (ranks drifting apart between
    collectives, compute slowed under them: a calibrated profile), a
    sharded plan can predict slower than running every op replicated (the
    inputs gathered once), which is always possible: that choice is
    evaluated under the same model, and kept if faster and within the budget."""
    if not (pricer.profile.rank_skew or pricer.profile.overlap_slowdown) or mesh.size == 1:
        return ev, False
    replicated = _replicated_choice(space, choice)
    if replicated == dict(choice):
        return ev, False
    try:
        alt = evaluate(graph, space, pricer, mesh, replicated, wants)
    except ValueError:  # a follower or a pin that cannot be replicated: keep the plan
        return ev, False
    if alt.overlap.step_s < ev.overlap.step_s and (budget is None or alt.peak_memory_bytes <= budget):
        return alt, True
    return ev, False


def _replicated_choice(space, choice) -> dict[str, int]:
    """`choice` with every group of nodes (a leader, its followers and tuple
    projections, which share its choice index by index) and every hub that
    can be all-Replicate made so."""
    replicated = dict(choice)
    groups: dict[str, list[str]] = {}
    for name, ns in space.nodes.items():
        groups.setdefault(ns.follows or name, []).append(name)
    for members in groups.values():
        sizes = {len(space.nodes[m].options) for m in members}
        if len(sizes) != 1:
            continue
        k = next((i for i in range(sizes.pop()) if all(_replicated_strategy(space.nodes[m].options[i]) for m in members)), None)
        if k is not None:
            replicated.update(dict.fromkeys(members, k))
    for u, options in space.hubs.items():
        k = next((i for i, p in enumerate(options) if _all_replicated(p)), None)
        if k is not None:
            replicated[hub_name(u)] = k
    return replicated


def _replicated_strategy(s) -> bool:
    return _all_replicated(s.output) and all(_all_replicated(p) for p in s.inputs if p is not None)


def _all_replicated(output) -> bool:
    """Every mesh axis Replicate, for each tensor output (or one input's placements)."""
    return all(pl is None or all(p.is_replicate() for p in pl) for pl in per_output(output))


def _solver_summary(result: SolveResult, folded: FoldResult | None, planned: MeshSpec, reranked: bool = False) -> SolverSummary:
    return SolverSummary(
        status=result.status,
        objective=result.objective_ns,
        bound=result.bound_ns,
        gap=result.gap,
        wall_s=result.wall_s,
        method=f"{result.method}, then every op replicated (faster overlapped)" if reranked else result.method,
        variables=result.variables,
        constraints=result.constraints,
        layers_folded=folded.layers_folded if folded else 0,
        nodes_folded=folded.nodes_folded if folded else 0,
        planned_mesh=tuple(planned.shape),
        time_limited=result.time_limited,
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


def _gradient_bytes(captured: Captured, ev: Evaluation, pricer: Pricer) -> int:
    """Per device, the gradients once reduced to their parameters' placements
    (they are inside `activation_bytes` too: live from their producer on)."""
    graph = captured.graph
    return sum(pricer.bytes_per_device(graph[p].tensor_meta, ev.nodes[p].output) for p in captured.gradients.values())


def captured_stage_seconds(captured: Captured) -> dict[str, float]:
    return {"capture": captured.seconds} if captured.seconds is not None else {}


def compile(model: torch.nn.Module, example_inputs: tuple, *, precision: Precision | str | None = None, **plan_kwargs) -> Plan:  # noqa: A001 - the verb users expect
    """Capture `model(*example_inputs)` under the mixed-precision policy
    (`"bf16"`, `"fp16"`, a `Precision`; default float32) and plan it (see
    `plan_program`)."""
    return plan_program(capture(model, example_inputs, precision), **plan_kwargs)


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
    real (full) weights, which every rank builds identically. The program
    runs under the plan's mixed-precision policy (`precision=` when planning
    here). In a group of several ranks, rank 0 plans and every rank runs
    its plan; a given plan must be the same on every rank (PlanError names
    the ranks that differ): see `dtplan.runtime.agree`.
    """
    precision = plan.precision if plan is not None else plan_kwargs.pop("precision", None)
    captured = capture(model, example_inputs, precision)
    plan = agreed_plan(plan, lambda: plan_program(captured, mesh=mesh_spec(mesh), **plan_kwargs))
    return sharded_program(model, captured, plan, mesh)


def parallelize(
    model: torch.nn.Module,
    example_inputs: tuple,
    mesh: DeviceMesh,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    *,
    plan: Plan | None = None,
    **plan_kwargs,
) -> torch.nn.Module:
    """Plan the training step `loss_fn(model(*example_inputs), *example_inputs)`
    (without `loss_fn`: the model's own loss, `out.loss` of a Hugging Face
    ModelOutput, or its output) and return `model` itself, parallelized on
    this rank: parameters and buffers are DTensors in the plan's placements,
    and `model(*local_inputs)` runs the planned step and returns the loss,
    whose `backward()` leaves each gradient in `param.grad` in its
    parameter's placement (`dtplan.runtime.parallel`). Any torch.optim
    optimizer, `clip_grad_norm_`, `state_dict()` and
    torch.distributed.checkpoint work on it as on any DTensor module.

    `example_inputs` is the full batch; each call takes this rank's piece of
    a batch (`local_inputs(model, *full)` cuts one). Call on every rank of
    `mesh`, with the same full weights on each: rank 0 plans (or `plan` is
    checked to be every rank's), as in `shard`."""
    precision = plan.precision if plan is not None else plan_kwargs.pop("precision", None)
    captured = capture_training(model, example_inputs, loss_fn or _model_loss, precision)
    plan = agreed_plan(plan, lambda: plan_program(captured, mesh=mesh_spec(mesh), **plan_kwargs))
    if not plan.model.train:
        raise ValueError("parallelize needs a training plan; this plan is for inference (plan with train=True, or give none)")
    if captured.remat != plan.remat:
        captured = apply_remat(captured, plan.remat)
    return parallelized(model, sharded_program(model, captured, plan, mesh))


def _model_loss(out, *inputs) -> torch.Tensor:
    """The model's own loss: a ModelOutput's `.loss`, else the output."""
    loss = getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("without loss_fn, the model must return its loss (a scalar, or an output with .loss); give loss_fn")
    return loss
