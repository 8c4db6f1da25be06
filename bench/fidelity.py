"""Benchmark: predicted step against measured step, plan by plan.

Plans each example's inference program and training step (fp32 and bf16;
training also with full activation recomputation) on meshes 2 and 4 of
this machine with a profile (`--profile FILE`, else one calibrated here
first for each mesh size, `dtplan calibrate --ranks N`: ranks sharing
cores run slower), with each input split on dim 0 over the mesh
(data arriving per rank). Then runs the lowered programs on that many gloo
ranks, one thread each, all rows in one group per mesh: each rank times
its module (forward, or forward + backward for a training step; the
optimizer is not in the module), ranks starting each step together, the
rows taking turns a few steps at a time, each turn after an untimed step
(`--rounds`: this machine's speed drifts over seconds, and the row before
leaves the shared cache holding its own data), and the row's measured
step is the slowest rank's median after warm-up. Prints predicted (the
overlapped step, `cost.overlapped_s`), measured and their ratio per row,
then the median and worst |predicted / measured - 1|. Standard output is
the table the README shows (a line per mesh, the header, the rows and the
summary lines); progress, the calibration and the total time go to stderr.

Beside each row, in the same turns, the same program planned for one
device is timed twice: on rank 0 alone, the other ranks waiting (one
device of an idle machine: "vs 1 device", with that step's own
predicted / measured), and on every rank at once, each on its own (not
sharding: the all-replicated plan on the mesh's devices as they share
this machine: "vs replicated"). The planner may always choose not to
shard; the benchmark lists the rows slower than either.

    .venv/bin/python bench/fidelity.py                       # calibrate, then meshes 2 and 4
    .venv/bin/python bench/fidelity.py --profile prof.json --meshes 2

The ranks run gloo's threads under the real-time policy where each has a
core of its own (DTPLAN_REALTIME_COMM=1, set here unless the environment
sets it; `dtplan.runtime.launch.realtime_communication`); a profile given
with `--profile` should be calibrated the same way.

Peak memory: the gloo/CPU path reports none (no allocator statistics);
on CUDA the rank's `max_memory_allocated` is printed beside the plan's.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (example, options): sized so one step takes milliseconds, not microseconds
MODELS = (
    ("mlp", {"batch": "256", "d": "512", "hidden": "2048"}),
    ("gpt", {"batch": "16", "seq": "64", "dim": "256", "layers": "2", "vocab": "1024"}),
    ("llama", {"preset": "tiny", "batch": "16", "seq": "64"}),
    ("cnn", {"batch": "32", "size": "32"}),
)
#: (label, train, precision, remat)
MODES = (
    ("infer fp32", False, None, None),
    ("train fp32", True, None, None),
    ("train bf16", True, "bf16", None),
    ("train fp32 remat", True, None, "full"),
)

#: the table's header line; `main` prints it and tests/test_bench_tables.py
#: compares it with the README's table
HEADER = (
    f"{'row':<24} {'predicted ms':>12} {'measured ms':>11} {'pred/meas':>9} {'comm ms':>8} {'exposed':>8} "
    f"{'1 device':>9} {'pred/meas':>9} {'vs 1 device':>11} {'vs replicated':>13}"
)


def _title(mesh_text: str, args: argparse.Namespace) -> str:
    """The line above a mesh's table: what the rows under it ran on."""
    from dtplan.planner.mesh import parse_mesh

    size = parse_mesh(mesh_text).size
    beside = ", each beside its single-device step on rank 0" if size > 1 else ""
    return f"mesh {mesh_text}: {size} rank(s), one thread each, {args.steps} timed steps per row{beside}"


def header(argv: Sequence[str] = ()) -> str:
    """The first mesh's title and the header line, as `main` prints them."""
    args = _parser().parse_args(list(argv))
    return _title(args.meshes.split(",")[0], args) + "\n" + HEADER


def _build(item: dict, mesh):
    """The row's lowered module and its local inputs on `mesh`."""
    import torch

    from dtplan.ir.modelfile import load_model_file
    from dtplan.planner.output.plan import Plan
    from dtplan.runtime.program import sharded_program
    from dtplan.runtime.run import _capture
    from dtplan.runtime.train import sharded_trainer

    mf = load_model_file(item["path"], item["options"])
    plan = Plan.from_json(item["plan_json"])
    train = plan.model.train
    model, inputs = mf.build(meta=False, train=train)
    # the capture the row was planned from, shipped: the ranks do not trace again
    captured = _capture(mf, train=train, precision=plan.precision, remat=plan.remat if train else None, shipped=item["captured"])
    cuda = mesh.device_type == "cuda"
    before = torch.cuda.memory_allocated() if cuda else 0
    if train:
        program = sharded_trainer(model, captured, plan, mesh, optimizer=plan.model.optimizer or "adamw").program
    else:
        program = sharded_program(model, captured, plan, mesh)
    local = program.shard_inputs(*inputs)
    # what the row keeps on the device while the others run: its peak is
    # measured over the others' (every row's module stays built)
    resident = torch.cuda.memory_allocated() - before if cuda else 0
    return program.graph_module, local, resident


