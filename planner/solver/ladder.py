"""The solve ladder: the placement program (`formulation`) tried by the cheap
methods first. Each step takes the shared `SolveState` and returns a
`SolveResult` or None; `solve` runs `LADDER` in order and returns the first
result.

1. `lp_relaxation`: the LP relaxation (HiGHS dual simplex, chosen over GLOP,
   PDLP and interior point by measurement; docs/architecture.md), peak rows
   added lazily (`_lp`). The aggregated edge rows make it integral for most
   programs without a binding memory row, and an integral LP optimum is an
   integer optimum.
2. `lp_rounding`: the LP solution rounded per group, when it fits the memory
   budget and is within `SolverOptions.rounding_gap` of the LP bound (status
   FEASIBLE, the bound and gap reported); when it only fits, the candidate.
3. `lp_lagrange`: where the budget binds, the LP's plans with memory priced
   at its duals instead of bounded, a hair above and below; branch and bound
   over the groups those two choose apart gives the candidate, and branch
   and bound over the columns whose reduced cost leaves room for a plan
   within the gap of it proves the gap (the README's budget: 0.9 s in all,
   where `lp_branch` took 4-5 s), each in at most `LAGRANGE_NODES` nodes.
   Its plan when proven, else the candidate and the bound are kept.
4. `lp_dive`: LP diving (`_dive`) towards an integer plan near the LP bound,
   in at most `dive_iterations` simplex iterations; its plan is returned
   when it fits and is within the same gap, else kept as the candidate when
   it fits and is cheaper.
5. `lp_branch`: branch and bound on the LP (HiGHS's MIP solver) from the
   candidate (the cheaper of the rounding and diving's plan), until a plan
   is proven within the same gap or `BRANCH_MAX_NODES` nodes are spent; its
   plan when proven, else the
   cheaper of it and the candidate is the candidate, and its bound is kept.
   A budget binding at a few large tensors leaves the LP bound several
   percent under the best plan (5.6% on the README's budget): only
   branching proves a plan there (5.6 s, where CP-SAT took 16 s), now
   mostly done by `lp_lagrange` on part of the program.
6. `lp_fix_cp_sat`: when no step found a plan, CP-SAT with the groups the LP
   decided fixed (a memory budget binds at a few peaks, so few groups are
   left), hinted from the rounding; its plan becomes the candidate. It returns
   nothing: the whole program is searched next.
7. `cp_sat`: CP-SAT over the whole program, hinted from the candidate (else
   from the rounding); the better of its plan and the candidate. No plan at
   all under a budget: `MemoryBudgetError`.

When no step returns (the whole-program search found no plan in its
budget), the candidate is the answer, against the best bound proven (the
LP's or branch and bound's).

Planning is reproducible: the same inputs (the program, its budget, the
`SolverOptions`) give the same plan on an idle machine or a loaded one. No
step stops on the clock; each stops on a work budget its solver counts the
same on every machine: the LPs run to their optimum (HiGHS's simplex is
deterministic), branch and bound stops at a node count (HiGHS's
`mip_max_nodes`: `LAGRANGE_NODES`, `BRANCH_MAX_NODES`), diving at a number
of simplex iterations a few times the LP's (`dive_iterations`), CP-SAT at a
deterministic time (`max_deterministic_time`, `CP_SAT_DETERMINISTIC_TIME`),
running its interleaved search (`interleave_search`: its workers' tasks in
batches, what they share exchanged only between batches) with a fixed seed,
where its default parallel portfolio is a race between threads. The tie-break
in the objective (`PlacementProgram.objective`) makes the optimum unique.
`SolverOptions.time_limit_s` is only the safety net: a step still running
when its share of it has passed (`SAFETY_NET`; CP-SAT: what is left) is
stopped there, and the result names it (`SolveResult.time_limited`, which
the command line prints): only such a plan may differ on another machine or
under another load.

CP-SAT variables carry readable names (`x[n=<node>,s=<k>]`,
`e[<u>-><v>:<i>,o=<k>,r=<k>]`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import highspy
import numpy as np
from ortools.sat.python import cp_model

from dtplan.ir.graph import Graph
from dtplan.planner.cost.device import to_ns
from dtplan.planner.cost.pricing import Pricer
from dtplan.planner.evaluate import evaluate
from dtplan.planner.mesh import MeshSpec, format_bytes
from dtplan.planner.solver.formulation import PlacementProgram
from dtplan.planner.solver.program import ONE, new_highs, add_highs_rows, highs_bounds
from dtplan.planner.space._dtensor import Placements
from dtplan.planner.space.strategies import StrategySpace

__all__ = [
    "LADDER",
    "MemoryBudgetError",
    "SolveResult",
    "SolveState",
    "SolverOptions",
    "Step",
    "cp_sat",
    "least_memory",
    "lp_branch",
    "lp_dive",
    "lp_fix_cp_sat",
    "lp_lagrange",
    "lp_relaxation",
    "lp_rounding",
    "solve",
    "solve_pinned",
]

log = logging.getLogger(__name__)


class MemoryBudgetError(ValueError):
    """No plan fits the per-device memory budget."""

    def __init__(self, budget: int, least: int, exact: bool = True, *, found: bool = False) -> None:
        self.budget, self.least = budget, least
        what = "is" if exact else "is at least"
        # found: `least` is the best plan the search found (meshes of three or
        # more axes, `dtplan.api._plan_outer_axes`), not a bound
        need = f"the best plan found needs {format_bytes(least)} ({least} bytes)" if found else f"the least memory any plan needs {what} {format_bytes(least)} ({least} bytes)"
        super().__init__(f"no plan fits the memory budget of {format_bytes(budget)} ({budget} bytes) per device; {need} per device")


@dataclass(frozen=True, slots=True, kw_only=True)
class SolverOptions:
    #: seconds: the safety net, never a step's budget (each step stops on
    #: work counted the same on every machine; the module docstring). The LP
    #: must finish within it (past it planning fails); the Lagrangian step,
    #: diving and branch and bound stop once their share of it has passed
    #: since the start (`SAFETY_NET`); each CP-SAT search stops at it (the
    #: whole-program search started from a plan: at what is left, at least
    #: 1 s). A step stopped so is named in `SolveResult.time_limited`.
    time_limit_s: float = 60.0
    #: CP-SAT's threads; its interleaved search is deterministic for a given
    #: count (its batches are three tasks per worker)
    workers: int = 8
    seed: int = 0
    #: accept the LP solution rounded per group (or diving's plan) when it
    #: fits the memory budget and is within this relative gap of the LP bound;
    #: branch and bound stops at this gap too
    rounding_gap: float = 0.01
    #: CP-SAT stops searching past this much memory (the 2-layer 8b under a
    #: binding 18 GiB budget reached 5.7 GB in its 60 s)
    max_memory_mb: int = 2048


@dataclass(frozen=True, slots=True)
class SolveResult:
    #: chosen strategy index per node
    choice: Mapping[str, int]
    status: str
    objective_ns: int
    bound_ns: int
    wall_s: float
    #: "lp-relaxation" (integral LP optimum), "lp-rounding", "lp-lagrange",
    #: "lp-dive", "lp-branch", "lp-fix+cp-sat" or "cp-sat"
    method: str
    variables: int
    constraints: int
    #: seconds spent building the program (included in wall_s)
    build_s: float = 0.0
    #: the steps a safety net (`SolverOptions.time_limit_s`) stopped before
    #: their work budget ran out: the plan may then differ on a machine of
    #: another speed, or under another load (else it does not)
    time_limited: tuple[str, ...] = ()
    #: the solve's state (the built program, the LP): what `solve_pinned`
    #: solves again with some choices fixed
    state: SolveState | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def gap(self) -> float:
        return 0.0 if self.objective_ns == 0 else abs(self.objective_ns - self.bound_ns) / abs(self.objective_ns)


class LP(NamedTuple):
    """The LP relaxation's optimum: its bound (ns), each variable's value
    then, the HiGHS instance (diving goes on from its basis), and the simplex
    iterations it took in all its rounds: the unit of diving's work budget,
    the same on every machine where the LP's wall time is not."""

    bound: int
    value: Callable[[int], float]
    highs: highspy.Highs
    iterations: int


