"""Meshes of three or more axes are planned with their outer axes merged, then
evaluated and lowered on the real axes."""
from __future__ import annotations

import pytest
from conftest import example_path

from dtplan import api
from dtplan import load_model_file, plan_program
from dtplan.ir.modelfile import capture_model_file
from dtplan.runtime.abstract import graph_collectives, lower_abstract
from dtplan.runtime.verify import expected_collectives
from dtplan.planner.space._dtensor import per_output


@pytest.fixture(scope="module")
def step():
    return capture_model_file(load_model_file(example_path("llama")), train=True)


def test_3d_training_plan_is_the_merged_axis_plan_widened_and_lowers_as_predicted(step):
    plan = plan_program(step, mesh="2x2x2", profile="h100", input_placements=["S(0)", "S(0)", "R"])
    assert plan.solver.planned_mesh == (4, 2)
    # every value has the same placement on both outer axes
    for name, n in plan.nodes.items():
        outs = per_output(n.output)
        for pl in outs:
            if pl is not None:
                assert pl[0] == pl[1], (name, pl)
    # the plan was evaluated on the real mesh: a reduction over the merged
    # axis is one per outer axis
    axes = {c.axis for c in plan.collectives}
    assert axes <= {"d0", "d1", "d2"} and {"d0", "d1"} <= axes
    # what rank 5 runs issues exactly the plan's collectives, on the 3-D mesh
    gm = lower_abstract(step, plan, rank=5)
    assert graph_collectives(gm) == expected_collectives(plan)


def test_3d_plan_costs_what_the_same_plan_costs_on_the_merged_mesh(step, monkeypatch):
    wide = plan_program(step, mesh="2x2x2", profile="h100")
    # the merged program prices gradients unbucketed (a reduction over the
    # merged axis is two after widening): so does the flat one here
    monkeypatch.setattr(api, "_bucket_bytes", lambda captured: 0)
    flat = plan_program(step, mesh="4x2", profile="h100")
    # same placements, priced on two outer axes instead of one: compute equal,
    # communication from the same bytes over the real axes' links
    assert wide.cost.compute_s == pytest.approx(flat.cost.compute_s, rel=1e-9)
    assert wide.solver.objective == flat.solver.objective


def test_placements_that_differ_on_the_outer_axes_need_coarsen_off(step):
    with pytest.raises(ValueError, match="coarsen=False"):
        plan_program(step, mesh="2x2x2", input_placements=["S(0)", "R", "R"])
