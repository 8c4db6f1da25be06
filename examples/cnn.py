"""Small CNN example model for dtplan.

Model: ``conv1 = Conv2d(3, 16, 3, padding=1)`` -> ReLU ->
``conv2 = Conv2d(16, 32, 3, padding=1)`` -> ReLU -> mean over H, W ->
``head = Linear(32, 12)``.

Options (passed as ``--model-arg key=value``; strings are converted to int):

* ``batch`` -- batch size of the example input (default 8)
* ``size``  -- height and width of the example images (default 16)

Input: images of shape ``(batch, 3, size, size)``, float32, deterministic.
Loss: mean of the squared output.

The file only depends on ``torch`` and works under ``with torch.device("meta"):``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DEFAULTS", "SmallCNN", "build_model", "example_inputs", "loss_fn"]

DEFAULTS = {"batch": 8, "size": 16}


def _config(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"cnn example: unknown option(s) {', '.join(repr(k) for k in unknown)}; "
            f"accepted options: {', '.join(sorted(DEFAULTS))}"
        )
    cfg = dict(DEFAULTS)
    for key, value in options.items():
        if isinstance(value, bool):
            raise ValueError(f"cnn example: option {key!r} must be an integer, got {value!r}")
        try:
            ivalue = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"cnn example: option {key!r} must be an integer, got {value!r}") from None
        if ivalue <= 0:
            raise ValueError(f"cnn example: option {key!r} must be positive, got {ivalue}")
        cfg[key] = ivalue
    return cfg


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 12) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = x.mean(dim=(2, 3))
        return self.head(x)


def build_model(**options) -> nn.Module:
    _config(options)
    torch.manual_seed(0)
    return SmallCNN()


def example_inputs(**options) -> tuple:
    cfg = _config(options)
    b, s = cfg["batch"], cfg["size"]
    n = b * 3 * s * s
    images = torch.sin(torch.arange(n, dtype=torch.float32) * 0.1).reshape(b, 3, s, s)
    return (images,)


def loss_fn(output: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()
