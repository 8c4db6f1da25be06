"""Lower a Plan into this rank's sharded fx GraphModule.

We interpret the captured ATen graph on DTensors whose placements the plan
fixes: before each op its inputs are redistributed (explicit functional
collectives, `runtime.redistribute`) to the placements the chosen strategy
wants, then DTensor runs the op on local shards (rewriting shape arguments of
views). Tracing that interpretation with `make_fx` leaves a graph of local
ATen ops and `_c10d_functional` collectives. Stored tensors (parameters,
buffers, constants) become attributes of the module, so it is called with the
user inputs only.
"""
from __future__ import annotations

import logging
import operator
import re
import time
from collections.abc import Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_map

from ir.capture import Captured
from ir.graph import Role, TensorMeta
from planner import rules
from planner.plan import NodePlan, Plan
from planner.pricing import local_shape
from runtime.redistribute import RankMesh, redistribute_local

__all__ = ["LoweringError", "attr_name", "lower"]

log = logging.getLogger(__name__)


class LoweringError(RuntimeError):
    """The plan could not be executed as written for a node."""


def lower(captured: Captured, plan: Plan, mesh: DeviceMesh, stored: Mapping[str, torch.Tensor]) -> torch.fx.GraphModule:
    """This rank's sharded GraphModule. `stored[name]` is the local shard of
    each stored placeholder (parameter, buffer, constant); the module takes
    the user inputs' local shards, in order, and returns the outputs' local
    shards with the plan's output placements."""
    t0 = time.perf_counter()
    interp = _Interpreter(captured, plan, mesh)
    names = [n for n, role, _ in captured.placeholders if role is not Role.INPUT]
    user = list(captured.user_inputs)
    device = mesh.device_type
    examples = [stored[n] for n in names] + [
        torch.empty(_local(captured.graph[n].tensor_meta, plan.nodes[n].output, mesh), dtype=captured.graph[n].tensor_meta.dtype, device=device)
        for n in user
    ]
    gm = make_fx(lambda *a: interp.run(dict(zip(names + user, a, strict=True))), tracing_mode="fake")(*examples)
    params = {n for n, role, _ in captured.placeholders if role is Role.PARAM}
    _attach_stored(gm, names, stored, params)
    log.debug("lowering: %.3fs, %d nodes", time.perf_counter() - t0, len(gm.graph.nodes))
    return gm


def _local(meta: TensorMeta, placements, mesh: DeviceMesh) -> tuple[int, ...]:
    return local_shape(meta.shape, tuple(mesh.shape), placements)


def _attach_stored(gm: torch.fx.GraphModule, names: list[str], stored: Mapping[str, torch.Tensor], params: set[str]) -> None:
    """Replace the stored placeholders by attributes holding the local shards
    (parameters as nn.Parameter, so an optimizer can update them in place)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][: len(names)]
    first_real = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    for node, name in zip(placeholders, names, strict=True):
        attr = attr_name(name)
        if name in params:
            gm.register_parameter(attr, torch.nn.Parameter(stored[name]))
        else:
            gm.register_buffer(attr, stored[name])
        with gm.graph.inserting_before(first_real):
            getter = gm.graph.get_attr(attr)
        node.replace_all_uses_with(getter)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def attr_name(name: str) -> str:
    """The GraphModule attribute holding a stored placeholder's local shard."""
    return "s_" + re.sub(r"\W", "_", name)


