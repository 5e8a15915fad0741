"""Run every benchmark at the current commit; each writes its own sections of benchmarks/RESULTS.md.

    python -m benchmarks.report              # the full set (hours on a 2-core machine)
    python -m benchmarks.report --quick      # small variants, a few minutes; figures marked by their own commands
    python -m benchmarks.report --dry-run    # print the commands only
    python -m benchmarks.report --only vog_cost detection

Each benchmark still writes its sections through benchmarks/_results.replace_section,
naming the command and commit that produced them.  This script then stamps the top
of RESULTS.md with the date and commit of the run and the benchmarks that failed or
were skipped (their sections keep the commit they were last produced at).

A new benchmark joins the report with one row in BENCHMARKS.
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, code_version  # noqa: E402

# name: (script, arguments of the full run, arguments of the --quick run)
BENCHMARKS = {
    "vog_cost": ("bench_vog_cost.py", [], ["--8px-only", "--epochs", "4"]),
    "detection": ("bench_detection.py", ["--full", "--hard"], ["--seeds", "0", "--epochs", "10"]),
    "budget": ("bench_budget.py", ["--full"], ["--seeds", "0", "--rounds", "2", "--epochs", "10"]),
    "scale": ("bench_scale.py", [], ["--sizes", "1000"]),
    "backend": ("bench_backend.py", ["--no-label-studio"], ["--no-label-studio", "--repeats", "20"]),
    "webhook": ("bench_webhook.py", [], ["--rounds", "2"]),
    "gpu": ("bench_gpu.py", [], ["--quick"]),
    "fast_mode": ("bench_fast_mode.py", [], ["--sizes", "1000", "--seeds", "0"]),
}

STAMP_START = "<!-- report: start -->"
STAMP_END = "<!-- report: end -->"


def commands(names: list[str], *, quick: bool) -> list[tuple[str, list[str]]]:
    """The command line of each named benchmark, in table order."""
    return [(name, [sys.executable, str(Path("benchmarks") / script), *(quick_args if quick else full_args)])
            for name, (script, full_args, quick_args) in BENCHMARKS.items() if name in names]


def stamp(text: str, *, version: str, ran: list[str], failed: list[str], skipped: list[str], quick: bool) -> str:
    """Put (or replace) the run's date, commit and outcome just under the file's title."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [STAMP_START,
             f"Report run `python -m benchmarks.report{' --quick' if quick else ''}` on {today} at {version}.",
             f"Rerun here: {', '.join(ran) or 'none'}."]
    if failed:
        lines.append(f"Failed (their sections are from an earlier commit, see each section's command line): "
                     f"{', '.join(failed)}.")
    if skipped:
        lines.append(f"Not rerun (sections from an earlier commit): {', '.join(skipped)}.")
    block = "\n".join([*lines, STAMP_END])
    if STAMP_START in text and STAMP_END in text:
        head, rest = text.split(STAMP_START, 1)
        return head + block + rest.split(STAMP_END, 1)[1]
    title, _, body = text.partition("\n")
    return f"{title}\n\n{block}\n{body}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small variant of every benchmark")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    version = code_version()
    ran, failed = [], []
    for name, command in commands(args.only, quick=args.quick):
        print(f"[report] {name}: {' '.join(command[1:])}", flush=True)
        if args.dry_run:
            continue
        result = subprocess.run(command, cwd=ROOT)
        (ran if result.returncode == 0 else failed).append(name)
        if result.returncode:
            print(f"[report] {name} failed with exit status {result.returncode}; its sections were left as they were",
                  flush=True)
    if args.dry_run:
        return 0
    skipped = [name for name in BENCHMARKS if name not in args.only]
    text = args.results.read_text() if args.results.exists() else "# Benchmarks\n"
    args.results.write_text(stamp(text, version=version, ran=ran, failed=failed, skipped=skipped, quick=args.quick))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
