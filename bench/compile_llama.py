"""Benchmark: plan the Llama-style example on meta tensors and print stage timings.

    .venv/bin/python bench/compile_llama.py [--layers 8] [--preset 8b] [--mesh 8] [--profile h100]

Prints one row per run: capture, strategies, shrink, solve and evaluate seconds,
ILP size, peak RSS and the predicted step time. Planning only: no weights are
allocated.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtplan import load_model_file, plan_program  # noqa: E402
from ir.capture import capture  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="8b")
    p.add_argument("--layers", default="8", help="comma-separated layer counts")
    p.add_argument("--mesh", default="8", help="comma-separated meshes")
    p.add_argument("--profile", default="h100")
    p.add_argument("--memory", default=None)
    args = p.parse_args()
    head = f"{'preset':>6} {'layers':>6} {'mesh':>8} {'capture':>8} {'strat':>7} {'solve':>7} {'total':>7} {'vars':>7} {'cons':>6} {'method':>14} {'rss MB':>7} {'step ms':>8}"
    print(head)
    for layers in args.layers.split(","):
        for mesh in args.mesh.split(","):
            t0 = time.perf_counter()
            mf = load_model_file(ROOT / "examples" / "llama.py", {"preset": args.preset, "layers": layers})
            captured = capture(*mf.build(meta=True))
            plan = plan_program(captured, mesh=mesh, profile=args.profile, memory=args.memory)
            total = time.perf_counter() - t0
            st, sv = plan.stage_seconds, plan.solver
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"{args.preset:>6} {layers:>6} {mesh:>8} {st['capture']:8.2f} {st['strategies']:7.2f} {st['solve']:7.2f} "
                f"{total:7.2f} {sv['variables']:7d} {sv['constraints']:6d} {sv['method']:>14} {rss:7.0f} {plan.cost['total_s'] * 1e3:8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
