"""The integer program choosing one strategy per node: the sparse program and
its emitters (`program`), the placement formulation (`formulation`, the
program written out in its docstring) and the solve ladder (`ladder`)."""
from dtplan.planner.solver.ladder import MemoryBudgetError, SolveResult, SolverOptions, least_memory, solve, solve_pinned

__all__ = ["MemoryBudgetError", "SolveResult", "SolverOptions", "least_memory", "solve", "solve_pinned"]
