"""Stamped capture: the joint training graph of an L-layer stack from a 3-layer trace.

Tracing a training step with AOT autograd costs about the same per layer
(~0.3 s per Llama-8B layer on fake tensors; 80 layers for 70B), yet the
layers of a transformer stack trace to the same ATen ops. `capture_training_stamped`
traces the model with its stack of repeated blocks cut down to its first `keep`
blocks (3 by default: a first, an interior and a last block), then builds the
L-layer joint fx graph by repeating the interior block's forward node segment
and backward node segment, and lifts it into the same `Captured` as
`ir.capture.capture_training` (same node names, placeholders, roles, FQNs,
outputs, gradient mapping and, through `_lift_graph`, module paths, FLOPs and
bytes).

API::

    captured = capture_training_stamped(model, example_inputs, loss_fn)   # keep=3, check=True
    captured = capture_training(model, example_inputs, loss_fn, stamp=True)  # the same, from ir.capture

It falls back to the full `capture_training` (saying why in a debug log of
`ir.stamp`) whenever it cannot identify or verify the structure; with
`fallback=False` it raises `StampError` instead.

Method
------
1. *The stack.* The model's `nn.ModuleList` with the most blocks (at least
   `keep + 1`) whose blocks are all of one class with the same parameter and
   buffer names, shapes, dtypes and `requires_grad`, owning no tensor another
   module owns. Its `_modules` is cut to the first `keep` entries while
   tracing and restored afterwards (the model is otherwise untouched).
2. *Segments.* In the k-layer joint graph (k = `keep`) the forward runs
   `A B0 B1 .. Bk-1 M` and the backward `Ek-1 .. E1 E0 Z`, where `Bi`/`Ei` are
   block i's forward/backward nodes, contiguous windows in trace order. The
   forward period P is the distance between the first reads of layer 1's and
   layer 2's parameters, the backward period Q the distance between the last
   gradient outputs of two interior-fed blocks (E0 and E1 for k = 3, E1 and
   E2 for k >= 4). A window start is chosen among the offsets where the
   fewest values cross the cut (at a block boundary: the residual stream or
   its gradient, plus shared tables such as rotary cos/sin), each candidate
   verified as below.
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
   block fed by an interior block traces like the interior template: by
   induction every interior block of the L-layer trace is the template
   under renaming, while the prologue, first block, last block, middle, the
   first block's backward and the epilogue are those of the k-layer trace
   with their reads re-pointed (reads are only allowed into the first two
   or the last two blocks, counted from the reader's end). When k = `keep`
   blocks do not verify, k + 1 are traced and tried once.
5. *Build.* A fresh fx graph, nodes created in the real trace's order with
   the base of their original names (`mul`, `t`, ...), so fx numbers them
   exactly as a real trace does; placeholders `arg{i}_1` in parameter,
   buffer, input order with layer j's FQNs `stack.j.rest` and fresh fake
   tensors from the same FakeTensorMode; op nodes share their template's
   meta (fake values included) and its FLOPs and bytes. Outputs: the loss
   then the gradients in parameter order; `Captured.gradients` maps them to
   their parameters.
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
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.fx.node import map_arg

from ir.capture import Captured, CaptureError, _lift_graph, capture_training
from ir.graph import Role

__all__ = ["StampError", "capture_training_stamped", "find_stack"]

log = logging.getLogger(__name__)


class StampError(RuntimeError):
    """The model's repeated blocks could not be identified or verified."""


def capture_training_stamped(
    model: torch.nn.Module,
    example_inputs: tuple,
    loss_fn: Callable[..., torch.Tensor],
    *,
    keep: int = 3,
    check: bool = True,
    fallback: bool = True,
) -> Captured:
    """`capture_training(model, example_inputs, loss_fn)` built from a trace of
    the first `keep` blocks of the model's layer stack (see the module
    docstring). Falls back to the full capture when the stack cannot be
    stamped (or raises `StampError` with `fallback=False`)."""
    t0 = time.perf_counter()
    try:
        captured = _stamped(model, tuple(example_inputs), loss_fn, keep, check)
    except StampError as e:
        if not fallback:
            raise
        log.debug("stamped capture not used, capturing every layer: %s", e)
        return capture_training(model, example_inputs, loss_fn)
    captured = dataclasses.replace(captured, seconds=time.perf_counter() - t0)
    log.debug("stamped capture: %.3fs, %d nodes", captured.seconds, len(captured.graph))
    return captured


