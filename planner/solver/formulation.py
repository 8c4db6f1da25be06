r"""The placement integer program, built once as a sparse 0-1 program
(`dtplan.planner.solver.program.Program`) and solved by the ladder in
`dtplan.planner.solver.ladder`.

Notation: nodes v are grouped — a tuple projection or a follower shares its
parent's choice, a folded layer's node its twin's — and each group g with
strategies S_g gets booleans

    x[g,s] ∈ {0,1},   Σ_s x[g,s] = 1                         (`add_choices`)

Edges u→v (u is input i of v). Let O_u be the distinct output placements of u
and R_vi the distinct placements v's strategies want for input i, with
z[u,o] = Σ_{s: out(u,s)=o} x[g_u,s] and y[v,i,r] = Σ_{t: in_i(v,t)=r} x[g_v,t].
Working on distinct placements rather than strategies keeps the edge variables
few. With edge booleans e[u,v,i,o,r], aggregated rows

    Σ_r e[o,r] = z[u,o],    Σ_o e[o,r] = y[v,i,r]              (`_link`)

(tighter than McCormick's three inequalities) make e the joint choice, and
the edge costs Σ c(o,r)·e[o,r], c the redistribution time. When one side has
a single placement the cost is linear in the other side's z or y. A value
several consumers read goes once to a hub placement h[u,p] (a group of its
own, `_add_hubs`), and the consumers read the hub.

Repeated structure is built once: compute terms, edge links and memory terms
are keyed by the choice variables and options they read, so the copies of a
folded layer (which share variables) add their cost to one term instead of
adding variables. The program's size then hardly grows with depth.

Memory (`_add_memory`): per device, the stored values (parameters, buffers,
constants, with their optimizer state) M = Σ_stored bytes(v,s)·x (one integer
variable), plus the activations live at each candidate peak t of the
schedule (`dtplan.planner.cost.memory.live_multisets`):

    M + Σ_{v live at t} bytes(v,s)·x ≤ budget

with one auxiliary variable per live value's bytes (so a row has a term per
value, not per strategy), sizes in units of 2⁻²⁰ of the budget (about a
millionth) rounded up, so a plan that fits in units fits in bytes. The peak
rows start out pending: the LP gets only those its solutions violate
(`PlacementProgram.add_violated`), CP-SAT all of them (`add_pending`). A row
defining an auxiliary variable enters the program with the first row that
reads the variable.

Objective: Σ compute(v,s)·x + Σ edge costs + output redistribution, in
integer nanoseconds (each term rounded on its own); for CP-SAT scaled and
given a tie-break below one nanosecond (`PlacementProgram.objective`).

The least memory any plan needs (`PlacementProgram.least_memory_model`, for
the error when no plan fits a budget) is a program of its own: the choices
and the same memory terms in bytes, minimising a peak variable that every
candidate peak bounds from below.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Mapping

import numpy as np
from ortools.sat.python import cp_model

from dtplan.ir.graph import Graph
from dtplan.planner.cost.device import to_ns
from dtplan.planner.cost.memory import live_multisets, stored_values
from dtplan.planner.cost.pricing import Pricer
from dtplan.planner.evaluate import HUB, OUTPUT, edges
from dtplan.planner.solver.program import ONE, Program
from dtplan.planner.space._dtensor import Placements
from dtplan.planner.space.strategies import StrategySpace, hub_name


class PlacementProgram:
    """The placement program for one graph (see the module docstring): its
    `program`, the choice variables `x` per group leader and hub, the
    objective's constant `const_ns`, and the pending peak rows."""

    def __init__(self, graph: Graph, space: StrategySpace, pricer: Pricer) -> None:
        self.graph, self.space, self.pricer = graph, space, pricer
        self.program = Program()
        self.group = {n.name: (space.nodes[n.name].follows or n.name) for n in graph}
        self.x: dict[str, list[int]] = {}
        self.const_ns = 0
        self._memo: dict[tuple, object] = {}
        self._interned: dict[object, int] = {}
        self._pair_memo: dict[tuple[int, int, int], int] = {}
        #: peak rows (terms ≤ budget) not yet in the program
        self.pending_rows: list[dict[int, int]] = []
        #: the budget in memory units (None without a budget)
        self.budget: int | None = None
        #: rows defining auxiliary variables (bytes of a value), added with
        #: the first row that reads the variable: bytes-sized coefficients
        #: in rows no peak needs slow the simplex down
        self.definitions: dict[int, dict[int, int]] = {}
        #: the peak rows in the program (indices into `program.rows`) and the
        #: stored-bytes variable: what a solve without the budget relaxes
        self.peak_rows: list[int] = []
        self.stored_var: int | None = None

    def build(self, output_placements, budget: int | None) -> None:
        """The whole program; with a budget, its peak rows pending."""
        self.add_choices()
        self._add_hubs()
        self._add_compute()
        self._add_edges(output_placements)
        if budget is not None:
            self._add_memory(budget)

    # ----------------------------------------------------------------- variables
    def add_choices(self) -> None:
        """One exactly-one group per group leader."""
        for n in self.graph:
            if self.group[n.name] == n.name:
                self.x[n.name] = self.program.one_of(f"x[n={n.name}", len(self.space.nodes[n.name].options))

    def xs(self, name: str) -> list[int]:
        return self.x[self.group[name]]

    def _add_hubs(self) -> None:
        """A value read by several consumers is redistributed once, to its hub
        placement, and each consumer reads the hub (see `dtplan.planner.reduce.hubs`)."""
        follows = self.space.hub_follows
        for u, cands in self.space.hubs.items():
            if u not in follows:
                self.x[hub_name(u)] = self.program.one_of(f"h[n={u}", len(cands))
        for u, twin in follows.items():
            self.x[hub_name(u)] = self.x[hub_name(twin)]

    def _term(self, coef: int, var: int) -> None:
        if coef == 0:
            return
        if var == ONE:
            self.const_ns += coef
        else:
            self.program.cost[var] += coef

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

        def link(label: str, meta, outs: dict, wants: dict, gradient: bool = False) -> None:
            slot = links.setdefault((meta, id(outs), id(wants), gradient), [label, meta, outs, wants, 0, gradient])
            slot[4] += 1

        walk = list(edges(self.graph, self.space))
        # reads first, then hubs, then outputs: the order the edge variables
        # are made in (`_link` runs over `links` in insertion order)
        for e in (e for e in walk if e.consumer not in (HUB, OUTPUT)):
            u, v, i = e.producer, e.consumer, e.index
            meta = self.graph[u].tensor_meta
            if self.group[u] == self.group[v]:  # same choice: cost on the diagonal
                key = (id(self.space.nodes[u].options), id(self.space.nodes[v].options), i, meta, id(self.xs(v)))
                slot = diagonal.setdefault(key, [u, v, i, 0])
                slot[3] += 1
                continue
            link(f"{u}->{v}:{i}", meta, self._source(u), self._by_placement(v, i))
        for e in (e for e in walk if e.consumer == HUB):
            u = e.producer
            link(f"{u}->hub", self.graph[u].tensor_meta, self._by_placement(u, None), self._hub_by_placement(u))
        # each output leaves in its placements; a gradient (its want is the
        # parameter's node name) leaves in whatever placement the parameter gets
        for e in (e for e in walk if e.consumer == OUTPUT):
            u, want = e.producer, output_placements[e.index]
            wants = self._by_placement(want, None) if isinstance(want, str) else {want: [ONE]}
            link(f"{u}->output", self.graph[u].tensor_meta, self._source(u), wants, isinstance(want, str))

        for u, v, i, count in diagonal.values():
            meta = self.graph[u].tensor_meta
            for k, s in enumerate(self.space.nodes[v].options):
                src = self.space.nodes[u].options[k].output
                self._term(count * to_ns(self.pricer.redistribute_s(meta, src, s.inputs[i])), self.xs(v)[k])
        for label, meta, outs, wants, count, gradient in links.values():
            self._link(label, meta, outs, wants, count, gradient)

    def _pair_costs(self, meta, outs: dict, wants: dict, gradient: bool = False) -> list[list[int]]:
        """Redistribution time (ns) from each output placement (rows, in
        `outs` order) to each wanted one (columns); a gradient's priced as
        it is bucketed (`Pricer.gradient_s`). Placements are interned
        to ints once per distinct set and everything after works on indices:
        hashing a placement tuple runs Python code per element, and a deep
        model asks for the same pairs over and over."""
        m = self._intern(("meta", meta, gradient))
        oids, rids = self._ids(outs), self._ids(wants)
        memo = self._pair_memo
        price = self.pricer.gradient_s if gradient else self.pricer.redistribute_s
        rows = []
        for o, oid in zip(outs, oids, strict=True):
            row = []
            for r, rid in zip(wants, rids, strict=True):
                key = (m, oid, rid)
                c = memo.get(key)
                if c is None:
                    c = memo[key] = to_ns(price(meta, o, r))
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

    def _link(self, label: str, meta, outs: dict, wants: dict, count: int, gradient: bool = False) -> None:
        cost = self._pair_costs(meta, outs, wants, gradient)
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
        e = [[self.program.var(("e", label, o, r)) for r in range(len(want_xs))] for o in range(len(out_xs))]
        for o, xs in enumerate(out_xs):
            self.program.row(_minus(dict.fromkeys(e[o], 1), xs), 0, 0)
        for r, xs in enumerate(want_xs):
            self.program.row(_minus({row[r]: 1 for row in e}, xs), 0, 0)
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
                v = self.program.var(f"bytes[{reps[k]}]", upper=max(b for _, b in t))
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
        peak rows wait in `pending_rows` (see the module docstring)."""
        # memory in units of 2⁻²⁰ of the budget: bytes-sized coefficients
        # beside 0-1 choices stall the dual simplex (measured on an
        # infeasible budget for the 8B Llama step)
        unit = max(1, budget >> 20)
        stored_terms, rows = self.memory_terms(unit)
        budget = budget // unit
        stored = self.stored_var = self.program.var("stored_bytes", upper=budget)
        self.definitions[stored] = _minus({stored: 1}, [], stored_terms)
        self.budget = budget
        self.pending_rows = [{**row, stored: row.get(stored, 0) + 1} for row in rows]

    # ----------------------------------------------------------------- lazy rows
    def add_violated(self, values: np.ndarray) -> int:
        """Move the pending peak rows that `values` (an LP solution) violates
        into the program, with the definitions they read; how many moved.
        `values` gets the auxiliary variables not yet defined in the program
        their defined values first (the LP left them free)."""
        if not self.pending_rows:
            return 0
        self._resolve_definitions(values)
        violated = [k for k, row in enumerate(self.pending_rows) if _activity(row, values) > self.budget * (1 + 1e-9) + 1]
        if not violated:
            return 0
        rows = [self.pending_rows[k] for k in violated]
        chosen = set(violated)
        self.pending_rows = [row for k, row in enumerate(self.pending_rows) if k not in chosen]
        self._add_rows(rows)
        return len(rows)

    def add_pending(self) -> None:
        """Every pending peak row and definition into the program (for
        CP-SAT); a no-op once done."""
        self._add_rows(self.pending_rows)
        self.pending_rows = []
        for d in list(self.definitions.values()):
            self.program.row(d, 0, 0)
        self.definitions.clear()

    def _add_rows(self, rows: list[dict[int, int]]) -> None:
        """Peak rows, each after the definitions it reads."""
        for row in rows:
            for v in row:
                d = self.definitions.pop(v, None)
                if d is not None:
                    self._add_definition(d)
            self.peak_rows.append(self.program.row(row, -(1 << 62), self.budget))

    def _add_definition(self, d: dict[int, int]) -> None:
        for v in d:
            inner = self.definitions.pop(v, None)
            if inner is not None:
                self._add_definition(inner)
        self.program.row(d, 0, 0)

    def _resolve_definitions(self, values: np.ndarray) -> None:
        for v, d in self.definitions.items():
            values[v] = -sum(c * (1.0 if x == ONE else values[x]) for x, c in d.items() if x != v)

    # ----------------------------------------------------------------- objective and answers
    def objective(self, scale: int) -> dict[int, int]:
        """The cost per variable in units of 1/scale ns, plus (when scale > 1)
        a tie-break worth less than 1 ns in total: among plans of equal
        predicted time prefer lower strategy indices (Replicate and low dims
        come first), which makes the optimum (nearly always) unique, so
        parallel search returns the same plan for the same inputs."""
        obj = {v: c * scale for v, c in self.program.cost.items()}
        if scale > 1:
            for xs in self.leaders():
                for k, x in enumerate(xs):
                    obj[x] = obj.get(x, 0) + k
        return obj

    def leaders(self) -> list[list[int]]:
        """The choice variables of each group with more than one strategy, once."""
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
        return 1 + sum(len(xs) - 1 for xs in self.leaders())

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

    def cp_sat(self, hint: Mapping[str, int] | None, fixed: list[tuple[list[int], int]]) -> tuple[cp_model.CpModel, list, int]:
        """The program as CP-SAT sees it: every row (call `add_pending`
        first), the scaled objective with its tie-break, the groups in
        `fixed` (choice variables, index) set, and a hint for every group
        with more than one strategy that `hint` (a choice per node or hub, as
        `choice` gives) names: (model, variables, scale)."""
        scale = self.scale
        m, vs = self.program.cp_sat()
        obj = self.objective(scale)
        m.Minimize(cp_model.LinearExpr.WeightedSum([vs[v] for v in obj], list(obj.values())) + self.const_ns * scale)
        for xs, k in fixed:
            m.Add(vs[xs[k]] == 1)
        if hint is not None:
            hinted: set[int] = set()
            for name, k in hint.items():
                xs = self.x.get(name)
                if xs is not None and len(xs) > 1 and id(xs) not in hinted:
                    hinted.add(id(xs))
                    for j, x in enumerate(xs):
                        m.AddHint(vs[x], j == k)
        return m, vs, scale

    @classmethod
    def least_memory_model(cls, graph: Graph, space: StrategySpace, pricer: Pricer) -> tuple[cp_model.CpModel, cp_model.IntVar]:
        """The CP-SAT model of the least per-device peak any plan reaches,
        in bytes: the choices, the stored and live memory terms, and a peak
        variable bounded below by every candidate peak (minimised); the model
        and the peak variable."""
        model = cls(graph, space, pricer)
        model.add_choices()
        stored_terms, rows = model.memory_terms()
        peak = model.program.var("peak_bytes", upper=1 << 50)
        for row in rows:
            terms = _minus({peak: 1}, [], {**stored_terms, **{x: stored_terms.get(x, 0) + c for x, c in row.items()}})
            model.program.row(terms, 0, 1 << 62)
        for d in model.definitions.values():
            model.program.row(d, 0, 0)
        m, vs = model.program.cp_sat()
        m.Minimize(vs[peak])
        return m, vs[peak]


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


def _activity(row: Mapping[int, int], values: np.ndarray) -> float:
    return sum(c * (1.0 if v == ONE else values[v]) for v, c in row.items())
