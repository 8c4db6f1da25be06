"""Runs on every rank of a spawned group (tests/test_runtime.py): each
redistribution of a known tensor gives the destination piece, through the
collectives the planner prices."""
from __future__ import annotations

from collections import Counter

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate

from dtplan.ir.graph import TensorMeta
from dtplan.planner.cost.device import load_profile
from dtplan.planner.cost.pricing import Pricer
from dtplan.planner.space._dtensor import parse_placement
from dtplan.runtime.params import local_shard
from dtplan.runtime.redistribute import RankMesh, redistribute_local
from dtplan.runtime.verify import CollectiveRecorder


def redistribution_selfcheck(rank: int, mesh: DeviceMesh, *, shape: tuple[int, ...], cases: list[tuple[list[str], list[str]]]) -> list[dict]:
    """For each (src, dst) placement pair: build this rank's src piece of a
    known tensor, redistribute it, compare with the dst piece, and compare the
    collectives issued with the ones the planner prices."""
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
    plain = tuple(Replicate() if p.is_partial() else p for p in placements)
    x = local_shard(full, mesh, plain)
    for axis, p in enumerate(placements):
        if p.is_partial() and mesh.get_local_rank(axis) != 0:
            x = torch.zeros_like(x)
    return x
