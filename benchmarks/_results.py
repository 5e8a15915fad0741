"""Write one named section of benchmarks/RESULTS.md, leaving every other section alone.

A section starts at a line ``## <title>`` and runs up to the next ``## `` heading
(or the end of the file).  Each benchmark owns the sections it names; another
engineer's sections are never touched.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEvery section names the exact command that produced it; rerun it to regenerate.\n"


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
    import os
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


def replace_section(title: str, body: str, *, path: Path = RESULTS) -> None:
    """Replace (or append) the section headed ``## {title}`` with ``body``."""
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
