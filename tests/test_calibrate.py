"""Measured profiles: the curves and links `dtplan calibrate` writes, read back
and used by the pricer; the fit of a collective's latency and bandwidth."""
from __future__ import annotations

import json
import math
import os
import sys
import threading

import pytest
import torch

from dtplan.planner.cost.device import DeviceProfile, Link, collective_time, compute_time, load_profile
from dtplan.planner.mesh import parse_mesh
from dtplan.runtime.calibrate import fit_link
from dtplan.runtime.host import COMMUNICATION_THREADS
from dtplan.runtime.launch import spawn


def _measured(**extra) -> DeviceProfile:
    cpu = load_profile("cpu").to_json()
    cpu.update(
        op_launch_s=3e-6,
        flops_curve={
            "float32": [[1e6, 1e10], [1e8, 1e11]],
            "attention/float32": [[8, 1e10], [64, 6e10]],
            "attention_backward_rows/float32": [[8, 1e6], [64, 1e6]],
            "convolution/float32": [[1e6, 2e9], [1e8, 2e10]],
        },
        bandwidth_curve={"float32": [[1e4, 1e10], [1e8, 3e10]], "transcendental/float32": [[1e4, 1e9], [1e8, 1e10]], "cast/float32": [[1e4, 1e9], [1e8, 1e9]]},
        collectives={"2": {"all_gather": {"bandwidth": 1e9, "latency": 3e-4}}},
        collective_curves={"2": {"all_reduce": [[1e3, 1e-4], [1e5, 1e-3]]}},
        overlap_slowdown=0.25,
        sources={"flops_curve": "measured by a test"},
        **extra,
    )
    return DeviceProfile.from_json(cpu)


def test_a_measured_profile_round_trips_through_its_file(tmp_path):
    p = _measured()
    path = tmp_path / "p.json"
    path.write_text(json.dumps(p.to_json()))
    assert load_profile(str(path)) == p
    assert dict(p.sources) == {"flops_curve": "measured by a test"}


def test_rates_interpolate_in_log_log_and_clamp():
    p = _measured()
    assert p.flops_at("float32", 1e7) == pytest.approx(math.sqrt(1e10 * 1e11))  # half way in log
    assert p.flops_at("float32", 1e3) == 1e10 and p.flops_at("float32", 1e12) == 1e11
    assert p.flops_at("bf16", 1e7) == p.flops_per_s("bf16")  # no curve for the dtype: the peak
    assert p.flops_at("float32", 1e9, "attention", size=64) == 6e10  # attention by head dimension
    assert p.bandwidth_at(1e6, "float32", "transcendental") == pytest.approx(10 ** 9.5)
    assert p.bandwidth_at(1e6, "bfloat16") == pytest.approx(1e10 * 3 ** 0.5)  # float32's curve


def test_compute_time_uses_the_curves_and_the_floor():
    p = _measured()
    assert compute_time(1e8, 0, p, "float32") == pytest.approx(1e8 / 1e11)
    assert compute_time(1e8, 1e8, p, "float32") == pytest.approx(max(1e-3, 1e8 / 3e10))
    assert compute_time(10, 40, p, "float32") == 3e-6  # the launch floor
    assert compute_time(0, 0, p, "float32") == 0.0  # a view does no work
    assert compute_time(1e8, 1e8, p, "float32", "transcendental") == pytest.approx(1e-2)
    assert compute_time(1e8, 0, p, "float32", "convolution") == pytest.approx(1e8 / 2e10)  # its own curve
    assert compute_time(1e8, 0, p, "float32", "convolution_backward") == pytest.approx(1e8 / 1e11)  # none: matmul's
    assert compute_time(1, 1e8, p, "float32", "cast") == pytest.approx(1e8 / 1e9)
    # attention's per-row work adds to its FLOPs' time where measured (backward here, not forward)
    assert compute_time(6e8, 0, p, "float32", "attention_backward", size=64, rows=2000) == pytest.approx(6e8 / 1e11 + 2000 / 1e6)
    assert compute_time(6e8, 0, p, "float32", "attention", size=64, rows=2000) == pytest.approx(6e8 / 6e10)


def test_the_pricer_prices_convolutions_casts_and_attention_rows_by_their_curves():
    """An op's kind picks its curve; a sharded attention's rows are its shard's."""
    import torch

    from dtplan.ir.capture import capture
    from dtplan.planner.cost.pricing import Pricer
    from dtplan.planner.space.strategies import Strategy
    from torch.distributed.tensor import Replicate, Shard

    class M(torch.nn.Module):
        def forward(self, x, w):
            return torch.nn.functional.conv2d(x, w).to(torch.float64)

    p = _measured()
    graph = capture(M(), (torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3))).graph
    conv = next(n for n in graph if "convolution" in n.op_name)
    cast = next(n for n in graph if "_to_copy" in n.op_name)
    pricer = Pricer((2,), p)
    whole = Strategy(inputs=((Replicate(),), (Replicate(),)), output=(Replicate(),))
    split = Strategy(inputs=((Shard(0),), (Replicate(),)), output=(Shard(0),))
    assert pricer.compute_s(conv, whole) == compute_time(conv.flops, conv.bytes, p, "float32", "convolution")
    assert pricer.compute_s(conv, split) == compute_time(conv.flops / 2, conv.bytes / 2, p, "float32", "convolution")
    assert pricer.compute_s(cast, whole) == compute_time(cast.flops, cast.bytes, p, "float64", "cast")


