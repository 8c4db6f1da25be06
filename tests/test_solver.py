"""The solve ladder (`dtplan.planner.solver.ladder`), one test per step: each
test picks a small program and a budget (or a solver option) for which that
step is the one whose plan `solve` returns, checks the plan fits the budget,
that its objective is what `evaluate` prices, and compares it with CP-SAT
alone (which proves its answer optimal on these programs)."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import captured_example, example_path

import dtplan.api
from dtplan import load_model_file, plan_program
from dtplan.ir import capture_training, fake_build
from dtplan.planner.cost.device import to_ns
from dtplan.planner.evaluate import evaluate
from dtplan.planner.mesh import MeshSpec
from dtplan.planner.solver import SolverOptions, solve
from dtplan.planner.solver.ladder import LADDER, SolveState, cp_sat, lp_branch, lp_dive, lp_fix_cp_sat, lp_lagrange, lp_relaxation, lp_rounding


#: two bias-free linears on 4 devices: 75 variables under a budget. Its least
#: memory per device is 8454144 bytes, its cheapest plan without a budget
#: (1015894 ns) peaks at 33619968 bytes.
MLP = {"batch": 8, "d": 1024, "hidden": 4096}


#: the ladder without `lp_lagrange`, which proves most of these budgets
#: first: the steps after it, as they run where it proves nothing
WITHOUT_LAGRANGE = tuple(step for step in LADDER if step is not lp_lagrange)


class _Recorded(Exception):
    pass


@pytest.fixture
def solve_inputs(monkeypatch):
    """The arguments `plan_program` gives `solve` (graph, space, pricer,
    output placements), without solving."""

    def inputs(captured, **plan_kwargs) -> dict:
        seen: dict = {}

        def record(graph, space, pricer, *, output_placements, **_):
            seen.update(graph=graph, space=space, pricer=pricer, output_placements=output_placements)
            raise _Recorded

        with monkeypatch.context() as m:
            m.setattr(dtplan.api, "solve", record)
            with pytest.raises(_Recorded):
                plan_program(captured, **plan_kwargs)
        return seen

    return inputs


def training_mlp():
    """The MLP example's training step (joint graph, AdamW state)."""
    mf = load_model_file(example_path("mlp"), {"batch": "8", "d": "64", "hidden": "256"})
    return capture_training(*fake_build(lambda: mf.build(train=True)), mf.loss_fn)


def priced(inputs: dict, choice) -> tuple[float, int, int]:
    """(predicted time in ns, unrounded; peak bytes per device; priced items)
    of a choice, by `evaluate`."""
    shape = inputs["pricer"].mesh_shape
    mesh = MeshSpec(shape, tuple(f"d{i}" for i in range(len(shape))))
    ev = evaluate(inputs["graph"], inputs["space"], inputs["pricer"], mesh, choice, inputs["output_placements"])
    return (ev.compute_s + ev.comm_s) * 1e9, ev.peak_memory_bytes, len(ev.nodes) + len(ev.collectives)


def check_plan(inputs: dict, result, budget: int, *, exact: bool) -> None:
    """The plan fits `budget` and its objective is what `evaluate` prices:
    exactly for steps that price their plan with it (rounding, diving),
    else up to the rounding of each of the program's terms to whole ns."""
    ns, peak, terms = priced(inputs, result.choice)
    assert peak <= budget
    if exact:
        assert result.objective_ns == to_ns(ns / 1e9)
    else:
        assert abs(result.objective_ns - ns) <= terms / 2
    assert result.bound_ns <= result.objective_ns


def optimum(inputs: dict, budget: int) -> int:
    """CP-SAT alone over the whole program: the optimal objective."""
    r = solve(**inputs, memory_budget=budget, steps=(cp_sat,))
    assert (r.method, r.status) == ("cp-sat", "OPTIMAL")
    return r.objective_ns


def test_lp_relaxation_step_integral_lp_under_a_binding_budget(solve_inputs):
    """At the least memory the budget binds, yet the LP (with its lazily
    added peak rows) is integral: its optimum is the integer optimum."""
    inputs = solve_inputs(captured_example("mlp", **MLP), mesh="4")
    budget = 8454144
    state = SolveState.start(**inputs, memory_budget=budget, options=SolverOptions())
    assert len(state.model.pending_rows) == 3
    step = lp_relaxation(state)
    # the LP's first solution broke all three peak rows: they (and the six
    # rows defining the bytes they read) were added, and the LP re-solved
    assert state.model.pending_rows == [] and state.model.program.size["constraints"] == state.built["constraints"] + 9
    r = solve(**inputs, memory_budget=budget)
    assert r == dataclasses.replace(step, wall_s=r.wall_s, build_s=r.build_s)
    assert (r.method, r.status) == ("lp-relaxation", "OPTIMAL")
    assert r.objective_ns == r.bound_ns == 1178182
    check_plan(inputs, r, budget, exact=False)
    assert r.objective_ns == optimum(inputs, budget)


