"""Benchmark: what the classic-plan comparison adds to `dtplan compile`.

Runs the command a user types, with the comparison (the default) and with
`--no-compare`, as fresh processes taking turns (`--repeat` pairs), and prints
each one's wall seconds, the planner's stage seconds (from the plan file) and
the ratio of the medians. The comparison re-solves the free plan's program
with each classic layout's parameters pinned (`dtplan.api._Built`), so it
should add a small fraction of the planning.

    .venv/bin/python bench/compare.py                      # 8b on 8x8, h100, 80 GiB, training
    .venv/bin/python bench/compare.py --args "examples/gpt.py --mesh 2x2 --memory 400KB"
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = "examples/llama.py --model-arg preset=8b --mesh 8x8 --train --profile h100 --memory 80GiB"


def _run(args: list[str], out: Path) -> tuple[float, dict]:
    cmd = [str(ROOT / ".venv" / "bin" / "dtplan"), "compile", *args, "--out", str(out)]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, json.loads((out / "plan.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--args", default=DEFAULT, help=f"dtplan compile's arguments (default: {DEFAULT})")
    p.add_argument("--repeat", type=int, default=2, help="pairs of runs, taking turns (default 2)")
    a = p.parse_args()
    args = shlex.split(a.args)
    walls: dict[str, list[float]] = {"compare": [], "no-compare": []}
    print(f"dtplan compile {a.args}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.repeat):
            for label, extra in (("compare", []), ("no-compare", ["--no-compare"])):
                wall, plan = _run(args + extra, Path(tmp) / f"{label}{k}")
                walls[label].append(wall)
                stages = ", ".join(f"{s} {v:.2f}" for s, v in plan["stage_seconds"].items())
                print(f"  {label:<10} {wall:6.2f} s  ({stages})", flush=True)
                if label == "compare":
                    for row in plan["comparison"]:
                        if row.get("error"):
                            print(f"      vs {row['name']:<22} failed: {row['error']}")
                            continue
                        fits = "" if row["fits"] else "  (does not fit)"
                        print(f"      vs {row['name']:<22} {row['cost']['total_s'] * 1e3:9.1f} ms{fits}")
    ratio = statistics.median(walls["compare"]) / statistics.median(walls["no-compare"])
    print(f"with the comparison / without: {ratio:.2f} (median of {a.repeat} runs each)")


if __name__ == "__main__":
    main()
