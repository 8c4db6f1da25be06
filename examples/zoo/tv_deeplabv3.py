"""torchvision ``DeepLabV3`` on a MobileNetV3 backbone, the library's own
classes, no pretrained weights.

A small backbone of four MobileNetV3 blocks (squeeze-excitation, hardswish,
the last one dilated as ``dilated=True`` makes the large model's last stage)
through torchvision's own ``_deeplabv3_mobilenetv3``: the ASPP head (atrous
branches and a global-pooling branch), bilinear upsampling to the input size,
and the auxiliary FCN head; batch norm everywhere, dropout in the heads.
``option full=1`` builds ``deeplabv3_mobilenet_v3_large(num_classes=4,
aux_loss=True)`` itself (3,867 joint-graph ops; slow to plan on 2x2). The
model returns a dict ``{"out", "aux"}``. Input: images ``(8, 3, 32, 32)``
(options ``batch``, ``size``). Loss: per-pixel cross entropy of ``out`` plus
0.5 of ``aux``'s (torchvision's reference recipe) against labels made from
the pixel coordinates.
"""

import torch
import torch.nn.functional as F
from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large
from torchvision.models.segmentation.deeplabv3 import _deeplabv3_mobilenetv3

NUM_CLASSES, BATCH, IMG = 4, 8, 32


def build_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    if str(options.get("full", "0")) == "1":
        return deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True)
    blocks = [
        InvertedResidualConfig(16, 3, 16, 16, False, "RE", 1, 1, 1.0),
        InvertedResidualConfig(16, 3, 64, 24, False, "RE", 2, 1, 1.0),
        InvertedResidualConfig(24, 5, 72, 40, True, "RE", 2, 1, 1.0),
        InvertedResidualConfig(40, 3, 120, 48, True, "HS", 1, 2, 1.0),  # dilated, as the large model's last stage
    ]
    return _deeplabv3_mobilenetv3(MobileNetV3(blocks, last_channel=128), NUM_CLASSES, aux=True)


def example_inputs(**options) -> tuple:
    # seed 1: under seed 0 one ReLU input of the head lies within float32
    # rounding of zero, and a 2x2 plan (batch norm's sums in another order)
    # puts it on the other side of the kink; that one gradient element moves
    # the batch norm's bias gradient and everything upstream (docs/architecture.md,
    # "Training checks compare gradients")
    torch.manual_seed(1)
    batch, size = int(options.get("batch", BATCH)), int(options.get("size", IMG))
    return (torch.randn(batch, 3, size, size),)


def _labels(out: torch.Tensor) -> torch.Tensor:
    n, _, h, w = out.shape
    rows = torch.arange(h, device=out.device).view(1, h, 1)
    cols = torch.arange(w, device=out.device).view(1, 1, w)
    return ((rows // 8 + cols // 8 + torch.arange(n, device=out.device).view(n, 1, 1)) % NUM_CLASSES).expand(n, h, w)


def loss_fn(output, *inputs) -> torch.Tensor:
    out, aux = output["out"], output["aux"]
    return F.cross_entropy(out, _labels(out)) + 0.5 * F.cross_entropy(aux, _labels(aux))
