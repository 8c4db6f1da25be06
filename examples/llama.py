"""Llama-style decoder-only transformer example model for dtplan.

Model: ``tok_embeddings`` -> ``layers`` (an ``nn.ModuleList`` of blocks, each
``attention_norm`` (RMSNorm) -> grouped-query ``attention`` (``wq``, ``wk``,
``wv``, ``wo``, no bias, rotary position embeddings in real arithmetic,
rotate-half style, causal SDPA) and ``ffn_norm`` (RMSNorm) -> SwiGLU
``feed_forward`` (``w1`` gate, ``w3`` up, ``w2`` down, no bias)) -> final
``norm`` (RMSNorm) -> ``output`` Linear (no bias, untied).

Sizes come from a preset (see ``PRESETS``):

* ``tiny`` (default): dim 64, 2 layers, 8 heads, 4 kv heads, ffn 128,
  vocab 256, batch 4, seq 16 -- runs in milliseconds on CPU.
* ``8b``:  Llama-3-8B shapes (dim 4096, 32 layers, 32 heads, 8 kv heads,
  ffn 14336, vocab 128256), batch 16, seq 8192.
* ``70b``: Llama-3-70B shapes (dim 8192, 80 layers, 64 heads, 8 kv heads,
  ffn 28672, vocab 128256), batch 16, seq 8192.

The ``8b`` and ``70b`` presets are meant for planning only: build them under
``with torch.device("meta"):`` (instant, no memory is allocated).

Options (passed as ``--model-arg key=value``):

* ``preset`` -- one of ``tiny``, ``8b``, ``70b`` (default ``tiny``)
* ``layers`` -- override the preset's number of layers
* ``batch``  -- override the preset's example batch size
* ``seq``    -- override the preset's example sequence length (also the
  length of the precomputed rotary tables)

Input: token ids of shape ``(batch, seq)``, int64, deterministic.
Output: logits of shape ``(batch, seq, vocab)``.
Loss: next-token cross entropy of ``logits[:, :-1]`` against ``ids[:, 1:]``.

The file only depends on ``torch``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PRESETS",
    "OPTIONS",
    "RMSNorm",
    "Attention",
    "FeedForward",
    "TransformerBlock",
    "Llama",
    "build_model",
    "example_inputs",
    "loss_fn",
]

PRESETS = {
    "tiny": dict(
        dim=64, layers=2, heads=8, kv_heads=4, ffn=128, vocab=256,
        batch=4, seq=16, norm_eps=1e-5, rope_theta=10000.0,
    ),
    "8b": dict(
        dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256,
        batch=16, seq=8192, norm_eps=1e-5, rope_theta=500000.0,
    ),
    "70b": dict(
        dim=8192, layers=80, heads=64, kv_heads=8, ffn=28672, vocab=128256,
        batch=16, seq=8192, norm_eps=1e-5, rope_theta=500000.0,
    ),
}

OPTIONS = ("preset", "layers", "batch", "seq")
_INT_OVERRIDES = ("layers", "batch", "seq")


def _config(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"llama example: unknown option(s) {', '.join(repr(k) for k in unknown)}; "
            f"accepted options: {', '.join(sorted(OPTIONS))}"
        )
    preset = str(options.get("preset", "tiny")).lower()
    if preset not in PRESETS:
        raise ValueError(
            f"llama example: unknown preset {options.get('preset')!r}; "
            f"accepted presets: {', '.join(PRESETS)}"
        )
    cfg = dict(PRESETS[preset])
    cfg["preset"] = preset
    for key in _INT_OVERRIDES:
        if key not in options:
            continue
        value = options[key]
        if isinstance(value, bool):
            raise ValueError(f"llama example: option {key!r} must be an integer, got {value!r}")
        try:
            ivalue = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"llama example: option {key!r} must be an integer, got {value!r}") from None
        if ivalue <= 0:
            raise ValueError(f"llama example: option {key!r} must be positive, got {ivalue}")
        cfg[key] = ivalue
    if cfg["seq"] < 2:
        raise ValueError(f"llama example: seq must be at least 2 for next-token loss, got {cfg['seq']}")
    return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (T, hd), broadcast over batch and heads.
    # The tables are float32 buffers; under bf16 compute the result goes back
    # to x's dtype, as torchtitan's and Hugging Face's rotary code does.
    return (x * cos + _rotate_half(x) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_rep = n_heads // n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        # (B, n_kv, T, hd) -> (B, n_kv * rep, T, hd)
        if self.n_rep == 1:
            return x
        b, n_kv, t, hd = x.shape
        return x[:, :, None].expand(b, n_kv, self.n_rep, t, hd).reshape(b, n_kv * self.n_rep, t, hd)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = _apply_rotary(q, cos, sin)
        k = _apply_rotary(k, cos, sin)
        k = self._repeat_kv(k)
        v = self._repeat_kv(v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = FeedForward(dim, ffn)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        x = x + self.feed_forward(self.ffn_norm(x))
        return x


class Llama(nn.Module):
    def __init__(
        self,
        *,
        dim: int,
        layers: int,
        heads: int,
        kv_heads: int,
        ffn: int,
        vocab: int,
        max_seq: int,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"llama: dim ({dim}) must be divisible by heads ({heads})")
        if heads % kv_heads != 0:
            raise ValueError(f"llama: heads ({heads}) must be divisible by kv_heads ({kv_heads})")
        head_dim = dim // heads
        if head_dim % 2 != 0:
            raise ValueError(f"llama: head dim ({head_dim}) must be even for rotary embeddings")
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, kv_heads, ffn, norm_eps) for _ in range(layers)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab, bias=False)

        # Rotary tables, built on the default device (meta when planning), so
        # nothing large is ever allocated on the CPU for the big presets.
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_seq, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq, head_dim)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, t = tokens.shape
        cos = self.rope_cos[:t]
        sin = self.rope_sin[:t]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


def build_model(**options) -> nn.Module:
    cfg = _config(options)
    torch.manual_seed(0)
    return Llama(
        dim=cfg["dim"],
        layers=cfg["layers"],
        heads=cfg["heads"],
        kv_heads=cfg["kv_heads"],
        ffn=cfg["ffn"],
        vocab=cfg["vocab"],
        max_seq=cfg["seq"],
        norm_eps=cfg["norm_eps"],
        rope_theta=cfg["rope_theta"],
    )


def example_inputs(**options) -> tuple:
    cfg = _config(options)
    b, t, vocab = cfg["batch"], cfg["seq"], cfg["vocab"]
    tokens = (torch.arange(b * t, dtype=torch.int64).reshape(b, t) * 7) % vocab
    return (tokens,)


def loss_fn(output: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    tokens = inputs[0]
    logits = output[:, :-1]
    targets = tokens[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
