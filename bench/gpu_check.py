"""GPU check, run on a lent CUDA machine (never in CI):

1. calibrate the compute side of the cost model: dense matmul FLOP/s (bf16, fp16,
   fp32 with and without TF32) and device memory bandwidth, side by side with
   a profile's figures (`--profile`, default h100; `planner/cost/profiles/`);
2. run dtplan's runtime on the NCCL/CUDA path at world size 1 for every plan in
   a folder (plans made on the CPU machine with `dtplan compile --mesh 1`),
   checking outputs against the single-device result.

    python3 bench/gpu_check.py [PLAN_DIR] [--profile h200]
    python3 bench/gpu_check.py --smoke        # the same code path on CPU, in seconds

`--smoke` (the default where there is no CUDA device) runs every step at tiny
sizes on the device there is: matmuls of 256, a 1 MiB copy, and, without a
PLAN_DIR, one plan of the bundled MLP made on mesh 1 here and run at world
size 1 (gloo on CPU, NCCL on a GPU). `tests/test_gpu_check.py` runs it, so the
script cannot rot between GPU loans. Exits non-zero when a plan fails to run or
to match the single-device result.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: full-size calibration: the sizes a GPU reaches its peak at
FULL = {"matmul_n": 8192, "copy_bytes": 2**30, "warmup": 3, "iters": 10}
#: smoke: the same steps, small enough for a CPU in a test
SMOKE = {"matmul_n": 256, "copy_bytes": 2**20, "warmup": 1, "iters": 2}

HEADER_TEMPLATE = "{quantity:>18} {measured:>12} {reference:>12} {ratio:>6}"


def header(argv: Sequence[str] = ()) -> str:
    """The calibration table's header line, as `main` prints it."""
    args = _parser().parse_args(list(argv))
    return HEADER_TEMPLATE.format(quantity="quantity", measured="measured", reference=f"{args.profile}.json", ratio="ratio")


def _time(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Seconds per call of `fn` on `device` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def calibrate(device: str, sizes: dict) -> dict:
    """Matmul FLOP/s per dtype and copy bandwidth (read + write) on `device`."""
    n = sizes["matmul_n"]
    out = {}
    for name, dtype, tf32 in (("bfloat16", torch.bfloat16, False), ("float16", torch.float16, False),
                              ("float32", torch.float32, True), ("float32_no_tf32", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        s = _time(lambda: a @ b, device, sizes["warmup"], sizes["iters"])
        out[name] = 2 * n**3 / s
    x = torch.empty(sizes["copy_bytes"], dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    s = _time(lambda: y.copy_(x), device, sizes["warmup"], sizes["iters"])
    out["memory_bandwidth"] = 2 * x.numel() / s  # read + write
    return out


def _smoke_plans(folder: Path) -> Path:
    """One plan of the bundled MLP on mesh 1, made here, in `folder`."""
    from dtplan import load_model_file, plan_program
    from dtplan.ir.modelfile import capture_model_file

    source = ROOT / "examples" / "mlp.py"
    options = {"batch": "8", "d": "64", "hidden": "256"}
    mf = load_model_file(source, options)
    plan = plan_program(capture_model_file(mf, train=False), mesh="1", model_info={"name": "mlp", "source": str(source), "options": options})
    plan.save(folder / "mlp.json")
    return folder


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plan_dir", nargs="?", help="plans made with `dtplan compile --mesh 1` (default: .devplans if there is one and not --smoke, else one made here)")
    p.add_argument("--profile", default="h100", help="the profile the measurements are set beside (default h100)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the device there is (default without CUDA)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = _parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {name}{', smoke sizes' if smoke else ''}", flush=True)
    measured = calibrate(device, SMOKE if smoke else FULL)

    from dtplan.planner.cost.device import load_profile

    profile = load_profile(args.profile)
    print(header(["--profile", args.profile]))
    for key, value in measured.items():
        ref = profile.memory_bandwidth if key == "memory_bandwidth" else dict(profile.peak_flops).get(key.split("_no")[0])
        unit = 1e12
        shown = ref / unit if ref else float("nan")
        print(f"{key:>18} {value / unit:12.4g} {shown:12.4g} {value / ref if ref else float('nan'):6.2f}  (x1e12 /s)")
    print("CALIBRATION " + json.dumps(measured), flush=True)

    try:
        from dtplan.planner.output.plan import Plan
        from dtplan.runtime.run import run_model_file
    except Exception:  # noqa: BLE001 - report, the calibration above still stands
        print("RUNTIME IMPORT FAILED\n" + traceback.format_exc(), flush=True)
        return 1
    failed = 0
    with tempfile.TemporaryDirectory(prefix="dtplan-gpu-check-") as tmp:
        if args.plan_dir:
            plan_dir = Path(args.plan_dir)
        else:  # the plans brought along, else one made here
            plan_dir = ROOT / ".devplans" if not smoke and (ROOT / ".devplans").is_dir() else _smoke_plans(Path(tmp))
        paths = sorted(plan_dir.glob("*.json"))
        if not paths:
            print(f"NO PLANS in {plan_dir}", flush=True)
            return 1
        for path in paths:
            t0 = time.perf_counter()
            try:
                plan = Plan.load(path)
                model = Path(plan.model.source) if plan.model.source and Path(plan.model.source).is_absolute() else ROOT / str(plan.model.source)
                reports = run_model_file(str(model), plan, options=dict(plan.model.options), check=True)
                r = reports[0]
                ok = bool(r.get("collectives_match")) and bool(r.get("numerics_match"))
                failed += not ok
                print(f"RUN {path.stem}: collectives_match={r.get('collectives_match')} numerics_match={r.get('numerics_match')} "
                      f"max_abs={r.get('max_abs', float('nan')):.3g} max_rel={r.get('max_rel', float('nan')):.3g} ({time.perf_counter() - t0:.1f}s)", flush=True)
            except Exception as e:  # noqa: BLE001 - one plan's failure is its own line
                failed += 1
                print(f"RUN {path.stem} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
