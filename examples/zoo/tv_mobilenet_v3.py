"""torchvision ``mobilenet_v3_small(num_classes=10)`` (``MobileNetV3``).

Library defaults: BatchNorm, hardswish, squeeze-excitation, classifier dropout
0.2; no pretrained weights. Input: images ``(8, 3, 64, 64)``.
Loss: cross entropy of the logits against labels ``arange(8) % 10``.
Options are accepted and ignored.
"""

import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v3_small

NUM_CLASSES, BATCH, IMG = 10, 8, 64


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES)


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randn(BATCH, 3, IMG, IMG),)


def loss_fn(output, *inputs) -> torch.Tensor:
    labels = torch.arange(output.shape[0], device=output.device) % NUM_CLASSES
    return F.cross_entropy(output, labels)
