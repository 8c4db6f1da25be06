"""Tests for the self-contained HTML plan report (dtplan.planner.output.report)."""

from __future__ import annotations

import copy
import html.parser
import json
import re

import pytest

from dtplan.planner.output.report import (
    build_report_data,
    format_bytes,
    format_seconds,
    render_report,
    write_report,
)

XSS_NAME = "<script>alert(1)</script>"

PLAN = {
    "version": 1,
    "model": {"name": "mlp", "source": "examples/mlp.py", "train": False, "num_nodes": 12},
    "mesh": {"shape": [2, 2], "axis_names": ["d0", "d1"]},
    "profile": {"name": "cpu", "description": "CPU test profile"},
    "memory_budget_bytes": 16777216,
    "inputs": {"x": ["S(0)", "R"]},
    "outputs": [["R", "R"]],
    "parameters": {
        "fc2.weight": ["R", "S(1)"],
        "fc1.weight": ["S(0)", "R"],
        "fc1.bias": ["P(sum)", "R"],
    },
    "parameter_info": {
        "fc1.weight": {"shape": [4096, 1024], "dtype": "float32",
                       "local_shape": [2048, 1024], "bytes_per_device": 8388608},
        "fc1.bias": {"shape": [4096], "dtype": "float32",
                     "local_shape": [4096], "bytes_per_device": 16384},
        "fc2.weight": {"shape": [1024, 4096], "dtype": "bfloat16",
                       "local_shape": [1024, 2048], "bytes_per_device": 4194304},
    },
    "nodes": {
        "mm": {"op": "aten.mm.default", "module": "fc1", "inputs": [["R", "R"], ["R", "S(1)"]],
               "output": ["R", "S(1)"], "compute_s": 1.2e-6},
    },
    "collectives": [
        {"kind": "all_reduce", "axis": "d1", "bytes": 32768, "time_s": 2.1e-5,
         "node": "mm_1", "module": "fc2"},
        {"kind": "all_gather", "axis": "d0", "bytes": 65536, "time_s": 3.5e-5,
         "node": "mm_2", "module": "fc2"},
        {"kind": "all_reduce", "axis": "d1", "bytes": 1024, "time_s": 4.0e-6,
         "node": "add", "module": None},
    ],
    "fallbacks": [{"node": "foo", "op": "aten.foo.default", "reason": "no sharding rule"}],
    "cost": {"total_s": 1e-3, "compute_s": 8e-4, "comm_s": 2e-4, "comm_bytes": 32768,
             "peak_memory_bytes": 9000000, "parameter_bytes": 8388608,
             "activation_bytes": 600000, "overlapped_s": 8.5e-4, "exposed_comm_s": 5e-5},
    "solver": {"status": "OPTIMAL", "objective": 123456, "bound": 123456, "gap": 0.0,
               "wall_s": 0.05, "variables": 120, "constraints": 80},
    "stage_seconds": {"capture": 0.8, "strategies": 0.2, "solve": 0.05, "lower": 0.1},
}

SUMMARY_KEYS = ("total_s", "compute_s", "comm_s", "comm_bytes",
                "peak_memory_bytes", "parameter_bytes", "activation_bytes", "overlapped_s", "exposed_comm_s")


def _plan(**overrides):
    plan = copy.deepcopy(PLAN)
    plan.update(overrides)
    return plan


def _render(plan):
    return render_report(build_report_data(plan))


def _embedded(page):
    match = re.search(
        r'<script type="application/json" id="dtplan-data">(.*?)</script>', page, re.S)
    assert match, "embedded JSON block missing"
    return json.loads(match.group(1))


class _Checker(html.parser.HTMLParser):
    """Collects element ids (to check uniqueness) and data-value attributes."""

    def __init__(self):
        super().__init__()
        self.ids: list[str] = []
        self.values: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
            if "data-value" in attrs:
                self.values[attrs["id"]] = attrs["data-value"]


def _parse(page):
    checker = _Checker()
    checker.feed(page)
    return checker


@pytest.fixture(scope="module")
def page():
    return _render(PLAN)


