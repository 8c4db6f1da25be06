r"""The placement integer program: built once as a sparse 0-1 program, solved
by its LP relaxation (HiGHS) and, where that is fractional, by CP-SAT.

Notation: nodes v are grouped — a tuple projection or a follower shares its
parent's choice, a folded layer's node its twin's — and each group g with
strategies S_g gets booleans

    x[g,s] ∈ {0,1},   Σ_s x[g,s] = 1                         (`_add_choices`)

Edges u→v (u is input i of v). Let O_u be the distinct output placements of u
and R_vi the distinct placements v's strategies want for input i, with
z[u,o] = Σ_{s: out(u,s)=o} x[g_u,s] and y[v,i,r] = Σ_{t: in_i(v,t)=r} x[g_v,t].
Working on distinct placements rather than strategies keeps the edge variables
few. With edge booleans e[u,v,i,o,r], aggregated rows

    Σ_r e[o,r] = z[u,o],    Σ_o e[o,r] = y[v,i,r]              (`_link`)

(tighter than McCormick's three inequalities) make e the joint choice, and
the edge costs Σ c(o,r)·e[o,r], c the redistribution time. When one side has
a single placement the cost is linear in the other side's z or y.

Repeated structure is built once: compute terms, edge links and memory terms
are keyed by the choice variables and options they read, so the copies of a
folded layer (which share variables) add their cost to one term instead of
adding variables. The program's size then hardly grows with depth.

Memory (`_add_memory`): per device, parameters and buffers
M = Σ_stored bytes(v,s)·x (one integer variable), plus the activations live
at each candidate peak t of the schedule (`planner.memory.live_multisets`):

    M + Σ_{v live at t} bytes(v,s)·x ≤ budget

with one auxiliary variable per live value's bytes (so a row has a term per
value, not per strategy), sizes in units of a millionth of the budget rounded
up. The LP adds peak rows lazily, only those its solution violates (`_lp`);
CP-SAT gets them all. Where the LP is fractional, LP diving (`_dive`) looks
for an integer plan near the LP bound; failing that, CP-SAT searches only the
groups the LP left fractional. Either plan is where the whole search starts.

Objective: Σ compute(v,s)·x + Σ edge costs + output redistribution, in
integer nanoseconds.

Solving (`solve`): the LP relaxation first (HiGHS dual simplex, an order of
magnitude faster than GLOP on these transportation-like programs); the
aggregated rows make it integral for most programs without a binding memory
row, and an integral LP optimum is an integer optimum. Otherwise the rounded
LP when it fits and is within the rounding gap, else CP-SAT with a fixed seed,
hinted from the rounding. CP-SAT variables carry readable names
(`x[n=<node>,s=<k>]`, `e[<u>-><v>:<i>,o=<k>,r=<k>]`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import highspy
import numpy as np
from ortools.sat.python import cp_model

from ir.graph import Graph
from planner._dtensor import Placements
from planner.cost import to_ns
from planner.memory import live_multisets, stored_values
from planner.mesh import format_bytes
from planner.pricing import Pricer
from planner.strategies import StrategySpace, hub_name

__all__ = ["MemoryBudgetError", "SolveResult", "SolverOptions", "least_memory", "solve"]

log = logging.getLogger(__name__)

#: the constant 1 in a list of choice variables (a group with one strategy)
ONE = -1


class MemoryBudgetError(ValueError):
    """No plan fits the per-device memory budget."""

    def __init__(self, budget: int, least: int, exact: bool = True) -> None:
        self.budget, self.least = budget, least
        what = "is" if exact else "is at least"
        super().__init__(
            f"no plan fits the memory budget of {format_bytes(budget)} ({budget} bytes) per device; "
            f"the least memory any plan needs {what} {format_bytes(least)} ({least} bytes) per device"
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
    #: "lp-relaxation" (integral LP optimum), "lp-rounding", "lp-dive",
    #: "lp-fix+cp-sat" or "cp-sat"
    method: str
    variables: int
    constraints: int
    #: seconds spent building the program (included in wall_s)
    build_s: float = 0.0

    @property
    def gap(self) -> float:
        return 0.0 if self.objective_ns == 0 else abs(self.objective_ns - self.bound_ns) / abs(self.objective_ns)


class _Program:
    """A sparse program over variables 0..n-1 with bounds [0, upper]: rows
    lo ≤ Σ coef·var ≤ hi, exactly-one groups, an objective. Emitted to HiGHS
    (relaxed) or CP-SAT (integer) without per-term Python objects."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.upper: list[int] = []
        self.rows: list[tuple[list[int], list[int], int, int]] = []
        self.groups: list[list[int]] = []
        self.cost: dict[int, int] = defaultdict(int)

    def var(self, name: str | tuple, upper: int = 1) -> int:
        """A variable in [0, upper]; `name` a string, or for edge variables
        ("e", link label, o, r), formatted only when CP-SAT needs names."""
        self.names.append(name)
        self.upper.append(upper)
        return len(self.names) - 1

    def one_of(self, label: str, n: int) -> list[int]:
        """n booleans of which exactly one is true (the constant when n is 1)."""
        if n == 1:
            return [ONE]
        xs = [self.var(f"{label},s={k}]") for k in range(n)]
        self.groups.append(xs)
        return xs

    def row(self, terms: Mapping[int, int], lo: int, hi: int) -> int:
        const = terms.get(ONE, 0)
        idx = [v for v, c in terms.items() if c and v != ONE]
        self.rows.append((idx, [terms[v] for v in idx], lo - const, hi - const))
        return len(self.rows) - 1

    @property
    def size(self) -> dict[str, int]:
        return {"variables": len(self.names), "constraints": len(self.rows) + len(self.groups)}

    def highs(self, cost: Mapping[int, int], time_limit_s: float) -> highspy.Highs:
        n = len(self.names)
        lp = highspy.HighsLp()
        lp.num_col_ = n
        lp.num_row_ = len(self.groups) + len(self.rows)
        c = np.zeros(n)
        for v, k in cost.items():
            c[v] = k
        lp.col_cost_ = c
        lp.col_lower_ = np.zeros(n)
        lp.col_upper_ = np.asarray(self.upper, dtype=float)
        starts, index, value, lo, hi = _csr([(g, [1] * len(g), 1, 1) for g in self.groups] + self.rows)
        lp.row_lower_, lp.row_upper_ = lo, hi
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.num_col_ = n
        lp.a_matrix_.num_row_ = lp.num_row_
        lp.a_matrix_.start_ = np.append(starts, len(index)).astype(np.int32)
        lp.a_matrix_.index_, lp.a_matrix_.value_ = index, value
        h = _new_highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", float(time_limit_s))
        # presolve finds little to remove here and costs more than it saves
        # (32-layer 8B step on 8x8: 5.3 s without, 7.5 s with)
        h.setOptionValue("presolve", "off")
        h.passModel(lp)
        return h

    def cp_sat(self) -> tuple[cp_model.CpModel, list]:
        m = cp_model.CpModel()
        names = [n if isinstance(n, str) else f"e[{n[1]},o={n[2]},r={n[3]}]" for n in self.names]
        vs = [m.NewBoolVar(name) if up == 1 else m.NewIntVar(0, up, name) for name, up in zip(names, self.upper, strict=True)]
        for g in self.groups:
            m.AddExactlyOne(vs[i] for i in g)
        for idx, coef, lo, hi in self.rows:
            m.AddLinearConstraint(cp_model.LinearExpr.WeightedSum([vs[i] for i in idx], coef), lo, hi)
        return m, vs