# --------------------------------------------------------------------------- stack


def find_stack(model: torch.nn.Module, keep: int = 3) -> tuple[str, torch.nn.ModuleList]:
    """The FQN and module of the longest ModuleList of identical blocks."""
    owners: dict[int, set[str]] = {}
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
        sig = _block_signature(blocks[0])
        if any(type(b) is not type(blocks[0]) or _block_signature(b) != sig for b in blocks[1:]):
            why = f"the blocks of {name or '<root>'} are not identical"
            continue
        if not sig[0]:
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


def _stamped(model, example_inputs, loss_fn, keep: int, check: bool) -> Captured:
    if keep < 3:
        raise StampError(f"keep must be at least 3 (a first, an interior and a last block), got {keep}")
    name, stack = find_stack(model, keep)
    layers = len(stack)
    traced: dict[int, Captured] = {}

    def trace(n: int) -> Captured:
        if n not in traced:
            try:
                with _truncated(stack, n):
                    traced[n] = capture_training(model, example_inputs, loss_fn)
            except CaptureError as e:
                raise StampError(f"capturing {n} blocks failed: {e}") from e
        return traced[n]

    # keep blocks; if their segments do not verify (say the first block's
    # backward differs: its input needs no gradient), once more with one more
    stamp, why = None, ""
    for k in (keep, keep + 1):
        if layers < k + 1:  # (find_stack made sure of keep + 1)
            break
        small = trace(k)
        try:
            stamp = _Stamp(small, name, k)
            break
        except StampError as e:
            why = f"{why}; " * bool(why) + f"from {k} blocks: {e}"
    if stamp is None:
        raise StampError(why)
    t0 = time.perf_counter()
    # self-check 1: the build for L = k reproduces the traced graph exactly
    same = _compare(stamp.build(k), small)
    if same:
        raise StampError(f"the {k}-block rebuild differs from the trace: {same}")
    # self-check 2: the build for k + 1 equals a real (k + 1)-block trace
    if check and layers == k + 1:
        return trace(k + 1)  # that trace is the whole model
    if check:
        same = _compare(stamp.build(k + 1), trace(k + 1))
        if same:
            raise StampError(f"the stamped {k + 1}-block graph differs from a real trace: {same}")
    with _gc_paused():  # tens of thousands of new objects; collections would re-scan them all
        out = stamp.build(layers)
    log.debug("stamped %s from %d to %d blocks in %.3fs", name or "<root>", k, layers, time.perf_counter() - t0)
    return out


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


def _same(x, y) -> bool:
    """Structural equality that also tells 1 from True from 1.0."""
    if type(x) is not type(y):
        return False
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y, strict=True))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, float) and math.isnan(x):
        return math.isnan(y)
    return x == y


def _meta_key(val):
    if isinstance(val, torch.Tensor):
        return (tuple(val.shape), tuple(val.stride()), val.storage_offset(), val.dtype, val.device.type, val.requires_grad)
    if isinstance(val, (list, tuple)):
        return tuple(_meta_key(v) for v in val)
    return repr(val)


# --------------------------------------------------------------------------- analysis

_SUFFIX = re.compile(r"^(.*)_(\d+)$")
_ARG = re.compile(r"^arg(\d+)_1$")


def _base(name: str) -> str:
    m = _SUFFIX.match(name)
    return m.group(1) if m else name


@dataclasses.dataclass(frozen=True, slots=True)
class _R:
    """An argument of a block node, relative to its block (see the module docstring)."""

    kind: str  # self | prev | fwd | in | param | ext | bad
    key: object


