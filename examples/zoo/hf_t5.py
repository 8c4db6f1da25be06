"""transformers ``T5ForConditionalGeneration`` built from a tiny ``T5Config``.

Sizes: d_model 64, 2 encoder + 2 decoder layers, 4 heads (d_kv 16), d_ff 128,
vocab 256; LM head tied to the shared embedding (library default); dropout 0.1
(library default). Inputs (positional, matching ``forward``): ``input_ids``
``(4, 16)``, ``attention_mask`` (all ones), ``decoder_input_ids`` ``(4, 16)``.
Loss: cross entropy of ``output.logits[:, :-1]`` against ``decoder_input_ids[:, 1:]``.
Options are accepted and ignored.
"""

import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

VOCAB, BATCH, SEQ = 256, 4, 16


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        use_cache=False,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    decoder_input_ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    return (input_ids, attention_mask, decoder_input_ids)


def loss_fn(output, *inputs) -> torch.Tensor:
    logits = output.logits[:, :-1]
    targets = inputs[2][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
