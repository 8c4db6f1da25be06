"""The runtime over real gloo processes: every example, sharded, equals the
single-device result, and issues exactly the collectives its plan lists.

Each mesh is one spawned group running many plans: a group costs seconds to
start. Budgets below the replicated plan's memory force real sharding.
"""
from __future__ import annotations


import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from conftest import example_path

from dtplan import plan_program
from dtplan.ir.graph import TensorMeta
from dtplan.ir.modelfile import capture_model_file, load_model_file
from dtplan.planner.mesh import parse_mesh
from dtplan.runtime.launch import spawn
from dtplan.runtime.run import run_many
from redistribution_check import redistribution_selfcheck

#: (example, options, memory budget or None) per mesh. A 1-D mesh of 4 ranks
#: runs in test_real_models.py (an unknown op) and the CLI tests (mesh 2): the
#: suite's ten minutes go to the real models there.
CASES = {
    "2x2": [
        ("mlp", {}, None),
        ("mlp", {}, 92_160),
        ("gpt", {}, None),
        ("gpt", {}, 355_200),
        ("llama", {}, None),
        ("cnn", {}, None),
        ("cnn", {}, 144_782),
    ],
}


@pytest.mark.parametrize("mesh", sorted(CASES))
def test_every_example_matches_single_device_and_its_plan(mesh):
    items, plans, captures = [], [], []
    for name, opts, memory in CASES[mesh]:
        options = {k: str(v) for k, v in opts.items()}
        captures.append(capture_model_file(load_model_file(example_path(name), options), train=False))  # the ranks run it as it is
        plan = plan_program(captures[-1], mesh=mesh, memory=memory, model_info={"name": name})
        plans.append(plan)
        items.append((example_path(name), plan, options, True))
    # the budgets do force sharding: those plans communicate
    assert all(p.collectives for p, (_, _, m) in zip(plans, CASES[mesh], strict=True) if m is not None)
    per_rank = run_many(items, captured=captures)
    assert len(per_rank) == parse_mesh(mesh).size
    for rank, reports in enumerate(per_rank):
        for (name, opts, memory), plan, report in zip(CASES[mesh], plans, reports, strict=True):
            case = f"{name} {opts} memory={memory} on {mesh}, rank {rank}"
            assert report["numerics_match"], (case, report)
            assert report["max_rel"] < 1e-3 or report["max_abs"] < 1e-5, (case, report)
            assert report["collectives_match"], (case, report["collectives_issued"], [(c.kind, c.axis, c.bytes) for c in plan.collectives])


CASES_2D = [
    (["S(0)", "R"], ["R", "R"]),
    (["S(1)", "S(0)"], ["R", "R"]),
    (["P(sum)", "R"], ["R", "R"]),
    (["P(sum)", "P(sum)"], ["S(0)", "S(1)"]),
    (["R", "P(sum)"], ["R", "S(1)"]),
    (["S(0)", "R"], ["S(1)", "R"]),  # all-to-all
    (["R", "S(1)"], ["R", "S(0)"]),  # all-to-all on the inner axis
    (["S(0)", "S(0)"], ["R", "R"]),  # nested shards of one dim
    (["R", "R"], ["S(1)", "S(0)"]),  # local slices only
    (["S(0)", "S(1)"], ["S(1)", "S(0)"]),
]

#: sums over both axes of a value of 1 MiB or more go hierarchically:
#: reduce-scatter on the inner axis, all-reduce the shard on the outer one,
#: all-gather (`_dtensor._hierarchical`)
CASES_2D_LARGE = [
    (["P(sum)", "P(sum)"], ["R", "R"]),
    (["P(sum)", "P(sum)"], ["R", "S(0)"]),
    (["P(sum)", "P(sum)"], ["S(1)", "R"]),  # dim 0 then takes the inner reduce-scatter
    (["P(sum)", "P(sum)"], ["R", "S(0)"]),  # HSDP's gradient: scattered first, the shard summed
]


