"""Lower a plan for one rank of any mesh in this process: no GPUs, no other
processes, no weights.

`lower_abstract(captured, plan, rank)` gives the GraphModule rank `rank`
would run (`dtplan.runtime.lower.lower`: local ATen ops and `_c10d_functional`
collectives), for a 64-rank mesh as easily as for a 4-rank one, on a laptop:

- the process group is torch's *fake* backend (`FakeProcessGroup`: every
  rank's groups exist in this process, nothing is ever sent), created for
  the call and destroyed after it;
- every tensor is a FakeTensor while tracing (shapes, no storage), so an 8B
  model allocates no parameter memory;
- the DeviceMesh has the plan's shape and axis names, this rank's
  coordinates, and one (fake) process group per mesh axis.

What you get: a `torch.fx.GraphModule` whose placeholders are the user
inputs' local shards (in the captured order) and whose outputs are the local
shards in the plan's output placements, exactly as `dtplan.runtime.lower.lower`
builds it for a real run. Stored tensors (parameters, buffers, constants)
are attributes named by `dtplan.runtime.lower.attr_name`, holding *meta* tensors of
this rank's local shape (parameters as `nn.Parameter`): inspect their
shapes, or `gm.to_empty(device=...)` to give them (uninitialised) storage.
Every node's `meta["val"]` is a FakeTensor with the local shape (from the
trace). The collectives name the fake group's process groups, so the module
is for inspection and accounting, not for running on a real group.
`gm.meta["dtplan_lowering"]` records the rank, its mesh coordinates, the
mesh axis of each group name and the seconds each stage took;
`graph_collectives(gm)` counts the collectives the module issues in the
plan's terms. The module's Python code is generated lazily, on first read
of `gm.code` (or first call); `codegen=True` generates it here (about a
quarter of the lowering time for the 32-layer Llama-3-8B training step).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dtplan.ir.capture import Captured
from dtplan.ir.graph import Role
from dtplan.planner.mesh import MeshSpec
from dtplan.planner.output.plan import Plan
from dtplan.planner.cost.pricing import local_shape
from dtplan.runtime._fake import FakeTensorMode, init_fake_process_group
from dtplan.runtime.lower import _attach_stored, stored_names, trace
from dtplan.runtime.overlap import overlap as schedule
from dtplan.runtime.replay import generate_code
from dtplan.runtime.watch import KINDS as _KINDS

__all__ = ["AbstractLoweringError", "fake_device_mesh", "fake_process_group", "graph_collectives", "lower_abstract"]



class AbstractLoweringError(RuntimeError):
    """This process cannot host the fake process group (a real one is up)."""


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """The default process group is a fake one of `world_size` ranks, this
    process being `rank`, for the duration of the block.

    A fake group of that size and rank already initialised is reused (and
    left up); one created here is destroyed on exit. Any other initialised
    group (gloo, NCCL, a fake one of another size) is left alone and the
    call fails: torch allows one default group per process."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a mesh of {world_size} ranks")
    if dist.is_initialized():
        backend, size, me = dist.get_backend(), dist.get_world_size(), dist.get_rank()
        if backend == "fake" and size == world_size and me == rank:
            yield
            return
        raise AbstractLoweringError(
            f"a process group is already initialised in this process (backend {backend!r}, rank {me} of {size}); "
            f"abstract lowering needs its own fake group of {world_size} ranks as rank {rank}: run it in a process "
            "without one (e.g. before init_process_group, or in a subprocess)"
        )
    init_fake_process_group(world_size, rank)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def fake_device_mesh(mesh: MeshSpec, rank: int = 0, device_type: str = "cpu") -> Iterator[DeviceMesh]:
    """A DeviceMesh of `mesh`'s shape and axis names, as rank `rank` sees
    it, over a fake process group (see `fake_process_group`)."""
    with fake_process_group(math.prod(mesh.shape), rank):
        yield init_device_mesh(device_type, tuple(mesh.shape), mesh_dim_names=tuple(mesh.axis_names))


