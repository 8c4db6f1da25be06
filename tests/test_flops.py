"""FLOP counts of ATen nodes (`dtplan.ir.flops.node_cost`), checked against closed
forms and against torch's own formulas / `FlopCounterMode` on the same shapes.

Attention convention (torch's): forward = 2*b*h*s_q*s_k*(d + d_v), i.e.
4*b*h*s_q*s_k*d; backward = 2*b*h*s_q*s_k*(3*d + 2*d_v), i.e. 2.5x forward;
heads are the query's under GQA; causal masks are not discounted."""
from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dtplan.ir.flops import node_cost, sdpa_flops

aten = torch.ops.aten

# GQA: 8 query heads share 2 k/v heads; s_q != s_k so the two are not mixed up
B, H, HKV, SQ, SK, D = 2, 8, 2, 16, 24, 32


def fwd_flops(b: int, h: int, s_q: int, s_k: int, d: int, d_v: int) -> int:
    return 2 * b * h * s_q * s_k * (d + d_v)


def bwd_flops(b: int, h: int, s_q: int, s_k: int, d: int, d_v: int) -> int:
    return 2 * b * h * s_q * s_k * (3 * d + 2 * d_v)


def traced(fn: Callable[..., Any], *args: torch.Tensor, op: Any = None, **make_fx_kw: Any) -> torch.fx.Node:
    """The one call node (or the node of `op`) in the fake-mode trace of `fn(*args)`."""
    gm = make_fx(fn, tracing_mode="fake", **make_fx_kw)(*args)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    if op is not None:
        nodes = [n for n in nodes if n.target is op]
    assert len(nodes) == 1, [str(n.target) for n in nodes]
    return nodes[0]


