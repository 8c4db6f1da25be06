"""Launching ranks: signals to the parent end every rank, meshes this machine
cannot run and plans for another mesh are refused before anything runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import captured_example, example_path, plan_example

import torch.distributed as dist

from dtplan.planner.mesh import parse_mesh
from dtplan.planner.output.plan import PlanError
from dtplan.runtime.abstract import fake_device_mesh
from dtplan.runtime.launch import LaunchError, spawn
from dtplan.runtime.program import sharded_program

DTPLAN = Path(sys.executable).parent / "dtplan"


def _ranks_of(pid: int) -> list[int]:
    """The spawned ranks (multiprocessing's spawn_main) whose parent is `pid`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat, cmd = (d / "stat").read_text(), (d / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
            found.append(int(d.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_sigint_and_sigterm_to_the_parent_end_every_rank_and_leave_nothing(tmp_path):
    # two long runs side by side (their start-ups overlap): one interrupted, one terminated
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        tmp = tmp_path / sig.name
        tmp.mkdir()
        cmd = [str(DTPLAN), "run", str(example_path("mlp")), "--mesh", "2", "--train", "--steps", "1000000", "--quiet"]
        runs[sig] = (subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(tmp)}, stderr=subprocess.PIPE, text=True), tmp)
    deadline = time.monotonic() + 120
    while any(len(_ranks_of(p.pid)) < 2 for p, _ in runs.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = {sig: _ranks_of(p.pid) for sig, (p, _) in runs.items()}
    assert all(len(r) == 2 for r in ranks.values()), ranks
    for sig, (p, _) in runs.items():
        p.send_signal(sig)
    for sig, (p, tmp) in runs.items():
        code = p.wait(timeout=30)
        stderr = p.stderr.read()
        assert code == 128 + sig, (sig.name, code, stderr)
        assert ("interrupted" if sig == signal.SIGINT else "terminated") in stderr
        assert "Traceback" not in stderr
        assert [r for r in ranks[sig] if Path(f"/proc/{r}").exists()] == [], sig.name  # no orphaned rank
        assert not [f for f in os.listdir(tmp) if f.startswith("dtplan-")], sig.name  # rendezvous folder removed


def test_a_mesh_this_machine_cannot_run_is_refused_before_planning(capsys):
    from dtplan import cli

    t0 = time.perf_counter()
    assert cli.main(["run", str(example_path("mlp")), "--mesh", "1000000"]) == 1
    assert "the mesh needs 1000000 ranks; this machine runs at most" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 5  # no planning for a million ranks


def test_the_api_refuses_a_plan_for_another_mesh():
    captured = captured_example("mlp")
    plan = plan_example("mlp", "4")
    model = torch.nn.Module()  # never read: the check comes first
    for shape in ("2x2", "2"):
        with fake_device_mesh(parse_mesh(shape)) as mesh, pytest.raises(PlanError, match="the plan is for mesh d0=4 but the run uses mesh d0="):
            sharded_program(model, captured, plan, mesh)


def _one_rank_hangs(rank, mesh):
    if rank == 1:
        time.sleep(3600)  # never enters the collective
    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t)


def _one_rank_is_killed(rank, mesh):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t)


def test_a_hung_or_killed_rank_ends_the_run_in_bounded_time():
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 0 failed: .*\(rank\(s\) \[1\] stopped without a result\)"):
        spawn(_one_rank_hangs, parse_mesh("2"), timeout_s=2, grace_s=1)
    hung = time.monotonic() - t0
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 died before its result was written"):
        spawn(_one_rank_is_killed, parse_mesh("2"), timeout_s=2, grace_s=1)
    killed = time.monotonic() - t0
    # start-up (a few seconds) + the collective timeout + the grace the others get
    assert hung < 30 and killed < 20, (hung, killed)  # generous: the suite runs two workers on two cores
