"""Stamped capture: the joint training graph of an L-layer stack from a 3-layer trace.

Tracing a training step with AOT autograd costs about the same per layer
(~0.3 s per Llama-8B layer on fake tensors; 80 layers for 70B), yet the
layers of a transformer stack trace to the same ATen ops. `capture_training_stamped`
traces the model with its stack of repeated blocks cut down to its first `keep`
blocks (3 by default: a first, an interior and a last block), then builds the
L-layer joint fx graph by repeating the interior block's forward node segment
and backward node segment, and lifts it into the same `Captured` as
`dtplan.ir.capture.capture_training` (same node names, placeholders, roles, FQNs,
outputs, gradient mapping and, through `lift_graph`, module paths, FLOPs and
bytes).

API::

    captured = capture_training_stamped(model, example_inputs, loss_fn)   # keep=3, check=True

It falls back to the full `capture_training` (saying why in a debug log of
`dtplan.ir.stamp`) whenever it cannot identify or verify the structure; with
`fallback=False` it raises `StampError` instead.

Method
------
1. *The stack* (`find_stack`). The model's `nn.ModuleList` with the most
   blocks (at least `keep + 1`) whose blocks are all of one class with the
   same parameter and buffer names, shapes, dtypes and `requires_grad`,
   owning no tensor another module owns. Its `_modules` is cut to the first
   `keep` entries while tracing and restored afterwards (the model is
   otherwise untouched).
2. *Segments* (`_BlockTrace.segment`, giving a frozen `Segments`). In the
   k-layer joint graph (k = `keep`) the forward runs `A B0 B1 .. Bk-1 M` and
   the backward `Ek-1 .. E1 E0 Z`, where `Bi`/`Ei` (forward/backward window
   i) are block i's forward/backward nodes, contiguous windows in trace
   order. The forward period is the distance between the first reads of
   layer 1's and layer 2's parameters, the backward period the distance
   between the last gradient outputs of two interior-fed blocks (E0 and E1
   for k = 3, E1 and E2 for k >= 4). The start of B1 (forward start) and of
   E1 (backward start) are chosen among the offsets where the fewest values
   cross the cut (at a block boundary: the residual stream or its gradient,
   plus shared tables such as rotary cos/sin), each candidate verified as
   below; the first that verifies is kept.
3. *Relative form.* Every argument a block node reads is classified relative
   to its block: `self` (same window, offset), `prev` (the block executed just
   before: `Bi-1`, or `Ei+1` for backward), `fwd` (backward reading its own
   layer's forward window), `in` (backward reading an input of its layer's
   forward window, keyed by where that window reads it), `param` (its own
   layer's parameter or buffer, by FQN suffix) or `ext` (a shared value from
   the prologue, the middle or a placeholder). Anything else fails.
4. *Verification (soundness).* `B2` (fed by an interior block) must equal
   `B1` (fed by the first block) in relative form, op for op, with equal
   constant arguments and equal value metadata (shape, stride, storage
   offset, dtype); for the backward, `E0` (fed by an interior block's
   gradient) must equal `E1` (fed by the last block's gradient); with
   `keep >= 4`, `Ej` must equal `Ej+1` for the interior j, and the first
   block's backward may differ (say its input needs no gradient). Tracing
   is deterministic and a block's trace depends only on what it reads, so a
   block fed by an interior block traces like the interior template (`B1`
   and `E1` in relative form: `Segments.forward_template` and
   `backward_template`): by induction every interior block of the L-layer
   trace is the template under renaming, while the prologue, first block,
   last block, middle, the first block's backward and the epilogue are
   those of the k-layer trace with their reads re-pointed (reads are only
   allowed into the first two or the last two blocks, counted from the
   reader's end). When k = `keep` blocks do not verify, k + 1 are traced
   and tried once.
5. *Build* (`_GraphBuilder`). A fresh fx graph, nodes created in the real
   trace's order with the base of their original names (`mul`, `t`, ...),
   so fx numbers them exactly as a real trace does; placeholders `arg{i}_1`
   in parameter, buffer, input order with layer j's FQNs `stack.j.rest` and
   fresh fake tensors from the same FakeTensorMode; op nodes share their
   template's meta (fake values included) and its FLOPs and bytes. Outputs:
   the loss then the gradients in parameter order; `Captured.gradients` maps
   them to their parameters.
6. *Self-checks.* The build for L = k must reproduce the k-layer graph
   exactly (names, ops, arguments, metadata, IR nodes) - this checks the
   naming scheme and the segmentation; with `check=True` (default) the model
   is also traced at k + 1 blocks and the build for L = k + 1 must equal it
   exactly, placeholders' roles and FQNs and the gradient mapping included.
   That catches what the relative form cannot see, such as a forward that
   reads `len(self.layers)` or a layer index, at the price of one more small
   trace (about 1.3 s for Llama-8B; `check=False` skips it).

Limitations: one stack per model (the longest); its blocks must run in
order, once each, inside the traced step; the model is mutated (its stack
cut short) while tracing, so it must not be used concurrently; op nodes of
different layers share their fake values in `meta['val']` (shapes, strides
and dtypes are right; storage identity across layers means nothing), and
their `stack_trace`/`torch_fn` metadata is the template's.

Code: this module finds the stack, drives the traces and runs the
self-checks; `dtplan.ir.stamp_segments` indexes a k-block trace and finds its
verified windows (`Segments`); `dtplan.ir.stamp_build` builds the L-block
graph from them.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.fx.node import map_arg

from dtplan.ir.capture import Captured, CaptureError, capture_training
from dtplan.ir.precision import Precision
from dtplan.ir.stamp_build import _GraphBuilder
from dtplan.ir.stamp_segments import Segments, StampError, _BlockTrace, _meta_key, _same

__all__ = ["StampError", "capture_training_stamped", "find_stack"]

log = logging.getLogger(__name__)


def capture_training_stamped(
    model: torch.nn.Module,
    example_inputs: tuple,
    loss_fn: Callable[..., torch.Tensor],
    *,
    keep: int = 3,
    check: bool = True,
    fallback: bool = True,
    precision: Precision | str | None = None,
) -> Captured:
    """`capture_training(model, example_inputs, loss_fn)` built from a trace of
    the first `keep` blocks of the model's layer stack (see the module
    docstring). Falls back to the full capture when the stack cannot be
    stamped (or raises `StampError` with `fallback=False`)."""
    t0 = time.perf_counter()
    Precision.parse(precision).require_trainable()  # before the stamp's fallback could swallow it
    try:
        captured = _stamped(model, tuple(example_inputs), loss_fn, keep, check, Precision.parse(precision))
    except StampError as e:
        if not fallback:
            raise
        log.debug("stamped capture not used, capturing every layer: %s", e)
        return capture_training(model, example_inputs, loss_fn, precision)
    captured = dataclasses.replace(captured, seconds=time.perf_counter() - t0)
    log.debug("stamped capture: %.3fs, %d nodes", captured.seconds, len(captured.graph))
    return captured


# --------------------------------------------------------------------------- stack


def find_stack(model: torch.nn.Module, keep: int = 3) -> tuple[str, torch.nn.ModuleList]:
    """The FQN and module of the longest ModuleList of identical blocks."""
    owners: dict[int, set[str]] = {}  # id of a parameter or buffer -> names of the modules owning it
    for name, mod in model.named_modules(remove_duplicate=False):
        for t in (*mod._parameters.values(), *mod._buffers.values()):
            if t is not None:
                owners.setdefault(id(t), set()).add(name)
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    why = "the model has no nn.ModuleList"
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        blocks = list(mod)
        if len(blocks) < keep + 1:
            why = f"{name or '<root>'} has {len(blocks)} blocks, stamping needs at least {keep + 1}"
            continue
        signature = _block_signature(blocks[0])
        if any(type(b) is not type(blocks[0]) or _block_signature(b) != signature for b in blocks[1:]):
            why = f"the blocks of {name or '<root>'} are not identical"
            continue
        if not signature[0]:
            why = f"the blocks of {name or '<root>'} have no parameters"
            continue
        prefixes = tuple(f"{name}.{i}" if name else str(i) for i in range(len(blocks)))
        if not _owned_by_one_block(blocks, prefixes, owners):
            why = f"the blocks of {name or '<root>'} share tensors with other modules"
            continue
        if best is None or len(blocks) > best[0]:
            best = (len(blocks), name, mod)
    if best is None:
        raise StampError(why)
    return best[1], best[2]


def _block_signature(block: torch.nn.Module) -> tuple:
    params = tuple((n, tuple(p.shape), tuple(p.stride()), p.dtype, p.requires_grad) for n, p in block.named_parameters())
    buffers = tuple((n, tuple(b.shape), tuple(b.stride()), b.dtype) for n, b in block.named_buffers())
    return params, buffers


def _owned_by_one_block(blocks, prefixes, owners) -> bool:
    for block, prefix in zip(blocks, prefixes, strict=True):
        for mod in block.modules():
            for t in (*mod._parameters.values(), *mod._buffers.values()):
                if t is not None and any(o != prefix and not o.startswith(prefix + ".") for o in owners[id(t)]):
                    return False
    return True


@contextmanager
def _gc_paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def _truncated(stack: torch.nn.ModuleList, n: int) -> Iterator[None]:
    saved = stack._modules
    stack._modules = type(saved)(list(saved.items())[:n])
    try:
        yield
    finally:
        stack._modules = saved


# --------------------------------------------------------------------------- driver


def _stamped(model, example_inputs, loss_fn, keep: int, check: bool, precision: Precision) -> Captured:
    """Trace the first blocks, segment, self-check and build every layer (or raise `StampError`)."""
    if keep < 3:
        raise StampError(f"keep must be at least 3 (a first, an interior and a last block), got {keep}")
    stack_name, stack = find_stack(model, keep)
    layers = len(stack)
    captures: dict[int, Captured] = {}  # block count -> the capture of the model cut to that many blocks

    def capture(blocks: int) -> Captured:
        if blocks not in captures:
            try:
                with _truncated(stack, blocks):
                    captures[blocks] = capture_training(model, example_inputs, loss_fn, precision)
            except CaptureError as e:
                raise StampError(f"capturing {blocks} blocks failed: {e}") from e
        return captures[blocks]

    trace, segments = _segmented_trace(capture, stack_name, keep, layers)
    k = trace.blocks
    t0 = time.perf_counter()
    # self-check 1: the build for L = k reproduces the traced graph exactly
    difference = _compare(_GraphBuilder(trace, segments, k).build(), trace.captured)
    if difference:
        raise StampError(f"the {k}-block rebuild differs from the trace: {difference}")
    # self-check 2: the build for k + 1 equals a real (k + 1)-block trace
    if check and layers == k + 1:
        return capture(k + 1)  # that trace is the whole model
    if check:
        difference = _compare(_GraphBuilder(trace, segments, k + 1).build(), capture(k + 1))
        if difference:
            raise StampError(f"the stamped {k + 1}-block graph differs from a real trace: {difference}")
    with _gc_paused():  # tens of thousands of new objects; collections would re-scan them all
        out = _GraphBuilder(trace, segments, layers).build()
    log.debug("stamped %s from %d to %d blocks in %.3fs", stack_name or "<root>", k, layers, time.perf_counter() - t0)
    return out


def _segmented_trace(
    capture: Callable[[int], Captured], stack_name: str, keep: int, layers: int
) -> tuple[_BlockTrace, Segments]:
    """The trace of the first `keep` blocks and its segments; if they do not
    verify (say the first block's backward differs: its input needs no
    gradient), once more with one block more."""
    failures: list[str] = []
    for blocks in (keep, keep + 1):
        if layers < blocks + 1:  # (find_stack made sure of keep + 1)
            break
        captured = capture(blocks)  # (a failed capture is not retried)
        try:
            trace = _BlockTrace(captured, stack_name, blocks)
            return trace, trace.segment()
        except StampError as e:
            failures.append(f"from {blocks} blocks: {e}")
    raise StampError("; ".join(failures))


def _compare(a: Captured, b: Captured) -> str | None:
    """None when two captures are the same program with the same names; else the first difference."""
    an, bn = list(a.gm.graph.nodes), list(b.gm.graph.nodes)
    if len(an) != len(bn):
        return f"{len(an)} fx nodes against {len(bn)}"
    for x, y in zip(an, bn, strict=True):
        if (x.op, x.name, x.target) != (y.op, y.name, y.target):
            return f"node {x.format_node()} against {y.format_node()}"
        if not _same(_named(x.args), _named(y.args)) or not _same(_named(x.kwargs), _named(y.kwargs)):
            return f"arguments of {x.format_node()} against {y.format_node()}"
        if _meta_key(x.meta.get("val")) != _meta_key(y.meta.get("val")):
            return f"metadata of {x.name}"
    if a.placeholders != b.placeholders:
        return "placeholder roles or FQNs"
    if dict(a.gradients) != dict(b.gradients):
        return "gradient mapping"
    if a.graph.outputs != b.graph.outputs:
        return "outputs"
    for x, y in zip(a.graph, b.graph, strict=True):
        if x != y:  # IR: refs, TensorMeta, role, FQN, module path, FLOPs, bytes
            return f"IR node {x.name}"
    return None


def _named(args):
    return map_arg(args, lambda n: ("node", n.name))


