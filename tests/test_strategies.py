"""Strategy enumeration: DTensor's rules through the adapter, our own rules,
even shards only, and the redistribution steps the cost model prices."""
from __future__ import annotations

from conftest import captured_example
from torch.distributed.tensor import Partial, Replicate, Shard

from dtplan.ir.graph import TensorMeta
from dtplan.planner.space._dtensor import parse_placement, transform_steps
from dtplan.planner.cost.device import load_profile
from dtplan.planner.cost.pricing import Pricer
from dtplan.planner.space.strategies import build_strategies, valid_on

import torch


def _space(name, mesh, **opts):
    c = captured_example(name, **opts)
    return c.graph, build_strategies(c.graph, mesh, {})


def test_mm_offers_megatron_column_and_row_parallel():
    g, space = _space("mlp", (4,))
    mm = [n for n in g if n.op_name == "aten.mm.default"]
    opts = {(s.inputs, s.output) for s in space.nodes[mm[0].name].options}
    # column parallel: x replicated, W^T sharded on its columns -> output sharded on features
    assert (((Replicate(),), (Shard(1),)), (Shard(1),)) in opts
    # row parallel: x and W^T sharded on the contraction dim -> partial sum
    assert (((Shard(1),), (Shard(0),)), (Partial("sum"),)) in opts


def test_every_strategy_shards_evenly_and_uses_plain_placements():
    g, space = _space("gpt", (2, 2))
    for n in g:
        for s in space.nodes[n.name].options:
            if n.tensor_meta is not None and not isinstance(s.output[0], tuple):
                assert valid_on(s.output, n.tensor_meta, (2, 2)), (n.name, s)
            for pl in s.inputs:
                assert all(type(p) in (Shard, Replicate, Partial) for p in pl)


def test_attention_can_be_head_sharded_by_our_rule():
    g, space = _space("gpt", (4,))
    sdpa = next(n for n in g if n.op_name == "aten.scaled_dot_product_attention.default")
    ns = space.nodes[sdpa.name]
    assert ns.source == "dtplan"
    assert any(s.output == (Shard(1),) and s.inputs == ((Shard(1),),) * 3 for s in ns.options)
    assert space.fallbacks == ()


def test_uneven_shards_are_not_offered():
    meta = TensorMeta((6, 8), (8, 1), torch.float32)
    assert not valid_on((Shard(0),), meta, (4,))
    assert valid_on((Shard(1),), meta, (4,))
    assert not valid_on((Shard(1), Shard(1)), meta, (4, 4))


def test_redistribution_steps_and_their_price():
    meta = TensorMeta((8, 16), (16, 1), torch.float32)
    pricer = Pricer((2, 4), load_profile("h100"))
    P = parse_placement
    steps = transform_steps((2, 4), meta, (P("S(0)"), P("P(sum)")), (P("R"), P("R")))
    assert [s.kind for s in steps] == ["all_reduce", "all_gather"] or [s.kind for s in steps] == ["all_gather", "all_reduce"]
    colls = pricer.redistribute(meta, (P("R"), P("P(sum)")), (P("R"), P("S(1)")))
    assert [(c.kind, c.axis, c.bytes) for c in colls] == [("reduce_scatter", 1, 8 * 16 * 4)]
    assert pricer.redistribute(meta, (P("R"), P("R")), (P("S(0)"), P("S(1)"))) == ()


def test_redistribution_steps_do_not_depend_on_the_shape():
    # transform_steps asks DTensor once per (mesh, rank, placements): every
    # shape, uneven ones included, must get the steps DTensor plans for it
    # (then reordered where reductions span several axes: `_hierarchical`,
    # tests/test_runtime.py)
    import itertools

    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor._dtensor_spec import TensorMeta as DTMeta
    from torch.distributed.tensor._redistribute import _gen_transform_infos

    from dtplan.planner.space._dtensor import _steps, planning_mesh

    mesh_shape = (2, 4)
    mesh = planning_mesh(mesh_shape)
    singles = [Replicate(), Partial("sum"), Shard(0), Shard(1)]
    for shape in [(8, 16), (6, 5), (3, 12)]:
        meta = TensorMeta(shape, (shape[1], 1), torch.float32)
        dt_meta = DTMeta(shape, (shape[1], 1), torch.float32)
        for src, dst in itertools.product(itertools.product(singles, repeat=2), repeat=2):
            if src == dst:
                continue
            infos = _gen_transform_infos(DTensorSpec(mesh, src, tensor_meta=dt_meta), DTensorSpec(mesh, dst, tensor_meta=dt_meta))
            theirs = []
            for i in infos:
                a, b = i.src_dst_placements
                if a.is_shard() and b.is_partial():
                    theirs += [(i.mesh_dim, a, Replicate()), (i.mesh_dim, Replicate(), b)]
                else:
                    theirs.append((i.mesh_dim, a, b))
            ours = [(s.axis, s.src, s.dst) for s in _steps(mesh_shape, len(shape), src, dst)]
            assert ours == theirs, (shape, src, dst)
            reordered = [(s.axis, s.src, s.dst) for s in transform_steps(mesh_shape, meta, src, dst)]
            assert sorted(reordered, key=str) == sorted(ours, key=str), (shape, src, dst)  # small values: the same steps


def test_strategies_skip_dtensors_pricing_and_offer_the_same_placements(monkeypatch):
    """The planner reads DTensor's strategies' placements only, so DTensor's
    own pricing of each is skipped while a strategy function runs: the
    strategies offered are the same either way, and the pricing is back
    afterwards for eager DTensor."""
    from torch.distributed.tensor._collective_utils import redistribute_cost
    from torch.distributed.tensor._ops import utils

    from dtplan.planner.space import _dtensor

    priced = []

    def counting(src, dst):
        priced.append(1)
        return 0.0

    g, space = _space("gpt", (2, 2))
    monkeypatch.setattr(_dtensor, "_no_cost", counting)
    again = build_strategies(g, (2, 2), {})
    assert priced, "no strategy function priced a redistribution: the test reaches no DTensor rule"
    assert utils.redistribute_cost is redistribute_cost
    for n in g:
        assert [(s.inputs, s.output) for s in space.nodes[n.name].options] == [(s.inputs, s.output) for s in again.nodes[n.name].options], n.name
    # and with DTensor pricing them itself
    monkeypatch.setattr(_dtensor, "_unpriced", __import__("contextlib").nullcontext)
    full = build_strategies(g, (2, 2), {})
    for n in g:
        assert [(s.inputs, s.output) for s in space.nodes[n.name].options] == [(s.inputs, s.output) for s in full.nodes[n.name].options], n.name