def _time_rank(rank: int, mesh, *, items: list[dict], baseline: list[dict], steps: int, warmup: int, rounds: int) -> dict:
    """Times every row on `mesh` and, beside each, the same program planned
    for one device (`baseline`), run two ways in the same turns: by rank 0
    alone, the other ranks waiting at a barrier (one device of an idle
    machine), and by every rank at once, each on its own (not sharding: the
    all-replicated plan, on the mesh's devices as they share the machine)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from dtplan.runtime.host import prioritise_communication

    torch.set_num_threads(1)
    cuda = mesh.device_type == "cuda"
    runs = [_build(item, mesh) for item in items]
    solo = []
    if baseline:
        # every rank makes every one-rank group (new_group is collective)
        groups = [dist.new_group([r]) for r in range(mesh.size())]
        prioritise_communication()  # as the launcher does for the mesh's groups
        one = DeviceMesh.from_group(groups[rank], mesh.device_type, mesh_dim_names=("d0",))
        solo = [_build(item, one) for item in baseline]

    def step(module, local, alone: bool = False) -> float:
        dist.barrier()
        if alone and rank != 0:
            dist.barrier()  # rank 0 runs the single-device step meanwhile
            return 0.0
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        module(*local)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        if alone:
            dist.barrier()
        return elapsed

    # the rows take turns: this machine's speed drifts over seconds, and a
    # row measured in one stretch would carry whatever stretch it fell in.
    # Each turn starts with an untimed step: the row before filled the caches
    # (the L3 is shared by the ranks) with its own data, and a training loop
    # runs one step after another of the same program
    def turn(module, local, n: int, alone: bool = False) -> list[float]:
        step(module, local, alone)
        return [step(module, local, alone) for _ in range(n)]

    times: list[list[float]] = [[] for _ in runs]
    alone_times: list[list[float]] = [[] for _ in baseline]
    replicated_times: list[list[float]] = [[] for _ in baseline]
    peaks = [0] * len(runs)
    with torch.no_grad():
        for k, (module, local, _) in enumerate(runs):
            for _ in range(warmup):
                if baseline:
                    step(*solo[k][:2])
                step(module, local)
        for r in range(rounds):
            for k, (module, local, resident) in enumerate(runs):
                n = steps * (r + 1) // rounds - steps * r // rounds
                if baseline:
                    alone_times[k] += turn(*solo[k][:2], n, alone=True)
                    replicated_times[k] += turn(*solo[k][:2], n)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    others = torch.cuda.memory_allocated() - resident
                times[k] += turn(module, local, n)
                if cuda:
                    peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated() - others)
    return {
        "rows": [{"median_s": statistics.median(ts), "peak_bytes": peaks[k] if cuda else None} for k, ts in enumerate(times)],
        "alone_s": [statistics.median(ts) for ts in alone_times] if rank == 0 else [],
        "replicated_s": [statistics.median(ts) for ts in replicated_times],
    }


def _plans(args, profile, mesh) -> list[tuple[str, str, dict, object, bytes]]:
    from dtplan import load_model_file, plan_program
    from dtplan.ir.capture import to_bytes
    from dtplan.ir.modelfile import capture_model_file
    from dtplan.planner.solver import SolverOptions

    rows = []
    for name, options in MODELS:
        if args.models and name not in args.models:
            continue
        path = str(ROOT / "examples" / f"{name}.py")
        mf = load_model_file(path, options)
        for label, train, precision, remat in MODES:
            if train and mf.loss_fn is None:
                continue
            captured = capture_model_file(mf, train=train, precision=precision)
            plan = plan_program(
                captured, mesh=mesh, profile=profile, input_placements=["S(0)"] * mesh.ndim, remat=remat, solver=SolverOptions(time_limit_s=20)
            )
            rows.append((f"{name} {label}", path, options, plan, to_bytes(captured)))
    return rows


def _items(rows: list[tuple[str, str, dict, object, bytes]]) -> list[dict]:
    """What the ranks build each row from."""
    return [dict(path=path, options=options, plan_json=plan.to_json(), captured=captured) for _, path, options, plan, captured in rows]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", help="a profile JSON (default: calibrate this machine first)")
    p.add_argument("--meshes", default="2,4", help="comma-separated meshes (default 2,4)")
    p.add_argument("--models", nargs="*", help=f"a subset of {[m for m, _ in MODELS]}")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=12, help="turns the rows take, the steps split among them, each after an untimed step (default 12)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    args = _parser().parse_args(argv)

    from dtplan.planner.cost.device import load_profile
    from dtplan.planner.mesh import parse_mesh
    from dtplan.runtime.calibrate import calibrate
    from dtplan.runtime.launch import spawn

    # gloo's threads under the real-time policy (`launch.realtime_communication`),
    # in the calibration's ranks and the measured ones alike, unless set otherwise
    os.environ.setdefault("DTPLAN_REALTIME_COMM", "1")
    print(f"DTPLAN_REALTIME_COMM={os.environ['DTPLAN_REALTIME_COMM']} (gloo threads real-time where each rank has a core)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    given = load_profile(args.profile) if args.profile else None
    profiles: dict[int, object] = {}
    errors: dict[str, list[float]] = {}
    slower: list[str] = []
    slower_replicated: list[str] = []
    for mesh_text in args.meshes.split(","):
        mesh = parse_mesh(mesh_text)
        ranks = max(2, mesh.size)
        if given is None and ranks not in profiles:
            profiles[ranks] = calibrate(ranks, say=None)  # the machine as that many ranks share it
            print(f"calibrated on {ranks} ranks: {profiles[ranks].description}", file=sys.stderr, flush=True)
        profile = given or profiles[ranks]
        rows = _plans(args, profile, mesh)
        # the single-device baseline: the same programs planned on mesh 1 (with
        # the 2-rank profile where there is one: one rank computing while
        # another does), run in the same turns as the mesh's rows
        base_rows = _plans(args, given or profiles.get(2, profile), parse_mesh("1")) if mesh.size > 1 else []
        print(f"mesh {mesh_text}: planned {len(rows)} rows, running them ...", file=sys.stderr, flush=True)
        work = functools.partial(_time_rank, items=_items(rows), baseline=_items(base_rows), steps=args.steps, warmup=args.warmup, rounds=args.rounds)
        per_rank = spawn(work, mesh)
        print(_title(mesh_text, args))
        print(HEADER)
        base_errors = []
        for k, (label, _, _, plan, _) in enumerate(rows):
            measured = max(r["rows"][k]["median_s"] for r in per_rank)
            predicted = plan.cost.overlapped_s
            ratio = predicted / measured
            errors.setdefault(mesh_text, []).append(abs(ratio - 1))
            single = versus = replicated = ""
            if base_rows:
                alone = per_rank[0]["alone_s"][k]
                everyone = max(r["replicated_s"][k] for r in per_rank)  # a step ends with its slowest rank
                base_ratio = base_rows[k][3].cost.overlapped_s / alone
                base_errors.append(abs(base_ratio - 1))
                single, versus, replicated = f"{alone * 1e3:9.2f} {base_ratio:9.2f}", f"{measured / alone:.2f}x", f"{measured / everyone:.2f}x"
                if measured > alone:
                    slower.append(f"{label} on mesh {mesh_text}")
                if measured > everyone:
                    slower_replicated.append(f"{label} on mesh {mesh_text}")
            peak = per_rank[0]["rows"][k]["peak_bytes"]
            mem = "" if peak is None else f"  peak {peak / 2**20:.1f} MiB measured, {plan.cost.peak_memory_bytes / 2**20:.1f} MiB predicted"
            print(
                f"{label:<24} {predicted * 1e3:12.2f} {measured * 1e3:11.2f} {ratio:9.2f} {plan.cost.comm_s * 1e3:8.2f} "
                f"{plan.cost.exposed_comm_s * 1e3:8.2f} {single:>19} {versus:>11} {replicated:>13}{mem}",
                flush=True,
            )
        if base_errors:
            print(f"1 device (rank 0 alone, same turns): median |pred/meas - 1| {statistics.median(base_errors):.1%}, worst {max(base_errors):.1%}")
    for mesh_text, errs in errors.items():
        print(f"mesh {mesh_text}: {len(errs)} rows, median |pred/meas - 1| {statistics.median(errs):.1%}, worst {max(errs):.1%}")
    print(f"slower than one device alone: {', '.join(slower) if slower else 'none'}")
    print(f"slower than not sharding (every rank running the one-device program): {', '.join(slower_replicated) if slower_replicated else 'none'}")
    print(
        f"({time.perf_counter() - t0:.0f} s; 'vs 1 device': the measured step over the same program's single-device step, "
        "rank 0 alone; 'vs replicated': over that step run by every rank at once, the slowest's; both measured in the same turns)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
