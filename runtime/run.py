"""`dtplan run`: execute a plan for a model file on every rank and check it."""
from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.utils import _pytree as pytree

from dtplan.runtime.program import sharded_program
from dtplan.ir.capture import Captured, from_bytes, to_bytes, training_loss
from dtplan.ir.modelfile import capture_model_file, load_model_file, require_loss_fn
from dtplan.ir.precision import Precision, call_with_precision
from dtplan.ir.remat import remat as apply_remat
from dtplan.planner.output.plan import Plan
from dtplan.runtime.agree import plan_digest
from dtplan.runtime.launch import launched_by_torchrun, process_group, spawn
from dtplan.runtime.params import local_shard
from dtplan.runtime.train import make_optimizer, sharded_trainer
from dtplan.runtime.verify import NOISE_COUNT, NOISE_SHARE, Comparison, CollectiveRecorder, Tolerance, compare, compare_norm, compare_within, expected_collectives, tolerance

__all__ = ["Reference", "rank_work", "run_many", "run_model_file", "single_device_training", "step_seed", "train_rank_work"]


def rank_work(
    rank: int, mesh: DeviceMesh, *, path: str, options: Mapping[str, str], plan_json: dict, check: bool, captured: Captured | bytes | None = None
) -> dict:
    """One rank: build the real model, shard it, run one step, report.
    `captured`: the capture the plan was made from (`capture.to_bytes`),
    else the rank traces the model itself."""
    mf = load_model_file(path, options)
    model, inputs = mf.build(meta=False)
    plan = Plan.from_json(plan_json)
    precision = plan.precision
    t0 = time.perf_counter()
    captured = _capture(mf, train=False, precision=precision, shipped=captured)
    t1 = time.perf_counter()
    program = sharded_program(model, captured, plan, mesh)
    seconds = {"capture": t1 - t0, "lower": time.perf_counter() - t1}
    recorder = CollectiveRecorder(mesh, tuple(plan.mesh.axis_names))
    local_inputs = program.shard_inputs(*inputs)
    with recorder, torch.no_grad():
        outs = program.graph_module(*local_inputs)
    report = {"rank": rank, **_collectives_report(recorder, plan), "outputs": len(outs), "seconds": seconds}
    if check:
        with torch.no_grad():
            ref = call_with_precision(model, inputs, precision)
        named = [(f"output{pytree.keystr(path)}", r) for path, r in pytree.tree_flatten_with_path(ref)[0] if isinstance(r, torch.Tensor)]
        if len(named) != len(outs):
            raise ValueError(f"the model returned {len(named)} tensors on one device but {len(outs)} were captured")
        tol = tolerance(precision.param_dtype)
        cmps = {name: compare_within(o, local_shard(r, mesh, pl), tol) for (name, r), o, pl in zip(named, outs, plan.outputs, strict=True)}
        report.update(_summary(cmps))
    return report


def _summary(cmps: Mapping[str, Comparison]) -> dict:
    """Largest errors, and the first tensor that differs and by how much."""
    bad = [(name, c) for name, c in cmps.items() if not c.ok]
    return {
        "max_abs": max((c.max_abs for c in cmps.values()), default=0.0),
        "max_rel": max((c.max_rel for c in cmps.values()), default=0.0),
        "numerics_match": not bad,
        "first_mismatch": None if not bad else {"tensor": bad[0][0], "max_abs": bad[0][1].max_abs, "max_rel": bad[0][1].max_rel},
        "mismatched": [name for name, _ in bad],
    }


def step_seed(step: int) -> int:
    """The seed each training step starts from, on every rank and in the
    single-device reference alike: random ops (dropout) then draw the same
    values on both sides."""
    return 1234 + step


