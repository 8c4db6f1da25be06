"""The planner at Llama-3-8B scale: a full-depth training step on an 8x8 mesh,
planned in one process on fake tensors, against torchtitan's FSDP+TP plan."""
from __future__ import annotations

import pytest
from conftest import example_path

from dtplan import load_model_file, plan_program
from dtplan.ir.modelfile import capture_model_file
from dtplan.planner.output.classic import placement_diff, torchtitan_pins
from dtplan.planner.mesh import parse_mesh, parse_size


@pytest.fixture(scope="module")
def llama8b_step():
    return capture_model_file(load_model_file(example_path("llama"), {"preset": "8b"}), train=True)


def test_8b_training_plan_beats_torchtitan_fsdp_tp_within_80gib(llama8b_step):
    c = llama8b_step
    assert sum(1 for n in c.graph if n.module.startswith("layers.31.")) > 0  # all 32 layers
    mesh = parse_mesh("dp=8,tp=8")
    budget = parse_size("80GiB")
    ours = plan_program(c, mesh=mesh, profile="h100", memory=budget)
    pins = torchtitan_pins(c, mesh)
    titan = plan_program(c, mesh=mesh, profile="h100", memory=budget, parameter_placements=pins)
    # torchtitan's layout as pinned: column-parallel q/k/v/w1/w3, row-parallel wo/w2 on tp, FSDP dim 0 on dp
    assert [str(p) for p in titan.parameters["layers.5.attention.wq.weight"]] == ["S(0)", "S(0)"]
    assert [str(p) for p in titan.parameters["layers.5.feed_forward.w2.weight"]] == ["S(0)", "S(1)"]
    # both fit; the planner's predicted step is no slower under the same cost model
    assert ours.cost.peak_memory_bytes <= budget and titan.cost.peak_memory_bytes <= budget
    assert ours.cost.total_s <= titan.cost.total_s
    assert ours.solver.layers_folded == 30
    # the differences name weights and mesh axes
    entry = {"name": "torchtitan FSDP+TP", "parameters": pins}
    rows = placement_diff(ours, entry)
    assert rows and all(r.axis in ("dp", "tp") for r in rows)
    assert any("layers." in r.pattern for r in rows)
