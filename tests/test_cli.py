"""The command line: what it writes, what it prints, and one clear line for
every kind of bad input."""
from __future__ import annotations

import json

import pytest
from conftest import example_path

from dtplan import cli


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compile_writes_plan_and_report_and_prints_a_summary(tmp_path, capsys):
    code, out, err = run_cli(capsys, "compile", example_path("mlp"), "--mesh", "dp=2,tp=2", "--out", tmp_path)
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["mesh"] == {"shape": [2, 2], "axis_names": ["dp", "tp"]}
    html = (tmp_path / "report.html").read_text()
    assert "<html" in html and "fc1.weight" in html
    for word in ("predicted step", "communication", "memory", "solver", "stages"):
        assert word in out


def test_compile_json_summary_matches_the_plan(tmp_path, capsys):
    code, out, _ = run_cli(
        capsys, "compile", example_path("mlp"), "--mesh", "4", "--memory", "16MiB", "--out", tmp_path, "--json",
        "--model-arg", "batch=8", "--model-arg", "d=1024", "--model-arg", "hidden=4096",
    )
    assert code == 0
    summary = json.loads(out)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert summary["step_time_s"] == plan["cost"]["total_s"]
    assert summary["comm_bytes_per_device"] == plan["cost"]["comm_bytes"]
    assert summary["peak_memory_bytes_per_device"] == plan["cost"]["peak_memory_bytes"]
    assert plan["parameters"] == {"fc1.weight": ["S(0)"], "fc2.weight": ["S(1)"]}
    assert plan["collectives"][0]["kind"] == "all_reduce" and plan["collectives"][0]["bytes"] == 32768


def test_input_and_output_placements_flags(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "compile", example_path("mlp"), "--mesh", "2x2", "--out", tmp_path,
        "--input-placements", "x=S(0),R", "--output-placements", "S(0),R",
    )
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["inputs"] == {"x": ["S(0)", "R"]} and plan["outputs"] == [["S(0)", "R"]]


def test_report_renders_again_from_a_saved_plan(tmp_path, capsys):
    run_cli(capsys, "compile", example_path("cnn"), "--mesh", "2", "--out", tmp_path)
    code, out, _ = run_cli(capsys, "report", tmp_path / "plan.json", "--out", tmp_path / "again.html")
    assert code == 0 and (tmp_path / "again.html").read_text().startswith("<!")


BAD_MODELS = {
    "syntax.py": ("def build_model(:\n", "syntax error"),
    "empty.py": ("x = 1\n", "does not define build_model and example_inputs"),
    "noinputs.py": ("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n", "does not define example_inputs"),
    "untraceable.py": (
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:\n"
        "            return x * 2\n"
        "        return x\n"
        "def build_model():\n    return M()\n"
        "def example_inputs():\n    return (torch.ones(4, 4),)\n",
        "untraceable.py:4",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_bad_model_files_get_one_clear_line(tmp_path, capsys, name):
    text, expected = BAD_MODELS[name]
    (tmp_path / name).write_text(text)
    code, _, err = run_cli(capsys, "compile", tmp_path / name, "--mesh", "2", "--out", tmp_path / "o")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("dtplan: error: ")
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["compile", "missing.py", "--mesh", "4"], "does not exist"),
        (["compile", example_path("mlp"), "--mesh", "2x0"], "size 0"),
        (["compile", example_path("mlp"), "--mesh", "two"], "invalid mesh"),
        (["compile", example_path("mlp"), "--mesh", "4", "--memory", "lots"], "invalid size"),
        (["compile", example_path("mlp"), "--mesh", "4", "--memory", "1KiB"], "least memory any plan needs"),
        (["compile", example_path("mlp"), "--mesh", "4", "--profile", "tpu"], "available"),
        (["compile", example_path("mlp"), "--mesh", "4", "--input-placements", "S(0),R"], "needs 1, one per axis"),
        (["compile", example_path("mlp"), "--mesh", "4", "--model-arg", "depth=3"], "depth"),
    ],
)
def test_bad_arguments_get_one_clear_line(tmp_path, capsys, args, expected):
    code, _, err = run_cli(capsys, *args, "--out", tmp_path) if args[0] == "compile" else run_cli(capsys, *args)
    assert code == 1
    assert err.startswith("dtplan: error: ") and err.count("\n") == 1
    assert expected in err


def test_run_refuses_a_plan_of_another_version_mesh_or_model(tmp_path, capsys):
    run_cli(capsys, "compile", example_path("mlp"), "--mesh", "4", "--out", tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    code, _, err = run_cli(capsys, "run", example_path("mlp"), "--mesh", "2x2", "--plan", tmp_path / "plan.json")
    assert code == 1 and "does not match the plan's mesh" in err
    code, _, err = run_cli(capsys, "run", example_path("mlp"), "--mesh", "4", "--plan", tmp_path / "plan.json", "--model-arg", "hidden=128")
    assert code == 1 and "does not match this model" in err
    code, _, err = run_cli(capsys, "run", example_path("mlp"), "--plan", tmp_path / "plan.json", "--model-arg", "hidden=128")
    assert code == 1 and "does not match this model" in err  # the plan's mesh, without --mesh
    code, _, err = run_cli(capsys, "run", example_path("mlp"))
    assert code == 1 and "run needs --mesh, or --plan" in err
    data["version"] = 0
    (tmp_path / "old.json").write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "run", example_path("mlp"), "--mesh", "4", "--plan", tmp_path / "old.json")
    assert code == 1 and "version: 0 is not supported" in err


