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
  the other axes (on a dim the tp axis leaves alone);
- torchtitan FSDP+TP (:func:`torchtitan_pins`): the plan torchtitan applies to
  Llama (``parallelize_llama``: ``apply_tp`` then ``apply_fsdp``), offered on
  meshes of two or more axes for models with Llama's names (``wq``, ``wk``,
  ``wv``, ``wo``, ``w1``, ``w2``, ``w3``). The last axis is tp: ``wq``/``wk``/
  ``wv`` and ``w1`` (gate)/``w3`` (up) column-parallel (``Shard(0)`` of the
  ``[out, in]`` weight), ``wo`` and ``w2`` row-parallel (``Shard(1)``),
  ``tok_embeddings.weight`` ``Shard(0)`` (``RowwiseParallel`` on an embedding
  splits the vocabulary), ``output.weight`` ``Shard(0)`` (``ColwiseParallel``:
  vocabulary rows), norms and anything else replicated. Every other axis is
  dp, where FSDP2's ``fully_shard`` shards dim 0 of every parameter: ``S(0)``
  when dim 0 splits evenly over every axis sharding it (dp axes and, if it is
  ``S(0)`` there, tp), else the first dim that does, else ``R``. dtplan only
  expresses even shards, so a split torchtitan would make unevenly becomes
  the fallback above (``R`` on tp). On meshes of three or more axes,
  ``torchtitan HSDP+TP`` is the same with the outer axes but the last dp
  one as torchtitan's ``dp_replicate`` (HSDP: parameters ``R`` there, FSDP2
  over the one dp axis left, gradients reduce-scattered on it and summed
  over the replicas). FSDP2 over a tp-sharded dim 0 shards
  each tp shard again on dp: a strided shard, ``_S(0, tp)`` on every dp axis
  (DTensor's ``_StridedShard``, `dtplan.planner.space._dtensor.strided`),
  so gathering the tp shard for compute is one dp all-gather of it, and the
  gradient one dp reduce-scatter, as FSDP2 runs them (plain ``S(0)`` over
  ``S(0)`` would have to gather tp, then dp, then re-chunk).

The two torchtitan layouts are its published Llama-3 recipes
(:data:`RECIPES`, named as torchtitan names its configs): ``torchtitan FSDP``
is ``llama3_8b.toml`` (FSDP2 over every device, ``fully_shard`` on dim 0:
the FSDP pins above for these models; selective op-level AC) and
``torchtitan FSDP+TP`` is ``llama3_70b.toml`` (FSDP2 over dp, 8-way TP,
full AC); both train with bf16 parameters and fp32 gradient reduction
(torchtitan's default ``mixed_precision_param``/``mixed_precision_reduce``).
A recipe is evaluated under the compared plan's own precision and
recomputation, so layouts compare like with like; its row says whether that
is the recipe as published (``--precision bf16 --remat selective`` for the
8B recipe, ``--precision bf16 --remat full`` for the 70B one) or its layout
only. Identical pins are planned once (the 8B recipe's are the FSDP plan's
for Llama's shapes).

Every classic plan pins **parameters only**; activations are left to the
planner. torchtitan also fixes activation layouts (sequence parallel around the
norms, ``PrepareModuleInput`` before attention and the MLP, loss parallel):
planning them instead gives each classic plan the best activations its
parameter placements allow under our cost model, a lower bound on what the
hand-written layouts cost there. So the comparison is fair to the classic plan
— dtplan wins only where its parameter placements are better, never because a
hand-written activation layout happens to be priced badly — and dtplan's plan,
searched over a space that contains the pinned one, can never come out worse
than one that fits the budget.

:func:`placement_diff` says where dtplan's parameter placements differ from a
classic plan's: which weights (layers folded into ``layers.*`` when all agree),
which mesh axis, and the two placements; the HTML report lists it per plan.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtplan.ir.errors import error_line
from dtplan.ir.graph import Role
from dtplan.planner.mesh import MeshSpec, parse_mesh
from dtplan.planner.space._dtensor import parse_placement

if TYPE_CHECKING:
    from dtplan.ir.capture import Captured

__all__ = [
    "RECIPES",
    "TORCHTITAN",
    "TORCHTITAN_FSDP",
    "TORCHTITAN_HSDP",
    "ClassicResult",
    "Recipe",
    "PlacementDiff",
    "classic_pins",
    "compare_classic",
    "is_llama",
    "placement_diff",
    "recipe_note",
    "torchtitan_pins",
]

log = logging.getLogger(__name__)

#: Linear layers whose output features a Megatron plan splits (column-parallel) ...
COLUMN = re.compile(r"(^|\.)(q|k|v|wq|wk|wv|q_proj|k_proj|v_proj|fc|fc1|c_fc|w1|w3|gate_proj|up_proj)\.weight$")
#: ... and those whose input features it splits (row-parallel)
ROW = re.compile(r"(^|\.)(o|wo|o_proj|proj|c_proj|fc2|w2|down_proj)\.weight$")

#: names of the torchtitan plans in the comparison
TORCHTITAN = "torchtitan FSDP+TP"
TORCHTITAN_FSDP = "torchtitan FSDP"
TORCHTITAN_HSDP = "torchtitan HSDP+TP"
#: the linear layers a Llama block must have for the torchtitan plan to apply
LLAMA_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_TT_COLUMN = re.compile(r"(^|\.)(wq|wk|wv|w1|w3)\.(weight|bias)$")
_TT_ROW = re.compile(r"(^|\.)(wo|w2)\.weight$")
_TT_EMBEDDING = re.compile(r"(^|\.)tok_embeddings\.weight$")
_TT_OUTPUT = re.compile(r"(^|\.)output\.(weight|bias)$")


@dataclass(frozen=True, slots=True)
class Recipe:
    """A published training recipe: where it comes from, and the precision
    and activation checkpointing it trains with (its layout: `classic_pins`)."""

    source: str
    precision: str
    remat: str

    def as_published(self, captured: Captured) -> bool:
        """Whether a program is traced under the recipe's own precision and
        recomputation (then its comparison row is the recipe itself)."""
        from dtplan.ir.precision import Precision

        return captured.precision == Precision.parse(self.precision) and captured.remat.mode == self.remat and captured.remat.layers is None

    def to_json(self, captured: Captured) -> dict:
        return {"source": self.source, "precision": self.precision, "remat": self.remat, "as_published": self.as_published(captured)}


def recipe_note(recipe: Mapping[str, object]) -> str:
    """How a comparison row relates to its published recipe (`Recipe.to_json`),
    in the words the CLI summary and the report both show."""
    if recipe.get("as_published"):
        return f"recipe as published ({recipe['precision']}, {recipe['remat']} AC)"
    return f"layout only: the recipe trains with {recipe['precision']} and {recipe['remat']} AC"


#: torchtitan's Llama-3 recipes (torchtitan/models/llama3/train_configs)
RECIPES = {
    TORCHTITAN_FSDP: Recipe("torchtitan llama3_8b.toml: FSDP2 over every device, selective (op) AC, bf16 parameters, fp32 reduce", "bf16", "selective"),
    TORCHTITAN: Recipe("torchtitan llama3_70b.toml: FSDP2 over dp, 8-way TP, full AC, bf16 parameters, fp32 reduce", "bf16", "full"),
}


@dataclass(frozen=True, slots=True)
class ClassicResult:
    name: str
    parameters: Mapping[str, tuple[str, ...]]
    #: None where the layout could not be planned (`error` says why)
    cost: Mapping[str, float] | None
    fits: bool
    #: a published recipe's provenance and whether it ran as published (`Recipe.to_json`)
    recipe: Mapping[str, object] | None = None
    #: why planning the layout failed, one line
    error: str | None = None

    def to_json(self) -> dict:
        cost = None if self.cost is None else dict(self.cost)
        out = {"name": self.name, "parameters": {k: list(v) for k, v in self.parameters.items()}, "cost": cost, "fits": self.fits}
        if self.recipe is not None:
            out["recipe"] = dict(self.recipe)
        return {**out, "error": self.error} if self.error is not None else out


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
    if is_llama(shapes):
        plans[TORCHTITAN_FSDP] = fsdp  # fully_shard: dim 0, which splits evenly for Llama's weights
        if nd >= 2:
            plans[TORCHTITAN] = _torchtitan(shapes, mesh)
        if nd >= 3:
            plans[TORCHTITAN_HSDP] = _torchtitan(shapes, mesh, replicate=nd - 2)
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


# ---------------------------------------------------------------------- torchtitan


def is_llama(names: Iterable[str]) -> bool:
    """Whether parameter names are Llama's: a ``wq``, ``wk``, ``wv``, ``wo``,
    ``w1``, ``w2`` and ``w3`` weight somewhere (torchtitan's plan names them)."""
    names = list(names)
    return all(any(re.search(rf"(^|\.){w}\.weight$", f) for f in names) for w in LLAMA_LINEARS)


def torchtitan_pins(captured: Captured, mesh: MeshSpec | str) -> dict[str, list[str]]:
    """torchtitan's FSDP+TP parameter placements for a Llama-named model, by
    FQN, one placement per mesh axis (dp axes first, tp last); see the module
    docstring. Pass them as ``plan_program(..., parameter_placements=...)``.

    Raises ValueError on a mesh of fewer than two axes or a model without
    Llama's names."""
    mesh = parse_mesh(mesh) if isinstance(mesh, str) else mesh
    if mesh.ndim < 2:
        raise ValueError(f"the torchtitan FSDP+TP plan needs a mesh of two or more axes (dp..., tp); got {mesh}")
    shapes = _shapes(captured)
    if not is_llama(shapes):
        raise ValueError(f"the torchtitan FSDP+TP plan needs Llama's parameter names ({', '.join(LLAMA_LINEARS)} weights)")
    return _torchtitan(shapes, mesh)


def _torchtitan(shapes: Mapping[str, tuple[int, ...]], mesh: MeshSpec, replicate: int = 0) -> dict[str, list[str]]:
    """torchtitan's placements; with `replicate`, that many outer axes are
    its ``dp_replicate`` (HSDP: parameters replicated there, FSDP2 over the
    dp axes after them)."""
    tp = mesh.shape[-1]
    dp = math.prod(mesh.shape[replicate:-1])
    out = {}
    for f, shape in shapes.items():
        inner = _torchtitan_tp(f, shape, tp)
        used = int(inner[2:-1]) if inner != "R" else None
        d = next((d for d, s in enumerate(shape) if s % (dp * (tp if d == used else 1)) == 0), None)
        outer = "R" if d is None else f"_S({d}, {tp})" if d == used else f"S({d})"
        out[f] = ["R"] * replicate + [outer] * (mesh.ndim - 1 - replicate) + [inner]
    return out


def _torchtitan_tp(fqn: str, shape: tuple[int, ...], tp: int) -> str:
    """The tp-axis placement torchtitan's ``apply_tp`` gives one parameter."""
    if _TT_COLUMN.search(fqn) or _TT_EMBEDDING.search(fqn) or _TT_OUTPUT.search(fqn):
        dim = 0  # Colwise: out features (bias too); Rowwise on an Embedding: vocab
    elif _TT_ROW.search(fqn):
        dim = 1  # Rowwise on a Linear: in features (a bias stays replicated)
    else:
        return "R"  # norms and anything torchtitan leaves out of the tp plan
    return f"S({dim})" if len(shape) > dim and shape[dim] % tp == 0 else "R"


# ---------------------------------------------------------------------- comparison


def compare_classic(captured: Captured, *, mesh: MeshSpec, budget: int | None, plan_pinned: Callable[[Mapping[str, Sequence[str]]], Any]) -> tuple[ClassicResult, ...]:
    """Plan each classic layout under the same cost model (no budget), and say
    whether it fits the budget. `plan_pinned(pins)` plans the captured
    program with its parameters pinned (by FQN) and no budget, and returns
    the Plan or its CostSummary (the API solves the free plan's program again
    with the pins as bounds, else `plan_program` with the free plan's arguments).

    A layout whose planning raises is a row with its error and no cost
    (`fits` false), shown as failed: a comparison that left it out would
    read as if the layout did not apply."""
    results = []
    costs: dict[str, dict | str] = {}  # by pins: a layout two plans share is planned once (its cost, or its error)
    for name, pins in classic_pins(captured, mesh).items():
        key = repr(sorted((k, list(v)) for k, v in pins.items()))
        if key not in costs:
            try:
                planned = plan_pinned(pins)
                summary = getattr(planned, "cost", planned)  # a Plan, or its cost alone
                costs[key] = {k: getattr(summary, k) for k in ("total_s", "compute_s", "comm_s", "comm_bytes", "peak_memory_bytes", "overlapped_s", "exposed_comm_s")}
            except Exception as e:  # noqa: BLE001 - a layout that cannot be planned is a failed row, with its error
                log.info("classic plan %s failed: %s", name, error_line(e))
                costs[key] = error_line(e)
        cost = costs[key]
        recipe = RECIPES[name].to_json(captured) if name in RECIPES else None
        parameters = {k: tuple(v) for k, v in pins.items()}
        if isinstance(cost, str):
            results.append(ClassicResult(name, parameters, None, False, recipe, error=cost))
            continue
        fits = budget is None or cost["peak_memory_bytes"] <= budget
        results.append(ClassicResult(name, parameters, dict(cost), fits, recipe))
    return tuple(results)


# ---------------------------------------------------------------------- differences


@dataclass(frozen=True, slots=True)
class PlacementDiff:
    """One difference between dtplan's parameter placements and a classic
    plan's: the parameters (``pattern``, with ``*`` for a layer index when
    every layer agrees), the mesh axis, and each side's placement there."""

    plan: str
    pattern: str
    parameters: tuple[str, ...]
    axis: str
    axis_index: int
    ours: str
    theirs: str

    @property
    def text(self) -> str:
        return f"{self.pattern}: axis {self.axis}: {self.ours} here vs {self.theirs} in {self.plan}"

    def to_json(self) -> dict:
        return {
            "plan": self.plan,
            "pattern": self.pattern,
            "parameters": list(self.parameters),
            "axis": self.axis,
            "axis_index": self.axis_index,
            "ours": self.ours,
            "theirs": self.theirs,
            "text": self.text,
        }


def placement_diff(plan: Any, entry: Any) -> list[PlacementDiff]:
    """Where dtplan's parameter placements (``plan``: a Plan or a parsed
    ``plan.json``) differ from a classic plan's pins (``entry``: one of
    ``plan.comparison``, or a ClassicResult), per parameter and mesh axis.

    Parameters that differ the same way on the same axis are grouped: by
    their name with numeric path components (layer indices) replaced by
    ``*`` when every parameter of that name differs so, else by the indices
    that do (``layers.[1-3].attention.wq.weight``), else one row each. Rows
    come in model order, then axis order."""
    ours_all, axis_names = _plan_parameters(plan)
    name, theirs_all = _entry_parameters(entry)
    compared = [f for f in theirs_all if f in ours_all]
    members: dict[str, list[str]] = {}
    for f in compared:
        members.setdefault(_pattern(f), []).append(f)
    groups: dict[tuple[str, int, str, str], list[str]] = {}
    for f in compared:
        ours, theirs = ours_all[f], theirs_all[f]
        for i in range(max(len(ours), len(theirs))):
            a = ours[i] if i < len(ours) else "—"
            b = theirs[i] if i < len(theirs) else "—"
            if a != b:
                groups.setdefault((_pattern(f), i, a, b), []).append(f)
    rows: list[tuple[tuple[int, int, int], PlacementDiff]] = []
    order = {f: k for k, f in enumerate(compared)}
    for (pattern, i, a, b), fqns in groups.items():
        axis = axis_names[i] if i < len(axis_names) else f"d{i}"
        for label, part in _group_labels(pattern, fqns, members[pattern]):
            key = (order[members[pattern][0]], i, order[part[0]])
            rows.append((key, PlacementDiff(name, label, tuple(part), axis, i, a, b)))
    rows.sort(key=lambda r: r[0])
    return [r[1] for r in rows]


def _plan_parameters(plan: Any) -> tuple[dict[str, list[str]], list[str]]:
    if isinstance(plan, Mapping):
        params = plan.get("parameters") or {}
        mesh = plan.get("mesh") or {}
        names = list(mesh.get("axis_names") or []) if isinstance(mesh, Mapping) else []
    else:
        params, names = plan.parameters, list(plan.mesh.axis_names)
    return {str(f): _texts(p) for f, p in params.items() if p is not None}, [str(n) for n in names]


def _entry_parameters(entry: Any) -> tuple[str, dict[str, list[str]]]:
    if isinstance(entry, Mapping):
        name, params = entry.get("name"), entry.get("parameters") or {}
    else:
        name, params = entry.name, entry.parameters
    return str(name), {str(f): _texts(p) for f, p in params.items() if p is not None}


def _texts(placements: Sequence[Any]) -> list[str]:
    """Placements (objects or DTensor short forms) as DTensor's short forms."""
    return [str(parse_placement(p) if isinstance(p, str) else p) for p in placements]


def _pattern(fqn: str) -> str:
    return ".".join("*" if p.isdigit() else p for p in fqn.split("."))


def _group_labels(pattern: str, fqns: list[str], members: list[str]) -> list[tuple[str, list[str]]]:
    """How to name a group of parameters that differ alike."""
    if len(fqns) == 1:
        return [(fqns[0], fqns)]
    if fqns == members:
        return [(pattern, fqns)]
    if pattern.count("*") == 1:
        k = pattern.split(".").index("*")
        indices = [int(f.split(".")[k]) for f in fqns]
        return [(pattern.replace("*", f"[{_ranges(indices)}]"), fqns)]
    return [(f, [f]) for f in fqns]


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    out: list[str] = []
    xs = sorted(set(indices))
    start = prev = xs[0]
    for x in [*xs[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)
