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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._functorch.aot_autograd import aot_export_module
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._graph_pickler import GraphPickler, Options as GraphPicklerOptions
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from dtplan.ir.decompose import TRAINING_DECOMPOSITIONS
from dtplan.ir.flops import node_cost
from dtplan.ir.graph import Graph, Node, Role, TensorMeta, base_name, to_ref
from dtplan.ir.precision import Precision, WithPrecision, call_with_precision
from dtplan.ir.remat import Remat

__all__ = [
    "CaptureError", "Captured", "capture", "capture_training", "casts_at_first_use", "fake_build", "from_bytes", "gradient_casts_when_ready", "lift",
    "lift_graph", "to_bytes", "user_frame",
]

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
    #: training graphs: gradient output node -> its parameter's placeholder
    gradients: Mapping[str, str] = field(default_factory=dict)
    #: training graphs: output node holding a buffer's new value -> the buffer's placeholder
    updates: Mapping[str, str] = field(default_factory=dict)
    #: forward graphs: how the model's outputs nest (torch pytree; a ModelOutput, a dict, ...)
    out_spec: object = None
    #: the mixed-precision policy the step was traced under (its casts are graph ops)
    precision: Precision = Precision()
    #: training graphs: the activation recomputation in the graph (`dtplan.ir.remat`)
    remat: Remat = Remat()

    @property
    def train(self) -> bool:
        return bool(self.gradients)

    @property
    def pinned_outputs(self) -> dict[str, str]:
        """Outputs that must end in a stored value's placement: gradients in
        their parameter's, buffer updates in their buffer's."""
        return {**self.gradients, **self.updates}


def to_bytes(captured: Captured) -> bytes:
    """The capture as bytes another process turns back into it (`from_bytes`):
    ranks spawned to run a plan take the capture it was planned from instead
    of tracing the model again (the trace is most of a small model's run).
    fx's graph pickler keeps each node's fake value and names ops by name;
    module stacks, which hold classes a rank may not import, are left out."""
    return GraphPickler.dumps((captured, [n.name for n in captured.gm.graph.nodes]), GraphPicklerOptions(ops_filter=None))


def from_bytes(data: bytes) -> Captured:
    """The capture `to_bytes` wrote, its fake values in a fresh fake mode,
    every node under its own name."""
    captured, names = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv()))  # an exported program's shape env is filled in
    if not isinstance(captured, Captured):
        raise TypeError(f"expected a pickled Captured, got {type(captured).__name__}")
    # the graph is rebuilt through fx's namespace, which renames what export
    # may name after a builtin (nn.Linear's `input` comes back `input_1`)
    renamed = False
    for node, name in zip(captured.gm.graph.nodes, names, strict=True):
        if node.name != name:
            node.name = name
            renamed = True
    if renamed:
        captured.gm.recompile()
    return captured


def capture(model: torch.nn.Module, example_inputs: tuple, precision: Precision | str | None = None) -> Captured:
    """Export `model(*example_inputs)` to core ATen and lift it into the IR;
    under a mixed `precision` the parameter and input casts are in the graph.

    Works on meta tensors (planning only) and on real ones.
    """
    t0 = time.perf_counter()
    precision = Precision.parse(precision)
    traced = WithPrecision(model, precision) if precision.mixed else model
    try:
        # export prints the partial graph to stderr on some failures; the
        # error we raise says what went wrong and where, in one line
        with contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(traced, tuple(example_inputs))
        table = torch.export.default_decompositions()
        for op in KEEP_FUSED:
            table.pop(op, None)
        ep = ep.run_decompositions(table)
    except Exception as e:  # noqa: BLE001 - re-raised with a one-line cause
        raise CaptureError(_explain_export_failure(e, model)) from e
    seconds = time.perf_counter() - t0
    log.debug("export + decompositions: %.3fs", seconds)
    if precision.mixed:
        casts_at_first_use(ep.graph_module)
    captured = lift(ep)
    if precision.mixed:
        captured = _unwrapped(captured)
    return dataclasses.replace(captured, seconds=seconds, out_spec=ep.call_spec.out_spec, precision=precision)