def test_lp_rounding_step_rounded_lp_within_the_gap(solve_inputs):
    """A little above the least memory the LP is fractional; rounded per
    group it fits and is 0.28% above the LP bound (within 1%)."""
    inputs = solve_inputs(captured_example("mlp", **MLP), mesh="4")
    budget = 8957460
    r = solve(**inputs, memory_budget=budget)
    assert (r.method, r.status) == ("lp-rounding", "FEASIBLE")
    assert (r.objective_ns, r.bound_ns) == (1178182, 1174936)
    assert r.gap == pytest.approx(0.00276, abs=1e-5)
    check_plan(inputs, r, budget, exact=True)
    assert r.objective_ns == optimum(inputs, budget)


def test_lp_dive_step_dived_plan_within_the_gap(solve_inputs):
    """At 26070220 bytes the rounded LP (1015894 ns) does not fit; diving's
    plan fits and is 10.6% above the LP bound, which a 15% gap accepts. It
    is the optimum here (diving a quarter of the groups at a time, as it
    once did, gave 1191290 ns); the bound does not show it."""
    inputs = solve_inputs(captured_example("mlp", **MLP), mesh="4")
    budget = 26070220
    r = solve(**inputs, memory_budget=budget, options=SolverOptions(rounding_gap=0.15), steps=WITHOUT_LAGRANGE)
    assert (r.method, r.status) == ("lp-dive", "FEASIBLE")
    assert (r.objective_ns, r.bound_ns) == (1178182, 1064581)
    check_plan(inputs, r, budget, exact=True)
    assert optimum(inputs, budget) == 1178182
    # with the default 1% gap branching proves diving's plan optimal
    full = solve(**inputs, memory_budget=budget, steps=WITHOUT_LAGRANGE)
    assert (full.method, full.status, full.objective_ns, full.bound_ns) == ("lp-branch", "OPTIMAL", 1178182, 1178182)
    # the whole ladder: the Lagrangian step proves the same plan within 1%
    lagrange = solve(**inputs, memory_budget=budget)
    assert (lagrange.method, lagrange.objective_ns) == ("lp-lagrange", 1178182) and lagrange.gap <= 0.01


def test_lp_branch_step_proves_a_plan_the_lp_bound_cannot(solve_inputs):
    """The training step at 500000 bytes: the LP bound (67368 ns) is far
    under every plan, diving's plan is 205809 ns; branch and bound finds
    CP-SAT's optimum and proves it."""
    inputs = solve_inputs(training_mlp(), mesh="4")
    budget = 500000
    dived = solve(**inputs, memory_budget=budget, steps=(lp_relaxation, lp_rounding, lp_dive))
    assert (dived.method, dived.objective_ns, dived.bound_ns) == ("lp-dive", 205809, 67368)
    r = solve(**inputs, memory_budget=budget, steps=WITHOUT_LAGRANGE)
    assert (r.method, r.status) == ("lp-branch", "OPTIMAL")
    assert r.objective_ns == r.bound_ns == 179032
    check_plan(inputs, r, budget, exact=True)
    assert r.objective_ns == optimum(inputs, budget)
    assert LADDER.index(lp_branch) == LADDER.index(lp_dive) + 1


def test_lp_lagrange_step_proves_within_the_gap_on_part_of_the_program(solve_inputs):
    """The training step at 500000 bytes again, with the whole ladder: the
    plan the LP gives at a memory price a hair above its duals fits; the
    program cut to the columns whose reduced cost leaves room for a plan
    within 1% of it proves CP-SAT's optimum within 1%, without the rest of
    the ladder."""
    inputs = solve_inputs(training_mlp(), mesh="4")
    budget = 500000
    assert LADDER.index(lp_lagrange) == LADDER.index(lp_rounding) + 1
    r = solve(**inputs, memory_budget=budget)
    assert (r.method, r.objective_ns) == ("lp-lagrange", 179032)
    # the bound: what no plan outside the cut program beats, 0.999% under it
    assert r.bound_ns == 177243 and r.gap <= 0.01
    check_plan(inputs, r, budget, exact=True)
    assert r.objective_ns == optimum(inputs, budget)
    # the Lagrangian step alone after the LP: the same answer
    alone = solve(**inputs, memory_budget=budget, steps=(lp_relaxation, lp_lagrange))
    assert (alone.method, alone.objective_ns, alone.bound_ns) == ("lp-lagrange", 179032, 177243)


