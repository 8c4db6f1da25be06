"""`dtplan.parallelize`: the user's own model back, parallelized, in the
user's own loop. On 2x2 gloo ranks, real library models (GPT-2 with its tied
head and dropout, a timm ResNet with batch norm) train with torch.optim's
own optimizer (SGD with momentum, foreach by default: linear in the
gradient, so the final state is held to fp32 tolerance), a scheduler,
gradient clipping, per-rank batches,
DTensor gradients and a torch.distributed.checkpoint round trip, and every
gradient of the first step equals one device's."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from dtplan import capture_model_file, load_model_file, plan_program
from dtplan.planner.output.plan import Plan
from dtplan.runtime.launch import spawn
from dtplan.runtime.run import step_seed
from dtplan.runtime.verify import compare_norm, tolerance

ZOO = Path(__file__).resolve().parents[1] / "examples" / "zoo"
STEPS = 2


def _loop(model, batch, *, local, clip: float | None):
    """The user's loop: torch.optim's SGD with momentum (foreach, its
    default), a warm-up schedule, clipping; the first step's gradients and the final
    state, in full. `local` cuts this rank's piece of the batch (identity on
    one device)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / STEPS)
    full = (lambda t: t.full_tensor()) if local is not None else (lambda t: t)
    losses, first = [], {}
    for step in range(STEPS):
        torch.manual_seed(step_seed(step))
        loss = model(*(local(*batch) if local is not None else batch))
        loss.backward()
        if step == 0:
            first = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    state = {k: full(v).clone() for k, v in model.state_dict().items()}
    return losses, first, state


class _Loss(torch.nn.Module):
    """One device's step as the user writes it: loss_fn(model(*x), *x)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *x):
        return self.loss_fn(self.model(*x), *x)


def _rank(rank, mesh, *, path: str, plan_json: dict, folder: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from dtplan import local_inputs, parallelize

    mf = load_model_file(path)
    model, batch = mf.build(meta=False, train=True)
    m = parallelize(model, batch, mesh, mf.loss_fn, plan=Plan.from_json(plan_json))
    assert m is model
    every_state_is_dtensor = all(isinstance(v, DTensor) for v in [*m.parameters(), *m.buffers()])
    losses, first, state = _loop(m, batch, local=functools.partial(local_inputs, m), clip=1.0)
    # a checkpoint of the DTensor state, saved sharded and loaded back over zeros
    sd = m.state_dict()
    dcp.save(sd, checkpoint_id=folder)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    loaded = m.state_dict()
    dcp.load(loaded, checkpoint_id=folder)
    after = {k: v.full_tensor().clone() for k, v in m.state_dict().items()}  # a replicated full_tensor() is the live local tensor
    torch.manual_seed(step_seed(STEPS))
    m(*local_inputs(m, *batch)).backward()  # the program reads what was loaded
    grads_are = {type(p.grad).__name__ for p in m.parameters() if p.grad is not None}
    return {
        "losses": losses,
        "first": {k: v.tolist() for k, v in first.items()},
        "state": {k: v.tolist() for k, v in state.items()},
        "restored": all(torch.equal(after[k], state[k]) for k in state),
        "dtensors": every_state_is_dtensor,
        "grads": sorted(grads_are),
        "grad_placements": {n: [str(x) for x in p.grad.placements] for n, p in m.named_parameters() if p.grad is not None},
        "param_placements": {n: [str(x) for x in p.placements] for n, p in m.named_parameters()},
    }


@pytest.mark.parametrize("name", ["hf_gpt2", "timm_resnet"])
def test_parallelized_model_trains_in_the_users_loop_as_on_one_device(name, tmp_path):
    path = ZOO / f"{name}.py"
    mf = load_model_file(path)
    plan = plan_program(capture_model_file(mf, train=True), mesh="2x2", input_placements=["S(0)", "S(0)"])
    reports = spawn(functools.partial(_rank, path=str(path), plan_json=plan.to_json(), folder=str(tmp_path / "ckpt")), plan.mesh)
    model, batch = mf.build(meta=False, train=True)
    losses, first, state = _loop(_Loss(model, mf.loss_fn), batch, local=None, clip=1.0)
    first = {k.removeprefix("model."): v for k, v in first.items()}
    state = {k.removeprefix("model."): v for k, v in state.items()}
    tol = tolerance(torch.float32)
    largest = max(float(g.abs().max()) for g in first.values())
    for r in reports:
        assert r["dtensors"]
        assert r["grads"] == ["DTensor"]
        assert r["grad_placements"] == {k: v for k, v in r["param_placements"].items() if k in r["grad_placements"]}
        assert set(r["first"]) == set(first), set(first) ^ set(r["first"])
        for k, want in first.items():
            c = compare_norm(torch.tensor(r["first"][k]), want, rtol=tol.gradient, floor=tol.gradient_floor * largest)
            assert c.ok, (k, c)
        assert losses == pytest.approx(r["losses"], rel=1e-5)
        for k, want in state.items():
            assert torch.allclose(torch.tensor(r["state"][k]), want, rtol=1e-4, atol=1e-5), k
        assert r["restored"]
