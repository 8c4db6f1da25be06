"""Check a sharded run: collectives issued against the plan, outputs against
the single-device result."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from planner.plan import Plan

__all__ = ["CollectiveRecorder", "compare", "expected_collectives"]

_c10d = torch.ops._c10d_functional
#: functional collective -> the plan's kind of collective
COLLECTIVE_KINDS = _KINDS = {
    _c10d.all_reduce.default: "all_reduce",
    _c10d.all_gather_into_tensor.default: "all_gather",
    _c10d.reduce_scatter_tensor.default: "reduce_scatter",
    _c10d.all_to_all_single.default: "all_to_all",
}


class CollectiveRecorder(TorchDispatchMode):
    """Records every functional collective a run issues as (kind, axis, bytes),
    bytes in the plan-file convention (all-gather counts its output)."""

    def __init__(self, mesh: DeviceMesh, axis_names: tuple[str, ...]) -> None:
        super().__init__()
        self.axes = {mesh.get_group(i).group_name: axis_names[i] for i in range(mesh.ndim)}
        self.sizes = {axis_names[i]: mesh.size(i) for i in range(mesh.ndim)}
        self.calls: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _KINDS.get(func)
        if kind is not None:
            t = args[0]
            group = args[-1] if isinstance(args[-1], str) else kwargs.get("group_name")
            axis = self.axes.get(group, str(group))
            nbytes = t.numel() * t.element_size()
            if kind == "all_gather":
                nbytes *= self.sizes.get(axis, 1)
            self.calls.append((kind, axis, nbytes))
        return func(*args, **(kwargs or {}))


def expected_collectives(plan: Plan) -> Counter:
    return Counter((c.kind, c.axis, c.bytes) for c in plan.collectives)


@dataclass(frozen=True, slots=True)
class Comparison:
    max_abs: float
    max_rel: float
    ok: bool


def compare(
    got: torch.Tensor,
    want: torch.Tensor,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    loose: torch.Tensor | None = None,
    loose_atol: float = 0.0,
) -> Comparison:
    """Largest absolute and relative error, and whether it is within
    tolerance; elements where `loose` is set are held to `loose_atol` only."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return Comparison(float("inf"), float("inf"), False)
    diff = (got - want).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / want.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
    allowed = atol + rtol * want.abs()
    if loose is not None:
        allowed = torch.where(loose.cpu(), torch.full_like(allowed, loose_atol), allowed)
    return Comparison(max_abs, max_rel, bool((diff <= allowed).all()))


def redistribution_selfcheck(rank: int, mesh: DeviceMesh, *, shape: tuple[int, ...], cases: list[tuple[list[str], list[str]]]) -> list[dict]:
    """For each (src, dst) placement pair: build this rank's src piece of a
    known tensor, redistribute it, compare with the dst piece, and compare the
    collectives issued with the ones the planner prices."""
    from ir.graph import TensorMeta
    from planner._dtensor import parse_placement
    from planner.pricing import Pricer
    from planner.cost import load_profile
    from runtime.params import local_shard
    from runtime.redistribute import RankMesh, redistribute_local

    full = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    meta = TensorMeta.of(full)
    names = tuple(f"d{i}" for i in range(mesh.ndim))
    pricer = Pricer(tuple(mesh.shape), load_profile("cpu"))
    rank_mesh = RankMesh.of(mesh)
    out = []
    for src_s, dst_s in cases:
        src = tuple(parse_placement(p) for p in src_s)
        dst = tuple(parse_placement(p) for p in dst_s)
        local = _partial_piece(full, mesh, src)
        rec = CollectiveRecorder(mesh, names)
        with rec:
            got = redistribute_local(local, rank_mesh, meta, src, dst)
        want = local_shard(full, mesh, dst) if not any(p.is_partial() for p in dst) else None
        predicted = Counter((c.kind, names[c.axis], c.bytes) for c in pricer.redistribute(meta, src, dst))
        out.append({
            "src": src_s, "dst": dst_s,
            "values_match": want is None or bool(torch.equal(got, want)),
            "collectives_match": Counter(rec.calls) == predicted,
            "issued": rec.calls,
        })
    return out


def _partial_piece(full: torch.Tensor, mesh: DeviceMesh, placements) -> torch.Tensor:
    """This rank's piece of `full` under placements that may hold Partial(sum):
    shards are cut as usual, a partial axis keeps the value on coordinate 0."""
    from torch.distributed.tensor import Replicate

    from runtime.params import local_shard

    plain = tuple(Replicate() if p.is_partial() else p for p in placements)
    x = local_shard(full, mesh, plain)
    for axis, p in enumerate(placements):
        if p.is_partial() and mesh.get_local_rank(axis) != 0:
            x = torch.zeros_like(x)
    return x
