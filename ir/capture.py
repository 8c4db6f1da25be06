"""Capture: nn.Module (or traced GraphModule) + example inputs -> ATen fx graph -> IR.

torch.export gives an fx graph in ATen ops with fake-tensor metadata and a
signature naming parameters, buffers and user inputs. We decompose to core
ATen (which DTensor's rules cover) but keep `scaled_dot_product_attention`
fused so attention can be head-sharded by our own rule.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import operator
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ir.flops import node_cost
from ir.graph import Graph, Node, Ref, Role, TensorMeta

__all__ = ["CaptureError", "Captured", "capture", "lift"]

log = logging.getLogger(__name__)

#: Ops kept whole by the decomposition (we carry sharding rules for them).
KEEP_FUSED = (torch.ops.aten.scaled_dot_product_attention.default,)


class CaptureError(RuntimeError):
    """The model could not be traced into an ATen graph."""


@dataclass(frozen=True, slots=True)
class Captured:
    """The executable fx graph and the IR lifted from it (same node names)."""

    gm: torch.fx.GraphModule
    graph: Graph
    #: placeholder names in call order, with their role and FQN (None for user inputs)
    placeholders: tuple[tuple[str, Role, str | None], ...]
    #: user input names in the order the model takes them
    user_inputs: tuple[str, ...]
    #: lifted tensor constants by FQN (the runtime shards them like buffers)
    constants: Mapping[str, torch.Tensor] = field(default_factory=dict)
    #: wall time of export + decompositions
    seconds: float | None = None


def capture(model: torch.nn.Module, example_inputs: tuple) -> Captured:
    """Export `model(*example_inputs)` to core ATen and lift it into the IR.

    Works on meta tensors (planning only) and on real ones.
    """
    t0 = time.perf_counter()
    try:
        # export prints the partial graph to stderr on some failures; the
        # error we raise says what went wrong and where, in one line
        with contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(model, tuple(example_inputs))
        table = torch.export.default_decompositions()
        for op in KEEP_FUSED:
            table.pop(op, None)
        ep = ep.run_decompositions(table)
    except Exception as e:  # noqa: BLE001 - re-raised with a one-line cause
        raise CaptureError(_explain_export_failure(e)) from e
    seconds = time.perf_counter() - t0
    log.debug("export + decompositions: %.3fs", seconds)
    return dataclasses.replace(lift(ep), seconds=seconds)


def _explain_export_failure(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = _user_frame(e)
    at = f" (at {where})" if where else ""
    return f"torch.export could not trace the model{at}: {type(e).__name__}: {first}"


def _user_frame(e: BaseException) -> str | None:
    """The innermost traceback line in the user's code (not torch's nor ours)."""
    ours = Path(__file__).resolve().parents[1]
    torch_dir = Path(torch.__file__).resolve().parent
    found = None
    for frame in traceback.extract_tb(e.__traceback__):
        path = Path(frame.filename).resolve()
        if torch_dir in path.parents or (ours in path.parents and "examples" not in path.parts) or frame.filename.startswith("<"):
            continue
        found = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return found


def lift(ep: ExportedProgram) -> Captured:
    """Convert an ExportedProgram's graph into frozen IR nodes."""
    gm = ep.graph_module
    sig = ep.graph_signature
    kinds = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    outputs_spec = [s for s in sig.output_specs]
    if any(s.kind is not OutputKind.USER_OUTPUT for s in outputs_spec):
        bad = [s.kind.name for s in outputs_spec if s.kind is not OutputKind.USER_OUTPUT]
        raise CaptureError(f"the model mutates state during forward ({bad}); dtplan plans pure programs")

    nodes: list[Node] = []
    placeholders: list[tuple[str, Role, str | None]] = []
    user_inputs: list[str] = []
    out_names: tuple[str, ...] = ()
    for fx_node in gm.graph.nodes:
        if fx_node.op == "placeholder":
            spec = kinds[fx_node.name]
            role, fqn = _placeholder_role(spec)
            val = fx_node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise CaptureError(f"input {fx_node.name!r} is not a tensor ({type(val).__name__}); dtplan takes tensor inputs")
            placeholders.append((fx_node.name, role, fqn))
            if role is Role.INPUT:
                user_inputs.append(fx_node.name)
            nodes.append(Node(fx_node.name, None, (), (), TensorMeta.of(val), role, fqn=fqn))
        elif fx_node.op == "call_function":
            nodes.append(_lift_call(fx_node))
        elif fx_node.op == "output":
            out_names = tuple(_output_names(fx_node.args[0]))
        else:
            raise CaptureError(f"unsupported fx node {fx_node.format_node()}")
    graph = Graph(tuple(nodes), out_names)
    return Captured(gm, graph, tuple(placeholders), tuple(user_inputs), dict(ep.constants))


def _placeholder_role(spec) -> tuple[Role, str | None]:
    if spec.kind is InputKind.PARAMETER:
        return Role.PARAM, spec.target
    if spec.kind is InputKind.BUFFER:
        return Role.BUFFER, spec.target
    if spec.kind is InputKind.CONSTANT_TENSOR:
        return Role.CONSTANT, spec.target
    if spec.kind is InputKind.USER_INPUT:
        return Role.INPUT, None
    raise CaptureError(f"unsupported graph input kind {spec.kind.name} for {spec.arg}")


def _output_names(args) -> list[str]:
    names = []
    for a in args if isinstance(args, (tuple, list)) else (args,):
        if not isinstance(a, torch.fx.Node):
            raise CaptureError(f"model output {a!r} is not a tensor; dtplan needs tensor outputs")
        names.append(a.name)
    return names


def _to_ref(value):
    if isinstance(value, torch.fx.Node):
        return Ref(value.name)
    if isinstance(value, (list, tuple)):
        return tuple(_to_ref(v) for v in value)
    return value


def _meta_of(fx_node: torch.fx.Node) -> TensorMeta | tuple[TensorMeta | None, ...] | None:
    val = fx_node.meta.get("val")
    tensors = val if isinstance(val, (tuple, list)) else (val,)
    for t in tensors:
        if isinstance(t, torch.Tensor) and not all(isinstance(d, int) for d in t.shape):
            raise CaptureError(
                f"node {fx_node.name} ({fx_node.target}) in module {_module_path(fx_node) or '<root>'!r} has a "
                f"data-dependent shape {list(t.shape)}; dtplan plans programs with static shapes"
            )
    if isinstance(val, torch.Tensor):
        return TensorMeta.of(val)
    if isinstance(val, (tuple, list)):
        return tuple(TensorMeta.of(v) if isinstance(v, torch.Tensor) else None for v in val)
    return None


def _module_path(fx_node: torch.fx.Node) -> str:
    stack = fx_node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self__.", "")


def _lift_call(fx_node: torch.fx.Node) -> Node:
    target = fx_node.target
    if target is not operator.getitem and not isinstance(target, torch._ops.OpOverload):
        raise CaptureError(f"unsupported call {fx_node.format_node()} (not an ATen op)")
    meta = _meta_of(fx_node)
    flops, nbytes = (0, 0) if target is operator.getitem else node_cost(fx_node)
    return Node(
        name=fx_node.name,
        target=target,
        args=_to_ref(tuple(fx_node.args)),
        kwargs=tuple((k, _to_ref(v)) for k, v in fx_node.kwargs.items()),
        meta=meta,
        role=Role.ACTIVATION,
        module=_module_path(fx_node),
        flops=flops,
        bytes=nbytes,
    )
