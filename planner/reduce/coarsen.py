"""Plan a mesh of three or more axes on a coarser one: its outer axes merged.

The integer program over every placement of a 3-D mesh is out of reach at
model scale: a 4-D activation has up to 6³ = 216 placements on 4x4x4, and an
edge between two of them 216² joint choices (the 2-layer 8B training step
built 5.4 million variables, which HiGHS did not solve in a minute). Merging
the outer axes (4x4x4 → 16x4, 8x8x8 → 64x8) gives a 2-D program, and every
2-D plan is a 3-D plan: Shard(d) over the merged axis of a row-major mesh
splits dim d exactly as Shard(d) on each outer axis in turn (nested shards,
rank a·n_b + b holding piece a·n_b + b), Partial over it is Partial on each,
Replicate Replicate. The chosen strategies are widened to the real mesh and
the plan is evaluated there, so its collectives and costs are those of the
real axes (an all-gather over the merged axis becomes one per outer axis).
What this gives up: plans that treat the outer axes differently (sharding
one dim over d0 and another over d1).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from dtplan.planner.space._dtensor import Placements, is_multi_output
from dtplan.planner.mesh import MeshSpec
from dtplan.planner.space.strategies import NodeStrategies, Strategy, StrategySpace, hub_name

__all__ = ["coarse_mesh", "narrow", "narrow_all", "widen", "widen_choice"]


def coarse_mesh(mesh: MeshSpec) -> MeshSpec:
    """The mesh with every axis but the last merged into one."""
    outer = mesh.axis_names[:-1]
    return MeshSpec((math.prod(mesh.shape[:-1]), mesh.shape[-1]), ("_".join(outer), mesh.axis_names[-1]))


def widen(pl: Placements | None, mesh: MeshSpec) -> Placements | None:
    """A coarse mesh's placements on the real mesh: the merged axis's on each outer axis."""
    if pl is None:
        return None
    return (pl[0],) * (mesh.ndim - 1) + (pl[1],)


def narrow(pl: Placements, mesh: MeshSpec, what: str) -> Placements:
    """Real-mesh placements on the coarse mesh (the outer axes must agree)."""
    outer = set(pl[:-1])
    if len(outer) != 1:
        raise ValueError(
            f"{what} has placements {[str(p) for p in pl]}, different on the outer axes of mesh {mesh}; "
            "planning a mesh of three or more axes merges those axes (pass coarsen=False to plan every axis apart)"
        )
    return (pl[0], pl[-1])


def narrow_all(given: Mapping[str, Placements], mesh: MeshSpec) -> dict[str, Placements]:
    return {k: narrow(v, mesh, repr(k)) for k, v in given.items()}


def _widen_output(out, mesh: MeshSpec):
    if is_multi_output(out):
        return tuple(widen(o, mesh) for o in out)
    return widen(out, mesh)


def widen_choice(
    space: StrategySpace, choice: Mapping[str, int], wants: tuple, mesh: MeshSpec
) -> tuple[StrategySpace, dict[str, int], tuple]:
    """A one-option space on the real mesh holding the chosen strategies
    (followers and hubs kept), the choice of those options, and the outputs'
    wanted placements on the real mesh."""
    nodes = {}
    for name, ns in space.nodes.items():
        s = ns.options[choice[name]]
        wide = Strategy(tuple(widen(i, mesh) for i in s.inputs), _widen_output(s.output, mesh))
        nodes[name] = NodeStrategies(name, (wide,), ns.source, ns.follows)
    hubs = {u: (widen(c[choice[hub_name(u)]], mesh),) for u, c in space.hubs.items()}
    wide_space = dataclasses.replace(space, mesh_shape=tuple(mesh.shape), nodes=nodes, hubs=hubs, hub_follows={})
    wide_choice = {name: 0 for name in choice}
    wide_wants = tuple(w if isinstance(w, str) else widen(w, mesh) for w in wants)
    return wide_space, wide_choice, wide_wants
