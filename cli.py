"""The `dtplan` command line: a thin layer over the Python API.

    dtplan compile MODEL.py --mesh 2x4 [--memory 80GiB] [--profile h100] [--train] [--out DIR]
    dtplan run MODEL.py --mesh 2x2 [--plan FILE] [--check] [--train --steps N]
    dtplan report PLAN.json [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["main"]


class _Progress:
    """Stage messages on stderr, only for a terminal and without --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.on = not quiet and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.on:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _placement_arg(text: str | None):
    """"S(0),R" for every value, or "x=S(0),R;y=R,R" by name (outputs by index)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(";") if t.strip()]
    if len(items) == 1 and "=" not in items[0]:
        return _split(items[0])
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"placement spec {item!r} needs a name: NAME=P1,P2,... (in {text!r})")
        name, spec = item.split("=", 1)
        out[name.strip()] = _split(spec)
    return out


def _split(spec: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


def _model_args(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--model-arg {p!r} must look like KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _plan(args, progress):
    from dtplan.api import plan_program
    from dtplan.ir.modelfile import capture_model_file, load_model_file
    from dtplan.planner.solver import SolverOptions
    from dtplan.planner.mesh import parse_mesh, parse_size
    from dtplan.ir.remat import RematError

    parse_mesh(args.mesh)  # fail fast, before the slow capture
    if args.memory is not None:
        parse_size(args.memory)
    mf = load_model_file(args.model, _model_args(args.model_arg))
    progress(f"capturing {'the training step of ' if args.train else ''}{mf.path}")
    if args.remat not in (None, "none") and not args.train:
        raise RematError(f"--remat {args.remat} recomputes activations in the backward; it needs --train")
    captured = capture_model_file(mf, train=args.train, precision=args.precision)
    plan = plan_program(
        captured,
        mesh=args.mesh,
        profile=args.profile,
        memory=args.memory,
        input_placements=_placement_arg(args.input_placements),
        output_placements=_placement_arg(args.output_placements),
        solver=SolverOptions(time_limit_s=args.time_limit),
        optimizer=args.optimizer,
        compare=getattr(args, "compare", False),
        coarsen=args.coarsen,
        model_info={"name": mf.name, "source": str(mf.path), "options": dict(mf.options)},
        progress=progress,
        remat=args.remat,
    )
    return mf, plan, captured


def _summary(plan) -> dict:
    c, s = plan.cost, plan.solver
    return {
        "model": plan.model.name,
        "mesh": str(plan.mesh),
        "profile": plan.profile["name"],
        "step_time_s": c.total_s,
        "compute_s": c.compute_s,
        "comm_s": c.comm_s,
        "overlapped_step_time_s": c.overlapped_s,
        "exposed_comm_s": c.exposed_comm_s,
        "comm_bytes_per_device": c.comm_bytes,
        "peak_memory_bytes_per_device": c.peak_memory_bytes,
        "memory_budget_bytes": plan.memory_budget_bytes,
        "collectives": len(plan.collectives),
        "fallbacks": len(plan.fallbacks),
        "train": plan.model.train,
        "precision": dict(plan.model.precision) or {"param_dtype": "float32"},
        "remat": dict(plan.model.remat) or {"mode": "none"},
        "recompute_s": plan.recompute_s(),
        "memory_parts_bytes": {k: getattr(c, k) for k in ("parameter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes")},
        "solver": {k: getattr(s, k) for k in ("status", "method", "objective", "bound", "gap", "wall_s")} | {"time_limited": list(s.time_limited)},
        "stage_seconds": dict(plan.stage_seconds),
        "comparison": {
            r["name"]: {"step_time_s": r["cost"]["total_s"], "overlapped_step_time_s": r["cost"].get("overlapped_s"), "fits": r["fits"]}
            if r.get("cost") is not None else {"error": r["error"], "fits": False}
            for r in plan.comparison
        },
    }


def _print_summary(plan, out_dir: Path | None) -> None:
    from dtplan.planner.mesh import format_bytes, format_seconds
    from dtplan.planner.output.classic import recipe_note

    c, s = plan.cost, plan.solver
    budget = "" if plan.memory_budget_bytes is None else f" of {format_bytes(plan.memory_budget_bytes)} budget"
    precision = f", {plan.precision}" if plan.model.precision else ""
    print(f"plan for {plan.model.name} on mesh {plan.mesh} ({plan.profile['name']} profile{precision})")
    print(f"  predicted step   {format_seconds(c.total_s)}  (compute {format_seconds(c.compute_s)}, communication {format_seconds(c.comm_s)})")
    if c.overlapped_s is not None:
        hidden = max(0.0, c.comm_s - c.exposed_comm_s)  # as `Overlap.hidden_s`: rounding left -0.00 ns
        print(f"  overlapped       {format_seconds(c.overlapped_s)}  (communication exposed {format_seconds(c.exposed_comm_s)}, hidden under compute {format_seconds(hidden)})")
    print(f"  communication    {format_bytes(c.comm_bytes)} sent per device in {len(plan.collectives)} collective(s)")
    print(f"  memory           {format_bytes(c.peak_memory_bytes)} peak per device{budget}")
    if plan.model.train:
        parts = ", ".join(f"{k.removesuffix('_bytes')} {format_bytes(getattr(c, k))}" for k in ("parameter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes"))
        print(f"  memory parts     {parts} ({plan.model.optimizer})")
        if plan.remat.active:
            print(f"  recomputation    {plan.remat}: {len(plan.recomputed())} op(s) recomputed in backward, {format_seconds(plan.recompute_s())} of the compute")
        for row in plan.model.remat_search:
            got = "does not fit" if row["step_s"] is None else f"{format_seconds(row['step_s'])}, {format_bytes(row['peak_memory_bytes'])}"
            print(f"  remat auto       {row['policy']:<24} {got}{'  <- chosen' if row['chosen'] else ''}")
    print(f"  solver           {s.status} by {s.method} in {format_seconds(s.wall_s)}, gap {s.gap:.2%}")
    if s.time_limited:
        print(f"  time limit       stopped {', '.join(s.time_limited)}: another machine or load may plan differently (--time-limit)")
    print("  stages           " + ", ".join(f"{k} {format_seconds(v)}" for k, v in plan.stage_seconds.items()))
    for row in plan.comparison:
        if row.get("error"):  # the layout could not be planned: its error, first line
            print(f"  vs {row['name']:<18} failed: {row['error'].splitlines()[0]}")
            continue
        fits = "" if row["fits"] else " (does not fit the budget)"
        note = f"  [{recipe_note(row['recipe'])}]" if row.get("recipe") else ""
        over = row["cost"].get("overlapped_s")
        over = "" if over is None else f" ({format_seconds(over)} overlapped)"
        print(f"  vs {row['name']:<18} {format_seconds(row['cost']['total_s'])}{over}{fits}{note}")
    if plan.fallbacks:
        print(f"  fallbacks        {len(plan.fallbacks)} op(s) replicated: " + ", ".join(sorted({f.op for f in plan.fallbacks})))
    if plan.flop_fallbacks:
        ops = ", ".join(sorted({f.op for f in plan.flop_fallbacks}))
        print(f"  FLOP fallbacks   {len(plan.flop_fallbacks)} op(s) whose FLOP formula failed, counted one FLOP per output element: {ops}")
    if out_dir is not None:
        print(f"  wrote            {out_dir / 'plan.json'}, {out_dir / 'report.html'}")


def _write_together(folder: Path, files: dict[str, str]) -> None:
    """Write every file or none: each goes to a temporary name first, and the
    renames happen only once all are written (a failure leaves no half output)."""
    folder.mkdir(parents=True, exist_ok=True)
    temps = []
    try:
        for name, text in files.items():
            tmp = folder / f".{name}.tmp-{os.getpid()}"
            temps.append((tmp, folder / name))
            tmp.write_text(text, encoding="utf-8")
        for tmp, final in temps:
            tmp.replace(final)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def cmd_compile(args) -> int:
    from dtplan.planner.output.plan import plan_text
    from dtplan.planner.output.report import build_report_data, render_report

    progress = _Progress(args.quiet or args.json)
    _, plan, _ = _plan(args, progress)
    out = Path(args.out)
    progress("writing the plan and its report")
    _write_together(out, {"plan.json": plan_text(plan), "report.html": render_report(build_report_data(plan.to_json()))})
    if args.json:
        print(json.dumps(_summary(plan), indent=1))
    else:
        _print_summary(plan, out)
    return 0


def cmd_run(args) -> int:
    from dtplan.planner.mesh import parse_mesh
    from dtplan.planner.output.plan import Plan
    from dtplan.runtime.agree import agreed_plan
    from dtplan.runtime.launch import check_rank_count, launched_by_torchrun, process_group

    progress = _Progress(args.quiet)
    plan = Plan.load(args.plan) if args.plan else None
    if args.mesh is None and plan is None:
        raise ValueError("run needs --mesh, or --plan (whose mesh it runs on)")
    mesh = plan.mesh if args.mesh is None else parse_mesh(args.mesh)
    check_rank_count(mesh.size)  # before planning for a mesh this machine cannot run
    if not launched_by_torchrun():
        plan, captured = _run_plan(args, plan, mesh, progress)
        return _print_run(args, _run(args, plan, captured, progress))
    # torchrun: rank 0 plans and every rank runs its plan (`runtime.agree`);
    # a rank that plans alone may stop its solve elsewhere on a loaded machine
    with process_group(mesh, timeout_s=args.timeout) as device_mesh:
        if plan is not None:  # every rank read a plan file: the files must agree
            plan, captured = _run_plan(args, plan, mesh, progress)
            plan = agreed_plan(plan)
        else:
            held: dict = {}

            def make():
                made, held["captured"] = _run_plan(args, None, mesh, progress)
                return made

            plan = agreed_plan(None, make)
            captured = held.get("captured")  # rank 0's; the other ranks trace the model themselves
        return _print_run(args, _run(args, plan, captured, progress, device_mesh=device_mesh))


def _run_plan(args, plan, mesh, progress):
    """The plan `run` runs and its capture: the given plan checked against
    the model and the options, or a plan made now."""
    from dtplan.ir.modelfile import capture_model_file, load_model_file
    from dtplan.ir.precision import Precision
    from dtplan.ir.remat import Remat
    from dtplan.planner.output.plan import PlanError

    if plan is not None:
        if tuple(mesh.shape) != tuple(plan.mesh.shape):
            raise PlanError(f"--mesh {mesh} does not match the plan's mesh {plan.mesh}")
        precision = plan.precision
        if args.precision is not None and Precision.parse(args.precision) != precision:
            raise PlanError(f"--precision {args.precision} does not match the plan's ({precision})")
        if args.remat is not None and args.remat != "auto" and Remat.parse(args.remat).mode != plan.remat.mode:
            raise PlanError(f"--remat {args.remat} does not match the plan's ({plan.remat})")
        mf = load_model_file(args.model, _model_args(args.model_arg))
        captured = capture_model_file(mf, train=plan.model.train, precision=precision, remat=plan.remat)
        plan.check_matches(captured.graph, mesh)
    else:
        _, plan, captured = _plan(args, progress)
    if args.train and not plan.model.train:
        raise PlanError("--train was given but the plan is for inference; plan with --train")
    if plan.model.train and not args.train:
        raise PlanError("the plan is a training step; run it with --train")
    return plan, captured


def _run(args, plan, captured, progress, **kwargs) -> list[dict]:
    from dtplan.runtime.run import run_model_file

    progress(f"running on {plan.mesh.size} rank(s)")
    return run_model_file(
        args.model, plan, options=_model_args(args.model_arg), check=args.check, steps=args.steps, lr=args.lr, timeout_s=args.timeout,
        captured=captured, **kwargs,
    )


def _print_run(args, reports: list[dict]) -> int:
    ok = True
    for r in reports:
        line = f"rank {r['rank']}: plan {r['plan']}, collectives {'as planned' if r['collectives_match'] else 'DIFFER from the plan'}"
        ok &= r["collectives_match"]
        if "losses" in r:
            line += "; losses " + " ".join(f"{x:.6g}" for x in r["losses"])
        if args.check:
            if "losses" in r:
                line += (
                    f"; gradients (step 1, before the optimizer) {'match' if r['gradients_match'] else 'DIFFER'}: {r['gradients_checked']} compared, "
                    f"nearest its tolerance {r['worst_gradient']} ({r['max_gradient_rel']:.3g} of its norm, {r['gradient_margin']:.2f} of the tolerance)"
                )
                line += f"; largest loss difference (relative) {r['max_loss_rel']:.3g}"
                line += f"; final parameters max abs error {r['max_abs']:.3g}, max rel error {r['max_rel']:.3g}"
            else:
                line += f"; max abs error {r['max_abs']:.3g}, max rel error {r['max_rel']:.3g}"
            if not r["numerics_match"]:
                first = r["first_mismatch"]
                line += f" MISMATCH: first in {first['tensor']} (max abs error {first['max_abs']:.3g}, max rel error {first['max_rel']:.3g})"
                if len(r["mismatched"]) > 1:
                    line += f"; {len(r['mismatched']) - 1} more: {r['mismatched'][1:6]}"
            ok &= r["numerics_match"]
        print(line)
        if not r["collectives_match"]:
            print(f"  issued: {r['collectives_issued']}")
    print("check passed" if ok else "check FAILED", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_report(args) -> int:
    from dtplan.planner.output.plan import Plan
    from dtplan.planner.output.report import write_report

    plan = Plan.load(args.plan)
    out = Path(args.out) if args.out else Path(args.plan).with_name("report.html")
    write_report(plan.to_json(), out)
    print(f"wrote {out}")
    return 0


def cmd_calibrate(args) -> int:
    from dtplan.runtime.calibrate import calibrate, write_profile
    from dtplan.runtime.launch import check_rank_count

    check_rank_count(args.ranks)
    profile = calibrate(args.ranks, base=args.base, say=None if args.quiet else (lambda m: print(m, flush=True)))
    out = write_profile(profile, args.out)
    print(f"wrote {out} (profile {profile.name}; use it with --profile {out})")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtplan", description="Ahead-of-time sharding planner for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    def planning(sp, *, mesh_required=True):
        sp.add_argument("model", help="model file defining build_model() and example_inputs()")
        sp.add_argument("--mesh", required=mesh_required, help="device mesh: 8, 2x4 or dp=2,tp=4")
        sp.add_argument("--profile", default="cpu", help="device profile name (h100, a100, cpu) or JSON file")
        sp.add_argument("--memory", help="per-device memory budget, e.g. 16MiB or 80GiB")
        sp.add_argument("--input-placements", help='e.g. "S(0),R" for all inputs or "x=S(0),R;y=R,R"')
        sp.add_argument("--output-placements", help='e.g. "R,R" for all outputs or "0=S(0),R"')
        sp.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="option passed to build_model/example_inputs")
        sp.add_argument("--time-limit", type=_positive(float), default=60.0, help="solver time limit in seconds: a safety net (the solver stops on work budgets; a step it stops is reported)")
        sp.add_argument("--train", action="store_true", help="plan a training step (needs loss_fn in the model file)")
        sp.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="optimizer whose state the memory model counts")
        sp.add_argument(
            "--precision", choices=("fp32", "bf16", "fp16"), default=None,
            help="compute dtype (FSDP2's MixedPrecisionPolicy: fp32 parameters and optimizer state, compute in this dtype, gradients reduced in fp32; default fp32; fp16 for inference only: its training needs loss scaling)",
        )
        sp.add_argument(
            "--remat", choices=("none", "full", "selective", "auto"), default=None,
            help="activation checkpointing (with --train): full recomputes each layer's forward in backward, selective keeps matmul and "
            "attention outputs and recomputes the rest, auto plans each and keeps the fastest that fits --memory (default none)",
        )
        sp.add_argument("--quiet", action="store_true", help="no progress messages")
        sp.add_argument(
            "--no-coarsen", dest="coarsen", action="store_false", default=None,
            help="on a mesh of 3+ axes, plan every axis in one program (default: outer axes merged, then blocks of real axes; see docs/architecture.md)",
        )

    c = sub.add_parser("compile", help="plan a model and write plan.json and report.html")
    planning(c)
    c.add_argument("--out", default="dtplan-out", help="output folder (default dtplan-out/)")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.add_argument("--no-compare", dest="compare", action="store_false", help="skip planning the classic layouts for the report's comparison")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run the sharded program on as many ranks as the mesh has")
    planning(r, mesh_required=False)
    r.add_argument("--plan", help="plan.json to run, on its mesh (default: plan first, for --mesh)")
    r.add_argument(
        "--check", action="store_true",
        help="compare outputs with one device (training: the first step's gradients, every loss and the final parameters)",
    )
    r.add_argument("--steps", type=_positive(int), default=5, help="training steps to run (with --train)")
    r.add_argument("--lr", type=_positive(float), default=1e-3, help="learning rate (with --train)")
    r.add_argument(
        "--timeout", type=_positive(float), default=600.0, help="seconds a collective may wait before its rank fails and the run ends (default 600)"
    )
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="render report.html again from a saved plan")
    rep.add_argument("plan", help="plan.json")
    rep.add_argument("--out", help="output HTML file (default: beside the plan)")
    rep.set_defaults(func=cmd_report)

    cal = sub.add_parser("calibrate", help="measure this machine (compute, memory, collectives) and write a device profile")
    cal.add_argument("--out", default="profile.json", help="profile file to write (default profile.json)")
    cal.add_argument("--ranks", type=_positive(int), default=2, help="ranks to spawn, as a run on this machine would (default 2)")
    cal.add_argument("--base", default="cpu", help="profile whose unmeasured figures (capacity, node size, inter-node link) it keeps (default cpu)")
    cal.add_argument("--quiet", action="store_true", help="no progress messages")
    cal.set_defaults(func=cmd_calibrate)
    return p


def quiet_torch_warnings() -> None:
    """torch's own deprecation chatter (pytree, functional collectives) is not
    the user's business; keep the terminal for dtplan's output."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
    import torch._logging

    torch._logging.set_logs(all=logging.ERROR)