class Candidate(NamedTuple):
    """A plan a step found on the way, returned unless the whole-program
    search finds a cheaper one."""

    choice: dict[str, int]
    #: ns, as its step priced it (diving: `evaluate`; lp-fix: the program)
    objective: int
    #: the step's name, the result's `method` when the candidate is returned
    method: str


@dataclass
class SolveState:
    """What the steps share: the problem, the built program, and what the
    steps before found."""

    graph: Graph
    space: StrategySpace
    pricer: Pricer
    output_placements: tuple[Placements | str, ...]
    memory_budget: int | None
    options: SolverOptions
    model: PlacementProgram
    t0: float
    build_s: float
    #: the program's size as built, before any lazy row: the size the
    #: lp-relaxation and lp-rounding results report
    built: dict[str, int]
    lp: LP | None = None
    #: the LP solution rounded per group
    rounded: dict[str, int] | None = None
    #: branch and bound's proven lower bound (ns), when it ran
    branch_bound: int | None = None
    candidate: Candidate | None = None
    #: the steps a safety net stopped (`SolveResult.time_limited`)
    cut: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def start(cls, graph, space, pricer, output_placements, memory_budget, options) -> SolveState:
        """Build the program (its time counts as the solve's)."""
        t0 = time.perf_counter()
        model = PlacementProgram(graph, space, pricer)
        model.build(output_placements, memory_budget)
        build_s = time.perf_counter() - t0
        built = model.program.size
        log.debug("program: %d variables, %d constraints, built in %.2fs", built["variables"], built["constraints"], build_s)
        return cls(graph, space, pricer, output_placements, memory_budget, options, model, t0, build_s, built)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def net(self, step: str) -> float:
        """The `time.perf_counter()` reading at which `step`'s safety net
        stops it (`SAFETY_NET`)."""
        return self.t0 + SAFETY_NET[step] * self.options.time_limit_s

    def left(self) -> float:
        """Seconds left of the time limit, at least one."""
        return max(1.0, self.options.time_limit_s - self.elapsed())

    def result(self, choice, status: str, objective: int, bound: int, method: str, *, size=None, wall: float | None = None) -> SolveResult:
        """A result; its size the program's now unless given."""
        size = self.model.program.size if size is None else size
        wall = self.elapsed() if wall is None else wall
        return SolveResult(choice, status, objective, bound, wall, method, **size, build_s=self.build_s, time_limited=tuple(self.cut), state=self)

    def timed_out(self, step: str, stopped: bool) -> None:
        """Record that a safety net stopped `step` (when `stopped`)."""
        if stopped and step not in self.cut:
            self.cut.append(step)

    def candidate_result(self, bound: int, wall: float | None = None) -> SolveResult:
        """The candidate as the answer, against `bound`."""
        c = self.candidate
        assert c is not None
        status = "OPTIMAL" if c.objective <= bound else "FEASIBLE"
        return self.result(c.choice, status, c.objective, min(bound, c.objective), c.method, wall=wall)

    def price(self, choice: Mapping[str, int]) -> tuple[int, int]:
        """(predicted time in ns, peak bytes per device) of one choice."""
        shape = self.pricer.mesh_shape
        mesh = MeshSpec(shape, tuple(f"d{i}" for i in range(len(shape))))
        ev = evaluate(self.graph, self.space, self.pricer, mesh, choice, self.output_placements)
        return to_ns(ev.compute_s + ev.comm_s), ev.peak_memory_bytes

    def fits(self, peak: int) -> bool:
        return self.memory_budget is None or peak <= self.memory_budget

    def proven_bound(self) -> int:
        """The best lower bound proven so far (ns): the LP's or branch and bound's."""
        return max(self.lp.bound if self.lp is not None else 0, self.branch_bound or 0)

    def proven(self, method: str) -> SolveResult | None:
        """The candidate as `method`'s answer when it is within the gap of
        the best bound proven so far (whichever step found the plan), else
        None."""
        best, bound = self.candidate, self.proven_bound()
        if best is None or best.objective - bound > self.options.rounding_gap * best.objective:
            return None
        return self.result(best.choice, "OPTIMAL" if best.objective <= bound else "FEASIBLE", best.objective, min(bound, best.objective), method)

    def within_gap(self, cost_ns: int) -> bool:
        assert self.lp is not None
        return cost_ns - self.lp.bound <= self.options.rounding_gap * cost_ns


#: HiGHS's words for a run its time limit (the safety net) stopped
#: (`_Sub.status`: `modelStatusToString(kTimeLimit)`; an instance would print
#: HiGHS's banner at import)
TIME_LIMIT = "Time limit reached"

#: branch and bound presolves programs up to this many variables (`lp_branch`)
PRESOLVE_MAX_VARIABLES = 100_000

