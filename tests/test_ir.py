"""Capture and IR: roles, FQNs, FLOPs, liveness and the graph signature."""
from __future__ import annotations

import pytest
import torch
from conftest import captured_example

from dtplan.ir import CaptureError, Role, capture
from dtplan.planner.cost.memory import live_multisets, stored_values


class TwoLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32, bias=False)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_roles_fqns_and_flops():
    with torch.device("meta"):
        c = capture(TwoLinear(), (torch.randn(4, 16),))
    g = c.graph
    params = {n.fqn for n in (n for n in g if n.role is Role.PARAM)}
    assert params == {"a.weight", "b.weight", "b.bias"}
    assert c.user_inputs == ("x",)
    mm = [n for n in g if n.op_name == "aten.mm.default"]
    assert len(mm) == 1 and mm[0].flops == 2 * 4 * 16 * 32 and mm[0].module == "a"
    addmm = [n for n in g if n.op_name == "aten.addmm.default"]
    assert addmm[0].flops == 2 * 4 * 32 * 8
    assert all(n.tensor_meta is not None for n in g)


def test_an_fx_traced_graph_module_is_accepted():
    gm = torch.fx.symbolic_trace(TwoLinear())
    c = capture(gm, (torch.randn(4, 16),))
    assert {n.fqn for n in (n for n in c.graph if n.role is Role.PARAM)} == {"a.weight", "b.weight", "b.bias"}


def test_signature_is_stable_and_sensitive():
    a = captured_example("mlp").graph.signature
    assert a == captured_example("mlp").graph.signature
    assert a != captured_example("mlp", hidden=128).graph.signature


def test_untraceable_model_names_the_cause():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError, match="torch.export could not trace"):
        capture(DataDependent(), (torch.randn(3),))


def test_liveness_rows_hold_params_and_the_live_activations():
    g = captured_example("mlp").graph
    stored, rows = stored_values(g), live_multisets(g, lambda name: name)
    assert set(stored) == {n.name for n in g if n.role is Role.PARAM}
    # the hidden activation (relu output) and its producer are live together at some point
    names = {n.op_name: n.name for n in g}
    assert any(names["aten.relu.default"] in r and names["aten.mm.default"] in r for r in rows)


def test_module_names_that_are_not_identifiers_are_captured_as_they_are():
    class Keys(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d = torch.nn.ModuleDict({"a'b": torch.nn.Linear(4, 4), "x y\\z": torch.nn.Linear(4, 4)})

        def forward(self, x):
            return self.d["x y\\z"](self.d["a'b"](x))

    captured = capture(Keys(), (torch.randn(2, 4),))
    fqns = {fqn for _, role, fqn in captured.placeholders if role is Role.PARAM}
    assert fqns == {"d.a'b.weight", "d.a'b.bias", "d.x y\\z.weight", "d.x y\\z.bias"}
    assert all(name.isidentifier() for name, _, _ in captured.placeholders)

