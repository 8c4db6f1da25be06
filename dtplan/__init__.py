"""dtplan: an ahead-of-time sharding planner for PyTorch.

    plan = dtplan.compile(model, example_inputs, mesh="2x2", memory="16MiB")
    program = dtplan.shard(model, example_inputs, mesh=device_mesh, plan=plan)

The names below are imported on first use (PEP 562), so `import dtplan.cli`
does not import torch: the command line answers `--help` at once, and an
interruption while torch loads reaches the command's own handler.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: public name -> the module that defines it
_EXPORTS = {
    "ModelFile": "dtplan.ir.modelfile",
    "ModelFileError": "dtplan.ir.modelfile",
    "PlacementSpec": "dtplan.api",
    "Plan": "dtplan.planner.output.plan",
    "PlanError": "dtplan.planner.output.plan",
    "ShardedProgram": "dtplan.api",
    "capture_model_file": "dtplan.ir.modelfile",
    "compile": "dtplan.api",
    "load_model_file": "dtplan.ir.modelfile",
    "local_inputs": "dtplan.runtime.parallel",
    "parallelize": "dtplan.api",
    "plan_program": "dtplan.api",
    "shard": "dtplan.api",
    "sharded_program": "dtplan.api",
}

__all__ = [
    "ModelFile", "ModelFileError", "PlacementSpec", "Plan", "PlanError", "ShardedProgram",
    "capture_model_file", "compile", "load_model_file", "local_inputs", "parallelize", "plan_program", "shard", "sharded_program",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from dtplan.api import PlacementSpec, ShardedProgram, compile, parallelize, plan_program, shard, sharded_program
    from dtplan.runtime.parallel import local_inputs
    from dtplan.ir.modelfile import ModelFile, ModelFileError, capture_model_file, load_model_file
    from dtplan.planner.output.plan import Plan, PlanError


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dtplan' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
