"""bench/gpu_check.py's code path, at smoke sizes on the device there is
(on CPU: gloo at world size 1), so the script cannot rot between GPU loans."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_calibrates_compares_with_its_profile_and_runs_a_plan(capsys):
    spec = importlib.util.spec_from_file_location("_bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "smoke sizes" in out
    assert gpu_check.header() in out.splitlines()  # the profile it compares with, where it now lives
    measured = json.loads(next(line for line in out.splitlines() if line.startswith("CALIBRATION "))[len("CALIBRATION "):])
    assert set(measured) == {"bfloat16", "float16", "float32", "float32_no_tf32", "memory_bandwidth"} and all(v > 0 for v in measured.values())
    [run] = [line for line in out.splitlines() if line.startswith("RUN ")]
    assert run.startswith("RUN mlp: collectives_match=True numerics_match=True"), run