def hand_node(op: Any, args: tuple, out: Any) -> torch.fx.Node:
    """An fx node for an op with no kernel nor meta kernel here: tensors in `args` become placeholders."""
    g = torch.fx.Graph()

    def ph(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        p = g.placeholder(f"t{len(g.nodes)}")
        p.meta["val"] = x
        return p

    node = g.call_function(op, tuple(ph(a) for a in args))
    node.meta["val"] = out
    return node


def torch_count(fn: Callable[..., Any], *args: torch.Tensor) -> int:
    """What torch's FlopCounterMode reports for `fn(*args)` on fake tensors of these shapes."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(a) for a in args]
        with FlopCounterMode(display=False) as counter:
            fn(*fakes)
    return counter.get_total_flops()


def qkv(h_kv: int = HKV, d_v: int = D) -> tuple[torch.Tensor, ...]:
    """q, k, v, grad_out, out, logsumexp in (b, h, s, d) layout."""
    return (
        torch.randn(B, H, SQ, D),
        torch.randn(B, h_kv, SK, D),
        torch.randn(B, h_kv, SK, d_v),
        torch.randn(B, H, SQ, d_v),
        torch.randn(B, H, SQ, d_v),
        torch.randn(B, H, SQ),
    )


# --- CPU flash kernels: not in torch's flop_registry ---------------------------------------------


@pytest.mark.parametrize("h_kv", [H, HKV], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_flash_forward(h_kv: int, causal: bool) -> None:
    q, k, v, *_ = qkv(h_kv)
    node = traced(lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal), q, k, v)
    expected = 4 * B * H * SQ * SK * D
    assert node_cost(node)[0] == expected == fwd_flops(B, H, SQ, SK, D, D)
    assert expected == sdpa_flop_count(q.shape, k.shape, v.shape)
    # torch's count for the GPU flash kernel on the same shapes
    assert expected == torch_count(lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal), q, k, v)


@pytest.mark.parametrize("h_kv", [H, HKV], ids=["mha", "gqa"])
def test_cpu_flash_backward(h_kv: int) -> None:
    q, k, v, go, out, lse = qkv(h_kv)
    node = traced(
        lambda go, q, k, v, out, lse: aten._scaled_dot_product_flash_attention_for_cpu_backward(go, q, k, v, out, lse, 0.0, True),
        go, q, k, v, out, lse,
    )
    expected = 10 * B * H * SQ * SK * D
    assert node_cost(node)[0] == expected == bwd_flops(B, H, SQ, SK, D, D)
    assert expected == 2.5 * fwd_flops(B, H, SQ, SK, D, D)
    assert expected == sdpa_backward_flop_count(go.shape, q.shape, k.shape, v.shape)
    z, e = torch.zeros(2, dtype=torch.int64), torch.empty(0)
    gpu = torch_count(
        lambda go, q, k, v, out, lse, z, e: aten._scaled_dot_product_flash_attention_backward(
            go, q, k, v, out, lse, e, e, SQ, SK, 0.0, True, z, z
        ),
        go, q, k, v, out, lse, z, e,
    )
    assert expected == gpu


@pytest.mark.parametrize("h_kv", [H, HKV], ids=["mha", "gqa"])
def test_sdpa_autograd_on_cpu_counts_forward_and_backward(h_kv: int) -> None:
    """F.scaled_dot_product_attention + autograd, as a CPU training step traces it."""
    q, k, v, *_ = (t.requires_grad_() for t in qkv(h_kv))

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(o.sum(), (q, k, v))

    gm = make_fx(step, tracing_mode="fake")(q, k, v)
    counts = {n.target: node_cost(n)[0] for n in gm.graph.nodes if n.op == "call_function"}
    assert counts[aten._scaled_dot_product_flash_attention_for_cpu.default] == fwd_flops(B, H, SQ, SK, D, D)
    assert counts[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] == bwd_flops(B, H, SQ, SK, D, D)


def test_llama_shape_cpu_flash() -> None:
    """b=16, h=32 (8 k/v heads), s=8192, d=128: 1.76e13 forward, 4.40e13 backward per layer."""
    b, h, s, d = 16, 32, 8192, 128
    with FakeTensorMode():
        q, go, out = (torch.empty(b, h, s, d, dtype=torch.bfloat16) for _ in range(3))
        k, v = (torch.empty(b, 8, s, d, dtype=torch.bfloat16) for _ in range(2))
        lse = torch.empty(b, h, s)
    fwd = traced(lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True), q, k, v)
    bwd = traced(
        lambda *a: aten._scaled_dot_product_flash_attention_for_cpu_backward(*a, 0.0, True), go, q, k, v, out, lse
    )
    assert node_cost(fwd)[0] == 4 * b * h * s * s * d == 17_592_186_044_416
    assert node_cost(bwd)[0] == 10 * b * h * s * s * d == 43_980_465_111_040


# --- the composite op, kept fused by capture --------------------------------------------------------


@pytest.mark.parametrize("h_kv, d_v", [(H, D), (HKV, D), (HKV, 48)], ids=["mha", "gqa", "gqa-dv48"])
def test_composite_sdpa(h_kv: int, d_v: int) -> None:
    q, k, v, *_ = qkv(h_kv, d_v)

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    node = traced(sdpa, q, k, v, pre_dispatch=True)  # pre-dispatch keeps the composite op
    assert node.target is aten.scaled_dot_product_attention.default
    expected = fwd_flops(B, H, SQ, SK, D, d_v)
    assert node_cost(node)[0] == expected == sdpa_flops(q.shape, k.shape, v.shape)
    assert expected == sdpa_flop_count(q.shape, k.shape, v.shape)
    if d_v != D:  # the CPU dispatch then takes the math path, whose bmms torch counts
        assert expected == torch_count(sdpa, q, k, v)


def test_sdpa_flops_any_batch_dims() -> None:
    assert sdpa_flops((SQ, D), (SK, D), (SK, 48)) == fwd_flops(1, 1, SQ, SK, D, 48)
    assert sdpa_flops((3, B, H, SQ, D), (3, B, HKV, SK, D), (3, B, HKV, SK, D)) == 3 * fwd_flops(B, H, SQ, SK, D, D)


# --- GPU (and other backend) kernels, traced on fake tensors through their meta kernels ------------

Z, E = torch.zeros(2, dtype=torch.int64), torch.empty(0)

FORWARD = {  # name: (op, call on q, k, v in (b, h, s, d))
    "flash": (aten._scaled_dot_product_flash_attention, lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v)),
    "efficient": (aten._scaled_dot_product_efficient_attention,
                  lambda q, k, v: aten._scaled_dot_product_efficient_attention(q, k, v, None, True)),
    "cudnn": (aten._scaled_dot_product_cudnn_attention,
              lambda q, k, v: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)),
    "overrideable": (aten._scaled_dot_product_fused_attention_overrideable,
                     lambda q, k, v: aten._scaled_dot_product_fused_attention_overrideable(q, k, v)),
    "math_for_mps": (aten._scaled_dot_product_attention_math_for_mps,
                     lambda q, k, v: aten._scaled_dot_product_attention_math_for_mps(q, k, v, enable_gqa=True)),
    # raw kernels take (b, s, h, d)
    "_flash_forward": (aten._flash_attention_forward, lambda q, k, v: aten._flash_attention_forward(
        *(t.transpose(1, 2) for t in (q, k, v)), None, None, SQ, SK, 0.0, True, False)),
    "_efficient_forward": (aten._efficient_attention_forward, lambda q, k, v: aten._efficient_attention_forward(
        *(t.transpose(1, 2) for t in (q, k, v)), None, None, None, SQ, SK, 0.0, 1)),
}
# FlopCounterMode agrees on these; the overrideable and MPS kernels it does not count (0), and the
# raw _efficient_attention_* it miscounts on dense (b, s, h, d) inputs, reading them as (b, h, s, d)
TORCH_AGREES = {"flash", "efficient", "cudnn", "_flash_forward", "_flash_backward"}


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize("h_kv, d_v", [(H, D), (HKV, 48)], ids=["mha", "gqa-dv48"])
def test_forward_variants(name: str, h_kv: int, d_v: int) -> None:
    op, call = FORWARD[name]
    q, k, v, *_ = qkv(h_kv, d_v)
    node = traced(call, q, k, v, op=op.default)
    expected = fwd_flops(B, H, SQ, SK, D, d_v)
    assert node_cost(node)[0] == expected == sdpa_flop_count(q.shape, k.shape, v.shape)
    if name in TORCH_AGREES:
        assert torch_count(call, q, k, v) == expected


BACKWARD = {  # name: (op, call on grad_out, q, k, v, out, logsumexp, int zeros, empty)
    "flash": (aten._scaled_dot_product_flash_attention_backward,
              lambda go, q, k, v, o, lse, z, e: aten._scaled_dot_product_flash_attention_backward(
                  go, q, k, v, o, lse, e, e, SQ, SK, 0.0, True, z, z)),
    "efficient": (aten._scaled_dot_product_efficient_attention_backward,
                  lambda go, q, k, v, o, lse, z, e: aten._scaled_dot_product_efficient_attention_backward(
                      go, q, k, v, e, o, lse, z, z, 0.0, [True, True, True, False], True)),
    "cudnn": (aten._scaled_dot_product_cudnn_attention_backward,
              lambda go, q, k, v, o, lse, z, e: aten._scaled_dot_product_cudnn_attention_backward(
                  go, q, k, v, o, lse, z, z, e, e, e, SQ, SK, 0.0, True)),
    "overrideable": (aten._scaled_dot_product_fused_attention_overrideable_backward,
                     lambda go, q, k, v, o, lse, z, e: aten._scaled_dot_product_fused_attention_overrideable_backward(
                         go, q, k, v, e, [True, True, True, False], o, lse, e, e, SQ, SK, 0.0, True, z, z)),
    "_flash_backward": (aten._flash_attention_backward, lambda go, q, k, v, o, lse, z, e: aten._flash_attention_backward(
        *(t.transpose(1, 2) for t in (go, q, k, v, o)), lse, None, None, SQ, SK, 0.0, True, z, e)),
    "_efficient_backward": (aten._efficient_attention_backward, lambda go, q, k, v, o, lse, z, e: aten._efficient_attention_backward(
        *(t.transpose(1, 2) for t in (go, q, k, v)), None, o.transpose(1, 2), None, None, SQ, SK, lse, 0.0, z, z, 1, False)),
}


@pytest.mark.parametrize("name", BACKWARD)
@pytest.mark.parametrize("h_kv, d_v", [(H, D), (HKV, 48)], ids=["mha", "gqa-dv48"])
def test_backward_variants(name: str, h_kv: int, d_v: int) -> None:
    op, call = BACKWARD[name]
    q, k, v, go, out, lse = qkv(h_kv, d_v)
    node = traced(call, go, q, k, v, out, lse, Z, E, op=op.default)
    expected = bwd_flops(B, H, SQ, SK, D, d_v)
    assert node_cost(node)[0] == expected == sdpa_backward_flop_count(go.shape, q.shape, k.shape, v.shape)
    if name in TORCH_AGREES:
        assert torch_count(call, go, q, k, v, out, lse, Z, E) == expected


def test_raw_cudnn_kernels_dense_and_varlen() -> None:
    """`_cudnn_attention_forward/backward` have no meta kernel: nodes built by hand."""
    q, k, v, go, out, lse = qkv(HKV, 48)
    fwd = hand_node(aten._cudnn_attention_forward.default, (q, k, v, None, None, None, SQ, SK, True), (out, lse))
    assert node_cost(fwd)[0] == fwd_flops(B, H, SQ, SK, D, 48)
    bwd = hand_node(aten._cudnn_attention_backward.default, (go, q, k, v, out, lse, Z, Z, E, E, E, SQ, SK, 0.0, True), (q, k, v))
    assert node_cost(bwd)[0] == bwd_flops(B, H, SQ, SK, D, 48)
    # varlen: two sequences of 16 and 24 tokens packed as (total, h, d); real offsets give exact lengths
    cum = torch.tensor([0, 16, 40], dtype=torch.int32)
    q, go, out = (torch.randn(40, H, D) for _ in range(3))
    k, v = (torch.randn(40, HKV, D) for _ in range(2))
    per_seq = fwd_flops(1, H, 16, 16, D, D) + fwd_flops(1, H, 24, 24, D, D)
    fwd = hand_node(aten._cudnn_attention_forward.default, (q, k, v, None, cum, cum, 24, 24, True), (out, lse))
    assert node_cost(fwd)[0] == per_seq
    bwd = hand_node(aten._cudnn_attention_backward.default, (go, q, k, v, out, lse, Z, Z, E, cum, cum, 24, 24, 0.0, True), (q, k, v))
    assert node_cost(bwd)[0] == 2.5 * per_seq


def test_flash_forward_no_dropout_inplace() -> None:
    cum = torch.tensor([0, 16, 40], dtype=torch.int32)
    out, q = torch.empty(40, H, D), torch.randn(40, H, D)
    k, v = (torch.randn(40, HKV, D) for _ in range(2))
    node = traced(
        lambda o, q, k, v, c: aten._flash_attention_forward_no_dropout_inplace(o, q, k, v, c, c, 24, 24, 0.0, True, False),
        out, q, k, v, cum,
    )
    # fake offsets: torch's convention counts every sequence at max length
    assert node_cost(node)[0] == 2 * fwd_flops(1, H, 24, 24, D, D)


def test_native_multi_head_attention() -> None:
    b, t, e, heads = 2, 10, 64, 4
    x = torch.randn(b, t, e)
    w_qkv, b_qkv, w_out, b_out = torch.randn(3 * e, e), torch.randn(3 * e), torch.randn(e, e), torch.randn(e)
    node = traced(lambda *a: aten._native_multi_head_attention(*a[:3], e, heads, *a[3:], None, False), x, x, x, w_qkv, b_qkv, w_out, b_out)
    assert node_cost(node)[0] == 2 * b * t * e * 3 * e + fwd_flops(b, 1, t, t, e, e) + 2 * b * t * e * e


# --- other training ops: torch's formulas, non-zero and equal to FlopCounterMode ----------------------


def _conv_step(x: torch.Tensor, w: torch.Tensor) -> tuple:
    y = F.conv2d(x, w, padding=1)
    return torch.autograd.grad(y.sum(), (x, w))


COMMON = {  # name: (op, fn, args, closed form)
    "mm": (aten.mm.default, torch.mm, (torch.randn(8, 16), torch.randn(16, 4)), 2 * 8 * 16 * 4),
    "addmm": (aten.addmm.default, torch.addmm, (torch.randn(4), torch.randn(8, 16), torch.randn(16, 4)), 2 * 8 * 16 * 4),
    "bmm": (aten.bmm.default, torch.bmm, (torch.randn(3, 8, 16), torch.randn(3, 16, 4)), 2 * 3 * 8 * 16 * 4),
    "baddbmm": (aten.baddbmm.default, torch.baddbmm, (torch.randn(3, 8, 4), torch.randn(3, 8, 16), torch.randn(3, 16, 4)),
                2 * 3 * 8 * 16 * 4),
    # (n=2, c_in=3, 8x8) * (c_out=5, 3x3), same padding: 2 * n*c_out*8*8 * c_in*3*3
    "convolution": (aten.convolution.default, lambda x, w: F.conv2d(x, w, padding=1),
                    (torch.randn(2, 3, 8, 8), torch.randn(5, 3, 3, 3)), 2 * 2 * 5 * 64 * 27),
    # grad input + grad weight: 2x forward
    "convolution_backward": (aten.convolution_backward.default, _conv_step,
                             (torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(5, 3, 3, 3, requires_grad=True)),
                             2 * 2 * 2 * 5 * 64 * 27),
}


@pytest.mark.parametrize("name", COMMON)
def test_common_training_ops(name: str) -> None:
    op, fn, args, expected = COMMON[name]
    node = traced(fn, *args, op=op)
    assert node_cost(node)[0] == expected > 0
    if name != "convolution_backward":  # the traced step also holds the forward conv
        assert torch_count(fn, *args) == expected


# --- a formula that fails is logged and counted elementwise, not as zero ------------------------------


def test_failing_formula_falls_back_to_elementwise() -> None:
    out = torch.randn(8, 4)
    node = hand_node(aten.mm.default, (torch.randn(8, 16), torch.randn(16, 4)), out)
    next(iter(node.graph.nodes)).meta.pop("val")  # the formula now sees None for an input
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # the suite runs without pytest's logging plugin (no caplog)
    logger = logging.getLogger("dtplan.ir.flops")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    try:
        flops, _ = node_cost(node)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert flops == out.numel()
    assert any("aten.mm.default" in r.getMessage() for r in records)


# --- a whole training step of each example against FlopCounterMode on one device ---------------------


def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


#: the CPU flash kernels torch's registry lacks, given torch's own formulas
#: (FlopCounterMode counts them as zero otherwise)
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


@pytest.mark.parametrize("name", ["mlp", "gpt", "llama", "cnn"])
def test_training_step_flops_equal_flop_counter_mode(name: str) -> None:
    """The predicted FLOPs of each example's training step: the ops
    FlopCounterMode counts (matmuls, convolutions, attention forward and
    backward) sum to its count of the real step on one device, exactly; the
    rest of the prediction is elementwise work it does not count (one FLOP
    per output element), under 10% of the whole."""
    from conftest import example_path

    from dtplan.ir.capture import capture_training, training_loss
    from dtplan.ir.modelfile import load_model_file
    from dtplan.ir.precision import Precision
    from torch.utils.flop_counter import flop_registry

    mf = load_model_file(example_path(name))
    model, inputs = mf.build(train=True)
    graph = capture_training(model, inputs, mf.loss_fn).graph
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        training_loss(model, mf.loss_fn, inputs, Precision()).backward()
    counted_ops = set(flop_registry) | set(CPU_ATTENTION)
    ours = sum(n.flops for n in graph if getattr(n.target, "_overloadpacket", None) in counted_ops)
    total = sum(n.flops for n in graph)
    assert ours == counter.get_total_flops() > 0
    assert 0 <= total - ours < 0.1 * total
    if name in ("gpt", "llama"):
        attention = {str(k) for k in counter.get_flop_counts()["Global"]}
        assert {"aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention_for_cpu_backward"} <= attention
