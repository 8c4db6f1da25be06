"""Self-contained HTML report for a sharding plan.

The report is built in two steps: :func:`build_report_data` turns a parsed
``plan.json`` dict into plain JSON-serialisable data (raw numbers next to
human-readable text), and :func:`render_report` renders that data with the
Jinja2 template ``templates/report.html.j2``.  All markup lives in the
template; this module only prepares data.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

import dtplan.planner.mesh as mesh_format
from dtplan.ir.remat import recomputed_originals
from dtplan.planner.output.classic import placement_diff, recipe_note

__all__ = [
    "TEMPLATE_DIR",
    "TEMPLATE_NAME",
    "build_report_data",
    "format_bytes",
    "format_count",
    "format_percent",
    "format_seconds",
    "render_report",
    "write_report",
]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_NAME = "report.html.j2"

MISSING = "—"
_COST_SECONDS = ("total_s", "compute_s", "comm_s")
_COST_BYTES = ("comm_bytes", "peak_memory_bytes", "parameter_bytes", "activation_bytes")


# --------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------


def _number(value: Any) -> int | float | None:
    """Return ``value`` if it is a finite int/float (not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_bytes(value: Any) -> str:
    """`dtplan.planner.mesh.format_bytes`, with a dash for a missing value."""
    number = _number(value)
    return MISSING if number is None else mesh_format.format_bytes(number)


def format_seconds(value: Any) -> str:
    """`dtplan.planner.mesh.format_seconds`, with a dash for a missing value."""
    number = _number(value)
    return MISSING if number is None else mesh_format.format_seconds(number)


def format_percent(value: Any, decimals: int = 1) -> str:
    """Format a percentage (already multiplied by 100): ``53.6%``."""
    number = _number(value)
    return MISSING if number is None else f"{number:.{decimals}f}%"


def format_count(value: Any) -> str:
    """Format a plain number: ints with thousands separators, floats with 6 digits."""
    number = _number(value)
    if number is None:
        return MISSING
    if isinstance(number, int) or float(number).is_integer():
        return f"{int(number):,}"
    return f"{number:.6g}"


def _quantity(value: Any, formatter: Any) -> dict[str, Any]:
    """Pair a raw number (None when missing) with its formatted text."""
    number = _number(value)
    return {"value": number, "text": formatter(number)}


def _shape_text(shape: Any) -> str:
    """Format a tensor shape as ``4096 × 1024`` (``scalar`` for ``[]``)."""
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        return MISSING
    return " × ".join(str(d) for d in shape) if shape else "scalar"


# --------------------------------------------------------------------------
# Plan accessors (tolerant of missing / null fields)
# --------------------------------------------------------------------------


def _mapping(value: Any) -> Mapping[str, Any]:
    """Return ``value`` if it is a mapping, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def _sequence(value: Any) -> list[Any]:
    """Return ``value`` as a list if it is a non-string sequence, else ``[]``."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return []


def _text(value: Any) -> str | None:
    """Return ``value`` as a string, or None when absent."""
    return None if value is None else str(value)


def _slug(text: str) -> str:
    """``text`` reduced to characters safe in an HTML id (``[A-Za-z0-9_-]``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _axis_name(axis_names: Sequence[str], index: int) -> str:
    """Name of mesh axis ``index``, defaulting to ``d<index>``."""
    return axis_names[index] if index < len(axis_names) else f"d{index}"


# --------------------------------------------------------------------------
# Report sections
# --------------------------------------------------------------------------


def _model_data(model: Mapping[str, Any]) -> dict[str, Any]:
    """Header information about the captured model."""
    train = model.get("train")
    mode = None if train is None else ("training" if train else "inference")
    return {
        "name": _text(model.get("name")),
        "source": _text(model.get("source")),
        "mode": mode,
        "num_nodes": _number(model.get("num_nodes")),
    }


def _mesh_data(mesh: Mapping[str, Any]) -> dict[str, Any]:
    """Mesh shape, axis names, a ``d0=2 × d1=2`` label and device count."""
    shape = [s for s in _sequence(mesh.get("shape")) if _number(s) is not None]
    given = [str(n) for n in _sequence(mesh.get("axis_names"))]
    names = [_axis_name(given, i) for i in range(max(len(shape), len(given)))]
    label = " × ".join(f"{_axis_name(names, i)}={s}" for i, s in enumerate(shape))
    return {
        "shape": shape,
        "axis_names": names,
        "label": label or MISSING,
        "num_devices": math.prod(shape) if shape else None,
    }


def _profile_data(profile: Mapping[str, Any]) -> dict[str, Any]:
    """Hardware profile name and description."""
    return {
        "name": _text(profile.get("name")),
        "description": _text(profile.get("description")),
    }


def _share(part: Any, whole: Any) -> float | None:
    """``part / whole`` in percent, or None when undefined."""
    part, whole = _number(part), _number(whole)
    if part is None or not whole:
        return None
    return part / whole * 100.0


def _summary_data(plan: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, Any]:
    """Headline numbers: step time split, comm volume, memory vs budget."""
    cost = _mapping(plan.get("cost"))
    summary: dict[str, Any] = {k: _quantity(cost.get(k), format_seconds) for k in _COST_SECONDS}
    summary.update({k: _quantity(cost.get(k), format_bytes) for k in _COST_BYTES})
    summary["memory_budget_bytes"] = _quantity(plan.get("memory_budget_bytes"), format_bytes)
    used = _share(cost.get("peak_memory_bytes"), plan.get("memory_budget_bytes"))
    summary["memory_used_pct"] = _quantity(used, format_percent)
    summary["memory_bar_pct"] = None if used is None else round(min(used, 100.0), 2)
    summary["over_budget"] = used is not None and used > 100.0
    step = (_number(cost.get("compute_s")) or 0) + (_number(cost.get("comm_s")) or 0)
    summary["compute_pct"] = _quantity(_share(cost.get("compute_s"), step), format_percent)
    summary["comm_pct"] = _quantity(_share(cost.get("comm_s"), step), format_percent)
    summary.update(_overlap_data(cost))
    summary.update(counts)
    return summary


def _overlap_data(cost: Mapping[str, Any]) -> dict[str, Any]:
    """The overlapped step and the communication it exposes and hides
    (None in plan files written before overlap was predicted)."""
    exposed, comm = _number(cost.get("exposed_comm_s")), _number(cost.get("comm_s"))
    hidden = None if exposed is None or comm is None else max(0.0, comm - exposed)
    return {
        "overlapped_s": _quantity(cost.get("overlapped_s"), format_seconds),
        "exposed_comm_s": _quantity(exposed, format_seconds),
        "hidden_comm_s": _quantity(hidden, format_seconds),
    }


def _solver_data(solver: Mapping[str, Any]) -> dict[str, Any]:
    """Solver status and statistics."""
    gap = _number(solver.get("gap"))
    return {
        "status": _text(solver.get("status")),
        "objective": _quantity(solver.get("objective"), format_count),
        "bound": _quantity(solver.get("bound"), format_count),
        "gap": {"value": gap, "text": format_percent(None if gap is None else gap * 100, 2)},
        "wall_s": _quantity(solver.get("wall_s"), format_seconds),
        "variables": _quantity(solver.get("variables"), format_count),
        "constraints": _quantity(solver.get("constraints"), format_count),
    }


def _stage_data(stages: Mapping[str, Any]) -> dict[str, Any]:
    """Per-stage planner wall times, in pipeline order, plus their total."""
    rows = [
        {"name": str(k), "slug": _slug(str(k)), "seconds": _quantity(v, format_seconds)}
        for k, v in stages.items()
    ]
    total = sum(r["seconds"]["value"] or 0 for r in rows)
    return {"rows": rows, "total": _quantity(total if rows else None, format_seconds)}


def _placement_axes(plan: Mapping[str, Any], axis_names: Sequence[str]) -> list[str]:
    """Column names for per-axis placements: every mesh axis (and any extra)."""
    lengths = [len(_sequence(p)) for p in _mapping(plan.get("parameters")).values()]
    count = max([len(axis_names), *lengths])
    return [_axis_name(axis_names, i) for i in range(count)]


def _parameter_row(name: str, placements: Any, info: Mapping[str, Any], width: int) -> dict[str, Any]:
    """One row of the parameters table."""
    given = [str(p) for p in _sequence(placements)]
    return {
        "name": name,
        "placements": given + [None] * (width - len(given)),
        "placement_text": ", ".join(given) or MISSING,
        "shape": _sequence(info.get("shape")) or None,
        "shape_text": _shape_text(info.get("shape")),
        "dtype": _text(info.get("dtype")),
        "local_shape": _sequence(info.get("local_shape")) or None,
        "local_shape_text": _shape_text(info.get("local_shape")),
        "bytes_per_device": _quantity(info.get("bytes_per_device"), format_bytes),
    }


def _parameter_rows(plan: Mapping[str, Any], axes: Sequence[str]) -> list[dict[str, Any]]:
    """Parameters table rows, sorted by fully-qualified name."""
    placements = _mapping(plan.get("parameters"))
    infos = _mapping(plan.get("parameter_info"))
    names = sorted({str(n) for n in placements} | {str(n) for n in infos})
    return [
        _parameter_row(n, placements.get(n), _mapping(infos.get(n)), len(axes)) for n in names
    ]


def _collective_rows(collectives: Sequence[Any]) -> list[dict[str, Any]]:
    """Collectives table rows, in plan (execution) order."""
    rows = []
    for entry in map(_mapping, collectives):
        rows.append({
            "kind": _text(entry.get("kind")),
            "axis": _text(entry.get("axis")),
            "bytes": _quantity(entry.get("bytes"), format_bytes),
            "time_s": _quantity(entry.get("time_s"), format_seconds),
            "node": _text(entry.get("node")),
            "module": _text(entry.get("module")),
        })
    return rows


def _totals(rows: Sequence[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    """Count, bytes and time of collectives grouped by ``key`` (kind or axis)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[key] or MISSING, []).append(row)
    return [
        {
            "key": name,
            "count": len(group),
            "bytes": _quantity(sum(r["bytes"]["value"] or 0 for r in group), format_bytes),
            "time_s": _quantity(sum(r["time_s"]["value"] or 0 for r in group), format_seconds),
        }
        for name, group in sorted(groups.items())
    ]


