"""GPU check, run on a lent CUDA machine (never in CI):

1. calibrate the compute side of the cost model: dense matmul FLOP/s (bf16, fp16,
   fp32 with and without TF32) and device memory bandwidth, side by side with
   the h100 profile's figures;
2. run dtplan's runtime on the NCCL/CUDA path at world size 1 for every plan in
   a folder (plans made on the CPU machine with `dtplan compile --mesh 1`),
   checking outputs against the single-device result.

    python3 bench/gpu_check.py [PLAN_DIR]
"""
from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time_cuda(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def calibrate() -> dict:
    n = 8192
    out = {}
    for name, dtype, tf32 in (("bfloat16", torch.bfloat16, False), ("float16", torch.float16, False),
                              ("float32", torch.float32, True), ("float32_no_tf32", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        s = _time_cuda(lambda: a @ b)
        out[name] = 2 * n**3 / s
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    s = _time_cuda(lambda: y.copy_(x))
    out["memory_bandwidth"] = 2 * x.numel() / s  # read + write
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name()}", flush=True)
    measured = calibrate()
    profile = json.loads((ROOT / "planner" / "profiles" / "h100.json").read_text())
    print(f"{'quantity':>18} {'measured':>12} {'h100.json':>12} {'ratio':>6}")
    for key, value in measured.items():
        ref = profile["memory_bandwidth"] if key == "memory_bandwidth" else profile["peak_flops"].get(key.split("_no")[0])
        unit = 1e12
        print(f"{key:>18} {value / unit:12.1f} {ref / unit if ref else float('nan'):12.1f} {value / ref if ref else float('nan'):6.2f}  (x1e12 /s)")
    print("CALIBRATION " + json.dumps(measured), flush=True)

    plan_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".devplans"
    try:
        from dtplan.planner.output.plan import Plan
        from dtplan.runtime.run import run_model_file
    except Exception:  # noqa: BLE001 - report, the calibration above still stands
        print("RUNTIME IMPORT FAILED\n" + traceback.format_exc(), flush=True)
        return
    for path in sorted(plan_dir.glob("*.json")):
        plan = Plan.load(path)
        model = ROOT / plan.model.source
        t0 = time.perf_counter()
        try:
            reports = run_model_file(str(model), plan, options=dict(plan.model.options), check=True)
            r = reports[0]
            print(f"RUN {path.stem}: collectives_match={r['collectives_match']} numerics_match={r['numerics_match']} "
                  f"max_abs={r['max_abs']:.3g} max_rel={r['max_rel']:.3g} ({time.perf_counter() - t0:.1f}s)", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"RUN {path.stem} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)


if __name__ == "__main__":
    main()
