"""torchvision ``MobileNetV3``, a small configuration of the library's own class.

``mobilenet_v3_small``'s building blocks, three of its eleven: a stride-2 block
with squeeze-excitation (ReLU), a stride-2 expansion block, and a residual
block with squeeze-excitation and hardswish, then torchvision's head (hardswish,
classifier dropout 0.2). BatchNorm everywhere, library defaults; no pretrained
weights. ``option full=1`` builds ``mobilenet_v3_small(num_classes=10)`` itself
(2,460 joint-graph ops; slower to plan). Input: images ``(8, 3, 64, 64)``.
Loss: cross entropy of the logits against labels ``arange(8) % 10``.
"""

import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v3_small
from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

NUM_CLASSES, BATCH, IMG = 10, 8, 64


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    if str(options.get("full", "0")) == "1":
        return mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES)
    blocks = [
        InvertedResidualConfig(16, 3, 16, 16, True, "RE", 2, 1, 1.0),
        InvertedResidualConfig(16, 3, 72, 24, False, "RE", 2, 1, 1.0),
        InvertedResidualConfig(24, 5, 96, 24, True, "HS", 1, 1, 1.0),
    ]
    return MobileNetV3(blocks, last_channel=128, num_classes=NUM_CLASSES)


def example_inputs(**options) -> tuple:
    torch.manual_seed(0)
    return (torch.randn(BATCH, 3, IMG, IMG),)


def loss_fn(output, *inputs) -> torch.Tensor:
    labels = torch.arange(output.shape[0], device=output.device) % NUM_CLASSES
    return F.cross_entropy(output, labels)
