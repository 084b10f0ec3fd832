"""Smoke test of `bench/instructions.py`: its in-process drivers run the floor and edge.

Counted by valgrind when it is installed (a positive instruction count per request), by CPU
time otherwise. No figure is checked: a few dozen requests say nothing about the request path.
The valgrind run takes minutes, so it is marked `instructions`: plain `pytest` deselects it
(pyproject addopts) and `.ci/run` runs it in a step of its own (`pytest -m instructions`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
@pytest.mark.parametrize(
    "valgrind",
    [
        pytest.param(False, id="cpu-time"),
        pytest.param(True, id="instructions", marks=[pytest.mark.instructions, pytest.mark.slow]),
    ],
)
def test_instruction_count_drivers_run_each_configuration(valgrind: bool) -> None:
    """`bench/instructions.py` drives the floor and edge in-process; counted by valgrind when
    it is installed (a positive count per request), by CPU time otherwise."""
    if valgrind and shutil.which("valgrind") is None:
        pytest.skip("valgrind not installed (apt-get install valgrind)")
    argv = [sys.executable, str(ROOT / "bench" / "instructions.py"), "--requests", "20",
            "--warmup", "5", "--only", "floor,on"]  # fmt: skip
    if not valgrind:
        argv.append("--no-valgrind")
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| Configuration")
    }
    assert list(rows) == ["floor (no features)", "edge, all features on"], done.stdout
    for value in rows.values():
        assert float(value.replace(",", "")) > 0, done.stdout
