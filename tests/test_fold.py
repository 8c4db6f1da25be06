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
    # layers 2 and 3 follow layer 1 (the first layer reads the embedding)
    assert folded.solver.layers_folded == 2 and unfolded.solver.layers_folded == 0
    assert folded.solver.variables < 0.8 * unfolded.solver.variables
    assert folded.cost.total_s == pytest.approx(unfolded.cost.total_s, rel=1e-3)
    # the folded layers got their template's placements
    for w in ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2"):
        assert len({tuple(map(str, folded.parameters[f"layers.{k}.{w}.weight"])) for k in range(1, 4)}) == 1


def test_folded_training_step_costs_what_the_unfolded_one_costs():
    """The joint forward+backward graph of a 4-layer Llama folds too: layers 2
    and 3 (forward and backward ops) follow layer 1, at the same objective."""
    from dtplan import load_model_file
    from dtplan.ir.modelfile import capture_model_file
    from conftest import example_path

    c = capture_model_file(load_model_file(example_path("llama"), {"layers": "4"}), train=True)
    kwargs = dict(mesh="2x2", profile="h100")
    folded = plan_program(c, fold=True, **kwargs)
    unfolded = plan_program(c, fold=False, **kwargs)
    assert folded.solver.layers_folded == 2
    assert folded.solver.nodes_folded > 100
    assert folded.solver.variables < 0.8 * unfolded.solver.variables
    assert folded.solver.objective == pytest.approx(unfolded.solver.objective, rel=1e-3)
