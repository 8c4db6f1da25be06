"""dtplan planner: strategies, cost model, integer program, plan and report."""