def test_page_renders(page):
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    for section in ("summary", "parameters", "collectives", "solver", "warnings"):
        assert f'id="{section}"' in page
    assert "mlp" in page and "examples/mlp.py" in page
    assert "d0=2 × d1=2" in page
    assert "cpu" in page


def test_no_external_references(page):
    assert "http://" not in page
    assert "https://" not in page
    assert not re.search(r"""(src|href)\s*=""", page)
    assert "@import" not in page and "url(" not in page


def test_parameters_and_placements_appear(page):
    for name, placements in PLAN["parameters"].items():
        assert f'<tr data-name="{name}">' in page
        row = page.split(f'<tr data-name="{name}">', 1)[1].split("</tr>", 1)[0]
        for placement in placements:
            assert f'<span class="placement">{placement}</span>' in row
    assert "4096 × 1024" in page and "2048 × 1024" in page


def test_parameters_sorted_by_name():
    data = build_report_data(PLAN)
    names = [p["name"] for p in data["parameters"]]
    assert names == sorted(PLAN["parameters"])


def test_embedded_json_matches_plan(page):
    data = _embedded(page)
    summary = data["summary"]
    for key in SUMMARY_KEYS:
        assert summary[key]["value"] == PLAN["cost"][key]
    assert summary["memory_budget_bytes"]["value"] == PLAN["memory_budget_bytes"]
    assert summary["memory_used_pct"]["value"] == pytest.approx(9000000 / 16777216 * 100)
    assert data["solver"]["status"] == "OPTIMAL"
    for key in ("objective", "bound", "gap", "wall_s", "variables", "constraints"):
        assert data["solver"][key]["value"] == PLAN["solver"][key]
    assert data == json.loads(json.dumps(build_report_data(PLAN)))


def test_data_value_attributes_match_plan(page):
    checker = _parse(page)
    assert len(checker.ids) == len(set(checker.ids)), "duplicate element ids"
    for key in SUMMARY_KEYS:
        element_id = key.replace("_", "-")
        assert float(checker.values[element_id]) == PLAN["cost"][key]
    assert float(checker.values["memory-budget-bytes"]) == PLAN["memory_budget_bytes"]
    assert float(checker.values["solver-objective"]) == PLAN["solver"]["objective"]


def test_exposed_and_hidden_communication_shown(page):
    values = _parse(page).values
    assert float(values["hidden-comm-s"]) == pytest.approx(2e-4 - 5e-5)
    assert "hidden under compute" in page
    old = _plan(cost={k: v for k, v in PLAN["cost"].items() if k not in ("overlapped_s", "exposed_comm_s")})
    assert "hidden-comm-s" not in _render(old)  # a plan file from before overlap renders without it


def test_collective_totals():
    totals = build_report_data(PLAN)["collective_totals"]
    by_kind = {row["key"]: row for row in totals["by_kind"]}
    assert by_kind["all_reduce"]["count"] == 2
    assert by_kind["all_reduce"]["bytes"]["value"] == 32768 + 1024
    assert by_kind["all_gather"]["time_s"]["value"] == pytest.approx(3.5e-5)
    by_axis = {row["key"]: row for row in totals["by_axis"]}
    assert by_axis["d1"]["time_s"]["value"] == pytest.approx(2.5e-5)
    assert by_axis["d0"]["bytes"]["value"] == 65536


def test_fallbacks_listed(page):
    assert "no sharding rule" in page and "aten.foo.default" in page


def test_parameter_name_is_escaped():
    plan = _plan(parameters={XSS_NAME: ["R", "S(0)"]}, parameter_info={})
    page = _render(plan)
    assert XSS_NAME not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert _embedded(page)["parameters"][0]["name"] == XSS_NAME


def test_missing_optional_fields_render():
    plan = _plan(fallbacks=[], memory_budget_bytes=None)
    for key in ("parameter_info", "solver", "stage_seconds", "profile"):
        del plan[key]
    page = _render(plan)
    assert "no memory budget" in page
    assert re.search(r'<section id="warnings">.*?none.*?</section>', page, re.S)
    data = _embedded(page)
    assert data["summary"]["memory_budget_bytes"]["value"] is None
    assert data["summary"]["memory_used_pct"]["value"] is None
    assert data["parameters"][0]["shape"] is None
    for name in PLAN["parameters"]:
        assert name in page


