"""Three Llama-3-8B training steps, written three ways, planned the same way.

examples/llama.py (ours), examples/zoo/llama3_indep.py (written independently:
chunk-based rotary, repeat_interleave for GQA, F.cross_entropy over flattened
logits) and Hugging Face's LlamaForCausalLM (examples/zoo/hf_llama.py, built
on fake tensors: its rotary code and its masks as the library writes them),
all at the 8B shape (dim 4096, 32 layers, 32 heads, 8 KV heads, FFN 14336,
vocab 128256, batch 16 x 8192 tokens). Each is captured (training step),
planned on 8x8 under 80 GiB with the h100 profile, in a fresh process, and
printed with its end-to-end seconds (model file import and capture
included) and its predicted step beside examples/llama.py's:

    .venv/bin/python bench/llama_families.py
    .venv/bin/python bench/llama_families.py --mesh 8 --memory 160GiB --layers 2
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
MODELS = {
    "examples/llama.py": ROOT / "examples" / "llama.py",
    "zoo/llama3_indep.py": ROOT / "examples" / "zoo" / "llama3_indep.py",
    "zoo/hf_llama.py (HF)": ROOT / "examples" / "zoo" / "hf_llama.py",
}


#: the table's header line; `main` prints it and tests/test_bench_tables.py
#: compares it with the README's table
HEADER = (
    f"{'model':>22} {'seconds':>8} {'capture':>8} {'plan':>6} {'nodes':>6} {'step ms':>8} {'comm ms':>8} {'peak GiB':>8} {'fallbacks':>9} {'status':>9} {'vs ours':>8}"
)


def header(argv: Sequence[str] = ()) -> str:
    """The header line `main` prints for these arguments."""
    _parser().parse_args(list(argv))
    return HEADER


def one(path: str, mesh: str, memory: str, layers: str | None) -> dict:
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    from dtplan import load_model_file, plan_program
    from dtplan.ir.modelfile import capture_model_file

    options = {"preset": "8b", **({"layers": layers} if layers else {})}
    mf = load_model_file(path, options)
    t1 = time.perf_counter()
    captured = capture_model_file(mf, train=True)
    capture_s = time.perf_counter() - t1
    plan = plan_program(captured, mesh=mesh, profile="h100", memory=memory)
    return {
        "seconds": time.perf_counter() - t0,
        "capture": capture_s,
        "plan": sum(v for k, v in plan.stage_seconds.items() if k != "capture"),
        "nodes": len(captured.graph),
        "step_ms": plan.cost.total_s * 1e3,
        "comm_ms": plan.cost.comm_s * 1e3,
        "peak_gib": plan.cost.peak_memory_bytes / 2**30,
        "fallbacks": len(plan.fallbacks),
        "status": plan.solver.status,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="8x8")
    p.add_argument("--memory", default="80GiB")
    p.add_argument("--layers", default=None, help="override the depth (default: 32)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.mesh, args.memory, args.layers)))
        return 0
    print(HEADER, flush=True)
    base = None
    for label, path in MODELS.items():
        cmd = [sys.executable, __file__, "--one", str(path), "--mesh", args.mesh, "--memory", args.memory]
        cmd += ["--layers", args.layers] if args.layers else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{label:>22} failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:200]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or r["step_ms"]
        print(
            f"{label:>22} {r['seconds']:8.2f} {r['capture']:8.2f} {r['plan']:6.2f} {r['nodes']:6d} {r['step_ms']:8.1f} {r['comm_ms']:8.1f} "
            f"{r['peak_gib']:8.1f} {r['fallbacks']:9d} {r['status']:>9} {r['step_ms'] / base:8.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
