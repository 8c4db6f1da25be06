"""Measure the machine this runs on: a device profile (`dtplan calibrate`).

Every figure is measured on ranks spawned as a run spawns them (the same
process group backend, the same threads per rank, the same allocator
settings (`host.keep_freed_memory`), all ranks working at once, so they
share memory bandwidth and cores as a run does):

- `op_launch_s`: the time of an op that does almost nothing (on a GPU a
  one-element add; on a CPU the mean of small ops of every kind: views,
  elementwise ops, reductions, casts), called from generated fx code as a
  lowered module calls its ops: the floor of every op's time, and on a CPU
  (`dispatch_serial`) the time of an op that only makes a view;
- `flops_curve`: matmul FLOP/s per dtype at several sizes (an efficiency
  curve, not one peak), as called, launch included (the model takes the
  larger of the launch floor and the roofline), 3x3 convolutions', forward
  and backward, by FLOPs, and fused attention's, forward and backward, by
  head dimension, with its query rows per second apart from its FLOPs;
  `peak_flops` is the best matmul;
- `bandwidth_curve`: bytes an elementwise add moves per second, per dtype,
  at several sizes, over a pool of buffers larger than the caches (as a
  program's fresh tensors are), ops costing many instructions per element
  (gelu, log-softmax: "transcendental/<dtype>") and casts into the dtype
  ("cast/<dtype>"); `memory_bandwidth` is float32's largest;
- `collective_curves` and `collectives`: each collective's seconds over
  the world group at several sizes (the pricer interpolates them), and its
  latency and bandwidth fitted to the ring model (`cost.device`) by least
  squares on relative error, with the ops the runtime
  issues (gloo's all-gather: `runtime.gloo`); the intra-node link is the
  all-gather's;
- `overlap_slowdown`: how much a matmul loop slows while all-reduces run
  under it;
- `rank_skew`: how far ranks drift apart as they compute, from what a tiny
  all-reduce costs after compute segments of two lengths (the ranks arrive
  apart, the more so the longer they computed).

Ranks measure the same things at the same time; compute figures (and the
slowdown and the drift) are the ranks' mean of each rank's median over
`Sizes.rounds` passes, collective
times (each the mean of `COLLECTIVE_CALLS` calls) their slowest (a collective ends when its
slowest rank does). `sources` in the profile says which figures are
measured, where and when.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from dtplan.planner.cost.device import COLLECTIVE_KINDS, DeviceProfile, Link, load_profile
from dtplan.planner.mesh import MeshSpec
from dtplan.runtime.host import communication_threads

__all__ = ["calibrate", "fit_link", "write_profile"]

@dataclass(frozen=True)
class Sizes:
    """What is measured at which sizes."""

    matmul: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    add: tuple[int, ...] = (2**10, 2**13, 2**16, 2**19, 2**22)
    collective_bytes: tuple[int, ...] = (2**12, 2**15, 2**18, 2**20, 2**22, 2**24)
    #: head dimensions at which fused attention is measured (8 heads; batch 4, sequence 128 and batch 8, sequence 64)
    attention_head_dims: tuple[int, ...] = (8, 16, 32, 64, 128)
    #: channels (in and out) of the 3x3 convolutions measured (batch 8, 32x32)
    conv_channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    #: passes over the compute figures, each figure their median
    rounds: int = 3

    def every_other(self) -> Sizes:
        """Every other size, one pass (the tests: the same figures, coarser)."""
        return Sizes(*(getattr(self, f.name)[::2] for f in fields(self) if f.name != "rounds"), rounds=1)


#: timed calls of each collective at each size
COLLECTIVE_CALLS = 24
#: ring steps per (p - 1) of each collective (the pricer's model)
_STEPS = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "all_to_all": 1}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], device: str, *, budget_s: float = 0.06, chunks: int = 3) -> float:
    """Median seconds per call of `fn`, over `chunks` timed runs of enough
    calls to fill `budget_s` (one call to warm up and size them)."""
    fn()
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t, 1e-7)
    calls = max(1, min(10_000, int(budget_s / chunks / one)))
    out = []
    for _ in range(chunks):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t) / calls)
    return statistics.median(out)


#: the small ops of `_launch_s` on a CPU, one of each in turn: (op, arguments
#: after the one-element input `x` or its 2-d view `m`), what a lowered
#: program calls between its large ops (views, elementwise ops, reductions,
#: casts). Measured one by one on a 2-core VM: 2.4 µs for an add, 3.1 for a
#: view, 3.9 for a multiplication by a scalar, 4.5 for a cast, 6.0 for a mean.
_SMALL_OPS = (
    (torch.ops.aten.add.Tensor, lambda x, m: (x, x), {}),
    (torch.ops.aten.view.default, lambda x, m: (x, [1, 1]), {}),
    (torch.ops.aten.t.default, lambda x, m: (m,), {}),
    (torch.ops.aten.slice.Tensor, lambda x, m: (m, 1, 0, 1), {}),
    (torch.ops.aten.expand.default, lambda x, m: (m, [2, 1]), {}),
    (torch.ops.aten.mul.Tensor, lambda x, m: (x, 2.0), {}),
    (torch.ops.aten.sum.dim_IntList, lambda x, m: (m, [0], True), {}),
    (torch.ops.aten.mean.dim, lambda x, m: (m, [-1], True), {}),
    (torch.ops.aten.clone.default, lambda x, m: (x,), {}),
    (torch.ops.aten.cat.default, lambda x, m: ([x, x], 0), {}),
    (torch.ops.aten._to_copy.default, lambda x, m: (x,), {"dtype": torch.bfloat16}),
)


def _realtime_comm() -> bool:
    """Whether this rank's gloo threads run under the real-time policy
    (`launch.realtime_communication`): a profile measured so describes runs
    made so, and its description says it."""
    for tid in communication_threads():
        try:
            if os.sched_getscheduler(tid) == os.SCHED_FIFO:
                return True
        except (OSError, AttributeError):
            continue
    return False


def _launch_s(device: str) -> float:
    """Per op, 220 small ops in a generated fx module: on a GPU one-element
    adds (each launches a kernel), on a CPU, where the thread that computes
    also dispatches, `_SMALL_OPS` in turn (each op's fixed cost differs, and
    a program's small ops are of every kind, not the cheapest)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    m = graph.call_function(torch.ops.aten.view.default, (x, [1, 1]))
    ops = _SMALL_OPS[:1] if device == "cuda" else _SMALL_OPS  # a GPU: the add alone
    count = 220
    for i in range(count):
        op, args, kwargs = ops[i % len(ops)]
        graph.call_function(op, args(x, m), kwargs)
    graph.output(x)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    one = torch.zeros(1, device=device)
    return _seconds(lambda: gm(one), device) / count


def _compute(device: str, dtypes: tuple[torch.dtype, ...], sizes: Sizes) -> dict:
    flops_curve: dict[str, list[list[float]]] = {}
    bandwidth: dict[str, list[list[float]]] = {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        pts = []
        for n in sizes.matmul:
            # a linear's shape: activations times a transposed weight, from a
            # pool larger than the caches, as a program's operands are
            pool = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype).t()) for _ in range(max(1, min(64, 2**25 // (2 * n * n * 4))))]
            it = iter(range(1 << 62))
            s = _seconds(lambda pool=pool, it=it: torch.mm(*pool[next(it) % len(pool)]), device)
            flops = 2.0 * n**3
            pts.append([flops, flops / s])  # launch included: the model takes the larger
        flops_curve[name] = pts
        for kind, pts in _attention(device, dtype, sizes.attention_head_dims).items():
            flops_curve[f"{kind}/{name}"] = pts
        flops_curve[f"convolution/{name}"], flops_curve[f"convolution_backward/{name}"] = _convolution(device, dtype, sizes.conv_channels)
        bandwidth[name] = _bandwidth(device, dtype, torch.add, 3, sizes.add)
        gelu = _bandwidth(device, dtype, lambda a, _b: torch.nn.functional.gelu(a), 2, sizes.add)
        softmax = _bandwidth(device, dtype, lambda a, _b: torch.log_softmax(a.view(-1, 256), -1), 2, sizes.add)
        bandwidth[f"transcendental/{name}"] = [[g[0], (g[1] + s[1]) / 2] for g, s in zip(gelu, softmax, strict=True)]
        # a cast into this dtype (from the other one measured; float32's from bfloat16)
        source = torch.float32 if dtype != torch.float32 else torch.bfloat16
        itemsizes = source.itemsize + dtype.itemsize  # read one, write the other: in units of the source's
        bandwidth[f"cast/{name}"] = _bandwidth(device, source, lambda a, _b, dtype=dtype: a.to(dtype), itemsizes / source.itemsize, sizes.add)
    return {"flops_curve": flops_curve, "bandwidth_curve": bandwidth}


def _say_compute(figures: dict, dtypes: tuple[str, ...], sizes: Sizes, say: Callable[[str], None]) -> None:
    flops, bandwidth = figures["flops_curve"], figures["bandwidth_curve"]
    g = lambda pts: ", ".join(f"{p[1] / 1e9:.1f}" for p in pts)  # noqa: E731
    for name in dtypes:
        say(f"  matmul {name}: " + ", ".join(f"{n}: {p[1] / 1e9:.1f}" for n, p in zip(sizes.matmul, flops[name], strict=True)) + " GFLOP/s")
        rows = zip(flops[f"attention/{name}"], flops[f"attention_backward/{name}"], flops[f"attention_rows/{name}"], flops[f"attention_backward_rows/{name}"], strict=True)
        say(
            f"  attention {name} (forward/backward): "
            + ", ".join(f"d {f[0]:.0f}: {f[1] / 1e9:.1f}/{b[1] / 1e9:.1f} GFLOP/s + {1e9 / fr[1]:.0f}/{1e9 / br[1]:.0f} ns per row" for f, b, fr, br in rows)
        )
        conv = zip(sizes.conv_channels, flops[f"convolution/{name}"], flops[f"convolution_backward/{name}"], strict=True)
        say(f"  convolution {name} (forward/backward): " + ", ".join(f"{c}: {f[1] / 1e9:.1f}/{b[1] / 1e9:.1f}" for c, f, b in conv) + " GFLOP/s")
        say(f"  add bandwidth {name}: " + ", ".join(f"{p[0] / 2**10:.0f} KiB: {p[1] / 1e9:.1f}" for p in bandwidth[name]) + " GB/s")
        say(f"  cast bandwidth {name}: {g(bandwidth[f'cast/{name}'])} GB/s")
        say(f"  gelu/log_softmax bandwidth {name}: {g(bandwidth[f'transcendental/{name}'])} GB/s")


def _median_curves(passes: list[dict]) -> dict:
    """Per point, the median rate over the passes (the sizes are the same in each)."""
    return {
        section: {
            key: [[pt[0], statistics.median(p[section][key][i][1] for p in passes)] for i, pt in enumerate(curve)]
            for key, curve in passes[0][section].items()
        }
        for section in passes[0]
    }


def _attention(device: str, dtype: torch.dtype, head_dims: tuple[int, ...]) -> dict[str, list[list[float]]]:
    """Fused attention, forward and backward (torch's FLOP formulas: backward
    2.5x forward), by head dimension: FLOP/s, and query rows per second apart
    from the FLOPs. Two shapes per head dimension with the same rows and
    FLOPs 2:1 (batch 4, sequence 128; batch 8, sequence 64; 8 heads) split
    each time into rows x a + FLOPs / rate: CPU kernels spend per-row work
    that FLOP/s measured at one sequence length miss at another (bfloat16's
    backward on this kind of machine is mostly that)."""
    from dtplan.ir.flops import sdpa_flops

    sdpa = torch.nn.functional.scaled_dot_product_attention
    out: dict[str, list[list[float]]] = {k: [] for k in ("attention", "attention_backward", "attention_rows", "attention_backward_rows")}
    for d in head_dims:
        times: dict[str, list[float]] = {"attention": [], "attention_backward": []}
        long_shape, short_shape = (4, 8, 128, d), (8, 8, 64, d)
        for shape in (long_shape, short_shape):
            q, k, v = (torch.randn(*shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            with torch.no_grad():
                fwd = _seconds(lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=True), device)

            def step(q=q, k=k, v=v):
                o = sdpa(q, k, v, is_causal=True)
                torch.autograd.grad(o, (q, k, v), torch.ones_like(o))

            times["attention"].append(fwd)
            times["attention_backward"].append(max(_seconds(step, device) - fwd, fwd * 0.5))
        rows = math.prod(short_shape[:-1])  # the long shape's too
        flops = float(sdpa_flops(short_shape, short_shape, short_shape))
        for kind, scale in (("attention", 1.0), ("attention_backward", 2.5)):
            long_, short = times[kind]
            # rows·a + 2F/r = long, rows·a + F/r = short: the per-row share of the short shape
            share = min(0.9, max(0.0, (2 * short - long_) / short))
            out[kind].append([float(d), scale * flops / ((1 - share) * short)])
            out[f"{kind}_rows"].append([float(d), rows / max(share * short, 1e-12)])
    return out


def _convolution(device: str, dtype: torch.dtype, channels: tuple[int, ...]) -> tuple[list[list[float]], list[list[float]]]:
    """FLOP/s of a 3x3 convolution (batch 8, 32x32, `channels` in and out),
    forward and backward (input and weight gradients), by FLOPs as torch's
    formulas count them."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    forward, backward = [], []
    for c in channels:
        x = torch.randn(8, c, 32, 32, device=device, dtype=dtype)
        w = torch.randn(c, c, 3, 3, device=device, dtype=dtype)
        g = torch.randn(8, c, 32, 32, device=device, dtype=dtype)
        fwd = lambda x=x, w=w: aten.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # noqa: E731
        bwd = lambda x=x, w=w, g=g: aten.convolution_backward(g, x, w, [0], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])  # noqa: E731
        for fn, pts in ((fwd, forward), (bwd, backward)):
            with FlopCounterMode(display=False) as counter:
                fn()
            flops = float(counter.get_total_flops())
            pts.append([flops, flops / _seconds(fn, device)])
    return forward, backward


def _bandwidth(device: str, dtype: torch.dtype, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tensors: float, counts: tuple[int, ...]) -> list[list[float]]:
    """Bytes `op` moves per second (`tensors` of the element count, inputs
    and output), by size, over a pool of buffers larger than the caches (as
    a program's fresh tensors are)."""
    out = []
    for n in counts:
        pool = [(torch.randn(n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)) for _ in range(max(1, min(256, 2**25 // (n * 4))))]
        it = iter(range(1 << 62))
        s = _seconds(lambda pool=pool, it=it: op(*pool[next(it) % len(pool)]), device)
        moved = float(tensors * n * pool[0][0].element_size())
        out.append([moved, moved / s])
    return out


def _collectives(mesh, device: str, sizes: tuple[int, ...]) -> dict:
    """Seconds per collective, by kind and bytes (the plan-file convention)."""
    from dtplan.runtime import gloo

    f = torch.ops._c10d_functional
    group = mesh.get_group(0)
    name, p = group.group_name, mesh.size(0)
    backend = str(torch.distributed.get_backend(group))
    gather = gloo.OP if backend == "gloo" else f.all_gather_into_tensor.default
    out: dict[str, list[list[float]]] = {}
    for kind in COLLECTIVE_KINDS:
        pts = []
        for nbytes in sizes:
            numel = nbytes // 4
            if kind == "all_gather":
                x = torch.randn(numel // p, device=device)
                fn = lambda x=x: f.wait_tensor(gather(x, p, name))  # noqa: E731
            elif kind == "all_reduce":
                x = torch.randn(numel, device=device)
                fn = lambda x=x: f.wait_tensor(f.all_reduce(x, "sum", name))  # noqa: E731
            elif kind == "reduce_scatter":
                x = torch.randn(numel, device=device)
                fn = lambda x=x: f.wait_tensor(f.reduce_scatter_tensor(x, "sum", p, name))  # noqa: E731
            else:
                x = torch.randn(numel, device=device)
                splits = [numel // p] * p
                fn = lambda x=x, s=splits: f.wait_tensor(f.all_to_all_single(x, s, s, name))  # noqa: E731
            # every rank makes the same calls: a fixed count, each one timed
            # from a barrier (the ranks enter together, as a planned step's
            # do); their mean, not their median: on a shared machine a few
            # calls wait a scheduler tick for their threads, and a step pays
            # its collectives' sum, the mean's worth each
            fn()
            times = []
            for _ in range(COLLECTIVE_CALLS):
                torch.distributed.barrier(group)
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            pts.append([float(nbytes), statistics.fmean(times)])
        out[kind] = pts
    return {"collective_seconds": out, "group_size": p, "backend": backend}


def _slowdown(mesh, device: str) -> float:
    """A matmul loop's time with all-reduces running under it, over its time alone, less 1."""
    f = torch.ops._c10d_functional
    name = mesh.get_group(0).group_name
    a = torch.randn(256, 256, device=device)
    big = torch.randn(2**21, device=device)

    def work():
        for _ in range(20):
            torch.mm(a, a)
        _sync(device)

    torch.distributed.barrier()
    alone = []
    for _ in range(9):
        t = time.perf_counter()
        work()
        alone.append(time.perf_counter() - t)
    torch.distributed.barrier()
    under = []
    for _ in range(9):
        handle = f.all_reduce(big, "sum", name)
        t = time.perf_counter()
        work()
        under.append(time.perf_counter() - t)
        f.wait_tensor(handle)
    return max(0.0, statistics.median(under) / statistics.median(alone) - 1.0)


def _skew(mesh, device: str) -> float:
    """How far ranks drift apart as they compute: a 4-byte all-reduce after
    each segment of compute costs more the longer the segment (the ranks
    arrive apart); the slope, over two segment lengths, is the fraction of
    the compute between collectives by which a collective starts late."""
    f = torch.ops._c10d_functional
    name = mesh.get_group(0).group_name
    a = torch.randn(256, 256, device=device)
    x = torch.zeros(1, device=device)

    def segments(k: int, sync: bool) -> float:
        out = []
        for _ in range(7):
            torch.distributed.barrier()
            t = time.perf_counter()
            for _ in range(12):
                for _ in range(k):
                    torch.mm(a, a)
                _sync(device)
                if sync:
                    f.wait_tensor(f.all_reduce(x, "sum", name))
            out.append((time.perf_counter() - t) / 12)
        return statistics.median(out)

    short, long_ = (segments(k, False) for k in (4, 32))
    cost_short, cost_long = segments(4, True) - short, segments(32, True) - long_
    return max(0.0, (cost_long - cost_short) / max(long_ - short, 1e-9))


def _measure(rank: int, mesh, *, dtypes: tuple[str, ...], verbose: bool, sizes: Sizes) -> dict:
    device = mesh.device_type
    say = (lambda s: print(s, flush=True)) if rank == 0 and verbose else (lambda s: None)
    launch = _launch_s(device)
    say(f"  op launch: {launch * 1e6:.2f} us")
    out = {"op_launch_s": launch, "threads": torch.get_num_threads(), "realtime_comm": _realtime_comm()}
    # compute figures: each the median of `sizes.rounds` passes over them all,
    # seconds apart, so that no figure rests on one stretch of a machine
    # whose speed drifts (a shared VM's does, by 10-20% over seconds)
    # and so are the collectives': gloo's time for one size varies 2x
    # between passes a minute apart
    # and so are the slowdown under communication and the ranks' drift, in
    # each pass too (single measurements of the drift ranged 9-32%)
    passes, collectives, slowdowns, skews = [], [], [], []
    for r in range(sizes.rounds):
        say(f"  compute and collectives, pass {r + 1} of {sizes.rounds} ...")
        passes.append(_compute(device, tuple(getattr(torch, d) for d in dtypes), sizes))
        collectives.append(_collectives(mesh, device, sizes.collective_bytes))
        slowdowns.append(_slowdown(mesh, device))
        skews.append(_skew(mesh, device))
    figures = _median_curves(passes)
    _say_compute(figures, dtypes, sizes, say)
    out.update(figures)
    out.update(collectives[0])
    out["collective_seconds"] = _median_curves([{"c": c["collective_seconds"]} for c in collectives])["c"]
    out["overlap_slowdown"] = statistics.median(slowdowns)
    say(f"  compute under communication: {out['overlap_slowdown']:.1%} slower")
    out["rank_skew"] = statistics.median(skews)
    say(f"  ranks drift apart by {out['rank_skew']:.1%} of the compute between collectives")
    return out


def fit_link(kind: str, p: int, points: list[list[float]]) -> Link:
    """Latency and bandwidth of the ring model, time = s·α + s/p · n/B with
    s = steps·(p-1), fitted by least squares on relative error."""
    s = _STEPS[kind] * (p - 1)
    # rows (s, s/p·n) · (α, 1/B) ≈ t, each divided by t
    rows = [(s / t, s / p * n / t) for n, t in points]
    saa = sum(a * a for a, _ in rows)
    sab = sum(a * b for a, b in rows)
    sbb = sum(b * b for _, b in rows)
    sa, sb = sum(a for a, _ in rows), sum(b for _, b in rows)
    det = saa * sbb - sab * sab
    alpha, inv_b = ((sbb * sa - sab * sb) / det, (saa * sb - sab * sa) / det) if det > 0 else (0.0, 0.0)
    if inv_b <= 0:  # latency-bound throughout: bandwidth from the largest size alone
        n, t = points[-1]
        inv_b = max(t - s * max(alpha, 0.0), t * 0.05) / (s / p * n)
    if alpha < 0:  # refit the bandwidth with no latency
        alpha = 0.0
        inv_b = sum(b for _, b in rows) / sum(b * b for _, b in rows)
    return Link(bandwidth=1.0 / inv_b, latency=alpha)


def calibrate(
    ranks: int = 2,
    *,
    base: str = "cpu",
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    say: Callable[[str], None] | None = print,
    quick: bool = False,
) -> DeviceProfile:
    """Measure this machine on `ranks` spawned ranks; a profile built on `base`
    (its capacity and node size) with every measured figure replaced.
    `say` gets progress (rank 0's measurements as they come); None: quiet.
    `quick` measures every other size (the tests: the same figures, coarser)."""
    from dtplan.runtime.launch import device_type, spawn

    if ranks < 2:
        raise ValueError(f"calibration measures collectives: it needs at least 2 ranks, got {ranks}")
    verbose = say is not None
    say = say or (lambda _m: None)
    start = time.perf_counter()
    device = device_type()
    say(f"calibrating on {ranks} {device} rank(s) ...")
    mesh = MeshSpec((ranks,), ("d0",))
    sizes = Sizes().every_other() if quick else Sizes()
    results = spawn(functools.partial(_measure, dtypes=dtypes, verbose=verbose, sizes=sizes), mesh)
    profile = _profile(results, load_profile(base), ranks=ranks, device=device)
    say(f"calibrated in {time.perf_counter() - start:.0f} s")
    return profile


def _profile(results: list[dict], base: DeviceProfile, *, ranks: int, device: str) -> DeviceProfile:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    launch = mean([r["op_launch_s"] for r in results])
    curves = {}
    for dtype in results[0]["flops_curve"]:
        curves[dtype] = [[pt[0], mean([r["flops_curve"][dtype][i][1] for r in results])] for i, pt in enumerate(results[0]["flops_curve"][dtype])]
    bandwidth = {}
    for dtype in results[0]["bandwidth_curve"]:
        bandwidth[dtype] = [[pt[0], mean([r["bandwidth_curve"][dtype][i][1] for r in results])] for i, pt in enumerate(results[0]["bandwidth_curve"][dtype])]
    p = results[0]["group_size"]
    links, curves_by_kind = {}, {}
    for kind, pts in results[0]["collective_seconds"].items():
        slowest = [[pt[0], max(r["collective_seconds"][kind][i][1] for r in results)] for i, pt in enumerate(pts)]
        links[kind] = fit_link(kind, p, slowest)
        curves_by_kind[kind] = slowest
    peak = {d: max(rate for _, rate in pts) for d, pts in curves.items() if "/" not in d}
    peak.setdefault("float32", dict(base.peak_flops)["float32"])
    for half in ("bfloat16", "float16"):
        peak.setdefault(half, peak.get("bfloat16", peak["float32"]))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    comm = ", gloo threads real-time" if all(r.get("realtime_comm") for r in results) else ""
    where = f"{platform.node() or 'this machine'}, {ranks} {device} ranks of {results[0]['threads']} thread(s) over {results[0]['backend']}{comm}, torch {torch.__version__}, {when}"
    measured = f"measured by dtplan calibrate ({where})"
    sources = {
        k: measured
        for k in ("op_launch_s", "flops_curve", "peak_flops", "bandwidth_curve", "memory_bandwidth", "collectives", "collective_curves", "intra_node", "overlap_slowdown", "rank_skew")
    }
    sources.update({"memory_capacity": f"from the {base.name} profile", "inter_node": f"from the {base.name} profile", "devices_per_node": f"from the {base.name} profile"})
    return DeviceProfile(
        name=f"calibrated-{platform.node() or 'machine'}",
        description=f"Calibrated on {where}.",
        peak_flops=peak,
        memory_bandwidth=bandwidth["float32"][-1][1],
        memory_capacity=base.memory_capacity,
        devices_per_node=base.devices_per_node,
        intra_node=links["all_gather"],
        inter_node=base.inter_node,
        overlap_slowdown=round(mean([r["overlap_slowdown"] for r in results]), 4),
        rank_skew=round(mean([r["rank_skew"] for r in results]), 4),
        op_launch_s=launch,
        flops_curve=curves,
        bandwidth_curve=bandwidth,
        collectives={p: links},
        collective_curves={p: curves_by_kind},
        sources=sources,
        dispatch_serial=device == "cpu",
    )


def write_profile(profile: DeviceProfile, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    return out
