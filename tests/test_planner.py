"""The planner end to end on meta tensors: the plans it must find, and the
numbers a plan carries."""
from __future__ import annotations

import json

import pytest
from conftest import captured_example, plan_example

from dtplan.planner.cost.device import load_profile
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
    plan = plan_example("mlp", "4", MLP, memory="16MiB")
    c = plan.cost
    assert c.total_s == pytest.approx(c.compute_s + c.comm_s)
    assert c.comm_s == pytest.approx(sum(x.time_s for x in plan.collectives))
    assert c.compute_s == pytest.approx(sum(n.compute_s for n in plan.nodes.values()))
    # the solver's objective is the same sum, in integer nanoseconds
    assert plan.solver.objective == pytest.approx(c.total_s * 1e9, abs=len(plan.nodes) + 2)
    # one all-reduce of 32 KiB over 4 ranks on the cpu profile, by the alpha-beta formula
    link = load_profile("cpu").intra_node
    expected = 2 * 3 * link.latency + 2 * 3 / 4 * 32768 / link.bandwidth
    assert plan.collectives[0].time_s == pytest.approx(expected)
    assert c.comm_bytes == pytest.approx(2 * 3 / 4 * 32768)
    # fc weights are 16 MiB each in full, a quarter each per device
    assert c.parameter_bytes == 2 * 4096 * 1024 * 4 // 4


def test_memory_budget_no_plan_meets_names_the_least():
    with pytest.raises(MemoryBudgetError) as e:
        plan_example("mlp", "4", MLP, memory="1MiB")
    assert e.value.least == 2 * 4096 * 1024 * 4 // 4 + e.value.least - 2 * 4096 * 1024 * 4 // 4
    assert e.value.least > 2**20
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