def lower_abstract(
    captured: Captured, plan: Plan, rank: int = 0, *, device_type: str = "cpu", codegen: bool = False, overlap: bool = True
) -> torch.fx.GraphModule:
    """Rank `rank`'s sharded GraphModule for `plan`, lowered in this process
    on fake tensors over a fake process group (see the module docstring for
    what the module holds). Leaves no process group behind unless one was
    already up (a fake one of the plan's size and this rank: reused).
    `overlap=False` leaves each wait right after its collective, as traced
    (`lower` always overlaps: `dtplan.runtime.overlap`)."""
    plan.check_matches(captured.graph, plan.mesh)
    seconds: dict[str, float] = {}
    t_all = t = time.perf_counter()
    with fake_device_mesh(plan.mesh, rank, device_type) as mesh:
        seconds["mesh_s"] = time.perf_counter() - t
        coordinate = tuple(mesh.get_coordinate() or ())
        groups = {mesh.get_group(i).group_name: axis for i, axis in enumerate(plan.mesh.axis_names)}
        shape = tuple(plan.mesh.shape)
        names = stored_names(captured)
        order = names + list(captured.user_inputs)
        local = {n: local_shape(captured.graph[n].tensor_meta.shape, shape, plan.nodes[n].output) for n in order}
        dtype = {n: captured.graph[n].tensor_meta.dtype for n in order}
        with FakeTensorMode() as mode:
            examples = [torch.empty(local[n], dtype=dtype[n], device=device_type) for n in order]
        t = time.perf_counter()
        gm = trace(captured, plan, mesh, examples)
        seconds["trace_s"] = time.perf_counter() - t
    del mode, examples
    t = time.perf_counter()
    params = {n for n, role, _ in captured.placeholders if role is Role.PARAM}
    stored = {n: torch.empty(local[n], dtype=dtype[n], device="meta") for n in names}
    _attach_stored(gm, names, stored, params)
    seconds["attach_s"] = time.perf_counter() - t
    if overlap:
        t = time.perf_counter()
        schedule(gm)  # as `lower` orders a real rank's module
        seconds["overlap_s"] = time.perf_counter() - t
    if codegen:
        t = time.perf_counter()
        generate_code(gm)
        seconds["codegen_s"] = time.perf_counter() - t
    seconds["total_s"] = time.perf_counter() - t_all
    gm.meta["dtplan_lowering"] = {
        "rank": rank,
        "coordinate": coordinate,
        "mesh": plan.mesh.to_json(),
        "groups": groups,
        "nodes": len(gm.graph.nodes),
        "fragments": gm.meta.get("dtplan_fragments"),
        "seconds": seconds,
    }
    return gm


def graph_collectives(gm: torch.fx.GraphModule) -> Counter:
    """The collectives a module from `lower_abstract` issues per call, as
    `Counter((kind, axis, bytes))` in the plan file's convention (bytes of
    the input; all-gather counts its output), comparable with
    `dtplan.runtime.verify.expected_collectives(plan)`."""
    info = gm.meta["dtplan_lowering"]
    groups, sizes = info["groups"], dict(zip(info["mesh"]["axis_names"], info["mesh"]["shape"], strict=True))
    out: Counter = Counter()
    for node in gm.graph.nodes:
        kind = _KINDS.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        val = node.args[0].meta["val"]
        axis = groups.get(node.args[-1], str(node.args[-1]))
        nbytes = val.numel() * val.element_size()
        out[(kind, axis, nbytes * sizes[axis] if kind == "all_gather" else nbytes)] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m dtplan.runtime.abstract MODEL.py PLAN.json [--rank R] [--train]
    [--model-arg K=V ...] [--codegen]`: lower one rank of a saved plan in
    this process and print the time it took and what the module holds."""
    import argparse
    import json

    from dtplan.ir.modelfile import capture_model_file, load_model_file
    from dtplan.ir.capture import capture
    from dtplan.runtime.verify import expected_collectives

    ap = argparse.ArgumentParser(prog="python -m dtplan.runtime.abstract", description=main.__doc__)
    ap.add_argument("model")
    ap.add_argument("plan")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--train", action="store_true", help="the plan is for the training step")
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--codegen", action="store_true", help="also generate the module's Python code")
    args = ap.parse_args(argv)
    mf = load_model_file(args.model, dict(kv.split("=", 1) for kv in args.model_arg))
    plan = Plan.load(args.plan)
    t = time.perf_counter()
    # inference: the meta capture only (capture_model_file would also build the real model for its constants)
    if args.train:
        captured = capture_model_file(mf, train=True, precision=plan.precision, remat=plan.remat)
    else:
        captured = capture(*mf.build(meta=True), plan.precision)
    capture_s = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    gm = lower_abstract(captured, plan, args.rank, codegen=args.codegen)
    info = dict(gm.meta["dtplan_lowering"])
    info.update(
        capture_s=round(capture_s, 3),
        lower_wall_s=round(time.perf_counter() - t, 3),
        lower_cpu_s=round(time.process_time() - cpu, 3),
        aten_nodes=len(captured.graph),
        collectives=sum(graph_collectives(gm).values()),
        collectives_match_plan=graph_collectives(gm) == expected_collectives(plan),
    )
    info["seconds"] = {k: round(v, 3) for k, v in info["seconds"].items()}
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
