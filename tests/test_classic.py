"""The classic plans under the same cost model: which apply, and that the
planner's plan is never worse than one that fits the budget; torchtitan's
FSDP+TP plan for Llama, and where a plan's parameter placements differ."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import highspy
import pytest
from conftest import captured_example, example_path, plan_example

from dtplan import Plan, load_model_file, plan_program
from dtplan.ir.modelfile import capture_model_file
from dtplan.planner.output.classic import (
    RECIPES,
    TORCHTITAN,
    TORCHTITAN_FSDP,
    classic_pins,
    compare_classic,
    placement_diff,
    torchtitan_pins,
)
from dtplan.planner.mesh import parse_mesh
from dtplan.planner.solver.program import highs_bounds
from dtplan.planner.output.report import build_report_data, render_report


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
            assert plan.cost.total_s <= row["cost"]["total_s"] * (1 + 1e-9), (row["name"], row["cost"], plan.cost)


def test_comparison_under_a_budget_marks_what_does_not_fit():
    plan = plan_example("mlp", "4", {"batch": 8, "d": 1024, "hidden": 4096}, memory="16MiB", compare=True)
    by_name = {r["name"]: r for r in plan.comparison}
    assert not by_name["data parallel"]["fits"]  # 32 MiB of weights on every device
    assert by_name["tensor parallel"]["fits"]
    assert plan.cost.total_s <= by_name["tensor parallel"]["cost"]["total_s"] * (1 + 1e-9)


# ---------------------------------------------------------------------- torchtitan FSDP+TP

@pytest.fixture(scope="module")
def llama():
    return captured_example("llama")


@pytest.fixture(scope="module")
def torchtitan_plan(llama):
    pins = torchtitan_pins(llama, "2x2")
    return pins, plan_program(llama, mesh="2x2", parameter_placements=pins, model_info={"name": "llama"})


def test_torchtitan_pins_for_tiny_llama_on_2x2(llama):
    pins = torchtitan_pins(llama, parse_mesh("2x2"))
    assert pins == classic_pins(llama, parse_mesh("2x2"))[TORCHTITAN]
    for i in (0, 1):
        a, f = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        for col in (f"{a}.wq", f"{a}.wk", f"{a}.wv", f"{f}.w1", f"{f}.w3"):  # colwise on tp, FSDP dim 0 on dp
            assert pins[f"{col}.weight"] == ["_S(0, 2)", "S(0)"], col  # FSDP within the tp shard: strided
        assert pins[f"{a}.wo.weight"] == ["S(0)", "S(1)"] and pins[f"{f}.w2.weight"] == ["S(0)", "S(1)"]
        assert pins[f"layers.{i}.attention_norm.weight"] == pins[f"layers.{i}.ffn_norm.weight"] == ["S(0)", "R"]
    assert pins["tok_embeddings.weight"] == ["_S(0, 2)", "S(0)"]  # rowwise embedding: vocab rows
    assert pins["output.weight"] == ["_S(0, 2)", "S(0)"]  # colwise: vocab rows
    assert pins["norm.weight"] == ["S(0)", "R"]


def test_torchtitan_pins_other_meshes(llama):
    # 8x8: wk is [32, 64]; dim 0 cannot take 8 dp x 8 tp ways, so FSDP takes dim 1
    pins = torchtitan_pins(llama, "8x8")
    assert pins["layers.0.attention.wk.weight"] == ["S(1)", "S(0)"]
    assert pins["layers.0.attention.wq.weight"] == ["_S(0, 8)", "S(0)"]
    # 3-D: every axis but the last is dp (FSDP over them flattened)
    pins = torchtitan_pins(llama, "2x2x2")
    assert pins["layers.1.feed_forward.w2.weight"] == ["S(0)", "S(0)", "S(1)"]
    assert pins["layers.1.feed_forward.w1.weight"] == ["_S(0, 2)", "_S(0, 2)", "S(0)"]
    assert pins["norm.weight"] == ["S(0)", "S(0)", "R"]
    with pytest.raises(ValueError, match="two or more axes"):
        torchtitan_pins(llama, "4")
    assert TORCHTITAN not in classic_pins(llama, parse_mesh("4"))
    with pytest.raises(ValueError, match="Llama"):
        torchtitan_pins(captured_example("gpt"), "2x2")


def test_torchtitan_plan_is_planned_as_pinned_and_dtplan_is_no_worse(llama, torchtitan_plan):
    pins, tt = torchtitan_plan
    assert {f: [str(p) for p in tt.parameters[f]] for f in pins} == pins
    assert placement_diff(tt, {"name": TORCHTITAN, "parameters": pins}) == []
    free = plan_program(llama, mesh="2x2")
    budget = max(tt.cost.peak_memory_bytes, free.cost.peak_memory_bytes)  # torchtitan fits it
    ours = plan_program(llama, mesh="2x2", memory=budget)
    assert ours.cost.peak_memory_bytes <= budget
    assert ours.cost.total_s <= tt.cost.total_s * (1 + 1e-9), (ours.cost, tt.cost)


def test_placement_diff_groups_layers_and_names_axes():
    layers = 4
    ours = {"tok_embeddings.weight": ["S(0)", "S(0)"], "norm.weight": ["R", "R"]}
    theirs = dict(ours)
    for i in range(layers):
        ours[f"layers.{i}.attention.wq.weight"] = ["S(0)", "S(0)"]
        theirs[f"layers.{i}.attention.wq.weight"] = ["S(1)", "S(0)"]  # every layer, axis dp
        ours[f"layers.{i}.feed_forward.w2.weight"] = ["S(0)", "R" if i else "S(1)"]
        theirs[f"layers.{i}.feed_forward.w2.weight"] = ["S(0)", "S(1)"]  # layers 1-3, axis tp
    ours["layers.2.attention_norm.weight"] = ["R", "R"]
    theirs["layers.2.attention_norm.weight"] = ["S(0)", "R"]  # one layer only
    plan = {"mesh": {"shape": [2, 2], "axis_names": ["dp", "tp"]}, "parameters": ours}
    rows = placement_diff(plan, {"name": TORCHTITAN, "parameters": theirs})
    assert [r.text for r in rows] == [
        "layers.*.attention.wq.weight: axis dp: S(0) here vs S(1) in torchtitan FSDP+TP",
        "layers.[1-3].feed_forward.w2.weight: axis tp: R here vs S(1) in torchtitan FSDP+TP",
        "layers.2.attention_norm.weight: axis dp: R here vs S(0) in torchtitan FSDP+TP",
    ]
    assert rows[0].parameters == tuple(f"layers.{i}.attention.wq.weight" for i in range(layers))
    assert (rows[1].axis, rows[1].axis_index, rows[1].ours, rows[1].theirs) == ("tp", 1, "R", "S(1)")
    assert rows[1].to_json()["parameters"] == [f"layers.{i}.feed_forward.w2.weight" for i in (1, 2, 3)]


def test_report_shows_where_dtplan_and_torchtitan_differ(torchtitan_plan):
    pins, tt = torchtitan_plan
    changed = dict(pins)
    for i in (0, 1):
        changed[f"layers.{i}.attention.wq.weight"] = ["S(1)", "S(0)"]  # a hand-made difference on d0
    changed["norm.weight"] = ["S(0)", "S(0)"]  # and one on d1
    plan = dataclasses.replace(tt, comparison=({"name": TORCHTITAN, "parameters": changed, "cost": dataclasses.asdict(tt.cost), "fits": True},)).to_json()
    rows = placement_diff(plan, plan["comparison"][0])
    assert [(r.pattern, r.axis, r.ours, r.theirs) for r in rows] == [
        ("layers.*.attention.wq.weight", "d0", "_S(0, 2)", "S(1)"),
        ("norm.weight", "d1", "R", "S(0)"),
    ]
    data = build_report_data(plan)
    assert [d["name"] for d in data["placement_diffs"]] == [TORCHTITAN]
    assert data["placement_diffs"][0]["num_parameters"] == 3
    page = render_report(data)
    section = page.split('<details class="diff" id="diff-torchtitan-FSDP-TP"', 1)[1].split("</details>", 1)[0]
    assert "layers.*.attention.wq.weight" in section and "norm.weight" in section
    assert "3 of 21 parameters placed differently" in section


def test_torchtitan_recipes_are_named_and_say_whether_they_ran_as_published():
    """torchtitan's Llama-3 8B recipe (FSDP, selective AC, bf16) and 70B
    recipe (FSDP+TP, full AC, bf16) beside the plan; the 8B recipe's pins
    are the FSDP plan's, planned once."""
    mf = load_model_file(example_path("llama"), {"layers": "1"})
    step = capture_model_file(mf, train=True, precision="bf16", remat="selective")
    mesh = parse_mesh("2x2")
    planned = []

    def plan_pinned(pins):  # a stand-in planner: what is compared and named is under test, not the costs
        planned.append(pins)
        k = float(len(planned))
        return SimpleNamespace(cost=SimpleNamespace(total_s=k, compute_s=k, comm_s=0.0, comm_bytes=0, peak_memory_bytes=int(k), overlapped_s=k, exposed_comm_s=0.0))

    rows = {r.name: r for r in compare_classic(step, mesh=mesh, budget=None, plan_pinned=plan_pinned)}
    assert list(rows) == ["data parallel", "FSDP", "tensor parallel", "FSDP + TP", TORCHTITAN_FSDP, TORCHTITAN]
    assert len(planned) == 5
    assert rows[TORCHTITAN_FSDP].parameters == rows["FSDP"].parameters and rows[TORCHTITAN_FSDP].cost == rows["FSDP"].cost
    assert rows[TORCHTITAN_FSDP].recipe == {"source": RECIPES[TORCHTITAN_FSDP].source, "precision": "bf16", "remat": "selective", "as_published": True}
    assert rows[TORCHTITAN].recipe["remat"] == "full" and not rows[TORCHTITAN].recipe["as_published"]  # this step recomputes selectively
    assert rows["FSDP"].recipe is None and "recipe" not in rows["FSDP"].to_json()
    # the plan file keeps the note; the report shows it
    plan = plan_program(step, mesh=mesh, model_info={"name": "llama"})
    plan = dataclasses.replace(plan, comparison=tuple(r.to_json() for r in rows.values()))
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.comparison[4]["recipe"]["as_published"] is True
    page = render_report(build_report_data(again.to_json()))
    assert "recipe as published (bf16, selective AC)" in page and "layout only: the recipe trains with bf16 and full AC" in page


