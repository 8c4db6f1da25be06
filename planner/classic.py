"""The classic hand-written plans, evaluated under the same cost model.

Each classic plan pins the parameters' placements and lets the planner choose
everything else (activations, redistributions), without a memory budget; it
is then marked as fitting the budget or not. The planner's own plan is
optimal over a space that contains every one of them, so it can only be
cheaper than those that fit.

- data parallel: parameters replicated on every axis;
- FSDP: parameters sharded on their first evenly divisible dim over every axis;
- tensor parallel (Megatron): the first linear of each pair column-parallel,
  the second row-parallel, on the last mesh axis; other parameters replicated;
- 2D (FSDP + TP): tensor parallel on the last axis, parameters also sharded over
  the other axes.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ir.capture import Captured
from ir.graph import Role
from planner.mesh import MeshSpec

__all__ = ["ClassicResult", "classic_pins", "compare_classic"]

log = logging.getLogger(__name__)

#: Linear layers whose output features a Megatron plan splits (column-parallel) ...
COLUMN = re.compile(r"(^|\.)(q|k|v|wq|wk|wv|q_proj|k_proj|v_proj|fc|fc1|c_fc|w1|w3|gate_proj|up_proj)\.weight$")
#: ... and those whose input features it splits (row-parallel)
ROW = re.compile(r"(^|\.)(o|wo|o_proj|proj|c_proj|fc2|w2|down_proj)\.weight$")


@dataclass(frozen=True, slots=True)
class ClassicResult:
    name: str
    parameters: Mapping[str, tuple[str, ...]]
    cost: Mapping[str, float]
    fits: bool

    def to_json(self) -> dict:
        return {"name": self.name, "parameters": {k: list(v) for k, v in self.parameters.items()}, "cost": dict(self.cost), "fits": self.fits}


def _shapes(captured: Captured) -> dict[str, tuple[int, ...]]:
    return {n.fqn: n.tensor_meta.shape for n in captured.graph if n.role is Role.PARAM and n.fqn}


def _shard_dim(shape: tuple[int, ...], ways: int) -> int | None:
    return next((d for d, s in enumerate(shape) if s % ways == 0), None)


def classic_pins(captured: Captured, mesh: MeshSpec) -> dict[str, dict[str, list[str]]]:
    """Parameter placements of each classic plan that applies to this model."""
    shapes = _shapes(captured)
    nd, last = mesh.ndim, mesh.shape[-1]
    rep = ["R"] * nd
    plans: dict[str, dict[str, list[str]]] = {"data parallel": {f: rep for f in shapes}}
    fsdp = {}
    for f, shape in shapes.items():
        d = _shard_dim(shape, mesh.size)
        fsdp[f] = [f"S({d})"] * nd if d is not None else rep
    plans["FSDP"] = fsdp
    tp = _megatron(shapes, last)
    if any(p[-1] != "R" for p in tp.values()) and nd >= 1:
        plans["tensor parallel"] = {f: ["R"] * (nd - 1) + p for f, p in tp.items()}
        if nd >= 2:
            plans["FSDP + TP"] = {f: _outer_shard(shapes[f], p, mesh) for f, p in tp.items()}
    return plans


def _megatron(shapes: Mapping[str, tuple[int, ...]], ways: int) -> dict[str, list[str]]:
    out = {}
    for f, shape in shapes.items():
        if COLUMN.search(f) and shape[0] % ways == 0:
            out[f] = ["S(0)"]
        elif ROW.search(f) and len(shape) > 1 and shape[1] % ways == 0:
            out[f] = ["S(1)"]
        else:
            out[f] = ["R"]
    return out


def _outer_shard(shape: tuple[int, ...], inner: list[str], mesh: MeshSpec) -> list[str]:
    """Shard a dim the inner (tp) axis leaves alone over the outer axes."""
    used = {int(inner[0][2:-1])} if inner[0] != "R" else set()
    outer = mesh.size // mesh.shape[-1]
    d = next((d for d, s in enumerate(shape) if d not in used and s % outer == 0), None)
    return [f"S({d})" if d is not None else "R"] * (mesh.ndim - 1) + inner


def compare_classic(captured: Captured, *, mesh: MeshSpec, budget: int | None, plan_kwargs: Mapping) -> tuple[ClassicResult, ...]:
    """Plan each classic layout under the same cost model (no budget), and say
    whether it fits the budget."""
    from dtplan.api import plan_program

    results = []
    for name, pins in classic_pins(captured, mesh).items():
        try:
            plan = plan_program(captured, mesh=mesh, parameter_placements=pins, memory=None, **plan_kwargs)
        except Exception as e:  # noqa: BLE001 - a layout this model cannot take is left out, logged
            log.info("classic plan %s skipped: %s", name, e)
            continue
        cost = {k: plan.cost[k] for k in ("total_s", "compute_s", "comm_s", "comm_bytes", "peak_memory_bytes")}
        fits = budget is None or plan.cost["peak_memory_bytes"] <= budget
        results.append(ClassicResult(name, {k: tuple(v) for k, v in pins.items()}, cost, fits))
    return tuple(results)
