"""The README's API snippet runs as written under torchrun (2 gloo ranks)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_setup_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert "dtplan run" in blocks[0] and ".venv" in blocks[0]
    assert "pytest" in blocks[1] and ".venv" in blocks[1]
    assert blocks[1].strip() in (ROOT / ".ci" / "run").read_text()


def test_api_snippet_runs_under_torchrun(tmp_path):
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "snippet.py"
    path.write_text(snippet)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0.weight" in done.stdout
