"""transformers ``GPT2LMHeadModel`` built from a tiny ``GPT2Config``.

Sizes: n_embd 64, 2 layers, 4 heads, context 64, vocab 256; the LM head is
tied to the token embedding (library default); dropout 0.1 (library default).
Input: token ids ``(4, 16)``. Loss: next-token cross entropy on ``output.logits``.
Options are accepted and ignored.
"""

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, BATCH, SEQ = 256, 4, 16


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randint(0, VOCAB, (BATCH, SEQ)),)


def loss_fn(output, *inputs) -> torch.Tensor:
    logits = output.logits[:, :-1]
    targets = inputs[0][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
