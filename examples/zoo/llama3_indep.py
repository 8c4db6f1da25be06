"""Llama-3 in plain PyTorch, written independently of examples/llama.py.

``Llama3``: ``embed`` -> ``layers`` (ModuleList of ``Block``: RMSNorm -> GQA
attention with k/v heads expanded by ``repeat_interleave``, rotary via
``chunk`` into halves, causal SDPA; RMSNorm -> SwiGLU MLP) -> ``norm`` ->
``lm_head`` (untied). Rotary tables are computed in ``forward`` from
``torch.arange`` on the input's device (works on meta/fake tensors).
Options (strings converted): ``preset`` ``tiny`` (default) or ``8b`` (plan it
on the meta device), ``layers`` overrides the depth. Loss: ``F.cross_entropy``
of flattened ``logits[:, :-1]`` against ``ids[:, 1:]``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv=2, ffn=128, vocab=256, batch=4, seq=16, theta=500000.0),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv=8, ffn=14336, vocab=128256, batch=16, seq=8192, theta=500000.0),
}


def _cfg(options):
    if set(options) - {"preset", "layers"} or str(options.get("preset", "tiny")).lower() not in PRESETS:
        raise ValueError(f"llama3_indep: bad options {options}; accepted: preset ({'/'.join(PRESETS)}), layers")
    cfg = dict(PRESETS[str(options.get("preset", "tiny")).lower()])
    cfg["n_layers"] = int(options.get("layers", cfg["n_layers"]))
    return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps))


def rope(x, cos, sin):  # x: (B, H, T, hd); cos/sin: (T, hd/2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = c["n_heads"], c["n_kv"], c["dim"] // c["n_heads"]
        self.attn_norm, self.mlp_norm = RMSNorm(c["dim"]), RMSNorm(c["dim"])
        self.q_proj = nn.Linear(c["dim"], self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(c["dim"], self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(c["dim"], self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, c["dim"], bias=False)
        self.gate = nn.Linear(c["dim"], c["ffn"], bias=False)
        self.up = nn.Linear(c["dim"], c["ffn"], bias=False)
        self.down = nn.Linear(c["ffn"], c["dim"], bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama3(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.hd, self.theta = c["dim"] // c["n_heads"], c["theta"]
        self.embed = nn.Embedding(c["vocab"], c["dim"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["n_layers"]))
        self.norm = RMSNorm(c["dim"])
        self.lm_head = nn.Linear(c["dim"], c["vocab"], bias=False)

    def forward(self, ids):
        T = ids.shape[1]
        inv = self.theta ** (-torch.arange(0, self.hd, 2, device=ids.device, dtype=torch.float32) / self.hd)
        ang = torch.outer(torch.arange(T, device=ids.device, dtype=torch.float32), inv)
        cos, sin = ang.cos(), ang.sin()
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build_model(**options) -> nn.Module:
    torch.manual_seed(0)
    return Llama3(_cfg(options))


def example_inputs(**options) -> tuple:
    c = _cfg(options)
    torch.manual_seed(0)
    return (torch.randint(0, c["vocab"], (c["batch"], c["seq"])),)


def loss_fn(output, *inputs) -> torch.Tensor:
    logits, targets = output[:, :-1], inputs[0][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
