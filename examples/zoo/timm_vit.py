"""timm ``VisionTransformer`` (``timm.models.vision_transformer``), tiny config.

Sizes: image 32x32x3, patch 8 (16 patches + class token), embed 64, depth 2,
4 heads, MLP ratio 4, 10 classes; pretrained=False, library default dropout
settings. Input: images ``(8, 3, 32, 32)``.
Loss: cross entropy of the logits against labels ``arange(8) % 10``.
Options are accepted and ignored.
"""

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

NUM_CLASSES, BATCH, IMG = 10, 8, 32


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=IMG,
        patch_size=8,
        in_chans=3,
        num_classes=NUM_CLASSES,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
    )


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randn(BATCH, 3, IMG, IMG),)


def loss_fn(output, *inputs) -> torch.Tensor:
    labels = torch.arange(output.shape[0], device=output.device) % NUM_CLASSES
    return F.cross_entropy(output, labels)
