"""Run every benchmark at the current commit and write the whole of benchmarks/RESULTS.md.

    python -m benchmarks.report              # every benchmark, about 2 h on a 2-core machine
    python -m benchmarks.report --full       # the larger grids and sizes (hours; for a bigger machine)
    python -m benchmarks.report --quick      # small variants in minutes -> benchmarks/RESULTS.quick.md
    python -m benchmarks.report --dry-run    # print the commands only
    python -m benchmarks.report --only vog_cost detection   # rerun some; the other sections stay as they were

Each benchmark writes its own sections (benchmarks/_results.replace_section) into a
scratch copy of the file; this script then writes RESULTS.md whole, in this order:
the title, the run's stamp (date, commit, machine, what failed), the hand-written
analysis, and every benchmark's sections in the order of BENCHMARKS, each tagged with
the benchmark that wrote it.  A benchmark that failed or was left out by --only keeps
its sections from the previous file; a section no benchmark owns is dropped.  The
analysis is the one part a person writes: it is kept between its markers, names the
commit it was written for, and the stamp says so when the figures come from another.

A new benchmark joins the report with one row in BENCHMARKS.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from _results import RESULTS, TITLE, WRITTEN_LOG_ENV, code_version, split_sections  # noqa: E402
from model.files import atomic_write  # noqa: E402

QUICK_RESULTS = RESULTS.with_name("RESULTS.quick.md")


@dataclass(frozen=True)
class Benchmark:
    script: str
    standard: tuple[str, ...] = ()   # the run that RESULTS.md holds
    full: tuple[str, ...] = ()       # --full: larger grids and sizes
    quick: tuple[str, ...] = ()      # --quick: a smoke run in minutes


BENCHMARKS = {
    "vog_cost": Benchmark("bench_vog_cost.py", (), ("--full",), ("--8px-only", "--epochs", "4")),
    "detection": Benchmark("bench_detection.py", ("--hard", "--held-out"), ("--full", "--hard", "--held-out"),
                           ("--seeds", "0", "--epochs", "10")),
    "detection_32px": Benchmark("bench_detection.py", ("--image-size", "32", "--hard"),
                                ("--image-size", "32", "--full", "--hard", "--held-out"),
                                ("--image-size", "32", "--seeds", "0", "--epochs", "4")),
    "budget": Benchmark("bench_budget.py", (), ("--full",), ("--seeds", "0", "--rounds", "2", "--epochs", "10")),
    "scale": Benchmark("bench_scale.py", (), (), ("--sizes", "1000")),
    "fast_mode": Benchmark("bench_fast_mode.py", ("--threads", "1"), ("--threads", "1"),
                           ("--sizes", "1000", "--seeds", "0")),
    "gpu": Benchmark("bench_gpu.py", (), (), ("--quick",)),
    "backend": Benchmark("bench_backend.py", (), (), ("--no-label-studio", "--repeats", "20")),
    "webhook": Benchmark("bench_webhook.py", (), (), ("--rounds", "2")),
}

STAMP_START, STAMP_END = "<!-- report: start -->", "<!-- report: end -->"
ANALYSIS_TITLE = "Analysis (hand-written)"
ANALYSIS_START, ANALYSIS_END = "<!-- analysis: start -->", "<!-- analysis: end -->"
ANALYSIS_PLACEHOLDER = ("Written for commit (none yet): read the figures below, then replace this paragraph with what "
                        "they show and name the commit they came from.")


def commands(names: list[str], *, tier: str) -> list[tuple[str, list[str]]]:
    """The command line of each named benchmark, in table order; ``tier`` is standard, full or quick."""
    return [(name, [sys.executable, str(Path("benchmarks") / bench.script), *getattr(bench, tier)])
            for name, bench in BENCHMARKS.items() if name in names]


def analysis_of(text: str) -> str:
    """The hand-written analysis between its markers, or the placeholder that asks for one."""
    if ANALYSIS_START in text and ANALYSIS_END in text:
        return text.split(ANALYSIS_START, 1)[1].split(ANALYSIS_END, 1)[0].strip("\n")
    return ANALYSIS_PLACEHOLDER


def stamp(*, version: str, tier: str, ran: list[str], failed: list[str], skipped: list[str],
          analysis: str) -> str:
    """The run's date, commit, machine and outcome, and whether the analysis was written for these figures."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m benchmarks.report" + ("" if tier == "standard" else f" --{tier}")
    lines = [STAMP_START,
             f"Written by `{command}` on {today}, code at {version}; {platform.machine()}, {os.cpu_count()} CPU "
             f"cores, Python {platform.python_version()}. Each section below names its own command.",
             f"Run at this commit: {', '.join(ran) or 'none'}."]
    if failed:
        lines.append(f"**Failed, sections kept from an earlier run (see each one's command line): "
                     f"{', '.join(failed)}.**")
    if skipped:
        lines.append(f"Not rerun, sections kept from an earlier run: {', '.join(skipped)}.")
    written_for = re.search(r"commit ([0-9a-f]{7,40})", analysis.split("\n", 1)[0])
    commit = re.search(r"commit ([0-9a-f]{7,40})", version)
    if not (written_for and commit and commit.group(1).startswith(written_for.group(1)[:7])):
        lines.append("**The hand-written analysis below was not written for these figures: reread it against them "
                     "and update its first line's commit.**")
    return "\n".join([*lines, STAMP_END])