#: `lp_branch`'s work budget: HiGHS's `mip_max_nodes`, a count that is the
#: same on every machine (HiGHS's search itself is deterministic), where a
#: wall-clock limit stops the search wherever the machine's load has got it
#: to. A node here costs a few hundred simplex iterations (strong branching
#: and the node's LP) on programs of a few thousand to 50k columns; where
#: branch and bound proves the gap it does so at the root or within a few
#: dozen nodes, and a tree still open after this many is one that would not
#: close within the time limit, so CP-SAT's search after it, started from
#: its plan, is the better use of the time. Its plan and bound are kept.
BRANCH_MAX_NODES = 50

#: the safety nets: a step stops, whatever is left of its work budget, once
#: this share of `SolverOptions.time_limit_s` has passed since the solve
#: began (CP-SAT: all of it, and at least a second), so that on a machine
#: too slow or too loaded for the budgets the rungs after it still get some
#: time. Looser than the budgets (on an idle machine a budget stops a step
#: well before its net), and reported when they stop one
#: (`SolveResult.time_limited`): only then may another machine, or another
#: load, plan differently.
SAFETY_NET = {"lp-lagrange": 0.4, "lp-dive": 0.5, "lp-branch": 0.75}

#: one rung: a result, or None to go on
Step = Callable[[SolveState], "SolveResult | None"]


# --------------------------------------------------------------------- steps
def lp_relaxation(s: SolveState) -> SolveResult | None:
    """The LP relaxation; its optimum when integral."""
    s.lp = _lp(s.model, s.options)
    if s.lp is None:
        return None
    s.rounded, integral = s.model.choice(s.lp.value)
    if not integral:
        return None
    log.debug("ILP solved by its LP relaxation: %.3fs", s.elapsed())
    return s.result(s.rounded, "OPTIMAL", s.lp.bound, s.lp.bound, "lp-relaxation", size=s.built)


def lp_rounding(s: SolveState) -> SolveResult | None:
    """The LP solution rounded per group, when it fits and is within the gap."""
    if s.lp is None:
        return None
    cost_ns, peak = s.price(s.rounded)
    log.debug("LP rounding: %d ns (LP bound %d), peak %d", cost_ns, s.lp.bound, peak)
    if not s.fits(peak):
        return None
    if s.within_gap(cost_ns):
        return s.result(s.rounded, "FEASIBLE", cost_ns, min(s.lp.bound, cost_ns), "lp-rounding", size=s.built)
    s.candidate = Candidate(s.rounded, cost_ns, "lp-rounding")
    return None


def lp_lagrange(s: SolveState) -> SolveResult | None:
    """Where a memory budget binds the LP and leaves it fractional: price
    memory at the LP's duals on the peak rows instead of bounding it, a
    hair above and a hair below that price (`LAGRANGE_EPS`). Without a
    budget the program's LP is integral for most programs, so each is
    mostly an integer plan: the one above fits and costs more, the one
    below does not fit (the LP optimum mixes the two). Branch and bound over the groups they choose apart (the
    others fixed as both choose them) gives the candidate. Then reduced-cost
    fixing (`_fix_by_reduced_cost`) keeps of the program only the columns a
    plan within the gap of the candidate can use, and branch and bound on
    what is left proves the gap. On the README's budget (gpt on 2x2 under
    400KB) the LP optimum takes 0.366 of "shard block 0's attention on
    axis 1"; the plan above the price shards all of it and is the
    optimum, proven within 1% in 3 nodes on 3.9k of the 17.6k columns.
    A plan proven within the gap is the answer (method "lp-lagrange"); else
    the candidate and the bound are kept for the rungs after."""
    if s.lp is None or s.memory_budget is None:
        return None
    m, h = s.model, s.lp.highs
    # each branch and bound stops at its node budget (`LAGRANGE_NODES`), the
    # step at its safety net
    deadline = s.net("lp-lagrange")
    groups = len(m.program.groups)
    sol = h.getSolution()
    if not any(abs(sol.row_dual[groups + r]) > 1e-9 for r in m.peak_rows):  # no peak row binds the LP
        return None
    first = len(m.program.rows)
    m.add_pending()  # the sub-programs below need every peak row; the LP optimum stays one (it violated none)
    if len(m.program.rows) > first:
        add_highs_rows(h, m.program.rows[first:])
    peaks = np.asarray([groups + r for r in m.peak_rows], dtype=np.int32)
    duals = np.zeros(h.getNumRow())  # rows just added: dual 0 (the optimum violated none)
    duals[: len(sol.row_dual)] = sol.row_dual
    lp = _Frozen.of(h, m)
    x_lp, reduced = np.asarray(sol.col_value).copy(), np.asarray(sol.col_dual).copy()
    plans = _lagrange_plans(h, lp, peaks, duals)
    if plans is None:
        return None
    above, below = plans
    # a search for a plan cheaper than above, over the groups the two plans
    # choose apart
    lb, ub = lp.lower.copy(), lp.upper.copy()
    apart = 0
    for xs in m.leaders():
        k = int(np.argmax(above[xs]))
        if k == int(np.argmax(below[xs])):
            ub[xs] = 0.0
            ub[xs[k]] = lb[xs[k]] = 1.0
        else:
            apart += 1
    found = lp.branch(lb, ub, above, s.options.rounding_gap, LAGRANGE_NODES, max(0.05, deadline - time.perf_counter()))
    log.debug("Lagrangian plans: %d groups apart, branch and bound over them: %s, %d nodes (budget %d), %.2fs", apart, found.status, found.nodes, found.budget, s.elapsed())
    s.timed_out("lp-lagrange", found.status == TIME_LIMIT)
    hint = None
    for values in (above, found.values):
        if values is not None and _take(s, values):
            hint = values
    if s.candidate is None:
        return None
    # the proof: every plan cheaper than the target lies in the program
    # with the columns fixed whose reduced cost alone exceeds the room
    # between the target and the LP bound (a target a hair inside the gap:
    # the bound it proves is rounded down to whole ns)
    target = (1 - 0.999 * s.options.rounding_gap) * s.candidate.objective
    room = target - s.lp.bound
    lb, ub, fixed = _fix_by_reduced_cost(lp, x_lp, reduced, room)
    proof = lp.branch(lb, ub, hint, 0.99 * s.options.rounding_gap, LAGRANGE_NODES, max(0.05, deadline - time.perf_counter()))
    log.debug("Lagrangian plans: candidate %d ns, %d of %d columns fixed by reduced cost, proof %s in %d nodes (budget %d; bound %.0f, target %.0f), %.2fs", s.candidate.objective, fixed, lp.n, proof.status, proof.nodes, proof.budget, proof.bound, target, s.elapsed())
    s.timed_out("lp-lagrange", proof.status == TIME_LIMIT)
    if proof.values is not None:
        _take(s, proof.values)
    # plans outside the fixed program cost at least `target`
    if np.isfinite(min(proof.bound, target)):
        s.branch_bound = max(s.branch_bound or 0, int(np.floor(min(proof.bound, target))))
    return s.proven("lp-lagrange")