# ---------------------------------------------------------------------- pinned as bounds


def _recording(monkeypatch):
    """Record `api.solve`'s and `api.solve_pinned`'s calls (and what they return)."""
    import dtplan.api as api

    solves, pinned = [], []
    real_solve, real_pinned = api.solve, api.solve_pinned

    def solve(*args, **kwargs):
        solves.append(args)
        return real_solve(*args, **kwargs)

    def solve_pinned(state, allowed):
        result = real_pinned(state, allowed)
        pinned.append((state, allowed, result))
        return result

    monkeypatch.setattr(api, "solve", solve)
    monkeypatch.setattr(api, "solve_pinned", solve_pinned)
    return solves, pinned


def test_classic_plans_solve_the_free_program_again_with_their_pins_as_bounds(monkeypatch):
    """Issue 14: the comparison builds no program of its own. Each classic
    layout is the free plan's program with its parameters' choices pinned,
    re-solved from its LP: one `solve` in all, every pinned parameter placed as
    pinned, each answer's objective what `evaluate` prices it (no budget)."""
    mf = load_model_file(example_path("llama"), {})
    step = capture_model_file(mf, train=True)
    solves, pinned = _recording(monkeypatch)
    plan = plan_program(step, mesh="2x2", compare=True)
    layouts = {repr(sorted((k, list(v)) for k, v in r["parameters"].items())) for r in plan.comparison}
    assert len(solves) == 1 and len(pinned) == len(layouts) >= 4
    for state, allowed, result in pinned:
        assert result is not None and result.method.startswith("pinned-lp")
        assert all(result.choice[name] in ks for name, ks in allowed.items())
        ns = state.price(result.choice)[0]
        if result.method == "pinned-lp":  # the program's objective: each term rounded to whole ns
            assert abs(result.objective_ns - ns) <= len(state.graph) + len(result.choice)
        else:  # rounding or diving: priced by evaluate
            assert result.objective_ns == ns
        assert result.bound_ns <= result.objective_ns


