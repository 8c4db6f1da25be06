"""Real library models, unmodified: do they plan, run exactly and train exactly?

For every model file under examples/zoo/ (small configurations of Hugging
Face transformers, timm and torchvision models built from code, and a
Llama-3 written independently of examples/llama.py): plan its inference
program and its training step on a mesh, run both on that many gloo ranks
and compare with one device (outputs; then losses, parameters and buffers
after AdamW steps), with the library's default dropout and batch norm on.
Prints the README's table:

    .venv/bin/python bench/real_models.py                 # every model, mesh 2x2, 3 steps
    .venv/bin/python bench/real_models.py --mesh 4 hf_bert timm_resnet
    .venv/bin/python bench/real_models.py --precision bf16   # under bf16 compute, fp32 reduction
    .venv/bin/python bench/real_models.py --remat full       # training steps recompute each layer's forward
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ZOO = ROOT / "examples" / "zoo"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="model names under examples/zoo (default: all)")
    ap.add_argument("--mesh", default="2x2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="mixed-precision policy (compared with one device under it)")
    ap.add_argument("--remat", choices=("none", "full", "selective", "auto"), default=None, help="activation recomputation of the training steps")
    return ap


def _recomputing(args: argparse.Namespace) -> bool:
    return args.remat not in (None, "none")


def _header(args: argparse.Namespace) -> str:
    """The table's header and separator lines: the first column names the
    mesh and the settings, so a table in the README says what made it."""
    settings = [f"mesh {args.mesh}"]
    if args.precision not in (None, "fp32"):
        settings.append(args.precision)
    if _recomputing(args):
        settings.append(f"`--remat {args.remat}`")
    extra = _recomputing(args)
    cells = [f"model ({', '.join(settings)})", "plans", "runs exactly", f"trains exactly ({args.steps} AdamW steps)", "fallbacks (infer/train)"]
    cells += ["recomputed ops (training)"] if extra else []
    cells += ["seconds", "problem"]
    return "| " + " | ".join(cells) + " |\n" + "|" + "---|" * len(cells)


def header(argv: Sequence[str] = ()) -> str:
    """The header lines `main` prints for these arguments (tests/test_bench_tables.py
    compares them with the README's tables)."""
    return _header(_parser().parse_args(list(argv)))


def main(argv: list[str] | None = None) -> int:
    from dtplan.check import check_model_files

    args = _parser().parse_args(argv)
    names = args.models or sorted(p.stem for p in ZOO.glob("*.py"))
    paths = [ZOO / f"{n}.py" for n in names]
    # a group of ranks per model: one model's failure is its own row
    rows = check_model_files(
        paths, mesh=args.mesh, steps=args.steps, one_group=False, precision=args.precision, remat=args.remat, progress=lambda m: print(m, file=sys.stderr, flush=True)
    )
    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    extra = _recomputing(args)
    print(_header(args))
    for r in rows:
        cell = f" {r.recomputed} ({r.remat}) |" if extra else ""
        print(f"| {r.name} | {yes(r.plans)} | {yes(r.runs_exactly)} | {yes(r.trains_exactly)} | {r.fallbacks[0]}/{r.fallbacks[1]} |{cell} {r.seconds:.0f} | {r.problem} |")
    return 0 if all(r.plans and r.runs_exactly and r.trains_exactly for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
