"""One plan for every rank under torchrun: rank 0 plans and the others take
its plan, whatever their own options would have planned; ranks holding
different plan files are refused by name before anything runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

from conftest import ROOT, example_path

from dtplan import capture_model_file, load_model_file, plan_program


def torchrun(tmp_path, per_rank: dict[int, list[str]]) -> subprocess.CompletedProcess:
    """`dtplan` on 2 torchrun ranks, each with its own arguments."""
    script = tmp_path / "per_rank.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from dtplan.cli import main
        sys.exit(main({per_rank!r}[int(os.environ["RANK"])]))
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_ranks_given_other_solver_options_run_rank_0s_plan(tmp_path):
    # rank 1's own options plan nothing (no plan fits 1 KB): it must not plan at all
    common = ["run", str(example_path("mlp")), "--mesh", "2", "--check", "--quiet"]
    done = torchrun(tmp_path, {0: common, 1: common + ["--time-limit", "0.001", "--memory", "1KB"]})
    assert done.returncode == 0, done.stderr[-3000:]
    digests = re.findall(r"rank (\d): plan ([0-9a-f]{12})", done.stdout)
    assert sorted(r for r, _ in digests) == ["0", "1"], done.stdout
    assert len({d for _, d in digests}) == 1, done.stdout
    assert "check passed" in done.stdout


def test_ranks_holding_different_plan_files_are_refused_by_name(tmp_path):
    captured = capture_model_file(load_model_file(example_path("mlp")), train=False)
    files = []
    for k, inputs in enumerate((["S(0)"], ["R"])):
        path = tmp_path / f"plan{k}.json"
        plan_program(captured, mesh="2", input_placements=inputs, model_info={"name": "mlp"}).save(path)
        files.append(str(path))
    common = ["run", str(example_path("mlp")), "--quiet", "--plan"]
    done = torchrun(tmp_path, {0: common + [files[0]], 1: common + [files[1]]})
    assert done.returncode == 1, done.stdout
    assert "rank(s) [1] hold a different plan from rank 0's" in done.stderr, done.stderr[-3000:]
