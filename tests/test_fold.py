"""Repeated layers share their choices: same plan cost, a smaller program."""
from __future__ import annotations

import pytest
from conftest import captured_example

from dtplan import plan_program


@pytest.mark.parametrize(
    "mesh, memory",
    [("2x4", None), ("4", "600KB")],
)
def test_folded_plan_costs_what_the_unfolded_plan_costs(mesh, memory):
    c = captured_example("llama", layers=4)
    folded = plan_program(c, mesh=mesh, memory=memory, profile="h100", fold=True)
    unfolded = plan_program(c, mesh=mesh, memory=memory, profile="h100", fold=False)
    assert folded.solver["layers_folded"] == 3 and unfolded.solver["layers_folded"] == 0
    assert folded.solver["variables"] < 0.6 * unfolded.solver["variables"]
    assert folded.cost["total_s"] == pytest.approx(unfolded.cost["total_s"], rel=1e-3)
    # every layer got the first layer's placements
    for w in ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2"):
        assert len({tuple(map(str, folded.parameters[f"layers.{k}.{w}.weight"])) for k in range(4)}) == 1
