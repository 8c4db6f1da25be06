"""The user's own model, parallelized: DTensor parameters, the planned step.

`parallelize` (see `dtplan.api.parallelize`) hands back the very module the
user passed, with every parameter and buffer replaced by a DTensor in the
plan's placements, and its `forward` replaced by this rank's lowered training
program. The user keeps the rest of the loop: `loss = model(*inputs)`,
`loss.backward()`, any `torch.optim` optimizer over `model.parameters()`,
`clip_grad_norm_`, `state_dict()` and torch.distributed.checkpoint.

How the step runs. The plan is made for the joint forward+backward graph, so
the lowered program computes the loss, every gradient (with the gradient
collectives the plan chose) and the buffer updates in one call. `forward`
runs it and returns the loss through `_PlannedBackward`, an autograd
function whose inputs are the DTensor parameters: `loss.backward()` then
hands autograd each gradient, scaled by the loss's incoming gradient (a
gradient is linear in it, so `(loss * k).backward()` and loss scaling are
exact), and autograd accumulates it into `param.grad` as for any leaf:
gradient accumulation over several calls works as in eager PyTorch. The
backward's arithmetic has run by then, inside the forward call; what a
user's loop sees is the same. (Splitting the lowered joint program at the
forward/backward boundary, so the backward runs in `loss.backward()` itself,
is not built yet.)

The module's stored tensors and the program's share storage: the program's
attributes are the DTensors' local shards, so an optimizer's in-place update
of a DTensor parameter, `load_state_dict` and a checkpoint load are what the
next step reads.
"""
from __future__ import annotations

import types

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from dtplan.ir.graph import Role
from dtplan.planner.space._dtensor import local_shape
from dtplan.runtime.lower import attr_name
from dtplan.runtime.program import ShardedProgram
from dtplan.runtime.train import JointStep

__all__ = ["ParallelizeError", "local_inputs", "parallelized"]


class ParallelizeError(ValueError):
    """The model, its inputs or its mode do not fit the planned program."""


class _PlannedBackward(torch.autograd.Function):
    """The loss, with the gradients the program already computed as its
    backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, grads: list, *params: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.grads = grads
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001
        grads = ctx.grads
        ctx.grads = None  # a second backward through the same loss has nothing left to give
        if grads is None:
            raise RuntimeError("the planned step's gradients were given once already; run the forward again")
        # the loss is a plain tensor (the program's local, replicated loss), and so is its gradient
        scale = None if bool(torch.all(grad_out == 1)) else grad_out.detach()
        out = []
        for g in grads:
            if g is None or scale is None:
                out.append(g)
            else:
                out.append(DTensor.from_local(g.to_local() * scale, g.device_mesh, g.placements, run_check=False, shape=g.shape, stride=g.stride()))
        return (None, None, *out)


class _Step:
    """This rank's planned training step, bound to the module it replaced
    the forward of."""

    def __init__(self, program: ShardedProgram, params: dict[str, torch.nn.Parameter]) -> None:
        graph = program.captured.graph
        self.program = program
        self.joint = JointStep(program)
        self.mesh: DeviceMesh = program.mesh
        self.params = params  # the autograd function's inputs, in this order
        self.inputs = [(name, graph[name].tensor_meta) for name in program.captured.user_inputs]

    def __call__(self, module: torch.nn.Module, *local: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs:
            raise ParallelizeError(f"the planned program takes positional inputs only; got keyword(s) {sorted(kwargs)}")
        if not module.training:
            raise ParallelizeError("the module was parallelized for training; eval() needs an inference plan, which parallelize does not build yet")
        self._check(local)
        loss, grads = self.joint.run(*local)
        if not torch.is_grad_enabled():
            return loss
        dgrads = []
        for fqn, p in self.params.items():
            g = grads.get(fqn)
            dgrads.append(None if g is None else DTensor.from_local(g, self.mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()))
        return _PlannedBackward.apply(loss, dgrads, *self.params.values())

    def _check(self, local: tuple) -> None:
        if len(local) != len(self.inputs):
            raise ParallelizeError(f"the program takes {len(self.inputs)} input(s), got {len(local)}")
        plan, sizes = self.program.plan, tuple(self.mesh.shape)
        for (name, meta), x in zip(self.inputs, local, strict=True):
            want = local_shape(meta.shape, sizes, plan.inputs[name])
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(want):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ParallelizeError(
                    f"input {name!r}: this rank takes its piece {tuple(want)} of the batch {tuple(meta.shape)} "
                    f"(placements {[str(p) for p in plan.inputs[name]]}), got {got}; dtplan.local_inputs(model, *full) cuts it"
                )


def parallelized(model: torch.nn.Module, program: ShardedProgram) -> torch.nn.Module:
    """Put DTensors sharing the program's stored shards in place of the
    model's parameters and buffers, and the planned step in place of its
    forward; returns `model` itself."""
    captured, plan, mesh = program.captured, program.plan, program.mesh
    gm = program.graph_module
    stored = {fqn: name for name, role, fqn in captured.placeholders if role is not Role.INPUT and role is not Role.CONSTANT}
    new_param: dict[int, torch.nn.Parameter] = {}  # by the original's id: tied parameters stay one
    fqn_params: dict[str, torch.nn.Parameter] = {}
    for fqn, p in model.named_parameters(remove_duplicate=True):
        if fqn in stored:
            local = getattr(gm, attr_name(stored[fqn]))
            d = DTensor.from_local(local.detach(), mesh, plan.nodes[stored[fqn]].output, run_check=False, shape=p.shape, stride=p.stride())
        else:  # a parameter the program never reads: replicated, so optimizers and checkpoints still see it
            d = distribute_tensor(p.detach(), mesh, [Replicate()] * mesh.ndim)
        new_param[id(p)] = torch.nn.Parameter(d, requires_grad=p.requires_grad)
        if fqn in stored and p.requires_grad:
            fqn_params[fqn] = new_param[id(p)]
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, new_param[id(p)])
    for mod_name, module in model.named_modules():
        for name, b in list(module.named_buffers(recurse=False)):
            fqn = f"{mod_name}.{name}" if mod_name else name
            if fqn in stored:
                local = getattr(gm, attr_name(stored[fqn]))
                d = DTensor.from_local(local, mesh, plan.nodes[stored[fqn]].output, run_check=False, shape=b.shape, stride=b.stride())
            else:
                d = distribute_tensor(b, mesh, [Replicate()] * mesh.ndim)
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, d, persistent=persistent)
    step = _Step(program, fqn_params)
    model.forward = types.MethodType(lambda self, *a, **k: step(self, *a, **k), model)  # an instance attribute: nn.Module.__call__ and its hooks run it
    model._dtplan_program = program
    return model


def _program(model: torch.nn.Module) -> ShardedProgram:
    program = getattr(model, "_dtplan_program", None)
    if program is None:
        raise ParallelizeError("the model was not parallelized by dtplan.parallelize")
    return program


def local_inputs(model: torch.nn.Module, *full: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's pieces of full inputs, as the plan places them (a
    data-parallel loader gives each rank its own piece directly)."""
    return _program(model).shard_inputs(*full)
