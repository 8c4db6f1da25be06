"""Benchmark: capture, plan and lower the Llama-style example's training step
at scale, in one process, on fake tensors (no weights, no GPUs).

    .venv/bin/python bench/compile_llama.py                      # the issue's table
    .venv/bin/python bench/compile_llama.py --runs 8b:32:8x8     # one row
    .venv/bin/python bench/compile_llama.py --runs 8b:32:8x8 --memory 80GiB --no-lower
    .venv/bin/python bench/compile_llama.py --precision bf16 --runs 8b:32:8,8b:32:8x8:80GiB
    .venv/bin/python bench/compile_llama.py --precision bf16 --remat full --runs 8b:32:8:80GiB,70b:80:8x8:80GiB
    .venv/bin/python bench/compile_llama.py --precision bf16 --remat selective --runs 8b:32:8:80GiB --recipes
    .venv/bin/python bench/compile_llama.py --precision bf16 --remat full --local-batch 2 --no-lower --recipes \
        --runs 70b:80:8x8:80GiB,70b:80:8x8x8:80GiB,70b:80:16x8:80GiB,70b:80:4x8x8x2

Each row runs in a fresh process (so peak RSS is that row's) and prints:
capture seconds (stamped joint graph, `dtplan.ir.stamp`), build seconds (strategies,
shrinking, folding and the integer program), solve seconds (HiGHS, or
CP-SAT when the LP is fractional), lowering seconds (rank 0's sharded
GraphModule on the fake process group, `dtplan.runtime.abstract`), the program's
variables and constraints, layers folded, peak RSS and the predicted step
time, tokens per second per device (batch x seq / step / devices) and peak
memory per device. A row that fails prints its one-line error instead.
With --local-batch N the global batch grows with the mesh, as real runs do:
N sequences per data-parallel rank, the mesh's devices over its last axis
(8x8: 8 ranks, batch 8N; 8x8x8: 64, batch 64N; 4x8x8x2: 256, batch 256N).
The ``outer`` column is the time meshes of three or more axes spend
planning blocks of their real axes again (`dtplan.api._plan_outer_axes`).
With --recipes, each torchtitan recipe that applies (`planner/output/classic.py`:
``torchtitan FSDP``, on two or more axes ``torchtitan FSDP+TP``, and on three
or more its HSDP layout ``torchtitan HSDP+TP``) is planned
with its parameters pinned, under the row's precision and recomputation and no
budget, and printed under the row: its step, tokens/s per device, peak memory,
whether it fits the row's budget and whether the row's settings are the recipe's
own (``as published``) or only its layout.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: preset:layers:mesh[:budget]: the issue's meshes per preset, then growth with
#: depth. The example trains in fp32 without activation checkpointing at batch
#: 16 x 8192 by default, so only 8b on 8x8 fits 80 GiB per device (asked for
#: 80 GiB, the planner names the least memory a plan needs); the other rows run
#: without a budget. With --precision bf16 --remat, 8b on 8 and 70b on 8x8 fit
#: 80 GiB (README).
DEFAULT_RUNS = (
    "8b:32:8,8b:32:8x8:80GiB,8b:32:4x4x4,70b:80:8x8,70b:80:8x8x8,"
    "8b:2:8x8:80GiB,8b:8:8x8:80GiB"
)

#: the table's header line; `main` prints it (the recipe rows under a row
#: align with its step column) and tests/test_bench_tables.py compares it
#: with the README's tables
HEADER = (
    f"{'preset':>6} {'layers':>6} {'mesh':>7} {'budget':>7} {'batch':>5} {'capture':>8} {'build':>6} {'solve':>6} {'outer':>6} {'lower':>6} "
    f"{'total':>6} {'vars':>7} {'cons':>6} {'folded':>6} {'method':>18} {'rss MB':>7} {'step ms':>8} {'tok/s/dev':>9} {'peak GiB':>8}"
)


def header(argv: Sequence[str] = ()) -> str:
    """The header line `main` prints for these arguments."""
    _parser().parse_args(list(argv))
    return HEADER


def one(
    preset: str, layers: str, mesh: str, memory: str | None, lower: bool, time_limit: float, precision: str | None = None, remat: str | None = None,
    recipes: bool = False, local_batch: int | None = None,
) -> dict:
    """Capture, plan and lower one configuration (in this process)."""
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    from dtplan import load_model_file, plan_program
    from dtplan.ir.modelfile import capture_model_file
    from dtplan.planner.solver import SolverOptions

    t0 = time.perf_counter()
    options = {"preset": preset, "layers": layers}
    if local_batch:
        from dtplan.planner.mesh import parse_mesh

        spec = parse_mesh(mesh)
        options["batch"] = str(local_batch * spec.size // spec.shape[-1])
    mf = load_model_file(ROOT / "examples" / "llama.py", options)
    captured = capture_model_file(mf, train=True, precision=precision)
    capture_s = time.perf_counter() - t0
    plan = plan_program(captured, mesh=mesh, profile="h100", memory=memory, solver=SolverOptions(time_limit_s=time_limit), remat=remat)
    st = plan.stage_seconds
    lower_s = None
    if lower:
        from dtplan.runtime.abstract import lower_abstract

        from dtplan.ir.remat import remat as apply_remat

        t = time.perf_counter()
        lower_abstract(apply_remat(captured, plan.remat), plan, rank=0)
        lower_s = time.perf_counter() - t
    sv = plan.solver
    tokens = _tokens(mf)
    rows = _recipes(captured, plan, tokens, time_limit) if recipes else []
    return {
        "batch": int(options.get("batch", 0)) or _batch(mf),
        "recipes": rows,
        "capture": capture_s,
        "build": st["strategies"] + st["shrink"] + st["build"] + st.get("remat_search", 0.0),
        "solve": st["solve"],
        "outer": st.get("outer_axes"),
        "lower": lower_s,
        "total": time.perf_counter() - t0,
        "variables": sv.variables,
        "constraints": sv.constraints,
        "folded": sv.layers_folded,
        "method": sv.method,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_ms": plan.cost.total_s * 1e3,
        "tokens_per_s_device": tokens / plan.cost.total_s / plan.mesh.size,
        "remat": str(plan.remat),
        "peak_gib": plan.cost.peak_memory_bytes / 2**30,
    }


def _recipes(captured, plan, tokens: int, time_limit: float) -> list[dict]:
    """torchtitan's recipes with their parameters pinned, under the plan's
    precision and recomputation, no budget (as the comparison plans them)."""
    from dtplan import plan_program
    from dtplan.ir.remat import remat as apply_remat
    from dtplan.planner.output.classic import RECIPES, TORCHTITAN_HSDP, classic_pins
    from dtplan.planner.solver import SolverOptions

    recomputed = apply_remat(captured, plan.remat)
    out = []
    for name, pins in classic_pins(captured, plan.mesh).items():
        if name not in RECIPES and name != TORCHTITAN_HSDP:
            continue
        t = time.perf_counter()
        pinned = plan_program(captured, mesh=plan.mesh, profile="h100", parameter_placements=pins, remat=plan.remat, solver=SolverOptions(time_limit_s=time_limit))
        budget = plan.memory_budget_bytes
        out.append({
            "name": name,
            "seconds": time.perf_counter() - t,
            "step_ms": pinned.cost.total_s * 1e3,
            "tokens_per_s_device": tokens / pinned.cost.total_s / plan.mesh.size,
            "peak_gib": pinned.cost.peak_memory_bytes / 2**30,
            "fits": budget is None or pinned.cost.peak_memory_bytes <= budget,
            "as_published": name in RECIPES and RECIPES[name].as_published(recomputed),
        })
    return out


def _recipe_row(r: dict) -> str:
    fits = "fits" if r["fits"] else "does not fit"
    how = "as published" if r["as_published"] else "layout only"
    label = f"{'':>15}vs {r['name']} ({how}, planned in {r['seconds']:.1f} s)"
    return f"{label:<129}{r['step_ms']:8.1f} {r['tokens_per_s_device']:9.0f} {r['peak_gib']:8.1f}  {fits}"


def _batch(mf) -> int:
    _, inputs = mf.build(meta=True)
    return inputs[0].shape[0]


def _tokens(mf) -> int:
    """Tokens a step of the model file's example inputs trains on."""
    _, inputs = mf.build(meta=True)
    return inputs[0].numel()