def lp_dive(s: SolveState) -> SolveResult | None:
    """Diving's plan when it fits and is within the gap; when it only
    fits, the candidate. Diving stops at its simplex iteration budget
    (`dive_iterations`), or at its safety net (`SAFETY_NET`)."""
    if s.lp is None:
        return None
    dive = _dive(s.model, s.lp.highs, dive_iterations(s.lp), s.net("lp-dive"))
    log.debug("LP dive: %s after %d re-solves, %d simplex iterations (budget %d), %.2fs", dive.stop, dive.resolves, dive.iterations, dive_iterations(s.lp), s.elapsed())
    s.timed_out("lp-dive", dive.stop == "time limit")
    if dive.values is None:
        return None
    choice, _ = s.model.choice(dive.values)
    cost_ns, peak = s.price(choice)
    log.debug("LP dive: %d ns (LP bound %d), peak %d, %.2fs", cost_ns, s.lp.bound, peak, s.elapsed())
    if not s.fits(peak):
        return None
    if s.candidate is None or cost_ns < s.candidate.objective:
        s.candidate = Candidate(choice, cost_ns, "lp-dive")
    if s.within_gap(cost_ns):
        return s.result(choice, "FEASIBLE", cost_ns, min(s.lp.bound, cost_ns), "lp-dive")
    return None


def lp_branch(s: SolveState) -> SolveResult | None:
    """Branch and bound on the LP (HiGHS's MIP solver: its cuts, presolve
    and search), from the candidate (the cheaper of the rounding and
    diving's plan), until a plan is proven within the gap or its node
    budget is spent (`BRANCH_MAX_NODES`; or its safety net, `SAFETY_NET`).
    Its plan when proven within the gap; else its plan becomes the candidate
    when cheaper, and its proven bound is kept for the answer."""
    if s.lp is None:
        return None
    m, h = s.model, s.lp.highs
    first = len(m.program.rows)
    m.add_pending()
    if len(m.program.rows) > first:
        add_highs_rows(h, m.program.rows[first:])
    n = len(m.program.names)
    h.changeColsBounds(n, np.arange(n, dtype=np.int32), np.zeros(n), np.asarray(m.program.upper, dtype=float))  # diving's fixes undone
    ints = np.asarray(sorted({x for xs in m.leaders() for x in xs}), dtype=np.int32)
    h.changeColsIntegrality(len(ints), ints, np.full(len(ints), highspy.HighsVarType.kInteger, dtype=np.uint8))
    if s.candidate is not None:
        start = np.zeros(n)
        for name, k in s.candidate.choice.items():
            xs = m.x.get(name)
            if xs is not None and len(xs) > 1:
                start[xs[k]] = 1.0
        h.setSolution(len(ints), ints, start[ints])
    h.setOptionValue("mip_rel_gap", s.options.rounding_gap)
    # presolve on small programs only, measured: Llama's remat tries under
    # 520000 bytes on 4 (tests/test_remat.py, 12-13k variables) are proven at
    # the root in 2.2-3.9 s each with it, against 3.9-10 s without (the
    # README's budget, 16.6k: 5.6 s against 4.3 s); on the 2-layer 8B under
    # 26 GiB (218k) presolve alone ran out the time (62 s in all, 40 s without)
    h.setOptionValue("presolve", "on" if n <= PRESOLVE_MAX_VARIABLES else "off")
    h.setOptionValue("mip_max_nodes", BRANCH_MAX_NODES)
    h.setOptionValue("time_limit", max(0.5, s.net("lp-branch") - time.perf_counter()))
    h.run()
    info, status = h.getInfo(), h.getModelStatus()
    log.debug("branch and bound: %s, %d nodes (budget %d), bound %.0f, %.2fs", h.modelStatusToString(status), info.mip_node_count, BRANCH_MAX_NODES, info.mip_dual_bound, s.elapsed())
    s.timed_out("lp-branch", status == highspy.HighsModelStatus.kTimeLimit)
    if status == highspy.HighsModelStatus.kInfeasible and s.memory_budget is not None:
        raise MemoryBudgetError(s.memory_budget, *least_memory(s.graph, s.space, s.pricer, s.options))
    if np.isfinite(info.mip_dual_bound):
        s.branch_bound = int(np.floor(info.mip_dual_bound)) + m.const_ns
    if info.primal_solution_status != 2:  # kSolutionStatusFeasible: no plan found
        return None
    choice, integral = m.choice(np.asarray(h.getSolution().col_value).__getitem__)
    cost_ns, peak = s.price(choice)
    if not integral or not s.fits(peak):
        return None
    if s.candidate is None or cost_ns < s.candidate.objective:
        s.candidate = Candidate(choice, cost_ns, "lp-branch")
    return s.proven("lp-branch")


