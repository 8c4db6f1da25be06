"""A sparse 0-1 program and its emitters: HiGHS (the LP relaxation, as
row-wise arrays) and CP-SAT (the integer program, with readable names).

The container knows nothing about placements; `formulation` fills it."""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Mapping

import highspy
import numpy as np
from ortools.sat.python import cp_model

#: the constant 1 in a list of choice variables (a group with one strategy)
ONE = -1

#: the LP's first solve presolves programs of at least this many variables
#: (`Program.highs`)
LP_PRESOLVE_MIN_VARIABLES = 30_000

#: one row: (variable indices, coefficients, lower bound, upper bound)
Row = tuple[list[int], list[int], int, int]


class Program:
    """A sparse program over variables 0..n-1 with bounds [0, upper]: rows
    lo ≤ Σ coef·var ≤ hi, exactly-one groups, an objective. Emitted to HiGHS
    (relaxed) or CP-SAT (integer) without per-term Python objects."""

    def __init__(self) -> None:
        self.names: list[str | tuple] = []
        self.upper: list[int] = []
        self.rows: list[Row] = []
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
        """Add lo ≤ Σ terms ≤ hi (a term on `ONE` moves into the bounds);
        the row's index."""
        const = terms.get(ONE, 0)
        idx = [v for v, c in terms.items() if c and v != ONE]
        self.rows.append((idx, [terms[v] for v in idx], lo - const, hi - const))
        return len(self.rows) - 1

    @property
    def size(self) -> dict[str, int]:
        return {"variables": len(self.names), "constraints": len(self.rows) + len(self.groups)}

    def highs(self, cost: Mapping[int, int], time_limit_s: float) -> highspy.Highs:
        """The LP relaxation with objective `cost`, passed whole to HiGHS."""
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
        h = new_highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", float(time_limit_s))
        # presolve for the first solve of a large program (`_solve_lazily`
        # turns it off for the re-solves, which start from the last basis):
        # it costs about 1 s on bench/compile_llama.py's 8B rows, and saves
        # 50 s on HF's 8B Llama under 80 GiB (bench/llama_families.py), whose
        # dual simplex without it ran 48k iterations in 60 s, against 36k in
        # 10 s with it; on examples/gpt.py's program under the README's
        # budget (17.6k variables) it took the first solve from 0.03 s to 0.17 s
        h.setOptionValue("presolve", "on" if n >= LP_PRESOLVE_MIN_VARIABLES else "off")
        h.passModel(lp)
        return h

    def cp_sat(self) -> tuple[cp_model.CpModel, list]:
        """Every row and group as a CP-SAT model, and its variables by index."""
        m = cp_model.CpModel()
        names = [n if isinstance(n, str) else f"e[{n[1]},o={n[2]},r={n[3]}]" for n in self.names]
        vs = [m.NewBoolVar(name) if up == 1 else m.NewIntVar(0, up, name) for name, up in zip(names, self.upper, strict=True)]
        for g in self.groups:
            m.AddExactlyOne(vs[i] for i in g)
        for idx, coef, lo, hi in self.rows:
            m.AddLinearConstraint(cp_model.LinearExpr.WeightedSum([vs[i] for i in idx], coef), lo, hi)
        return m, vs


def add_highs_rows(h: highspy.Highs, rows: list[Row]) -> None:
    """Append rows to a HiGHS model already passed (the lazy peak rows)."""
    starts, index, value, lo, hi = _csr(rows)
    h.addRows(len(rows), lo, hi, len(index), starts, index, value)


def new_highs() -> highspy.Highs:
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


def _csr(rows: list[Row]) -> tuple[np.ndarray, ...]:
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
        highs_bounds(lo), highs_bounds(hi),
    )


def highs_bounds(bounds) -> np.ndarray:
    """Row bounds for HiGHS: the program's stand-ins for no bound (±2⁶²,
    which CP-SAT needs as integers) as infinities. A finite 5e18 beside
    coefficients near 1 is a badly scaled row to HiGHS: its presolve warns and
    branch and bound keeps the row."""
    b = np.asarray(bounds, dtype=float)
    return np.where(b >= 2.0**60, highspy.kHighsInf, np.where(b <= -(2.0**60), -highspy.kHighsInf, b))
