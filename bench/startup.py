"""Benchmark: how long ranks take to start, spawned or forked from the
forkserver (`dtplan.runtime.launch.start_method`), side by side.

Each start method runs in a fresh Python process of its own (so the
forkserver starts from nothing, as in a new `dtplan run`), which launches
`--runs` groups of ranks one after the other; each group does one tiny
all-reduce and returns. Prints each run's seconds from `spawn()` called to
every result back, per method, and spawn's time over the forkserver's for
the first launch (which starts the server) and for the later ones (medians).

    .venv/bin/python bench/startup.py                  # mesh 4, 3 runs per method
    .venv/bin/python bench/startup.py --mesh 2 --runs 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def header(argv: Sequence[str] = ()) -> str:
    """The first line `main` prints for these arguments (what the rows under it are)."""
    args = _parser().parse_args(list(argv))
    return f"mesh {args.mesh}, {args.runs} launches per method, each method in a fresh process"


def _one_all_reduce(rank, mesh) -> float:
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t)


def _child(mesh: str, runs: int) -> None:
    """In the fresh process: time `runs` launches, print them as JSON."""
    from bench.startup import _one_all_reduce  # by module name: the ranks import it
    from dtplan.planner.mesh import parse_mesh
    from dtplan.runtime.launch import spawn, start_method

    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        got = spawn(_one_all_reduce, parse_mesh(mesh))
        seconds.append(time.perf_counter() - t0)
        assert got == [float(len(got))] * len(got), got
    print(json.dumps({"method": start_method(), "seconds": seconds}))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default="4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.child:
        _child(args.mesh, args.runs)
        return
    first, later = {}, {}
    print(header(["--mesh", args.mesh, "--runs", str(args.runs)]))
    for method in ("spawn", "forkserver"):
        env = {**os.environ, "DTPLAN_START_METHOD": method, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-m", "bench.startup", "--child", "--mesh", args.mesh, "--runs", str(args.runs)],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True,
        )
        data = json.loads(out.stdout.strip().splitlines()[-1])
        first[method] = data["seconds"][0]
        later[method] = statistics.median(data["seconds"][1:] or data["seconds"])
        runs = "  ".join(f"{s:6.2f}" for s in data["seconds"])
        print(f"{method:>10}: {runs}  s")
    print(f"spawn / forkserver: first launch {first['spawn'] / first['forkserver']:.1f}x, later launches {later['spawn'] / later['forkserver']:.1f}x (medians)")


if __name__ == "__main__":
    main()
