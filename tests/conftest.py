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


#: files that run for a minute or more, longest first: collected first, so
#: that the two workers start on them at once and the short files fill in at
#: the end (`--dist loadfile` hands out files in collection order; the longest
#: started late kept one worker busy for minutes after the other finished)
LONGEST_FIRST = (
    "test_real_models.py", "test_training.py", "test_precision.py", "test_faults.py", "test_sequence.py", "test_runtime.py",
    "test_coarsen.py", "test_fold.py", "test_remat.py", "test_scale.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: the rest keep their order
