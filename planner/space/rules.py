"""dtplan's own sharding rules, for ops DTensor has no rule for.

Each rule returns per-mesh-axis placement lists `[output(s)..., inputs...]`
(the inputs in `Node.refs()` order), like DTensor's single-dim strategies; the
planner expands them over every mesh axis. Every op here is computed by the
runtime as the same op on local shards, so a rule may only list placements
under which that is exact.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from dtplan.ir.graph import Node, Ref, TensorMeta
from dtplan.planner.space._dtensor import dtensor_rule_kind

__all__ = ["RULES", "is_elementwise", "is_random", "lookup", "pointwise_rule", "register_rule"]

aten = torch.ops.aten
Rule = Callable[[Node, dict[str, TensorMeta]], list[list]]
RULES: dict[object, Rule] = {}


def register_rule(*ops: object) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return wrap


def lookup(op: object) -> Rule | None:
    """Our rule for `op`: a registered one, else for an elementwise op DTensor
    has no rule for (hardswish and its backward, say) the generic one."""
    rule = RULES.get(op)
    if rule is None and is_elementwise(op) and dtensor_rule_kind(op) is None:
        return pointwise_rule
    return rule


#: elementwise ops torch does not tag `pointwise` (activations' backwards, MobileNet's hardswish)
_UNTAGGED_ELEMENTWISE = {
    getattr(aten, name).default
    for name in (
        "hardswish", "hardswish_backward", "hardsigmoid_backward", "hardtanh_backward", "elu_backward",
        "leaky_relu_backward", "softplus_backward", "mish_backward", "threshold_backward",
    )
    if hasattr(aten, name)
}


def is_elementwise(op: object) -> bool:
    return isinstance(op, torch._ops.OpOverload) and (torch.Tag.pointwise in op.tags or op in _UNTAGGED_ELEMENTWISE)


def pointwise_rule(node: Node, metas: dict[str, TensorMeta]) -> list[list]:
    """An elementwise op: every tensor input of the output's shape split as
    the output is (inputs that broadcast are not split: no rule for those)."""
    if not isinstance(node.meta, TensorMeta):
        return []
    shape = node.meta.shape
    if any(metas[r].shape != shape for r in node.refs()):
        return []
    return [[Shard(d)] * (1 + len(node.refs())) for d in range(len(shape))]


def _mask_placement(mask: TensorMeta, dim_from_end: int):
    """A broadcastable attention mask follows the batch/head split only where it
    has that dimension in full."""
    d = len(mask.shape) - dim_from_end
    return Shard(d) if d >= 0 and mask.shape[d] > 1 else Replicate()


def _dropout_p(node: Node, position: int) -> float:
    """An attention op's dropout probability (positional or keyword)."""
    if len(node.args) > position and not isinstance(node.args[position], Ref):
        return float(node.args[position] or 0.0)
    return float(dict(node.kwargs).get("dropout_p", 0.0) or 0.0)


def _sequence(node: Node, masks: list[TensorMeta], dropout_at: int) -> list:
    """Context parallelism's placements for the inputs q, k, v (and masks):
    the queries split on the sequence (dim 2), keys and values whole (an
    all-gather of K and V), a mask split with the queries where it has their
    dimension in full. Each query row attends to every key as on one device;
    a causal op runs with the mask of its rows' global offsets
    (`dtplan.runtime.lower`). Not with dropout: the draws would differ."""
    if _dropout_p(node, dropout_at):
        return []
    return [Shard(2), Replicate(), Replicate()] + [_mask_placement(m, 2) for m in masks]


@register_rule(aten.scaled_dot_product_attention.default)
def sdpa_rule(node: Node, metas: dict[str, TensorMeta]) -> list[list]:
    """Attention over (B, H, S, D) is independent per batch row and per head,
    and per query row given every key (context parallel, `_sequence`)."""
    refs = node.refs()
    masks = [metas[r] for r in refs[3:]]
    rules = []
    for dim in (0, 1):  # batch, heads
        s = Shard(dim)
        rules.append([s, s, s, s] + [_mask_placement(m, 4 - dim) for m in masks])
    if seq := _sequence(node, masks, 4):
        rules.append([Shard(2), *seq])
    return rules