def train_rank_work(
    rank: int,
    mesh: DeviceMesh,
    *,
    path: str,
    options: Mapping[str, str],
    plan_json: dict,
    check: bool,
    steps: int,
    lr: float = 1e-3,
    captured: Captured | bytes | None = None,
) -> dict:
    """One rank: `steps` sharded training steps on the example inputs; with
    `check`, the same steps on one device, compared loss by loss and, at the
    end, parameter by parameter and buffer by buffer. `captured` as for
    `rank_work`."""
    mf = load_model_file(path, options)
    loss_fn = require_loss_fn(mf)
    model, inputs = mf.build(meta=False, train=True)
    plan = Plan.from_json(plan_json)
    precision = plan.precision
    t0 = time.perf_counter()
    captured = _capture(mf, train=True, precision=precision, remat=plan.remat, shipped=captured)
    t1 = time.perf_counter()
    optimizer = plan.model.optimizer or "adamw"
    trainer = sharded_trainer(model, captured, plan, mesh, optimizer=optimizer, lr=lr)
    seconds = {"capture": t1 - t0, "lower": time.perf_counter() - t1}
    t1 = time.perf_counter()
    recorder = CollectiveRecorder(mesh, tuple(plan.mesh.axis_names))
    losses = []
    first: dict[str, torch.Tensor] = {}  # with `check`: the first step's gradients and buffers, in full
    for i in range(steps):
        torch.manual_seed(step_seed(i))
        with recorder if i == 0 else contextlib.nullcontext():  # every step issues the same collectives; check the first
            losses.append(trainer.backward(*inputs))
        if check and i == 0:  # before any optimizer: what the plan computed, not what an optimizer made of it
            # copies: a replicated buffer's full value is the live buffer itself
            first = {k: v.clone() for k, v in _buffers(trainer.full_state_dict(), trainer).items()}
            first.update({f"grad[{k}]": g.clone() for k, g in trainer.full_gradients().items()})
        trainer.update()
    seconds["steps"] = time.perf_counter() - t1
    report = {"rank": rank, "losses": losses, **_collectives_report(recorder, plan), "seconds": seconds}
    state = trainer.full_state_dict()
    trainer.load_state_dict(state)
    again = trainer.full_state_dict()
    report["state_dict_round_trip"] = all(torch.equal(state[k], again[k]) for k in state)
    if check:
        t1 = time.perf_counter()
        ref = single_device_training(mf, loss_fn, steps=steps, lr=lr, optimizer=optimizer, precision=precision)
        seconds["reference"] = time.perf_counter() - t1
        report.update(_check_training(losses, first, state, ref, trainer, tol=tolerance(precision.param_dtype), lr=lr, steps=steps))
    return report


def _buffers(state: Mapping[str, torch.Tensor], trainer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k not in trainer.parameters}


def _check_training(losses, first, state, ref: Reference, trainer, *, tol: Tolerance, lr: float, steps: int) -> dict:
    """The sharded run against one device: the first step's gradients (each
    gathered to full, before any optimizer ran: a gradient off by a factor
    cannot hide behind Adam's normalisation) and buffer updates, every loss,
    and the parameters and buffers at the end."""
    missing = sorted(set(ref.state) - set(state)) + sorted(set(ref.first) - set(first))
    if missing:
        raise ValueError(f"the sharded run lacks {missing[:5]}")
    loss_cmp = compare_within(torch.tensor(losses), torch.tensor(ref.losses), tol)
    cmps: dict[str, Comparison] = {"loss": loss_cmp}
    grads = {k: v for k, v in ref.first.items() if k.startswith("grad[")}
    largest = max((float(g.abs().max()) for g in grads.values() if g.numel()), default=0.0)
    for key, want in ref.first.items():
        if key in grads:
            cmps[key] = compare_norm(first[key], want, rtol=tol.gradient, floor=tol.gradient_floor * largest)
        else:  # a buffer the first step updated (batch norm's running statistics), from equal parameters
            cmps[f"{key} (step 1)"] = compare_within(first[key], want, tol)
    # After the optimizer: Adam normalises every update to about lr, so an
    # element whose true gradient is below the reduction's rounding noise
    # may step either way, and the parameters it moves change the next
    # steps' gradients a little. Parameters compare at rtol 1e-4 plus an
    # absolute 5% of one step (float32; the dtype's `step` fraction per step
    # taken in lower precision). Under Adam, the elements whose gradient was
    # noise-dominated at some step (see single_device_training) may be off by
    # up to 2 lr a step, but no more of them than `NOISE_COUNT` or
    # `NOISE_SHARE` of a tensor, whichever is more, unless the tensor's whole
    # gradient was noise (`Reference.silent`; the gradient check held it to
    # the noise floor). SGD's update is linear in
    # the gradient: no allowance. Buffers at the end are statistics of
    # activations downstream of those parameters: rtol 1e-3 plus a tenth of
    # one step.
    noisy = 0
    for fqn, want in ref.state.items():
        if fqn in trainer.parameters:
            atol = max(0.05, tol.step * steps) * lr
            loose = ref.noise.get(fqn) if ref.optimizer != "sgd" else None
            count = want.numel() if fqn in ref.silent else max(NOISE_COUNT, NOISE_SHARE * want.numel())
            c = compare(state[fqn], want, atol=atol, loose=loose, loose_atol=2.0 * lr * steps, loose_count=count)
            noisy += c.loose_used
            cmps[fqn] = c
        else:
            cmps[fqn] = compare(state[fqn], want, rtol=1e-3, atol=0.1 * lr)
    worst = max(grads, key=lambda k: cmps[k].margin, default=None)  # nearest its limit
    return dict(
        noise_dominated_elements=int(sum(int(m.sum()) for m in ref.noise.values())),
        noise_elements_used=noisy,
        reference_losses=ref.losses,
        max_loss_rel=loss_cmp.max_rel,
        gradients_checked=len(grads),
        max_gradient_rel=0.0 if worst is None else cmps[worst].max_rel,
        worst_gradient=None if worst is None else worst.removeprefix("grad[").removesuffix("]"),
        gradient_margin=0.0 if worst is None else cmps[worst].margin,
        gradients_match=all(cmps[k].ok for k in grads),
        #: per parameter: the difference's norm over the gradient's, and over what the tolerance allows
        gradients={k.removeprefix("grad[").removesuffix("]"): (cmps[k].max_rel, cmps[k].margin) for k in grads},
        **_summary(cmps),
    )