class _Interpreter:
    """Runs the captured graph on DTensors following the plan, node by node."""

    def __init__(self, captured: Captured, plan: Plan, mesh: DeviceMesh) -> None:
        self.captured, self.plan, self.mesh = captured, plan, mesh
        self.rank_mesh = RankMesh.of(mesh)
        self.graph = captured.graph

    def run(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        env: dict[str, object] = {}
        self.hub_values: dict[str, DTensor] = {}
        for name, local in inputs.items():
            env[name] = self._wrap(local, self.plan.nodes[name].output, self.graph[name].tensor_meta)
        for fx_node in self.captured.gm.graph.nodes:
            if fx_node.op == "call_function":
                env[fx_node.name] = self._call(fx_node, env)
        outs = []
        for name, want in zip(self.graph.outputs, self.plan.outputs, strict=True):
            src = self._hub(name, env) if name in self.plan.hubs else env[name]
            outs.append(self._to(src, want, self.graph[name].tensor_meta))
        return tuple(outs)

    def _wrap(self, local: torch.Tensor, placements, meta: TensorMeta) -> DTensor:
        return DTensor.from_local(local, self.mesh, placements, run_check=False, shape=torch.Size(meta.shape), stride=meta.stride)

    def _to(self, value: DTensor, placements, meta: TensorMeta) -> torch.Tensor:
        """The local shard of `value` redistributed to `placements`."""
        return redistribute_local(value.to_local(), self.rank_mesh, meta, value.placements, placements)

    def _hub(self, name: str, env: dict[str, object]) -> DTensor:
        """The shared value in its hub placement, redistributed on first read."""
        if name not in self.hub_values:
            meta, want = self.graph[name].tensor_meta, self.plan.hubs[name]
            self.hub_values[name] = self._wrap(self._to(env[name], want, meta), want, meta)
        return self.hub_values[name]

    def _call(self, fx_node: torch.fx.Node, env: dict[str, object]) -> object:
        np = self.plan.nodes[fx_node.name]
        if fx_node.target is operator.getitem:
            return env[fx_node.args[0].name][fx_node.args[1]]
        counter = iter(range(len(np.inputs)))

        def arg(a):
            if isinstance(a, torch.fx.Node):
                k = next(counter)
                meta = self.graph[a.name].tensor_meta
                src = self._hub(a.name, env) if np.via_hub and np.via_hub[k] else env[a.name]
                return self._wrap(self._to(src, np.inputs[k], meta), np.inputs[k], meta)
            return a

        args, kwargs = tree_map(arg, (tuple(fx_node.args), dict(fx_node.kwargs)))
        if "device" in kwargs:  # factories traced on meta run on this rank's device
            kwargs["device"] = torch.device(self.mesh.device_type)
        try:
            return self._execute(fx_node, np, args, kwargs)
        except LoweringError:
            raise
        except Exception as e:
            raise LoweringError(f"lowering failed at node={fx_node.format_node()}: {type(e).__name__}: {e}") from e

    def _execute(self, fx_node, np: NodePlan, args, kwargs) -> object:
        target = fx_node.target
        meta = self.graph[fx_node.name].meta
        replicated = all(all(p.is_replicate() for p in pl) for pl in np.inputs) and _replicated(np.output)
        if rules.lookup(target) is not None or replicated:
            # our own rules, factories and fully replicated ops: the op on local tensors
            la, lk = tree_map(lambda v: v.to_local() if isinstance(v, DTensor) else v, (args, kwargs))
            out = target(*la, **lk)
            return self._wrap_outputs(out, np.output, meta)
        out = target(*args, **kwargs)
        self._check(fx_node, out, np.output)
        return out

    def _wrap_outputs(self, out, placements, meta):
        if isinstance(out, torch.Tensor):
            return self._wrap(out, placements, meta)
        return tuple(
            None if o is None or p is None else self._wrap(o, p, m) for o, p, m in zip(out, placements, meta, strict=True)
        )

    def _check(self, fx_node, out, want) -> None:
        got = out.placements if isinstance(out, DTensor) else tuple(o.placements if isinstance(o, DTensor) else None for o in out)
        if isinstance(out, DTensor):
            ok = tuple(got) == tuple(want)
        else:
            ok = all(w is None or tuple(g) == tuple(w) for g, w in zip(got, want, strict=False))
        if not ok:
            raise LoweringError(
                f"DTensor produced placements {got} for node={fx_node.format_node()}, the plan says {want}"
            )


def _replicated(output) -> bool:
    if output and (output[0] is None or isinstance(output[0], tuple)):
        return all(o is None or all(p.is_replicate() for p in o) for o in output)
    return all(p.is_replicate() for p in output)