def _positive(kind: type) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text} is not positive" + (" and finite" if kind is float else ""))
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _negative_values_joined(argv: list[str]) -> list[str]:
    """`--memory -5GB` as `--memory=-5GB`: argparse takes a value that starts
    with '-' for an option and prints its usage screen; joined, the value
    reaches its own check and gets its own one-line error."""
    out: list[str] = []
    for a in argv:
        if out and out[-1] in _VALUED and out[-1].startswith("--") and a[:1] == "-" and a[1:2].isdigit():
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


#: options that take a value a user may write negative by mistake
_VALUED = ("--memory", "--steps", "--lr", "--time-limit", "--timeout")


def _exit_on_interrupt(rank: str) -> None:
    """A rank under torchrun: SIGINT (torchrun forwards Ctrl-C to every rank)
    ends this process at once with one line, wherever it is. A Python handler
    would wait for the main thread to return from C++, and a rank blocked in
    a rendezvous or a collective whose peer has already gone never returns
    (torchrun then kills it after 30 s). So SIGINT is blocked in every thread
    (threads started later inherit the mask) and one thread waits for it."""

    def wait() -> None:
        signal.sigwait({signal.SIGINT})
        print(f"dtplan: rank {rank}: interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=wait, name="dtplan-sigint", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_negative_values_joined(sys.argv[1:] if argv is None else argv))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and argv is None:
        _exit_on_interrupt(os.environ["RANK"])
    try:
        quiet_torch_warnings()  # imports torch: seconds in which Ctrl-C must land here too
        return args.func(args)
    except KeyboardInterrupt as e:
        stopped = getattr(e, "ranks_stopped", None)  # the launcher's Interrupted
        print("dtplan: interrupted" + (f"; {stopped} rank(s) stopped" if stopped is not None else ""), file=sys.stderr)
        return 130
    except SystemExit as e:
        if hasattr(e, "ranks_stopped"):  # the launcher's Terminated (SIGTERM, SIGHUP)
            print(f"dtplan: terminated by {e.signal_name}; {e.ranks_stopped} rank(s) stopped", file=sys.stderr)
        raise
    except Exception as e:  # noqa: BLE001 - one clear line, no traceback (DTPLAN_DEBUG=1 shows it)
        if os.environ.get("DTPLAN_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"dtplan: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
