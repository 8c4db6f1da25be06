"""A miniature DeepLabV3 segmentation head (torchvision's own ``ASPP``): a
strided conv stem, the ASPP branches (a 1x1 conv, an atrous 3x3 conv and the
global-pooling branch, whose 1x1 result is upsampled bilinearly), the
projection with dropout, a 3x3 conv, batch norm and ReLU after each, the
classifier's 1x1 conv and bilinear upsampling to the input size. Batch norm
in training mode sums over the batch, and bilinear upsampling becomes
``_unsafe_index`` (backward ``_unsafe_index_put``), which runs replicated:
on a 2-D mesh with the batch split over both axes the backward mixes
partial sums, shards and replicated fallbacks. A model file for
tests/test_rules_regression.py.

Options: ``batch`` (default 8), ``size`` (16), ``width`` (32).
Input: images (batch, 3, size, size). Loss: per-pixel cross entropy against
labels made from the pixel coordinates.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import ASPP

DEFAULTS = {"batch": 8, "size": 16, "width": 32}
NUM_CLASSES = 4


def _config(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"seg_head: unknown option(s) {unknown}; accepted: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **{k: int(v) for k, v in options.items()}}


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SegHead(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, width, 3, stride=2)
        self.aspp = ASPP(width, [2], out_channels=width)
        self.head = _conv_bn_relu(width, width, 3)
        self.classifier = nn.Conv2d(width, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.classifier(self.head(self.aspp(self.stem(x))))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_model(**options) -> nn.Module:
    cfg = _config(options)
    torch.manual_seed(0)
    return SegHead(cfg["width"])


def example_inputs(**options) -> tuple:
    cfg = _config(options)
    torch.manual_seed(0)
    return (torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"]),)


def loss_fn(output: torch.Tensor, *inputs) -> torch.Tensor:
    n, _, h, w = output.shape
    rows = torch.arange(h, device=output.device).view(1, h, 1)
    cols = torch.arange(w, device=output.device).view(1, 1, w)
    labels = ((rows // 4 + cols // 4 + torch.arange(n, device=output.device).view(n, 1, 1)) % NUM_CLASSES).expand(n, h, w)
    return F.cross_entropy(output, labels)
