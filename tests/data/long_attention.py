"""One causal self-attention layer over a long sequence, batch 1 and one head:
neither the batch nor the heads split, so a mesh divides the work only by
splitting the sequence (context parallel). A model file for
tests/test_sequence.py.

Options: ``seq`` (default 256), ``dim`` (64), ``causal`` (1: causal, 0: not).
Input: (1, seq, dim) float32. Loss: mean of the squared output.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULTS = {"seq": 256, "dim": 64, "causal": 1}


def _config(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"long_attention: unknown option(s) {unknown}; accepted: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **{k: int(v) for k, v in options.items()}}


class LongAttention(nn.Module):
    def __init__(self, dim: int, causal: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).chunk(3, dim=-1))  # (1, 1, seq, dim) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.out(y.squeeze(1))


def build_model(**options) -> nn.Module:
    cfg = _config(options)
    torch.manual_seed(0)
    return LongAttention(cfg["dim"], bool(cfg["causal"]))


def example_inputs(**options) -> tuple:
    cfg = _config(options)
    n = cfg["seq"] * cfg["dim"]
    return (torch.sin(torch.arange(n, dtype=torch.float32) * 0.37).reshape(1, cfg["seq"], cfg["dim"]),)


def loss_fn(output: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()