class _Model:
    """Builds the program for one graph; see the module docstring."""

    def __init__(self, graph: Graph, space: StrategySpace, pricer: Pricer) -> None:
        self.graph, self.space, self.pricer = graph, space, pricer
        self.p = _Program()
        self.group = {n.name: (space.nodes[n.name].follows or n.name) for n in graph}
        self.x: dict[str, list[int]] = {}
        self.const_ns = 0
        self._memo: dict[tuple, object] = {}
        self._interned: dict[object, int] = {}
        self._pair_memo: dict[tuple[int, int, int], int] = {}
        self.pending_rows: list[dict[int, int]] = []
        self.budget: int | None = None
        #: rows defining auxiliary variables (bytes of a value), added with
        #: the first row that reads the variable: bytes-sized coefficients
        #: in rows no peak needs slow the simplex down
        self.definitions: dict[int, dict[int, int]] = {}

    # ----------------------------------------------------------------- variables
    def _add_choices(self) -> None:
        for n in self.graph:
            if self.group[n.name] == n.name:
                self.x[n.name] = self.p.one_of(f"x[n={n.name}", len(self.space.nodes[n.name].options))

    def xs(self, name: str) -> list[int]:
        return self.x[self.group[name]]

    def _add_hubs(self) -> None:
        """A value read by several consumers is redistributed once, to its hub
        placement, and each consumer reads the hub (see `planner.hubs`)."""
        follows = self.space.hub_follows
        for u, cands in self.space.hubs.items():
            if u not in follows:
                self.x[hub_name(u)] = self.p.one_of(f"h[n={u}", len(cands))
        for u, twin in follows.items():
            self.x[hub_name(u)] = self.x[hub_name(twin)]

    def _term(self, coef: int, var: int) -> None:
        if coef == 0:
            return
        if var == ONE:
            self.const_ns += coef
        else:
            self.p.cost[var] += coef

    # ----------------------------------------------------------------- compute
    def _add_compute(self) -> None:
        copies: dict[tuple, list] = {}
        for n in self.graph:
            if n.flops == 0 and n.bytes == 0:
                continue
            opts, xs = self.space.nodes[n.name].options, self.xs(n.name)
            key = (id(opts), id(xs), n.flops, n.bytes, n.meta)
            slot = copies.setdefault(key, [n, 0])
            slot[1] += 1
        for n, count in copies.values():
            for s, x in zip(self.space.nodes[n.name].options, self.xs(n.name), strict=True):
                self._term(count * to_ns(self.pricer.compute_s(n, s)), x)

    # ----------------------------------------------------------------- edges
    def _by_placement(self, name: str, which: int | None) -> dict[Placements, list[int]]:
        """Choice variables of `name` grouped by their output placement
        (`which` None) or by the placement they want for input `which`."""
        opts, xs = self.space.nodes[name].options, self.xs(name)
        key = ("by", id(opts), id(xs), which)
        if key not in self._memo:
            groups: dict[Placements, list[int]] = {}
            for s, x in zip(opts, xs, strict=True):
                groups.setdefault(s.output if which is None else s.inputs[which], []).append(x)
            self._memo[key] = groups
        return self._memo[key]  # type: ignore[return-value]

    def _hub_by_placement(self, u: str) -> dict[Placements, list[int]]:
        xs = self.x[hub_name(u)]
        key = ("hub", id(xs))
        if key not in self._memo:
            self._memo[key] = {p: [x] for p, x in zip(self.space.hubs[u], xs, strict=True)}
        return self._memo[key]  # type: ignore[return-value]

    def _source(self, u: str) -> dict[Placements, list[int]]:
        """Where consumers of `u` read from: its hub, or its own output."""
        return self._hub_by_placement(u) if u in self.space.hubs else self._by_placement(u, None)

    def _add_edges(self, output_placements) -> None:
        links: dict[tuple, list] = {}
        diagonal: dict[tuple, list] = {}

        def link(label: str, meta, outs: dict, wants: dict) -> None:
            slot = links.setdefault((meta, id(outs), id(wants)), [label, meta, outs, wants, 0])
            slot[4] += 1

        for v in self.graph:
            if self.space.nodes[v.name].source == "follow":
                continue
            for i, u in enumerate(v.refs()):
                meta = self.graph[u].tensor_meta
                if self.group[u] == self.group[v.name]:  # same choice: cost on the diagonal
                    key = (id(self.space.nodes[u].options), id(self.space.nodes[v.name].options), i, meta, id(self.xs(v.name)))
                    slot = diagonal.setdefault(key, [u, v.name, i, 0])
                    slot[3] += 1
                    continue
                link(f"{u}->{v.name}:{i}", meta, self._source(u), self._by_placement(v.name, i))
        for u in self.space.hubs:
            link(f"{u}->hub", self.graph[u].tensor_meta, self._by_placement(u, None), self._hub_by_placement(u))
        # each output leaves in its placements; a gradient (its want is the
        # parameter's node name) leaves in whatever placement the parameter gets
        for u, want in zip(self.graph.outputs, output_placements, strict=True):
            wants = self._by_placement(want, None) if isinstance(want, str) else {want: [ONE]}
            link(f"{u}->output", self.graph[u].tensor_meta, self._source(u), wants)

        for u, v, i, count in diagonal.values():
            meta = self.graph[u].tensor_meta
            for k, s in enumerate(self.space.nodes[v].options):
                src = self.space.nodes[u].options[k].output
                self._term(count * to_ns(self.pricer.redistribute_s(meta, src, s.inputs[i])), self.xs(v)[k])
        for label, meta, outs, wants, count in links.values():
            self._link(label, meta, outs, wants, count)

    def _pair_costs(self, meta, outs: dict, wants: dict) -> list[list[int]]:
        """Redistribution time (ns) from each output placement (rows, in
        `outs` order) to each wanted one (columns). Placements are interned
        to ints once per distinct set and everything after works on indices:
        hashing a placement tuple runs Python code per element, and the 8B
        step asks for 200k pairs (most of them repeats)."""
        m = self._intern(("meta", meta))
        oids, rids = self._ids(outs), self._ids(wants)
        memo = self._pair_memo
        rows = []
        for o, oid in zip(outs, oids, strict=True):
            row = []
            for r, rid in zip(wants, rids, strict=True):
                key = (m, oid, rid)
                c = memo.get(key)
                if c is None:
                    c = memo[key] = to_ns(self.pricer.redistribute_s(meta, o, r))
                row.append(c)
            rows.append(row)
        return rows

    def _intern(self, value) -> int:
        return self._interned.setdefault(value, len(self._interned))

    def _ids(self, placements: dict) -> list[int]:
        key = ("ids", id(placements))
        if key not in self._memo:
            self._memo[key] = [self._intern(p) for p in placements]
        return self._memo[key]  # type: ignore[return-value]

    def _link(self, label: str, meta, outs: dict, wants: dict, count: int) -> None:
        cost = self._pair_costs(meta, outs, wants)
        if not any(any(row) for row in cost):
            return
        out_xs, want_xs = list(outs.values()), list(wants.values())
        if len(out_xs) == 1 or len(want_xs) == 1:
            for o, row in enumerate(cost):
                for r, c in enumerate(row):
                    for var in want_xs[r] if len(out_xs) == 1 else out_xs[o]:
                        self._term(count * c, var)
            return
        # e[o][r]: the value leaves in placement o and is read in r; its
        # row sums equal the output's choice, its column sums the reader's
        e = [[self.p.var(("e", label, o, r)) for r in range(len(want_xs))] for o in range(len(out_xs))]
        for o, xs in enumerate(out_xs):
            self.p.row(_minus(dict.fromkeys(e[o], 1), xs), 0, 0)
        for r, xs in enumerate(want_xs):
            self.p.row(_minus({row[r]: 1 for row in e}, xs), 0, 0)
        for o, row in enumerate(cost):
            for r, c in enumerate(row):
                self._term(count * c, e[o][r])

    # ----------------------------------------------------------------- memory
    def memory_terms(self, unit: int = 1) -> tuple[dict[int, int], list[dict[int, int]]]:
        """Memory per variable of the stored values (with optimizer state), and
        of the allocations live at each candidate peak, in `unit` bytes
        (each size rounded up, so a plan that fits in units fits in bytes)."""
        reps: dict[tuple, str] = {}

        def key(name: str) -> tuple:
            n = self.graph[name]
            k = (id(self.space.nodes[name].options), id(self.xs(name)), n.tensor_meta, n.role)
            reps.setdefault(k, name)
            return k

        terms: dict[tuple, list[tuple[int, int]]] = {}

        def expand(k: tuple, size: Callable) -> list[tuple[int, int]]:
            if (k, size) not in terms:
                n = self.graph[reps[k]]
                terms[k, size] = [(x, size(n, s.output)) for s, x in zip(self.space.nodes[n.name].options, self.xs(n.name), strict=True)]
            return terms[k, size]

        named: dict[tuple, int] = {}

        def bytes_var(k: tuple, size: Callable, t: list[tuple[int, int]]) -> int:
            # one variable for a value's bytes, defined once, keeps the peak
            # rows sparse (one term per live value, not one per strategy)
            if (k, size) not in named:
                v = self.p.var(f"bytes[{reps[k]}]", upper=max(b for _, b in t))
                self.definitions[v] = _minus({v: 1}, [], dict(_sum_terms(t)))
                named[k, size] = v
            return named[k, size]

        def total(counts: Mapping[tuple, int], size: Callable) -> dict[int, int]:
            out: dict[int, int] = defaultdict(int)
            for k, count in counts.items():
                t = expand(k, size)
                if len(t) == 1:
                    out[t[0][0]] += count * t[0][1]
                else:
                    out[bytes_var(k, size, t)] += count
            return out

        stored: dict[tuple, int] = defaultdict(int)
        for name in stored_values(self.graph):
            stored[key(name)] += 1
        own = functools.partial(_in_units, lambda node, pl: self.pricer.bytes_per_device(node.tensor_meta, pl), unit)
        resident = functools.partial(_in_units, self.pricer.resident_bytes, unit)
        rows = [total(r, own) for r in live_multisets(self.graph, key)]
        return total(stored, resident), rows

    def _add_memory(self, budget: int) -> None:
        """One variable for the stored bytes keeps each peak row short. The
        peak rows wait in `pending_rows`: `_lp` adds those a solution
        violates (most budgets bind at a few peaks, or none), `add_pending`
        all of them for CP-SAT."""
        # memory in units of a millionth of the budget: bytes-sized
        # coefficients beside 0-1 choices stall the dual simplex (an
        # infeasible 15 GiB budget on the 8B step: over 120 s unscaled)
        unit = max(1, budget >> 20)
        stored_terms, rows = self.memory_terms(unit)
        budget = budget // unit
        stored = self.p.var("stored_bytes", upper=budget)
        self.definitions[stored] = _minus({stored: 1}, [], stored_terms)
        self.budget = budget
        self.pending_rows = [{**row, stored: row.get(stored, 0) + 1} for row in rows]

    def add_rows(self, rows: list[dict[int, int]]) -> int:
        """Add peak rows (and the definitions they read); the index of the
        first program row added."""
        first = len(self.p.rows)
        for row in rows:
            for v in row:
                d = self.definitions.pop(v, None)
                if d is not None:
                    self.add_rows_defined(d)
            self.p.row(row, -(1 << 62), self.budget)
        return first

    def add_rows_defined(self, d: dict[int, int]) -> None:
        for v in d:
            inner = self.definitions.pop(v, None)
            if inner is not None:
                self.add_rows_defined(inner)
        self.p.row(d, 0, 0)

    def resolve_definitions(self, values: np.ndarray) -> None:
        """Give the auxiliary variables not yet defined in the program their
        defined value (the solver left them free)."""
        for v, d in self.definitions.items():
            values[v] = -sum(c * (1.0 if x == ONE else values[x]) for x, c in d.items() if x != v)

    def add_pending(self) -> None:
        self.add_rows(self.pending_rows)
        self.pending_rows = []
        for d in list(self.definitions.values()):
            self.p.row(d, 0, 0)
        self.definitions.clear()

    def build(self, output_placements, budget: int | None) -> None:
        self._add_choices()
        self._add_hubs()
        self._add_compute()
        self._add_edges(output_placements)
        if budget is not None:
            self._add_memory(budget)

    def objective(self, scale: int) -> dict[int, int]:
        """The cost per variable in units of 1/scale ns, plus (when scale > 1)
        a tie-break worth less than 1 ns in total: among plans of equal
        predicted time prefer lower strategy indices (Replicate and low dims
        come first), which makes the optimum (nearly always) unique, so
        parallel search returns the same plan for the same inputs."""
        obj = {v: c * scale for v, c in self.p.cost.items()}
        if scale > 1:
            for xs in self._leaders():
                for k, x in enumerate(xs):
                    obj[x] = obj.get(x, 0) + k
        return obj

    def _leaders(self) -> list[list[int]]:
        seen, out = set(), []
        for xs in self.x.values():
            if len(xs) > 1 and id(xs) not in seen:
                seen.add(id(xs))
                out.append(xs)
        return out

    @property
    def scale(self) -> int:
        """Objective units per nanosecond for CP-SAT: room below one
        nanosecond for the tie-break."""
        return 1 + sum(len(xs) - 1 for xs in self._leaders())

    def choice(self, value: Callable[[int], float]) -> tuple[dict[str, int], bool]:
        """Per node and hub, the strategy whose variable weighs most, and
        whether every group's weight is all on one strategy (integral)."""
        picked: dict[int, int] = {}
        integral = True
        choice = {}
        names = [(n.name, self.xs(n.name)) for n in self.graph] + [(hub_name(u), self.x[hub_name(u)]) for u in self.space.hubs]
        for name, xs in names:
            if id(xs) not in picked:
                vals = [1.0 if x == ONE else value(x) for x in xs]
                k = max(range(len(vals)), key=vals.__getitem__)
                integral &= abs(vals[k] - 1.0) <= 1e-6
                picked[id(xs)] = k
            choice[name] = picked[id(xs)]
        return choice, integral