def test_run_check_on_two_ranks(capsys):
    code, out, err = run_cli(capsys, "run", example_path("mlp"), "--mesh", "2", "--check", "--memory", "100KB")
    assert code == 0, err
    assert out.count("collectives as planned") == 2 and "check passed" in out


def test_train_needs_a_loss_fn(tmp_path, capsys):
    (tmp_path / "noloss.py").write_text(
        "import torch\ndef build_model():\n    return torch.nn.Linear(4, 4)\ndef example_inputs():\n    return (torch.ones(2, 4),)\n"
    )
    code, _, err = run_cli(capsys, "compile", tmp_path / "noloss.py", "--mesh", "2", "--train", "--out", tmp_path)
    assert code == 1 and "loss_fn" in err and err.count("\n") == 1


def test_compile_train_reports_memory_parts(tmp_path, capsys):
    code, out, err = run_cli(capsys, "compile", example_path("mlp"), "--mesh", "2", "--train", "--optimizer", "sgd", "--out", tmp_path, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["train"] and summary["memory_parts_bytes"]["optimizer_bytes"] == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["model"]["optimizer"] == "sgd" and set(plan["model"]["gradients"]) == {"fc1.weight", "fc2.weight"}


def test_run_train_check_on_two_ranks(tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", example_path("mlp"), "--mesh", "2", "--train", "--steps", "3", "--check", "--memory", "350KB")
    assert code == 0, err
    assert out.count("losses") == 2 and "check passed" in out


def test_an_error_in_the_users_build_names_the_file_function_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\ndef build_model():\n    cfg = {}\n    return cfg['hidden']\ndef example_inputs():\n    return (torch.ones(2),)\n")
    assert cli.main(["compile", str(bad), "--mesh", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: build_model() raised KeyError: 'hidden' (at {bad}:4: return cfg['hidden'])" in err, err


def test_negative_values_get_their_own_one_line_errors(capsys):
    assert cli.main(["compile", str(example_path("mlp")), "--mesh", "2", "--memory", "-5GB"]) == 1
    assert "size '-5GB' is -5000000000 bytes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(example_path("mlp")), "--mesh", "2", "--train", "--steps", "-3"])
    assert e.value.code == 2 and "argument --steps: -3 is not positive" in capsys.readouterr().err


def test_outputs_are_written_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    from dtplan.planner.output import report

    def broken(data):
        raise OSError("disk full")

    monkeypatch.setattr(report, "render_report", broken)
    assert cli.main(["compile", str(example_path("mlp")), "--mesh", "2", "--out", str(tmp_path), "--quiet"]) == 1
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no plan.json without its report, no temporaries


def test_a_training_plan_needs_train_and_arguments_are_checked(tmp_path, capsys):
    assert cli.main(["compile", str(example_path("mlp")), "--mesh", "2", "--train", "--out", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(example_path("mlp")), "--mesh", "2", "--plan", str(tmp_path / "plan.json")]) == 1
    assert "the plan is a training step; run it with --train" in capsys.readouterr().err
    for flag, value in (("--time-limit", "-1"), ("--timeout", "0"), ("--lr", "nan")):
        with pytest.raises(SystemExit):
            cli.main(["run" if flag != "--time-limit" else "compile", str(example_path("mlp")), "--mesh", "2", flag, value])
        assert f"argument {flag}: {value} is not positive" in capsys.readouterr().err


def test_precision_is_planned_recorded_and_held_to(tmp_path, capsys):
    code, out, err = run_cli(capsys, "compile", example_path("mlp"), "--mesh", "2", "--train", "--precision", "bf16", "--out", tmp_path, "--json", "--no-compare")
    assert code == 0, err
    assert json.loads(out)["precision"] == {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    code, _, err = run_cli(capsys, "run", example_path("mlp"), "--mesh", "2", "--train", "--plan", tmp_path / "plan.json", "--precision", "fp32")
    assert code == 1 and "--precision fp32 does not match the plan's (bf16 compute, fp32 gradient reduction)" in err


def test_remat_is_planned_recorded_and_held_to(tmp_path, capsys):
    code, out, err = run_cli(capsys, "compile", example_path("llama"), "--mesh", "2", "--train", "--remat", "full", "--out", tmp_path, "--json", "--no-compare")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["remat"] == {"mode": "full"} and summary["recompute_s"] > 0
    code, _, err = run_cli(capsys, "run", example_path("llama"), "--mesh", "2", "--train", "--plan", tmp_path / "plan.json", "--remat", "selective")
    assert code == 1 and "--remat selective does not match the plan's (full)" in err
    code, _, err = run_cli(capsys, "compile", example_path("llama"), "--mesh", "2", "--remat", "full", "--out", tmp_path)
    assert code == 1 and "--remat full recomputes activations in the backward; it needs --train" in err
    code, out, err = run_cli(capsys, "compile", example_path("llama"), "--mesh", "2", "--train", "--remat", "selective", "--out", tmp_path, "--no-compare")
    assert code == 0 and "recomputation    selective: " in out, err
    html = (tmp_path / "report.html").read_text()
    assert 'id="remat-policy">selective<' in html and "forward op(s) recomputed in the backward" in html
