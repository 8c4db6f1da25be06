"""timm ``ResNet`` (``timm.models.resnet``) with ``BasicBlock``, narrow config.

Layers [1, 1, 1, 1], stage channels (16, 32, 64, 128), stem width 16,
BatchNorm (library default), 10 classes. Input: images ``(8, 3, 32, 32)``.
Loss: cross entropy of the logits against labels ``arange(8) % 10``.
Options are accepted and ignored.
"""

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet

NUM_CLASSES, BATCH, IMG = 10, 8, 32


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNet(
        block=BasicBlock,
        layers=(1, 1, 1, 1),
        channels=(16, 32, 64, 128),
        stem_width=16,
        num_classes=NUM_CLASSES,
    )


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randn(BATCH, 3, IMG, IMG),)


def loss_fn(output, *inputs) -> torch.Tensor:
    labels = torch.arange(output.shape[0], device=output.device) % NUM_CLASSES
    return F.cross_entropy(output, labels)