def _new_highs() -> highspy.Highs:
    """A HiGHS instance, its constructor's banner kept off standard output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _in_units(size: Callable, unit: int, node, placements) -> int:
    return -(-size(node, placements) // unit)


def _sum_terms(terms: list[tuple[int, int]]) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for x, b in terms:
        out[x] += b
    return out


def _minus(plus: dict[int, int], xs: list[int], weighted: Mapping[int, int] | None = None) -> dict[int, int]:
    """plus - Σ xs (or - Σ weighted[v]·v) as one row's terms."""
    out = dict(plus)
    for x in xs:
        out[x] = out.get(x, 0) - 1
    for x, c in (weighted or {}).items():
        out[x] = out.get(x, 0) - c
    return out


def _cp_solver(options: SolverOptions) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = options.time_limit_s
    solver.parameters.num_workers = options.workers
    solver.parameters.random_seed = options.seed
    # parallel portfolio; the tie-break in the objective keeps the answer stable
    return solver


def _lp(model: _Model, options: SolverOptions) -> tuple[int, Callable[[int], float], highspy.Highs] | None:
    """(objective bound in ns, value of each variable, the solver) of the LP
    relaxation (HiGHS dual simplex). Peak-memory rows are added lazily:
    solve, add the rows the solution violates, re-solve from the last basis,
    until none is violated. The result is the LP optimum with every row; a
    budget that binds nowhere costs nothing (the 32-layer 8B step on 8x8
    under 80 GiB: 1.6 s, against 5.9 s with every row up front)."""
    t = time.perf_counter()
    h = model.p.highs(model.objective(1), options.time_limit_s)
    status, rounds, added = _solve_lazily(model, h)
    log.debug(
        "LP: %s, %d simplex iterations, %d round(s), %d peak rows added, %.2fs",
        h.modelStatusToString(status), h.getInfo().simplex_iteration_count, rounds, added, time.perf_counter() - t,
    )
    if status == highspy.HighsModelStatus.kTimeLimit:
        size = model.p.size
        raise RuntimeError(
            f"the LP relaxation did not finish within {options.time_limit_s:g}s ({size['variables']} variables, "
            f"{size['constraints']} constraints); raise the time limit (--time-limit) or plan on a mesh with fewer axes"
        )
    if status != highspy.HighsModelStatus.kOptimal:
        return None
    values = h.getSolution().col_value
    return int(round(h.getInfo().objective_function_value)) + model.const_ns, values.__getitem__, h


