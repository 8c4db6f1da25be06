"""Abstract lowering: one rank's sharded GraphModule for a mesh of any size,
in this process, on fake tensors over a fake process group."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import captured_example, example_path

from dtplan import load_model_file, plan_program
from dtplan.ir.modelfile import capture_model_file
from dtplan.planner.cost.pricing import local_shape
from dtplan.runtime.abstract import (
    AbstractLoweringError,
    fake_process_group,
    graph_collectives,
    lower_abstract,
)
from dtplan.runtime.lower import attr_name
from dtplan.runtime.verify import expected_collectives

MESH = "2x4"
RANKS = (0, 6)  # 6 is coordinate (1, 2): not on the first row or column


def _megatron_pins(layers: int, axis: int, ndim: int) -> dict[str, list[str]]:
    def on(p: str) -> list[str]:
        return ["R"] * axis + [p] + ["R"] * (ndim - axis - 1)

    pins = {}
    for i in range(layers):
        pins.update({f"layers.{i}.{m}.weight": on("S(0)") for m in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")})
        pins.update({f"layers.{i}.{m}.weight": on("S(1)") for m in ("attention.wo", "feed_forward.w2")})
    return pins


@pytest.fixture(scope="module")
def inference():
    captured = captured_example("llama")
    # Megatron weights on the inner axis, batch on the outer: the plan communicates on both
    return captured, plan_program(captured, mesh=MESH, input_placements=["S(0)", "R"], parameter_placements=_megatron_pins(2, 1, 2))


@pytest.fixture(scope="module")
def training():
    captured = capture_model_file(load_model_file(example_path("llama")), train=True)
    plan = plan_program(captured, mesh=MESH, input_placements=["S(0)", "R"], parameter_placements=_megatron_pins(2, 1, 2))
    return captured, plan


def _check(captured, plan, rank: int) -> torch.fx.GraphModule:
    gm = lower_abstract(captured, plan, rank)
    assert not dist.is_initialized()
    shape = tuple(plan.mesh.shape)
    graph = captured.graph
    info = gm.meta["dtplan_lowering"]
    assert info["rank"] == rank and info["coordinate"] == (rank // shape[1], rank % shape[1])
    # the plan's collectives, and no others: kinds, mesh axes and bytes
    assert plan.collectives
    assert graph_collectives(gm) == expected_collectives(plan)
    # user inputs and outputs at the local shapes the plan implies
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [tuple(n.meta["val"].shape) for n in placeholders] == [
        local_shape(graph[n].tensor_meta.shape, shape, plan.nodes[n].output) for n in captured.user_inputs
    ]
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert [tuple(a.meta["val"].shape) for a in out.args[0]] == [
        local_shape(graph[n].tensor_meta.shape, shape, pl) for n, pl in zip(graph.outputs, plan.outputs, strict=True)
    ]
    # stored tensors: meta attributes of the local shape, parameters as nn.Parameter
    for name, role, _ in captured.placeholders:
        if name in captured.user_inputs:
            continue
        t = getattr(gm, attr_name(name))
        assert t.device.type == "meta"
        assert tuple(t.shape) == local_shape(graph[name].tensor_meta.shape, shape, plan.nodes[name].output)
        assert isinstance(t, torch.nn.Parameter) == (role.name == "PARAM")
    return gm


@pytest.mark.parametrize("rank", RANKS)
def test_inference_llama_lowers_for_any_rank(inference, rank):
    _check(*inference, rank)


@pytest.mark.parametrize("rank", RANKS)
def test_training_llama_lowers_for_any_rank(training, rank):
    captured, plan = training
    gm = _check(captured, plan, rank)
    # a training plan reduces gradients: its collectives include all-reduces
    # or reduce-scatters, and the module issues them
    kinds = {k for k, _, _ in graph_collectives(gm)}
    assert kinds & {"all_reduce", "reduce_scatter"}
    assert str(gm.code)  # the lazily generated code is there when asked for


def test_replaying_repeated_layers_gives_the_traced_graph(training, monkeypatch):
    """Layer 1 repeats layer 0: its calls replay layer 0's traced fragments,
    and the module is the one tracing every call gives, code for code."""
    from dtplan.runtime import replay

    captured, plan = training
    replayed = lower_abstract(captured, plan, 6)
    assert replayed.meta["dtplan_lowering"]["fragments"]["replayed"] > 100
    monkeypatch.setattr(replay.Fragments, "enabled", False)
    traced = lower_abstract(captured, plan, 6)
    assert traced.meta["dtplan_lowering"]["fragments"]["replayed"] == 0
    assert replayed.code == traced.code


def test_a_fake_group_of_the_right_size_is_reused_and_left_up(inference):
    captured, plan = inference
    with fake_process_group(8, rank=3):
        gm = lower_abstract(captured, plan, 3)
        assert dist.is_initialized() and dist.get_world_size() == 8
    assert gm.meta["dtplan_lowering"]["coordinate"] == (0, 3)
    assert not dist.is_initialized()


def test_another_initialised_group_is_refused_and_left_alone(inference):
    captured, plan = inference
    with fake_process_group(4, rank=0):
        with pytest.raises(AbstractLoweringError, match="already initialised"):
            lower_abstract(captured, plan, 0)
        assert dist.is_initialized() and dist.get_world_size() == 4
    assert not dist.is_initialized()


def test_bad_rank():
    with pytest.raises(ValueError, match="rank 8"), fake_process_group(8, rank=8):
        pass
