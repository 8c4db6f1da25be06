"""Check model files end to end: plan, run and train exactly as on one device.

`check_model_files` is what `bench/real_models.py` prints as the README's
table of model families and what the real-model tests assert: for each model
file, its inference program and its training step are captured and planned
on a mesh, then run on that many gloo ranks with `--check` semantics (every
output, and after `steps` AdamW steps every loss, parameter and buffer,
against the same work on one device) and the collectives each rank issues
compared with the plan's.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dtplan.api import plan_program
from dtplan.ir.modelfile import capture_model_file, load_model_file
from dtplan.planner.solver import SolverOptions
from dtplan.planner.mesh import parse_mesh
from dtplan.runtime.run import run_many

__all__ = ["ModelCheck", "check_model_files"]


@dataclass(frozen=True, slots=True)
class ModelCheck:
    """One model file's result on one mesh."""

    name: str
    #: an inference plan and a training plan were found
    plans: bool = False
    #: every rank's outputs equal one device's, collectives as planned
    runs_exactly: bool = False
    #: every rank's losses, parameters and buffers equal one device's after the steps
    trains_exactly: bool = False
    #: ops that fell back to Replicate (inference, training)
    fallbacks: tuple[int, int] = (0, 0)
    #: predicted step time of the inference and training plans, seconds
    predicted_s: tuple[float, float] = (0.0, 0.0)
    seconds: float = 0.0
    #: what went wrong, if anything (one line)
    problem: str = ""
    losses: tuple[float, ...] = field(default=())
    #: the training plan's recomputation (`remat`): its policy and how many ops it recomputes
    remat: str = "none"
    recomputed: int = 0


def check_model_files(
    paths: Sequence[str | Path],
    *,
    mesh: str = "2x2",
    steps: int = 3,
    profile: str = "cpu",
    shard_batch: bool = True,
    one_group: bool = True,
    time_limit_s: float | None = None,
    gap: float | None = None,
    precision: str | None = None,
    remat: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[ModelCheck]:
    """Plan, run and train every model file on `mesh`.

    `shard_batch` feeds every input split on dim 0 over every mesh axis
    (data arrives per rank, as in data-parallel training) so that every rank
    does its own part of the work; otherwise inputs arrive replicated.
    `one_group` runs every model in one group of spawned ranks (a group's
    start-up costs seconds; a failure then fails the group); otherwise a
    group per model, so one model's failure is its own row. `time_limit_s`
    bounds each solve (a plan then may be FEASIBLE rather than OPTIMAL);
    `gap` is the relative gap to the LP bound at which a plan is accepted
    (`SolverOptions.rounding_gap`), for checks that need a plan, not the best.
    `precision` (`bf16`, `fp16`) plans and runs under that mixed-precision
    policy, compared with one device under the same policy; `remat`
    (`full`, `selective`, `auto`) plans the training step with that
    activation recomputation (`dtplan.ir.remat`)."""
    say = progress or (lambda _m: None)
    spec = parse_mesh(mesh)
    inputs = ["S(0)"] * spec.ndim if shard_batch else None
    given = {"time_limit_s": time_limit_s, "rounding_gap": gap}
    solver = SolverOptions(**{k: v for k, v in given.items() if v is not None})
    planned: dict[str, list] = {}
    results: dict[str, ModelCheck] = {}
    for path in paths:
        name = Path(path).stem
        t0 = time.perf_counter()
        say(f"{name}: planning inference and training on {mesh}")
        try:
            mf = load_model_file(path)
            captures = [capture_model_file(mf, train=t, precision=precision) for t in (False, True)]
            plans = [
                plan_program(c, mesh=spec, profile=profile, input_placements=inputs, solver=solver, remat=remat if c.train else None)
                for c in captures
            ]
        except Exception as e:  # noqa: BLE001 - a model that does not plan is a row, not a crash
            results[name] = ModelCheck(name, problem=f"planning: {_line(e)}", seconds=time.perf_counter() - t0)
            continue
        planned[name] = [path, plans, time.perf_counter() - t0, captures]
    groups = [list(planned)] if one_group else [[n] for n in planned]
    for group in groups:
        if not group:
            continue
        say(f"running {', '.join(group)} on {spec.size} ranks")
        items = [(planned[n][0], p, {}, True, steps if p.model.train else 0) for n in group for p in planned[n][1]]
        captured = [c for n in group for c in planned[n][3]]  # the ranks run what was planned, without tracing again
        t0 = time.perf_counter()
        try:
            per_rank = run_many(items, captured=captured)
        except Exception as e:  # noqa: BLE001 - the group failed: every model in it says why
            for n in group:
                results[n] = _row(n, planned[n], None, f"running: {_line(e)}", time.perf_counter() - t0)
            continue
        for k, n in enumerate(group):
            reports = [(ranks[2 * k], ranks[2 * k + 1]) for ranks in per_rank]
            results[n] = _row(n, planned[n], reports, "", (time.perf_counter() - t0) / len(group))
    return [results[Path(p).stem] for p in paths]


def _row(name: str, planned: list, reports, problem: str, run_s: float) -> ModelCheck:
    _, (infer, train), plan_s, _ = planned
    fallbacks = (len(infer.fallbacks), len(train.fallbacks))
    predicted = (infer.cost.total_s, train.cost.total_s)
    if reports is None:
        return ModelCheck(name, True, fallbacks=fallbacks, predicted_s=predicted, seconds=plan_s + run_s, problem=problem)
    runs = all(r["numerics_match"] and r["collectives_match"] for r, _ in reports)
    trains = all(t["numerics_match"] and t["collectives_match"] for _, t in reports)
    if not runs or not trains:
        bad = next(r for pair in reports for r in pair if not (r["numerics_match"] and r["collectives_match"]))
        first = bad.get("first_mismatch") or {}
        problem = (
            f"rank {bad['rank']}: collectives differ from the plan"
            if not bad["collectives_match"]
            else f"rank {bad['rank']}: {first.get('tensor')} differs (max abs error {first.get('max_abs', 0):.3g})"
        )
    return ModelCheck(
        name, True, runs, trains, fallbacks, predicted, plan_s + run_s, problem, tuple(reports[0][1]["losses"]), str(train.remat), len(train.recomputed())
    )


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