@register_rule(
    aten._scaled_dot_product_flash_attention_for_cpu.default,
)
def sdpa_cpu_flash_rule(node: Node, metas: dict[str, TensorMeta]) -> list[list]:
    """The CPU flash kernel returns (out (B,H,S,D), logsumexp (B,H,S))."""
    refs = node.refs()
    masks = [metas[r] for r in refs[3:]]
    rules = []
    for dim in (0, 1):
        s = Shard(dim)
        rules.append([s, s, s, s, s] + [_mask_placement(m, 4 - dim) for m in masks])
    if seq := _sequence(node, masks, 3):
        rules.append([Shard(2), Shard(2), *seq])
    return rules


@register_rule(aten.convolution.default)
def convolution_rule(node: Node, metas: dict[str, TensorMeta]) -> list[list]:
    """Batch-parallel convolution: DTensor's rule, run on local shards (its own
    runtime path rejects a batch dim split over two mesh axes)."""
    rule = [Shard(0), Shard(0), Replicate()]
    if len(node.refs()) > 2:
        rule.append(Replicate())  # bias
    return [rule]


@register_rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def sdpa_cpu_flash_backward_rule(node: Node, metas: dict[str, TensorMeta]) -> list[list]:
    """(grad_q, grad_k, grad_v) from (grad_out, q, k, v, out, logsumexp[, mask]):
    per batch row and per head, like the forward."""
    refs = node.refs()
    masks = [metas[r] for r in refs[6:]]
    rules = []
    for dim in (0, 1):
        s = Shard(dim)
        rules.append([s] * 9 + [_mask_placement(m, 4 - dim) for m in masks])
    if seq := _sequence(node, masks, 6):
        # context parallel: a rank's query rows give their own grad_q and a
        # partial sum of grad_k and grad_v over every key
        q, k, v, *mask = seq
        s = Shard(2)
        rules.append([s, Partial("sum"), Partial("sum"), s, q, k, v, s, s, *mask])
    return rules


@register_rule(aten.convolution_backward.default)
def convolution_backward_rule(node: Node, metas: dict[str, TensorMeta]) -> list[list]:
    """Batch-parallel: grad_input stays batch-sharded, grad_weight and grad_bias
    are partial sums over the batch shards."""
    outs = [Shard(0), Partial("sum"), None if node.meta[2] is None else Partial("sum")]
    return [outs + [Shard(0), Shard(0), Replicate()]]


@register_rule(aten.nll_loss_backward.default)
def nll_loss_backward_rule(node: Node, metas: dict[str, TensorMeta]) -> list[list]:
    """grad_input (N, C) from (grad_output, self, target[, weight], total_weight):
    row i depends on row i of self and target only, so rows split evenly,
    given the global total_weight (and, without reduction, the rows' grads).
    DTensor's rule rejects the absent class weight."""
    refs = node.refs()
    self_meta = metas[refs[1]]
    if len(self_meta.shape) != 2:
        return []
    grad_out = Shard(0) if len(metas[refs[0]].shape) >= 1 else Replicate()
    weight = [Replicate()] if len(refs) == 5 else []
    return [[Shard(0), grad_out, Shard(0), Shard(0), *weight, Replicate()]]


@register_rule(aten.fill.Scalar)
def fill_rule(node: Node, metas: dict[str, TensorMeta]) -> list[list]:
    """A constant in the input's shape: any split of the input, never a partial sum."""
    ndim = len(metas[node.refs()[0]].shape)
    return [[Shard(d), Shard(d)] for d in range(ndim)]


@register_rule(aten.native_dropout.default)
def dropout_rule(node: Node, metas: dict[str, TensorMeta]) -> list[list]:
    """(out, mask) from x, split like x. The runtime draws the whole mask on
    every rank, as one device draws it for the same seed, and keeps this
    rank's piece (`dtplan.runtime.lower`), so the values equal the single-device
    step's; DTensor's rule would draw each shard from its own offset."""
    ndim = len(metas[node.refs()[0]].shape)
    return [[Shard(d), Shard(d), Shard(d)] for d in range(ndim)]


def is_random(op: object) -> bool:
    """Ops that draw from the random generator."""
    return isinstance(op, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in op.tags
