"""The step with communication overlapped, predicted (`dtplan.planner.cost.overlap`):
hand-simulated schedules, and a plan's figures against its serial cost."""
from __future__ import annotations

import pytest
from conftest import example_path

from dtplan.planner.cost.overlap import simulate


def test_a_gather_issued_at_the_start_hides_under_the_compute_before_its_reader():
    # p is a parameter (ready at once); its gather (1.5 s) is read by c
    order = ["p", "a", "b", "c"]
    got = simulate(order, {"a": 1.0, "b": 1.0, "c": 1.0}, [("all_gather", "p", 3, 1.5)])
    assert (got.step_s, got.compute_s, got.comm_s, got.exposed_s, got.hidden_s) == (3.0, 3.0, 1.5, 0.0, 1.5)


def test_one_group_ahead_at_most_and_the_rest_exposed():
    # X (read by b) and Y (read by d) are separate groups: Y may issue only
    # once compute reaches X's spot (b, at t=1), runs 1 -> 4, and d waits 1 s
    order = ["p1", "p2", "a", "b", "c", "d"]
    compute = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    got = simulate(order, compute, [("all_gather", "p1", 3, 0.5), ("all_gather", "p2", 5, 3.0)])
    assert (got.step_s, got.exposed_s) == (5.0, 1.0)
    # without the bound Y would have started at 0.5 and ended at 3.5: the bound costs 0.5 s + 0.5 s
    assert simulate(order, compute, [("all_gather", "p2", 5, 3.0)]).step_s == 4.0  # alone: issued at once, done at 3


def test_a_collective_waits_for_its_producer_and_the_stream_is_serial():
    # g's reduce-scatter starts when g is computed (t=2) and ends at 4; the
    # graph output waits for it: 2 s exposed. A second one queues behind it.
    order = ["a", "g", "b"]
    got = simulate(order, {"a": 1.0, "g": 1.0, "b": 1.0}, [("reduce_scatter", "g", 3, 2.0), ("all_reduce", "g", 3, 1.0)])
    assert (got.step_s, got.exposed_s) == (5.0, 2.0)


def test_slowdown_charges_a_fraction_of_the_hidden_time():
    got = simulate(["p", "a", "b", "c"], {"a": 1.0, "b": 1.0, "c": 1.0}, [("all_gather", "p", 3, 1.5)], slowdown=0.1)
    assert got.step_s == pytest.approx(3.15)


def test_never_more_than_serial():
    # everything exposed: a collective read right after its producer, nothing to hide under
    got = simulate(["a", "b"], {"a": 1.0, "b": 1.0}, [("all_reduce", "a", 1, 2.0)], slowdown=0.5)
    assert got.step_s == 4.0 and got.exposed_s == 2.0


def test_a_plans_overlapped_step_lies_between_its_compute_and_its_serial_step():
    from dtplan import load_model_file, plan_program
    from dtplan.ir.modelfile import capture_model_file
    from dtplan.planner.mesh import parse_mesh
    from dtplan.planner.output.classic import classic_pins

    mf = load_model_file(example_path("gpt"), {"batch": "16", "seq": "128", "dim": "256"})
    captured = capture_model_file(mf, train=True)
    mesh = parse_mesh("4")
    plan = plan_program(captured, mesh=mesh, profile="cpu", parameter_placements=classic_pins(captured, mesh)["FSDP"], input_placements=["S(0)"])
    c = plan.cost
    assert c.compute_s < c.overlapped_s < c.total_s  # FSDP's gathers hide in part
    assert 0 < c.exposed_comm_s < c.comm_s
    again = type(plan).from_json(plan.to_json())
    assert (again.cost.overlapped_s, again.cost.exposed_comm_s) == (c.overlapped_s, c.exposed_comm_s)


def test_skew_delays_each_collective_by_a_fraction_of_the_compute_since_the_last():
    # X issued at once (no compute before it: no drift); Y's gate is X's spot
    # (t=1, 1 s of compute since X): it starts 0.5 s late and d waits 1.5 s
    order = ["p1", "p2", "a", "b", "c", "d"]
    compute = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    got = simulate(order, compute, [("all_gather", "p1", 3, 0.5), ("all_gather", "p2", 5, 3.0)], skew=0.5)
    assert (got.step_s, got.exposed_s) == (5.5, 1.5)


def test_not_sharding_wins_where_the_profile_charges_what_the_integer_program_cannot_see(tmp_path):
    """A profile whose ranks drift far apart between collectives: the solver's
    data-parallel plan predicts slower overlapped than every op replicated,
    which the planner then returns (and it lowers)."""
    import json

    from dtplan import load_model_file, plan_program
    from dtplan.ir.modelfile import capture_model_file
    from dtplan.planner.cost.device import load_profile
    from dtplan.runtime.abstract import lower_abstract

    captured = capture_model_file(load_model_file(example_path("mlp"), {"batch": "64"}), train=True)
    calm = plan_program(captured, mesh="2", input_placements=["S(0)"])
    assert "replicated" not in calm.solver.method and any(c.kind == "all_reduce" for c in calm.collectives)
    drifting = tmp_path / "drift.json"
    drifting.write_text(json.dumps({**load_profile("cpu").to_json(), "rank_skew": 50.0}))
    plan = plan_program(captured, mesh="2", input_placements=["S(0)"], profile=str(drifting))
    assert "every op replicated" in plan.solver.method
    assert [c.kind for c in plan.collectives] == ["all_gather"]  # the input, gathered once
    assert all(all(p.is_replicate() for p in n.output) for name, n in plan.nodes.items() if n.op != "placeholder" and not isinstance(n.output[0], tuple))
    sharded = plan_program(captured, mesh="2", input_placements=["S(0)"], profile=str(drifting), parameter_placements={"fc1.weight": ["S(0)"]})
    assert plan.cost.overlapped_s < sharded.cost.overlapped_s
    lower_abstract(captured, plan, rank=1)


def test_the_data_parallel_layout_wins_where_it_simulates_faster_under_a_calibrated_profile():
    """A profile `dtplan calibrate` wrote on this 2-core VM (tests/data,
    2026-11-28: rank skew and overlap slowdown measured): cnn's training step
    on mesh 2. The integer program's plan simulates slower overlapped than
    the data-parallel layout (every parameter replicated, gradients reduced
    in buckets under backward), which the planner then returns."""
    from pathlib import Path

    from dtplan import load_model_file, plan_program
    from dtplan.ir.modelfile import capture_model_file
    from dtplan.runtime.abstract import lower_abstract

    profile = str(Path(__file__).parent / "data" / "calibrated_vm.json")
    captured = capture_model_file(load_model_file(example_path("cnn"), {"batch": "32", "size": "32"}), train=True)
    plan = plan_program(captured, mesh="2", input_placements=["S(0)"], profile=profile)
    assert "data-parallel layout (faster overlapped than" in plan.solver.method
    assert all(p.is_replicate() for pl in plan.parameters.values() for p in pl)
    pinned = plan_program(captured, mesh="2", input_placements=["S(0)"], profile=profile, parameter_placements={f: ["R"] for f in plan.parameters})
    assert plan.cost.overlapped_s == pinned.cost.overlapped_s
    fsdp = plan_program(captured, mesh="2", input_placements=["S(0)"], profile=profile, parameter_placements={"conv2.weight": ["S(0)"]})
    assert plan.cost.overlapped_s <= fsdp.cost.overlapped_s
    assert all(c.bucket is not None for c in plan.collectives if c.node == "output" and c.kind == "all_reduce" and c.bytes > 4)
    lower_abstract(captured, plan, rank=1)
