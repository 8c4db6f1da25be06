"""The planner end to end on meta tensors: the plans it must find, and the
numbers a plan carries."""
from __future__ import annotations

import json
import re

import pytest
from conftest import captured_example, plan_example

from dtplan.planner.cost.device import compute_time, load_profile
from dtplan.planner.cost.pricing import Pricer
from dtplan.planner.space.strategies import Strategy
from dtplan.planner.solver import MemoryBudgetError
from dtplan.planner.output.plan import Plan, PlanError

MLP = {"batch": 8, "d": 1024, "hidden": 4096}


def placements(plan, fqn):
    return [str(p) for p in plan.parameters[fqn]]


def test_mlp_small_batch_plans_megatron_column_then_row():
    plan = plan_example("mlp", "4", MLP, memory="16MiB")
    assert placements(plan, "fc1.weight") == ["S(0)"]
    assert placements(plan, "fc2.weight") == ["S(1)"]
    assert [(c.kind, c.axis, c.bytes) for c in plan.collectives] == [("all_reduce", "d0", 8 * 1024 * 4)]
    assert plan.cost.peak_memory_bytes <= 16 * 2**20


def test_mlp_large_batch_plans_data_parallel():
    plan = plan_example("mlp", "4", {"batch": 4096, "d": 1024, "hidden": 4096})
    assert placements(plan, "fc1.weight") == ["R"]
    assert placements(plan, "fc2.weight") == ["R"]
    acts = {n: p for n, p in plan.nodes.items() if p.op == "aten.mm.default"}
    assert all([str(x) for x in p.output] == ["S(0)"] for p in acts.values())
    # the replicated output is gathered once from the batch shards
    assert [(c.kind, c.bytes) for c in plan.collectives] == [("all_gather", 4096 * 1024 * 4)]


def test_batch_sharded_input_and_output_need_no_collective():
    plan = plan_example("mlp", "4", {"batch": 4096, "d": 1024, "hidden": 4096}, input_placements=["S(0)"], output_placements=["S(0)"])
    assert [str(p) for p in plan.inputs["x"]] == ["S(0)"]
    assert plan.collectives == ()
    assert placements(plan, "fc1.weight") == ["R"]


def test_plan_cost_is_what_the_cost_model_says():
    """The plan's figures against ones worked out here: its communication by
    the alpha-beta formula, its matmuls by the roofline on their local
    shares, every node priced again from the graph at its planned placement."""
    plan = plan_example("mlp", "4", MLP, memory="16MiB")
    graph = captured_example("mlp", **MLP).graph
    profile = load_profile("cpu")
    c = plan.cost
    # one all-reduce of 32 KiB over 4 ranks on the cpu profile, by the alpha-beta formula
    link = profile.intra_node
    comm = 2 * 3 * link.latency + 2 * 3 / 4 * 32768 / link.bandwidth
    assert [x.time_s for x in plan.collectives] == [pytest.approx(comm)]
    assert c.comm_s == pytest.approx(comm)
    assert c.comm_bytes == pytest.approx(2 * 3 / 4 * 32768)
    # the two matmuls (8x1024 @ 1024x4096, 8x4096 @ 4096x1024), a quarter of each per device
    b, d, h = MLP["batch"], MLP["d"], MLP["hidden"]
    by_hand = compute_time(2 * b * d * h / 4, 4 * (b * d + d * h + b * h) / 4, profile, "float32")
    mms = [n.name for n in graph if n.op_name == "aten.mm.default"]
    assert len(mms) == 2 and [plan.nodes[m].compute_s for m in mms] == [pytest.approx(by_hand)] * 2
    # every node priced again by the cost model at the placement the plan gives it
    pricer = Pricer((4,), profile)
    compute = sum(pricer.compute_s(n, Strategy(plan.nodes[n.name].inputs, plan.nodes[n.name].output)) for n in graph)
    assert compute >= 2 * by_hand
    assert c.compute_s == pytest.approx(compute)
    assert c.total_s == pytest.approx(compute + comm)
    # the solver's objective is the same sum, in integer nanoseconds
    assert plan.solver.objective == pytest.approx((compute + comm) * 1e9, abs=len(plan.nodes) + 2)
    # fc weights are 16 MiB each in full, a quarter each per device
    assert c.parameter_bytes == 2 * 4096 * 1024 * 4 // 4


