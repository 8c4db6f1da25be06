"""transformers ``MixtralForCausalLM`` built from a tiny ``MixtralConfig``.

Sizes: hidden 64, 2 layers, 4 heads, 2 kv heads, 4 experts (top-2 routing),
expert MLP 128, vocab 256. Input: token ids ``(4, 16)``.
Loss: next-token cross entropy on ``output.logits`` (router aux loss not added).

Option ``experts`` picks the config's ``experts_implementation`` (default
``batched_mm``: gathers each token's expert weights and uses ``bmm``, plain
aten ops that export and run under FakeTensorMode; the library default
``grouped_mm`` exports to the custom op ``transformers::grouped_mm_fallback``
and its fake/meta kernel rejects float32). Other options are ignored.
"""

import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

VOCAB, BATCH, SEQ = 256, 4, 16


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation="sdpa",
        experts_implementation=str(options.get("experts", "batched_mm")),
    )
    return MixtralForCausalLM(config)


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randint(0, VOCAB, (BATCH, SEQ)),)


def loss_fn(output, *inputs) -> torch.Tensor:
    logits = output.logits[:, :-1]
    targets = inputs[0][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
