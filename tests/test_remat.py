"""Activation checkpointing (`--remat`): the recomputation is in the joint
graph (copies of forward ops placed in the backward), bit-exact on one
device, priced and counted in memory like any op, recorded in the plan, and
three AdamW steps under each mode match one device on meshes 4 and 2x2."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import example_path
from test_precision import _cases

from dtplan import Plan, PlanError, load_model_file, plan_program
from dtplan.ir.capture import capture_training
from dtplan.ir.graph import Role
from dtplan.ir.modelfile import capture_model_file
from dtplan.ir.remat import SUFFIX, Remat, RematError, layers, recomputed_originals, remat
from dtplan.planner.cost.memory import peak_bytes
from dtplan.planner.solver import SolverOptions
from dtplan.runtime.run import run_many


def captured(name: str, **options):
    return capture_model_file(load_model_file(example_path(name), {k: str(v) for k, v in options.items()}), train=True)


def _real_args(c, model, inputs):
    params, buffers, it = dict(model.named_parameters()), dict(model.named_buffers()), iter(inputs)
    by_role = {Role.PARAM: params, Role.BUFFER: buffers, Role.CONSTANT: c.constants}
    return [by_role[role][fqn].detach() if role in by_role else next(it) for _, role, fqn in c.placeholders]


def _size(graph):
    return lambda name: graph[name].tensor_meta.nbytes if graph[name].tensor_meta is not None else 0


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(d, 4 * d)
        self.out = torch.nn.Linear(4 * d, d)
        self.drop = torch.nn.Dropout(0.25)

    def forward(self, x):
        return x + self.drop(self.out(torch.nn.functional.gelu(self.fc(torch.nn.functional.layer_norm(x, x.shape[-1:])))))


class _Stack(torch.nn.Module):
    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(d) for _ in range(n))
        self.head = torch.nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_recomputed_step_is_bit_exact_saves_memory_and_recomputes_in_the_backward():
    """Every example and a stack with dropout: the recomputed joint graph
    gives bit-identical loss and gradients on real tensors; copies sit after
    the forward, random draws are saved not redrawn, and the peak of the
    unsharded step falls (Llama: 829188 -> 642820 bytes under full)."""
    peaks = {}
    for name in ("mlp", "gpt", "llama", "cnn", "dropout stack"):
        if name == "dropout stack":
            torch.manual_seed(0)
            model, inputs, loss_fn = _Stack().train(), (torch.randn(8, 4, 16),), lambda out, x: out.pow(2).mean()
        else:
            mf = load_model_file(example_path(name))
            (model, inputs), loss_fn = mf.build(train=True), mf.loss_fn
        c = capture_training(model, inputs, loss_fn)
        random_ops = {n.op_name for n in c.graph if n.target is not None and torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ()) and "attention" not in n.op_name}
        assert bool(random_ops) == (name == "dropout stack"), random_ops
        args = _real_args(c, model, inputs)
        torch.manual_seed(7)
        with torch.no_grad():
            want = c.gm(*args)
        peaks[name] = {"none": peak_bytes(c.graph, _size(c.graph))}
        for mode in ("selective", "full"):
            r = remat(c, mode)
            torch.manual_seed(7)
            with torch.no_grad():
                got = r.gm(*args)
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), (name, mode)
            copies = recomputed_originals(r.graph)
            assert copies and len(r.graph) == len(c.graph) + len(copies), (name, mode)
            order = {n.name: i for i, n in enumerate(r.graph)}
            loss_at = max(order[n] for n in _ancestors(r.graph, r.graph.outputs[0]))
            assert all(order[copy] > loss_at for copy in copies), (name, mode)  # in the backward
            assert sum(n.flops for n in r.graph) == sum(n.flops for n in c.graph) + sum(r.graph[o].flops for o in copies.values())
            assert not {r.graph[o].op_name for o in copies.values()} & random_ops, (name, mode)
            peaks[name][mode] = peak_bytes(r.graph, _size(r.graph))
            assert peaks[name][mode] <= peaks[name]["none"], (name, mode, peaks[name])
        assert r.remat == Remat("full") and r.graph.outputs == c.graph.outputs
    assert peaks["llama"] == {"none": 829188, "selective": 660740, "full": 642820}
    assert peaks["dropout stack"]["full"] < peaks["dropout stack"]["none"]
    assert layers(captured("llama").graph) == ("layers.0", "layers.1")


def _ancestors(graph, name):
    seen, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(graph[n].refs())
    return seen


def test_selective_keeps_matmul_and_attention_outputs_and_full_keeps_only_layer_inputs():
    c = captured("llama")
    sel, full = (recomputed_originals(remat(c, m).graph) for m in ("selective", "full"))
    ops = lambda names: {c.graph[n].op_name for n in names.values()}  # noqa: E731
    assert not ops(sel) & {"aten.mm.default", "aten._scaled_dot_product_flash_attention_for_cpu.default"}
    assert {"aten.mm.default", "aten._scaled_dot_product_flash_attention_for_cpu.default"} <= ops(full)
    assert set(sel.values()) < set(full.values())
    one = recomputed_originals(remat(c, Remat("full", ("layers.1",))).graph)
    assert one and all(c.graph[o].module.startswith("layers.1") for o in one.values())
    with pytest.raises(RematError, match=r"remat layers \['layers.7'\] are not layers of this model"):
        remat(c, Remat("full", ("layers.7",)))
    with pytest.raises(RematError, match="remat mode 'most' is not one of none, full, selective"):
        Remat.parse("most")
    with pytest.raises(RematError, match="already recomputes"):
        remat(remat(c, "full"), "selective")


def test_the_plan_prices_records_and_checks_the_recomputation():
    c = captured("llama", batch=16, seq=64)  # activations outweigh the parameters and their state
    plain = plan_program(c, mesh="4")
    plan = plan_program(c, mesh="4", remat="full")
    assert plan.model.remat == {"mode": "full"} and plan.remat == Remat("full")
    copies = plan.recomputed()
    assert copies and all(name.endswith(SUFFIX) for name in copies)
    # a copy is its forward op again: priced as the original wherever placed alike
    alike = {n: o for n, o in copies.items() if plan.nodes[n].output == plan.nodes[o].output}
    assert alike and all(plan.nodes[n].compute_s == pytest.approx(plan.nodes[o].compute_s) for n, o in alike.items())
    # and the recomputation's time is the copies priced again from the recomputing graph
    from dtplan.planner.cost.device import load_profile
    from dtplan.planner.cost.pricing import Pricer
    from dtplan.planner.space.strategies import Strategy

    graph, pricer = remat(c, "full").graph, Pricer((4,), load_profile("cpu"))
    repriced = sum(pricer.compute_s(graph[n], Strategy(plan.nodes[n].inputs, plan.nodes[n].output)) for n in copies)
    assert plan.recompute_s() == pytest.approx(repriced) and repriced > 0
    assert plan.cost.compute_s > plain.cost.compute_s
    assert plan.cost.peak_memory_bytes < plain.cost.peak_memory_bytes
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.remat == plan.remat and again.recomputed() == copies
    damaged = plan.to_json()
    damaged["model"]["remat"] = {"mode": "most"}
    with pytest.raises(PlanError, match="model.remat: not a remat policy"):
        Plan.from_json(damaged)
    with pytest.raises(PlanError, match="graph"):
        plan.check_matches(c.graph, plan.mesh)  # a graph without the recomputation
    plan.check_matches(remat(c, "full").graph, plan.mesh)


#: a budget under which Llama (Megatron-pinned) on 4 devices fits only with
#: recomputation: the least memory of a plan is 528388 bytes without, 481796
#: with full (on 2x2, 749572 and 702980: auto's four solves that close to the
#: least take 80 s there, so 2x2 runs full and selective, in
#: tests/test_training.py's group)
AUTO_BUDGET = 520000


def test_three_adamw_steps_under_each_remat_mode_match_one_device_on_4():
    """full and selective for the transformer examples (every example,
    on 2x2: tests/test_training.py); auto for Llama under a budget only
    recomputation meets (auto without a binding budget chooses none for
    these small examples: recomputing costs time and their peak is at the
    loss), checked to keep the fastest fitting try."""
    mesh, items, steps = "4", [], []
    for name, inputs, pins in [c for c in _cases(mesh) if c[0] in ("gpt", "llama")]:
        step = captured(name)
        for mode in ("full", "selective", "auto") if name == "llama" else ("full", "selective"):
            memory = AUTO_BUDGET if mode == "auto" else None
            plan = plan_program(
                step, mesh=mesh, input_placements=inputs, parameter_placements=pins, model_info={"name": name}, remat=mode, memory=memory,
                solver=SolverOptions(time_limit_s=10),
            )
            assert plan.collectives and plan.recomputed(), (name, mode)
            if mode == "auto":
                tried = {row["policy"]: row for row in plan.model.remat_search}
                assert tried["none"]["step_s"] is None and {"selective", "full"} <= set(tried), tried
                fitting = [r["step_s"] for r in tried.values() if r["step_s"] is not None]
                assert plan.cost.total_s == min(fitting) and plan.cost.peak_memory_bytes <= memory
                assert [r["policy"] for r in tried.values() if r["chosen"]] == [str(plan.remat)]
            items.append((example_path(name), plan, {}, True))
            steps.append(step)  # shipped to the ranks, which apply the plan's recomputation on arrival
    for rank, reports in enumerate(run_many(items, steps=3, captured=steps)):
        for (path, plan, *_), report in zip(items, reports, strict=True):
            case = f"{path.stem} {plan.remat} on {mesh}, rank {rank}"
            assert report["collectives_match"], (case, report["collectives_issued"])
            assert report["numerics_match"], (case, {k: report.get(k) for k in ("max_abs", "max_rel", "max_loss_rel", "mismatched")})
            assert len(report["losses"]) == 3 and report["max_loss_rel"] <= 1e-5, (case, report["losses"], report["reference_losses"])
