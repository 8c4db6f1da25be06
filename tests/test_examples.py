"""Tests for the bundled example models under ``examples/``."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

EXAMPLES_DIR = Path(__file__).parents[1] / "examples"
EXAMPLE_NAMES = ["mlp", "gpt", "llama", "cnn"]


def _load(name: str):
    path = EXAMPLES_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dtplan_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=EXAMPLE_NAMES)
def example(request):
    return _load(request.param)


def test_contract(example):
    assert example.__doc__ and example.__doc__.strip()
    for attr in ("build_model", "example_inputs", "loss_fn"):
        assert callable(getattr(example, attr))
        assert attr in example.__all__
    for name in example.__all__:
        assert hasattr(example, name), name


def test_forward_and_loss_on_cpu(example):
    model = example.build_model()
    inputs = example.example_inputs()
    assert isinstance(inputs, tuple) and inputs
    assert all(isinstance(t, torch.Tensor) for t in inputs)
    out = model(*inputs)
    assert isinstance(out, torch.Tensor)
    assert torch.isfinite(out).all()
    loss = example.loss_fn(out, *inputs)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_deterministic(example):
    m1 = example.build_model()
    torch.manual_seed(1234)  # must not matter: build_model seeds itself
    m2 = example.build_model()
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    in1, in2 = example.example_inputs(), example.example_inputs()
    for a, b in zip(in1, in2):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(m1(*in1), m2(*in2))


def test_default_dims_divisible_by_4(example):
    model = example.build_model()
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            assert all(d % 4 == 0 for d in mod.weight.shape), (name, tuple(mod.weight.shape))
        elif isinstance(mod, nn.Conv2d):
            assert mod.out_channels % 4 == 0, name
    for t in example.example_inputs():
        assert t.shape[0] % 4 == 0


def test_meta_build_and_export(example):
    with torch.device("meta"):
        model = example.build_model()
        inputs = example.example_inputs()
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert all(t.is_meta for t in inputs)
    ep = torch.export.export(model, inputs)
    ep = ep.run_decompositions()
    assert len(ep.graph.nodes) > 0


def test_export_cpu_matches_eager(example):
    model = example.build_model()
    inputs = example.example_inputs()
    ep = torch.export.export(model, inputs).run_decompositions()
    with torch.no_grad():
        expected = model(*inputs)
        got = ep.module()(*inputs)
    torch.testing.assert_close(got, expected)


def test_unknown_option_raises(example):
    accepted_sample = {
        "mlp": "hidden", "gpt": "heads", "llama": "preset", "cnn": "size",
    }[example.__name__.rsplit("_", 1)[-1]]
    for fn in (example.build_model, example.example_inputs):
        with pytest.raises(ValueError) as excinfo:
            fn(bogus_option=3)
        msg = str(excinfo.value)
        assert "bogus_option" in msg
        assert accepted_sample in msg


def test_string_options_are_converted(example):
    opts = {"batch": "4"}
    model = example.build_model(**opts)
    inputs = example.example_inputs(**opts)
    assert inputs[0].shape[0] == 4
    out = model(*inputs)
    assert torch.isfinite(example.loss_fn(out, *inputs))


def test_bad_option_values_raise(example):
    with pytest.raises(ValueError):
        example.build_model(batch="four")
    with pytest.raises(ValueError):
        example.example_inputs(batch=0)


def test_default_input_shapes():
    assert _load("mlp").example_inputs()[0].shape == (8, 64)
    assert _load("gpt").example_inputs()[0].shape == (4, 16)
    assert _load("llama").example_inputs()[0].shape == (4, 16)
    assert _load("cnn").example_inputs()[0].shape == (8, 3, 16, 16)
    assert _load("gpt").build_model()(_load("gpt").example_inputs()[0]).shape == (4, 16, 256)


def test_gpt_options():
    gpt = _load("gpt")
    model = gpt.build_model(dim="32", heads="4", layers="1", vocab="64", seq="8", batch="4")
    (ids,) = gpt.example_inputs(dim="32", heads="4", layers="1", vocab="64", seq="8", batch="4")
    assert ids.shape == (4, 8) and int(ids.max()) < 64
    assert len(model.blocks) == 1
    assert model(ids).shape == (4, 8, 64)
    with pytest.raises(ValueError):
        gpt.build_model(dim=30, heads=4)


def test_llama_presets_and_overrides():
    llama = _load("llama")
    assert set(llama.PRESETS) == {"tiny", "8b", "70b"}
    model = llama.build_model(preset="tiny", layers="1", seq="8")
    assert len(model.layers) == 1
    (tokens,) = llama.example_inputs(preset="tiny", batch=4, seq=8)
    assert tokens.shape == (4, 8)
    assert model(tokens).shape == (4, 8, 256)
    attn = model.layers[0].attention
    assert attn.n_kv_heads < attn.n_heads
    assert "rope_cos" not in model.state_dict()
    with pytest.raises(ValueError, match="preset"):
        llama.build_model(preset="13b")


@pytest.mark.parametrize("preset, expected", [("8b", 8.03e9), ("70b", 70.6e9)])
def test_llama_big_presets_on_meta(preset, expected):
    llama = _load("llama")
    start = time.perf_counter()
    with torch.device("meta"):
        model = llama.build_model(preset=preset)
        (tokens,) = llama.example_inputs(preset=preset)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"building {preset} on meta took {elapsed:.2f}s"
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - expected) / expected < 0.05, n_params
    assert tokens.shape == (16, 8192) and tokens.is_meta