def _selfcheck_small_and_large(rank, mesh, **kwargs):
    return redistribution_selfcheck(rank, mesh, **kwargs) + redistribution_selfcheck(rank, mesh, shape=(512, 512), cases=CASES_2D_LARGE)


def test_redistribution_steps_on_gloo():
    import functools

    from dtplan.planner.space._dtensor import transform_steps

    # the large sums' steps: three collectives, not two all-reduces of everything
    meta = TensorMeta.of(torch.empty(512, 512))
    kinds = [(s.kind, s.axis) for s in transform_steps((2, 2), meta, (Partial(), Partial()), (Replicate(), Replicate()))]
    assert kinds == [("reduce_scatter", 1), ("all_reduce", 0), ("all_gather", 1)], kinds
    small = TensorMeta.of(torch.empty(8, 12))
    kinds = [s.kind for s in transform_steps((2, 2), small, (Partial(), Partial()), (Replicate(), Replicate()))]
    assert kinds == ["all_reduce", "all_reduce"], kinds
    kinds = [(s.kind, s.axis) for s in transform_steps((2, 2), small, (Partial(), Partial()), (Replicate(), Shard(0)))]
    assert kinds == [("reduce_scatter", 1), ("all_reduce", 0)], kinds  # DTensor sums whole on axis 0 first

    # (a rank that dies tearing down fails the run: tests/test_faults.py)
    work = functools.partial(_selfcheck_small_and_large, shape=(8, 12), cases=CASES_2D)
    for rank, results in enumerate(spawn(work, parse_mesh("2x2"))):
        for r in results:
            assert r["values_match"], (rank, r)
            assert r["collectives_match"], (rank, r)


def test_a_shipped_capture_is_the_capture_it_was():
    """Ranks take the parent's capture (`run_many(captured=...)`) instead of
    tracing again: the bytes give back the same program, fake values, names
    and all, and a capture for another step is refused. (The plan's
    recomputation applied on arrival: tests/test_remat.py and
    tests/test_training.py run shipped captures under remat plans.)"""
    import torch

    from dtplan.ir.capture import capture, from_bytes, to_bytes
    from dtplan.ir.modelfile import capture_model_file, load_model_file
    from dtplan.ir.precision import Precision
    from dtplan.runtime.run import _capture

    mf = load_model_file(example_path("mlp"))
    step = capture_model_file(mf, train=True)
    shipped = to_bytes(step)
    back = from_bytes(shipped)
    assert back.graph.signature == step.graph.signature
    assert (back.placeholders, back.user_inputs, dict(back.gradients), back.precision) == (step.placeholders, step.user_inputs, dict(step.gradients), step.precision)
    pairs = list(zip(back.gm.graph.nodes, step.gm.graph.nodes, strict=True))
    assert all((a.name, a.target, str(a.args)) == (b.name, b.target, str(b.args)) for a, b in pairs)
    vals = [(a.meta.get("val"), b.meta.get("val")) for a, b in pairs]
    assert all((x.shape, x.stride(), x.dtype) == (y.shape, y.stride(), y.dtype) for x, y in vals if isinstance(y, torch.Tensor))
    with pytest.raises(ValueError, match="shipped capture is for train=True"):
        _capture(mf, train=False, precision=Precision(), shipped=shipped)
    forward = capture_model_file(mf, train=False)  # an exported program: its shape env travels too
    assert from_bytes(to_bytes(forward)).graph.signature == forward.graph.signature
    # export names nn.Linear's input `input`, a builtin fx renames on the way in: it keeps its name
    linear = capture(torch.nn.Linear(4, 4, bias=False), (torch.randn(2, 4),))
    back = from_bytes(to_bytes(linear))
    assert "input" in [n.name for n in linear.gm.graph.nodes]
    assert [n.name for n in back.gm.graph.nodes] == [n.name for n in linear.gm.graph.nodes]
    x, w = torch.randn(2, 4), torch.randn(4, 4)
    assert torch.equal(back.gm(w, x)[0], linear.gm(w, x)[0])
