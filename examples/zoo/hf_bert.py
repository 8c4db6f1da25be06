"""transformers ``BertForMaskedLM`` built from a tiny ``BertConfig``.

Sizes: hidden 64, 2 layers, 4 heads, intermediate 128, vocab 256; dropout 0.1
(library default); the MLM decoder is tied to the word embedding (library
default). Input: token ids ``(4, 16)`` (no attention mask, no masking).
Loss: cross entropy of ``output.logits`` against the input ids themselves.
Options are accepted and ignored.
"""

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

VOCAB, BATCH, SEQ = 256, 4, 16


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return BertForMaskedLM(config)


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randint(0, VOCAB, (BATCH, SEQ)),)


def loss_fn(output, *inputs) -> torch.Tensor:
    logits = output.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs[0].reshape(-1))
