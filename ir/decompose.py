"""Decompositions dtplan applies while capturing a training step: ops that
reduce over the batch, so that a batch shard computes its part of the
whole batch's result.

Batch norm in training mode reduces over the batch: run on a batch shard as
one op, it would normalise with that shard's statistics. Written as sums (a
sum over a batch shard is a partial sum, which the planner reduces where it
is read), it computes the statistics of the whole batch wherever the batch
is split, as SyncBatchNorm does, at the cost of two all-reduces of one value
per channel forward and two backward.
"""
from __future__ import annotations

import torch
from torch._decomp import get_decompositions

__all__ = ["TRAINING_DECOMPOSITIONS"]

aten = torch.ops.aten


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape([1, -1] + [1] * (ndim - 2))


def batch_norm_functional(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """`_native_batch_norm_legit_functional` with mean and variance as sums
    over the batch and spatial dims (torch's own decomposition uses
    `var_mean`, which has no partial form)."""
    dims = [0, *range(2, input.dim())]
    n = input.numel() // input.shape[1]
    acc = input.to(torch.float32) if input.dtype in (torch.float16, torch.bfloat16) else input
    if training:
        mean = acc.sum(dims, keepdim=True) / n
        centred = acc - mean
        biased_var = (centred * centred).sum(dims, keepdim=True) / n
        rstd = torch.rsqrt(biased_var + eps)
        out = centred * rstd
        save_mean, save_rstd = mean.reshape(-1), rstd.reshape(-1)
        new_mean = momentum * save_mean + (1 - momentum) * running_mean
        new_var = momentum * (biased_var.reshape(-1) * (n / (n - 1))) + (1 - momentum) * running_var
    else:
        save_mean, save_rstd = running_mean, torch.rsqrt(running_var + eps)
        out = (acc - _per_channel(save_mean, input.dim())) * _per_channel(save_rstd, input.dim())
        new_mean, new_var = running_mean, running_var
    if weight is not None:
        out = out * _per_channel(weight, input.dim())
    if bias is not None:
        out = out + _per_channel(bias, input.dim())
    return out.to(input.dtype), save_mean.to(input.dtype), save_rstd.to(input.dtype), new_mean, new_var


#: passed to AOT autograd when it traces a training step. The loss's
#: `nll_loss_forward` (mean over the rows a target does not ignore) becomes a
#: gather, a masked sum and a division by the count: the sums split over
#: row shards as partial sums, where the fused op has no exact split (the
#: logits would be gathered whole on every device).
TRAINING_DECOMPOSITIONS = {
    aten._native_batch_norm_legit_functional.default: batch_norm_functional,
    **get_decompositions([aten.native_batch_norm_backward.default, aten.nll_loss_forward.default]),
}
