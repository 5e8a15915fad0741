"""benchmarks/report.py: its table names real scripts, and it writes RESULTS.md whole with the analysis on top."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402


@pytest.mark.parametrize("tier", ["standard", "full", "quick"])
def test_every_benchmark_in_the_table_exists(tier):
    for name, command in report.commands(list(report.BENCHMARKS), tier=tier):
        assert (ROOT / command[1]).is_file(), name


OLD = f"""# Benchmarks

{report.STAMP_START}
an old stamp
{report.STAMP_END}

## {report.ANALYSIS_TITLE}

{report.ANALYSIS_START}
Written 2026-11-30 for the figures of commit abc1234.
The priority beats cleanlab.
{report.ANALYSIS_END}

## B

<!-- benchmark: detection -->

old b

## Written by hand, or by a benchmark that is gone

old stale

## A

<!-- benchmark: vog_cost -->

old a
"""


def test_the_file_is_title_stamp_analysis_then_each_benchmarks_sections_in_table_order():
    text = report.assemble(old_text=OLD, new={"vog_cost": {"A": "new a", "C": "new c"}, "detection": {"B": "new b"}},
                           stamp_text="STAMP")
    assert text.startswith("# Benchmarks\n\nSTAMP\n\n## Analysis (hand-written)\n")
    assert "The priority beats cleanlab." in text and "an old stamp" not in text
    assert "stale" not in text and "old " not in text
    order = [text.index(marker) for marker in ("## A\n\n<!-- benchmark: vog_cost -->\n\nnew a", "## C\n",
                                               "## B\n\n<!-- benchmark: detection -->\n\nnew b")]
    assert order == sorted(order)      # vog_cost comes before detection in BENCHMARKS


def test_a_benchmark_that_did_not_run_keeps_its_sections_and_the_unowned_ones_go():
    text = report.assemble(old_text=OLD, new={"vog_cost": {"A": "new a"}}, stamp_text="S")
    assert "## B\n\n<!-- benchmark: detection -->\n\nold b" in text and "new a" in text
    assert "stale" not in text
    again = report.assemble(old_text=text, new={}, stamp_text="S2")      # idempotent: tags survive a round trip
    assert again.replace("S2", "S") == text


def test_the_stamp_says_when_the_analysis_was_written_for_other_figures():
    analysis = report.analysis_of(OLD)
    same = report.stamp(version="commit abc1234", tier="standard", ran=["vog_cost"], failed=[], skipped=[],
                        analysis=analysis)
    assert "not written for these figures" not in same and "`python -m benchmarks.report`" in same
    other = report.stamp(version="commit def5678", tier="quick", ran=[], failed=["detection"], skipped=["scale"],
                         analysis=analysis)
    assert "not written for these figures" in other and "detection" in other and "scale" in other
    assert "not written for these figures" in report.stamp(
        version="commit abc1234", tier="standard", ran=[], failed=[], skipped=[],
        analysis=report.analysis_of("# Benchmarks\n"))


def test_a_run_writes_the_file_from_the_benchmarks_own_sections(tmp_path, monkeypatch):
    """The real main() over two stand-in scripts that write through benchmarks/_results like the real ones."""
    script = ("import sys; sys.path.insert(0, 'benchmarks'); from _results import replace_section, read_section; "
              "replace_section('{title}', 'made by {name}; saw VoG: ' + str(read_section('V') is not None)); "
              "sys.exit({code})")
    table = {}
    for name, title, code in [("first", "V", 0), ("second", "W", 0), ("broken", "X", 3)]:
        path = tmp_path / f"{name}.py"
        path.write_text(script.format(title=title, name=name, code=code))
        table[name] = report.Benchmark(str(path))
    monkeypatch.setattr(report, "BENCHMARKS", table)
    out = tmp_path / "RESULTS.md"
    out.write_text(OLD)
    assert report.main(["--out", str(out), "--only", "first", "second"]) == 0
    text = out.read_text()
    assert "made by first" in text and "made by second; saw VoG: True" in text
    assert "Not rerun, sections kept from an earlier run: broken." in text
    assert report.main(["--out", str(out)]) == 1      # the broken one fails, the others' sections are rewritten
    text = out.read_text()
    assert "**Failed" in text and "## V\n\n<!-- benchmark: first -->" in text and "## X" not in text


def test_a_report_killed_mid_run_leaves_the_previous_file(tmp_path):
    """SIGKILL to the report (and its benchmark) while a benchmark has written its section: the file is
    the previous one, byte for byte, and the next run writes it whole."""
    started = tmp_path / "started"
    script = tmp_path / "slow.py"
    script.write_text("import os, sys, time; sys.path.insert(0, 'benchmarks'); from _results import replace_section; "
                      "replace_section('V', 'half a run'); open(os.environ['STARTED'], 'w').close(); "
                      "time.sleep(float(os.environ['SLEEP']))")
    out = tmp_path / "RESULTS.md"
    out.write_text(OLD)
    driver = ("import sys; from benchmarks import report; "
              f"report.BENCHMARKS = {{'slow': report.Benchmark({str(script)!r})}}; "
              f"sys.exit(report.main(['--out', {str(out)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "STARTED": str(started), "SLEEP": "600"})
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the stand-in benchmark never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert out.read_text() == OLD
    subprocess.run([sys.executable, "-c", driver], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "STARTED": str(started), "SLEEP": "0"})
    assert "half a run" in out.read_text() and "Run at this commit: slow." in out.read_text()


def test_dry_run_prints_one_command_per_benchmark():
    out = subprocess.run([sys.executable, "-m", "benchmarks.report", "--quick", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={**os.environ}).stdout
    assert out.count("[report] ") == len(report.BENCHMARKS)
