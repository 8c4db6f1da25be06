"""The classic plans under the same cost model: which apply, and that the
planner's plan is never worse than one that fits the budget."""
from __future__ import annotations

import pytest
from conftest import captured_example, plan_example

from planner.classic import classic_pins
from planner.mesh import parse_mesh


def test_classic_layouts_for_a_transformer():
    pins = classic_pins(captured_example("gpt"), parse_mesh("2x2"))
    assert set(pins) == {"data parallel", "FSDP", "tensor parallel", "FSDP + TP"}
    tp = pins["tensor parallel"]
    assert tp["blocks.0.attn.q.weight"] == ["R", "S(0)"] and tp["blocks.0.attn.o.weight"] == ["R", "S(1)"]
    assert tp["blocks.0.mlp.fc.weight"] == ["R", "S(0)"] and tp["blocks.0.mlp.proj.weight"] == ["R", "S(1)"]
    assert pins["FSDP + TP"]["blocks.0.attn.q.weight"] == ["S(1)", "S(0)"]
    assert set(pins["data parallel"]["tok_emb.weight"]) == {"R"}


@pytest.mark.parametrize("name", ["mlp", "gpt", "llama", "cnn"])
@pytest.mark.parametrize("mesh", ["4", "2x2"])
def test_planner_is_no_worse_than_any_classic_plan_that_fits(name, mesh):
    plan = plan_example(name, mesh, compare=True)
    assert plan.comparison, "no classic plan applies"
    for row in plan.comparison:
        if row["fits"]:
            assert plan.cost["total_s"] <= row["cost"]["total_s"] * (1 + 1e-9), (row["name"], row["cost"], plan.cost)


def test_comparison_under_a_budget_marks_what_does_not_fit():
    plan = plan_example("mlp", "4", {"batch": 8, "d": 1024, "hidden": 4096}, memory="16MiB", compare=True)
    by_name = {r["name"]: r for r in plan.comparison}
    assert not by_name["data parallel"]["fits"]  # 32 MiB of weights on every device
    assert by_name["tensor parallel"]["fits"]
    assert plan.cost["total_s"] <= by_name["tensor parallel"]["cost"]["total_s"] * (1 + 1e-9)
