"""Overlap communication with compute in a lowered module: issue each
collective early, wait for it late.

Functional collectives are asynchronous until their `wait_tensor`, but
lowering traces every redistribution step as a collective followed at once
by its wait (`dtplan.runtime.redistribute`), so as lowered a rank sits idle
through each one. `overlap(gm)` reorders the graph, nothing else:

Collectives with no work between them in the lowered order form a group (a
layer's weights, gathered back to back, as FSDP gathers a module at once).

- each **wait** moves down to just before the first node that reads its
  result, its local re-layout (the chunks and concatenation of a gather on
  another dim) going down with it (a gradient's reduce-scatter then runs
  under the rest of backward), but no later than the issue of the group two
  after its own, so at most two groups are in flight;
- each **collective** moves up to just after the latest of its inputs (a
  parameter's all-gather: the parameter is there from the start; a view of
  it, or a single-use cast or copy, moves up with it), but no
  earlier than where the previous group was issued before the pass. So
  collectives keep their order (every rank issues the same sequence), and
  each group is issued at most one group ahead of the unscheduled program:
  FSDP's one-layer prefetch. The memory this costs is bounded by that: one
  group's results ahead of their use beyond what the unscheduled program
  holds, and the inputs of at most two groups in flight.

The pass keeps the graph topologically ordered (every node still after its
inputs) and changes no node, so the module computes the same values; the
`entering` marks of `dtplan.runtime.watch` travel with their collective.
"""
from __future__ import annotations

import heapq
import operator

import torch

from dtplan.runtime import watch

__all__ = ["collective_waits", "does_work", "keep_alive", "overlap", "serialize"]

_WAIT = torch.ops._c10d_functional.wait_tensor.default
#: a group's waits come before the issue of the group this many later
AHEAD = 1
#: producers that allocate nothing: moved up whatever reads them
_VIEWS = {
    torch.ops.aten.t.default,
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default,
}
#: producers a collective may take up with it: single-use, cheap, no side effects
#: (a gradient bucket's buffer is the concatenation of its gradients' views)
_MOVABLE = _VIEWS | {
    torch.ops.aten._to_copy.default, torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.cat.default,
}
#: how far up a collective's inputs it takes its movable producers (a
#: bucket: the buffer's view, the concatenation, each gradient's view and copy)
_DEPTH = 5


def collective_waits(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node | None]]:
    """Each functional collective of `gm` in graph order, with its wait."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in watch.KINDS:
            out.append((n, next((u for u in n.users if u.target is _WAIT), None)))
    return out


def _mark(node: torch.fx.Node) -> torch.fx.Node | None:
    prev = node.prev
    return prev if prev.op == "call_function" and prev.target is watch.entering else None


def overlap(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Reorder `gm` in place (see the module docstring); returns it.

    Every node gets a sort key, its position; collectives (with their
    movable producers) and waits get new keys, and the graph is re-linked
    in key order (stable), then linted: a node before one of its inputs
    would fail there, not at run time."""
    pairs = collective_waits(gm)
    if not pairs:
        return gm
    graph = gm.graph
    nodes = list(graph.nodes)
    orig = {n: float(i) for i, n in enumerate(nodes)}
    key = dict(orig)
    first_free = max((orig[n] for n in nodes if n.op == "placeholder"), default=-1.0) + 0.5
    tick = iter(range(1, 1 << 30))  # ties at one spot keep hoisting order (at most ~1e6 moves)

    def hoist(n: torch.fx.Node, floor: float, depth: int) -> None:
        for inp in n.all_input_nodes:
            if depth < _DEPTH and key[inp] > floor and inp.op == "call_function" and (inp.target in _VIEWS or len(inp.users) == 1 and inp.target in _MOVABLE):
                hoist(inp, floor, depth + 1)
        ready = max((key[i] for i in n.all_input_nodes), default=first_free)
        new = max(ready, floor) + next(tick) * 1e-7
        if new < key[n]:
            key[n] = new

    group = _groups(pairs, nodes)
    last_of = {g: orig[c] for (c, _), g in zip(pairs, group, strict=True)}  # each group's last collective
    output = next(n for n in reversed(nodes) if n.op == "output")
    returned = {c for c, w in pairs if w is not None and _only_returned(w, orig, output)}
    first_of: dict[int, torch.fx.Node] = {}  # each group's first collective that keeps the order
    for (c, _), g in zip(pairs, group, strict=True):
        if c not in returned:
            first_of.setdefault(g, c)
    prev = {False: first_free, True: first_free}
    for (c, _), g in zip(pairs, group, strict=True):
        # a collective whose result is only returned (a gradient, a bucket of
        # them) goes as early as its input is ready: it is held to the end
        # anyway; the others no earlier than the previous group was issued
        floor = first_free if c in returned or not g else last_of[g - 1] + 0.5
        back = c in returned
        hoist(c, max(floor, first_free, prev[back]), 0)  # after the previous one: the order every rank issues
        prev[back] = key[c]
        mark = _mark(c)
        if mark is not None:
            key[mark] = key[c] - 1e-8
    for k, ((c, w), g) in enumerate(zip(pairs, group, strict=True)):
        if w is None or not w.users:
            continue
        # the local re-layout of the result (a gather of dim 1 chunks and
        # concatenates it) goes down with the wait, to its first real reader
        after = _relayout_closure(w, orig)
        for n in reversed(after):
            key[n] = max(key[n], min(key[u] for u in n.users) - 1e-8)
        until = min(key[u] for u in w.users)
        if g + AHEAD in first_of:
            later = first_of[g + AHEAD]
            until = min(until, key[_mark(later) or later])
        key[w] = max(key[w], until - 1e-8 * (1 - k / len(pairs)))
    _relink(graph, sorted(nodes, key=lambda n: (key[n], orig[n])))
    for c, w in pairs:
        if w is not None and c.next is not w:
            # the input stays referenced until the wait: the generated code
            # frees a value after its last reader, and a backend may still be
            # reading it (gloo's reduce-scatter and all-to-all do not hold it)
            inputs = tuple(i for i in c.all_input_nodes)
            with graph.inserting_after(w):
                graph.call_function(keep_alive, inputs)
    graph.lint()
    gm.recompile()
    return gm