def test_lp_lagrange_step_proves_the_readme_budget(solve_inputs):
    """The README's first command (examples/gpt.py on 2x2 under 400KB):
    the LP optimum takes 0.366 of "shard block 0's attention on axis 1" to
    sit on the budget, 5.6% under every plan. The plan above the price
    shards all of it; the proof runs on 3.9k of the program's 17.6k
    columns."""
    inputs = solve_inputs(captured_example("gpt"), mesh="2x2")
    budget = 400_000
    r = solve(**inputs, memory_budget=budget)
    assert (r.method, r.objective_ns) == ("lp-lagrange", 491052)
    assert r.gap <= 0.01 and r.bound_ns >= 486146
    check_plan(inputs, r, budget, exact=True)
    assert r.state.lp.bound == 463560


def test_lp_fix_cp_sat_step_searches_what_the_lp_left_fractional(solve_inputs):
    """The same program when no step before found a plan (here: the ladder
    without diving and branching): CP-SAT searches with the groups the LP
    decided fixed. Its plan is what `solve` returns when the whole-program
    search after it finds none in the time left (here: the ladder without
    that last rung); on this program it is the optimum."""
    inputs = solve_inputs(training_mlp(), mesh="4")
    budget = 500000
    assert LADDER[-2:] == (lp_fix_cp_sat, cp_sat)
    r = solve(**inputs, memory_budget=budget, steps=(lp_relaxation, lp_rounding, lp_fix_cp_sat))
    assert (r.method, r.status) == ("lp-fix+cp-sat", "FEASIBLE")
    assert (r.objective_ns, r.bound_ns) == (179032, 67368)  # the bound is the LP's
    check_plan(inputs, r, budget, exact=False)
    assert r.objective_ns == optimum(inputs, budget)
    # then CP-SAT over the whole program, started from that plan, proves it
    # optimal and returns its own (equally cheap) plan
    full = solve(**inputs, memory_budget=budget, steps=(lp_relaxation, lp_rounding, lp_fix_cp_sat, cp_sat))
    assert (full.method, full.status, full.objective_ns, full.bound_ns) == ("cp-sat", "OPTIMAL", 179032, 179032)


def test_cp_sat_step_whole_program_from_the_dived_plan(solve_inputs):
    """Under 16 MiB the rounded LP fits but is 4.6% above the LP bound, and
    diving's plan is the same: CP-SAT over the whole program, started from
    it, proves it optimal (here: the ladder without branching and the
    Lagrangian step, which prove it within 1% too)."""
    inputs = solve_inputs(captured_example("mlp", **MLP), mesh="4")
    budget = 16 * 2**20
    r = solve(**inputs, memory_budget=budget, steps=tuple(s for s in WITHOUT_LAGRANGE if s is not lp_branch))
    assert (r.method, r.status) == ("cp-sat", "OPTIMAL")
    assert r.objective_ns == r.bound_ns == 1178182
    check_plan(inputs, r, budget, exact=False)
    assert r.objective_ns == optimum(inputs, budget)
    assert solve(**inputs, memory_budget=budget, steps=WITHOUT_LAGRANGE).method == "lp-branch"
    full = solve(**inputs, memory_budget=budget)
    assert (full.method, full.objective_ns) == ("lp-lagrange", 1178182) and full.gap <= 0.01


