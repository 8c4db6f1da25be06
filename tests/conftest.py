"""Shared helpers: load bundled examples and plan them on the meta device."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from dtplan import load_model_file, plan_program
from dtplan.ir.capture import capture

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

warnings.filterwarnings("ignore", category=FutureWarning)


def example_path(name: str) -> Path:
    return EXAMPLES / f"{name}.py"


def captured_example(name: str, **options):
    mf = load_model_file(example_path(name), {k: str(v) for k, v in options.items()})
    return capture(*mf.build(meta=True))


def plan_example(name: str, mesh: str, options: dict | None = None, **plan_kwargs):
    """Plan a bundled example on the meta device."""
    options = {k: str(v) for k, v in (options or {}).items()}
    return plan_program(captured_example(name, **options), mesh=mesh, model_info={"name": name}, **plan_kwargs)


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


#: files that run for minutes: collected first, so that one worker starts on
#: them at once while the other takes the rest (`--dist loadfile` hands out
#: files in collection order; last, the longest started minutes late)
LONGEST_FIRST = ("test_real_models.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: Path(str(item.fspath)).name not in LONGEST_FIRST)  # stable: the rest keep their order
