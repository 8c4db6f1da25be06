"""Stamped capture, part 2: the joint graph for L blocks built from a
verified k-block trace (`Segments`): shared regions copied, the interior
block's templates stamped L - 2 times. See `dtplan.ir.stamp` for the method."""
from __future__ import annotations

import functools
import itertools

import torch
from torch.fx.node import map_arg

from dtplan.ir.capture import Captured, lift_graph
from dtplan.ir.graph import Role, base_name
from dtplan.ir.stamp_segments import Segments, StampError, _BlockTrace, _flat, _RelativeArg, _RelativeNode, _resolved


# --------------------------------------------------------------------------- build


class _GraphBuilder:
    """The joint graph for `layers` blocks from a segmented k-block trace,
    lifted; nodes are created in the real trace's order (see `build`)."""

    def __init__(self, trace: _BlockTrace, segments: Segments, layers: int) -> None:
        if layers < trace.blocks:
            raise StampError(f"cannot stamp fewer blocks ({layers}) than were traced ({trace.blocks})")
        self.trace, self.segments, self.layers = trace, segments, layers
        self.traced_ir = trace.captured.graph  # FLOPs and bytes of the traced nodes
        self.graph = torch.fx.Graph()
        self.graph._codegen = trace.gm.graph._codegen
        #: traced node outside every block window built -> its copy (placeholders, prologue, middle, tail)
        self.shared: dict[torch.fx.Node, torch.fx.Node] = {}
        #: [layer][offset in its window] -> the built node
        self.forward_nodes: list[list[torch.fx.Node | None]] = [[None] * segments.forward_period for _ in range(layers)]
        self.backward_nodes: list[list[torch.fx.Node | None]] = [[None] * segments.backward_period for _ in range(layers)]
        #: (layer, FQN suffix) -> the placeholder of that layer's parameter or buffer
        self.layer_placeholders: dict[tuple[int, str], torch.fx.Node] = {}
        self.roles: dict[str, tuple[Role, str | None]] = {}  # placeholder name -> (role, FQN)
        self.costs: dict[str, tuple[int, int]] = {}  # node name -> (FLOPs, bytes)
        self.gradients: dict[str, str] = {}  # gradient output name -> its parameter's placeholder name
        self.placeholder_count = 0

    def build(self) -> Captured:
        """Placeholders; the prologue and B0 as traced; B1 .. BL-2 from the
        forward template; BL-1, the middle and EL-1 (the traced Bk-1, M and
        Ek-1); EL-2 .. E1 from the backward template; E0 and the epilogue as
        traced; the outputs. Traced nodes read blocks re-pointed to the
        first two or the last two layers."""
        segments, k, last = self.segments, self.trace.blocks, self.layers - 1
        self._add_placeholders()
        self._copy_shared(segments.prologue, "start")
        self._copy_block(segments.forward_window(0), "start", self.forward_nodes[0])
        for layer in range(1, last):
            resolve = functools.partial(self._resolve_forward, layer)
            self._stamp_block(segments.forward_template, segments.forward_window(1), self.forward_nodes[layer], resolve)
        self._copy_block(segments.forward_window(k - 1), "end", self.forward_nodes[last])
        self._copy_shared(segments.middle, "end")
        self._copy_block(segments.backward_window(k - 1), "end", self.backward_nodes[last])
        for layer in range(last - 1, 0, -1):
            resolve = functools.partial(self._resolve_backward, layer)
            self._stamp_block(segments.backward_template, segments.backward_window(1), self.backward_nodes[layer], resolve)
        self._copy_shared(segments.tail, "start")
        self._add_output()
        gm = torch.fx.GraphModule(self.trace.gm, self.graph)
        for attr in ("meta", "shape_env"):
            if hasattr(self.trace.gm, attr):
                setattr(gm, attr, getattr(self.trace.gm, attr))
        return lift_graph(
            gm, self.roles, {}, costs=self.costs, gradients=self.gradients, seconds=self.trace.captured.seconds, precision=self.trace.captured.precision
        )

    # ---- placeholders

    def _add_placeholders(self) -> None:
        """In the traced order; block 1's run of placeholders stands for the
        runs of layers 1 .. L-2 (those of blocks 2 .. k-2 are dropped)."""
        trace, k, last = self.trace, self.trace.blocks, self.layers - 1
        placeholders = trace.placeholders
        for pos, p in enumerate(placeholders):
            found = trace.block_param.get(p)
            if found is None:
                self.shared[p] = self._new_placeholder(p, trace.roles[p.name][1], fresh=False)
                continue
            block, suffix = found
            if block == 0:
                self.layer_placeholders[(0, suffix)] = self._new_placeholder(p, trace.roles[p.name][1], fresh=False)
            elif block == k - 1:
                fqn = f"{trace.fqn_prefix}{last}.{suffix}"
                self.layer_placeholders[(last, suffix)] = self._new_placeholder(p, fqn, fresh=last != k - 1)
            elif block == 1 and (pos == 0 or trace.block_of(placeholders[pos - 1]) != 1):
                run = list(itertools.takewhile(lambda q: trace.block_of(q) == 1, placeholders[pos:]))
                for layer in range(1, last):
                    for q in run:
                        suffix = trace.block_param[q][1]
                        fqn = f"{trace.fqn_prefix}{layer}.{suffix}"
                        self.layer_placeholders[(layer, suffix)] = self._new_placeholder(q, fqn, fresh=layer != 1)

    def _new_placeholder(self, template: torch.fx.Node, fqn: str | None, *, fresh: bool) -> torch.fx.Node:
        """The next `arg{i}_1`, with `template`'s meta and role; `fresh`: a new
        fake tensor of the same kind (another layer's parameter)."""
        new = self.graph.placeholder(f"arg{self.placeholder_count}_1", type_expr=template.type)
        self.placeholder_count += 1
        new.meta = dict(template.meta)
        val = template.meta.get("val")
        if fresh and isinstance(val, torch.Tensor) and getattr(val, "fake_mode", None) is not None:
            with val.fake_mode:
                new.meta["val"] = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device).requires_grad_(val.requires_grad)
        self.roles[new.name] = (self.trace.roles[template.name][0], fqn)
        return new

    # ---- nodes copied as traced

    def _copy_shared(self, window: range, anchor: str) -> None:
        """Copy traced nodes outside the stamped blocks (prologue, middle, tail)."""
        copy_of = functools.partial(self._copy_of, anchor)
        for n in (self.trace.nodes[j] for j in window):
            self.shared[n] = self._copy_node(n, map_arg(n.args, copy_of), map_arg(n.kwargs, copy_of))

    def _copy_block(self, window: range, anchor: str, built: list[torch.fx.Node | None]) -> None:
        """Copy a traced block window (B0, Bk-1, Ek-1) into `built`, where later reads find it."""
        copy_of = functools.partial(self._copy_of, anchor)
        for offset, n in enumerate(self.trace.nodes[j] for j in window):
            built[offset] = self._copy_node(n, map_arg(n.args, copy_of), map_arg(n.kwargs, copy_of))

    def _copy_of(self, anchor: str, node: torch.fx.Node) -> torch.fx.Node:
        """The built node for traced `node`, read by a traced node near the
        start or the end ("start" or "end": see `_built_layer`)."""
        if node in self.shared:
            return self.shared[node]
        if node in self.trace.block_param:
            block, suffix = self.trace.block_param[node]
            return self.layer_placeholders[(self._built_layer(block, anchor), suffix)]
        found = self._window_of(node)
        if found is None:
            raise StampError(f"{node.name} is read before it is built")
        built, block, offset = found
        new = built[self._built_layer(block, anchor)][offset]
        if new is None:
            raise StampError(f"{node.name} is read before it is built")
        return new

    def _built_layer(self, block: int, anchor: str) -> int:
        """The layer a read of traced block `block` means: counted from the
        start (blocks 0 and 1) or from the end (the last two blocks)."""
        k = self.trace.blocks
        if anchor == "start":
            if block > 1:
                raise StampError(f"a node near the start reads block {block}")
            return block
        if block < k - 2:
            raise StampError(f"a node near the end reads block {block}")
        return self.layers - k + block

    def _window_of(self, node: torch.fx.Node) -> tuple[list, int, int] | None:
        """(built nodes by layer, block, offset) of the traced block window holding `node`."""
        j = self.trace.position[node]
        for block in range(self.trace.blocks):
            forward = self.segments.forward_window(block)
            if j in forward:
                return self.forward_nodes, block, j - forward.start
            backward = self.segments.backward_window(block)
            if block > 0 and j in backward:  # E0 is part of the tail
                return self.backward_nodes, block, j - backward.start
        return None

    def _copy_node(self, n: torch.fx.Node, args, kwargs) -> torch.fx.Node:
        new = self.graph.create_node(n.op, n.target, args, kwargs, name=base_name(n.name), type_expr=n.type)
        new.meta = dict(n.meta)
        ir = self.traced_ir[n.name]
        self.costs[new.name] = (ir.flops, ir.bytes)  # same op on the same metadata
        return new

    # ---- interior blocks

    def _stamp_block(self, template: tuple[_RelativeNode, ...], window: range, built: list, resolve) -> None:
        """A layer's window from its template; `window` (B1 or E1) gives the node names and meta."""
        for offset, (n, relative) in enumerate(zip((self.trace.nodes[j] for j in window), template, strict=True)):
            built[offset] = self._copy_node(n, _resolved(relative.args, resolve), _resolved(relative.kwargs, resolve))

    def _resolve_forward(self, layer: int, arg: _RelativeArg) -> torch.fx.Node:
        kind, key = arg.kind, arg.key
        if kind == "self":
            return self.forward_nodes[layer][key]
        if kind == "prev":
            return self.forward_nodes[layer - 1][key]
        if kind == "param":
            return self.layer_placeholders[(layer, key)]
        return self.shared[self.trace.by_name[key]]

    def _resolve_backward(self, layer: int, arg: _RelativeArg) -> torch.fx.Node:
        kind, key = arg.kind, arg.key
        if kind == "self":
            return self.backward_nodes[layer][key]
        if kind == "prev":
            return self.backward_nodes[layer + 1][key]
        if kind == "fwd":
            return self.forward_nodes[layer][key]
        if kind == "in":
            offset, position = key
            return _flat(self.forward_nodes[layer][offset])[position]
        if kind == "param":
            return self.layer_placeholders[(layer, key)]
        return self.shared[self.trace.by_name[key]]

    # ---- outputs

    def _add_output(self) -> None:
        """The loss, then the gradients in parameter order; block 1's run of
        gradients stands for the runs of layers 1 .. L-2."""
        trace, k = self.trace, self.trace.blocks
        outs = trace.output.args[0]
        if not isinstance(outs, (tuple, list)):
            raise StampError("the traced graph's output is not a tuple")
        built: list = []
        for pos, out in enumerate(outs):
            block = trace.gradient_block(out)
            if block is None or block == 0 or block == k - 1:
                built.append(self._copied_output(out, "end" if block == k - 1 else "start"))
            elif block == 1 and trace.gradient_block(outs[pos - 1] if pos else None) != 1:
                run = list(itertools.takewhile(lambda o: trace.gradient_block(o) == 1, outs[pos:]))
                built.extend(self._stamped_gradients(run))
        self.graph.output(type(outs)(built), type_expr=trace.output.type)
        self.graph.output_node().meta = dict(trace.output.meta)

    def _copied_output(self, out, anchor: str):
        if not isinstance(out, torch.fx.Node):
            return out
        new = self._copy_of(anchor, out)
        parameter = self.trace.parameter_of.get(out)
        if parameter is not None:
            self.gradients[new.name] = self._copy_of(anchor, parameter).name
        return new

    def _stamped_gradients(self, run: list[torch.fx.Node]) -> list[torch.fx.Node]:
        """Layers 1 .. L-2's gradients for block 1's run of gradient outputs."""
        trace, e1_start = self.trace, self.segments.backward_window(1).start
        slots = [(trace.position[g] - e1_start, trace.block_param[trace.parameter_of[g]][1]) for g in run]
        out = []
        for layer in range(1, self.layers - 1):
            for offset, suffix in slots:
                new = self.backward_nodes[layer][offset]
                out.append(new)
                self.gradients[new.name] = self.layer_placeholders[(layer, suffix)].name
        return out
