"""`--check` can fail: a gradient off by a factor, on a large weight or on a
bias whose gradient is tiny, fails the check by name under AdamW and SGD,
although AdamW's update hides the factor; the check's tolerances, unit by
unit."""
from __future__ import annotations

import torch
from conftest import example_path

from dtplan import cli
from dtplan.ir.modelfile import capture_model_file, load_model_file
from dtplan.api import plan_program
from dtplan.runtime.run import run_many
from dtplan.runtime.train import SCALE_GRADIENT_ENV
from dtplan.runtime.verify import NOISE_COUNT, compare, compare_norm

#: a weight, and a bias whose gradient's largest element is about 1% of the
#: largest of any gradient in the model (gpt, examples/gpt.py)
WEIGHT, TINY_BIAS = "blocks.0.mlp.fc.weight", "blocks.1.attn.q.bias"


def test_a_doubled_gradient_fails_the_check_by_name_under_adamw_and_sgd(monkeypatch):
    captured = capture_model_file(load_model_file(example_path("gpt")), train=True)
    assert {WEIGHT, TINY_BIAS} <= {fqn for _, _, fqn in captured.placeholders}
    items = []
    for optimizer in ("adamw", "sgd"):
        plan = plan_program(captured, mesh="2", input_placements=["S(0)"], optimizer=optimizer, model_info={"name": "gpt"})
        assert plan.collectives  # the gradients really are reduced over the ranks
        items.append((example_path("gpt"), plan, {}, True, 1))
    monkeypatch.setenv(SCALE_GRADIENT_ENV, f"{WEIGHT}=2,{TINY_BIAS}=2")
    for rank, reports in enumerate(run_many(items, captured=[captured, captured])):
        for optimizer, r in zip(("adamw", "sgd"), reports, strict=True):
            case = (optimizer, rank, r.get("mismatched"))
            assert not r["numerics_match"] and not r["gradients_match"], case
            assert {m for m in r["mismatched"] if m.startswith("grad[")} == {f"grad[{WEIGHT}]", f"grad[{TINY_BIAS}]"}, case
            assert r["max_loss_rel"] < 1e-4, case  # the forward is untouched: only a gradient check sees it
            assert r["gradients_checked"] == len([p for p in captured.placeholders if p[1].name == "PARAM"]), case


def test_the_cli_names_the_gradient_that_differs(capsys, monkeypatch):
    monkeypatch.setenv(SCALE_GRADIENT_ENV, "fc2.weight=1.01")
    code = cli.main(["run", str(example_path("mlp")), "--mesh", "2", "--train", "--optimizer", "sgd", "--steps", "1", "--check", "--quiet"])
    out = capsys.readouterr()
    assert code == 1
    assert "gradients (step 1, before the optimizer) DIFFER" in out.out and "MISMATCH: first in grad[fc2.weight]" in out.out, out.out
    assert "check FAILED" in out.err


def test_gradients_compare_by_norm_with_a_floor_for_noise():
    g = torch.tensor([1.0, -2.0, 3.0, 1e-9])
    assert compare_norm(g * (1 + 1e-6), g, rtol=1e-4, floor=0.0).ok
    assert not compare_norm(g * 2, g, rtol=1e-4, floor=0.0).ok
    # a gradient that is rounding noise (zero in exact arithmetic) passes under the floor, not above it
    noise = torch.tensor([3e-8, -1e-8])
    assert compare_norm(-noise, noise, rtol=1e-4, floor=1e-6 * 3.0).ok
    assert not compare_norm(-noise, noise, rtol=1e-4, floor=1e-9).ok
    assert compare_norm(g[:3], g, rtol=1.0, floor=1.0).ok is False  # shapes differ


def test_noise_elements_are_bounded_by_a_count_and_a_share():
    want = torch.zeros(1000)
    loose = torch.ones(1000, dtype=torch.bool)
    for off, ok in ((NOISE_COUNT, True), (10, True), (11, False)):
        got = want.clone()
        got[:off] = 1e-3
        c = compare(got, want, atol=1e-6, loose=loose, loose_atol=2e-3, loose_count=max(NOISE_COUNT, 0.01 * want.numel()))
        assert (c.ok, c.loose_used) == (ok, off)