def test_a_solve_a_time_limit_stopped_says_which_step_it_stopped(solve_inputs, monkeypatch, capsys):
    """The README's budget, with branch and bound stopped at its time limit
    as HiGHS reports it (emulated: on a loaded machine the real one may or
    may not be): the result, the plan file and the summary name the step,
    since another machine may then plan differently. Unstopped, none."""
    from dtplan import cli
    from dtplan.planner.output.plan import Plan
    from dtplan.planner.solver import ladder

    inputs = solve_inputs(captured_example("gpt"), mesh="2x2")
    assert solve(**inputs, memory_budget=400_000).time_limited == ()
    monkeypatch.setattr(ladder._Frozen, "branch", lambda *a, **k: ladder._Sub(None, float("-inf"), ladder.TIME_LIMIT))
    r = solve(**inputs, memory_budget=400_000)
    assert "lp-lagrange" in r.time_limited and r.method != "lp-lagrange"
    plan = plan_program(captured_example("gpt"), mesh="2x2", memory=400_000, compare=False)
    assert "lp-lagrange" in plan.solver.time_limited
    assert Plan.from_json(plan.to_json()).solver.time_limited == plan.solver.time_limited
    cli._print_summary(plan, None)
    assert "time limit       stopped lp-lagrange" in capsys.readouterr().out



def test_the_same_program_gets_the_same_plan_however_fast_the_clock_runs(solve_inputs, monkeypatch):
    """Planning is reproducible: every step stops on a work budget (branch
    and bound's nodes, diving's simplex iterations, CP-SAT's deterministic
    time), the wall clock being only a safety net. The README's budget (the
    Lagrangian step's two searches), and the MLP's training step under
    500000 bytes down the rungs after it (diving, branch and bound, CP-SAT
    over the groups the LP left and over the whole program), planned once as
    they are and once as on a machine that gets loaded once the LP is
    solved: the solver's clock runs 20 times faster than real time from
    then on (under a time limit whose safety nets it stays below). The same
    plans, and no step reports a time limit. (Under the clock rules this
    replaced, the Lagrangian step got a few times the LP's wall time, at
    least 2 s: on this clock its proof stopped at once, reported, and the
    plan came from branch and bound.) Every CP-SAT search runs the deterministic
    interleaved search, with a work budget and a fixed seed."""
    import time
    import types

    from dtplan.planner.solver import ladder

    options = SolverOptions(time_limit_s=600)
    gpt = captured_example("gpt")
    mlp = solve_inputs(training_mlp(), mesh="4")
    rungs = [WITHOUT_LAGRANGE, (lp_relaxation, lp_rounding, lp_fix_cp_sat, cp_sat)]

    def plan_all():
        plan = plan_program(gpt, mesh="2x2", memory=400_000, compare=False, solver=options)
        results = [solve(**mlp, memory_budget=500000, options=options, steps=steps) for steps in rungs]
        return plan, results

    solvers = []
    cp_solver = ladder._cp_solver
    monkeypatch.setattr(ladder, "_cp_solver", lambda *a, **k: solvers.append(cp_solver(*a, **k)) or solvers[-1])
    plan, results = plan_all()

    # the clock: real time until an LP relaxation is solved, 20 times real time after
    real = time.perf_counter
    clock = {"at": real(), "reads": real(), "speed": 1}

    def now() -> float:
        return clock["reads"] + clock["speed"] * (real() - clock["at"])

    def speed(k: int) -> None:
        clock.update(reads=now(), at=real(), speed=k)

    def loaded_after(lp):
        def solved(*args, **kwargs):
            speed(1)
            try:
                return lp(*args, **kwargs)
            finally:
                speed(20)

        return solved

    monkeypatch.setattr(ladder, "time", types.SimpleNamespace(perf_counter=now))
    monkeypatch.setattr(ladder, "_lp", loaded_after(ladder._lp))
    fast_plan, fast_results = plan_all()

    assert plan.solver.method == fast_plan.solver.method == "lp-lagrange"
    assert plan.to_json()["nodes"] == fast_plan.to_json()["nodes"]
    assert (plan.solver.objective, plan.solver.bound) == (fast_plan.solver.objective, fast_plan.solver.bound)
    assert [r.method for r in results] == [r.method for r in fast_results] == ["lp-branch", "cp-sat"]
    for r, fast in zip(results, fast_results, strict=True):
        assert (r.choice, r.objective_ns, r.bound_ns) == (fast.choice, fast.objective_ns, fast.bound_ns)
    assert plan.solver.time_limited == fast_plan.solver.time_limited == ()
    assert all(r.time_limited == () for r in results + fast_results)
    # both CP-SAT rungs ran, in each pass; every search deterministic
    assert len(solvers) == 4
    for solver in solvers:
        p = solver.parameters
        assert p.interleave_search and p.num_workers == options.workers and p.random_seed == options.seed
        assert p.max_deterministic_time == ladder.CP_SAT_DETERMINISTIC_TIME < float("inf")