def test_memory_budget_no_plan_meets_names_the_least():
    with pytest.raises(MemoryBudgetError) as e:
        plan_example("mlp", "4", MLP, memory="1MiB")
    # no plan holds less than a quarter of each 16 MiB weight per device ...
    quarter_of_weights = 2 * 4096 * 1024 * 4 // 4
    assert e.value.least >= quarter_of_weights
    # ... and the column-then-row plan under 16 MiB is one plan, so the least is at most its peak
    megatron = plan_example("mlp", "4", MLP, memory="16MiB")
    assert e.value.least <= megatron.cost.peak_memory_bytes
    assert "least memory any plan needs" in str(e.value)
    # and that least is achievable
    plan = plan_example("mlp", "4", MLP, memory=e.value.least)
    assert plan.cost.peak_memory_bytes <= e.value.least


def test_plan_json_round_trip_and_refusals(tmp_path):
    plan = plan_example("mlp", "2x2", {"batch": 8, "d": 64, "hidden": 256})
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_json() == plan.to_json()
    data = json.loads(path.read_text())
    assert set(data) >= {"version", "mesh", "parameters", "nodes", "collectives", "cost", "solver"}
    assert data["mesh"] == {"shape": [2, 2], "axis_names": ["d0", "d1"]}
    for key in ("total_s", "compute_s", "comm_s", "comm_bytes", "peak_memory_bytes"):
        assert key in data["cost"]
    for key in ("status", "objective", "bound", "wall_s"):
        assert key in data["solver"]
    data["version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="version: 99 is not supported"):
        Plan.load(tmp_path / "v99.json")
    (tmp_path / "binary.json").write_bytes(bytes(range(256)))
    with pytest.raises(PlanError, match="binary.json' is not JSON text"):
        Plan.load(tmp_path / "binary.json")
    other = captured_example("mlp", batch=16, d=64, hidden=256)
    with pytest.raises(PlanError, match="does not match this model"):
        again.check_matches(other.graph, again.mesh)



def test_same_inputs_same_plan():
    a = plan_example("gpt", "2x2")
    b = plan_example("gpt", "2x2")
    assert a.to_json()["nodes"] == b.to_json()["nodes"]
    assert a.solver.objective == b.solver.objective


def test_gpt_on_2x2_under_budget_head_shards_attention():
    """q/k/v column-parallel, attention on head shards, output projection
    row-parallel on the same mesh axis."""
    opts = {"dim": 1024, "heads": 16, "seq": 256, "batch": 8}
    free = plan_example("gpt", "2x2", opts, profile="h100")
    assert {tuple(placements(free, f)) for f in free.parameters} == {("R", "R")}
    assert free.cost.parameter_bytes > 100e6
    plan = plan_example("gpt", "2x2", opts, profile="h100", memory="60MB")
    assert plan.cost.peak_memory_bytes <= 60e6
    for layer in (0, 1):
        attn = f"blocks.{layer}.attn"
        q, k, v, o = (placements(plan, f"{attn}.{w}.weight") for w in "qkvo")
        axes = [a for a in range(2) if q[a] == k[a] == v[a] == "S(0)" and o[a] == "S(1)"]
        assert axes, (q, k, v, o)
        sdpa = [n for n, p in plan.nodes.items() if p.op == "aten.scaled_dot_product_attention.default" and p.module == attn]
        assert len(sdpa) == 1
        assert str(plan.nodes[sdpa[0]].output[axes[0]]) == "S(1)"  # heads


def test_an_op_without_a_rule_is_replicated_and_listed():
    import torch

    import dtplan

    class Dist(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            return torch.cdist(x, self.w).sum(-1)

    plan = dtplan.compile(Dist(), (torch.randn(8, 16),), mesh="4")  # under 25 rows: no mm rewrite
    [fb] = plan.fallbacks  # no rule in DTensor or dtplan for cdist
    assert fb.op == "aten._cdist_forward.default" and "no sharding rule" in fb.reason
    node = plan.nodes[fb.node]
    assert all(p.is_replicate() for pl in node.inputs for p in pl) and all(p.is_replicate() for p in node.output)
    assert Plan.from_json(plan.to_json()).fallbacks == plan.fallbacks


def _unpriced_matmul_op():
    """A custom matmul whose FLOP formula raises (once per session)."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = getattr(getattr(torch.ops, "dtplan_test", None), "unpriced_mm", None)
    if op is not None and op.default in flop_registry:
        return op.default

    @torch.library.custom_op("dtplan_test::unpriced_mm", mutates_args=(), schema="(Tensor x, Tensor w) -> Tensor")
    def unpriced_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w

    @unpriced_mm.register_fake
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[1])

    @register_flop_formula(torch.ops.dtplan_test.unpriced_mm)
    def _flops(x_shape, w_shape, *args, **kwargs):
        raise ValueError("no count for this layout")

    return torch.ops.dtplan_test.unpriced_mm.default


def test_an_op_whose_flop_formula_raises_is_listed_in_the_plan_summary_and_report(capsys):
    import torch

    import dtplan
    from dtplan.cli import _print_summary
    from dtplan.ir.flops import flop_fallbacks
    from dtplan.planner.output.report import build_report_data, render_report

    op = _unpriced_matmul_op()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 32))

        def forward(self, x):
            return torch.relu(op(x, self.w)) @ self.w.t()

    plan = dtplan.compile(M(), (torch.randn(8, 16),), mesh="2")
    [ff] = plan.flop_fallbacks
    assert ff.op == "dtplan_test.unpriced_mm.default"
    assert "FLOP formula failed (ValueError: no count for this layout)" in ff.reason and "one FLOP per output element" in ff.reason
    assert plan.nodes[ff.node].op == ff.op
    # the torch formulas that work are not listed: the other matmul, the relu
    assert [f.node for f in flop_fallbacks(dtplan.ir.capture(M(), (torch.randn(8, 16),)).graph)] == [ff.node]
    data = plan.to_json()
    assert data["flop_fallbacks"] == [{"node": ff.node, "op": ff.op, "reason": ff.reason}]
    assert Plan.from_json(json.loads(json.dumps(data))).flop_fallbacks == plan.flop_fallbacks
    bad = json.loads(json.dumps(data))
    bad["flop_fallbacks"][0]["node"] = "nowhere"
    with pytest.raises(PlanError, match=r"flop_fallbacks\[0\]: node 'nowhere' names no planned node"):
        Plan.from_json(bad)
    _print_summary(plan, None)
    assert "FLOP fallbacks   1 op(s) whose FLOP formula failed, counted one FLOP per output element: dtplan_test.unpriced_mm.default" in capsys.readouterr().out
    page = render_report(build_report_data(data))
    assert 'id="flop-fallbacks"' in page and "no count for this layout" in page and 'id="num-flop-fallbacks" data-value="1"' in page


def test_a_plan_without_flop_fallbacks_writes_no_key_and_reads_files_without_it():
    plan = plan_example("mlp", "2", {"batch": 8, "d": 64, "hidden": 256})
    data = plan.to_json()
    assert plan.flop_fallbacks == () and "flop_fallbacks" not in data  # files stay readable by a dtplan from before the key
    assert Plan.from_json(data).flop_fallbacks == ()


def test_a_classic_plan_that_fails_is_a_row_with_its_error(monkeypatch, capsys):
    """A classic layout whose planning raises is shown failed with its error
    (plan file, CLI summary, --json summary, report), not left out."""
    from dtplan.cli import _print_summary, _summary
    from dtplan.planner.output import classic
    from dtplan.planner.output.report import build_report_data, render_report

    real = classic.classic_pins

    def pins(captured, mesh):
        out = real(captured, mesh)
        out["FSDP"] = {**out["FSDP"], "fc1.weight": ["S(7)"]}  # fc1.weight has two dims: planning it raises
        return out

    monkeypatch.setattr(classic, "classic_pins", pins)
    plan = plan_example("mlp", "2", {"batch": 8, "d": 64, "hidden": 256}, compare=True)
    rows = {r["name"]: r for r in plan.comparison}
    failed = rows["FSDP"]
    assert failed["cost"] is None and failed["fits"] is False and "S(7)" in failed["error"] and "\n" not in failed["error"]
    assert rows["data parallel"]["cost"]["total_s"] > 0 and "error" not in rows["data parallel"]
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert {r["name"]: r.get("error") for r in again.comparison} == {r["name"]: r.get("error") for r in plan.comparison}
    _print_summary(again, None)
    out = capsys.readouterr().out
    assert f"  vs FSDP               failed: {failed['error']}\n" in out
    assert "  vs data parallel      " in out
    assert _summary(again)["comparison"]["FSDP"] == {"error": failed["error"], "fits": False}
    page = render_report(build_report_data(plan.to_json()))
    assert re.search(r'<tr class="failed nofit" data-plan="FSDP"[^>]*>\s*<td>FSDP</td>\s*<td colspan="9" class="error">failed: ', page)
    # a row must have a cost or an error, not both nor neither
    for cost, error, says in ((None, None, "neither a cost nor an error"), ({"total_s": 1.0}, "boom", "both a cost and an error")):
        data = plan.to_json()
        data["comparison"] = [{**failed, "cost": cost, "error": error}]
        with pytest.raises(PlanError, match=rf"comparison\[0\]: has {says}"):
            Plan.from_json(data)
