"""The benchmarks still run: each family's script in --quick mode (numbers not checked)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Every family's script in bench/ (the harness and the package marker are not benchmarks).
FAMILIES = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "bench"))
                  if name.endswith(".py") and name not in ("harness.py", "__init__.py"))


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_quick_runs_and_writes_its_table(family, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", f"{family}.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / f"{family}.csv").exists() and (tmp_path / f"{family}.png").exists()
    assert "| op |" in result.stdout
    header, table = result.stdout.split("| op |", 1)
    assert "n/a" not in table, result.stdout
    # the quant family keeps freed memory by default and says so
    assert ("freed memory kept (mallopt)" in header) == (family == "quant"), header


def test_allocator_mode_flags(monkeypatch):
    """A family may keep freed memory by default (bench/quant.py does); --default-allocator
    leaves glibc as it is, and the other families keep glibc's defaults unless asked."""
    monkeypatch.syspath_prepend(ROOT)
    from bench.harness import arg_parser

    keeping = arg_parser("quant", keep_freed_memory=True)
    assert keeping.parse_args([]).keep_freed_memory is True
    assert keeping.parse_args(["--default-allocator"]).keep_freed_memory is False
    plain = arg_parser("sparse")
    assert plain.parse_args([]).keep_freed_memory is False
    assert plain.parse_args(["--keep-freed-memory"]).keep_freed_memory is True
    with pytest.raises(SystemExit):
        plain.parse_args(["--default-allocator"])