def casts_at_first_use(gm: torch.fx.GraphModule) -> None:
    """Move each cast of a placeholder (a parameter or an input cast to the
    compute dtype) to just before its first reader, where FSDP2 casts: the
    step casts everything at its start, which would keep every layer's copy
    live from the start (and puts a layer's casts outside its layer, which
    stamping and folding go by)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten._to_copy.default and n.args[0].op == "placeholder" and n.users:
            first = min(n.users, key=order.__getitem__)
            if first is not n.next:
                first.prepend(n)
    gm.graph.lint()
    gm.recompile()


def gradient_casts_when_ready(gm: torch.fx.GraphModule, gradients: Mapping[str, str]) -> None:
    """Move each gradient's cast back to the parameter dtype to just after the
    low-precision gradient is computed, where FSDP2 casts and reduces it.
    Autograd runs the casts' backward last (the step casts every parameter
    at its start, so their autograd nodes are the oldest): left there, every
    layer's bf16 gradient stays live to the end of the step, all reductions
    queue at the end, and the backward windows of repeated layers do not
    repeat (the stamped capture could not stamp)."""
    for n in list(gm.graph.output_node().args[0]):
        if isinstance(n, torch.fx.Node) and n.name in gradients and n.target is torch.ops.aten._to_copy.default:
            source = n.args[0]
            if isinstance(source, torch.fx.Node) and source.op != "placeholder" and source.next is not n:
                source.append(n)
    gm.graph.lint()
    gm.recompile()


def _renumbered(gm: torch.fx.GraphModule, *by_name: Mapping[str, str]) -> tuple:
    """The graph with its op nodes named as a trace in this order names them
    (`mul`, `mul_1`, ... by position), after casts moved: names follow the
    order, as the stamped capture, which rebuilds a graph in order, names
    them. Returns the module and each mapping re-keyed by the new names."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            graph.output(torch.fx.node.map_arg(n.args[0], env.__getitem__))
            continue
        name = n.name if n.op == "placeholder" else base_name(n.name)
        new = graph.create_node(n.op, n.target, torch.fx.node.map_arg(n.args, env.__getitem__), torch.fx.node.map_arg(n.kwargs, env.__getitem__), name=name, type_expr=n.type)
        new.meta = dict(n.meta)
        env[n] = new
    names = {old.name: new.name for old, new in env.items()}
    return (torch.fx.GraphModule(gm, graph), *({names[k]: v for k, v in m.items()} for m in by_name))


def _unwrapped(captured: Captured) -> Captured:
    """A capture of `WithPrecision(model)` named as the model's own: FQNs and
    module paths without the wrapper's `m.`."""
    strip = lambda name: name if name is None else name.removeprefix("m.")  # noqa: E731
    nodes = tuple(dataclasses.replace(n, module=strip(n.module) if n.module != "m" else "", fqn=strip(n.fqn)) for n in captured.graph)
    return dataclasses.replace(
        captured,
        graph=Graph(nodes, captured.graph.outputs),
        placeholders=tuple((name, role, strip(fqn)) for name, role, fqn in captured.placeholders),
        constants={strip(k): v for k, v in captured.constants.items()},
    )


def _explain_export_failure(e: Exception, model: torch.nn.Module) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = user_frame(e)
    at = f" (at {where})" if where else ""
    odd = [name for name, _ in model.named_modules() if not all(part.isidentifier() for part in name.split(".") if not part.isdigit())]
    if isinstance(e, SyntaxError) and odd:
        # torch releases before 2.14 wrote module names into generated code unquoted
        at += f" (module name {odd[0]!r} is not a Python identifier; this torch's export cannot take it: rename that ModuleDict key)"
    return f"torch.export could not trace the model{at}: {type(e).__name__}: {first}"


def user_frame(e: BaseException) -> str | None:
    """The innermost traceback line in the user's code (not torch's nor ours),
    as FILE:LINE: code."""
    ours = Path(__file__).resolve().parents[1]
    torch_dir = Path(torch.__file__).resolve().parent
    found = None
    for frame in traceback.extract_tb(e.__traceback__):
        path = Path(frame.filename).resolve()
        if torch_dir in path.parents or (ours in path.parents and "examples" not in path.parts) or frame.filename.startswith("<"):
            continue
        found = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return found


def drop_checks(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove the graph's metadata checks (`_assert_tensor_metadata` and other
    ops that return nothing and change nothing): they check the
    single-device program's shapes, which a shard does not have."""
    dead = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and not n.users
        and not n.target._schema.returns
        and not n.target._schema.is_mutable
    ]
    for n in dead:
        gm.graph.erase_node(n)
    if dead:
        gm.graph.lint()
        gm.recompile()
    return gm


