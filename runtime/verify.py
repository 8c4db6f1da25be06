"""Check a sharded run: collectives issued against the plan, outputs against
the single-device result."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from dtplan.planner.output.plan import Plan
from dtplan.runtime.watch import KINDS as _KINDS

__all__ = ["CollectiveRecorder", "compare", "expected_collectives"]


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
    return Counter((c.kind, c.axis, c.bytes) for c in plan.collectives)


@dataclass(frozen=True, slots=True)
class Comparison:
    max_abs: float
    max_rel: float
    ok: bool


def compare(
    got: torch.Tensor,
    want: torch.Tensor,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    loose: torch.Tensor | None = None,
    loose_atol: float = 0.0,
) -> Comparison:
    """Largest absolute and relative error, and whether it is within
    tolerance; elements where `loose` is set are held to `loose_atol` only."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return Comparison(float("inf"), float("inf"), False)
    diff = (got - want).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / want.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
    allowed = atol + rtol * want.abs()
    if loose is not None:
        allowed = torch.where(loose.cpu(), torch.full_like(allowed, loose_atol), allowed)
    return Comparison(max_abs, max_rel, bool((diff <= allowed).all()))
