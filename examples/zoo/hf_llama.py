"""transformers ``LlamaForCausalLM`` built from a tiny ``LlamaConfig``.

Sizes (option ``preset``): ``tiny`` (default): hidden 64, 2 layers, 4 heads,
2 kv heads (GQA), MLP 128, vocab 256, token ids ``(4, 16)``; ``8b``: Llama-3-8B
(hidden 4096, 32 layers, 32 heads, 8 kv heads, MLP 14336, vocab 128256, rope
theta 500000), token ids ``(16, 8192)`` -- for planning on fake tensors only.
``layers`` overrides the depth. Loss: next-token cross entropy on ``output.logits``.
"""

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "tiny": dict(vocab=256, hidden=64, mlp=128, layers=2, heads=4, kv=2, batch=4, seq=16, theta=10000.0),
    "8b": dict(vocab=128256, hidden=4096, mlp=14336, layers=32, heads=32, kv=8, batch=16, seq=8192, theta=500000.0),
}


def _preset(options) -> dict:
    cfg = dict(PRESETS[str(options.get("preset", "tiny"))])
    cfg["layers"] = int(options.get("layers", cfg["layers"]))
    return cfg


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    p = _preset(options)
    config = LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["mlp"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv"],
        max_position_embeddings=max(64, p["seq"]),
        rope_theta=p["theta"],
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    p = _preset(options)
    return (torch.randint(0, p["vocab"], (p["batch"], p["seq"])),)


def loss_fn(output, *inputs) -> torch.Tensor:
    logits = output.logits[:, :-1]
    targets = inputs[0][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