def lift(ep: ExportedProgram) -> Captured:
    """Convert an ExportedProgram's graph into frozen IR nodes."""
    sig = ep.graph_signature
    bad = [o.kind.name for o in sig.output_specs if o.kind is not OutputKind.USER_OUTPUT]
    if bad:
        raise CaptureError(f"the model mutates state during forward ({bad}); dtplan plans pure programs")
    roles = {spec.arg.name: _placeholder_role(spec) for spec in sig.input_specs if hasattr(spec.arg, "name")}
    return lift_graph(drop_checks(ep.graph_module), roles, dict(ep.constants))


def lift_graph(
    gm: torch.fx.GraphModule,
    roles: Mapping[str, tuple[Role, str | None]],
    constants: Mapping[str, torch.Tensor],
    *,
    costs: Mapping[str, tuple[int, int]] | None = None,
    **extra,
) -> Captured:
    """Frozen IR nodes for every node of an ATen graph whose placeholders have `roles`.

    `costs` optionally gives nodes' (flops, bytes) by name, known already
    (`dtplan.ir.stamp` copies them from the node a node was stamped from)."""
    nodes: list[Node] = []
    placeholders: list[tuple[str, Role, str | None]] = []
    out_names: tuple[str, ...] = ()
    for fx_node in gm.graph.nodes:
        if fx_node.op == "placeholder":
            role, fqn = roles[fx_node.name]
            val = fx_node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise CaptureError(f"input {fx_node.name!r} is not a tensor ({type(val).__name__}); dtplan takes tensor inputs")
            placeholders.append((fx_node.name, role, fqn))
            nodes.append(Node(fx_node.name, None, (), (), TensorMeta.of(val), role, fqn=fqn))
        elif fx_node.op == "call_function":
            nodes.append(_lift_call(fx_node, costs.get(fx_node.name) if costs else None))
        elif fx_node.op == "output":
            out_names = tuple(_output_names(fx_node.args[0]))
        else:
            raise CaptureError(f"unsupported fx node {fx_node.format_node()}")
    if not any(n.module for n in nodes):
        nodes = _modules_from_parameters(nodes)
    user_inputs = tuple(n for n, role, _ in placeholders if role is Role.INPUT)
    return Captured(gm, Graph(tuple(nodes), out_names), tuple(placeholders), user_inputs, dict(constants), **extra)


def _modules_from_parameters(nodes: list[Node]) -> list[Node]:
    """AOT joint graphs carry no module stack: attribute each op to the module
    of a parameter it reads (directly or through views of it), else to the
    module of its most recently produced input. Forward and backward matmuls
    of a layer then both name that layer, and so do the ops between them (a
    residual add, a rotary product reading a root buffer): every copy of a
    repeated layer gets the same ops, which is what folding matches."""
    module: dict[str, str] = {}
    order: dict[str, int] = {}
    from_param: set[str] = set()
    out = []
    for i, n in enumerate(nodes):
        order[n.name] = i
        refs = n.refs()
        if n.fqn is not None and n.role in (Role.PARAM, Role.BUFFER):
            module[n.name] = n.fqn.rpartition(".")[0]
            from_param.add(n.name)
            out.append(dataclasses.replace(n, module=module[n.name]))
            continue
        params = [module[r] for r in refs if r in from_param and module[r]]
        latest = sorted((r for r in refs if module.get(r)), key=order.__getitem__, reverse=True)
        m = params[0] if params else (module[latest[0]] if latest else "")
        if params and len(refs) == 1 and (getattr(n.target, "is_view", False) or n.op_name in _PARAM_VIEWS):
            from_param.add(n.name)
        module[n.name] = m
        out.append(dataclasses.replace(n, module=m))
    return out


_PARAM_VIEWS = ("aten.t.default", "aten.detach.default")


