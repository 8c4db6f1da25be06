"""Stamped capture, part 1: a k-block joint graph indexed by block, its
block windows found and verified in relative form (`Segments`). See
`dtplan.ir.stamp` for the method."""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.fx.node import map_arg

from dtplan.ir.capture import Captured

log = logging.getLogger("dtplan.ir.stamp")


class StampError(RuntimeError):
    """The model's repeated blocks could not be identified or verified."""


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


# --------------------------------------------------------------------------- relative form


@dataclasses.dataclass(frozen=True, slots=True)
class _RelativeArg:
    """An argument of a block node, relative to its block (see the module docstring)."""

    kind: str  # self | prev | fwd | in | param | ext | bad
    key: object  # offset in a window | (offset, flat argument position) | FQN suffix | node name


class _RelativeNode(NamedTuple):
    """A block node in relative form: what must match across blocks."""

    target: object
    args: object  # the node's args with `_RelativeArg`s for its node arguments
    kwargs: object
    meta_key: object  # `_meta_key` of its value


def _resolved(relative, resolve: Callable[[_RelativeArg], torch.fx.Node]):
    """`relative` (args or kwargs in relative form) with every `_RelativeArg` resolved."""
    if isinstance(relative, _RelativeArg):
        return resolve(relative)
    if isinstance(relative, (list, tuple)):
        return type(relative)(_resolved(r, resolve) for r in relative)
    if isinstance(relative, dict):
        return {key: _resolved(v, resolve) for key, v in relative.items()}
    return relative


def _first_difference(a: list[_RelativeNode], b: list[_RelativeNode]) -> int | None:
    """The first offset where two blocks in relative form differ (or hold an unclassifiable read)."""
    if len(a) != len(b):
        return min(len(a), len(b))
    for offset, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.target is not y.target or not _same(x.args, y.args) or not _same(x.kwargs, y.kwargs) \
                or x.meta_key != y.meta_key or _has_bad(x) or _has_bad(y):
            return offset
    return None


def _has_bad(relative) -> bool:
    if isinstance(relative, _RelativeArg):
        return relative.kind == "bad"
    if isinstance(relative, (list, tuple)):
        return any(_has_bad(r) for r in relative)
    if isinstance(relative, dict):
        return any(_has_bad(v) for v in relative.values())
    return False


