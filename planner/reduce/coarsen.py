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
The merged plan is the start: `dtplan.api._plan_outer_axes` then plans
blocks of the real axes again around it (each outer axis, the last two
together), which gives back plans that treat the outer axes differently
(HSDP: a parameter replicated on d0 and sharded on d1). `WidenedPricer`
prices the merged program's redistributions as the real mesh runs them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch.distributed.tensor import Replicate

from dtplan.ir.graph import TensorMeta
from dtplan.planner.space._dtensor import Placements, is_multi_output
from dtplan.planner.cost.pricing import Collective, Pricer
from dtplan.planner.mesh import MeshSpec
from dtplan.planner.space.strategies import NodeStrategies, Strategy, StrategySpace, hub_name

__all__ = ["WidenedPricer", "coarse_mesh", "narrow", "narrow_all", "widen", "widen_choice"]


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
    """Real-mesh placements on the coarse mesh: where the outer axes differ
    (HSDP: Replicate on one, Shard on the next), Replicate, which every
    shape takes; the blocks of real axes then hold the real placements
    (`dtplan.api._plan_outer_axes`)."""
    outer = set(pl[:-1])
    return (pl[0] if len(outer) == 1 else Replicate(), pl[-1])


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


@dataclass(frozen=True)
class WidenedPricer(Pricer):
    """Prices the coarse mesh's redistributions as the real mesh runs them:
    a placement on the merged axis widened to every outer axis, the steps
    taken there (one collective per real axis: an all-to-all over the merged
    axis is one per outer axis, each of the whole local tensor; a sum is
    reduced hierarchically, `_dtensor._hierarchical`), each collective
    reported on the coarse axis it belongs to. Compute and memory are the
    coarse mesh's own: a merged axis shards as all its outer axes do. So the
    merged program's objective is its widened plan's cost on the real mesh."""

    real_shape: tuple[int, ...] = ()

    @functools.cached_property
    def real(self) -> Pricer:
        return Pricer(self.real_shape, self.profile, self.state_factor, self.bucket_bytes)

    def _redistribute(self, meta: TensorMeta, src: Placements, dst: Placements) -> tuple[Collective, ...]:
        nd = len(self.real_shape)
        wide = self.real.redistribute(meta, _widen_n(src, nd), _widen_n(dst, nd))
        return tuple(dataclasses.replace(c, axis=0 if c.axis < nd - 1 else 1) for c in wide)


def _widen_n(pl: Placements, nd: int) -> Placements:
    return (pl[0],) * (nd - 1) + (pl[1],)