#: what lowering does to a collective's result before the op that reads it
_RELAYOUT = _MOVABLE | {torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default}


def _relayout_closure(w: torch.fx.Node, order: dict[torch.fx.Node, float]) -> list[torch.fx.Node]:
    """The re-layout nodes fed by `w` alone (transitively), in graph order:
    visited in order, so a node's inputs from the closure are decided first."""
    seen: dict[torch.fx.Node, None] = {}
    heap = [(order[u], id(u), u) for u in w.users]
    heapq.heapify(heap)
    done = set()
    while heap:
        _, _, n = heapq.heappop(heap)
        if n in done:
            continue
        done.add(n)
        relayout = n.op == "call_function" and (n.target in _RELAYOUT or n.target is operator.getitem)
        if relayout and n.users and all(i is w or i in seen for i in n.all_input_nodes):
            seen[n] = None
            for u in n.users:
                heapq.heappush(heap, (order[u], id(u), u))
    return list(seen)


def _only_returned(w: torch.fx.Node, order: dict[torch.fx.Node, float], output: torch.fx.Node) -> bool:
    """Whether the value `w` waits for is read by the graph's output only
    (through its local re-layout)."""
    closure = set(_relayout_closure(w, order))
    readers = [u for n in (w, *closure) for u in n.users if u not in closure]
    return bool(readers) and all(u is output for u in readers)


def keep_alive(*tensors: object) -> None:
    """A no-op reader that keeps a collective's input alive until its wait."""


def does_work(n: torch.fx.Node) -> bool:
    """A node that computes (not a view, cast, re-layout, collective, wait or mark)."""
    if n.op != "call_function" or n.target in watch.KINDS or n.target in (watch.entering, _WAIT, operator.getitem, keep_alive):
        return False
    return n.target not in _RELAYOUT


def _groups(pairs, nodes: list[torch.fx.Node]) -> list[int]:
    """Collectives with no work between them in the lowered order form one
    group (a layer's weights gathered back to back, as FSDP gathers a module's
    parameters at once); the group index of each."""
    order = {n: i for i, n in enumerate(nodes)}
    out, g = [], 0
    for k, (c, _) in enumerate(pairs):
        if k and any(does_work(n) for n in nodes[order[pairs[k - 1][0]] + 1 : order[c]]):
            g += 1
        out.append(g)
    return out


def serialize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Every wait right after its collective (as lowering leaves them): the
    baseline `overlap` is measured against."""
    for c, w in collective_waits(gm):
        if w is not None and c.next is not w:
            c.append(w)
    gm.graph.lint()
    gm.recompile()
    return gm


def _relink(graph: torch.fx.Graph, order: list[torch.fx.Node]) -> None:
    """Put the graph's nodes in `order`."""
    first = next(iter(graph.nodes))
    if order[0] is not first:
        first.prepend(order[0])
    for prev, n in zip(order, order[1:]):
        if prev.next is not n:
            prev.append(n)
