"""Benchmark: a training step with communication overlapped
(`dtplan.runtime.overlap`, what `lower` builds) against the same module with
every wait moved back next to its collective (`overlap.serialize`), measured
side by side on real gloo ranks of this machine, one thread each.

    .venv/bin/python bench/overlap.py                       # gpt, FSDP plan, mesh 2
    .venv/bin/python bench/overlap.py --mesh 4 --steps 30 --model-arg dim=256

A third module is lowered from the same plan with its gradient buckets
taken apart (`PlannedCollective.bucket` cleared: one collective per
gradient, still overlapped), so the same run measures what bucketing gives.

Each rank builds the modules from one plan, warms them up, then times them
alternately (so machine noise hits all alike) and reports each one's median
step; the benchmark prints the medians per rank and their ratios
(serialized / overlapped and unbucketed / overlapped: above 1 means overlap,
or bucketing, helps). `--plan dp` takes the data-parallel plan (parameters
replicated: all-reduce buckets) instead of FSDP (reduce-scatter buckets).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the per-rank table's header line, as `main` prints it
HEADER = (
    f"{'rank':>4} {'waits moved':>11} {'overlapped ms':>13} {'serialized ms':>13} {'unbucketed ms':>13} "
    f"{'serialized/overlapped':>21} {'unbucketed/overlapped':>21}"
)


def header(argv: Sequence[str] = ()) -> str:
    """The header line `main` prints for these arguments."""
    _parser().parse_args(list(argv))
    return HEADER


def work(rank: int, mesh, *, path: str, options: dict, plan_json: dict, steps: int) -> dict:
    import torch

    from dtplan.ir.modelfile import capture_model_file, load_model_file
    from dtplan.planner.output.plan import Plan
    from dtplan.runtime.overlap import collective_waits, serialize
    from dtplan.runtime.train import sharded_trainer

    torch.set_num_threads(1)
    mf = load_model_file(path, options)
    plan = Plan.from_json(plan_json)
    apart = dataclasses.replace(plan, collectives=tuple(dataclasses.replace(c, bucket=None) for c in plan.collectives))
    captured = capture_model_file(mf, train=True)
    trainers = {}
    for name, p in (("overlapped", plan), ("serialized", plan), ("unbucketed", apart)):
        model, inputs = mf.build(meta=False, train=True)
        trainers[name] = sharded_trainer(model, captured, p, mesh, optimizer="sgd", lr=1e-3)
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "examples" / "gpt.py"))
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--mesh", default="2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--plan", choices=("fsdp", "dp"), default="fsdp", help="FSDP (default) or data parallel")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    args = _parser().parse_args(argv)
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
    name = {"fsdp": "FSDP", "dp": "data parallel"}[args.plan]
    pins = classic_pins(captured, mesh)[name]
    plan = plan_program(captured, mesh=mesh, parameter_placements=pins, input_placements=["S(0)"] + ["R"] * (mesh.ndim - 1))
    kinds = sorted({c.kind for c in plan.collectives})
    bucketed = [c for c in plan.collectives if c.bucket is not None]
    print(
        f"{Path(args.model).name} {options} on mesh {args.mesh}, {name} plan: {len(plan.collectives)} collectives ({', '.join(kinds)}), "
        f"{len(bucketed)} of them in {len({c.bucket for c in bucketed})} gradient bucket(s), {args.steps} timed steps",
        flush=True,
    )
    rows = spawn(functools.partial(work, path=args.model, options=options, plan_json=plan.to_json(), steps=args.steps), mesh)
    print(HEADER)
    for r in rows:
        print(
            f"{r['rank']:>4} {r['waits_moved']:>5} of {r['collectives']:<3} {r['overlapped'] * 1e3:13.2f} {r['serialized'] * 1e3:13.2f} "
            f"{r['unbucketed'] * 1e3:13.2f} {r['serialized'] / r['overlapped']:21.3f} {r['unbucketed'] / r['overlapped']:21.3f}"
        )


if __name__ == "__main__":
    main()
