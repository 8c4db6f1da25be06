"""`dtplan run`: execute a plan for a model file on every rank and check it."""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh

from dtplan.api import sharded_program
from dtplan.modelfile import load_model_file
from ir.capture import Captured, capture
from planner.plan import Plan
from runtime.launch import launched_by_torchrun, process_group, spawn
from runtime.params import local_shard
from runtime.verify import CollectiveRecorder, compare, expected_collectives

__all__ = ["rank_work", "run_many", "run_model_file"]


def rank_work(rank: int, mesh: DeviceMesh, *, path: str, options: Mapping[str, str], plan_json: dict, check: bool) -> dict:
    """One rank: build the real model, shard it, run one step, report."""
    mf = load_model_file(path, options)
    model, inputs = mf.build(meta=False)
    captured = _capture_like_planner(mf)
    plan = Plan.from_json(plan_json)
    program = sharded_program(model, captured, plan, mesh)
    recorder = CollectiveRecorder(mesh, tuple(plan.mesh.axis_names))
    local_inputs = program.shard_inputs(*inputs)
    with recorder:
        outs = program.graph_module(*local_inputs)
    issued = Counter(recorder.calls)
    report = {
        "rank": rank,
        "collectives_issued": sorted([list(k) + [v] for k, v in issued.items()]),
        "collectives_match": issued == expected_collectives(plan),
        "outputs": len(outs),
    }
    if check:
        with torch.no_grad():
            ref = model(*inputs)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        cmps = [compare(o, local_shard(r, mesh, pl)) for o, r, pl in zip(outs, refs, plan.outputs, strict=True)]
        report.update(
            max_abs=max(c.max_abs for c in cmps),
            max_rel=max(c.max_rel for c in cmps),
            numerics_match=all(c.ok for c in cmps),
        )
    return report


def _capture_like_planner(mf) -> Captured:
    """The graph the planner saw: captured on meta (a real-device export may
    differ in layout-driven ops such as clones), with lifted constants taken
    from a real capture."""
    captured = capture(*mf.build(meta=True))
    if captured.constants:
        real = capture(*mf.build(meta=False))
        captured = dataclasses.replace(captured, constants=real.constants)
    return captured


def _many(rank: int, mesh: DeviceMesh, *, items: list[dict]) -> list[dict]:
    return [rank_work(rank, mesh, **item) for item in items]


def run_many(items: list[tuple[str, Plan, Mapping[str, str], bool]]) -> list[list[dict]]:
    """Run several plans (same mesh) in one group of spawned ranks: the start-up
    of a group costs seconds. Returns per rank, per item, the report."""
    meshes = {tuple(p.mesh.shape) for _, p, _, _ in items}
    if len(meshes) != 1:
        raise ValueError(f"run_many needs plans for one mesh, got {sorted(meshes)}")
    payload = [dict(path=str(path), options=dict(opts), plan_json=plan.to_json(), check=check) for path, plan, opts, check in items]
    return spawn(functools.partial(_many, items=payload), items[0][1].mesh)


def run_model_file(path: str, plan: Plan, *, options: Mapping[str, str] | None = None, check: bool = False) -> list[dict]:
    """Run the plan on as many ranks as its mesh has; one report per rank.

    Under torchrun this rank runs alone and returns its own report."""
    work = functools.partial(rank_work, path=str(path), options=dict(options or {}), plan_json=plan.to_json(), check=check)
    if launched_by_torchrun():
        with process_group(plan.mesh) as mesh:
            return [work(mesh.get_rank(), mesh)]
    return spawn(work, plan.mesh)
