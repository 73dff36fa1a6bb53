"""The benchmarks still run: each family's script in --quick mode (numbers not checked)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("family", ["sparse", "merge", "quant"])
def test_bench_quick_runs_and_writes_its_table(family, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", f"{family}.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / f"{family}.csv").exists() and (tmp_path / f"{family}.png").exists()
    assert "| op |" in result.stdout
    assert "n/a" not in result.stdout.split("| op |", 1)[1], result.stdout
