"""Every README table that a bench/ script prints has the header that script
prints, for the arguments of the command named right above it.

A table is tied to a script in one of two ways (README.md, Benchmarks):

- a code block holding a command line (`.venv/bin/python bench/NAME.py ARGS`,
  continued with `\\`) and, on the next line, that command's output: its
  first line is the header;
- a Markdown table right under a code block whose last line is such a
  command (only blank lines between).

The script's header comes from its own `header(argv)` (which `main` prints
from), for the command's arguments, without running the benchmark: a table
measured by older code, whose columns the script no longer prints, fails.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: a command line: optional prompt and environment, the venv's python, a bench script
COMMAND = re.compile(r"^(?:\$ )?(?:[A-Z_]+=\S* )*\.venv/bin/python bench/(?P<script>\w+)\.py\b")
#: the scripts whose tables the README shows (a table lost or untied from its command fails)
EXPECTED = {"budgets", "compile_llama", "fidelity", "llama_families", "real_models", "startup"}


@dataclass(frozen=True)
class Table:
    line: int  # 1-based line of the header in README.md
    script: str
    argv: tuple[str, ...]
    lines: tuple[str, ...]  # README's lines from the header on

    def __str__(self) -> str:
        return f"README.md:{self.line} bench/{self.script}.py {shlex.join(self.argv)}"


def _command(lines: list[str], i: int) -> tuple[str, tuple[str, ...], int]:
    """The script and arguments of the command at line i, and its last line
    (continuation lines end with a backslash)."""
    j, text = i, lines[i]
    while text.rstrip().endswith("\\") and j + 1 < len(lines):
        j += 1
        text = text.rstrip()[:-1] + " " + lines[j].strip()
    tokens = shlex.split(text, comments=True)
    at = next(k for k, t in enumerate(tokens) if t.startswith("bench/") and t.endswith(".py"))
    return Path(tokens[at]).stem, tuple(tokens[at + 1:]), j


def readme_tables(text: str) -> list[Table]:
    lines = text.splitlines()
    tables: list[Table] = []
    in_block = False
    block_last: tuple[str, tuple[str, ...]] | None = None  # the last command of the open block, if it ended it
    closed_at, closed_command = -1, None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            if in_block:
                closed_at, closed_command = i, block_last
            in_block, block_last = not in_block, None
            i += 1
            continue
        if in_block:
            block_last = None
            if COMMAND.match(line):
                script, argv, j = _command(lines, i)
                block_last = (script, argv)
                following = lines[j + 1] if j + 1 < len(lines) else "```"
                if following.strip() and not following.startswith("```") and not COMMAND.match(following):
                    tables.append(Table(j + 2, script, argv, tuple(lines[j + 1:])))
                    block_last = None
                i = j + 1
                continue
        elif line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            if k == closed_at and closed_command is not None:
                tables.append(Table(i + 1, *closed_command, tuple(lines[i:])))
        i += 1
    return tables


@cache
def _script(name: str):
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLES = readme_tables(README.read_text())


def test_the_readme_ties_a_table_to_every_benchmark_it_shows():
    assert {t.script for t in TABLES} >= EXPECTED, sorted({t.script for t in TABLES})
    assert len(TABLES) >= 15, [str(t) for t in TABLES]


@pytest.mark.parametrize("table", TABLES, ids=str)
def test_a_readme_table_has_the_header_its_command_prints(table):
    module = _script(table.script)
    assert hasattr(module, "header"), f"bench/{table.script}.py has no header(argv) to compare README.md:{table.line} with"
    try:
        expected = module.header(list(table.argv)).splitlines()
    except SystemExit:
        pytest.fail(f"{table}: the command's arguments do not parse")
    assert list(table.lines[: len(expected)]) == expected, f"{table}: README's header is not what the command prints"


def test_the_parser_finds_both_kinds_of_table_and_a_wrong_header_fails():
    text = "\n".join([
        "```bash",
        ".venv/bin/python bench/real_models.py --mesh 4",
        "```",
        "",
        "| model (mesh 2x2) | plans | runs exactly | trains exactly (3 AdamW steps) | fallbacks (infer/train) | seconds | problem |",
        "|---|---|---|---|---|---|---|",
        "",
        "```",
        ".venv/bin/python bench/budgets.py --runs gpt:2x2:400KB \\",
        "    --time-limit 30",
        " example  mesh   budget",
        "```",
        "```",
        ".venv/bin/python bench/overlap.py            # a comment, no output",
        "DTPLAN_REALTIME_COMM=1 .venv/bin/python bench/overlap.py --mesh 4",
        "```",
    ])
    found = readme_tables(text)
    assert [(t.line, t.script, t.argv) for t in found] == [
        (5, "real_models", ("--mesh", "4")),
        (11, "budgets", ("--runs", "gpt:2x2:400KB", "--time-limit", "30")),
    ]
    real_models, budgets = found
    assert _script("real_models").header(list(real_models.argv)).splitlines() != list(real_models.lines[:2])  # mesh 4 is not 2x2
    assert _script("budgets").header(list(budgets.argv)) != budgets.lines[0]
