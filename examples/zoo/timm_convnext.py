"""timm ``ConvNeXt`` (``timm.models.convnext``), tiny custom config.

Depths (1, 1, 1, 1), dims (16, 32, 64, 128), patch-4 stem, LayerNorm and layer
scale (library defaults), 10 classes. Input: images ``(8, 3, 64, 64)``.
Loss: cross entropy of the logits against labels ``arange(8) % 10``.
Options are accepted and ignored.
"""

import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt

NUM_CLASSES, BATCH, IMG = 10, 8, 64


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return ConvNeXt(
        in_chans=3,
        num_classes=NUM_CLASSES,
        depths=(1, 1, 1, 1),
        dims=(16, 32, 64, 128),
    )


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randn(BATCH, 3, IMG, IMG),)


def loss_fn(output, *inputs) -> torch.Tensor:
    labels = torch.arange(output.shape[0], device=output.device) % NUM_CLASSES
    return F.cross_entropy(output, labels)
