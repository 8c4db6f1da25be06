"""Mixed precision, as FSDP2's MixedPrecisionPolicy defines it.

Parameters (and the optimizer's state) stay in float32, the masters; the step
casts each floating parameter to `param_dtype` once (the capture moves each
cast to just before the parameter's first use) and runs the model on those copies, with floating inputs cast likewise (FSDP2's
`cast_forward_inputs`). The casts are ops of the captured graph, so the
planner places and prices them like any other: cast on the shard, a bf16
all-gather moves half the bytes; memory counts the bf16 copies where they
live. A cast's backward turns each gradient back to float32; it is an
elementwise op that takes a partial sum as it is, so the planner lets
gradients reach their reduction as float32 partial sums: gradients reduce in
float32 (`reduce_dtype`), as FSDP2's default policy does.

What it does not model: FSDP2 keeps no bf16 shard between uses (it casts the
fp32 shard right before each all-gather); here the bf16 shard lives from its
first use to its last in backward, 2 bytes per element per shard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map_only

__all__ = ["PRECISIONS", "Precision", "WithPrecision", "call_with_precision"]

#: the names the command line takes
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BY_NAME = {**PRECISIONS, **{str(d).removeprefix("torch."): d for d in PRECISIONS.values()}}


@dataclass(frozen=True)
class Precision:
    """A mixed-precision policy: compute in `param_dtype`, reduce gradients in
    `reduce_dtype` (float32 only, for now), cast the model's floating outputs
    to `output_dtype` (None: as computed)."""

    param_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32
    output_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.param_dtype not in PRECISIONS.values():
            raise ValueError(f"param_dtype {self.param_dtype} is not one of {sorted(PRECISIONS)}")
        if self.reduce_dtype != torch.float32:
            raise ValueError(f"reduce_dtype {self.reduce_dtype}: gradients reduce in float32 (their parameters' dtype); other reduce dtypes are not supported yet")
        if self.output_dtype is not None and self.output_dtype not in PRECISIONS.values():
            raise ValueError(f"output_dtype {self.output_dtype} is not one of {sorted(PRECISIONS)}")

    @classmethod
    def parse(cls, text: str | Precision | None) -> Precision:
        """`bf16`, `fp16`, `fp32` (or torch's names: `bfloat16` ...), a
        Precision as it is, None for float32."""
        if isinstance(text, Precision):
            return text
        if text is None:
            return cls()
        dtype = _BY_NAME.get(str(text).strip().lower())
        if dtype is None:
            raise ValueError(f"precision {text!r} is not one of {', '.join(PRECISIONS)}")
        return cls(param_dtype=dtype)

    def require_trainable(self) -> None:
        """Refuse float16 training: its gradients underflow without dynamic
        loss scaling (torch.amp.GradScaler, with the inf check reduced over
        the shards), which dtplan does not have yet. float16 inference and
        bfloat16 training (float32's range) need none."""
        if self.param_dtype == torch.float16:
            raise ValueError("fp16 training needs dynamic loss scaling, which dtplan does not have yet; train in bf16 (fp16 plans inference)")

    @property
    def mixed(self) -> bool:
        return self.param_dtype != torch.float32 or self.output_dtype is not None

    def to_json(self) -> dict[str, str]:
        """The plan file's `model.precision` ({} for plain float32)."""
        if not self.mixed:
            return {}
        out = {"param_dtype": _name(self.param_dtype), "reduce_dtype": _name(self.reduce_dtype)}
        if self.output_dtype is not None:
            out["output_dtype"] = _name(self.output_dtype)
        return out

    @classmethod
    def from_json(cls, d: dict[str, str]) -> Precision:
        dtypes = {k: _BY_NAME[v] for k, v in d.items()}
        return cls(**dtypes)

    def __str__(self) -> str:
        if not self.mixed:
            return "fp32"
        short = {v: k for k, v in PRECISIONS.items()}
        text = f"{short[self.param_dtype]} compute, {short[self.reduce_dtype]} gradient reduction"
        return text + (f", {short[self.output_dtype]} outputs" if self.output_dtype is not None else "")


def call_with_precision(model: torch.nn.Module, inputs: tuple, precision: Precision) -> object:
    """`model(*inputs)` under the policy (as it is for plain float32)."""
    if not precision.mixed:
        return model(*inputs)
    dtype = precision.param_dtype
    # named_parameters() names a tied tensor once; functional_call ties the rest
    params = {n: p.to(dtype) if p.is_floating_point() else p for n, p in model.named_parameters()}
    cast = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    out = functional_call(model, params, cast)
    if precision.output_dtype is not None:
        out = tree_map_only(torch.Tensor, lambda t: t.to(precision.output_dtype) if t.is_floating_point() else t, out)
    return out


class WithPrecision(torch.nn.Module):
    """`model` under a policy, as one module to export (its FQNs gain `m.`)."""

    def __init__(self, model: torch.nn.Module, precision: Precision) -> None:
        super().__init__()
        self.m = model
        self.precision = precision

    def forward(self, *inputs):
        return call_with_precision(self.m, inputs, self.precision)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
