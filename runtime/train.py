"""Sharded training steps: the lowered joint graph (forward, backward and the
gradient collectives the plan chose), then the optimizer on local shards.

Every gradient leaves the graph in its parameter's placement, so an
elementwise optimizer (AdamW, SGD) updating each rank's shard is exactly the
single-device update restricted to that shard.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate

from dtplan.runtime.program import ShardedProgram, sharded_program
from dtplan.ir.capture import Captured
from dtplan.ir.graph import Role
from dtplan.planner.space._dtensor import Placements
from dtplan.planner.output.plan import Plan
from dtplan.runtime.lower import attr_name
from dtplan.runtime.params import local_shard
from dtplan.runtime.redistribute import RankMesh, redistribute_local

__all__ = ["SCALE_GRADIENT_ENV", "JointStep", "ShardedTrainer", "make_optimizer", "sharded_trainer"]

#: test-only fault: "FQN=FACTOR[,FQN=FACTOR]" multiplies each parameter's gradient by
#: FACTOR inside the lowered program, so a test can show that `--check`
#: catches a wrong gradient (a missing 1/N, a doubled partial sum)
SCALE_GRADIENT_ENV = "DTPLAN_TEST_SCALE_GRADIENT"


def make_optimizer(name: str, params, *, lr: float) -> torch.optim.Optimizer:
    """The optimizers dtplan plans memory for; `foreach=False` keeps the
    arithmetic per tensor, as on a single device."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=False)
    raise ValueError(f"unknown optimizer {name!r}; dtplan knows adamw and sgd")


class JointStep:
    """A lowered training program's call: its flat outputs read as the loss,
    each parameter's gradient (this rank's shard, in the parameter's
    placement) and the buffer updates, which it copies into the program's
    buffers (batch norm's running statistics)."""

    def __init__(self, program: ShardedProgram) -> None:
        captured = program.captured
        graph = captured.graph
        n_grads = len(captured.gradients)
        self.program = program
        #: the parameter (FQN) each gradient output is for, in output order
        self.grad_for = tuple(graph[captured.gradients[g]].fqn for g in graph.outputs[1 : 1 + n_grads])
        #: the program's attribute each buffer-update output goes to, in output order
        self.update_of = tuple(attr_name(captured.updates[u]) for u in graph.outputs[1 + n_grads :])

    def run(self, *local_inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step on this rank's inputs: (loss, gradient by FQN)."""
        gm = self.program.graph_module
        with torch.no_grad():  # the program is its own backward
            loss, *rest = gm(*local_inputs)
            grads, news = rest[: len(self.grad_for)], rest[len(self.grad_for) :]
            for attr, new in zip(self.update_of, news, strict=True):
                getattr(gm, attr).copy_(new)
        return loss, dict(zip(self.grad_for, grads, strict=True))


class ShardedTrainer:
    """Drive sharded training steps from a user's own loop.

    `step(*inputs)` runs one step on full inputs (cut per the plan) and returns
    the loss; `backward(*inputs)` is the step without the optimizer (each
    parameter's `.grad` set to its local shard); `full_gradients()` gathers
    them; `parameters` are this rank's shards by FQN; `full_state_dict()`
    gathers every parameter and buffer (collective: call it on every rank);
    `load_state_dict()` cuts full tensors back into the shards.
    """

    def __init__(self, program: ShardedProgram, *, optimizer: str = "adamw", lr: float = 1e-3) -> None:
        captured = program.captured
        if not captured.train:
            raise ValueError("ShardedTrainer needs a training program (capture_training / --train)")
        self.program = program
        gm = program.graph_module
        self._stored = {fqn: (name, role) for name, role, fqn in captured.placeholders if role is not Role.INPUT}
        self.parameters: dict[str, torch.nn.Parameter] = {
            fqn: getattr(gm, attr_name(name)) for fqn, (name, role) in self._stored.items() if role is Role.PARAM
        }
        self._step = JointStep(program)
        self.optimizer = make_optimizer(optimizer, list(self.parameters.values()), lr=lr)
        grad_for = self._step.grad_for
        for fault in filter(None, os.environ.get(SCALE_GRADIENT_ENV, "").split(",")):
            fqn, _, factor = fault.rpartition("=")
            if fqn not in grad_for:
                raise ValueError(f"{SCALE_GRADIENT_ENV}: no gradient for {fqn!r}; parameters with one: {list(grad_for)[:8]}")
            _scale_output(gm, 1 + grad_for.index(fqn), float(factor))

    def backward(self, *full_inputs: torch.Tensor) -> float:
        """The forward and the planned backward: each parameter's `.grad` is
        its gradient's local shard (in the parameter's placement) and the
        buffers the step updates are updated; no optimizer step."""
        loss, grads = self._step.run(*self.program.shard_inputs(*full_inputs))
        for fqn, grad in grads.items():
            self.parameters[fqn].grad = grad
        return float(loss)

    def update(self) -> None:
        """The optimizer's step on the gradients `backward` left, then clear them."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, *full_inputs: torch.Tensor) -> float:
        loss = self.backward(*full_inputs)
        self.update()
        return loss

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every gradient `backward` left, in full (collective: call it on
        every rank). A parameter the loss does not reach has none."""
        mesh = RankMesh.of(self.program.mesh)
        return {fqn: self._full(p.grad, fqn, mesh) for fqn, p in self.parameters.items() if p.grad is not None}

    def _placements(self, fqn: str) -> Placements:
        return self.program.plan.nodes[self._stored[fqn][0]].output

    def _full(self, local: torch.Tensor, fqn: str, mesh: RankMesh) -> torch.Tensor:
        """The full value of stored tensor `fqn` (or its gradient) from this rank's shard (collective)."""
        meta = self.program.captured.graph[self._stored[fqn][0]].tensor_meta
        return redistribute_local(local, mesh, meta, self._placements(fqn), (Replicate(),) * len(mesh.shape))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer in full, gathered from the shards."""
        gm, mesh = self.program.graph_module, RankMesh.of(self.program.mesh)
        return {fqn: self._full(getattr(gm, attr_name(name)).detach(), fqn, mesh) for fqn, (name, _) in self._stored.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Cut full tensors (a checkpoint) back into this rank's shards."""
        missing = sorted(set(self._stored) - set(state))
        if missing:
            raise KeyError(f"state dict lacks {missing}")
        gm, device_mesh = self.program.graph_module, self.program.mesh
        with torch.no_grad():
            for fqn, (name, _) in self._stored.items():
                getattr(gm, attr_name(name)).copy_(local_shard(state[fqn].to(device_mesh.device_type), device_mesh, self._placements(fqn)))


def _scale_output(gm: torch.fx.GraphModule, index: int, factor: float) -> None:
    """Multiply output `index` of `gm` by `factor` (the test-only fault)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(out.args[0])
    with gm.graph.inserting_before(out):
        values[index] = gm.graph.call_function(torch.ops.aten.mul.Tensor, (values[index], factor))
    out.args = (tuple(values),)
    gm.graph.lint()
    gm.recompile()


def sharded_trainer(model: torch.nn.Module, captured: Captured, plan: Plan, mesh: DeviceMesh, **kwargs) -> ShardedTrainer:
    """Shard the model per a training plan and wrap it for stepping."""
    return ShardedTrainer(sharded_program(model, captured, plan, mesh), **kwargs)

