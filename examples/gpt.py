"""GPT-style decoder-only transformer example model for dtplan.

Model: token embedding ``tok_emb`` + learned position embedding ``pos_emb``,
``layers`` pre-LayerNorm blocks (``ln1`` -> causal self-attention ``attn`` with
separate ``q``/``k``/``v`` projections and output projection ``o``;
``ln2`` -> GELU MLP ``mlp`` with ``fc`` (dim -> 4*dim) and ``proj``
(4*dim -> dim)), then a final LayerNorm ``ln_f`` and ``lm_head`` (no bias).
The separate q/k/v/o projections let a planner column-shard q/k/v and
row-shard o (Megatron style).

Options (passed as ``--model-arg key=value``; strings are converted to int):

* ``batch``  -- batch size of the example input (default 4)
* ``seq``    -- sequence length / position table size (default 16)
* ``dim``    -- model width (default 64)
* ``heads``  -- attention heads; must divide ``dim`` (default 4)
* ``layers`` -- number of transformer blocks (default 2)
* ``vocab``  -- vocabulary size (default 256)

Input: token ids of shape ``(batch, seq)``, int64, deterministic.
Output: logits of shape ``(batch, seq, vocab)``.
Loss: next-token cross entropy of ``logits[:, :-1]`` against ``ids[:, 1:]``.

The file only depends on ``torch`` and works under ``with torch.device("meta"):``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DEFAULTS",
    "Attention",
    "MLP",
    "Block",
    "GPT",
    "build_model",
    "example_inputs",
    "loss_fn",
]

DEFAULTS = {"batch": 4, "seq": 16, "dim": 64, "heads": 4, "layers": 2, "vocab": 256}


def _config(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"gpt example: unknown option(s) {', '.join(repr(k) for k in unknown)}; "
            f"accepted options: {', '.join(sorted(DEFAULTS))}"
        )
    cfg = dict(DEFAULTS)
    for key, value in options.items():
        if isinstance(value, bool):
            raise ValueError(f"gpt example: option {key!r} must be an integer, got {value!r}")
        try:
            ivalue = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"gpt example: option {key!r} must be an integer, got {value!r}") from None
        if ivalue <= 0:
            raise ValueError(f"gpt example: option {key!r} must be positive, got {ivalue}")
        cfg[key] = ivalue
    if cfg["dim"] % cfg["heads"] != 0:
        raise ValueError(
            f"gpt example: dim ({cfg['dim']}) must be divisible by heads ({cfg['heads']})"
        )
    if cfg["seq"] < 2:
        raise ValueError(f"gpt example: seq must be at least 2 for next-token loss, got {cfg['seq']}")
    return cfg


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=True)
        # no key bias: softmax ignores it, so its gradient is pure rounding
        # noise, which Adam turns into lr-sized steps that no two runs share
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=True)
        self.o = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim, bias=True)
        self.proj = nn.Linear(4 * dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.shape
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_model(**options) -> nn.Module:
    cfg = _config(options)
    torch.manual_seed(0)
    return GPT(cfg["vocab"], cfg["seq"], cfg["dim"], cfg["heads"], cfg["layers"])


def example_inputs(**options) -> tuple:
    cfg = _config(options)
    b, t, vocab = cfg["batch"], cfg["seq"], cfg["vocab"]
    ids = (torch.arange(b * t, dtype=torch.int64).reshape(b, t) * 7) % vocab
    return (ids,)


def loss_fn(output: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    ids = inputs[0]
    logits = output[:, :-1]
    targets = ids[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
