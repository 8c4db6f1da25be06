"""Benchmark: plan the Llama-style example, render its report and open it in
headless Chromium; print the report's size, the page's load time and any
console errors.

    .venv/bin/python bench/report_llama.py [--preset 8b] [--layers 32] [--mesh 8x8] [--profile h100]

Needs Debian's chromium (.ci/run installs it) and Playwright (test extra).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtplan import load_model_file, plan_program  # noqa: E402
from dtplan.ir.capture import capture  # noqa: E402
from dtplan.planner.output.report import write_report  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="8b")
    p.add_argument("--layers", default="32")
    p.add_argument("--mesh", default="8x8")
    p.add_argument("--profile", default="h100")
    p.add_argument("--memory", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    mf = load_model_file(ROOT / "examples" / "llama.py", {"preset": args.preset, "layers": args.layers})
    plan = plan_program(capture(*mf.build(meta=True)), mesh=args.mesh, profile=args.profile, memory=args.memory, compare=True)
    plan_s = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp(prefix="dtplan-report-"))
    t1 = time.perf_counter()
    path = write_report(plan.to_json(), out / "report.html")
    render_s = time.perf_counter() - t1
    size = path.stat().st_size

    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        t2 = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        load_s = time.perf_counter() - t2
        shown = page.get_attribute("#total-s", "data-value")
        browser.close()
    print(f"model         llama {args.preset}, {args.layers} layers, mesh {args.mesh}, profile {args.profile}")
    print(f"planning      {plan_s:.1f} s (classic plans included)")
    print(f"report        {size / 1e6:.2f} MB, rendered in {render_s:.2f} s")
    print(f"browser load  {load_s:.2f} s, console errors: {len(errors)} {errors[:3]}")
    print(f"step time     plan.json {plan.cost.total_s!r}, page {shown}")


if __name__ == "__main__":
    main()