def _solve_lazily(model: _Model, h: highspy.Highs) -> tuple:
    """Solve, adding violated peak rows until none is: (status, rounds, rows added)."""
    rounds = added = 0
    while True:
        h.run()
        rounds += 1
        status = h.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal or not model.pending_rows:
            return status, rounds, added
        values = np.asarray(h.getSolution().col_value)
        model.resolve_definitions(values)
        violated = [k for k, row in enumerate(model.pending_rows) if _activity(row, values) > model.budget * (1 + 1e-9) + 1]
        if not violated:
            return status, rounds, added
        rows = [model.pending_rows[k] for k in violated]
        chosen = set(violated)
        model.pending_rows = [row for k, row in enumerate(model.pending_rows) if k not in chosen]
        added += len(rows)
        first = model.add_rows(rows)
        _add_rows(h, model.p.rows[first:])


def _dive(model: _Model, h: highspy.Highs, deadline: float) -> Callable[[int], float] | None:
    """LP diving: fix the fractional groups the LP weighs most (a quarter of
    them at a time) to their heaviest strategy and re-solve from the last
    basis, until the LP is integral. A batch that makes the LP infeasible is
    undone and retried one group at a time. Gives an integer plan whose cost
    stays near the LP bound where a memory budget binds."""
    leaders = model._leaders()
    while time.perf_counter() < deadline:
        values = np.asarray(h.getSolution().col_value)
        frac = []
        for xs in leaders:
            vals = values[xs]
            k = int(np.argmax(vals))
            if vals[k] < 1 - 1e-6:
                frac.append((float(vals[k]), xs[k]))
        if not frac:
            return values.__getitem__
        frac.sort(reverse=True)
        for batch in (frac[: max(1, len(frac) // 4)], frac[:1]):
            for _, x in batch:
                h.changeColBounds(x, 1.0, 1.0)
            if _solve_lazily(model, h)[0] == highspy.HighsModelStatus.kOptimal:
                break
            for _, x in batch:
                h.changeColBounds(x, 0.0, 1.0)
        else:
            return None
    return None


def _activity(row: Mapping[int, int], values: np.ndarray) -> float:
    return sum(c * (1.0 if v == ONE else values[v]) for v, c in row.items())


def _csr(rows: list) -> tuple[np.ndarray, ...]:
    """Rows (indices, coefficients, lo, hi) as HiGHS's row-wise arrays:
    (starts, index, value, lo, hi)."""
    starts, index, value, lo, hi = [], [], [], [], []
    for idx, coef, a, b in rows:
        starts.append(len(index))
        index.extend(idx)
        value.extend(coef)
        lo.append(a)
        hi.append(b)
    return (
        np.asarray(starts, dtype=np.int32), np.asarray(index, dtype=np.int32), np.asarray(value, dtype=float),
        np.asarray(lo, dtype=float), np.asarray(hi, dtype=float),
    )


def _add_rows(h: highspy.Highs, rows: list) -> None:
    starts, index, value, lo, hi = _csr(rows)
    h.addRows(len(rows), lo, hi, len(index), starts, index, value)


def least_memory(graph: Graph, space: StrategySpace, pricer: Pricer, options: SolverOptions) -> tuple[int, bool]:
    """The smallest per-device peak any plan reaches (for error messages),
    and whether it is exact (else a lower bound: the search ran out of time)."""
    model = _Model(graph, space, pricer)
    model._add_choices()
    stored_terms, rows = model.memory_terms()
    peak = model.p.var("peak_bytes", upper=1 << 50)
    for row in rows:
        terms = _minus({peak: 1}, [], {**stored_terms, **{x: stored_terms.get(x, 0) + c for x, c in row.items()}})
        model.p.row(terms, 0, 1 << 62)
    for d in model.definitions.values():
        model.p.row(d, 0, 0)
    m, vs = model.p.cp_sat()
    m.Minimize(vs[peak])
    solver = _cp_solver(options)
    status = solver.Solve(m)
    if status == cp_model.OPTIMAL:
        return int(solver.Value(vs[peak])), True
    return int(np.ceil(solver.BestObjectiveBound())), False


def solve(
    graph: Graph,
    space: StrategySpace,
    pricer: Pricer,
    *,
    output_placements: tuple[Placements | str, ...],
    memory_budget: int | None = None,
    options: SolverOptions = SolverOptions(),
) -> SolveResult:
    """Choose one strategy per node minimising predicted step time.

    1. The LP relaxation (HiGHS). Integral: optimal for the integer program too.
    2. Else the LP solution rounded per group, if it fits the memory budget and
       is within `options.rounding_gap` of the LP bound (status FEASIBLE, the
       bound and gap reported).
    3. Else LP diving (`_dive`); its plan is taken when within the same gap.
    4. Else CP-SAT: first over the groups the LP left fractional (when diving
       found nothing), then over the whole program from the best plan so far,
       in the time left; the better plan is returned."""
    t0 = time.perf_counter()
    model = _Model(graph, space, pricer)
    model.build(output_placements, memory_budget)
    build_s = time.perf_counter() - t0
    size = {**model.p.size, "build_s": build_s}
    log.debug("program: %d variables, %d constraints, built in %.2fs", size["variables"], size["constraints"], build_s)
    lp = _lp(model, options)
    rounded: dict[str, int] | None = None
    dived: tuple[dict[str, int], int] | None = None
    if lp is not None:
        bound, value, h = lp
        rounded, integral = model.choice(value)
        if integral:
            log.debug("ILP solved by its LP relaxation: %.3fs", time.perf_counter() - t0)
            return SolveResult(rounded, "OPTIMAL", bound, bound, time.perf_counter() - t0, "lp-relaxation", **size)
        cost_ns, peak = _price(graph, space, pricer, rounded, output_placements)
        if (memory_budget is None or peak <= memory_budget) and cost_ns - bound <= options.rounding_gap * cost_ns:
            return SolveResult(rounded, "FEASIBLE", cost_ns, min(bound, cost_ns), time.perf_counter() - t0, "lp-rounding", **size)
        dive = _dive(model, h, t0 + options.time_limit_s / 2)
        if dive is not None:
            choice_d, _ = model.choice(dive)
            cost_d, peak_d = _price(graph, space, pricer, choice_d, output_placements)
            log.debug("LP dive: %d ns (LP bound %d), peak %d, %.2fs", cost_d, bound, peak_d, time.perf_counter() - t0)
            if memory_budget is None or peak_d <= memory_budget:
                dived = choice_d, cost_d
                size = {**model.p.size, "build_s": build_s}  # diving added peak rows
                if cost_d - bound <= options.rounding_gap * cost_d:
                    return SolveResult(choice_d, "FEASIBLE", cost_d, min(bound, cost_d), time.perf_counter() - t0, "lp-dive", **size)
    model.add_pending()
    size = {**model.p.size, "build_s": build_s}
    # the groups the LP already decided are fixed first: CP-SAT then searches
    # only the fractional ones (a memory budget binds at a few peaks) and finds
    # a good plan fast; the whole program is searched next, from that plan,
    # in the time left
    fixed = [] if lp is None or dived else [(xs, k) for xs in model._leaders() for k, x in enumerate(xs) if value(x) >= 1 - 1e-6]
    first = dived
    if fixed:
        solver, vs, status, scale = _cp_sat(model, options, rounded, fixed, options.time_limit_s)
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            first = model.choice(lambda x: float(solver.BooleanValue(vs[x])))[0], int(round(solver.ObjectiveValue())) // scale
        log.debug("CP-SAT with %d groups fixed from the LP: %s", len(fixed), solver.StatusName(status))
    left = max(1.0, options.time_limit_s - (time.perf_counter() - t0)) if first else options.time_limit_s
    solver, vs, status, scale = _cp_sat(model, options, first[0] if first else rounded, [], left)
    wall = time.perf_counter() - t0
    name = solver.StatusName(status)
    log.debug("ILP %s: %d vars, %d constraints, %.3fs", name, size["variables"], size["constraints"], wall)
    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    if status == cp_model.INFEASIBLE and memory_budget is not None:
        raise MemoryBudgetError(memory_budget, *least_memory(graph, space, pricer, options))
    if not found and first is None:
        raise RuntimeError(f"the solver found no plan: status {name} after {wall:.1f}s")
    bound = -(-int(round(solver.BestObjectiveBound())) // scale) if found else (lp[0] if lp else 0)
    if found:
        choice = model.choice(lambda x: float(solver.BooleanValue(vs[x])))[0]
        objective = int(round(solver.ObjectiveValue())) // scale
    if first is not None and (not found or first[1] < objective):
        (choice, objective) = first
        bound = lp[0] if not found else bound
        name = "OPTIMAL" if objective <= bound else "FEASIBLE"
        return SolveResult(choice, name, objective, min(bound, objective), wall, "lp-dive" if dived else "lp-fix+cp-sat", **size)
    return SolveResult(choice, name, objective, min(bound, objective), wall, "cp-sat", **size)


def _cp_sat(model: _Model, options: SolverOptions, hint: dict[str, int] | None, fixed: list, time_limit_s: float) -> tuple:
    """CP-SAT on the whole program with `fixed` (choice variables, index)
    set, started from `hint` (a choice per group): (solver, variables,
    status, scale)."""
    scale = model.scale
    m, vs = model.p.cp_sat()
    obj = model.objective(scale)
    m.Minimize(cp_model.LinearExpr.WeightedSum([vs[v] for v in obj], list(obj.values())) + model.const_ns * scale)
    for xs, k in fixed:
        m.Add(vs[xs[k]] == 1)
    if hint is not None:
        hinted: set[int] = set()
        for name, k in hint.items():
            xs = model.x.get(name)
            if xs is not None and len(xs) > 1 and id(xs) not in hinted:
                hinted.add(id(xs))
                for j, x in enumerate(xs):
                    m.AddHint(vs[x], j == k)
    solver = _cp_solver(dataclasses.replace(options, time_limit_s=time_limit_s))
    return solver, vs, solver.Solve(m), scale


def _price(graph, space, pricer, choice, output_placements) -> tuple[int, int]:
    """(predicted time in ns, peak bytes per device) of one choice."""
    from planner.mesh import MeshSpec
    from planner.plan import evaluate

    shape = pricer.mesh_shape
    ev = evaluate(graph, space, pricer, MeshSpec(shape, tuple(f"d{i}" for i in range(len(shape)))), choice, output_placements)
    return to_ns(ev.compute_s + ev.comm_s), ev.peak_memory_bytes
