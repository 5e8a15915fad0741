"""Write one named section of benchmarks/RESULTS.md, leaving every other section alone.

A section starts at a line ``## <title>`` and runs up to the next ``## `` heading
(or the end of the file).  Each benchmark owns the sections it names; another
engineer's sections are never touched.  ``$BENCH_RESULTS`` points every benchmark
at another file: benchmarks/report.py collects one run's sections there and then
writes the whole of RESULTS.md from them.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
WRITTEN_LOG_ENV = "BENCH_RESULTS_WRITTEN"  # a file that gets the title of every section written (benchmarks/report.py)
TITLE = "# Benchmarks"
HEADER = f"{TITLE}\n\nEvery section names the exact command that produced it; rerun it to regenerate.\n"


def command_line() -> str:
    """The command that is running, as it would be typed from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parent.parent)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def provenance() -> str:
    """'Command: `...` (engine code: ...)', the first line of every section."""
    return f"Command: `{command_line()}` (engine code: {code_version()})"


def code_version() -> str:
    """The engine code measured: $BENCH_CODE_VERSION if set (a run from an exported snapshot), else git HEAD."""
    import subprocess

    if os.environ.get("BENCH_CODE_VERSION"):
        return os.environ["BENCH_CODE_VERSION"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "model", "selection"], cwd=Path(__file__).parent.parent,
                               text=True, capture_output=True, check=True).stdout.strip()
        return f"commit {head}" + (" with uncommitted changes in model/ or selection/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_path() -> Path:
    """Where the benchmarks write: ``$BENCH_RESULTS`` if set (benchmarks/report.py's scratch file), else RESULTS."""
    return Path(os.environ["BENCH_RESULTS"]) if os.environ.get("BENCH_RESULTS") else RESULTS


def split_sections(text: str) -> dict[str, str]:
    """{title: body} of every ``## title`` section, in file order (the text before the first is dropped)."""
    sections = {}
    for chunk in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title, _, body = chunk.partition("\n")
        sections[title.strip()] = body.strip("\n")
    return sections


def read_section(title: str, *, path: Path | None = None) -> str | None:
    """The body of the section headed ``## {title}`` (None when the file has none)."""
    path = path or results_path()
    return split_sections(path.read_text() if path.exists() else "").get(title)


def replace_section(title: str, body: str, *, path: Path | None = None) -> None:
    """Replace (or append) the section headed ``## {title}`` with ``body``."""
    path = path or results_path()
    heading = f"## {title}"
    text = path.read_text() if path.exists() else HEADER
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    new = [heading, "", *body.strip("\n").splitlines(), ""]
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    if os.environ.get(WRITTEN_LOG_ENV):
        with open(os.environ[WRITTEN_LOG_ENV], "a") as log:
            log.write(title + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def mean_std(values, fmt: str = "{:.3f}") -> str:
    import numpy as np

    values = np.asarray([v for v in values if v is not None], dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1))}"
