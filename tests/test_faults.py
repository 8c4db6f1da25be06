"""Fault injection: signals to the parent end every rank, a hung or killed
rank ends the run, meshes this machine cannot run and plans for another
mesh are refused, and every corruption of a plan file is refused by
`report` and `run` before any rank starts, naming the field."""
from __future__ import annotations

import json
import os
import functools
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import captured_example, example_path, plan_example

import torch.distributed as dist

from dtplan.planner.mesh import parse_mesh
from dtplan.planner.output.plan import PlanError
from dtplan.runtime.abstract import fake_device_mesh
from dtplan.runtime import launch
from dtplan.runtime.launch import LaunchError, spawn, start_method
from dtplan.runtime.program import sharded_program

DTPLAN = Path(sys.executable).parent / "dtplan"
TORCH = Path(torch.__file__).resolve().parent


def _ranks_of(pid: int) -> list[int]:
    """The ranks `pid` started: spawned (multiprocessing's spawn_main, its
    children) or forked by its forkserver (the server's children)."""
    return _children(pid, b"spawn_main") + [r for server in _forkservers(pid) for r in _children(server, b"forkserver")]


def _forkservers(pid: int) -> list[int]:
    return _children(pid, b"from multiprocessing.forkserver import main")


#: fault -> (whom it hits, the signal, exit code, the one line)
SIGNALS = {
    "SIGINT to the parent": ("parent", signal.SIGINT, 130, "dtplan: interrupted; 2 rank(s) stopped"),
    "SIGTERM to the parent": ("parent", signal.SIGTERM, 143, "dtplan: terminated by SIGTERM; 2 rank(s) stopped"),
    "SIGHUP to the parent": ("parent", signal.SIGHUP, 129, "dtplan: terminated by SIGHUP; 2 rank(s) stopped"),
    "kill -9 of a rank": ("rank", signal.SIGKILL, 1, "dtplan: error: rank 1 died before its result was written"),
}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_signals_and_a_killed_rank_end_every_rank_and_leave_nothing(request):
    # long training runs side by side (their start-ups overlap), one per fault
    runs = {}
    for fault in SIGNALS:
        # a short folder: the ranks then come from a forkserver, whose socket
        # lies under it (under pytest's long tmp_path dtplan spawns them)
        tmp = Path(tempfile.mkdtemp(prefix="f", dir="/tmp"))
        request.addfinalizer(functools.partial(shutil.rmtree, tmp, ignore_errors=True))
        cmd = [str(DTPLAN), "run", str(example_path("mlp")), "--mesh", "2", "--train", "--steps", "1000000", "--quiet"]
        runs[fault] = (subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(tmp)}, stderr=subprocess.PIPE, text=True), tmp)
    deadline = time.monotonic() + 120
    while any(len(_ranks_of(p.pid)) < 2 for p, _ in runs.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = {fault: sorted(_ranks_of(p.pid)) for fault, (p, _) in runs.items()}
    assert all(len(r) == 2 for r in ranks.values()), ranks
    servers = {fault: _forkservers(p.pid) for fault, (p, _) in runs.items()}
    assert all(len(s) == 1 for s in servers.values()), servers
    sent = {}
    for fault, (p, _) in runs.items():
        whom, sig, _, _ = SIGNALS[fault]
        os.kill(p.pid if whom == "parent" else ranks[fault][1], sig)
        sent[fault] = time.monotonic()
    for fault, (p, tmp) in runs.items():
        _, _, code, line = SIGNALS[fault]
        got = p.wait(timeout=60)
        took = time.monotonic() - sent[fault]
        stderr = p.stderr.read()
        assert got == code, (fault, got, stderr)
        assert stderr.startswith(line) and stderr.count("\n") == 1, (fault, stderr)  # one line, no traceback
        assert took < 10, (fault, took)
        assert [r for r in ranks[fault] + servers[fault] if _running(r)] == [], fault  # no orphaned rank or server
        assert not [f for f in os.listdir(tmp) if f.startswith("dtplan-")], fault  # rendezvous folder removed


def _running(pid: int) -> bool:
    """Is `pid` a process that has not ended? (A server ends after its
    parent, which reaps nothing of it: a zombie under pytest is ended.)"""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def _children(pid: int, marker: bytes) -> list[int]:
    """The processes whose parent is `pid` and whose command line holds `marker`."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat, cmd = (d / "stat").read_text(), (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and marker in cmd:
                found.append(int(d.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_under_torchrun_sigterm_and_ctrl_c_end_every_rank_without_a_rank_traceback(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dtplan.cli", "run", str(example_path("mlp")), "--mesh", "2", "--train", "--steps", "1000000", "--quiet"]
    runs = {sig: subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path) for sig in (signal.SIGTERM, signal.SIGINT)}
    deadline = time.monotonic() + 120
    while any(len(_children(p.pid, b"dtplan.cli")) < 2 for p in runs.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = {sig: _children(p.pid, b"dtplan.cli") for sig, p in runs.items()}
    assert all(len(r) == 2 for r in ranks.values()), ranks
    time.sleep(1)  # in their start-up, rendezvous or steps: each must end at once
    os.kill(runs[signal.SIGTERM].pid, signal.SIGTERM)  # a scheduler ending the job
    os.killpg(runs[signal.SIGINT].pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole group
    t0 = time.monotonic()
    for sig, p in runs.items():
        p.wait(timeout=60)
        took = time.monotonic() - t0
        stderr = p.stderr.read()
        assert took < 10, (sig.name, took)
        assert [r for r in ranks[sig] if Path(f"/proc/{r}").exists()] == [], sig.name
        # torchrun prints its own traceback (SignalException); no rank prints one
        frames = re.findall(r'File "([^"]+)"', stderr)
        assert all(f.startswith("<") or Path(f).is_relative_to(TORCH) for f in frames), stderr[-2000:]
        if sig == signal.SIGINT:
            assert sorted(line for line in stderr.splitlines() if line.startswith("dtplan")) == ["dtplan: rank 0: interrupted", "dtplan: rank 1: interrupted"]


HANGS = """
import time

import torch
import torch.distributed as dist


def build_model():
    if dist.is_initialized() and dist.get_rank() == 1:
        open({stamp!r}, "w").close()
        time.sleep(3600)  # rank 1 never reaches its first collective
    torch.manual_seed(0)
    return torch.nn.Linear(16, 16, bias=False)


def example_inputs():
    return (torch.arange(128.0).reshape(8, 16),)
"""


def test_a_hung_rank_ends_the_run_naming_the_collective_the_others_wait_in(tmp_path):
    stamp = tmp_path / "hung"
    (tmp_path / "hangs.py").write_text(HANGS.format(stamp=str(stamp)))
    cmd = [str(DTPLAN), "run", str(tmp_path / "hangs.py"), "--mesh", "2", "--input-placements", "S(0)", "--output-placements", "R", "--timeout", "5", "--quiet"]
    p = subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(tmp_path)}, stderr=subprocess.PIPE, text=True)
    ranks: set[int] = set()
    deadline = time.monotonic() + 180
    while p.poll() is None and time.monotonic() < deadline:
        ranks |= set(_ranks_of(p.pid))
        time.sleep(0.2)
    code = p.wait(timeout=5)
    ended = time.time()
    stderr = p.stderr.read()
    assert code == 1 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("dtplan: error: rank 0 failed (last collective entered: all_gather on mesh axis 'd0', 512 bytes (collective 1 of 1 in the step; mm read by output)): ")
    assert stderr.rstrip().endswith("(rank(s) [1] stopped without a result)"), stderr
    # from the hang: rank 0 lowers (about a second), waits --timeout 5, then rank 1 gets 5 s of grace
    assert ended - stamp.stat().st_mtime < 25  # 12-13 s on an idle machine; two test workers share the cores
    assert len(ranks) == 2 and [r for r in ranks if Path(f"/proc/{r}").exists()] == []  # none survives
    assert not [f for f in os.listdir(tmp_path) if f.startswith("dtplan-")]


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


def _one_rank_aborts_tearing_down(rank, mesh):
    t = torch.ones(1)
    dist.all_reduce(t)
    if rank == 0:
        dist.destroy_process_group = lambda *a, **k: os.abort()  # after its result is written
    return float(t)


def test_a_rank_killed_by_a_signal_after_writing_its_result_fails_the_run():
    """A native fault in teardown is a fault: the run names the rank and the
    signal instead of returning the results written before it."""
    with pytest.raises(LaunchError, match=r"rank 0 died after writing its result, while tearing down: process 0 terminated with signal SIGABRT$"):
        spawn(_one_rank_aborts_tearing_down, parse_mesh("2"), timeout_s=20, grace_s=1)


def _what_a_rank_sees(rank, mesh, say=True):
    if say:
        for fd, name in ((2, "stderr"), (1, "stdout")):
            os.write(fd, f"rank {rank} to {name}\n".encode())  # one write: the ranks' lines do not interleave
    return {"env": os.environ.get("DTPLAN_TEST_VALUE"), "cwd": os.getcwd(), "path": sys.path[0]}


def test_forked_ranks_see_the_parents_environment_folder_path_and_output_as_they_are_at_each_run(tmp_path, monkeypatch, capfd):
    """A forked rank would have the forkserver's, taken when the server
    started (the first run of the process): each run sends the parent's.
    (A spawned rank starts afresh from the parent's.)"""
    monkeypatch.setenv("DTPLAN_START_METHOD", "forkserver")
    with capfd.disabled():  # a run before the capture: the server, if new, starts with pytest's output
        spawn(functools.partial(_what_a_rank_sees, say=False), parse_mesh("2"))
    for i in range(2):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        monkeypatch.setenv("DTPLAN_TEST_VALUE", str(i))
        monkeypatch.chdir(folder)
        monkeypatch.syspath_prepend(str(folder))
        got = spawn(_what_a_rank_sees, parse_mesh("2"))
        assert got == [{"env": str(i), "cwd": str(folder), "path": str(folder)}] * 2
        out, err = capfd.readouterr()
        assert sorted(out.splitlines()) == ["rank 0 to stdout", "rank 1 to stdout"], (i, out)
        assert sorted(err.splitlines()) == ["rank 0 to stderr", "rank 1 to stderr"], (i, err)


def test_work_a_rank_cannot_load_is_that_ranks_error(tmp_path, monkeypatch):
    (tmp_path / "gone_after_import.py").write_text("def work(rank, mesh):\n    return rank\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_after_import

    (tmp_path / "gone_after_import.py").unlink()
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank \d failed: ModuleNotFoundError: No module named 'gone_after_import'"):
        spawn(gone_after_import.work, parse_mesh("2"), grace_s=1)
    assert time.monotonic() - t0 < 30


def test_the_start_method_is_the_forkserver_unless_its_socket_path_is_too_long(monkeypatch):
    monkeypatch.delenv("DTPLAN_START_METHOD", raising=False)
    monkeypatch.setattr(launch, "device_type", lambda: "cpu")  # (on CUDA ranks are spawned)
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    assert start_method() == "forkserver"
    monkeypatch.setattr(tempfile, "tempdir", "/tmp/" + "x" * 70)
    assert start_method() == "spawn"
    monkeypatch.setenv("DTPLAN_START_METHOD", "fork")
    with pytest.raises(LaunchError, match="DTPLAN_START_METHOD must be spawn or forkserver, not 'fork'"):
        start_method()


# ----------------------------------------------------------------- plan files

#: (field path, damage done to the plan JSON, what the one line says) -- each
#: one field of a valid plan (mlp on 2x2, an all-reduce and an all-gather)
CORRUPT = [
    ("version", lambda d: d.pop("version"), "not a dtplan plan: no 'version' key"),
    ("version", lambda d: d.update(version=True), "version: True is not supported"),
    ("version", lambda d: d.update(version="1"), "version: '1' is not supported"),
    ("version", lambda d: d.update(version=2), "version: 2 is not supported; this dtplan reads version 1"),
    ("(top)", lambda d: d.update(nodez={}), "the plan: unknown key(s) ['nodez']"),
    ("model", lambda d: d.pop("model"), "the plan: 'model' is missing"),
    ("model", lambda d: d.update(model=[]), "model: [] is not an object"),
    ("model.name", lambda d: d["model"].update(name=5), "model.name: 5 is not a string"),
    ("model.train", lambda d: d["model"].update(train="yes"), "model.train: 'yes' is not true or false"),
    ("model.num_nodes", lambda d: d["model"].update(num_nodes=-1), "model.num_nodes: -1 is not a whole number"),
    ("model.colour", lambda d: d["model"].update(colour="red"), "model: unknown key(s) ['colour']"),
    ("model.options", lambda d: d["model"].update(options={"batch": 8}), 'model.options["batch"]: 8 is not a string'),
    ("mesh.shape", lambda d: d["mesh"].update(shape=[0, 2]), "mesh: mesh axis 0 has size 0"),
    ("mesh.shape", lambda d: d["mesh"].update(shape=["2", "2"]), "mesh.shape[0]: '2' is not a whole number"),
    ("mesh.axis_names", lambda d: d["mesh"].update(axis_names=["d0"]), "mesh: "),
    ("profile", lambda d: d.update(profile=7), "profile: 7 is not an object"),
    ("profile.name", lambda d: d["profile"].pop("name"), "profile: 'name' is missing"),
    ("memory_budget_bytes", lambda d: d.update(memory_budget_bytes=-1), "memory_budget_bytes: -1 is not a whole number"),
    ("memory_budget_bytes", lambda d: d.update(memory_budget_bytes=10**400), "memory_budget_bytes: 1000000000"),
    ("memory_budget_bytes", lambda d: d.update(memory_budget_bytes="80GiB"), "memory_budget_bytes: '80GiB' is not a whole number"),
    ("inputs", lambda d: d.update(inputs="x"), "inputs: 'x' is not an object"),
    ("inputs", lambda d: d["inputs"].update(x=["S(0)"]), 'inputs["x"]: has 1 placement(s); mesh d0=2,d1=2 has 2 axes'),
    ("inputs", lambda d: d["inputs"].update(x=["R", "R"]), "inputs[\"x\"]: is ['R', 'R'] but its node is placed ['S(0)', 'R']"),
    ("inputs", lambda d: d["inputs"].update(y=["R", "R"]), 'inputs["y"]: names no planned node'),
    ("outputs", lambda d: d.update(outputs="R"), "outputs: 'R' is not a list"),
    ("outputs", lambda d: d["outputs"].__setitem__(0, ["S(x)", "R"]), "outputs[0][0]: bad placement 'S(x)'"),
    ("parameters", lambda d: d["parameters"].update({"fc1.weight": ["S(9)", "R"]}), "parameters[\"fc1.weight\"][0]: 'S(9)' — dim 9 is out of range for a 2-d tensor"),
    ("parameters", lambda d: d["parameters"].update({"fc1.weight": ["P(foo)", "R"]}), 'parameters["fc1.weight"][0]: bad placement \'P(foo)\''),
    ("parameters", lambda d: d["parameters"].update({"fc1.weight": ["S(-1)", "R"]}), "parameters[\"fc1.weight\"][0]: 'S(-1)' — dim -1 is negative"),
    ("parameters", lambda d: d["parameters"].update({"fc1.weight": ["R"]}), 'parameters["fc1.weight"]: has 1 placement(s)'),
    ("parameters", lambda d: d["parameters"].update({"fc1.weight": [0, "R"]}), 'parameters["fc1.weight"][0]: 0 is not a placement'),
    ("parameters", lambda d: d["parameters"].update({"fc9.weight": ["R", "R"]}), "parameters: ['fc9.weight'] placed without parameter_info"),
    ("parameters", lambda d: d["parameters"].pop("fc2.weight"), "parameters: ['fc2.weight'] in parameter_info without placements"),
    ("parameters", lambda d: d["parameters"].update({"fc1.weight": ["S(0)", "R"]}), "parameters[\"fc1.weight\"]: is ['S(0)', 'R'] but its node 'p_fc1_weight' is placed"),
    ("parameter_info", lambda d: d["parameter_info"]["fc1.weight"].update(shape="x"), 'parameter_info["fc1.weight"].shape: \'x\' is not a list'),
    ("parameter_info", lambda d: d["parameter_info"]["fc1.weight"].update(node="nope"), "parameter_info[\"fc1.weight\"]: names node 'nope'"),
    ("nodes", lambda d: d.update(nodes={}), "nodes: holds 0 node(s); model.num_nodes says 8"),
    ("nodes.op", lambda d: d["nodes"]["mm"].update(op=5), 'nodes["mm"].op: 5 is not a string'),
    ("nodes.compute_s", lambda d: d["nodes"]["mm"].update(compute_s=float("nan")), 'nodes["mm"].compute_s: nan is not a finite non-negative number'),
    ("nodes.inputs", lambda d: d["nodes"]["mm"]["inputs"].__setitem__(0, ["R"]), 'nodes["mm"].inputs[0]: has 1 placement(s)'),
    ("nodes.via_hub", lambda d: d["nodes"]["mm"].update(via_hub=[True] * 3), 'nodes["mm"]: via_hub has 3 entries for 2 input(s)'),
    ("nodes.output", lambda d: d["nodes"]["mm"].pop("output"), "nodes[\"mm\"]: 'output' is missing"),
    ("hubs", lambda d: d["hubs"].update(nope=["R", "R"]), 'hubs["nope"]: names no planned node'),
    ("collectives.kind", lambda d: d["collectives"][0].update(kind="teleport"), "collectives[0]: kind 'teleport' is not one of"),
    ("collectives.axis", lambda d: d["collectives"][0].update(axis="d7"), "collectives[0]: axis 'd7' is not an axis of mesh d0=2,d1=2"),
    ("collectives.bytes", lambda d: d["collectives"][0].update(bytes=-5), "collectives[0].bytes: -5 is not a whole number"),
    ("collectives.producer", lambda d: d["collectives"][0].update(producer="ghost"), "collectives[0]: producer 'ghost' names no planned node"),
    ("collectives", lambda d: d.update(collectives={}), "collectives: {} is not a list"),
    ("fallbacks", lambda d: d["fallbacks"].append({"node": "mm"}), "fallbacks[0]: 'op' is missing"),
    ("cost", lambda d: d.pop("cost"), "the plan: 'cost' is missing"),
    ("cost.total_s", lambda d: d["cost"].update(total_s=float("nan")), "cost.total_s: nan is not a finite non-negative number"),
    ("cost.comm_s", lambda d: d["cost"].update(comm_s=-1.0), "cost.comm_s: -1.0 is not a finite non-negative number"),
    ("cost.total_s", lambda d: d["cost"].update(total_s="fast"), "cost.total_s: 'fast' is not a finite non-negative number"),
    ("solver.gap", lambda d: d["solver"].update(gap=float("inf")), "solver.gap: inf is not a finite non-negative number"),
    ("solver.status", lambda d: d["solver"].update(status=3), "solver.status: 3 is not a string"),
    ("stage_seconds", lambda d: d["stage_seconds"].update(solve=-1), 'stage_seconds["solve"]: -1 is not a finite non-negative number'),
    ("comparison", lambda d: d.update(comparison={}), "comparison: {} is not a list"),
    ("comparison", lambda d: d["comparison"].append({"name": "x"}), "comparison[0]: 'parameters' is missing"),
]

#: damage only the model can show: `run` refuses it after capturing the
#: model, still before any rank starts
MISMATCH = [
    (lambda d: d["model"].update(graph_signature="0" * 16), "model.graph_signature: the plan does not match this model"),
    (lambda d: d["nodes"].update(mm_x=d["nodes"].pop("mm")), "nodes: not the graph's: missing ['mm'], unknown ['mm_x']"),
    (lambda d: d["nodes"]["mm"].update(op="aten.add.Tensor"), "nodes[\"mm\"].op: 'aten.add.Tensor', but the graph's node is aten.mm.default"),
    (lambda d: d["nodes"]["relu"].update(output=["R", "S(5)"]), "nodes[\"relu\"].output[1]: 'S(5)' — dim 5 is out of range for a 2-d tensor"),
    (lambda d: d["nodes"]["mm"]["inputs"].__setitem__(1, ["S(7)", "R"]), "nodes[\"mm\"].inputs[1][0]: 'S(7)' — dim 7 is out of range for a 2-d tensor"),
    (lambda d: d["outputs"].append(["R", "R"]), "outputs: places 2 output(s); the model has 1"),
    # a plan file from before parameter_info named the nodes: the graph names them
    (lambda d: [i.pop("node") for i in d["parameter_info"].values()] and d["parameters"].update({"fc1.weight": ["S(0)", "R"]}),
     "parameters[\"fc1.weight\"]: is ['S(0)', 'R'] but its node 'p_fc1_weight' is placed"),
]


@pytest.fixture(scope="module")
def plan_json():
    plan = plan_example("mlp", "2x2", input_placements=["S(0)", "R"], output_placements=["R", "R"], memory="100KB")
    kinds = sorted(c.kind for c in plan.collectives)
    assert kinds == ["all_gather", "all_reduce"] and "mm" in plan.nodes and "relu" in plan.nodes
    return plan.to_json()


@pytest.fixture
def no_rank_starts(monkeypatch):
    import dtplan.runtime.run

    started = []
    monkeypatch.setattr(dtplan.runtime.run, "run_model_file", lambda *a, **k: started.append(a) or [])
    return started


def _refusal(capsys, *args) -> str:
    from dtplan import cli

    assert cli.main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dtplan: error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def _damaged(tmp_path, data, damage) -> Path:
    data = json.loads(json.dumps(data))
    damage(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def test_the_corruptions_cover_every_section(plan_json):
    assert len(CORRUPT) >= 30
    touched = {field.split(".")[0] for field, _, _ in CORRUPT}
    assert set(plan_json) <= touched, set(plan_json) - touched


@pytest.mark.parametrize("field, damage, says", CORRUPT, ids=[f"{f}:{s[:30]}" for f, _, s in CORRUPT])
def test_report_and_run_refuse_each_corruption_naming_the_field(tmp_path, capsys, no_rank_starts, plan_json, field, damage, says):
    path = _damaged(tmp_path, plan_json, damage)
    html = tmp_path / "report.html"
    assert says in _refusal(capsys, "report", path, "--out", html)
    assert not html.exists()
    assert says in _refusal(capsys, "run", example_path("mlp"), "--mesh", "2x2", "--plan", path, "--check")
    assert no_rank_starts == []


@pytest.mark.parametrize("damage, says", MISMATCH, ids=[s[:30] for _, s in MISMATCH])
def test_run_refuses_a_plan_the_model_contradicts_before_any_rank_starts(tmp_path, capsys, no_rank_starts, plan_json, damage, says):
    path = _damaged(tmp_path, plan_json, damage)
    assert says in _refusal(capsys, "run", example_path("mlp"), "--mesh", "2x2", "--plan", path)
    assert no_rank_starts == []


def test_the_valid_plan_reaches_the_ranks(tmp_path, capsys, no_rank_starts, plan_json):
    path = _damaged(tmp_path, plan_json, lambda d: None)
    from dtplan import cli

    cli.main(["report", str(path), "--out", str(tmp_path / "r.html")])
    assert (tmp_path / "r.html").exists()
    cli.main(["run", str(example_path("mlp")), "--mesh", "2x2", "--plan", str(path)])
    assert len(no_rank_starts) == 1  # the check above refuses damage, not plans


ODD_NAMES = """
import torch


class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.d = torch.nn.ModuleDict({"a'b": torch.nn.Linear(16, 16), "x y\\\\z": torch.nn.Linear(16, 16)})

    def forward(self, x):
        return self.d["x y\\\\z"](torch.relu(self.d["a'b"](x)))


def build_model():
    torch.manual_seed(0)
    return M()


def example_inputs():
    return (torch.arange(128.0).reshape(8, 16) / 128,)


def loss_fn(out, x):
    return out.square().mean()
"""


def test_module_names_that_are_not_identifiers_run_exactly_and_stay_in_the_plan(tmp_path):
    from dtplan.api import plan_program
    from dtplan.ir.modelfile import capture_model_file, load_model_file
    from dtplan.runtime.run import run_many

    path = tmp_path / "odd.py"
    path.write_text(ODD_NAMES)
    mf = load_model_file(str(path), {})
    pins = {"d.a'b.weight": ["S(0)"], "d.x y\\z.weight": ["S(1)"]}  # Megatron's column then row
    plans = [plan_program(capture_model_file(mf, train=t), mesh="2", parameter_placements=pins) for t in (False, True)]
    for plan in plans:
        assert {k: [str(p) for p in plan.parameters[k]] for k in pins} == pins
    reports = run_many([(path, plans[0], {}, True), (path, plans[1], {}, True, 3)])
    for per_item in reports:
        for r in per_item:
            assert r["collectives_match"] and r["numerics_match"], r


UNDER_TORCHRUN = """
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import dtplan

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.ReLU(), torch.nn.Linear(32, 16, bias=False))
inputs = (torch.randn(8, 16),)
meshes = {
    "unnamed 2": init_device_mesh("cpu", (2,)),
    "dp=2": init_device_mesh("cpu", (2,), mesh_dim_names=("dp",)),
    "unnamed 2x1": init_device_mesh("cpu", (2, 1)),
}
said = {}
for plan_mesh, device_mesh in [("4", "unnamed 2"), ("1x2", "unnamed 2x1"), ("2x1", "unnamed 2"), ("tp=2", "dp=2"), ("dp=2", "dp=2"), ("2", "unnamed 2")]:
    plan = dtplan.compile(model, inputs, mesh=plan_mesh)
    try:
        program = dtplan.shard(model, inputs, mesh=meshes[device_mesh], plan=plan)
        torch.testing.assert_close(program(*inputs), model(*inputs))
        said[plan_mesh + " on " + device_mesh] = "ran"
    except dtplan.PlanError as e:
        said[plan_mesh + " on " + device_mesh] = str(e)
if dist.get_rank() == 0:
    print(json.dumps(said))
dist.destroy_process_group()
"""


def test_shard_refuses_a_device_mesh_other_than_the_plans_under_torchrun(tmp_path):
    path = tmp_path / "meshes.py"
    path.write_text(UNDER_TORCHRUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said == {
        "4 on unnamed 2": "mesh: the plan is for mesh d0=4 but the run uses mesh d0=2",
        "1x2 on unnamed 2x1": "mesh: the plan is for mesh d0=1,d1=2 but the run uses mesh d0=2,d1=1",
        "2x1 on unnamed 2": "mesh: the plan is for mesh d0=2,d1=1 but the run uses mesh d0=2",
        "tp=2 on dp=2": "mesh: the plan is for mesh tp=2 but the run uses mesh dp=2",
        "dp=2 on dp=2": "ran",
        "2 on unnamed 2": "ran",
    }
