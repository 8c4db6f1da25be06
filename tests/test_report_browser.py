"""The report in headless Chromium (Debian's package, driven by Playwright):
no console errors, the numbers on the page are plan.json's, a screenshot
that is not blank, and model names rendered as text."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import example_path

from dtplan import cli
from dtplan.planner.output.report import write_report

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed (.ci/run installs it)"
)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is required in CI"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: problems.append(f"network: {r.url}") if not r.url.startswith(("file:", "data:", "about:")) else None)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, problems


def test_report_numbers_match_the_plan(browser, tmp_path, capsys):
    assert cli.main(["compile", str(example_path("gpt")), "--mesh", "2x2", "--memory", "400KB", "--out", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()
    plan = json.loads((tmp_path / "plan.json").read_text())
    page, problems = open_page(browser, tmp_path / "report.html")
    assert problems == []
    cost = plan["cost"]
    assert float(page.get_attribute("#total-s", "data-value")) == cost["total_s"]
    assert float(page.get_attribute("#comm-bytes", "data-value")) == cost["comm_bytes"]
    assert float(page.get_attribute("#peak-memory-bytes", "data-value")) == cost["peak_memory_bytes"]
    rows = page.eval_on_selector_all(
        "#parameters-table tbody tr",
        "rows => rows.map(r => [r.dataset.name, [...r.querySelectorAll('.placement')].map(e => e.textContent.trim())])",
    )
    assert dict(rows) == plan["parameters"]
    ours = page.get_attribute("#comparison tr.ours td[data-value]", "data-value")
    assert float(ours) == cost["total_s"]
    shot = page.screenshot(full_page=True)
    assert len(shot) > 50_000  # a blank page compresses to a few KB
    assert len(page.inner_text("body")) > 1000


def test_model_names_render_as_text(browser, tmp_path):
    evil = "<script>alert(1)</script>"
    plan = {
        "version": 1,
        "mesh": {"shape": [2], "axis_names": ["d0"]},
        "model": {"name": evil},
        "parameters": {f"{evil}.weight": ["S(0)"]},
        "cost": {"total_s": 1e-3, "compute_s": 5e-4, "comm_s": 5e-4, "comm_bytes": 10, "peak_memory_bytes": 10},
        "collectives": [{"kind": "all_reduce", "axis": "d0", "bytes": 8, "time_s": 1e-6, "node": "n", "module": evil}],
    }
    path = write_report(plan, tmp_path / "evil.html")
    page, problems = open_page(browser, path)
    assert problems == []
    assert evil in page.inner_text("body")


def test_training_report_shows_memory_parts_and_module_tree(browser, tmp_path, capsys):
    args = ["compile", str(example_path("gpt")), "--mesh", "4", "--train", "--memory", "1200KB", "--out", str(tmp_path), "--quiet"]
    assert cli.main(args) == 0
    capsys.readouterr()
    plan = json.loads((tmp_path / "plan.json").read_text())
    page, problems = open_page(browser, tmp_path / "report.html")
    assert problems == []
    for key in ("parameter_bytes", "optimizer_bytes", "activation_bytes", "gradient_bytes"):
        assert float(page.get_attribute(f"#mem-{key}", "data-value")) == plan["cost"][key]
    tree = page.text_content("#modules")  # closed <details> included
    assert "blocks" in tree and "attn" in tree
    page.fill("#parameter-filter", "attn.q")
    visible = page.eval_on_selector_all("#parameters-table tbody tr", "rows => rows.filter(r => r.style.display !== 'none').map(r => r.dataset.name)")
    assert visible and all("attn.q" in name for name in visible)
