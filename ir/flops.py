"""FLOPs and memory traffic of one ATen node, from torch's FLOP formulas.

Ops in `torch.utils.flop_counter.flop_registry` use torch's formula, so the
numbers agree with `FlopCounterMode`. Attention ops torch leaves out (the
CPU flash kernels, the "overrideable" fused kernels, MPS math, the raw cuDNN
kernels, in-place varlen flash, native multi-head attention, the composite
`scaled_dot_product_attention`) or miscounts (dense raw `_efficient_attention_*`)
get formulas here, built on torch's own `sdpa_flop_count` /
`sdpa_backward_flop_count` and flash/varlen formulas.

Attention convention (torch's): forward = 4*b*h*s_q*s_k*d when d_v == d
(QK^T plus PV, 2 FLOPs per multiply-add), backward = 2.5x that (recompute
QK^T, dP, dV, dQ, dK). Heads are the query's: grouped-query attention is
counted as the kernel computes it, after broadcasting k/v to every query
head. Masks are not modelled: causal attention counts the full s_q x s_k
rectangle, as torch does, so it is an upper bound (about 2x for causal).

An op whose formula raises on its arguments is counted as one FLOP per
output element, like an op without a formula, but it is not silent:
:func:`flop_fallbacks` finds such nodes in a captured graph, and the plan
lists them (`Plan.flop_fallbacks`) beside the ops that fell back to
Replicate, since their compute time rests on a guess.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from dtplan.ir.errors import error_line

if TYPE_CHECKING:
    from dtplan.ir.graph import Graph, Node

__all__ = ["FlopFallback", "flop_fallbacks", "node_cost", "sdpa_flops"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

# torch's formulas for the raw kernels (dense or nested/varlen); get_raw=True, so they take tensors
_flash_fwd = flop_registry[aten._flash_attention_forward]
_flash_bwd = flop_registry[aten._flash_attention_backward]
_efficient_fwd = flop_registry[aten._efficient_attention_forward]
_efficient_bwd = flop_registry[aten._efficient_attention_backward]


def sdpa_flops(q_shape: Any, k_shape: Any, v_shape: Any) -> int:
    """Forward FLOPs of attention: QK^T and PV, 2 FLOPs per multiply-add.

    Any leading batch dims; the query's (so its heads, under GQA) are counted.
    Equals torch's `sdpa_flop_count` on 4-D (b, h, s, d) shapes."""
    *batch, s_q, d = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * math.prod(batch) * s_q * s_k * (d + d_v)


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any, **__: Any) -> int:
    return sdpa_flop_count(q.shape, k.shape, v.shape)


def _bwd(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any, **__: Any) -> int:
    return sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)


def _bhsd(t: torch.Tensor) -> tuple[int, ...]:
    """(b, h, s, d) of a (b, s, h, d) tensor."""
    b, s, h, d = t.shape
    return b, h, s, d


def _efficient_attention_fwd(q, k, v, bias, cu_q, *rest: Any, **kwargs: Any) -> int:
    """Raw kernel, (b, s, h, d). torch's formula reads dense inputs as (b, h, s, d), unlike
    its flash one (wrong counts, or an error under GQA / s_q != s_k): transpose them first."""
    if cu_q is None:
        return sdpa_flop_count(_bhsd(q), _bhsd(k), _bhsd(v))
    return _efficient_fwd(q, k, v, bias, cu_q, *rest, **kwargs)


def _efficient_attention_bwd(g, q, k, v, bias, out, cu_q, *rest: Any, **kwargs: Any) -> int:
    if cu_q is None:
        return sdpa_backward_flop_count(_bhsd(g), _bhsd(q), _bhsd(k), _bhsd(v))
    return _efficient_bwd(g, q, k, v, bias, out, cu_q, *rest, **kwargs)


def _varlen_fwd(q, k, v, cum_q, cum_k, max_q, max_k) -> int:
    """Flash layout: (b, s, h, d) dense, or (total, h, d) with cumulative sequence offsets."""
    return _flash_fwd(q, k, v, cum_q, cum_q if cum_k is None else cum_k, max_q, max_k)


def _cudnn_fwd(q, k, v, bias, cum_q, cum_k, max_q, max_k, *_: Any, **__: Any) -> int:
    """Dense (b, h, s, d) like `_scaled_dot_product_cudnn_attention`, or varlen (total, h, d)."""
    return _fwd(q, k, v) if cum_q is None else _varlen_fwd(q, k, v, cum_q, cum_k, max_q, max_k)


def _cudnn_bwd(g, q, k, v, out, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, *_: Any, **__: Any) -> int:
    return _bwd(g, q, k, v) if q.dim() == 4 else _flash_bwd(g, q, k, v, out, lse, cum_q, cum_k, max_q, max_k)


def _mha(query, key, value, embed_dim, num_head, qkv_w, qkv_b, proj_w, *_: Any, **__: Any) -> int:
    """`_native_multi_head_attention` on (b, s, e): q/k/v projections, attention, output projection."""
    n_q, n_kv = query.numel() // embed_dim, key.numel() // embed_dim
    projections = 2 * embed_dim * embed_dim * (n_q + 2 * n_kv) + 2 * n_q * embed_dim * proj_w.shape[0]
    return projections + sdpa_flops(query.shape, key.shape, value.shape)


