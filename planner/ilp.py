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

Memory (`_add_memory`): per device, parameters and buffers Σ bytes(v,s)·x
plus the activations live at each point t of the schedule; one row per t
whose live set is not contained in the next one's (the others are dominated):

    Σ_params bytes + Σ_{v live at t} bytes(v,s)·x ≤ budget

Objective: Σ compute(v,s)·x + Σ edge costs + output redistribution, in
integer nanoseconds. Every variable has a stable, readable name
(`x[n=<node>,s=<k>]`, `e[<u>-><v>:<i>,o=<k>,r=<k>]`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ortools.sat.python import cp_model

from ir.graph import Graph, Node
from planner._dtensor import Placements
from planner.cost import to_ns
from planner.memory import peak_rows
from planner.pricing import Pricer
from planner.strategies import StrategySpace

__all__ = ["MemoryBudgetError", "SolveResult", "SolverOptions", "solve"]

log = logging.getLogger(__name__)


class MemoryBudgetError(ValueError):
    """No plan fits the per-device memory budget."""

    def __init__(self, budget: int, least: int) -> None:
        self.budget, self.least = budget, least
        super().__init__(
            f"no plan fits the memory budget of {budget} bytes per device; "
            f"the least memory any plan needs is {least} bytes per device"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SolverOptions:
    time_limit_s: float = 60.0
    workers: int = 8
    seed: int = 0


@dataclass(frozen=True, slots=True)
class SolveResult:
    #: chosen strategy index per node
    choice: Mapping[str, int]
    status: str
    objective_ns: int
    bound_ns: int
    wall_s: float
    variables: int
    constraints: int

    @property
    def gap(self) -> float:
        return 0.0 if self.objective_ns == 0 else abs(self.objective_ns - self.bound_ns) / abs(self.objective_ns)


class _Model:
    """Builds the CP-SAT program for one graph; see the module docstring."""

    def __init__(self, graph: Graph, space: StrategySpace, pricer: Pricer) -> None:
        self.graph, self.space, self.pricer = graph, space, pricer
        self.m = cp_model.CpModel()
        self.group = {n.name: (space.nodes[n.name].follows or n.name) for n in graph}
        self.x: dict[str, list] = {}
        self.cost_terms: list[tuple[int, object]] = []
        self.const_ns = 0

    # ----------------------------------------------------------------- variables
    def _add_choices(self) -> None:
        for n in self.graph:
            g = self.group[n.name]
            if g != n.name:
                continue
            opts = self.space.nodes[n.name].options
            if len(opts) == 1:
                self.x[g] = [1]
                continue
            xs = [self.m.NewBoolVar(f"x[n={g},s={k}]") for k in range(len(opts))]
            self.m.AddExactlyOne(xs)
            self.x[g] = xs

    def xs(self, name: str) -> list:
        return self.x[self.group[name]]

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

    def _add_edge(self, u: str, v: Node, i: int) -> None:
        meta = self.graph[u].tensor_meta
        if self.group[u] == self.group[v.name]:  # same choice: cost on the diagonal
            for k, s in enumerate(self.space.nodes[v.name].options):
                src = self.space.nodes[u].options[k].output
                self._term(to_ns(self.pricer.redistribute_s(meta, src, s.inputs[i])), self.xs(v.name)[k])
            return
        outs = self._by_placement(u, lambda s: s.output)
        wants = self._by_placement(v.name, lambda s: s.inputs[i])
        self._link(f"{u}->{v.name}:{i}", meta, outs, wants)

    def _link(self, label: str, meta, outs: dict, wants: dict) -> None:
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
        for o, xs in outs.items():
            self.m.Add(sum(e[o, r] for r in wants) == sum(xs))
        for r, xs in wants.items():
            self.m.Add(sum(e[o, r] for o in outs) == sum(xs))
        for key, c in cost.items():
            self._term(c, e[key])

    def _add_outputs(self, output_placements: tuple[Placements, ...]) -> None:
        for u, want in zip(self.graph.outputs, output_placements, strict=True):
            outs = self._by_placement(u, lambda s: s.output)
            self._link(f"{u}->output", self.graph[u].tensor_meta, outs, {want: [1]})

    # ----------------------------------------------------------------- memory
    def memory_rows(self) -> list[list[tuple[int, object]]]:
        """(bytes, variable) terms of per-device memory at each candidate peak."""
        return [[t for name in row for t in self._bytes_terms(self.graph[name])] for row in peak_rows(self.graph)]

    def _bytes_terms(self, n: Node) -> list[tuple[int, object]]:
        meta = n.tensor_meta
        return [
            (self.pricer.bytes_per_device(meta, s.output), self.xs(n.name)[k])
            for k, s in enumerate(self.space.nodes[n.name].options)
        ]

    def _add_memory(self, budget: int) -> None:
        for row in self.memory_rows():
            const = sum(b * v for b, v in row if isinstance(v, int))
            self.m.Add(sum(b * v for b, v in row if not isinstance(v, int)) <= budget - const)

    def build(self, output_placements, budget: int | None) -> None:
        self._add_choices()
        self._add_compute()
        self._add_edges()
        self._add_outputs(output_placements)
        if budget is not None:
            self._add_memory(budget)
        self.m.Minimize(sum(c * v for c, v in self.cost_terms) + self.const_ns)

    def least_memory(self, options: SolverOptions) -> int:
        """The smallest per-device peak any plan reaches (for error messages)."""
        peak = self.m.NewIntVar(0, 2**62, "peak_bytes")
        for row in self.memory_rows():
            self.m.Add(peak >= sum(b * v for b, v in row))
        self.m.Minimize(peak)
        solver = _solver(options)
        solver.Solve(self.m)
        return int(solver.Value(peak))


def _solver(options: SolverOptions) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = options.time_limit_s
    solver.parameters.num_workers = options.workers
    solver.parameters.random_seed = options.seed
    solver.parameters.interleave_search = True  # deterministic with several workers
    return solver


def solve(
    graph: Graph,
    space: StrategySpace,
    pricer: Pricer,
    *,
    output_placements: tuple[Placements, ...],
    memory_budget: int | None = None,
    options: SolverOptions = SolverOptions(),
) -> SolveResult:
    """Choose one strategy per node minimising predicted step time."""
    t0 = time.perf_counter()
    model = _Model(graph, space, pricer)
    model.build(output_placements, memory_budget)
    solver = _solver(options)
    status = solver.Solve(model.m)
    wall = time.perf_counter() - t0
    name = solver.StatusName(status)
    proto = model.m.Proto()
    log.debug("ILP %s: %d vars, %d constraints, %.3fs", name, len(proto.variables), len(proto.constraints), wall)
    if status == cp_model.INFEASIBLE and memory_budget is not None:
        spare = _Model(graph, space, pricer)
        spare._add_choices()
        raise MemoryBudgetError(memory_budget, spare.least_memory(options))
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"the solver found no plan: status {name} after {wall:.1f}s")
    choice = {}
    for n in graph:
        xs = model.xs(n.name)
        choice[n.name] = next(k for k, v in enumerate(xs) if (v == 1 if isinstance(v, int) else solver.BooleanValue(v)))
    return SolveResult(
        choice=choice,
        status=name,
        objective_ns=int(round(solver.ObjectiveValue())),
        bound_ns=int(round(solver.BestObjectiveBound())),
        wall_s=wall,
        variables=len(proto.variables),
        constraints=len(proto.constraints),
    )