def test_a_serially_dispatching_host_charges_a_view_its_dispatch():
    """On a CPU the op that only makes a view still costs the dispatch; on a
    GPU (or a datasheet profile) the host runs ahead and it costs nothing."""
    from dtplan.ir.capture import capture
    from dtplan.planner.cost.pricing import Pricer
    from dtplan.planner.space.strategies import Strategy
    from torch.distributed.tensor import Replicate

    class M(torch.nn.Module):
        def forward(self, x):
            return (x + 1).t()

    graph = capture(M(), (torch.randn(4, 6),)).graph
    view = next(n for n in graph if n.op_name.startswith("aten.t") or "permute" in n.op_name or "transpose" in n.op_name)
    add = next(n for n in graph if "add" in n.op_name)
    whole = Strategy(inputs=((Replicate(),),), output=(Replicate(),))
    serial = _measured(dispatch_serial=True)
    assert Pricer((2,), serial).compute_s(view, whole) == serial.op_launch_s == 3e-6
    assert Pricer((2,), _measured()).compute_s(view, whole) == 0.0
    assert Pricer((2,), serial).compute_s(add, whole) == Pricer((2,), _measured()).compute_s(add, whole) > 0
    assert DeviceProfile.from_json(serial.to_json()) == serial and serial.to_json()["dispatch_serial"] is True
    with pytest.raises(ValueError, match="dispatch_serial"):
        DeviceProfile.from_json({**serial.to_json(), "dispatch_serial": "yes"})


def test_ranks_keep_freed_memory_for_the_next_step():
    """A spawned CPU rank's allocator keeps what a step frees: freeing a 64 MiB
    block (ATen's CPU tensors come from this malloc) leaves the process's
    resident memory where it was (glibc, by default, hands it back and faults
    it in again on the next step)."""
    import subprocess
    import sys

    probe = (
        "import ctypes, sys\n"
        "from dtplan.runtime.host import keep_freed_memory\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "if sys.argv[1] == 'keep':\n"
        "    assert keep_freed_memory()\n"
        "n = 64 << 20\n"
        "block = libc.malloc(n)\n"
        "ctypes.memset(block, 1, n)\n"
        "before = rss(); libc.free(block)\n"
        "print((before - rss()) / 2**20)\n"
    )
    freed = {mode: float(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True).stdout) for mode in ("keep", "default")}
    assert freed["keep"] < 1 and freed["default"] > 60, freed


def _thread_policies(rank, mesh):
    out = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            out.append((f.read().strip(), os.sched_getscheduler(int(tid)), int(tid) == threading.get_native_id()))
    return sorted(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread policies are Linux's")
def test_realtime_communication_is_asked_for_and_needs_a_core_per_rank(monkeypatch):
    """With DTPLAN_REALTIME_COMM=1, where the process may (root or
    RLIMIT_RTPRIO) and every rank has a core of its own, every gloo thread
    of a spawned rank (the TCP loop, the process group's workers) runs under
    SCHED_FIFO, so a woken one preempts the compute thread, and the rank's
    own threads stay under SCHED_OTHER. Not asked for, or with more ranks
    than cores, every thread stays under SCHED_OTHER."""
    import resource

    permitted = os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_RTPRIO)[0] > 0
    cores = len(os.sched_getaffinity(0))
    for asked, mesh in ((True, "2"), (True, "2x2"), (False, "2")):
        monkeypatch.setenv("DTPLAN_REALTIME_COMM", "1" if asked else "0")
        fifo = asked and permitted and parse_mesh(mesh).size <= cores
        for rank_threads in spawn(_thread_policies, parse_mesh(mesh)):
            gloo = [(name, policy) for name, policy, _ in rank_threads if name.startswith(COMMUNICATION_THREADS)]
            # (a worker that has not run yet still bears the process's name)
            assert {n for n, _ in gloo} == {"gloo_tcp_loop", "pt_gloo_runloop"} or not fifo, rank_threads
            assert {p for _, p in gloo} == {os.SCHED_FIFO if fifo else os.SCHED_OTHER}, (asked, mesh, rank_threads)
            others = [(name, policy) for name, policy, _ in rank_threads if not name.startswith(COMMUNICATION_THREADS)]
            assert [p for _, p in others] == [os.SCHED_OTHER] * len(others), rank_threads
            assert any(main for *_, main in rank_threads)


