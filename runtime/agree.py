"""One plan for every rank of a job.

Ranks that plan on their own can still disagree: the solver stops on work
budgets (the same on every machine), but a step its wall-clock safety net
stops, on one loaded rank and not another, gives that rank another plan, and
ranks holding different plans hang on mismatched collectives or compute wrong
numbers. Plans from different dtplan or torch versions differ too. So under a
launcher (torchrun, or any initialised default group) rank 0 plans and the
others take its plan; a plan every rank brings (a file, an API argument) is
compared by hash, and ranks that differ are named before anything runs.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch.distributed as dist

from dtplan.ir.errors import error_line
from dtplan.planner.output.plan import Plan, PlanError

__all__ = ["agreed_plan", "plan_digest"]


#: the plan file's sections that decide what a rank runs; the rest (the
#: solver's wall time and bound, stage seconds, the classic comparison, the
#: predicted cost) may differ between two plannings of one plan
RUN_SECTIONS = ("version", "model", "mesh", "inputs", "outputs", "parameters", "parameter_info", "nodes", "hubs", "collectives", "fallbacks")


def plan_digest(plan: Plan) -> str:
    """A short hash of what a rank runs of the plan (`RUN_SECTIONS`): plans
    that run alike, equal digests."""
    d = plan.to_json()
    text = json.dumps({k: d.get(k) for k in RUN_SECTIONS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def agreed_plan(plan: Plan | None, make: Callable[[], Plan] | None = None) -> Plan:
    """The plan every rank of the default group runs (collective: call it on
    every rank). Without `plan`, rank 0 calls `make()` and every rank gets
    its result (an error there is raised on every rank, with rank 0's
    message); with `plan`, the ranks' plans must be equal, else PlanError
    names the ranks whose plan differs from rank 0's. Without an initialised
    group of more than one rank, this rank's own plan."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return plan if plan is not None else make()
    if plan is None:
        plan = _from_rank0(make)
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, plan_digest(plan))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise PlanError(
            f"rank(s) {differ} hold a different plan from rank 0's ({', '.join(f'rank {r}: {d}' for r, d in enumerate(digests))}); "
            "give every rank the same plan file"
        )
    return plan


def _from_rank0(make: Callable[[], Plan]) -> Plan:
    """Rank 0's plan on every rank, rank 0 included, as it travelled (its
    JSON), so that every rank runs the same value to the bit."""
    box: list[object] = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("plan", make().to_json())
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
            error = e
            box[0] = ("error", error_line(e))
    dist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if error is not None:
        raise error
    if kind == "error":
        raise PlanError(f"rank 0 could not plan: {payload}")
    return Plan.from_json(payload)
