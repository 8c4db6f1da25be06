"""Benchmark: a training step with communication overlapped
(`dtplan.runtime.overlap`, what `lower` builds) against the same module with
every wait moved back next to its collective (`overlap.serialize`), measured
side by side on real gloo ranks of this machine, one thread each.

    .venv/bin/python bench/overlap.py                       # gpt, FSDP plan, mesh 2
    .venv/bin/python bench/overlap.py --mesh 4 --steps 30 --model-arg dim=256

Each rank builds both modules from one plan, warms them up, then times them
alternately (so machine noise hits both alike) and reports each one's median
step; the benchmark prints the medians per rank and their ratio
(serialized / overlapped: above 1 means overlap helps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def work(rank: int, mesh, *, path: str, options: dict, plan_json: dict, steps: int) -> dict:
    import torch

    from dtplan.ir.modelfile import capture_model_file, load_model_file
    from dtplan.planner.output.plan import Plan
    from dtplan.runtime.overlap import collective_waits, serialize
    from dtplan.runtime.train import sharded_trainer

    torch.set_num_threads(1)
    mf = load_model_file(path, options)
    plan = Plan.from_json(plan_json)
    captured = capture_model_file(mf, train=True)
    trainers = {}
    for name in ("overlapped", "serialized"):
        model, inputs = mf.build(meta=False, train=True)
        trainers[name] = sharded_trainer(model, captured, plan, mesh, optimizer="sgd", lr=1e-3)
    serialize(trainers["serialized"].program.graph_module)
    gm = trainers["overlapped"].program.graph_module
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    ahead = sum(1 for c, w in collective_waits(gm) if w is not None and order[w] > order[c] + 1)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i in range(steps + 3):
        for name, trainer in trainers.items():
            t = time.perf_counter()
            trainer.step(*inputs)
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - t)
    return {"rank": rank, "waits_moved": ahead, "collectives": len(collective_waits(gm)), **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "examples" / "gpt.py"))
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--mesh", default="2")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    import functools

    from dtplan import load_model_file, plan_program
    from dtplan.ir.modelfile import capture_model_file
    from dtplan.planner.mesh import parse_mesh
    from dtplan.planner.output.classic import classic_pins
    from dtplan.runtime.launch import spawn

    options = dict(a.split("=", 1) for a in (args.model_arg or ["batch=16", "seq=128", "dim=256"]))
    mf = load_model_file(args.model, options)
    captured = capture_model_file(mf, train=True)
    mesh = parse_mesh(args.mesh)
    pins = classic_pins(captured, mesh)["FSDP"]
    plan = plan_program(captured, mesh=mesh, parameter_placements=pins, input_placements=["S(0)"] + ["R"] * (mesh.ndim - 1))
    kinds = sorted({c.kind for c in plan.collectives})
    print(f"{Path(args.model).name} {options} on mesh {args.mesh}, FSDP plan: {len(plan.collectives)} collectives ({', '.join(kinds)}), {args.steps} timed steps", flush=True)
    rows = spawn(functools.partial(work, path=args.model, options=options, plan_json=plan.to_json(), steps=args.steps), mesh)
    print(f"{'rank':>4} {'waits moved':>11} {'overlapped ms':>13} {'serialized ms':>13} {'serialized/overlapped':>21}")
    for r in rows:
        print(f"{r['rank']:>4} {r['waits_moved']:>5} of {r['collectives']:<3} {r['overlapped'] * 1e3:13.2f} {r['serialized'] * 1e3:13.2f} {r['serialized'] / r['overlapped']:21.3f}")


if __name__ == "__main__":
    main()