def _collectives_report(recorder: CollectiveRecorder, plan: Plan) -> dict:
    """What one step issued, and whether it is exactly the plan's list."""
    issued = Counter(recorder.calls)
    return {
        "plan": plan_digest(plan),
        "collectives_issued": sorted([list(k) + [v] for k, v in issued.items()]),
        "collectives_match": issued == expected_collectives(plan),
    }


@dataclass(frozen=True)
class Reference:
    """One device's run of the same steps."""

    losses: list[float]
    #: every parameter and buffer at the end
    state: dict[str, torch.Tensor]
    #: per parameter, the elements whose gradient was noise-dominated at some step
    noise: dict[str, torch.Tensor]
    #: after the first step's backward, before the optimizer: each gradient
    #: as "grad[FQN]", and each buffer that step updated
    first: dict[str, torch.Tensor]
    optimizer: str
    #: parameters whose whole gradient was rounding noise at some step (under
    #: 1e-6 of the largest of all: zero in exact arithmetic, such as a batch
    #: norm's bias feeding a linear op and another batch norm)
    silent: frozenset[str] = frozenset()


def single_device_training(mf, loss_fn, *, steps: int, lr: float, optimizer: str, precision: Precision = Precision()) -> Reference:
    """The reference: the same steps with plain autograd on one device, each
    from the same seed, under the same mixed-precision policy. An element's
    gradient is noise-dominated at a step when it is under the dtype's
    `noise` fraction (1e-4 in float32) of its tensor's largest, or under
    1e-6 of the largest of all (a batch norm's bias feeding straight into
    another batch norm has a gradient of exactly zero, computed as rounding
    noise)."""
    model, inputs = mf.build(meta=False, train=True)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr)
    losses = []
    noise: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    silent: set[str] = set()
    share = tolerance(precision.param_dtype).noise
    for i in range(steps):
        torch.manual_seed(step_seed(i))
        before = {k: v.detach().clone() for k, v in model.named_buffers()} if i == 0 else {}
        loss = training_loss(model, loss_fn, inputs, precision)
        loss.backward()
        if i == 0:
            first = {f"grad[{name}]": p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
            first.update({k: v.detach().clone() for k, v in model.named_buffers() if k in before and not torch.equal(before[k], v)})
        grads = {name: p.grad.abs() for name, p in model.named_parameters() if p.grad is not None}
        largest = max((float(g.max()) for g in grads.values() if g.numel()), default=0.0)
        for name, g in grads.items():
            tiny = g <= max(share * float(g.max()) if g.numel() else 0.0, 1e-6 * largest)
            noise[name] = tiny | noise[name] if name in noise else tiny
            if g.numel() and float(g.max()) <= 1e-6 * largest:
                silent.add(name)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    state = {k: v.detach() for k, v in model.named_parameters()}
    state.update({k: v.detach() for k, v in model.named_buffers()})
    return Reference(losses, state, noise, first, optimizer, frozenset(silent))


#: captures shared by the items one group of ranks runs (`run_many`), by
#: model file, options, train and precision, or by the bytes shipped (the
#: recomputation is applied on top): the capture is most of an item's time
#: on a small model
_CAPTURES: dict | None = None


def _capture(mf, *, train: bool, precision: Precision, remat=None, shipped: Captured | bytes | None = None):
    """The capture a plan runs: the one shipped from the parent (with the
    plan's recomputation applied when it was shipped without), else traced
    here, once per group of ranks (`_CAPTURES`)."""
    if isinstance(shipped, bytes):  # a capture several items share arrives once, and is read once per group
        cache = _CAPTURES if _CAPTURES is not None else {}
        if shipped not in cache:
            cache[shipped] = from_bytes(shipped)
        shipped = cache[shipped]
    if shipped is not None:
        if shipped.train != train or shipped.precision != precision:
            raise ValueError(f"the shipped capture is for train={shipped.train}, {shipped.precision}; the plan needs train={train}, {precision}")
        return apply_remat(shipped, remat) if remat is not None and shipped.remat != remat else shipped
    key = (str(mf.path), tuple(sorted(mf.options.items())), train, tuple(sorted(precision.to_json().items())))
    if _CAPTURES is None:
        return capture_model_file(mf, train=train, precision=precision, remat=remat)
    if key not in _CAPTURES:
        _CAPTURES[key] = capture_model_file(mf, train=train, precision=precision)
    captured = _CAPTURES[key]
    return apply_remat(captured, remat) if remat is not None else captured


def _many(rank: int, mesh: DeviceMesh, *, items: list[dict]) -> list[dict]:
    global _CAPTURES
    _CAPTURES = {}
    try:
        return [train_rank_work(rank, mesh, **item) if item.get("steps") else rank_work(rank, mesh, **item) for item in items]
    finally:
        _CAPTURES = None


def run_many(items: list[tuple], *, steps: int = 0, captured: Sequence[Captured | None] | None = None) -> list[list[dict]]:
    """Run several plans (same mesh) in one group of spawned ranks: the start-up
    of a group costs seconds. Each item is (path, plan, options, check) or
    (path, plan, options, check, steps); training plans run `steps` steps
    (the item's own, else this call's). `captured`, one per item (or None),
    is the capture each plan was made from: the ranks take it instead of
    tracing the model again. Returns per rank, per item, the report."""
    meshes = {tuple(item[1].mesh.shape) for item in items}
    if len(meshes) != 1:
        raise ValueError(f"run_many needs plans for one mesh, got {sorted(meshes)}")
    if captured is not None and len(captured) != len(items):
        raise ValueError(f"run_many got {len(captured)} captures for {len(items)} items")
    payload, packed = [], {}  # a capture several items share is packed (and pickled) once
    for i, (path, plan, opts, check, *own) in enumerate(items):
        n = (own[0] if own else steps) if plan.model.train else 0
        c = captured[i] if captured is not None else None
        if c is not None and id(c) not in packed:
            packed[id(c)] = to_bytes(c)
        shipped = {"captured": packed[id(c)]} if c is not None else {}
        payload.append(dict(path=str(path), options=dict(opts), plan_json=plan.to_json(), check=check, **({"steps": n} if n else {}), **shipped))
    return spawn(functools.partial(_many, items=payload), items[0][1].mesh)


def run_model_file(
    path: str,
    plan: Plan,
    *,
    options: Mapping[str, str] | None = None,
    check: bool = False,
    steps: int = 0,
    lr: float = 1e-3,
    timeout_s: float | None = None,
    captured: Captured | None = None,
    device_mesh: DeviceMesh | None = None,
) -> list[dict]:
    """Run the plan on as many ranks as its mesh has; one report per rank.
    A training plan runs `steps` optimizer steps. A collective that waits
    longer than `timeout_s` fails its rank (see `launch.spawn`). `captured`
    is the capture the plan was made from: spawned ranks take it instead of
    tracing the model again.

    Under torchrun this rank runs alone and returns its own report, on
    `device_mesh` where the caller has initialised the group already."""
    common = dict(path=str(path), options=dict(options or {}), plan_json=plan.to_json(), check=check)
    if captured is not None:
        # this process's own rank (torchrun) takes the object; spawned ranks its bytes
        common["captured"] = captured if launched_by_torchrun() else to_bytes(captured)
    if plan.model.train:
        work = functools.partial(train_rank_work, steps=max(steps, 1), lr=lr, **common)
    else:
        work = functools.partial(rank_work, **common)
    if device_mesh is not None:
        return [work(device_mesh.get_rank(), device_mesh)]
    if launched_by_torchrun():
        with process_group(plan.mesh, timeout_s=timeout_s) as mesh:
            return [work(mesh.get_rank(), mesh)]
    return spawn(work, plan.mesh, timeout_s=timeout_s)
