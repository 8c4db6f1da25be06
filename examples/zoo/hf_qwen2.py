"""transformers ``Qwen2ForCausalLM`` built from a tiny ``Qwen2Config``
(tied input/output embeddings, q/k/v projections with bias).

Sizes: hidden 64, 2 layers, 4 heads, 2 kv heads (GQA), MLP 128, vocab 256.
Input: token ids ``(4, 16)``. Loss: next-token cross entropy on ``output.logits``.
Options are accepted and ignored.
"""

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB, BATCH, SEQ = 256, 4, 16


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config)


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randint(0, VOCAB, (BATCH, SEQ)),)


def loss_fn(output, *inputs) -> torch.Tensor:
    logits = output.logits[:, :-1]
    targets = inputs[0][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