def _fallback_rows(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Warnings for nodes that fell back to replication, with what each
    costs: its compute, run whole on every device, and the collectives
    that gather its inputs."""
    nodes = _mapping(plan.get("nodes"))
    comm: dict[str, float] = {}
    for c in map(_mapping, _sequence(plan.get("collectives"))):
        t = c.get("time_s")
        if isinstance(t, (int, float)):
            comm[str(c.get("node"))] = comm.get(str(c.get("node")), 0.0) + float(t)
    rows = []
    for f in map(_mapping, _sequence(plan.get("fallbacks"))):
        node = str(f.get("node"))
        compute = _mapping(nodes.get(node)).get("compute_s")
        rows.append(
            {
                "node": _text(f.get("node")),
                "op": _text(f.get("op")),
                "reason": _text(f.get("reason")),
                "compute": _quantity(compute, format_seconds),
                "communication": _quantity(comm.get(node, 0.0), format_seconds),
            }
        )
    return rows


def _flop_fallback_rows(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Warnings for nodes whose FLOP formula failed: their compute is priced
    as one FLOP per output element, so it may be far off."""
    nodes = _mapping(plan.get("nodes"))
    return [
        {
            "node": _text(f.get("node")),
            "op": _text(f.get("op")),
            "reason": _text(f.get("reason")),
            "compute": _quantity(_mapping(nodes.get(str(f.get("node")))).get("compute_s"), format_seconds),
        }
        for f in map(_mapping, _sequence(plan.get("flop_fallbacks")))
    ]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def build_report_data(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a parsed ``plan.json`` dict into plain, JSON-serialisable report data.

    Numbers appear as ``{"value": raw, "text": formatted}`` pairs; ``value``
    is None (and ``text`` is an em dash) when the plan lacks the field.
    """
    mesh = _mesh_data(_mapping(plan.get("mesh")))
    axes = _placement_axes(plan, mesh["axis_names"])
    parameters = _parameter_rows(plan, axes)
    collectives = _collective_rows(_sequence(plan.get("collectives")))
    fallbacks = _fallback_rows(plan)
    flop_fallbacks = _flop_fallback_rows(plan)
    counts = {
        "num_parameters": len(parameters),
        "num_collectives": len(collectives),
        "num_fallbacks": len(fallbacks),
        "num_flop_fallbacks": len(flop_fallbacks),
    }
    return {
        "version": _number(plan.get("version")),
        "model": _model_data(_mapping(plan.get("model"))),
        "mesh": mesh,
        "profile": _profile_data(_mapping(plan.get("profile"))),
        "summary": _summary_data(plan, counts),
        "solver": _solver_data(_mapping(plan.get("solver"))),
        "stages": _stage_data(_mapping(plan.get("stage_seconds"))),
        "placement_axes": axes,
        "parameters": parameters,
        "collectives": collectives,
        "collective_totals": {
            "by_kind": _totals(collectives, "kind"),
            "by_axis": _totals(collectives, "axis"),
        },
        "fallbacks": fallbacks,
        "flop_fallbacks": flop_fallbacks,
        "comparison": _comparison_rows(plan),
        "placement_diffs": _placement_diffs(plan),
        "modules": _module_tree(plan),
        "memory_parts": _memory_parts(plan),
        "recompute": _recompute_data(plan),
    }


def _recompute_data(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Activation recomputation: the policy, the recomputed ops per layer
    with their predicted compute, and `--remat auto`'s tries."""
    model = _mapping(plan.get("model"))
    remat = _mapping(model.get("remat"))
    nodes = _mapping(plan.get("nodes"))
    per_layer: dict[str, list[float]] = {}
    for name in recomputed_originals(nodes) if remat else ():
        node = _mapping(nodes[name])
        row = per_layer.setdefault(_text(node.get("module")) or "(root)", [0, 0.0])
        row[0] += 1
        row[1] += _number(node.get("compute_s")) or 0.0
    total = sum(v[1] for v in per_layer.values())
    compute = _number(_mapping(plan.get("cost")).get("compute_s"))
    layers = _sequence(remat.get("layers"))
    policy = "none" if not remat else f"{_text(remat.get('mode'))}" + (f" on {len(layers)} layer(s)" if layers else "")
    return {
        "policy": policy,
        "ops": sum(int(v[0]) for v in per_layer.values()),
        "seconds": _quantity(total, format_seconds),
        "share_of_compute": format_percent(_share(total, compute)),
        "modules": [
            {"module": m, "ops": int(v[0]), "seconds": _quantity(v[1], format_seconds)}
            for m, v in sorted(per_layer.items(), key=lambda kv: -kv[1][1])[:20]
        ],
        "search": [
            {
                "policy": _text(_mapping(r).get("policy")),
                "step": _quantity(_mapping(r).get("step_s"), format_seconds),
                "peak": _quantity(_mapping(r).get("peak_memory_bytes"), format_bytes),
                "fits": _mapping(r).get("step_s") is not None,
                "chosen": bool(_mapping(r).get("chosen")),
            }
            for r in _sequence(model.get("remat_search"))
        ],
    }


def _module_tree(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Compute (from nodes) and communication (from collectives) summed up the
    module hierarchy, from the whole model down to one layer's projections."""
    root: dict[str, Any] = {"name": "(model)", "path": "", "compute": 0.0, "comm": 0.0, "children": {}}

    def add(module: str, key: str, value: float) -> None:
        node = root
        node[key] += value
        for part in [p for p in module.split(".") if p] if module else []:
            path = f"{node['path']}.{part}" if node["path"] else part
            node = node["children"].setdefault(part, {"name": part, "path": path, "compute": 0.0, "comm": 0.0, "children": {}})
            node[key] += value

    for n in _mapping(plan.get("nodes")).values():
        add(str(_mapping(n).get("module") or ""), "compute", _number(_mapping(n).get("compute_s")) or 0.0)
    for c in _sequence(plan.get("collectives")):
        add(str(_mapping(c).get("module") or ""), "comm", _number(_mapping(c).get("time_s")) or 0.0)
    top = (root["compute"] + root["comm"]) or 1.0

    def finish(node: dict[str, Any]) -> dict[str, Any]:
        kids = sorted(node["children"].values(), key=lambda k: -(k["compute"] + k["comm"]))
        return {
            "name": node["name"],
            "path": node["path"],
            "total": _quantity(node["compute"] + node["comm"], format_seconds),
            "compute": _quantity(node["compute"], format_seconds),
            "comm": _quantity(node["comm"], format_seconds),
            "compute_pct": round(100.0 * node["compute"] / top, 3),
            "comm_pct": round(100.0 * node["comm"] / top, 3),
            "children": [finish(k) for k in kids],
        }

    return finish(root)


def _memory_parts(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Peak memory per device split into parameters, optimizer state and
    activations (gradients included as produced; reduced gradients listed
    beside, not stacked), as shares
    of the budget (or of the peak when there is none)."""
    cost = _mapping(plan.get("cost"))
    whole = _number(plan.get("memory_budget_bytes")) or _number(cost.get("peak_memory_bytes")) or 1
    parts = [("parameters", "parameter_bytes"), ("optimizer state", "optimizer_bytes"), ("activations", "activation_bytes")]
    out = []
    for label, key in parts:
        value = _number(cost.get(key))
        if value is None or (key == "optimizer_bytes" and not value):
            continue
        out.append({"label": label, "key": key, "bytes": _quantity(value, format_bytes), "pct": round(100.0 * value / whole, 3)})
    grads = _number(cost.get("gradient_bytes"))
    if grads:
        out.append({"label": "gradients after reduction", "key": "gradient_bytes", "bytes": _quantity(grads, format_bytes), "pct": 0.0})
    return out


def _comparison_rows(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The planner's plan beside the classic plans (dtplan.planner.output.classic), each with
    compute and communication as shares of the slowest, for a bar chart; a
    classic plan that could not be planned has its error and no cost."""
    cost = _mapping(plan.get("cost"))
    rows = [{"name": "dtplan", "ours": True, "fits": True, "cost": cost}]
    rows += [
        {
            "name": str(c.get("name")), "ours": False, "fits": bool(c.get("fits")), "cost": _mapping(c.get("cost")), "recipe": _recipe(c.get("recipe")),
            "error": str(c["error"]) if c.get("error") is not None else None,
        }
        for c in map(_mapping, _sequence(plan.get("comparison")))
    ]
    if len(rows) == 1:
        return []
    slowest = max((_number(r["cost"].get("total_s")) or 0.0) for r in rows) or 1.0
    out = []
    for r in rows:
        c = r["cost"]
        out.append({
            "name": r["name"],
            "ours": r["ours"],
            "recipe": r.get("recipe"),
            "error": r.get("error"),
            "fits": r["fits"],
            "total_s": _quantity(c.get("total_s"), format_seconds),
            "compute_s": _quantity(c.get("compute_s"), format_seconds),
            "comm_s": _quantity(c.get("comm_s"), format_seconds),
            **_overlap_data(c),
            "comm_bytes": _quantity(c.get("comm_bytes"), format_bytes),
            "peak_memory_bytes": _quantity(c.get("peak_memory_bytes"), format_bytes),
            "compute_pct": 100.0 * (_number(c.get("compute_s")) or 0.0) / slowest,
            "comm_pct": 100.0 * (_number(c.get("comm_s")) or 0.0) / slowest,
        })
    return out


def _recipe(value: Any) -> dict[str, Any] | None:
    """A published recipe's note (`dtplan.planner.output.classic.Recipe`)."""
    r = _mapping(value)
    if not r:
        return None
    out = {"source": str(r.get("source", "")), "precision": str(r.get("precision", "")), "remat": str(r.get("remat", "")), "as_published": bool(r.get("as_published"))}
    return {**out, "note": recipe_note(out)}


def _placement_diffs(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per classic plan in the comparison, where its pinned parameter
    placements differ from the plan's (`dtplan.planner.output.classic.placement_diff`):
    grouped rows of weights, mesh axis and both placements."""
    out: list[dict[str, Any]] = []
    slugs: set[str] = set()
    for entry in map(_mapping, _sequence(plan.get("comparison"))):
        name = str(entry.get("name"))
        slug = base = _slug(name)
        k = 1
        while slug in slugs:
            k += 1
            slug = f"{base}-{k}"
        slugs.add(slug)
        try:
            rows = [r.to_json() for r in placement_diff(plan, entry)]
        except (AttributeError, TypeError, ValueError):  # a malformed entry: no rows rather than no report
            rows = []
        pinned = _mapping(entry.get("parameters"))
        compared = [f for f in pinned if f in _mapping(plan.get("parameters"))]
        differing = {f for r in rows for f in r["parameters"]}
        out.append({
            "name": name,
            "slug": slug,
            "fits": bool(entry.get("fits")),
            "num_compared": len(compared),
            "num_parameters": len(differing),
            "rows": rows,
        })
    return out


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """The (cached) Jinja2 environment for report templates."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_report(data: Mapping[str, Any]) -> str:
    """Render report data (from :func:`build_report_data`) to a self-contained HTML page."""
    return _environment().get_template(TEMPLATE_NAME).render(data=data)


def write_report(plan: Mapping[str, Any], path: str | Path) -> Path:
    """Build, render and write the HTML report for ``plan`` to ``path`` (UTF-8)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_report(build_report_data(plan)), encoding="utf-8")
    return target