def test_a_pinned_solve_drops_the_budget_and_matches_the_plan_built_again(monkeypatch):
    """Under a budget that binds (the free plan's program has peak rows), a
    classic layout that does not fit is still priced without the budget, and
    every classic plan costs what the same pins cost in a program built again
    (to the 1% gap either solve proves)."""
    options = {"batch": "8", "d": "1024", "hidden": "4096"}
    captured = captured_example("mlp", **options)
    solves, pinned = _recording(monkeypatch)
    plan = plan_program(captured, mesh="4", memory="16MiB", compare=True)
    assert len(solves) == 1 and pinned and all(r is not None for _, _, r in pinned)
    state = pinned[0][0]
    assert state.model.peak_rows, "the budget never bound: nothing to relax"
    # each pinned solve leaves the free program's LP as it found it: its bounds and its budget rows
    lp, groups = state.lp.highs.getLp(), len(state.model.program.groups)
    assert list(lp.col_upper_) == [float(u) for u in state.model.program.upper] and not any(lp.col_lower_)
    for r in state.model.peak_rows:
        _, _, lo, hi = state.model.program.rows[r]
        assert (lp.row_lower_[groups + r], lp.row_upper_[groups + r]) == tuple(highs_bounds([lo, hi]))
        assert lp.row_lower_[groups + r] == -highspy.kHighsInf  # no bound below: infinite to HiGHS, not -2^62
    monkeypatch.undo()
    by_name = {r["name"]: r for r in plan.comparison}
    assert not by_name["data parallel"]["fits"]
    for row in plan.comparison:
        again = plan_program(captured, mesh="4", parameter_placements=row["parameters"])
        assert again.cost.total_s * 0.99 <= row["cost"]["total_s"] <= again.cost.total_s * 1.01, row["name"]
        if row["name"] == "data parallel":  # every weight whole: the same peak, over the budget
            assert row["cost"]["peak_memory_bytes"] == again.cost.peak_memory_bytes > 16 << 20
