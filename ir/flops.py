"""FLOPs and memory traffic of one ATen node, from torch's FLOP formulas."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_flatten, tree_map_only

__all__ = ["node_cost", "sdpa_flops"]

aten = torch.ops.aten


def sdpa_flops(q_shape, k_shape, v_shape) -> int:
    """Forward FLOPs of attention: QK^T and PV, 2 FLOPs per multiply-add."""
    *batch, s_q, d = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    b = 1
    for x in batch:
        b *= x
    return 2 * b * s_q * s_k * d + 2 * b * s_q * s_k * d_v


def node_cost(fx_node: torch.fx.Node) -> tuple[int, int]:
    """(FLOPs, bytes read + written) of an ATen call node on global shapes."""
    vals = tree_map_only(torch.fx.Node, lambda n: n.meta.get("val"), (fx_node.args, fx_node.kwargs))
    out = fx_node.meta.get("val")
    tensors = [t for t in tree_flatten((vals, out))[0] if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    target = fx_node.target
    if getattr(target, "is_view", False):
        return 0, 0  # views move no data
    if target is aten.scaled_dot_product_attention.default:
        q, k, v = vals[0][:3]
        return sdpa_flops(q.shape, k.shape, v.shape), nbytes
    formula = flop_registry.get(target) or flop_registry.get(getattr(target, "overloadpacket", None))
    if formula is None:
        # elementwise and data movement: count one FLOP per output element
        numel = sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return numel, nbytes
    args, kwargs = vals
    try:
        return int(formula(*args, out_val=out, **kwargs)), nbytes
    except Exception:  # noqa: BLE001 - a formula that rejects these args: fall back
        return 0, nbytes
