r"""The placement integer program, solved with OR-Tools CP-SAT.

Notation: nodes v are grouped — a tuple projection (getitem) shares its
parent's choice — and each group g with strategies S_g gets booleans

    x[g,s] ∈ {0,1},   Σ_s x[g,s] = 1                         (`_add_choices`)

Edges u→v (u is input i of v). Let O_u be the distinct output placements of u
and R_vi the distinct placements v's strategies want for input i, with
z[u,o] = Σ_{s: out(u,s)=o} x[g_u,s] and y[v,i,r] = Σ_{t: in_i(v,t)=r} x[g_v,t].
Working on distinct placements rather than strategies keeps the edge variables
few. With edge booleans e[u,v,i,o,r], aggregated rows

    Σ_r e[o,r] = z[u,o],    Σ_o e[o,r] = y[v,i,r]              (`_add_edge`)

(tighter than McCormick's three inequalities) make e the joint choice, and
the edge costs Σ c(o,r)·e[o,r], c the redistribution time. When one side has
a single placement the cost is linear in the other side's z or y.

Memory (`_add_memory`): per device, parameters and buffers
M = Σ_stored bytes(v,s)·x (one integer variable), plus the activations live
at each point t of the schedule; one row per t whose live set is not
contained in the next one's (the others are dominated):

    M + Σ_{v live at t} bytes(v,s)·x ≤ budget

Objective: Σ compute(v,s)·x + Σ edge costs + output redistribution, in
integer nanoseconds.

Solving (`solve`): the LP relaxation first (GLOP); the aggregated rows make it
integral for most programs without a binding memory row, and an integral LP
optimum is an integer optimum. Otherwise CP-SAT, with a fixed seed and
interleaved search so the same inputs give the same plan. Every variable has a stable, readable name
(`x[n=<node>,s=<k>]`, `e[<u>-><v>:<i>,o=<k>,r=<k>]`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from ir.graph import Graph, Node
from planner._dtensor import Placements
from planner.cost import to_ns
from planner.memory import peak_rows
from planner.mesh import format_bytes
from planner.pricing import Pricer
from planner.strategies import StrategySpace, hub_name

__all__ = ["MemoryBudgetError", "SolveResult", "SolverOptions", "least_memory", "solve"]

log = logging.getLogger(__name__)


class MemoryBudgetError(ValueError):
    """No plan fits the per-device memory budget."""

    def __init__(self, budget: int, least: int) -> None:
        self.budget, self.least = budget, least
        super().__init__(
            f"no plan fits the memory budget of {format_bytes(budget)} ({budget} bytes) per device; "
            f"the least memory any plan needs is {format_bytes(least)} ({least} bytes) per device"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SolverOptions:
    time_limit_s: float = 60.0
    workers: int = 8
    seed: int = 0
    #: accept the LP solution rounded per group when it fits the memory
    #: budget and is within this relative gap of the LP bound
    rounding_gap: float = 0.01


@dataclass(frozen=True, slots=True)
class SolveResult:
    #: chosen strategy index per node
    choice: Mapping[str, int]
    status: str
    objective_ns: int
    bound_ns: int
    wall_s: float
    #: "lp-relaxation" (integral LP optimum) or "cp-sat"
    method: str
    variables: int
    constraints: int

    @property
    def gap(self) -> float:
        return 0.0 if self.objective_ns == 0 else abs(self.objective_ns - self.bound_ns) / abs(self.objective_ns)


class _Model:
    """Builds the CP-SAT program for one graph; see the module docstring."""

    def __init__(self, graph: Graph, space: StrategySpace, pricer: Pricer, backend=None) -> None:
        self.graph, self.space, self.pricer = graph, space, pricer
        self.m = backend if backend is not None else cp_model.CpModel()
        self.group = {n.name: (space.nodes[n.name].follows or n.name) for n in graph}
        self.x: dict[str, list] = {}
        self._links: dict[tuple, dict] = {}
        self.cost_terms: list[tuple[int, object]] = []
        self.const_ns = 0

    # ----------------------------------------------------------------- variables
    def _add_choices(self) -> None:
        for n in self.graph:
            if self.group[n.name] == n.name:
                self.x[n.name] = self._one_of(f"x[n={n.name}", len(self.space.nodes[n.name].options))

    def _one_of(self, label: str, n: int) -> list:
        """n booleans of which exactly one is true (a constant 1 when n is 1)."""
        if n == 1:
            return [1]
        xs = [self.m.NewBoolVar(f"{label},s={k}]") for k in range(n)]
        self.m.AddExactlyOne(xs)
        return xs

    def xs(self, name: str) -> list:
        return self.x[self.group[name]]

    def _add_hubs(self) -> None:
        """A value read by several consumers is redistributed once, to its hub
        placement, and each consumer reads the hub (see `planner.hubs`)."""
        for u, cands in self.space.hubs.items():
            self.x[hub_name(u)] = self._one_of(f"h[n={u}", len(cands))

    def _hub_by_placement(self, u: str) -> dict[Placements, list]:
        return {p: [x] for p, x in zip(self.space.hubs[u], self.x[hub_name(u)], strict=True)}

    def _source(self, u: str) -> dict[Placements, list]:
        """Where consumers of `u` read from: its hub, or its own output."""
        if u in self.space.hubs:
            return self._hub_by_placement(u)
        return self._by_placement(u, lambda s: s.output)

    def _term(self, coef: int, var) -> None:
        if coef == 0:
            return
        if isinstance(var, int):
            self.const_ns += coef * var
        else:
            self.cost_terms.append((coef, var))

    # ----------------------------------------------------------------- compute
    def _add_compute(self) -> None:
        for n in self.graph:
            opts = self.space.nodes[n.name].options
            for k, s in enumerate(opts):
                self._term(to_ns(self.pricer.compute_s(n, s)), self.xs(n.name)[k])

    # ----------------------------------------------------------------- edges
    def _by_placement(self, name: str, placement_of) -> dict[Placements, list]:
        groups: dict[Placements, list] = {}
        for k, s in enumerate(self.space.nodes[name].options):
            groups.setdefault(placement_of(s), []).append(self.xs(name)[k])
        return groups

    def _add_edges(self) -> None:
        for v in self.graph:
            if self.space.nodes[v.name].source == "follow":
                continue
            for i, u in enumerate(v.refs()):
                self._add_edge(u, v, i)
        for u in self.space.hubs:
            outs = self._by_placement(u, lambda s: s.output)
            self._link(f"{u}->hub", self.graph[u].tensor_meta, outs, self._hub_by_placement(u))

    def _add_edge(self, u: str, v: Node, i: int) -> None:
        meta = self.graph[u].tensor_meta
        if self.group[u] == self.group[v.name]:  # same choice: cost on the diagonal
            for k, s in enumerate(self.space.nodes[v.name].options):
                src = self.space.nodes[u].options[k].output
                self._term(to_ns(self.pricer.redistribute_s(meta, src, s.inputs[i])), self.xs(v.name)[k])
            return
        wants = self._by_placement(v.name, lambda s: s.inputs[i])
        self._link(f"{u}->{v.name}:{i}", meta, self._source(u), wants)

    def _link(self, label: str, meta, outs: dict, wants: dict) -> None:
        # folded layers repeat the same link between the same choices: one set
        # of edge variables serves every copy, each copy adding its cost
        key = (meta, tuple((o, tuple(map(id, xs))) for o, xs in outs.items()), tuple((r, tuple(map(id, xs))) for r, xs in wants.items()))
        shared = self._links.get(key)
        if shared is not None:
            e, cost = shared
            for pair, c in cost.items():
                self._term(c, e[pair])
            return
        cost = {(o, r): to_ns(self.pricer.redistribute_s(meta, o, r)) for o in outs for r in wants}
        if not any(cost.values()):
            return
        if len(outs) == 1 or len(wants) == 1:
            for (o, r), c in cost.items():
                side = wants[r] if len(outs) == 1 else outs[o]
                for var in side:
                    self._term(c, var)
            return
        oi = {o: k for k, o in enumerate(outs)}
        ri = {r: k for k, r in enumerate(wants)}
        e = {(o, r): self.m.NewBoolVar(f"e[{label},o={oi[o]},r={ri[r]}]") for o in outs for r in wants}
        self._links[key] = (e, cost)
        for o, xs in outs.items():
            self.m.Add(sum(e[o, r] for r in wants) == sum(xs))
        for r, xs in wants.items():
            self.m.Add(sum(e[o, r] for o in outs) == sum(xs))
        for key, c in cost.items():
            self._term(c, e[key])

    def _add_outputs(self, output_placements: tuple[Placements | str, ...]) -> None:
        """Each output leaves in its placements; a gradient (its want is the
        parameter's node name) leaves in whatever placement the parameter gets."""
        for u, want in zip(self.graph.outputs, output_placements, strict=True):
            wants = self._by_placement(want, lambda s: s.output) if isinstance(want, str) else {want: [1]}
            self._link(f"{u}->output", self.graph[u].tensor_meta, self._source(u), wants)

    # ----------------------------------------------------------------- memory
    def memory_terms(self) -> tuple[list[tuple[int, object]], list[list[tuple[int, object]]]]:
        """(bytes, variable) terms of stored values, and of the live
        allocations at each candidate peak."""
        stored, rows = peak_rows(self.graph)
        resident = [t for name in stored for t in self._bytes_terms(self.graph[name], self.pricer.resident_bytes)]
        return resident, [[t for name in r for t in self._bytes_terms(self.graph[name])] for r in rows]

    def _bytes_terms(self, n: Node, size=None) -> list[tuple[int, object]]:
        size = size or (lambda node, pl: self.pricer.bytes_per_device(node.tensor_meta, pl))
        return [(size(n, s.output), self.xs(n.name)[k]) for k, s in enumerate(self.space.nodes[n.name].options)]

    def _add_memory(self, budget: int) -> None:
        """One variable for the stored bytes keeps each peak row short."""
        stored_terms, rows = self.memory_terms()
        stored = self.m.NewIntVar(0, budget, "stored_bytes")
        self.m.Add(stored == sum(b * v for b, v in stored_terms))
        for row in rows:
            self.m.Add(stored + sum(b * v for b, v in row) <= budget)

    def build(self, output_placements, budget: int | None) -> None:
        self._add_choices()
        self._add_hubs()
        self._add_compute()
        self._add_edges()
        self._add_outputs(output_placements)
        if budget is not None:
            self._add_memory(budget)
        tie = self._tie_break() if self.scale > 1 else 0
        self.m.Minimize(self.scale * (sum(c * v for c, v in self._merged_terms()) + self.const_ns) + tie)

    def _merged_terms(self) -> list[tuple[int, object]]:
        """One coefficient per variable (folded layers add the same edge terms
        once per copy)."""
        merged: dict[int, list] = {}
        for c, v in self.cost_terms:
            slot = merged.setdefault(id(v), [0, v])
            slot[0] += c
        return [(c, v) for c, v in merged.values() if c]

    @property
    def scale(self) -> int:
        """Objective units per nanosecond: room below one nanosecond for the
        tie-break. The LP does without (its simplex answer is deterministic,
        and huge coefficients would hurt its floating-point arithmetic)."""
        if isinstance(self.m, _LpBackend):
            return 1
        return 1 + sum(len(xs) - 1 for xs in self.x.values())

    def _tie_break(self):
        """Among plans of equal predicted time prefer lower strategy indices
        (Replicate and low dims come first). Worth less than 1 ns in total, it
        makes the optimum (nearly always) unique, so parallel search returns
        the same plan for the same inputs."""
        return sum(k * x for xs in self.x.values() if len(xs) > 1 for k, x in enumerate(xs))

class _LpBackend:
    """The same model with continuous x, e ∈ [0, 1] (GLOP). Without a memory
    row the aggregated edge rows make this relaxation integral in practice,
    and then it is the answer, found in milliseconds and deterministically."""

    def __init__(self) -> None:
        self.s = pywraplp.Solver.CreateSolver("GLOP")

    def NewBoolVar(self, name: str):  # noqa: N802 - mirrors cp_model
        return self.s.NumVar(0.0, 1.0, name)

    def NewIntVar(self, lb: int, ub: int, name: str):  # noqa: N802
        return self.s.NumVar(lb, ub, name)

    def AddExactlyOne(self, xs) -> None:  # noqa: N802
        self.s.Add(sum(xs) == 1)

    def Add(self, constraint) -> None:  # noqa: N802
        self.s.Add(constraint)

    def Minimize(self, expr) -> None:  # noqa: N802
        self.s.Minimize(expr)


def _cp_solver(options: SolverOptions) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = options.time_limit_s
    solver.parameters.num_workers = options.workers
    solver.parameters.random_seed = options.seed
    # parallel portfolio; the tie-break in the objective keeps the answer stable
    return solver


def _choice(model: _Model, graph: Graph, value) -> tuple[dict[str, int], bool]:
    """Per node, the strategy whose variable weighs most, and whether every
    group's weight is all on one strategy (an integral solution)."""
    choice, integral = {}, True
    names = [(n.name, model.xs(n.name)) for n in graph] + [(hub_name(u), model.x[hub_name(u)]) for u in model.space.hubs]
    for name, xs in names:
        vals = [1.0 if isinstance(v, int) else value(v) for v in xs]
        k = max(range(len(vals)), key=vals.__getitem__)
        integral &= abs(vals[k] - 1.0) <= 1e-6
        choice[name] = k
    return choice, integral


def _lp(graph, space, pricer, output_placements, budget) -> tuple[_Model, pywraplp.Solver] | None:
    model = _Model(graph, space, pricer, _LpBackend())
    model.build(output_placements, budget)
    lp = model.m.s
    return (model, lp) if lp.Solve() == pywraplp.Solver.OPTIMAL else None


def _hint(model: _Model, choice: dict[str, int]) -> None:
    """Start CP-SAT from a choice (the rounded LP solution)."""
    for n, k in choice.items():
        xs = model.x[n] if n not in model.group else model.xs(n)
        if len(xs) > 1 and model.group.get(n, n) == n:
            for j, x in enumerate(xs):
                model.m.AddHint(x, j == k)


def least_memory(graph: Graph, space: StrategySpace, pricer: Pricer, options: SolverOptions) -> int:
    """The smallest per-device peak any plan reaches (for error messages)."""
    model = _Model(graph, space, pricer)
    model._add_choices()
    stored_terms, rows = model.memory_terms()
    top = sum(b for b, _ in stored_terms) + sum(b for row in rows for b, _ in row) + 1
    peak = model.m.NewIntVar(0, top, "peak_bytes")
    for row in rows:
        model.m.Add(peak >= sum(b * v for b, v in stored_terms + row))
    model.m.Minimize(peak)
    solver = _cp_solver(options)
    if solver.Solve(model.m) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError("could not compute the least memory a plan needs")
    return int(solver.Value(peak))


def solve(
    graph: Graph,
    space: StrategySpace,
    pricer: Pricer,
    *,
    output_placements: tuple[Placements, ...],
    memory_budget: int | None = None,
    options: SolverOptions = SolverOptions(),
) -> SolveResult:
    """Choose one strategy per node minimising predicted step time.

    1. The LP relaxation (GLOP). Integral: optimal for the integer program too.
    2. Else the LP solution rounded per group, if it fits the memory budget and
       is within `options.rounding_gap` of the LP bound (status FEASIBLE, the
       bound and gap reported).
    3. Else CP-SAT, hinted with the rounded solution."""
    t0 = time.perf_counter()
    lp = _lp(graph, space, pricer, output_placements, memory_budget)
    size = {"variables": lp[1].NumVariables(), "constraints": lp[1].NumConstraints()} if lp else {}
    if lp is not None:
        lp_model, lp_solver = lp
        bound = int(lp_solver.Objective().Value()) // lp_model.scale
        rounded, integral = _choice(lp_model, graph, lambda v: v.solution_value())
        if integral:
            log.debug("ILP solved by its LP relaxation: %d vars, %.3fs", size["variables"], time.perf_counter() - t0)
            return SolveResult(rounded, "OPTIMAL", bound, bound, time.perf_counter() - t0, "lp-relaxation", **size)
        cost_ns, peak = _price(graph, space, pricer, rounded, output_placements)
        if (memory_budget is None or peak <= memory_budget) and cost_ns - bound <= options.rounding_gap * cost_ns:
            return SolveResult(rounded, "FEASIBLE", cost_ns, min(bound, cost_ns), time.perf_counter() - t0, "lp-rounding", **size)
    model = _Model(graph, space, pricer)
    model.build(output_placements, memory_budget)
    if lp is not None:
        _hint(model, rounded)
    proto = model.m.Proto()
    size = {"variables": len(proto.variables), "constraints": len(proto.constraints)}
    solver = _cp_solver(options)
    status = solver.Solve(model.m)
    wall = time.perf_counter() - t0
    name = solver.StatusName(status)
    log.debug("ILP %s: %d vars, %d constraints, %.3fs", name, size["variables"], size["constraints"], wall)
    if status == cp_model.INFEASIBLE and memory_budget is not None:
        raise MemoryBudgetError(memory_budget, least_memory(graph, space, pricer, options))
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"the solver found no plan: status {name} after {wall:.1f}s")
    choice, _ = _choice(model, graph, solver.BooleanValue)
    objective = int(round(solver.ObjectiveValue())) // model.scale
    bound = -(-int(round(solver.BestObjectiveBound())) // model.scale)
    return SolveResult(choice, name, objective, min(bound, objective), wall, "cp-sat", **size)


def _price(graph, space, pricer, choice, output_placements) -> tuple[int, int]:
    """(predicted time in ns, peak bytes per device) of one choice."""
    from planner.mesh import MeshSpec
    from planner.plan import evaluate

    shape = pricer.mesh_shape
    ev = evaluate(graph, space, pricer, MeshSpec(shape, tuple(f"d{i}" for i in range(len(shape)))), choice, output_placements)
    return to_ns(ev.compute_s + ev.comm_s), ev.peak_memory_bytes
