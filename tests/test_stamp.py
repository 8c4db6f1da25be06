"""Stamped training capture (dtplan.ir.stamp): the L-layer joint graph built from a
3-layer trace must be the real L-layer capture, structurally and numerically."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import example_path

from dtplan import load_model_file
from dtplan.ir import Ref, Role, capture_training, fake_build
from dtplan.ir.capture import training_loss
from dtplan.ir.stamp import StampError, capture_training_stamped

LAYERS = {"llama": 5, "gpt": 4}  # at least keep + 1 = 4 blocks


def _model_file(name: str, **options):
    return load_model_file(example_path(name), {k: str(v) for k, v in options.items()})


@pytest.fixture(scope="module", params=["llama", "gpt", "llama bf16"])
def pair(request):
    """(model file, stamped capture, real capture) of an example with a few layers.

    check=False: the comparison with the real capture below is the stronger
    check (the 4-block trace check is tested on a small stack further down).
    Under bf16 the casts are in the graph: each parameter's where it is first
    read, each gradient's where the bf16 gradient is ready."""
    name, _, precision = request.param.partition(" ")
    mf = _model_file(name, layers=LAYERS[name])
    stamped = capture_training_stamped(*fake_build(lambda: mf.build(meta=False)), mf.loss_fn, fallback=False, check=False, precision=precision or None)
    real = capture_training(*fake_build(lambda: mf.build(meta=False)), mf.loss_fn, precision or None)
    return name, mf, stamped, real


def _renaming(stamped, real) -> dict[str, str]:
    """Stamped node name -> real node name, by position (the programs must line up)."""
    assert len(stamped.graph) == len(real.graph)
    return {a.name: b.name for a, b in zip(stamped.graph, real.graph, strict=True)}


def _renamed(value, names):
    if isinstance(value, Ref):
        return Ref(names[value.name])
    if isinstance(value, tuple):
        return tuple(_renamed(v, names) for v in value)
    return value


def test_stamped_graph_is_the_real_graph(pair):
    example, _, stamped, real = pair
    names = _renaming(stamped, real)
    # op sequence, arguments up to renaming, metadata, roles, FQNs, module paths, costs
    for a, b in zip(stamped.graph, real.graph, strict=True):
        assert (a.op_name, a.meta, a.role, a.fqn, a.module, a.flops, a.bytes) == (b.op_name, b.meta, b.role, b.fqn, b.module, b.flops, b.bytes), a.name
        assert _renamed(a.args, names) == b.args and _renamed(a.kwargs, names) == b.kwargs, a.name
    assert [names[o] for o in stamped.graph.outputs] == list(real.graph.outputs)
    assert [(names[n], role, fqn) for n, role, fqn in stamped.placeholders] == list(real.placeholders)
    assert [names[n] for n in stamped.user_inputs] == list(real.user_inputs)
    assert {names[g]: names[p] for g, p in stamped.gradients.items()} == dict(real.gradients)
    assert stamped.constants == real.constants == {}
    # fx metadata: every value's fake tensor has the real one's shape, stride and dtype
    for a, b in zip(stamped.gm.graph.nodes, real.gm.graph.nodes, strict=True):
        va, vb = a.meta.get("val"), b.meta.get("val")
        for x, y in zip(va if isinstance(va, (tuple, list)) else (va,), vb if isinstance(vb, (tuple, list)) else (vb,), strict=True):
            if isinstance(y, torch.Tensor):
                assert (x.shape, x.stride(), x.storage_offset(), x.dtype) == (y.shape, y.stride(), y.storage_offset(), y.dtype), a.name
    # stronger than "up to renaming": the names are the real trace's, so plans made from it match
    assert names == {n: n for n in names}
    assert stamped.graph.signature == real.graph.signature
    layers = {fqn.split(".")[1] for _, role, fqn in stamped.placeholders if role is Role.PARAM and fqn.count(".") > 1}
    assert {str(i) for i in range(LAYERS[example])} <= layers


