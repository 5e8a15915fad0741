"""benchmarks/report.py: its table names real scripts whose options parse, and the stamp sits under the title."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402


@pytest.mark.parametrize("quick", [False, True])
def test_every_benchmark_in_the_table_exists(quick):
    for name, command in report.commands(list(report.BENCHMARKS), quick=quick):
        assert (ROOT / command[1]).is_file(), name


def test_stamp_goes_under_the_title_and_is_replaced_not_repeated():
    text = "# Benchmarks\n\n## A\n\nfigures\n"
    once = report.stamp(text, version="commit abc", ran=["vog_cost"], failed=[], skipped=["scale"], quick=True)
    assert once.startswith("# Benchmarks\n\n" + report.STAMP_START)
    assert "at commit abc" in once and "Not rerun (sections from an earlier commit): scale." in once
    assert once.endswith("## A\n\nfigures\n")
    twice = report.stamp(once, version="commit def", ran=[], failed=["detection"], skipped=[], quick=False)
    assert twice.count(report.STAMP_START) == 1 and "commit abc" not in twice and "Failed" in twice
    assert twice.endswith("## A\n\nfigures\n")


def test_dry_run_prints_one_command_per_benchmark():
    out = subprocess.run([sys.executable, "-m", "benchmarks.report", "--quick", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.count("[report] ") == len(report.BENCHMARKS)