class _TrainStep(torch.nn.Module):
    """loss_fn(model(*inputs), *inputs) as one module, so AOT autograd traces
    forward and backward together."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], precision: Precision) -> None:
        super().__init__()
        self.m = model
        self.loss_fn = loss_fn
        self.precision = precision

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (training_loss(self.m, self.loss_fn, inputs, self.precision),)


def training_loss(model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], inputs: tuple, precision: Precision) -> torch.Tensor:
    """The loss a training step computes (the single-device reference calls it
    too): under a mixed policy, a float32 loss of the outputs computed in the
    parameter dtype."""
    loss = loss_fn(call_with_precision(model, inputs, precision), *inputs)
    return loss.float() if precision.mixed else loss


def fake_build(build: Callable[[], tuple[torch.nn.Module, tuple]]) -> tuple[torch.nn.Module, tuple]:
    """`build()` under a FakeTensorMode: a model and inputs with shapes but no
    memory, for planning training steps (meta tensors cannot be traced
    through autograd here; fake ones can).

    Some constructors read a value they compute (timm's drop-path schedule
    calls `.item()`), which fake tensors cannot give: those are built on the
    meta device, whose tensors then become fake CPU tensors."""
    try:
        with FakeTensorMode():
            return build()
    except Exception:  # noqa: BLE001 - a constructor fake tensors cannot run: try meta
        pass
    with torch.device("meta"):
        model, inputs = build()
    mode = FakeTensorMode()
    fake = lambda t: mode.fake_tensor_converter.from_meta_and_device(mode, t.to("meta"), torch.device("cpu"))  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(fake(p.data), requires_grad=p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                module._buffers[name] = fake(b)
    return model, tuple(fake(t) if isinstance(t, torch.Tensor) else t for t in inputs)


def capture_training(
    model: torch.nn.Module, example_inputs: tuple, loss_fn: Callable[..., torch.Tensor], precision: Precision | str | None = None
) -> Captured:
    """The joint forward+backward graph of `loss_fn(model(*inputs), *inputs)`.

    The step is exported first (`torch.export`, non-strict: library code that
    asks whether it is being traced sees a trace), then AOT autograd traces
    the joint graph of that exported program, so anything that exports also
    trains. Works on real tensors and on fake ones (`fake_build`).

    Graph outputs are the loss, then one gradient per trainable parameter the
    loss reaches (`Captured.gradients` maps each to its parameter's
    placeholder), then the new value of every buffer the step updates
    (`Captured.updates`: batch norm's running statistics). A parameter the
    loss never reaches gets no gradient and, as in eager PyTorch, no update.
    Tied parameters (one tensor under several names) are one placeholder
    whose gradient sums every use.

    `dtplan.ir.stamp.capture_training_stamped` gives the same graph from a
    trace of a few of the model's repeated layers (time nearly independent
    of depth).
    """
    t0 = time.perf_counter()
    if not any(p.requires_grad for p in model.parameters()):
        raise CaptureError("the model has no trainable parameters; there is nothing to train")
    precision = Precision.parse(precision)
    precision.require_trainable()
    step = _TrainStep(model, loss_fn, precision)
    try:
        # export finds the fake mode of fake inputs itself; the joint is traced under it
        with contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(step, tuple(example_inputs), strict=False)
            joint = _joint(ep, step)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with a one-line cause
        raise CaptureError(_explain_export_failure(e, model)) from e
    gm, roles, gradients, updates = joint
    if precision.mixed:
        casts_at_first_use(gm)
        gradient_casts_when_ready(gm, gradients)
        gm, gradients, updates = _renumbered(gm, gradients, updates)
    lifted = {s.target for s in ep.graph_signature.input_specs if s.kind is InputKind.CONSTANT_TENSOR}
    constants = {k.removeprefix("m."): v for k, v in ep.constants.items() if k in lifted}
    captured = lift_graph(gm, roles, constants, gradients=gradients, updates=updates, seconds=time.perf_counter() - t0, precision=precision)
    loss = captured.graph[captured.graph.outputs[0]].tensor_meta
    if loss is None or loss.numel != 1:
        shape = None if loss is None else list(loss.shape)
        raise CaptureError(f"loss_fn must return a scalar; it returned a tensor of shape {shape}")
    return captured


def _joint(ep: ExportedProgram, step: torch.nn.Module):
    """AOT autograd's joint graph of an exported training step.

    Returns the graph (outputs reordered to loss, gradients, buffer updates),
    placeholder roles, gradient -> parameter placeholder and buffer update ->
    buffer placeholder."""
    gm = ep.graph_module
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    if sum(1 for s in ep.graph_signature.output_specs if s.kind is OutputKind.USER_OUTPUT) != 1:
        raise CaptureError("the training step must return the loss only")
    _merge_tied(gm, specs, step)
    reached = _reaching_loss(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake = detect_fake_mode([n.meta["val"] for n in placeholders])
    strip = lambda fqn: fqn.removeprefix("m.")  # noqa: E731 - the _TrainStep wrapper's prefix
    args, roles = [], {}
    with fake if fake is not None else contextlib.nullcontext():
        for n in placeholders:
            spec = specs[n.name]
            role, fqn = _placeholder_role(spec)
            trainable = role is Role.PARAM and n in reached and step.get_parameter(spec.target).requires_grad
            args.append(n.meta["val"].detach().clone().requires_grad_(trainable))
            roles[n.name] = (role, None if fqn is None else strip(fqn))
        joint, sig = aot_export_module(gm, args, trace_joint=True, output_loss_index=0, decompositions=TRAINING_DECOMPOSITIONS)
    drop_checks(joint)
    for n in [n for n in joint.graph.nodes if n.target is torch.ops.aten.alias.default]:
        n.replace_all_uses_with(n.args[0])  # identity views AOT autograd leaves around saved values
        joint.graph.erase_node(n)
    joint.graph.eliminate_dead_code()
    # aot names its placeholders arg<i>_1, in order
    new_names = [n.name for n in joint.graph.nodes if n.op == "placeholder"]
    rename = dict(zip(new_names, (n.name for n in placeholders), strict=True))
    roles = {new: roles[old] for new, old in rename.items()}
    gradients = dict(sig.backward_signature.gradients_to_user_inputs)
    updates = dict(sig.user_inputs_to_mutate)
    out = joint.graph.output_node()
    outs = list(out.args[0])
    loss = outs[len(updates)]
    grads = [o for o in outs if isinstance(o, torch.fx.Node) and o.name in gradients]
    news = outs[: len(updates)]
    out.args = ((loss, *grads, *news),)
    joint.graph.lint()
    joint.recompile()
    return joint, roles, {g.name: gradients[g.name] for g in grads}, {u.name: updates[u.name] for u in news}


def _merge_tied(gm: torch.fx.GraphModule, specs: Mapping[str, object], step: torch.nn.Module) -> None:
    """One placeholder per parameter tensor: export lifts a tied parameter
    once per name, but the graph reads only one of them, and the gradient of
    every use belongs to the one tensor."""
    first: dict[int, torch.fx.Node] = {}
    for n in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        spec = specs[n.name]
        if spec.kind is not InputKind.PARAMETER:
            continue
        key = id(step.get_parameter(spec.target))
        if key in first:
            n.replace_all_uses_with(first[key])
            gm.graph.erase_node(n)
        else:
            first[key] = n
    gm.graph.lint()
    gm.recompile()


def _reaching_loss(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes with a differentiable path to the loss (the first output): the
    path is cut at integer and boolean values and at `detach`."""
    loss = gm.graph.output_node().args[0]
    loss = loss[0] if isinstance(loss, (tuple, list)) else loss
    seen: set[torch.fx.Node] = set()
    todo = [loss]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in _NO_GRAD:
            continue
        for a in n.all_input_nodes:
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor) and not (val.is_floating_point() or val.is_complex()):
                continue
            todo.append(a)
    return seen


_NO_GRAD = (torch.ops.aten.detach.default,)


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


def _lift_call(fx_node: torch.fx.Node, cost: tuple[int, int] | None = None) -> Node:
    target = fx_node.target
    if target is not operator.getitem and not isinstance(target, torch._ops.OpOverload):
        raise CaptureError(f"unsupported call {fx_node.format_node()} (not an ATen op)")
    meta = _meta_of(fx_node)
    if cost is not None:
        flops, nbytes = cost
    else:
        flops, nbytes = (0, 0) if target is operator.getitem else node_cost(fx_node)
    return Node(
        name=fx_node.name,
        target=target,
        args=to_ref(tuple(fx_node.args)),
        kwargs=tuple((k, to_ref(v)) for k, v in fx_node.kwargs.items()),
        meta=meta,
        role=Role.ACTIVATION,
        module=_module_path(fx_node),
        flops=flops,
        bytes=nbytes,
    )
