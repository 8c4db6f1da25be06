"""Gradient buckets: the gradients' reductions merged into few collectives
(`dtplan.planner.evaluate.buckets`), priced as one, lowered as one
(`dtplan.runtime.redistribute.reduce_bucket`), and issued under backward."""
from __future__ import annotations

from collections import Counter

import pytest
from conftest import example_path

from dtplan import load_model_file, plan_program
from dtplan.ir.modelfile import capture_model_file
from dtplan.planner.cost.device import load_profile
from dtplan.planner.cost.overlap import simulate
from dtplan.planner.cost.pricing import BUCKET_BYTES
from dtplan.planner.evaluate import OUTPUT, buckets, issued
from dtplan.planner.mesh import parse_mesh
from dtplan.planner.output.classic import classic_pins
from dtplan.runtime.abstract import graph_collectives, lower_abstract
from dtplan.runtime.run import run_many
from dtplan.runtime.verify import expected_collectives


def test_buckets_fill_in_the_order_gradients_are_produced_and_issue_when_ready():
    key_a, key_b = ("all_reduce", 0, "float32", "sum"), ("all_reduce", 0, "bfloat16", "sum")
    # (id, producer position, bytes, key): produced in the order 3, 2, 1, 0
    members = [(0, 40, 600, key_a), (1, 30, 500, key_a), (2, 20, 300, key_a), (3, 10, 200, key_a), (4, 25, 100, key_b), (5, 50, 5000, key_a)]
    # by production: 3 (200) + 2 (300) + 1 (500) = 1000 fill one; 0 starts the next; 5 is over the cap alone
    assert buckets(members, cap=1000) == [[4], [3, 2, 1], [0], [5]]  # the bfloat16 one is ready first (25)
    # issued as they are ready: the bfloat16 bucket (ready at 25) between the float32 ones (30 and 40)
    assert buckets(members, cap=10**6) == [[4], [3, 2, 1, 0, 5]]


def test_a_returned_collective_issues_when_its_producer_is_done():
    # g's reduce-scatter (1.5 s) is waited for at the end only: issued once g
    # is computed (t=2), under b and c, not after the gather read by c was
    order = ["p", "a", "g", "b", "c"]
    compute = {"a": 1.0, "g": 1.0, "b": 1.0, "c": 1.0}
    got = simulate(order, compute, [("all_gather", "p", 4, 0.5), ("reduce_scatter", "g", 5, 1.5)])
    assert (got.step_s, got.exposed_s) == (4.0, 0.0)
    # a collective read inside the step keeps the one-group-ahead rule: issued at c (t=3), 0.5 s exposed
    got = simulate(order, compute, [("all_gather", "p", 4, 0.5), ("reduce_scatter", "g", 4, 1.5), ("all_reduce", "g", 5, 0.1)])
    assert got.step_s == pytest.approx(4.5)


@pytest.fixture(scope="module")
def data_parallel():
    """gpt's training step on mesh 2, parameters replicated, batch split."""
    captured = capture_model_file(load_model_file(example_path("gpt"), {}), train=True)
    pins = {n.fqn: ["R"] for n in captured.graph if n.role.name == "PARAM"}
    plan = plan_program(captured, mesh="2", parameter_placements=pins, input_placements=["S(0)"])
    return captured, plan


def test_data_parallel_gradients_travel_in_buckets_priced_as_one(data_parallel):
    captured, plan = data_parallel
    grads = [c for c in plan.collectives if c.node == OUTPUT and c.producer in captured.gradients]
    assert grads and all(c.kind == "all_reduce" and c.bucket is not None for c in grads)
    assert len(grads) == len(captured.gradients)  # one reduction per gradient, each in a bucket
    sizes = Counter()
    for c in grads:
        sizes[c.bucket] += c.bytes
    assert all(s <= BUCKET_BYTES for s in sizes.values())
    # each member is charged its bytes at the rate of a full bucket: the
    # integer program's objective is still compute + every collective's time
    profile = load_profile("cpu")
    total = sum(captured.graph[g].tensor_meta.nbytes for g in captured.gradients)
    fill = min(BUCKET_BYTES, total)
    link = profile.axis_links((2,))[0]
    rate = profile.collective_seconds("all_reduce", fill, 2, link) / fill
    for c in grads:  # (each is smaller than a bucket here)
        assert c.bytes < fill and c.time_s == pytest.approx(c.bytes * rate)
    assert plan.solver.objective == pytest.approx(plan.cost.total_s * 1e9, abs=len(plan.nodes) + 2)
    # a run issues one all-reduce per bucket, of the members' bytes
    runs = issued(plan.collectives)
    assert Counter(k for k, *_ in runs)["all_reduce"] == len(sizes) + sum(c.kind == "all_reduce" and c.bucket is None for c in plan.collectives)
    assert expected_collectives(plan) == graph_collectives(lower_abstract(captured, plan, rank=0))


def test_fsdp_gradients_reduce_scatter_in_buckets_that_match_one_device():
    """gpt with FSDP pins (reduce-scatter buckets) and mlp data parallel
    (all-reduce buckets) on two gloo ranks: three AdamW steps equal the
    single-device steps, and each rank issues the buckets the plan lists."""
    items, steps = [], []
    mesh = parse_mesh("2")
    for name, opts, classic, kind in (("gpt", {}, "FSDP", "reduce_scatter"), ("mlp", {"batch": "512"}, "data parallel", "all_reduce")):
        captured = capture_model_file(load_model_file(example_path(name), opts), train=True)
        plan = plan_program(captured, mesh=mesh, parameter_placements=classic_pins(captured, mesh)[classic], input_placements=["S(0)"])
        assert sum(c.kind == kind and c.bucket is not None for c in plan.collectives) >= 2, name
        assert expected_collectives(plan) == graph_collectives(lower_abstract(captured, plan, rank=0)), name
        items.append((example_path(name), plan, opts, True, 3))
        steps.append(captured)
    for rank, reports in enumerate(run_many(items, captured=steps)):
        for (path, *_), report in zip(items, reports, strict=True):
            case = f"{path} rank {rank}"
            assert report["collectives_match"], (case, report["collectives_issued"])
            assert report["numerics_match"], (case, {k: report.get(k) for k in ("max_abs", "max_rel", "max_loss_rel", "mismatched")})
            assert report["max_loss_rel"] < 1e-4, (case, report["losses"], report["reference_losses"])