def test_stamped_graph_runs_like_the_real_graph(pair):
    _, mf, stamped, real = pair
    model, inputs = mf.build(meta=False)
    stored = dict(model.named_parameters()) | dict(model.named_buffers())

    def run(c):
        args = [stored[fqn].detach() for _, role, fqn in c.placeholders if role is not Role.INPUT] + list(inputs)
        return c.gm(*args)

    got, want = run(stamped), run(real)
    assert len(got) == len(want) == 1 + sum(p.requires_grad for p in model.parameters())
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)
    # and both are the step eager autograd takes (under the same precision policy)
    model.zero_grad()
    loss = training_loss(model, mf.loss_fn, inputs, stamped.precision)
    loss.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if not stamped.precision.mixed else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(got[0], loss.detach(), **(dict(rtol=0, atol=1e-6) if not stamped.precision.mixed else tol))
    fqn_of = {n: fqn for n, _, fqn in stamped.placeholders}
    grads = dict(zip(stamped.graph.outputs[1:], got[1:], strict=True))
    params = dict(model.named_parameters())
    for g, p in stamped.gradients.items():
        torch.testing.assert_close(grads[g], params[fqn_of[p]].grad, **tol)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class _Stack(torch.nn.Module):
    def __init__(self, widths, scale_by_depth: bool = False, embed: bool = True) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, widths[0]) if embed else torch.nn.Identity()
        self.blocks = torch.nn.ModuleList(_Block(d) for d in widths)
        self.scale_by_depth = scale_by_depth

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
            if self.scale_by_depth:  # reads the depth: a 3-block trace has other constants
                h = h * (1.0 / len(self.blocks))
        return h.sum(-1)


def _capture_stack(module_fn, **kwargs):
    model, inputs = fake_build(lambda: (module_fn(), (torch.randn(4, 8),)))
    return capture_training_stamped(model, inputs, _loss, **kwargs)


def _loss(out, *inputs):
    return out.pow(2).mean()


def test_a_plain_stack_stamps_with_its_check_and_equals_its_real_capture():
    model, inputs = fake_build(lambda: (_Stack([8] * 6), (torch.randn(4, 8),)))
    stamped = capture_training_stamped(model, inputs, _loss)  # default: with the 4-block trace check
    assert sum(1 for _, role, _ in stamped.placeholders if role is Role.PARAM) == 2 + 2 * 6
    assert stamped.graph.signature == capture_training(model, inputs, _loss).graph.signature
    assert len(model.blocks) == 6  # the model is given back whole


def test_a_first_block_whose_input_needs_no_gradient_is_stamped_from_four_blocks():
    # the first block's backward computes no input gradient, so it differs
    # from the interior blocks': 3 blocks do not verify, 4 do
    model, inputs = fake_build(lambda: (_Stack([8] * 6, embed=False), (torch.randn(4, 8),)))
    stamped = capture_training_stamped(model, inputs, _loss, fallback=False, check=False)
    assert stamped.graph.signature == capture_training(model, inputs, _loss).graph.signature


def test_too_few_layers_fall_back_to_the_full_capture():
    model, inputs = fake_build(lambda: (_Stack([8] * 3), (torch.randn(4, 8),)))
    logger, records = logging.getLogger("dtplan.ir.stamp"), _Records()
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        c = capture_training_stamped(model, inputs, _loss)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert any("stamping needs at least 4" in line for line in records.lines), records.lines
    assert c.graph.signature == capture_training(model, inputs, _loss).graph.signature
    with pytest.raises(StampError, match="at least 4"):
        capture_training_stamped(model, inputs, _loss, fallback=False)


def test_a_forward_that_reads_the_depth_is_caught_by_the_check():
    with pytest.raises(StampError, match="differs from a real trace"):
        _capture_stack(lambda: _Stack([8] * 6, scale_by_depth=True), fallback=False)
    # falling back, the graph is the real one (constant 1/6, not 1/3)
    c = _capture_stack(lambda: _Stack([8] * 6, scale_by_depth=True))
    assert any(1.0 / 6 in n.args for n in c.graph if n.op_name == "aten.mul.Tensor")


def test_blocks_that_differ_are_not_stamped():
    with pytest.raises(StampError, match="not identical"):
        _capture_stack(lambda: _Stack([8, 8, 8, 16, 16]), fallback=False)


def test_segments_tile_the_traced_graph_and_are_frozen():
    from dtplan.ir.stamp import _BlockTrace

    model, inputs = fake_build(lambda: (_Stack([8] * 3), (torch.randn(4, 8),)))
    traced = capture_training(model, inputs, _loss)
    segments = _BlockTrace(traced, "blocks", 3).segment()
    # A B0 B1 B2 M E2 E1, then E0 and the epilogue Z (the tail): back to back, covering every op
    regions = [
        segments.prologue,
        *(segments.forward_window(i) for i in range(3)),
        segments.middle,
        segments.backward_window(2),
        segments.backward_window(1),
        segments.tail,
    ]
    assert regions[0].start == segments.placeholder_count == len(traced.placeholders)
    assert all(a.stop == b.start for a, b in zip(regions, regions[1:]))
    assert regions[-1].stop == segments.node_count == len(traced.gm.graph.nodes) - 1  # the output excluded
    assert segments.backward_window(0).start == segments.tail.start
    assert len(segments.forward_template) == segments.forward_period > 0
    assert len(segments.backward_template) == segments.backward_period > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        segments.forward_start = 0