def _row(preset: str, layers: str, mesh: str, memory: str | None, r: dict) -> str:
    lower = f"{r['lower']:6.2f}" if r["lower"] is not None else f"{'-':>6}"
    outer = f"{r['outer']:6.2f}" if r.get("outer") is not None else f"{'-':>6}"
    method = r["method"].split(" ")[0] + "+blocks" if "per block of axes" in r["method"] else r["method"]  # merged start, blocks of real axes
    return (
        f"{preset:>6} {layers:>6} {mesh:>7} {memory or '-':>7} {r['batch']:5d} {r['capture']:8.2f} {r['build']:6.2f} {r['solve']:6.2f} {outer} {lower} "
        f"{r['total']:6.2f} {r['variables']:7d} {r['constraints']:6d} {r['folded']:6d} {method:>18} {r['rss_mb']:7.0f} {r['step_ms']:8.1f} {r['tokens_per_s_device']:9.0f} {r['peak_gib']:8.1f}"
        + (f"  remat {r['remat']}" if r["remat"] != "none" else "")
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated preset:layers:mesh[:budget] (default: the issue's table)")
    p.add_argument("--memory", default=None, help="per-device budget for rows that name none, e.g. 80GiB (default: none)")
    p.add_argument("--no-lower", action="store_true", help="skip lowering rank 0's program")
    p.add_argument("--time-limit", type=float, default=120.0, help="solver time limit per row, seconds")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="mixed-precision policy (dtplan.ir.precision)")
    p.add_argument("--remat", choices=("none", "full", "selective", "auto"), default=None, help="activation recomputation (dtplan.ir.remat)")
    p.add_argument("--recipes", action="store_true", help="also plan torchtitan's recipes pinned, and print them under each row")
    p.add_argument("--local-batch", type=int, default=None, help="sequences per data-parallel rank (devices over the last axis): the global batch grows with the mesh")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process's row, as JSON
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.one:
        preset, layers, mesh = args.one.split(":")
        print(json.dumps(one(preset, layers, mesh, args.memory, not args.no_lower, args.time_limit, args.precision, args.remat, args.recipes, args.local_batch)))
        return
    print(HEADER, flush=True)
    for run in args.runs.split(","):
        preset, layers, mesh, *rest = run.split(":")
        memory = rest[0] if rest else args.memory
        cmd = [sys.executable, __file__, "--one", f"{preset}:{layers}:{mesh}", "--time-limit", str(args.time_limit)]
        cmd += ["--memory", memory] if memory else []
        cmd += ["--no-lower"] if args.no_lower else []
        cmd += ["--precision", args.precision] if args.precision else []
        cmd += ["--remat", args.remat] if args.remat else []
        cmd += ["--recipes"] if args.recipes else []
        cmd += ["--local-batch", str(args.local_batch)] if args.local_batch else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode == 0:
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(_row(preset, layers, mesh, memory, r), flush=True)
            for rec in r["recipes"]:
                print(_recipe_row(rec), flush=True)
        else:
            err = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{preset:>6} {layers:>6} {mesh:>7} {memory or '-':>7} failed: {err[:160]}", flush=True)


if __name__ == "__main__":
    main()
