"""Model files: a Python file defining build_model(), example_inputs() and
optionally loss_fn(output, *inputs)."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dtplan.ir.capture import capture, fake_build, user_frame
from dtplan.ir.precision import Precision
from dtplan.ir.remat import Remat
from dtplan.ir.remat import remat as apply_remat
from dtplan.ir.stamp import capture_training_stamped

__all__ = ["ModelFile", "ModelFileError", "capture_model_file", "load_model_file", "require_loss_fn"]


class ModelFileError(ValueError):
    """The model file is missing, broken or does not define what dtplan needs."""


@dataclass(frozen=True, slots=True)
class ModelFile:
    path: Path
    build_model: Callable[..., torch.nn.Module]
    example_inputs: Callable[..., tuple]
    loss_fn: Callable[..., torch.Tensor] | None
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    def _call(self, what: str, fn: Callable):
        try:
            return fn(**self.options)
        except Exception as e:  # noqa: BLE001 - user code: report it in one line, naming where
            raise ModelFileError(f"{self.path}: {what}({_kwargs(self.options)}) raised {type(e).__name__}: {e}{_at(e)}") from e

    def build(self, *, meta: bool = False, train: bool = False) -> tuple[torch.nn.Module, tuple]:
        """The model and its example inputs, on the meta device when only
        planning; in train mode for training (dropout on, batch norm on batch
        statistics), else in eval mode, as a user serving it expects."""
        device = torch.device("meta") if meta else torch.device("cpu")
        with device:
            model = self._call("build_model", self.build_model)
            inputs = self._call("example_inputs", self.example_inputs)
        if not isinstance(model, torch.nn.Module):
            raise ModelFileError(f"{self.path}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
        if not isinstance(inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise ModelFileError(f"{self.path}: example_inputs() must return a tuple of tensors")
        return model.train(train), inputs


def load_model_file(path: str | Path, options: Mapping[str, str] | None = None) -> ModelFile:
    """Import a model file by path (its own module; nothing from the project needed)."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    name = f"dtplan_model_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ModelFileError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:  # noqa: BLE001 - user code: report it in one line
        raise ModelFileError(f"{path}: importing it raised {type(e).__name__}: {e}") from e
    missing = [f for f in ("build_model", "example_inputs") if not callable(getattr(module, f, None))]
    if missing:
        raise ModelFileError(f"{path}: does not define {' and '.join(missing)}(); a model file needs build_model() and example_inputs()")
    return ModelFile(p, module.build_model, module.example_inputs, getattr(module, "loss_fn", None), dict(options or {}))


def require_loss_fn(mf: ModelFile) -> Callable[..., torch.Tensor]:
    """The model file's loss_fn, or a clear error: training needs one."""
    if mf.loss_fn is None:
        raise ModelFileError(f"{mf.path}: does not define loss_fn(output, *inputs); training (--train) needs one")
    return mf.loss_fn


def capture_model_file(mf: ModelFile, *, train: bool, precision: Precision | str | None = None, remat: Remat | str | None = None):
    """The graph a model file plans and runs as, the same on every side.

    Inference: captured on meta (a real-device export may differ in
    layout-driven ops such as clones), lifted constants taken from a real
    capture. Training: the joint graph on fake tensors, stamped from a few
    traced layers where the model repeats a block (`dtplan.ir.stamp`), so deep
    models capture in seconds; with `remat` (a concrete policy, as a plan
    records it), the recomputation is in the graph (`dtplan.ir.remat`).
    """
    if train:
        captured = capture_training_stamped(*fake_build(lambda: mf.build(train=True)), require_loss_fn(mf), precision=precision)
    else:
        captured = capture(*mf.build(meta=True), precision)
        if captured.constants:
            real = capture(*mf.build(meta=False), precision)
            captured = dataclasses.replace(captured, constants=real.constants)
    return apply_remat(captured, remat) if remat is not None else captured


def _at(e: BaseException) -> str:
    where = user_frame(e)
    return f" (at {where})" if where else ""


def _kwargs(options: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())
