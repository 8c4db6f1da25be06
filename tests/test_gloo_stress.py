"""Gloo collectives in flight over compute, as the overlapped program issues
them, on 4 real ranks (mesh 2x2): every result exact, no rank faulting.

The gathers go through `dtplan.runtime.gloo`'s op, on both mesh axes at once,
most from temporary non-contiguous inputs (the op gathers a contiguous copy
that only the collective's work holds), beside functional reduce-scatters,
all-reduces and all-to-alls, with small blocks allocated and freed in
between. Each rank has glibc overwrite what it frees, so a collective that
read or wrote a buffer freed under it would give wrong values here rather
than corrupt the heap for some later allocation to trip over; a rank killed
by a signal at any point fails the run (`launch._join`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

import torch

from dtplan.planner.mesh import parse_mesh
from dtplan.runtime.launch import spawn

#: glibc's mallopt parameter: fill each freed block with this byte
_M_PERTURB = -6


def _perturb_freed_memory() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc or not
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_PERTURB, 0xA5))


def _input_held_in_flight(mesh) -> list[bool]:
    """A gather's input, dropped by the caller while its peer has not yet
    joined: alive until the wait, then freed."""
    from dtplan.runtime import gloo

    f = torch.ops._c10d_functional
    if mesh.get_coordinate()[0] == 1:
        time.sleep(0.3)  # the peer's gather stays in flight meanwhile
    x = torch.ones(64, 16)
    handle = torch.UntypedStorage._weak_ref(x.untyped_storage())
    out = gloo.OP(x, 2, mesh.get_group(0).group_name)
    del x
    in_flight = not torch.UntypedStorage._expired(handle)
    f.wait_tensor(out)
    del out
    deadline = time.monotonic() + 2  # gloo's worker lets go of its work just after completing it
    while not torch.UntypedStorage._expired(handle) and time.monotonic() < deadline:
        time.sleep(0.01)
    after = not torch.UntypedStorage._expired(handle)
    torch.UntypedStorage._free_weak_ref(handle)
    return [in_flight, after]


def _in_flight(rank: int, mesh) -> dict:
    from dtplan.runtime import gloo

    f = torch.ops._c10d_functional
    perturbed = _perturb_freed_memory()
    held = _input_held_in_flight(mesh)
    groups = [mesh.get_group(a).group_name for a in range(mesh.ndim)]
    coord = mesh.get_coordinate()
    bad = 0
    for it in range(20):
        pending = []
        for i in range(10):
            axis = i % 2
            group, me = groups[axis], coord[axis]
            src = torch.full((48 + i, 40), float(me * 1000 + i + it))
            x = src.t() if i % 3 else src
            want = torch.cat([torch.full(tuple(x.shape), float(r * 1000 + i + it)) for r in range(2)])
            pending.append((gloo.OP(x, 2, group), want))
            del src, x
            if i % 4 == 1:
                pending.append((f.reduce_scatter_tensor(torch.ones(64, 8 + i), "sum", 2, group), torch.full((32, 8 + i), 2.0)))
            elif i % 4 == 2:
                pending.append((f.all_reduce(torch.ones(7 + i), "sum", group), torch.full((7 + i,), 2.0)))
            elif i % 4 == 3:
                t = torch.full((4, 5), float(me))
                pending.append((f.all_to_all_single(t, [2, 2], [2, 2], group), torch.cat([torch.zeros(2, 5), torch.ones(2, 5)])))
            y = torch.randn(96, 96)
            for _ in range(2):
                y = torch.tanh(y @ y.t() / 96)
            junk = [torch.empty(17 * (k + 1) + i) for k in range(20)]
            del junk
        for out, want in pending:
            bad += not torch.equal(f.wait_tensor(out), want)
        del pending
    return {"bad": bad, "held": held, "perturbed": perturbed}


def test_collectives_in_flight_over_compute_keep_their_buffers_and_values():
    results = spawn(_in_flight, parse_mesh("2x2"), timeout_s=60)
    assert all(r["perturbed"] for r in results)  # glibc: freed memory really is overwritten
    assert [r["held"] for r in results] == [[True, False]] * 4
    assert [r["bad"] for r in results] == [0] * 4
