"""Mixed precision (FSDP2's MixedPrecisionPolicy): the casts are planned ops,
a bf16 all-gather moves half the bytes while gradients reduce in fp32, and
three AdamW steps under bf16 match one device under the same policy."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import example_path
from test_training import megatron_pins

from dtplan import Plan, PlanError, load_model_file, plan_program
from dtplan.ir.modelfile import capture_model_file
from dtplan.ir.precision import Precision
from dtplan.planner.output.classic import torchtitan_pins
from dtplan.runtime.run import run_many
from dtplan.runtime.verify import TOLERANCES


def captured(name: str, precision: str, *, train: bool = True, **options):
    mf = load_model_file(example_path(name), {k: str(v) for k, v in options.items()})
    return capture_model_file(mf, train=train, precision=precision)


def test_the_policy_parses_and_refuses_what_it_cannot_do():
    assert Precision.parse("bf16") == Precision(torch.bfloat16) == Precision.parse("bfloat16")
    assert not Precision.parse(None).mixed and Precision.parse("fp32").to_json() == {}
    assert Precision.from_json(Precision.parse("fp16").to_json()) == Precision(torch.float16)
    with pytest.raises(ValueError, match="precision 'int8' is not one of fp32, bf16, fp16"):
        Precision.parse("int8")
    with pytest.raises(ValueError, match="gradients reduce in float32"):
        Precision(torch.bfloat16, reduce_dtype=torch.bfloat16)
    # float16 training without loss scaling underflows: refused until dtplan scales the loss
    with pytest.raises(ValueError, match="fp16 training needs dynamic loss scaling"):
        captured("mlp", "fp16")


def test_bf16_fsdp_gathers_half_the_bytes_and_reduces_gradients_in_fp32():
    pins = {"fc1.weight": ["S(0)"], "fc2.weight": ["S(0)"]}
    plans = {p: plan_program(captured("mlp", p, batch=4096), mesh="4", input_placements=["S(0)"], parameter_placements=pins) for p in ("fp32", "bf16")}
    weight = 256 * 64  # elements of each weight
    for p, dtype_bytes in (("fp32", 4), ("bf16", 2)):
        kinds = {}
        for c in plans[p].collectives:
            kinds.setdefault(c.kind, set()).add(c.bytes)
        assert kinds["all_gather"] == {weight * dtype_bytes}, p  # the parameters, cast on the shard first
        assert kinds["reduce_scatter"] == {weight * 4}, p  # the gradients, in fp32 either way
        assert kinds["all_reduce"] == {4}, p  # the loss
    bf16 = plans["bf16"]
    assert bf16.model.precision == {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    assert bf16.cost.parameter_bytes == plans["fp32"].cost.parameter_bytes  # fp32 masters, sharded as planned
    casts = [n for n in bf16.nodes.values() if n.op == "aten._to_copy.default"]
    assert len(casts) >= 4  # two weights and the input forward, the gradients back
    again = Plan.from_json(json.loads(json.dumps(bf16.to_json())))
    assert again.model.precision == bf16.model.precision
    damaged = bf16.to_json()
    damaged["model"]["precision"] = {"param_dtype": "int8"}
    with pytest.raises(PlanError, match="model.precision: not a precision policy"):
        Plan.from_json(damaged)


def _cases(mesh: str) -> list[tuple[str, list[str] | None, dict | None]]:
    """(example, input placements, pinned parameters): each really shards."""
    nd = len(mesh.split("x"))
    batch = ["S(0)"] + ["R"] * (nd - 1)
    on_last = lambda p: ["R"] * (nd - 1) + [p]  # noqa: E731
    return [
        ("mlp", ["R"] * nd, {"fc1.weight": on_last("S(0)"), "fc2.weight": on_last("S(1)")}),
        ("gpt", batch, megatron_pins("gpt", 2, nd - 1, nd)),
        ("llama", None, megatron_pins("llama", 2, nd - 1, nd)),
        ("cnn", batch, None),
    ]


@pytest.mark.parametrize("mesh", ["4", "2x2"])
def test_three_adamw_steps_in_bf16_match_one_device_under_the_same_policy(mesh):
    items, steps = [], []  # the ranks run these captures (`run_many(captured=...)`)
    for name, inputs, pins in _cases(mesh):
        steps.append(captured(name, "bf16"))
        plan = plan_program(steps[-1], mesh=mesh, input_placements=inputs, parameter_placements=pins, model_info={"name": name})
        assert plan.collectives and plan.model.precision["param_dtype"] == "bfloat16", name
        items.append((example_path(name), plan, {}, True))
    steps.append(captured("gpt", "bf16", train=False))
    inference = plan_program(steps[-1], mesh=mesh, input_placements=_cases(mesh)[1][1], parameter_placements=_cases(mesh)[1][2])
    items.append((example_path("gpt"), inference, {}, True))
    steps.append(captured("gpt", "fp16", train=False))  # float16 plans and runs inference (training needs loss scaling)
    fp16 = plan_program(steps[-1], mesh=mesh, input_placements=_cases(mesh)[1][1], parameter_placements=_cases(mesh)[1][2])
    assert fp16.model.precision["param_dtype"] == "float16" and fp16.collectives
    items.append((example_path("gpt"), fp16, {}, True))
    names = [name for name, *_ in _cases(mesh)] + ["gpt inference", "gpt inference fp16"]
    if "x" in mesh:  # torchtitan's FSDP+TP: each weight cast on its strided shard, gathered in bf16
        llama = steps[[name for name, *_ in _cases(mesh)].index("llama")]  # captured once
        tt = plan_program(llama, mesh=mesh, parameter_placements=torchtitan_pins(llama, mesh), model_info={"name": "llama"})
        wq = next(n for n in llama.graph if n.fqn == "layers.0.attention.wq.weight")
        cast = next(n for n in llama.graph if n.refs() == (wq.name,))
        assert [str(p) for p in tt.nodes[cast.name].output] == ["_S(0, 2)", "S(0)"]
        assert any(c.kind == "all_gather" and c.producer == cast.name and c.bytes == 64 * 64 * 2 // 2 for c in tt.collectives)
        items.append((example_path("llama"), tt, {}, True))
        steps.append(llama)
        names.append("llama torchtitan FSDP+TP")
    tol = TOLERANCES[torch.bfloat16]
    for rank, reports in enumerate(run_many(items, steps=3, captured=steps)):
        for name, report in zip(names, reports, strict=True):
            case = f"{name} on {mesh}, rank {rank}"
            assert report["collectives_match"], (case, report["collectives_issued"])
            assert report["numerics_match"], (case, {k: report.get(k) for k in ("max_abs", "max_rel", "max_loss_rel", "mismatched")})
            if "losses" in report:
                assert len(report["losses"]) == 3 and report["max_loss_rel"] <= tol.rtol, (case, report["losses"], report["reference_losses"])


def test_each_cast_sits_just_before_the_first_use_of_what_it_casts():
    """Where FSDP2 casts: left at the step's start, every layer's bf16 copy
    would be live from the start (the 8B's program grew ninefold)."""
    c = captured("llama", "bf16", layers=3)
    nodes = list(c.gm.graph.nodes)
    casts = [n for n in nodes if n.target is torch.ops.aten._to_copy.default and n.args[0].op == "placeholder"]
    assert len(casts) >= 3 * 9  # every layer's weights, and the inputs
    for n in casts:
        first = min(n.users, key=nodes.index)
        assert nodes.index(first) == nodes.index(n) + 1 or all(m.target is torch.ops.aten._to_copy.default for m in nodes[nodes.index(n) + 1 : nodes.index(first)]), n