def test_a_measured_link_replaces_the_profile_link_for_its_kind_and_group_size():
    p = _measured()
    assert p.collective_link("all_gather", 2, p.intra_node) == Link(1e9, 3e-4)
    assert p.collective_link("all_reduce", 2, p.intra_node) is p.intra_node  # not measured
    assert p.collective_link("all_gather", 4, p.intra_node) is p.intra_node  # another group size
    assert p.collective_link("all_gather", 2, p.inter_node) is p.inter_node  # across nodes


def test_a_measured_collective_curve_prices_its_kind_and_group_size():
    p = _measured()
    assert p.collective_seconds("all_reduce", 1e4, 2, p.intra_node) == pytest.approx(10 ** -3.5)  # log-log half way
    assert p.collective_seconds("all_reduce", 10, 2, p.intra_node) == 1e-4  # the smallest measured: latency
    assert p.collective_seconds("all_reduce", 1e6, 2, p.intra_node) == pytest.approx(1e-2)  # linear past the largest
    link = p.collective_link("all_gather", 2, p.intra_node)
    assert p.collective_seconds("all_gather", 1e6, 2, p.intra_node) == collective_time("all_gather", 1e6, 2, link)  # no curve: its link
    assert p.collective_seconds("all_reduce", 1e6, 4, p.intra_node) == collective_time("all_reduce", 1e6, 4, p.intra_node)  # another size
    assert p.collective_seconds("all_reduce", 1e6, 2, p.inter_node) == collective_time("all_reduce", 1e6, 2, p.inter_node)


@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter"])
@pytest.mark.parametrize("p", [2, 4])
def test_fit_link_recovers_the_ring_model(kind, p):
    truth = Link(bandwidth=2e9, latency=1e-4)
    pts = [[n, collective_time(kind, n, p, truth)] for n in (2**12, 2**16, 2**20, 2**23)]
    got = fit_link(kind, p, pts)
    assert got.bandwidth == pytest.approx(truth.bandwidth, rel=1e-6)
    assert got.latency == pytest.approx(truth.latency, rel=1e-6)


def test_fit_link_never_goes_negative():
    # a small size measured slower than a larger one: latency-bound, no negative bandwidth
    got = fit_link("all_gather", 2, [[4096, 1e-3], [65536, 5e-4], [2**20, 6e-4]])
    assert got.bandwidth > 0 and got.latency >= 0


def test_bad_curves_are_refused():
    with pytest.raises(ValueError, match="bandwidth_curve"):
        _measured().__class__.from_json({**_measured().to_json(), "bandwidth_curve": {"float32": [[1, -2]]}})
    with pytest.raises(ValueError, match="group size"):
        DeviceProfile.from_json({**load_profile("cpu").to_json(), "collectives": {"one": {}}})


def test_calibrate_measures_this_machine_into_a_profile_the_planner_takes(tmp_path, monkeypatch):
    """Two gloo ranks, float32 only, every other size (the command measures
    bf16 too, at every size); gloo's threads under the fair policy, as the
    description says (it names the real-time policy where that was used)."""
    from dtplan.runtime.calibrate import calibrate, write_profile

    monkeypatch.delenv("DTPLAN_REALTIME_COMM", raising=False)
    p = calibrate(2, dtypes=("float32",), say=None, quick=True)
    assert "real-time" not in p.description and "2 cpu ranks of 1 thread(s) over gloo, torch" in p.description
    curves = dict(p.flops_curve)
    assert set(curves) == {
        "float32", "attention/float32", "attention_backward/float32", "attention_rows/float32", "attention_backward_rows/float32",
        "convolution/float32", "convolution_backward/float32",
    }
    assert all(rate > 0 for _, rate in curves["float32"]) and p.flops_per_s("float32") == max(r for _, r in curves["float32"])
    assert {k for k, _ in p.bandwidth_curve} == {"float32", "transcendental/float32", "cast/float32"}
    assert p.op_launch_s > 0 and p.overlap_slowdown >= 0
    assert p.dispatch_serial  # a CPU: the host dispatches on the computing thread
    links = dict(dict(p.collectives)[2])
    assert set(links) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}
    assert p.intra_node == links["all_gather"]
    curves = dict(dict(p.collective_curves)[2])
    assert set(curves) == set(links) and all(len(c) == 3 and all(t > 0 for _, t in c) for c in curves.values())
    assert "measured by dtplan calibrate" in dict(p.sources)["collectives"]
    assert load_profile(str(write_profile(p, tmp_path / "me.json"))) == p


@pytest.mark.parametrize("name", ["a100", "cpu", "h100", "h200"])
def test_shipped_profiles_say_which_figures_are_measured_and_which_datasheet(name):
    sources = dict(load_profile(name).sources)
    for key in ("peak_flops", "memory_bandwidth", "intra_node", "inter_node", "memory_capacity"):
        assert sources[key].startswith(("datasheet", "measured", "rough default")), (name, key)
    assert sources["peak_flops"].startswith("measured") == (name == "h200")
