"""Strided shards (FSDP over tensor parallelism): the layout matches
DTensor's `_StridedShard`, every redistribution into and out of it computes
the right pieces (simulated rank by rank, in one process), and it is priced
as one gather of the local shard, not DTensor's per-axis steps."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from dtplan.ir.graph import TensorMeta
from dtplan.planner.cost.device import collective_time, load_profile
from dtplan.planner.cost.pricing import Pricer
from dtplan.planner.space._dtensor import parse_placement, strided_form_ok, transform_steps
from dtplan.planner.space.strategies import placeholder_options, strided_variants, valid_on
from dtplan.runtime.params import piece


def pl(*texts: str):
    return tuple(parse_placement(t) for t in texts)


def meta(*shape: int, dtype=torch.float32) -> TensorMeta:
    stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
    return TensorMeta(shape=tuple(shape), stride=stride, dtype=dtype)


STRIDED = [
    ((2, 2), ("_S(0,2)", "S(0)")),
    ((4, 2), ("_S(0,2)", "S(0)")),
    ((2, 3), ("_S(1,3)", "S(1)")),
    ((2, 2, 2), ("R", "_S(0,2)", "S(0)")),
    ((2, 3, 2), ("_S(0,2)", "_S(0,2)", "S(0)")),
    ((2, 2, 3), ("_S(0,6)", "S(0)", "S(0)")),
    ((2, 2, 2), ("_S(0,2)", "S(1)", "S(0)")),
]


@pytest.mark.parametrize("mesh,texts", STRIDED)
def test_pieces_are_dtensors_strided_shards(mesh, texts):
    """`runtime.params.piece` takes, at every rank, the rows DTensor's
    offsets say a `_StridedShard` layout holds there."""
    placements = pl(*texts)
    assert strided_form_ok(placements, mesh)
    shape = (24, 36)
    full = torch.arange(math.prod(shape)).reshape(shape)
    for coords in itertools.product(*map(range, mesh)):
        local_shape, offset = _compute_local_shape_and_global_offset(shape, mesh, list(coords), placements)
        got = piece(full, mesh, coords, placements)
        assert tuple(got.shape) == tuple(local_shape)
        want = full[offset[0] : offset[0] + local_shape[0], offset[1] : offset[1] + local_shape[1]]
        assert torch.equal(got, want), (coords, texts)


def test_strided_form():
    assert strided_form_ok(pl("_S(0,8)", "S(0)"), (8, 8))
    assert not strided_form_ok(pl("_S(0,4)", "S(0)"), (8, 8))  # split factor: the plain axes' sizes
    assert not strided_form_ok(pl("S(0)", "_S(0,8)"), (8, 8))  # nothing shards it plainly after
    assert not strided_form_ok(pl("_S(0,8)", "R"), (8, 8))
    assert not strided_form_ok(pl("S(0)", "_S(0,2)", "S(0)"), (2, 2, 2))  # a plain axis before
    m = meta(16, 12)
    assert valid_on(pl("_S(0,2)", "S(0)"), m, (4, 2)) and not valid_on(pl("_S(1,2)", "S(1)"), m, (4, 2))  # 12 % 8
    assert strided_variants(pl("S(0)", "S(0)", "S(0)"), (2, 2, 2)) == [pl("_S(0,4)", "S(0)", "S(0)"), pl("_S(0,2)", "_S(0,2)", "S(0)")]
    opts = placeholder_options(m, (2, 2), with_strided=True)
    assert pl("_S(0,2)", "S(0)") in opts and pl("_S(1,2)", "S(1)") in opts
    assert not any("_S" in str(p) for o in placeholder_options(m, (2, 2)) for p in o)


# ---------------------------------------------------------------------- simulated ranks


def _simulate(full: torch.Tensor, mesh, src, dst) -> dict:
    """Every rank's local tensor after running the planned steps from `src`,
    each collective computed over its mesh-axis group."""
    coords_all = list(itertools.product(*map(range, mesh)))
    local = {}
    for c in coords_all:
        x = piece(full, mesh, c, tuple(p if not p.is_partial() else parse_placement("R") for p in src))
        for a, p in enumerate(src):  # a Partial axis: rank 0 of it holds 3x, the others -2x/(n-1)
            if p.is_partial():
                x = x * (3.0 if c[a] == 0 else -2.0 / (mesh[a] - 1))
        local[c] = x.to(torch.float64)
    for step in transform_steps(mesh, meta(*full.shape), src, dst):
        a, kind = step.axis, step.kind
        new = {}
        for c in coords_all:
            group = [c[:a] + (k,) + c[a + 1 :] for k in range(mesh[a])]
            mine = local[c]
            if kind == "all_gather":
                new[c] = torch.cat([local[g] for g in group], step.src.dim)
            elif kind == "all_reduce":
                new[c] = sum(local[g] for g in group)
            elif kind == "reduce_scatter":
                new[c] = sum(local[g] for g in group).chunk(mesh[a], step.dst.dim)[c[a]]
            elif kind == "all_to_all":
                new[c] = torch.cat([local[g].chunk(mesh[a], step.dst.dim)[c[a]] for g in group], step.src.dim)
            elif step.src.is_replicate() and step.dst.is_partial():
                new[c] = mine if c[a] == 0 else torch.zeros_like(mine)
            elif step.src.is_replicate():
                new[c] = mine.chunk(mesh[a], step.dst.dim)[c[a]]
            else:
                raise AssertionError(step)
        local = new
    return local


PAIRS = [
    ((2, 2), ("_S(0,2)", "S(0)"), ("R", "S(0)")),  # FSDP's forward gather
    ((2, 2), ("P(sum)", "S(0)"), ("_S(0,2)", "S(0)")),  # its gradient reduce-scatter
    ((4, 2), ("P(sum)", "R"), ("_S(0,2)", "S(0)")),
    ((2, 2), ("_S(0,2)", "S(0)"), ("R", "R")),
    ((2, 2), ("S(0)", "S(0)"), ("_S(0,2)", "S(0)")),
    ((2, 2), ("_S(0,2)", "S(0)"), ("S(1)", "S(0)")),
    ((2, 2), ("_S(1,2)", "S(1)"), ("_S(0,2)", "S(0)")),
    ((2, 2, 2), ("P(sum)", "P(sum)", "S(0)"), ("_S(0,2)", "_S(0,2)", "S(0)")),
    ((2, 2, 2), ("_S(0,2)", "_S(0,2)", "S(0)"), ("R", "R", "S(0)")),
    ((2, 2, 2), ("R", "_S(0,2)", "S(0)"), ("S(0)", "S(1)", "R")),
    ((2, 3, 2), ("P(sum)", "S(1)", "S(0)"), ("_S(0,2)", "S(1)", "S(0)")),
]


@pytest.mark.parametrize("mesh,src,dst", PAIRS)
def test_redistribution_steps_compute_the_target_pieces(mesh, src, dst):
    full = torch.randn(24, 24, dtype=torch.float64)
    src, dst = pl(*src), pl(*dst)
    local = _simulate(full, mesh, src, dst)
    for c, x in local.items():
        want = piece(full, mesh, c, tuple(p if not p.is_partial() else parse_placement("R") for p in dst))
        torch.testing.assert_close(x, want, msg=f"rank {c}: {src} -> {dst}")


# ---------------------------------------------------------------------- pricing


def test_fsdp_over_tp_costs_one_gather_of_the_tp_shard():
    """The 8b's output head (128256 x 4096, fp32) on dp=8, tp=8: gathering
    it on dp from the strided layout is one all-gather of the tp shard on
    dp; from S(0),S(0) DTensor's steps gather tp, then dp, then re-chunk."""
    pricer = Pricer((8, 8), load_profile("h100"))
    m = meta(128256, 4096)
    tp_shard = 128256 * 4096 * 4 // 8
    dp_link = pricer.links[0]
    got = pricer.redistribute(m, pl("_S(0,8)", "S(0)"), pl("R", "S(0)"))
    assert [(c.kind, c.axis, c.bytes) for c in got] == [("all_gather", 0, tp_shard)]
    assert got[0].time_s == collective_time("all_gather", tp_shard, 8, dp_link)
    back = pricer.redistribute(m, pl("P(sum)", "S(0)"), pl("_S(0,8)", "S(0)"))
    assert [(c.kind, c.axis, c.bytes) for c in back] == [("reduce_scatter", 0, tp_shard)]
    assert back[0].time_s == collective_time("reduce_scatter", tp_shard, 8, dp_link)
    nested = pricer.redistribute_s(m, pl("S(0)", "S(0)"), pl("R", "S(0)"))
    assert nested > 5 * got[0].time_s
    # the same bytes per device as the nested layout
    assert pricer.bytes_per_device(m, pl("_S(0,8)", "S(0)")) == pricer.bytes_per_device(m, pl("S(0)", "S(0)")) == tp_shard // 8