OWNER_TAG = re.compile(r"^<!-- benchmark: (\w+) -->\n*")


def owned_sections(text: str) -> dict[str, dict[str, str]]:
    """{benchmark: {title: body}} of the sections a benchmark wrote (tagged by :func:`assemble`); others dropped."""
    owned: dict[str, dict[str, str]] = {}
    for title, body in split_sections(text).items():
        tag = OWNER_TAG.match(body)
        if tag:
            owned.setdefault(tag.group(1), {})[title] = body[tag.end():]
    return owned


def assemble(*, old_text: str, new: dict[str, dict[str, str]], stamp_text: str) -> str:
    """The whole file: title, stamp, the analysis kept from ``old_text``, then each benchmark's sections.

    ``new`` holds {benchmark: {title: body}} of the benchmarks that ran without
    failing; every other benchmark keeps its sections from ``old_text``.  Each
    section is tagged with the benchmark that wrote it, so that a section no
    benchmark writes any more (or one written by hand) does not outlive the run
    that follows.
    """
    old = owned_sections(old_text)
    parts = [TITLE, stamp_text, f"## {ANALYSIS_TITLE}\n\n{ANALYSIS_START}\n{analysis_of(old_text)}\n{ANALYSIS_END}"]
    for name in BENCHMARKS:
        for title, body in (new[name] if name in new else old.get(name, {})).items():
            parts.append(f"## {title}\n\n<!-- benchmark: {name} -->\n\n{body.strip()}")
    return "\n\n".join(parts).rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_true", help="the small variant of every benchmark")
    tier.add_argument("--full", action="store_true", help="the larger grids and sizes")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--out", type=Path, help=f"the file to write (default {RESULTS.relative_to(ROOT)}; "
                                                 f"with --quick {QUICK_RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    tier_name = "quick" if args.quick else "full" if args.full else "standard"
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    version = code_version()
    old_text = out.read_text() if out.exists() else ""

    ran, failed, new = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        scratch, written_log = Path(tmp) / "RESULTS.md", Path(tmp) / "written"
        # the old sections are there for the benchmarks that read another's (detection reads the VoG cost)
        scratch.write_text(old_text or TITLE + "\n")
        env = {**os.environ, "BENCH_RESULTS": str(scratch), WRITTEN_LOG_ENV: str(written_log)}
        for name, command in commands(args.only, tier=tier_name):
            print(f"[report] {name}: {' '.join(command[1:])}", flush=True)
            if args.dry_run:
                continue
            written_log.write_text("")
            result = subprocess.run(command, cwd=ROOT, env=env)
            if result.returncode:
                failed.append(name)
                print(f"[report] {name} failed with exit status {result.returncode}; its sections are kept from "
                      f"the previous file", flush=True)
                continue
            ran.append(name)
            sections = split_sections(scratch.read_text())
            new[name] = {title: sections[title] for title in dict.fromkeys(written_log.read_text().splitlines())}
        if args.dry_run:
            return 0
    skipped = [name for name in BENCHMARKS if name not in args.only]
    stamp_text = stamp(version=version, tier=tier_name, ran=ran, failed=failed, skipped=skipped,
                       analysis=analysis_of(old_text))
    text = assemble(old_text=old_text, new=new, stamp_text=stamp_text)
    # two hours of figures: a kill mid-write must leave the previous file, not half of this one
    atomic_write(out, lambda f: f.write(text.encode()))
    print(f"[report] wrote {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
