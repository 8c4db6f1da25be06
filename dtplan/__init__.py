"""dtplan: an ahead-of-time sharding planner for PyTorch.

    plan = dtplan.compile(model, example_inputs, mesh="2x2", memory="16MiB")
    program = dtplan.shard(model, example_inputs, mesh=device_mesh, plan=plan)
"""
from dtplan.api import PlacementSpec, ShardedProgram, compile, plan_program, shard, sharded_program
from dtplan.ir.modelfile import ModelFile, ModelFileError, capture_model_file, load_model_file

__all__ = [
    "ModelFile",
    "ModelFileError",
    "PlacementSpec",
    "ShardedProgram",
    "capture_model_file",
    "compile",
    "load_model_file",
    "plan_program",
    "shard",
    "sharded_program",
]