def _composite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any, **__: Any) -> int:
    return sdpa_flops(q.shape, k.shape, v.shape)


# attention ops torch's flop_registry lacks or miscounts; they take precedence over it.
# (torch.nn.attention.varlen registers its custom ops' formulas there when imported.)
ATTENTION_FLOPS: dict[Any, Callable[..., int]] = {
    aten._efficient_attention_forward: _efficient_attention_fwd,
    aten._efficient_attention_backward: _efficient_attention_bwd,
    aten.scaled_dot_product_attention: _composite,
    aten._scaled_dot_product_attention_math: _composite,
    aten._scaled_dot_product_attention_math_for_mps: _composite,
    aten._scaled_dot_product_flash_attention_for_cpu: _fwd,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _bwd,
    aten._scaled_dot_product_fused_attention_overrideable: _fwd,
    aten._scaled_dot_product_fused_attention_overrideable_backward: _bwd,
    aten._cudnn_attention_forward: _cudnn_fwd,
    aten._cudnn_attention_backward: _cudnn_bwd,
    aten._flash_attention_forward_no_dropout_inplace: lambda out, *a, **kw: _varlen_fwd(*a[:7]),
    aten._native_multi_head_attention: _mha,
}


def _formula(target: Any) -> Callable[..., int] | None:
    packet = getattr(target, "overloadpacket", target)
    if (fn := ATTENTION_FLOPS.get(packet)) is not None:
        return lambda *args, out_val=None, **kwargs: fn(*args, **kwargs)
    return flop_registry.get(target) or flop_registry.get(packet)


@dataclass(frozen=True, slots=True)
class FlopFallback:
    """A node whose FLOP formula raised: counted one FLOP per output element.
    `reason` is the formula's error, one line."""

    node: str
    op: str
    reason: str


def _formula_flops(target: Any, args: Any, kwargs: Any, out: Any) -> int:
    """The formula's FLOPs for these args; raises what the formula raises."""
    formula = _formula(target)
    assert formula is not None
    return int(formula(*args, out_val=out, **kwargs))


def _elementwise(out: Any) -> int:
    """The count used where no formula gives one: an output element, a FLOP."""
    return sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


def node_cost(fx_node: torch.fx.Node) -> tuple[int, int]:
    """(FLOPs, bytes read + written) of an ATen call node on global shapes.

    Ops without a formula (elementwise, reductions, data movement) count one
    FLOP per output element; so does an op whose formula rejects its args,
    which :func:`flop_fallbacks` then lists."""
    vals = tree_map_only(torch.fx.Node, lambda n: n.meta.get("val"), (fx_node.args, fx_node.kwargs))
    out = fx_node.meta.get("val")
    tensors = [t for t in tree_flatten((vals, out))[0] if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    target = fx_node.target
    if getattr(target, "is_view", False):
        return 0, 0  # views move no data
    if _formula(target) is not None:
        args, kwargs = vals
        try:
            return _formula_flops(target, args, kwargs, out), nbytes
        except Exception as e:  # noqa: BLE001 - counted elementwise here; flop_fallbacks lists it for the plan
            log.debug("FLOP formula for %s failed (%s); counting it elementwise", target, error_line(e, 200))
    return _elementwise(out), nbytes


def _meta_value(meta: Any) -> Any:
    """A meta tensor (or a tuple of them) with an IR value's shape, stride and dtype."""
    from dtplan.ir.graph import TensorMeta

    if isinstance(meta, TensorMeta):
        return torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")
    if isinstance(meta, tuple):
        return tuple(_meta_value(m) for m in meta)
    return None


def _with_values(value: Any, graph: Graph) -> Any:
    from dtplan.ir.graph import Ref

    if isinstance(value, Ref):
        return _meta_value(graph[value.name].meta)
    if isinstance(value, tuple):
        return tuple(_with_values(v, graph) for v in value)
    return value


def flop_fallback(node: Node, graph: Graph) -> FlopFallback | None:
    """Whether `node`'s FLOPs are the one-per-element count because its
    formula raised (then why), from the IR alone: the formula is run again
    on meta tensors of the node's recorded shapes. Only a node whose count
    equals that fallback is tried, so this costs nothing for the rest."""
    target = node.target
    if node.is_placeholder or node.is_getitem or getattr(target, "is_view", False) or _formula(target) is None:
        return None
    metas = node.meta if isinstance(node.meta, tuple) else (node.meta,)
    if node.flops != sum(m.numel for m in metas if m is not None):
        return None  # the formula gave its own count at capture
    out = _meta_value(node.meta)
    args = _with_values(node.args, graph)
    kwargs = {k: _with_values(v, graph) for k, v in node.kwargs}
    try:
        _formula_flops(target, args, kwargs, out)
    except Exception as e:  # noqa: BLE001 - what node_cost met: the reason the plan lists
        return FlopFallback(node.name, node.op_name, f"FLOP formula failed ({error_line(e, 200)}); counted one FLOP per output element")
    return None


def flop_fallbacks(graph: Graph) -> tuple[FlopFallback, ...]:
    """Every node of a captured graph whose FLOP formula raised, in graph order."""
    return tuple(f for n in graph if (f := flop_fallback(n, graph)) is not None)
