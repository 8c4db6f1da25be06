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
rows taking turns a few steps at a time (`--rounds`: this machine's speed
drifts over seconds), and the row's measured step is the slowest rank's
median after warm-up. Prints
predicted (the overlapped step, `cost.overlapped_s`), measured and their
ratio per row, then the median and worst |predicted / measured - 1|.

The same rows run on one rank (mesh 1, one thread: a single device) as the
baseline: each plan's measured step beside the single-device step of the
same program, since the planner may always choose not to shard.

    .venv/bin/python bench/fidelity.py                       # calibrate, then meshes 2 and 4
    .venv/bin/python bench/fidelity.py --profile prof.json --meshes 2

Peak memory: the gloo/CPU path reports none (no allocator statistics);
on CUDA the rank's `max_memory_allocated` is printed beside the plan's.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
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


def _time_rank(rank: int, mesh, *, items: list[dict], steps: int, warmup: int, rounds: int = 5) -> list[dict]:
    import torch

    from dtplan.ir.modelfile import load_model_file
    from dtplan.planner.output.plan import Plan
    from dtplan.runtime.program import sharded_program
    from dtplan.runtime.run import _capture
    from dtplan.runtime.train import sharded_trainer

    torch.set_num_threads(1)
    cuda = mesh.device_type == "cuda"
    runs = []
    for item in items:
        mf = load_model_file(item["path"], item["options"])
        plan = Plan.from_json(item["plan_json"])
        train = plan.model.train
        model, inputs = mf.build(meta=False, train=train)
        # the capture the row was planned from, shipped: the ranks do not trace again
        captured = _capture(mf, train=train, precision=plan.precision, remat=plan.remat if train else None, shipped=item["captured"])
        before = torch.cuda.memory_allocated() if cuda else 0
        if train:
            program = sharded_trainer(model, captured, plan, mesh, optimizer=plan.model.optimizer or "adamw").program
        else:
            program = sharded_program(model, captured, plan, mesh)
        local = program.shard_inputs(*inputs)
        # what the row keeps on the device while the others run: its peak is
        # measured over the others' (every row's module stays built)
        resident = torch.cuda.memory_allocated() - before if cuda else 0
        runs.append((program.graph_module, local, resident))

    def step(module, local) -> float:
        if mesh.size() > 1:
            torch.distributed.barrier()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        module(*local)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # the rows take turns, a few steps each round: this machine's speed
    # drifts over seconds, and a row measured in one stretch would carry
    # whatever stretch it fell in
    times: list[list[float]] = [[] for _ in runs]
    peaks = [0] * len(runs)
    with torch.no_grad():
        for module, local, _ in runs:
            for _ in range(warmup):
                step(module, local)
        for r in range(rounds):
            for k, (module, local, resident) in enumerate(runs):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    others = torch.cuda.memory_allocated() - resident
                for _ in range(steps * (r + 1) // rounds - steps * r // rounds):
                    times[k].append(step(module, local))
                if cuda:
                    peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated() - others)
    return [{"median_s": statistics.median(ts), "peak_bytes": peaks[k] if cuda else None} for k, ts in enumerate(times)]


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


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", help="a profile JSON (default: calibrate this machine first)")
    p.add_argument("--meshes", default="2,4", help="comma-separated meshes (default 2,4)")
    p.add_argument("--models", nargs="*", help=f"a subset of {[m for m, _ in MODELS]}")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="turns the rows take, the steps split among them (default 5)")
    args = p.parse_args()

    from dtplan.planner.cost.device import load_profile
    from dtplan.planner.mesh import parse_mesh
    from dtplan.runtime.calibrate import calibrate
    from dtplan.runtime.launch import spawn

    t0 = time.perf_counter()
    given = load_profile(args.profile) if args.profile else None
    profiles: dict[int, object] = {}
    single: dict[str, float] = {}
    errors: dict[str, list[float]] = {}
    for mesh_text in ["1", *args.meshes.split(",")]:
        mesh = parse_mesh(mesh_text)
        ranks = max(2, mesh.size)  # the baseline (one rank) is planned with the 2-rank profile
        if given is None and ranks not in profiles:
            profiles[ranks] = calibrate(ranks, say=None)  # the machine as that many ranks share it
            print(f"calibrated on {ranks} ranks: {profiles[ranks].description}", flush=True)
        profile = given or profiles[ranks]
        rows = _plans(args, profile, mesh)
        items = [dict(path=path, options=options, plan_json=plan.to_json(), captured=captured) for _, path, options, plan, captured in rows]
        print(f"mesh {mesh_text}: planned {len(rows)} rows, running them on {mesh.size} rank(s), one thread each ...", flush=True)
        per_rank = spawn(functools.partial(_time_rank, items=items, steps=args.steps, warmup=args.warmup, rounds=args.rounds), mesh)
        print(f"{'row':<24} {'predicted ms':>12} {'measured ms':>11} {'pred/meas':>9} {'comm ms':>8} {'exposed':>8} {'vs 1 device':>11}")
        for k, (label, _, _, plan, _) in enumerate(rows):
            measured = max(r[k]["median_s"] for r in per_rank)
            predicted = plan.cost.overlapped_s
            ratio = predicted / measured
            if mesh.size == 1:
                single[label] = measured
                versus = ""
            else:
                errors.setdefault(mesh_text, []).append(abs(ratio - 1))
                versus = f"{measured / single[label]:.2f}x" if label in single else "-"
            peak = per_rank[0][k]["peak_bytes"]
            mem = "" if peak is None else f"  peak {peak / 2**20:.1f} MiB measured, {plan.cost.peak_memory_bytes / 2**20:.1f} MiB predicted"
            print(
                f"{label:<24} {predicted * 1e3:12.2f} {measured * 1e3:11.2f} {ratio:9.2f} {plan.cost.comm_s * 1e3:8.2f} "
                f"{plan.cost.exposed_comm_s * 1e3:8.2f} {versus:>11}{mem}",
                flush=True,
            )
    for mesh_text, errs in errors.items():
        print(f"mesh {mesh_text}: {len(errs)} rows, median |pred/meas - 1| {statistics.median(errs):.1%}, worst {max(errs):.1%}")
    print(f"({time.perf_counter() - t0:.0f} s; 'vs 1 device': measured step over the single-device step of the same program)")


if __name__ == "__main__":
    main()
