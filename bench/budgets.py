"""Benchmark: how long a binding memory budget makes the solve, beside the same
program without one, and the gap the answer is proven within.

    .venv/bin/python bench/budgets.py                 # the default rows
    .venv/bin/python bench/budgets.py --runs gpt:2x2:400KB

Each row captures one example's program once (inference, or the training step
for a `:train` row), then solves it twice in this process: without a budget and
under the row's budget. It prints both solve times (the integer program's build
and solve, `plan.stage_seconds`), their ratio, the method of the budgeted
solve (`planner/solver/ladder.py`), its predicted step against the unbudgeted
one, and its proven gap (objective against the best bound the ladder proved).
Issue 14's target for rows under a binding budget: at most 3x the unbudgeted
solve plus 2 s, at a gap of 1% or less.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: example:mesh:budget[:train]: the README's first command, the solver tests'
#: budgets, and training steps whose budgets bind
DEFAULT_RUNS = "gpt:2x2:400KB,mlp:4:16MiB,mlp:4:500000:train,gpt:2x2:1MB:train,llama:4:2MB:train"

#: the solver tests' model sizes (tests/test_solver.py)
OPTIONS = {("mlp", False): {"batch": "8", "d": "1024", "hidden": "4096"}, ("mlp", True): {"batch": "8", "d": "64", "hidden": "256"}}

#: the table's header line; `main` prints it and tests/test_bench_tables.py
#: compares it with the README's table
HEADER = f"{'example':>8} {'mesh':>5} {'budget':>8} {'train':>5} {'free s':>7} {'budget s':>8} {'ratio':>6} {'target s':>8} {'method':>14} {'free ms':>8} {'step ms':>8} {'gap':>7}"


def header(argv: Sequence[str] = ()) -> str:
    """The header line `main` prints for these arguments."""
    _parser().parse_args(list(argv))
    return HEADER


def _solve_s(plan) -> float:
    st = plan.stage_seconds
    return st["build"] + st["solve"]


def row(example: str, mesh: str, budget: str, train: bool, time_limit: float) -> str:
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    from dtplan import load_model_file, plan_program
    from dtplan.ir.modelfile import capture_model_file
    from dtplan.planner.solver import SolverOptions

    mf = load_model_file(ROOT / "examples" / f"{example}.py", OPTIONS.get((example, train), {}))
    captured = capture_model_file(mf, train=train)
    solver = SolverOptions(time_limit_s=time_limit)
    free = plan_program(captured, mesh=mesh, solver=solver)
    t = time.perf_counter()
    try:
        bound = plan_program(captured, mesh=mesh, memory=budget, solver=solver)
    except Exception as e:  # noqa: BLE001 - a row that fails prints its error
        return f"{example:>8} {mesh:>5} {budget:>8} {str(train):>5} failed after {time.perf_counter() - t:.1f} s: {type(e).__name__}: {e}"
    free_s, bound_s = _solve_s(free), _solve_s(bound)
    s = bound.solver
    return (
        f"{example:>8} {mesh:>5} {budget:>8} {str(train):>5} {free_s:7.2f} {bound_s:8.2f} {bound_s / free_s:6.1f} {3 * free_s + 2:8.2f} "
        f"{s.method:>14} {free.cost.total_s * 1e3:8.3f} {bound.cost.total_s * 1e3:8.3f} {s.gap:7.3%}"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated example:mesh:budget[:train]")
    p.add_argument("--time-limit", type=float, default=60.0, help="solver time limit, seconds")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    print(HEADER, flush=True)
    for run in args.runs.split(","):
        example, mesh, budget, *rest = run.split(":")
        print(row(example, mesh, budget, rest == ["train"], args.time_limit), flush=True)


if __name__ == "__main__":
    main()