def _flat(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    map_arg((node.args, node.kwargs), out.append)
    return out


class _Stamp:
    """The k-layer joint graph cut into regions and block windows, verified,
    and able to build the graph for any L >= k."""

    def __init__(self, small: Captured, stack: str, k: int) -> None:
        self.small, self.k = small, k
        self.gm = small.gm
        nodes = list(self.gm.graph.nodes)
        if nodes[-1].op != "output":
            raise StampError("the traced graph does not end with its output")
        self.output = nodes[-1]
        self.nodes = nodes[:-1]
        self.idx = {n: i for i, n in enumerate(self.nodes)}
        self.ph = [n for n in self.nodes if n.op == "placeholder"]
        self.nph = len(self.ph)
        if any(n.op != "call_function" for n in self.nodes[self.nph :]):
            raise StampError("the traced graph has placeholders after its first op or non-call nodes")
        if any(_ARG.match(p.name) is None or int(_ARG.match(p.name).group(1)) != i for i, p in enumerate(self.ph)):
            raise StampError("placeholders are not named arg<i>_1")
        # layer placeholders: (layer, suffix)
        pat = re.compile(rf"^{re.escape(stack + '.') if stack else ''}(\d+)\.(.+)$")
        self.prefix = stack + "." if stack else ""
        self.roles = {name: (role, fqn) for name, role, fqn in small.placeholders}
        self.layer_of: dict[torch.fx.Node, tuple[int, str]] = {}
        for p in self.ph:
            fqn = self.roles[p.name][1]
            m = pat.match(fqn) if fqn else None
            if m:
                self.layer_of[p] = (int(m.group(1)), m.group(2))
        self._check_placeholder_runs()
        self._by_name = {n.name: n for n in self.nodes}
        self.grad_of = {self._by_name[g]: self._by_name[p] for g, p in small.gradients.items()}
        self._check_output_runs()
        self._segment()

    def _check_output_runs(self) -> None:
        """Each block's gradients are one contiguous run of the outputs, blocks in order."""
        outs = self.output.args[0]
        if not isinstance(outs, (tuple, list)):
            raise StampError("the traced graph's output is not a tuple")
        layers = [self.layer_of.get(self.grad_of.get(o), (None,))[0] if isinstance(o, torch.fx.Node) else None for o in outs]
        runs = [li for pos, li in enumerate(layers) if li is not None and (pos == 0 or layers[pos - 1] != li)]
        if runs != list(range(self.k)):
            raise StampError("the blocks' gradients are not output block by block")

    def _check_placeholder_runs(self) -> None:
        """Layer placeholders come in runs layer 0, 1, .., k-1 with the same suffixes."""
        runs: list[tuple[int, list[str]]] = []
        for p in self.ph:
            li = self.layer_of.get(p)
            if li is None:
                runs.append((-1, []))
            elif runs and runs[-1][0] == li[0]:
                runs[-1][1].append(li[1])
            else:
                runs.append((li[0], [li[1]]))
        layer_runs = [r for r in runs if r[0] >= 0]
        if len(layer_runs) % self.k:
            raise StampError("the blocks' parameters are not laid out block by block")
        for g in range(0, len(layer_runs), self.k):
            group = layer_runs[g : g + self.k]
            if [r[0] for r in group] != list(range(self.k)) or any(r[1] != group[0][1] for r in group):
                raise StampError("the blocks' parameters are not laid out block by block")

    # ---- segmentation

    def _segment(self) -> None:
        k, idx = self.k, self.idx
        first_read = {}
        for n in self.nodes[self.nph :]:
            for a in _flat(n):
                if a in self.layer_of:
                    first_read.setdefault(self.layer_of[a][0], idx[n])
        last_grad: dict[int, int] = {}
        for g, p in self.grad_of.items():
            if p in self.layer_of:
                i = self.layer_of[p][0]
                last_grad[i] = max(last_grad.get(i, -1), idx[g])
        if set(first_read) != set(range(k)) or set(last_grad) != set(range(k)):
            raise StampError("not every block reads its parameters and has gradients")
        P = first_read[2] - first_read[1]
        # interior backward segments (k = 3: E0, fed by an interior block, stands in)
        Q = last_grad[0] - last_grad[1] if k == 3 else last_grad[1] - last_grad[2]
        if P <= 0 or Q <= 0 or any(first_read[i + 1] - first_read[i] != P for i in range(1, k - 1)) \
                or any(last_grad[i] - last_grad[i + 1] != Q for i in range(1, k - 2)):
            raise StampError("the blocks' forward or backward segments are not equally long")
        self.P, self.Q = P, Q
        why = "no cut of the forward segments verifies"
        for s in self._cuts(range(first_read[1] - P + 1, first_read[1] + 1), P, lower=self.nph + P):
            self.s = s
            fwd_bad = self._verify_forward()
            if fwd_bad:
                why = fwd_bad
                continue
            end_fwd = s + (k - 1) * P
            for t in self._cuts(range(last_grad[1] - Q + 1, last_grad[1] + 1), Q, lower=end_fwd + (k - 2) * Q, floor=end_fwd):
                self.t = t
                bad = self._verify_backward()
                if not bad:
                    log.debug("blocks: forward %d nodes from %s, backward %d nodes from %s", P, self.nodes[s].name, Q, self.nodes[t].name)
                    return
                why = bad
        raise StampError(why)

    def _cuts(self, candidates: range, period: int, *, lower: int, floor: int = 0, tries: int = 6) -> list[int]:
        """Window starts, fewest crossing values first (at most `tries`)."""
        scored = []
        for c in candidates:
            if c < lower or c + period > len(self.nodes):
                continue
            crossing = {a for n in self.nodes[c : c + period] for a in _flat(n) if a.op != "placeholder" and floor <= self.idx[a] < c}
            scored.append((len(crossing), c))
        return [c for _, c in sorted(scored)[:tries]]

    def fwin(self, i: int) -> range:
        return range(self.s + (i - 1) * self.P, self.s + i * self.P)

    def bwin(self, i: int) -> range:
        return range(self.t + (1 - i) * self.Q, self.t + (2 - i) * self.Q)

    @property
    def a_end(self) -> int:
        return self.fwin(0).start

    @property
    def m_range(self) -> range:
        return range(self.fwin(self.k - 1).stop, self.bwin(self.k - 1).start)

    @property
    def z_range(self) -> range:
        """The first block's backward and the epilogue: built as they are,
        reading the blocks near the start (E0 may differ from the others,
        e.g. when the first block's input needs no gradient)."""
        return range(self.bwin(1).stop, len(self.nodes))

    def _is_shared(self, a: torch.fx.Node) -> bool:
        """A value every block may read as the same node: a non-layer
        placeholder, a prologue node or a middle node."""
        if a.op == "placeholder":
            return a not in self.layer_of
        i = self.idx[a]
        return i < self.a_end or i in self.m_range

    def classify_fwd(self, i: int, a: torch.fx.Node):
        j = self.idx[a]
        if j in self.fwin(i):
            return _R("self", j - self.fwin(i).start)
        if i > 0 and j in self.fwin(i - 1):
            return _R("prev", j - self.fwin(i - 1).start)
        if self.layer_of.get(a, (None,))[0] == i:
            return _R("param", self.layer_of[a][1])
        if (a.op == "placeholder" and a not in self.layer_of) or j < self.a_end:
            return _R("ext", a.name)
        return _R("bad", a.name)

    def inputs_of(self, i: int) -> dict[torch.fx.Node, tuple[int, int]]:
        """Values forward window i reads from outside itself (not its own
        parameters), keyed by (offset, flat argument position) of the first read."""
        win, out = self.fwin(i), {}
        for o, j in enumerate(win):
            for p, a in enumerate(_flat(self.nodes[j])):
                if a in self.layer_of or (a.op != "placeholder" and self.idx[a] in win):
                    continue
                out.setdefault(a, (o, p))
        return out

    def classify_bwd(self, i: int, a: torch.fx.Node, ins: dict):
        j = self.idx[a]
        if j in self.bwin(i):
            return _R("self", j - self.bwin(i).start)
        if i + 1 < self.k and j in self.bwin(i + 1):
            return _R("prev", j - self.bwin(i + 1).start)
        if j in self.fwin(i):
            return _R("fwd", j - self.fwin(i).start)
        if a in ins:
            return _R("in", ins[a])
        if self.layer_of.get(a, (None,))[0] == i:
            return _R("param", self.layer_of[a][1])
        if self._is_shared(a):
            return _R("ext", a.name)
        return _R("bad", a.name)

    def _relative(self, nodes, classify):
        return [
            (n.target, map_arg(n.args, classify), map_arg(n.kwargs, classify), _meta_key(n.meta.get("val")))
            for n in nodes
        ]

    def _verify_forward(self) -> str | None:
        k = self.k
        if self.fwin(0).start < self.nph or self.fwin(k - 1).stop > len(self.nodes):
            return "the forward windows do not fit the graph"
        rel = {i: self._relative([self.nodes[j] for j in self.fwin(i)], lambda a, i=i: self.classify_fwd(i, a)) for i in range(1, k)}
        for i in range(1, k - 1):
            bad = _first_difference(rel[i], rel[i + 1])
            if bad is not None:
                return f"forward block {i + 1} differs from block {i} at offset {bad}"
        self.fwd_template = rel[1]
        return None

    def _verify_backward(self) -> str | None:
        k = self.k
        last = self.bwin(0 if k == 3 else 1).stop
        if self.bwin(k - 1).start < self.fwin(k - 1).stop or last > len(self.nodes):
            return "the backward windows do not fit the graph"
        ins = {i: self.inputs_of(i) for i in range(k)}
        pairs = [(0, 1)] if k == 3 else [(j, j + 1) for j in range(1, k - 2)]
        rel = {i: self._relative([self.nodes[j] for j in self.bwin(i)], lambda a, i=i: self.classify_bwd(i, a, ins[i])) for i in {1, *(i for p in pairs for i in p)}}
        for lo, hi in pairs:
            bad = _first_difference(rel[hi], rel[lo])
            if bad is not None:
                return f"backward block {lo} differs from block {hi} at offset {bad}"
        self.bwd_template = rel[1]
        # every layer gradient of the template layer lies in its backward window
        for g, p in self.grad_of.items():
            if self.layer_of.get(p, (None,))[0] == 1 and self.idx[g] not in self.bwin(1):
                return f"the gradient {g.name} of {self.roles[p.name][1]} is outside its block's backward segment"
        return None

    # ---- build

    def build(self, L: int) -> Captured:
        """The joint graph for L blocks, lifted (L >= k)."""
        if L < self.k:
            raise StampError(f"cannot stamp fewer blocks ({L}) than were traced ({self.k})")
        k, nodes = self.k, self.nodes
        g = torch.fx.Graph()
        g._codegen = self.gm.graph._codegen
        env: dict[torch.fx.Node, torch.fx.Node] = {}  # original fixed nodes -> new
        fwd: list[list[torch.fx.Node | None]] = [[None] * self.P for _ in range(L)]
        bwd: list[list[torch.fx.Node | None]] = [[None] * self.Q for _ in range(L)]
        lph: dict[tuple[int, str], torch.fx.Node] = {}
        roles: dict[str, tuple[Role, str | None]] = {}

        def new_layer(i: int, anchor: str) -> int:
            if anchor == "start":
                if i > 1:
                    raise StampError(f"a node near the start reads block {i}")
                return i
            if i < k - 2:
                raise StampError(f"a node near the end reads block {i}")
            return L - k + i

        def window_of(a: torch.fx.Node):
            j = self.idx[a]
            for i in range(k):
                if j in self.fwin(i):
                    return fwd, i, j - self.fwin(i).start
                if i > 0 and j in self.bwin(i):  # E0 is part of the epilogue
                    return bwd, i, j - self.bwin(i).start
            return None

        def remap(anchor: str):
            def f(a: torch.fx.Node) -> torch.fx.Node:
                if a in env:
                    return env[a]
                if a in self.layer_of:
                    i, rest = self.layer_of[a]
                    return lph[(new_layer(i, anchor), rest)]
                w = window_of(a)
                if w is None:
                    raise StampError(f"{a.name} is read before it is built")
                table, i, o = w
                got = table[new_layer(i, anchor)][o]
                if got is None:
                    raise StampError(f"{a.name} is read before it is built")
                return got

            return f

        lifted = self.small.graph
        costs: dict[str, tuple[int, int]] = {}

        def copy(n: torch.fx.Node, args, kwargs) -> torch.fx.Node:
            new = g.create_node(n.op, n.target, args, kwargs, name=_base(n.name), type_expr=n.type)
            new.meta = dict(n.meta)
            ir = lifted[n.name]
            costs[new.name] = (ir.flops, ir.bytes)  # same op on the same metadata
            return new

        # placeholders: layer runs of block 1 stand for blocks 1 .. L-2
        count = 0

        def placeholder(template: torch.fx.Node, fqn: str | None, fresh: bool) -> torch.fx.Node:
            nonlocal count
            new = g.placeholder(f"arg{count}_1", type_expr=template.type)
            count += 1
            new.meta = dict(template.meta)
            val = template.meta.get("val")
            if fresh and isinstance(val, torch.Tensor) and getattr(val, "fake_mode", None) is not None:
                with val.fake_mode:
                    new.meta["val"] = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device).requires_grad_(val.requires_grad)
            roles[new.name] = (self.roles[template.name][0], fqn)
            return new

        ph = self.ph
        for pos, p in enumerate(ph):
            li = self.layer_of.get(p)
            if li is None:
                env[p] = placeholder(p, self.roles[p.name][1], False)
                continue
            i, rest = li
            if i == 0:
                lph[(0, rest)] = placeholder(p, self.roles[p.name][1], False)
            elif i == k - 1:
                lph[(L - 1, rest)] = placeholder(p, f"{self.prefix}{L - 1}.{rest}", L - 1 != k - 1)
            elif i == 1 and (pos == 0 or self.layer_of.get(ph[pos - 1], (None,))[0] != 1):
                run = []
                for q in ph[pos:]:
                    if self.layer_of.get(q, (None,))[0] != 1:
                        break
                    run.append(q)
                for j in range(1, L - 1):
                    for q in run:
                        r = self.layer_of[q][1]
                        lph[(j, r)] = placeholder(q, f"{self.prefix}{j}.{r}", j != 1)

        def fixed(rng: range, anchor: str, table=None, layer: int | None = None) -> None:
            f = remap(anchor)
            for o, j in enumerate(rng):
                n = nodes[j]
                new = copy(n, map_arg(n.args, f), map_arg(n.kwargs, f))
                if table is None:
                    env[n] = new  # shared: prologue, middle, epilogue
                else:
                    table[layer][o] = new  # block nodes are found through their window

        def instantiate(template, rng: range, table, j: int, resolve) -> None:
            for o, (n, rel) in enumerate(zip((nodes[x] for x in rng), template, strict=True)):
                _, rargs, rkwargs, _ = rel
                table[j][o] = copy(n, _resolve(rargs, resolve), _resolve(rkwargs, resolve))

        fixed(range(self.nph, self.a_end), "start")
        fixed(self.fwin(0), "start", fwd, 0)

        for j in range(1, L - 1):
            def res_f(c, j=j):
                kind, key = c.kind, c.key
                if kind == "self":
                    return fwd[j][key]
                if kind == "prev":
                    return fwd[j - 1][key]
                if kind == "param":
                    return lph[(j, key)]
                return env[self._by_name[key]]

            instantiate(self.fwd_template, self.fwin(1), fwd, j, res_f)
        fixed(self.fwin(k - 1), "end", fwd, L - 1)
        fixed(self.m_range, "end")
        fixed(self.bwin(k - 1), "end", bwd, L - 1)

        for j in range(L - 2, 0, -1):
            def res_b(c, j=j):
                kind, key = c.kind, c.key
                if kind == "self":
                    return bwd[j][key]
                if kind == "prev":
                    return bwd[j + 1][key]
                if kind == "fwd":
                    return fwd[j][key]
                if kind == "in":
                    o, p = key
                    return _flat(fwd[j][o])[p]
                if kind == "param":
                    return lph[(j, key)]
                return env[self._by_name[key]]

            instantiate(self.bwd_template, self.bwin(1), bwd, j, res_b)
        fixed(self.z_range, "start")

        # outputs: loss, then gradients in parameter order (block 1's stand for 1 .. L-2)
        outs = self.output.args[0]
        if not isinstance(outs, (tuple, list)):
            raise StampError("the traced graph's output is not a tuple")
        new_outs: list = []
        gradients: dict[str, str] = {}
        f_start, f_end = remap("start"), remap("end")
        for pos, o in enumerate(outs):
            p = self.grad_of.get(o) if isinstance(o, torch.fx.Node) else None
            li = self.layer_of.get(p) if p is not None else None
            if li is None:
                if isinstance(o, torch.fx.Node):
                    new = f_start(o)
                    new_outs.append(new)
                    if p is not None:
                        gradients[new.name] = f_start(p).name
                else:
                    new_outs.append(o)
                continue
            i, rest = li
            if i == 0 or i == k - 1:
                f = f_start if i == 0 else f_end
                new = f(o)
                new_outs.append(new)
                gradients[new.name] = f(p).name
                continue
            prev = outs[pos - 1] if pos else None
            prev_li = self.layer_of.get(self.grad_of.get(prev)) if isinstance(prev, torch.fx.Node) else None
            if i != 1 or (prev_li is not None and prev_li[0] == 1):
                continue
            run = []
            for q in outs[pos:]:
                ql = self.layer_of.get(self.grad_of.get(q)) if isinstance(q, torch.fx.Node) else None
                if ql is None or ql[0] != 1:
                    break
                run.append((q, ql[1]))
            for j in range(1, L - 1):
                for q, r in run:
                    new = bwd[j][self.idx[q] - self.bwin(1).start]
                    new_outs.append(new)
                    gradients[new.name] = lph[(j, r)].name
        g.output(type(outs)(new_outs), type_expr=self.output.type)
        g.output_node().meta = dict(self.output.meta)
        gm = torch.fx.GraphModule(self.gm, g)
        for attr in ("meta", "shape_env"):
            if hasattr(self.gm, attr):
                setattr(gm, attr, getattr(self.gm, attr))
        return _lift_graph(gm, roles, {}, costs=costs, gradients=gradients, seconds=self.small.seconds)


def _resolve(rel, resolve):
    if isinstance(rel, _R):
        return resolve(rel)
    if isinstance(rel, (list, tuple)):
        return type(rel)(_resolve(r, resolve) for r in rel)
    if isinstance(rel, dict):
        return {key: _resolve(v, resolve) for key, v in rel.items()}
    return rel


def _first_difference(a: list, b: list) -> int | None:
    if len(a) != len(b):
        return min(len(a), len(b))
    for o, (x, y) in enumerate(zip(a, b, strict=True)):
        if x[0] is not y[0] or not _same(x[1], y[1]) or not _same(x[2], y[2]) or x[3] != y[3] or _has_bad(x) or _has_bad(y):
            return o
    return None


def _has_bad(rel) -> bool:
    if isinstance(rel, _R):
        return rel.kind == "bad"
    if isinstance(rel, (list, tuple)):
        return any(_has_bad(r) for r in rel)
    if isinstance(rel, dict):
        return any(_has_bad(v) for v in rel.values())
    return False