def _flat(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes `node` reads, in argument order (repeats included)."""
    out: list[torch.fx.Node] = []
    map_arg((node.args, node.kwargs), out.append)
    return out


_ARG = re.compile(r"^arg(\d+)_1$")


# --------------------------------------------------------------------------- segments


def _forward_window(forward_start: int, forward_period: int, block: int) -> range:
    """Block `block`'s forward nodes (`Bi`) when B1 starts at `forward_start`."""
    return range(forward_start + (block - 1) * forward_period, forward_start + block * forward_period)


def _backward_window(backward_start: int, backward_period: int, block: int) -> range:
    """Block `block`'s backward nodes (`Ei`) when E1 starts at `backward_start`
    (the backward runs Ek-1 .. E1 E0: E0 follows E1)."""
    return range(backward_start + (1 - block) * backward_period, backward_start + (2 - block) * backward_period)


@dataclasses.dataclass(frozen=True, slots=True)
class Segments:
    """How the k-block trace cuts into regions, by node position (output
    excluded): placeholders, prologue `A`, forward windows `B0 .. Bk-1`,
    middle `M`, backward windows `Ek-1 .. E1`, then the tail (`E0` and the
    epilogue `Z`); and the interior block's windows `B1` and `E1` in
    relative form, which every interior block of the L-block graph repeats."""

    blocks: int  # k, the traced blocks
    placeholder_count: int
    node_count: int
    forward_period: int  # nodes per forward window
    backward_period: int  # nodes per backward window
    forward_start: int  # where B1 starts
    backward_start: int  # where E1 starts
    forward_template: tuple[_RelativeNode, ...]  # B1
    backward_template: tuple[_RelativeNode, ...]  # E1

    def forward_window(self, block: int) -> range:
        return _forward_window(self.forward_start, self.forward_period, block)

    def backward_window(self, block: int) -> range:
        return _backward_window(self.backward_start, self.backward_period, block)

    @property
    def prologue(self) -> range:
        return range(self.placeholder_count, self.forward_window(0).start)

    @property
    def middle(self) -> range:
        return range(self.forward_window(self.blocks - 1).stop, self.backward_window(self.blocks - 1).start)

    @property
    def tail(self) -> range:
        """The first block's backward and the epilogue: built as they are,
        reading the blocks near the start (E0 may differ from the others,
        e.g. when the first block's input needs no gradient)."""
        return range(self.backward_window(1).stop, self.node_count)


class _Unverified(StampError):
    """A candidate cut whose blocks do not match (the search tries the next)."""


class _BlockTrace:
    """The k-block joint graph indexed for segmentation and building: its
    nodes in order without the output, its placeholders, each block
    placeholder's block and FQN suffix, and each gradient's parameter."""

    def __init__(self, captured: Captured, stack_name: str, blocks: int) -> None:
        self.captured, self.blocks = captured, blocks
        self.gm = captured.gm
        nodes = list(self.gm.graph.nodes)
        if nodes[-1].op != "output":
            raise StampError("the traced graph does not end with its output")
        self.output = nodes[-1]
        self.nodes = nodes[:-1]
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if any(n.op != "call_function" for n in self.nodes[len(self.placeholders) :]):
            raise StampError("the traced graph has placeholders after its first op or non-call nodes")
        if any(_ARG.match(p.name) is None or int(_ARG.match(p.name).group(1)) != i for i, p in enumerate(self.placeholders)):
            raise StampError("placeholders are not named arg<i>_1")
        self.fqn_prefix = stack_name + "." if stack_name else ""
        self.roles = {name: (role, fqn) for name, role, fqn in captured.placeholders}
        #: placeholder of a block's parameter or buffer -> (block, FQN suffix in the block)
        self.block_param: dict[torch.fx.Node, tuple[int, str]] = {}
        block_fqn = re.compile(rf"^{re.escape(self.fqn_prefix)}(\d+)\.(.+)$")
        for p in self.placeholders:
            fqn = self.roles[p.name][1]
            match = block_fqn.match(fqn) if fqn else None
            if match:
                self.block_param[p] = (int(match.group(1)), match.group(2))
        self._check_placeholder_runs()
        #: gradient output -> its parameter's placeholder
        self.parameter_of = {self.by_name[g]: self.by_name[p] for g, p in captured.gradients.items()}
        self._check_output_runs()

    def block_of(self, node: torch.fx.Node | None) -> int | None:
        """The block whose parameter or buffer `node` is, if it is one."""
        found = self.block_param.get(node)
        return None if found is None else found[0]

    def gradient_block(self, out) -> int | None:
        """The block whose parameter's gradient the output `out` is, if it is one."""
        return self.block_of(self.parameter_of.get(out)) if isinstance(out, torch.fx.Node) else None

    def _check_output_runs(self) -> None:
        """Each block's gradients are one contiguous run of the outputs, blocks in order."""
        outs = self.output.args[0]
        if not isinstance(outs, (tuple, list)):
            raise StampError("the traced graph's output is not a tuple")
        blocks = [self.gradient_block(o) for o in outs]
        runs = [b for pos, b in enumerate(blocks) if b is not None and (pos == 0 or blocks[pos - 1] != b)]
        if runs != list(range(self.blocks)):
            raise StampError("the blocks' gradients are not output block by block")

    def _check_placeholder_runs(self) -> None:
        """Block placeholders come in runs block 0, 1, .., k-1 with the same suffixes."""
        runs: list[tuple[int, list[str]]] = []  # (block or -1, FQN suffixes)
        for p in self.placeholders:
            found = self.block_param.get(p)
            if found is None:
                runs.append((-1, []))
            elif runs and runs[-1][0] == found[0]:
                runs[-1][1].append(found[1])
            else:
                runs.append((found[0], [found[1]]))
        block_runs = [r for r in runs if r[0] >= 0]
        if len(block_runs) % self.blocks:
            raise StampError("the blocks' parameters are not laid out block by block")
        for g in range(0, len(block_runs), self.blocks):
            group = block_runs[g : g + self.blocks]
            if [r[0] for r in group] != list(range(self.blocks)) or any(r[1] != group[0][1] for r in group):
                raise StampError("the blocks' parameters are not laid out block by block")

    # ---- segmentation

    def segment(self) -> Segments:
        """The first cut into block windows (fewest crossing values first) that verifies."""
        k, first_op = self.blocks, len(self.placeholders)
        first_read, last_gradient = self._first_parameter_reads(), self._last_gradients()
        if set(first_read) != set(range(k)) or set(last_gradient) != set(range(k)):
            raise StampError("not every block reads its parameters and has gradients")
        forward_period = first_read[2] - first_read[1]
        # interior backward segments (k = 3: E0, fed by an interior block, stands in)
        backward_period = last_gradient[0] - last_gradient[1] if k == 3 else last_gradient[1] - last_gradient[2]
        if forward_period <= 0 or backward_period <= 0 \
                or any(first_read[i + 1] - first_read[i] != forward_period for i in range(1, k - 1)) \
                or any(last_gradient[i] - last_gradient[i + 1] != backward_period for i in range(1, k - 2)):
            raise StampError("the blocks' forward or backward segments are not equally long")
        failure = "no cut of the forward segments verifies"
        forward_starts = range(first_read[1] - forward_period + 1, first_read[1] + 1)
        backward_starts = range(last_gradient[1] - backward_period + 1, last_gradient[1] + 1)
        for forward_start in self._window_starts(forward_starts, forward_period, lower=first_op + forward_period):
            forward = [_forward_window(forward_start, forward_period, i) for i in range(k)]
            try:
                forward_template = self._forward_template(forward)
            except _Unverified as e:
                failure = str(e)
                continue
            forward_end = forward[-1].stop
            lower = forward_end + (k - 2) * backward_period
            for backward_start in self._window_starts(backward_starts, backward_period, lower=lower, floor=forward_end):
                backward = [_backward_window(backward_start, backward_period, i) for i in range(k)]
                try:
                    backward_template = self._backward_template(forward, backward)
                except _Unverified as e:
                    failure = str(e)
                    continue
                log.debug("blocks: forward %d nodes from %s, backward %d nodes from %s",
                          forward_period, self.nodes[forward_start].name, backward_period, self.nodes[backward_start].name)
                return Segments(
                    blocks=k, placeholder_count=first_op, node_count=len(self.nodes),
                    forward_period=forward_period, backward_period=backward_period,
                    forward_start=forward_start, backward_start=backward_start,
                    forward_template=forward_template, backward_template=backward_template,
                )
        raise StampError(failure)

    def _first_parameter_reads(self) -> dict[int, int]:
        """Block -> position of the first node reading one of its parameters or buffers."""
        first_read: dict[int, int] = {}
        for n in self.nodes[len(self.placeholders) :]:
            for a in _flat(n):
                if a in self.block_param:
                    first_read.setdefault(self.block_param[a][0], self.position[n])
        return first_read

    def _last_gradients(self) -> dict[int, int]:
        """Block -> position of its last gradient output."""
        last_gradient: dict[int, int] = {}
        for g, p in self.parameter_of.items():
            if p in self.block_param:
                block = self.block_param[p][0]
                last_gradient[block] = max(last_gradient.get(block, -1), self.position[g])
        return last_gradient

    def _window_starts(self, candidates: range, period: int, *, lower: int, floor: int = 0, tries: int = 6) -> list[int]:
        """Window starts, fewest crossing values first (at most `tries`)."""
        scored = []
        for start in candidates:
            if start < lower or start + period > len(self.nodes):
                continue
            crossing = {
                a for n in self.nodes[start : start + period] for a in _flat(n)
                if a.op != "placeholder" and floor <= self.position[a] < start
            }
            scored.append((len(crossing), start))
        return [start for _, start in sorted(scored)[:tries]]

    def _forward_template(self, forward: list[range]) -> tuple[_RelativeNode, ...]:
        """B1 in relative form, when B1 .. Bk-1 (windows `forward`: B0 .. Bk-1) are equal in it."""
        k = self.blocks
        if forward[0].start < len(self.placeholders) or forward[k - 1].stop > len(self.nodes):
            raise _Unverified("the forward windows do not fit the graph")
        relative = {i: self._relative(forward[i], functools.partial(self._forward_argument, forward, i)) for i in range(1, k)}
        for i in range(1, k - 1):
            offset = _first_difference(relative[i], relative[i + 1])
            if offset is not None:
                raise _Unverified(f"forward block {i + 1} differs from block {i} at offset {offset}")
        return tuple(relative[1])

    def _backward_template(self, forward: list[range], backward: list[range]) -> tuple[_RelativeNode, ...]:
        """E1 in relative form, when the interior-fed backward windows equal
        it (E0 and E1 for k = 3, E1 .. Ek-2 for k >= 4) and it holds block 1's
        gradients (windows `forward`: B0 .. Bk-1, `backward`: E0 .. Ek-1)."""
        k = self.blocks
        last = backward[0 if k == 3 else 1].stop
        if backward[k - 1].start < forward[k - 1].stop or last > len(self.nodes):
            raise _Unverified("the backward windows do not fit the graph")
        pairs = [(0, 1)] if k == 3 else [(j, j + 1) for j in range(1, k - 2)]
        relative = {}
        for i in sorted({1, *(i for pair in pairs for i in pair)}):
            inputs = self._forward_inputs(forward[i])
            classify = functools.partial(self._backward_argument, forward, backward, i, inputs)
            relative[i] = self._relative(backward[i], classify)
        for lo, hi in pairs:
            offset = _first_difference(relative[hi], relative[lo])
            if offset is not None:
                raise _Unverified(f"backward block {lo} differs from block {hi} at offset {offset}")
        # every layer gradient of the template layer lies in its backward window
        for g, p in self.parameter_of.items():
            if self.block_of(p) == 1 and self.position[g] not in backward[1]:
                raise _Unverified(f"the gradient {g.name} of {self.roles[p.name][1]} is outside its block's backward segment")
        return tuple(relative[1])

    def _relative(self, window: range, classify: Callable[[torch.fx.Node], _RelativeArg]) -> list[_RelativeNode]:
        return [
            _RelativeNode(n.target, map_arg(n.args, classify), map_arg(n.kwargs, classify), _meta_key(n.meta.get("val")))
            for n in (self.nodes[j] for j in window)
        ]

    def _forward_inputs(self, window: range) -> dict[torch.fx.Node, tuple[int, int]]:
        """Values a forward window reads from outside itself (not its block's
        parameters), keyed by (offset, flat argument position) of the first read."""
        out: dict[torch.fx.Node, tuple[int, int]] = {}
        for offset, j in enumerate(window):
            for position, a in enumerate(_flat(self.nodes[j])):
                if a in self.block_param or (a.op != "placeholder" and self.position[a] in window):
                    continue
                out.setdefault(a, (offset, position))
        return out

    def _forward_argument(self, forward: list[range], i: int, a: torch.fx.Node) -> _RelativeArg:
        """Argument `a` of a node of Bi, relative to block i (`forward`: B0 .. Bk-1)."""
        j = self.position[a]
        if j in forward[i]:
            return _RelativeArg("self", j - forward[i].start)
        if i > 0 and j in forward[i - 1]:
            return _RelativeArg("prev", j - forward[i - 1].start)
        if self.block_of(a) == i:
            return _RelativeArg("param", self.block_param[a][1])
        if (a.op == "placeholder" and a not in self.block_param) or j < forward[0].start:
            return _RelativeArg("ext", a.name)
        return _RelativeArg("bad", a.name)

    def _backward_argument(
        self, forward: list[range], backward: list[range], i: int, inputs: dict, a: torch.fx.Node
    ) -> _RelativeArg:
        """Argument `a` of a node of Ei, relative to block i (`inputs`: what Bi reads from outside)."""
        j = self.position[a]
        if j in backward[i]:
            return _RelativeArg("self", j - backward[i].start)
        if i + 1 < self.blocks and j in backward[i + 1]:
            return _RelativeArg("prev", j - backward[i + 1].start)
        if j in forward[i]:
            return _RelativeArg("fwd", j - forward[i].start)
        if a in inputs:
            return _RelativeArg("in", inputs[a])
        if self.block_of(a) == i:
            return _RelativeArg("param", self.block_param[a][1])
        if self._is_shared(a, forward, backward):
            return _RelativeArg("ext", a.name)
        return _RelativeArg("bad", a.name)

    def _is_shared(self, a: torch.fx.Node, forward: list[range], backward: list[range]) -> bool:
        """A value every block may read as the same node: a non-block
        placeholder, a prologue node or a middle node."""
        if a.op == "placeholder":
            return a not in self.block_param
        j = self.position[a]
        return j < forward[0].start or forward[-1].stop <= j < backward[-1].start