def lp_fix_cp_sat(s: SolveState) -> SolveResult | None:
    """When diving found no plan: CP-SAT over the groups the LP left
    fractional (the others fixed as the LP decided them), hinted from the
    rounding, within CP-SAT's work budget (`CP_SAT_DETERMINISTIC_TIME`; the
    safety net: the whole time limit). Its plan becomes the candidate; the
    step itself returns nothing."""
    s.model.add_pending()
    if s.lp is None or s.candidate is not None:
        return None
    value = s.lp.value
    fixed = [(xs, k) for xs in s.model.leaders() for k, x in enumerate(xs) if value(x) >= 1 - 1e-6]
    if not fixed:
        return None
    solver, vs, status, scale = _cp_sat(s.model, s.options, s.rounded, fixed, s.options.time_limit_s)
    s.timed_out("lp-fix+cp-sat", status not in (cp_model.OPTIMAL, cp_model.INFEASIBLE) and solver.WallTime() >= 0.99 * s.options.time_limit_s)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        choice = s.model.choice(lambda x: float(solver.BooleanValue(vs[x])))[0]
        s.candidate = Candidate(choice, int(round(solver.ObjectiveValue())) // scale, "lp-fix+cp-sat")
    log.debug("CP-SAT with %d groups fixed from the LP: %s", len(fixed), solver.StatusName(status))
    return None


def cp_sat(s: SolveState) -> SolveResult | None:
    """CP-SAT over the whole program, hinted from the candidate (else the
    rounding), within CP-SAT's work budget (`CP_SAT_DETERMINISTIC_TIME`; the
    safety net: the time left, all of it without a candidate). Its plan,
    unless the candidate is strictly better; None when it found no plan
    but there is a candidate."""
    s.model.add_pending()
    first = s.candidate
    left = s.left() if first else s.options.time_limit_s
    solver, vs, status, scale = _cp_sat(s.model, s.options, first.choice if first else s.rounded, [], left)
    s.timed_out("cp-sat", status not in (cp_model.OPTIMAL, cp_model.INFEASIBLE) and solver.WallTime() >= 0.99 * left)
    wall = s.elapsed()
    name = solver.StatusName(status)
    size = s.model.program.size
    log.debug("ILP %s: %d vars, %d constraints, %.3fs", name, size["variables"], size["constraints"], wall)
    if status == cp_model.INFEASIBLE and s.memory_budget is not None:
        raise MemoryBudgetError(s.memory_budget, *least_memory(s.graph, s.space, s.pricer, s.options))
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if first is None:
            raise RuntimeError(f"the solver found no plan: status {name} after {wall:.1f}s")
        return None
    bound = max(-(-int(round(solver.BestObjectiveBound())) // scale), s.branch_bound or 0)
    objective = int(round(solver.ObjectiveValue())) // scale
    if first is not None and first.objective < objective:
        return s.candidate_result(bound, wall)
    choice = s.model.choice(lambda x: float(solver.BooleanValue(vs[x])))[0]
    return s.result(choice, name, objective, min(bound, objective), "cp-sat", wall=wall)


#: the steps `solve` runs, in order
LADDER: tuple[Step, ...] = (lp_relaxation, lp_rounding, lp_lagrange, lp_dive, lp_branch, lp_fix_cp_sat, cp_sat)


def solve(
    graph: Graph,
    space: StrategySpace,
    pricer: Pricer,
    *,
    output_placements: tuple[Placements | str, ...],
    memory_budget: int | None = None,
    options: SolverOptions = SolverOptions(),
    steps: Sequence[Step] | None = None,
) -> SolveResult:
    """Choose one strategy per node minimising predicted step time: the
    first result of `steps` (default `LADDER`, see the module docstring),
    else the candidate a step left."""
    s = SolveState.start(graph, space, pricer, output_placements, memory_budget, options)
    for step in LADDER if steps is None else steps:
        result = step(s)
        if result is not None:
            return result
    if s.candidate is None:
        raise RuntimeError("the solver found no plan")
    return s.candidate_result(s.proven_bound())


def solve_pinned(s: SolveState, allowed: Mapping[str, frozenset[int]]) -> SolveResult | None:
    """The program `s` built and solved, solved again with each named node's
    choice limited to the `allowed` strategy indices and without its memory
    budget: a classic plan's parameters pinned, as bounds on the same program
    rather than a program built again. The LP re-solves from the free plan's
    basis; an integral optimum is the answer, else the better of its rounding
    and diving's plan (method "pinned-lp", "pinned-lp-rounding",
    "pinned-lp-dive"), against the pinned LP's bound. None when the pins
    conflict (nodes sharing one choice, a folded layer's twins, pinned apart)
    or the program has no LP to start from."""
    if s.lp is None:
        return None
    t0 = time.perf_counter()
    m, h = s.model, s.lp.highs
    upper = np.asarray(m.program.upper, dtype=float)
    by_group: dict[int, tuple[list[int], frozenset[int]]] = {}
    for name, ks in allowed.items():
        xs = m.xs(name)
        both = ks if id(xs) not in by_group else by_group[id(xs)][1] & ks
        if not both:
            return None
        by_group[id(xs)] = (xs, both)
    pinned = upper.copy()
    for xs, ks in by_group.values():
        for k, x in enumerate(xs):
            if x != ONE and k not in ks:
                pinned[x] = 0.0
    if m.stored_var is not None:
        pinned[m.stored_var] = highspy.kHighsInf
    groups, n = len(m.program.groups), len(upper)
    if h.getNumRow() < groups + len(m.program.rows):  # rows CP-SAT's step added to the program only
        add_highs_rows(h, m.program.rows[h.getNumRow() - groups :])
    peaks = np.asarray([groups + r for r in m.peak_rows], dtype=np.int32)
    cols = np.arange(n, dtype=np.int32)
    h.changeColsIntegrality(n, cols, np.full(n, highspy.HighsVarType.kContinuous, dtype=np.uint8))
    h.changeColsBounds(n, cols, np.zeros(n), pinned)
    if len(peaks):
        h.changeRowsBounds(len(peaks), peaks, np.full(len(peaks), -highspy.kHighsInf), np.full(len(peaks), highspy.kHighsInf))
    pending, m.pending_rows = m.pending_rows, []  # no budget: no peak row is added either
    try:
        h.setOptionValue("presolve", "off")
        h.setOptionValue("time_limit", float(s.options.time_limit_s))
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None
        bound = int(round(h.getInfo().objective_function_value)) + m.const_ns
        values = np.asarray(h.getSolution().col_value)
        choice, integral = m.choice(values.__getitem__)
        if integral:  # the LP optimum is the plan, its objective the program's (as lp-relaxation's)
            return SolveResult(choice, "OPTIMAL", bound, bound, time.perf_counter() - t0, "pinned-lp", **m.program.size)
        cost, _ = s.price(choice)  # priced whatever the budget: the pinned plan has none
        method, cut = "pinned-lp-rounding", ()
        if cost - bound > s.options.rounding_gap * cost:
            # the free plan's dive budget: the pinned LP re-solves from its basis
            dive = _dive(m, h, dive_iterations(s.lp), time.perf_counter() + s.options.time_limit_s / 2, pinned)
            cut = ("pinned-lp-dive",) if dive.stop == "time limit" else ()
            if dive.values is not None:
                dived, _ = m.choice(dive.values)
                dived_cost, _ = s.price(dived)
                if dived_cost < cost:
                    choice, cost, method = dived, dived_cost, "pinned-lp-dive"
        status = "OPTIMAL" if cost <= bound else "FEASIBLE"
        return SolveResult(choice, status, cost, min(bound, cost), time.perf_counter() - t0, method, **m.program.size, time_limited=cut)
    finally:
        m.pending_rows = pending
        h.changeColsBounds(n, cols, np.zeros(n), upper)
        if len(peaks):  # the rows' own bounds (a row's constant term moved into them)
            rows = [m.program.rows[r] for r in m.peak_rows]
            h.changeRowsBounds(len(peaks), peaks, highs_bounds([r[2] for r in rows]), highs_bounds([r[3] for r in rows]))


def least_memory(graph: Graph, space: StrategySpace, pricer: Pricer, options: SolverOptions) -> tuple[int, bool]:
    """The smallest per-device peak any plan reaches (for error messages),
    and whether it is exact (else a lower bound: the search ran out of its
    work budget, or of the time limit)."""
    m, peak = PlacementProgram.least_memory_model(graph, space, pricer)
    solver = _cp_solver(options)
    status = solver.Solve(m)
    log.debug("least memory: CP-SAT %s, deterministic time %.2f, %.2fs", solver.StatusName(status), solver.response_proto.deterministic_time, solver.WallTime())
    if status == cp_model.OPTIMAL:
        return int(solver.Value(peak)), True
    return int(np.ceil(solver.BestObjectiveBound())), False


# --------------------------------------------------------------------- LP
def _lp(model: PlacementProgram, options: SolverOptions) -> LP | None:
    """The LP relaxation's optimum (HiGHS dual simplex), None when it has
    none (an infeasible budget). Peak rows are added lazily: solve, add the
    rows the solution violates, re-solve from the last basis, until none is
    violated. The result is the LP optimum with every row; a budget that
    binds nowhere costs (nearly) nothing."""
    t = time.perf_counter()
    h = model.program.highs(model.objective(1), options.time_limit_s)
    status, rounds, added, iterations = _solve_lazily(model, h)
    log.debug(
        "LP: %s, %d simplex iterations, %d round(s), %d peak rows added, %.2fs",
        h.modelStatusToString(status), iterations, rounds, added, time.perf_counter() - t,
    )
    if status == highspy.HighsModelStatus.kTimeLimit:
        size = model.program.size
        raise RuntimeError(
            f"the LP relaxation did not finish within {options.time_limit_s:g}s ({size['variables']} variables, "
            f"{size['constraints']} constraints); raise the time limit (--time-limit) or plan on a mesh with fewer axes"
        )
    if status != highspy.HighsModelStatus.kOptimal:
        return None
    values = h.getSolution().col_value
    return LP(int(round(h.getInfo().objective_function_value)) + model.const_ns, values.__getitem__, h, iterations)


def _solve_lazily(model: PlacementProgram, h: highspy.Highs, max_iterations: int | None = None) -> tuple:
    """Solve, adding violated peak rows until none is, in at most
    `max_iterations` simplex iterations in all when given (past them HiGHS
    stops with kIterationLimit; the caller restores HiGHS's option): (status,
    rounds, rows added, simplex iterations)."""
    rounds = added = iterations = 0
    while True:
        if max_iterations is not None:
            h.setOptionValue("simplex_iteration_limit", max(0, max_iterations - iterations))
        h.run()
        h.setOptionValue("presolve", "off")  # a re-solve starts from this basis; presolving again would discard it
        rounds += 1
        iterations += h.getInfo().simplex_iteration_count
        status = h.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal or not model.pending_rows:
            return status, rounds, added, iterations
        first = len(model.program.rows)
        n = model.add_violated(np.asarray(h.getSolution().col_value))
        if not n:
            return status, rounds, added, iterations
        added += n
        add_highs_rows(h, model.program.rows[first:])


class Dive(NamedTuple):
    """What `_dive` reached: the integral LP solution's values (None when it
    gave up), why it stopped ("integral"; "no optimum": a group none of whose
    strategies left the LP one; "work limit": its simplex iterations spent;
    "time limit": its safety net), its re-solves and simplex iterations."""

    values: Callable[[int], float] | None
    stop: str
    resolves: int
    iterations: int


#: diving's work budget: this many times the LP's simplex iterations, at
#: least `DIVE_MIN_ITERATIONS`. Each re-solve starts from the last basis and
#: moves it only as far as the groups just fixed push it, so a dive that
#: converges costs a fraction of one LP; a few LPs' worth leaves it room on
#: programs whose fixes cascade, and stops one that keeps fixing groups the
#: LP has no optimum with (those re-solves cost the most) by a count of
#: pivots, the same on every machine, rather than by the clock. The floor
#: keeps tiny programs, whose LP takes a few dozen pivots, from being cut
#: before their first re-solves.
DIVE_LP_TIMES = 4
DIVE_MIN_ITERATIONS = 5_000


def dive_iterations(lp: LP) -> int:
    """Diving's simplex iteration budget after `lp` (`DIVE_LP_TIMES`)."""
    return max(DIVE_MIN_ITERATIONS, DIVE_LP_TIMES * lp.iterations)


def _dive(model: PlacementProgram, h: highspy.Highs, max_iterations: int, deadline: float, upper: np.ndarray | None = None) -> Dive:
    """LP diving: fix fractional groups to their heaviest strategy and
    re-solve from the last basis, until the LP is integral. Groups the LP
    leans on (heaviest strategy over half) go a quarter of them at a time;
    when only ties are left (a symmetric choice the LP splits evenly, such as
    which of two mesh axes an expert block shards on), one group at a time,
    so that the re-solve carries the choice to the groups tied with it (a
    batch of ties fixed apart picks inconsistent sides: 8% over the bound on
    hf_mixtral's training step, against 0.14% one at a time). A batch that
    leaves the LP without an optimum is undone and the heaviest group alone
    is tried, on each of its strategies in the LP's order; when none has an
    optimum diving gives up, and so it does past `max_iterations` simplex
    iterations in all (its work budget, `dive_iterations`) or, the safety
    net, at `deadline` (`time.perf_counter()`) or HiGHS's time limit. Gives
    an integer plan whose cost stays near the LP bound where a memory budget
    binds. `upper`: the columns' upper bounds where some are pinned to 0 (a
    strategy pinned out is never tried, and undoing a fix restores it)."""
    leaders = model.leaders()
    resolves = used = 0
    try:
        while True:
            if time.perf_counter() >= deadline:
                return Dive(None, "time limit", resolves, used)
            values = np.asarray(h.getSolution().col_value)
            frac = []
            for xs in leaders:
                vals = values[xs]
                k = int(np.argmax(vals))
                if vals[k] < 1 - 1e-6:
                    frac.append((float(vals[k]), xs[k], xs, vals))
            if not frac:
                return Dive(values.__getitem__, "integral", resolves, used)
            frac.sort(key=lambda f: -f[0])
            clear = [x for weight, x, _, _ in frac if weight > 0.5 + 1e-6]
            _, _, xs, vals = frac[0]
            # the heaviest group, on each strategy not pinned out
            alternatives = [[xs[k]] for k in np.argsort(-vals, kind="stable") if upper is None or upper[xs[k]] > 0]
            for batch in ([clear[: max(1, len(clear) // 4)]] if len(clear) > 1 else []) + alternatives:
                for x in batch:
                    h.changeColBounds(x, 1.0, 1.0)
                status, _, _, iterations = _solve_lazily(model, h, max_iterations - used)
                resolves += 1
                used += iterations
                if status == highspy.HighsModelStatus.kOptimal:
                    break
                if status == highspy.HighsModelStatus.kIterationLimit:
                    return Dive(None, "work limit", resolves, used)
                if status == highspy.HighsModelStatus.kTimeLimit:
                    return Dive(None, "time limit", resolves, used)
                for x in batch:
                    h.changeColBounds(x, 0.0, 1.0 if upper is None else float(upper[x]))
            else:
                return Dive(None, "no optimum", resolves, used)
    finally:
        h.setOptionValue("simplex_iteration_limit", highspy.kHighsIInf)


# --------------------------------------------------------------------- Lagrangian plans and sub-programs
#: `lp_lagrange` prices memory this much above and below the LP's duals
LAGRANGE_EPS = 1e-3

#: `lp_lagrange`'s work budget for each of its two branch and bounds (the
#: search over the groups apart, the proof on the program reduced-cost
#: fixing leaves): HiGHS's `mip_max_nodes`, counted the same on every
#: machine. Where the step proves the gap at all, each closes within a few
#: dozen nodes (a node costing a few hundred simplex iterations); one still
#: open past this is a proof the step will not finish within the time
#: limit, and diving and branch and bound on the whole program are the
#: better use of the time. The candidate and the bound found by then are
#: kept.
LAGRANGE_NODES = 50

#: HiGHS options for the branch and bound on sub-programs (`_Frozen.branch`),
#: measured on the README's budget (the proof in 0.56 s against 1.5 s with
#: the defaults): the candidate comes from `lp_lagrange`, so the primal
#: heuristics only cost time, and a restart re-presolves what reduced-cost
#: fixing already removed
SUB_MIP_OPTIONS = {
    "mip_heuristic_run_feasibility_jump": False,
    "mip_heuristic_run_rins": False,
    "mip_heuristic_run_rens": False,
    "mip_heuristic_run_root_reduced_cost": False,
    "mip_allow_restart": False,
    "mip_detect_symmetry": False,
}


class _Sub(NamedTuple):
    """A sub-program's branch and bound: the best plan's values for every
    column of the program (None when it found none), its proven lower bound
    in ns (infinite when the sub-program has no plan), HiGHS's status (its
    words: `TIME_LIMIT` where the safety net stopped it), its nodes and its
    node budget."""

    values: np.ndarray | None
    bound: float
    status: str
    nodes: int = 0
    budget: int = 0


@dataclass(frozen=True)
class _Frozen:
    """The LP as HiGHS holds it (every peak row in), column-wise, to cut
    sub-programs from: the columns fixed by equal bounds are taken out, their
    terms moved into the row bounds."""

    start: np.ndarray
    index: np.ndarray
    value: np.ndarray
    cost: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    integer: np.ndarray
    const_ns: int

    @property
    def n(self) -> int:
        return len(self.cost)

    @classmethod
    def of(cls, h: highspy.Highs, model: PlacementProgram) -> _Frozen:
        lp = h.getLp()
        a = lp.a_matrix_
        start, index, value = np.asarray(a.start_), np.asarray(a.index_), np.asarray(a.value_)
        n = lp.num_col_
        if a.format_ != highspy.MatrixFormat.kColwise:  # row-wise as passed: transpose
            rows = np.repeat(np.arange(lp.num_row_), np.diff(start))
            order = np.argsort(index, kind="stable")
            start = np.concatenate([[0], np.cumsum(np.bincount(index, minlength=n))])
            index, value = rows[order], value[order]
        integer = np.zeros(n, dtype=bool)
        integer[[x for xs in model.leaders() for x in xs]] = True
        return cls(
            start.astype(np.int64), index.astype(np.int32), value.astype(float), np.asarray(lp.col_cost_, dtype=float),
            np.asarray(lp.col_lower_, dtype=float), np.asarray(lp.col_upper_, dtype=float),
            np.asarray(lp.row_lower_, dtype=float), np.asarray(lp.row_upper_, dtype=float), integer, model.const_ns,
        )

    @functools.cached_property
    def at(self) -> np.ndarray:
        """The column of each matrix entry."""
        return np.repeat(np.arange(self.n), np.diff(self.start))

    def branch(self, lower: np.ndarray, upper: np.ndarray, hint: np.ndarray | None, gap: float, max_nodes: int, time_limit_s: float) -> _Sub:
        """HiGHS's branch and bound on the program within column bounds
        `lower`..`upper` (the choice columns integer), to relative `gap`,
        started from `hint`, for at most `max_nodes` nodes (its work budget)
        or, the safety net, `time_limit_s` seconds. (HiGHS's
        `objective_bound` as a cutoff was measured and left out: with
        presolve off it returned a plan above the cutoff as optimal, a bound
        no proof can rest on.)"""
        if np.any(lower > upper):
            return _Sub(None, np.inf, "infeasible")
        fixed = lower == upper
        col = self.at
        moved = fixed[col] & (lower[col] != 0)
        shift = np.bincount(self.index[moved], weights=self.value[moved] * lower[col][moved], minlength=len(self.row_lower))
        row_lower, row_upper = self.row_lower - shift, self.row_upper - shift
        const = float(self.cost[fixed] @ lower[fixed]) + self.const_ns
        kept = ~fixed[col]
        used = np.zeros(len(row_lower), dtype=bool)
        used[self.index[kept]] = True
        if np.any(~used & ((row_lower > 1e-6) | (row_upper < -1e-6))):  # a row of fixed columns only, broken
            return _Sub(None, np.inf, "infeasible")
        keep = np.flatnonzero(~fixed)
        if not len(keep):
            return _Sub(lower.copy(), const, "optimal")
        rows = np.flatnonzero(used)
        renumber = np.full(len(row_lower), -1, dtype=np.int32)
        renumber[rows] = np.arange(len(rows), dtype=np.int32)
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(keep), len(rows)
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = self.cost[keep], lower[keep], upper[keep]
        lp.row_lower_, lp.row_upper_ = row_lower[rows], row_upper[rows]
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum(np.diff(self.start)[keep])]).astype(np.int32)
        lp.a_matrix_.index_ = renumber[self.index[kept]]
        lp.a_matrix_.value_ = self.value[kept]
        integer = self.integer[keep]
        lp.integrality_ = np.where(integer, highspy.HighsVarType.kInteger, highspy.HighsVarType.kContinuous).tolist()
        h = new_highs()
        h.setOptionValue("output_flag", False)
        for k, v in SUB_MIP_OPTIONS.items():
            h.setOptionValue(k, v)
        h.setOptionValue("mip_rel_gap", gap)
        h.setOptionValue("mip_max_nodes", int(max_nodes))
        h.setOptionValue("time_limit", float(time_limit_s))
        h.passModel(lp)
        if hint is not None:
            ints = np.flatnonzero(integer).astype(np.int32)
            h.setSolution(len(ints), ints, hint[keep][ints])
        h.run()
        info, status = h.getInfo(), h.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            return _Sub(None, np.inf, "infeasible")
        values = None
        if info.primal_solution_status == 2:  # kSolutionStatusFeasible
            values = lower.copy()
            values[keep] = np.asarray(h.getSolution().col_value)
        bound = info.mip_dual_bound + const if np.isfinite(info.mip_dual_bound) else -np.inf
        return _Sub(values, bound, h.modelStatusToString(status), max(0, int(info.mip_node_count)), int(max_nodes))


def _take(s: SolveState, values: np.ndarray) -> bool:
    """Make the plan `values` chooses the candidate when it is integral,
    fits and is cheaper; whether it did."""
    choice, integral = s.model.choice(values.__getitem__)
    cost_ns, peak = s.price(choice)
    if integral and s.fits(peak) and (s.candidate is None or cost_ns < s.candidate.objective):
        s.candidate = Candidate(choice, cost_ns, "lp-lagrange")
        return True
    return False


def _lagrange_plans(h: highspy.Highs, lp: _Frozen, peaks: np.ndarray, duals: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The LP's optima with the peak rows dropped and memory priced at
    (1 ± `LAGRANGE_EPS`) times their duals, (above, below); None when one
    has none. Below first, from the LP optimum's basis, then above from
    below's: each a short step from the last, so the two differ where the
    price decides and little elsewhere (above first, from the LP optimum,
    then below set 155 of gpt's 196 training groups apart; this way 17).
    `h` is left as it was, re-solved to its optimum."""
    n = lp.n
    y = np.zeros(len(lp.row_lower))
    y[peaks] = duals[peaks]
    price = np.bincount(lp.at, weights=lp.value * y[lp.index], minlength=n)  # Aᵀy over the peak rows
    cols = np.arange(n, dtype=np.int32)
    k = len(peaks)
    h.changeRowsBounds(k, peaks, np.full(k, -highspy.kHighsInf), np.full(k, highspy.kHighsInf))
    plans = []
    try:
        for eps in (-LAGRANGE_EPS, LAGRANGE_EPS):
            h.changeColsCost(n, cols, lp.cost - (1 + eps) * price)
            h.run()
            if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                return None
            plans.append(np.asarray(h.getSolution().col_value).copy())
        return plans[1], plans[0]
    finally:
        h.changeColsCost(n, cols, lp.cost)
        h.changeRowsBounds(k, peaks, lp.row_lower[peaks], lp.row_upper[peaks])
        h.run()


def _fix_by_reduced_cost(lp: _Frozen, x: np.ndarray, reduced: np.ndarray, room: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Column bounds keeping only the plans within `room` ns of the LP
    bound: for every x feasible, cost(x) - LP bound = Σ_j d_j (x_j - x*_j)
    plus each row's dual times its slack, every term at least 0 (x* the LP
    optimum, d its reduced costs, the duals' signs those of the bounds they
    hold); so a column at a bound there whose |d_j| exceeds `room` stays at
    that bound in every such plan. A nanosecond of margin covers the LP
    bound's rounding to whole ns. (lower, upper, how many columns fixed)."""
    lower, upper = lp.lower.copy(), lp.upper.copy()
    slack = max(room, 0.0) * (1 + 1e-9) + 1.0
    at_lower = (np.abs(x - lower) <= 1e-9) & (reduced > slack)
    at_upper = (np.abs(x - upper) <= 1e-9) & (reduced < -slack)
    upper[at_lower] = lower[at_lower]
    lower[at_upper] = upper[at_upper]
    return lower, upper, int(at_lower.sum() + at_upper.sum())


# --------------------------------------------------------------------- CP-SAT
#: each CP-SAT search's work budget, in CP-SAT's deterministic time
#: (`max_deterministic_time`: a weighted count of its operations, scaled to
#: about a second each on the machine its weights were fitted on, the same
#: count on every machine). The interleaved search checks it between batches,
#: so a search on a large program runs some way past it. CP-SAT proves the
#: small programs it gets here within a fraction of it; on large ones the
#: steps before it have found a plan near the bound, which its interleaved
#: search improves only slowly: a budget that leaves the rungs before it
#: most of the default time limit, as the wall-clock shares it replaced did.
CP_SAT_DETERMINISTIC_TIME = 10.0


def _cp_solver(options: SolverOptions, time_limit_s: float | None = None) -> cp_model.CpSolver:
    """A CP-SAT solver whose answer is a function of its input: the
    interleaved search (`interleave_search`: the workers' tasks run in
    batches and share what they found only between them, so the search is
    the same for a given number of workers whatever the machine's load; the
    default portfolio is a race between threads) with a fixed seed, stopped
    by its deterministic work budget (`CP_SAT_DETERMINISTIC_TIME`); the wall
    clock (`time_limit_s`, else the options') is only the safety net."""
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = options.time_limit_s if time_limit_s is None else time_limit_s
    solver.parameters.max_deterministic_time = CP_SAT_DETERMINISTIC_TIME
    solver.parameters.num_workers = options.workers
    solver.parameters.interleave_search = True
    solver.parameters.random_seed = options.seed
    solver.parameters.max_memory_in_mb = options.max_memory_mb
    return solver


def _cp_sat(model: PlacementProgram, options: SolverOptions, hint: Mapping[str, int] | None, fixed: list, time_limit_s: float) -> tuple:
    """CP-SAT on the whole program with `fixed` (choice variables, index)
    set, hinted from `hint` (a choice per node and hub), the safety net
    `time_limit_s`: (solver, variables, status, scale)."""
    m, vs, scale = model.cp_sat(hint, fixed)
    solver = _cp_solver(options, time_limit_s)
    status = solver.Solve(m)
    log.debug("CP-SAT: %s, deterministic time %.2f (budget %g), %.2fs", solver.StatusName(status), solver.response_proto.deterministic_time, CP_SAT_DETERMINISTIC_TIME, solver.WallTime())
    return solver, vs, status, scale
