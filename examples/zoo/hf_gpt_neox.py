"""transformers ``GPTNeoXForCausalLM`` built from a tiny ``GPTNeoXConfig``.

Sizes: hidden 64, 2 layers, 4 heads, MLP 128, vocab 256, partial rotary
(library default rotary_pct), parallel residual (library default), untied
``embed_out``. Input: token ids ``(4, 16)``.
Loss: next-token cross entropy on ``output.logits``. Options are accepted and ignored.
"""

import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

VOCAB, BATCH, SEQ = 256, 4, 16


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return GPTNeoXForCausalLM(config)


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randint(0, VOCAB, (BATCH, SEQ)),)


def loss_fn(output, *inputs) -> torch.Tensor:
    logits = output.logits[:, :-1]
    targets = inputs[0][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
