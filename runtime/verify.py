"""Check a sharded run: collectives issued against the plan, outputs against
the single-device result."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from dtplan.planner.evaluate import issued
from dtplan.planner.output.plan import Plan
from dtplan.runtime.watch import KINDS as _KINDS

__all__ = [
    "NOISE_COUNT", "NOISE_SHARE", "TOLERANCES", "CollectiveRecorder", "Comparison", "Tolerance", "compare", "compare_norm", "compare_within",
    "expected_collectives", "tolerance",
]


class CollectiveRecorder(TorchDispatchMode):
    """Records every functional collective a run issues as (kind, axis, bytes),
    bytes in the plan-file convention (all-gather counts its output)."""

    def __init__(self, mesh: DeviceMesh, axis_names: tuple[str, ...]) -> None:
        super().__init__()
        self.axes = {mesh.get_group(i).group_name: axis_names[i] for i in range(mesh.ndim)}
        self.sizes = {axis_names[i]: mesh.size(i) for i in range(mesh.ndim)}
        self.calls: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _KINDS.get(func)
        if kind is not None:
            t = args[0]
            group = args[-1] if isinstance(args[-1], str) else kwargs.get("group_name")
            axis = self.axes.get(group, str(group))
            nbytes = t.numel() * t.element_size()
            if kind == "all_gather":
                nbytes *= self.sizes.get(axis, 1)
            self.calls.append((kind, axis, nbytes))
        return func(*args, **(kwargs or {}))


def expected_collectives(plan: Plan) -> Counter:
    """The collectives a run of the plan issues, as (kind, axis, bytes): a
    gradient bucket once, with its members' bytes."""
    return Counter((kind, axis, nbytes) for kind, axis, nbytes, _ in issued(plan.collectives))


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far a sharded run may be from one device computing in the same dtype."""

    #: outputs and losses: |got - want| <= atol * max(1, max |want|) + rtol * |want|
    #: (a low-precision sum errs relative to its terms, whose size the
    #: tensor's largest element stands for, not relative to its result)
    rtol: float
    atol: float
    #: training: a gradient element under this fraction of its tensor's
    #: largest is rounding noise (Adam may step it either way)
    noise: float
    #: training: parameters within this fraction of one step (lr) per step taken
    step: float
    #: gradients: |got - want| <= gradient * |want| + gradient_floor * g *
    #: sqrt(numel), in the 2-norm over the tensor, g the largest element of
    #: any gradient (a gradient that is zero in exact arithmetic, such as a
    #: batch norm's bias feeding another batch norm, is computed as noise of
    #: about that size)
    gradient: float
    gradient_floor: float


#: by the dtype the step computes in: float32 differs by reduction order
#: only; bfloat16 keeps 8 significant bits (0.4% per rounding), float16 11
TOLERANCES = {
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5, noise=1e-4, step=0.01, gradient=1e-4, gradient_floor=1e-6),
    torch.bfloat16: Tolerance(rtol=3e-2, atol=1e-2, noise=3e-2, step=0.2, gradient=3e-2, gradient_floor=1e-3),
    torch.float16: Tolerance(rtol=5e-3, atol=1e-3, noise=5e-3, step=0.05, gradient=5e-3, gradient_floor=1e-4),
}

#: after Adam steps, at most this many of a tensor's elements, or this
#: share of them if more, may differ from one device by more than the
#: parameter tolerance on the grounds that their gradient was rounding noise
#: (Adam steps such an element by about lr whatever its sign); past it, the
#: difference is an error
NOISE_COUNT, NOISE_SHARE = 4, 0.01


def tolerance(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES[dtype]


def compare_within(got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> Comparison:
    """`compare` at a dtype's tolerance for outputs and losses."""
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    return compare(got, want, rtol=tol.rtol, atol=tol.atol * scale)


@dataclass(frozen=True, slots=True)
class Comparison:
    max_abs: float
    #: per element; for `compare_norm`, the 2-norm of the difference over the tensor's
    max_rel: float
    ok: bool
    #: elements held only to the loose tolerance that needed it
    loose_used: int = 0
    #: `compare_norm`: the difference over what it allows (1 at the limit)
    margin: float = 0.0


def compare(
    got: torch.Tensor,
    want: torch.Tensor,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    loose: torch.Tensor | None = None,
    loose_atol: float = 0.0,
    loose_count: float = float("inf"),
) -> Comparison:
    """Largest absolute and relative error, and whether it is within
    tolerance; elements where `loose` is set are held to `loose_atol` only,
    and no more than `loose_count` of them may need it."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return Comparison(float("inf"), float("inf"), False)
    diff = (got - want).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / want.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
    allowed = atol + rtol * want.abs()
    used = 0
    if loose is not None:
        loose = loose.cpu()
        used = int(((diff > allowed) & loose).sum())
        allowed = torch.where(loose, torch.full_like(allowed, loose_atol), allowed)
    ok = bool((diff <= allowed).all()) and used <= loose_count
    return Comparison(max_abs, max_rel, ok, used)


def compare_norm(got: torch.Tensor, want: torch.Tensor, *, rtol: float, floor: float) -> Comparison:
    """A tensor against its reference as a whole: the 2-norm of the
    difference within `rtol` of the reference's norm plus `floor` per
    element (in the norm: floor * sqrt(numel)); `max_rel` is the
    difference's norm over the reference's."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return Comparison(float("inf"), float("inf"), False)
    diff = got - want
    err, size = float(diff.norm()), float(want.norm())
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    rel = err / size if size > 0 else (0.0 if err == 0 else float("inf"))
    allowed = rtol * size + floor * diff.numel() ** 0.5
    margin = err / allowed if allowed > 0 else (0.0 if err == 0 else float("inf"))
    return Comparison(max_abs, rel, err <= allowed, margin=margin)
