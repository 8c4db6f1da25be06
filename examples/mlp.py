"""Two-layer MLP example model for dtplan.

Model: ``fc1 = Linear(d, hidden, bias=False)`` -> ReLU -> ``fc2 = Linear(hidden, d, bias=False)``.

Options (passed as ``--model-arg key=value``; strings are converted to int):

* ``batch``  -- batch size of the example input (default 8)
* ``d``      -- input/output feature size (default 64)
* ``hidden`` -- hidden feature size (default 256)

Input: ``x`` of shape ``(batch, d)``, float32, deterministic.
Loss: mean of the squared output.

The file only depends on ``torch`` and works under ``with torch.device("meta"):``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DEFAULTS", "MLP", "build_model", "example_inputs", "loss_fn"]

DEFAULTS = {"batch": 8, "d": 64, "hidden": 256}


def _config(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"mlp example: unknown option(s) {', '.join(repr(k) for k in unknown)}; "
            f"accepted options: {', '.join(sorted(DEFAULTS))}"
        )
    cfg = dict(DEFAULTS)
    for key, value in options.items():
        if isinstance(value, bool):
            raise ValueError(f"mlp example: option {key!r} must be an integer, got {value!r}")
        try:
            ivalue = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"mlp example: option {key!r} must be an integer, got {value!r}") from None
        if ivalue <= 0:
            raise ValueError(f"mlp example: option {key!r} must be positive, got {ivalue}")
        cfg[key] = ivalue
    return cfg


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def build_model(**options) -> nn.Module:
    cfg = _config(options)
    torch.manual_seed(0)
    return MLP(cfg["d"], cfg["hidden"])


def example_inputs(**options) -> tuple:
    cfg = _config(options)
    n = cfg["batch"] * cfg["d"]
    x = torch.sin(torch.arange(n, dtype=torch.float32) * 0.37).reshape(cfg["batch"], cfg["d"])
    return (x,)


def loss_fn(output: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()
