"""A rank's sharded program: the plan lowered for this rank, with the real
model's stored tensors cut to this rank's shards, and how to feed it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.utils import _pytree as pytree

from dtplan.ir.capture import Captured
from dtplan.ir.graph import Role
from dtplan.planner.mesh import MeshSpec
from dtplan.planner.output.plan import Plan
from dtplan.runtime.lower import lower
from dtplan.runtime.params import local_shard

__all__ = ["ShardedProgram", "mesh_spec", "sharded_program"]


@dataclass(frozen=True)
class ShardedProgram:
    """This rank's sharded program: the GraphModule and how to feed it."""

    graph_module: torch.fx.GraphModule
    plan: Plan
    mesh: DeviceMesh
    captured: Captured

    def shard_inputs(self, *full_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Cut full inputs to this rank's pieces per the plan's input placements."""
        names = self.captured.user_inputs
        if len(full_inputs) != len(names):
            raise ValueError(f"the program takes {len(names)} input(s) {list(names)}, got {len(full_inputs)}")
        device = self.mesh.device_type
        return tuple(local_shard(x.to(device), self.mesh, self.plan.inputs[n]) for n, x in zip(names, full_inputs, strict=True))

    def __call__(self, *full_inputs: torch.Tensor) -> object:
        """This rank's outputs, nested as the model returns them (a tensor, a
        tuple, a dict, a ModelOutput ...); a training step returns the flat
        tuple (loss, gradients..., buffer updates...)."""
        with torch.no_grad():  # the program is its own backward where it has one
            outs = self.graph_module(*self.shard_inputs(*full_inputs))
        if self.captured.train or self.captured.out_spec is None:
            return outs
        return pytree.tree_unflatten(list(outs), self.captured.out_spec)


def mesh_spec(mesh: DeviceMesh) -> MeshSpec:
    """The MeshSpec of an initialised DeviceMesh (its axis names, or d0, d1, ...)."""
    return MeshSpec(tuple(mesh.shape), tuple(mesh.mesh_dim_names or (f"d{i}" for i in range(mesh.ndim))))


def sharded_program(model: torch.nn.Module, captured: Captured, plan: Plan, mesh: DeviceMesh) -> ShardedProgram:
    """Shard the real model's stored tensors and lower the plan for this rank.
    Refuses (PlanError) a plan made for another model, another mesh shape or
    (where the DeviceMesh names its axes) other axis names."""
    plan.check_matches(captured.graph, mesh_spec(mesh), axis_names=mesh.mesh_dim_names is not None)
    stored = {}
    device = mesh.device_type
    for name, role, fqn in captured.placeholders:
        if role is Role.INPUT:
            continue
        full = captured.constants[fqn] if role is Role.CONSTANT else _state(model, fqn)
        stored[name] = local_shard(full.to(device), mesh, plan.nodes[name].output)
    return ShardedProgram(lower(captured, plan, mesh, stored), plan, mesh, captured)


def _state(model: torch.nn.Module, fqn: str) -> torch.Tensor:
    try:
        return model.get_parameter(fqn)
    except AttributeError:
        return model.get_buffer(fqn)