def test_minimal_plan_renders():
    page = _render({"version": 1})
    assert "<!DOCTYPE html>" in page
    assert _embedded(page)["summary"]["total_s"]["value"] is None


def test_over_budget_flagged():
    page = _render(_plan(memory_budget_bytes=4_500_000))
    data = _embedded(page)
    assert data["summary"]["over_budget"] is True
    assert data["summary"]["memory_bar_pct"] == 100.0
    assert "over budget" in page


def test_write_report(tmp_path):
    path = write_report(PLAN, tmp_path / "out" / "report.html")
    assert path.exists()
    assert path.read_text(encoding="utf-8") == _render(PLAN)


@pytest.mark.parametrize("value, text", [
    (None, "—"), (512, "512 B"), (32768, "32.0 KiB"), (16777216, "16.0 MiB"),
    (3 * 1024 ** 3, "3.00 GiB"),
])
def test_format_bytes(value, text):
    assert format_bytes(value) == text


@pytest.mark.parametrize("value, text", [
    (None, "—"), (0, "0 s"), (8.5e-7, "850 ns"), (1.23e-5, "12.3 us"),
    (4.56e-3, "4.56 ms"), (1.234, "1.23 s"), (float("nan"), "—"),
])
def test_format_seconds(value, text):
    assert format_seconds(value) == text


def _with_comparison():
    """PLAN beside two classic plans, one pinned differently, one the same."""
    theirs = dict(PLAN["parameters"], **{"fc1.weight": ["S(1)", "S(0)"]})
    return _plan(comparison=[
        {"name": "FSDP + TP", "parameters": theirs, "fits": True,
         "cost": {"total_s": 2e-3, "compute_s": 1e-3, "comm_s": 1e-3, "overlapped_s": 1.5e-3, "exposed_comm_s": 5e-4}},
        {"name": "data parallel", "parameters": dict(PLAN["parameters"]), "fits": False,
         "cost": {"total_s": 3e-3, "compute_s": 1e-3, "comm_s": 2e-3}},
    ])


def test_placement_differences_listed():
    plan = _with_comparison()
    diffs = build_report_data(plan)["placement_diffs"]
    assert [d["name"] for d in diffs] == ["FSDP + TP", "data parallel"]
    assert [(r["pattern"], r["axis"], r["ours"], r["theirs"]) for r in diffs[0]["rows"]] == [
        ("fc1.weight", "d0", "S(0)", "S(1)"), ("fc1.weight", "d1", "R", "S(0)")]
    assert diffs[0]["num_parameters"] == 1 and diffs[0]["num_compared"] == 3
    assert diffs[1]["rows"] == []
    page = _render(plan)
    checker = _parse(page)
    assert len(checker.ids) == len(set(checker.ids)), "duplicate element ids"
    section = page.split('<details class="diff" id="diff-FSDP-TP"', 1)[1].split("</details>", 1)[0]
    assert '<td class="code">fc1.weight</td>' in section and '<span class="placement">S(1)</span>' in section
    assert "fc1.weight: axis d0: S(0) here vs S(1) in FSDP + TP" in section
    assert "same parameter placements" in page.split('id="diff-data-parallel"', 1)[1].split("</details>", 1)[0]
    rows = {r["name"]: r for r in build_report_data(plan)["comparison"]}
    assert rows["FSDP + TP"]["overlapped_s"]["value"] == 1.5e-3 and rows["FSDP + TP"]["hidden_comm_s"]["value"] == pytest.approx(5e-4)
    assert rows["dtplan"]["exposed_comm_s"]["value"] == 5e-5 and rows["data parallel"]["overlapped_s"]["value"] is None


def test_placement_differences_escaped():
    plan = _plan(parameters={XSS_NAME: ["R", "S(0)"]}, parameter_info={},
                 comparison=[{"name": XSS_NAME, "parameters": {XSS_NAME: ["S(0)", "S(0)"]}, "fits": True, "cost": {}},
                             {"name": "broken", "parameters": None, "fits": False, "cost": {}}])
    page = _render(plan)
    assert XSS_NAME not in page
    assert _embedded(page)["placement_diffs"][0]["rows"][0]["parameters"] == [XSS_NAME]
