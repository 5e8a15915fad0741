"""The demo stops everything it started on SIGTERM and SIGHUP, as on Ctrl-C (a real subprocess)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:     # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
    """One work directory for both signals, as a user's runs/demo: the first run initialises Label
    Studio's database (a minute of migrations), the second starts on it."""
    return tmp_path_factory.mktemp("demo")


@pytest.mark.redis
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_demo_stops_what_it_started_on(sig, demo_workdir):
    if not (REPO / ".ls-venv" / "bin" / "label-studio").exists():
        pytest.skip("Label Studio is not installed: bash scripts/setup_label_studio.sh")
    demo = subprocess.Popen([sys.executable, "-m", "ml_backend.demo", "--workdir", str(demo_workdir),
                             "--ls-port", str(free_port()), "--backend-port", str(free_port())],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: dict[str, int] = {}
    deadline = time.monotonic() + 120
    try:
        for line in demo.stdout:       # Label Studio's start-up takes a while: stop it half-way
            m = re.search(r"started (\S+) \(pid (\d+)\)", line)
            if m:
                started[m.group(1)] = int(m.group(2))
            if "label-studio" in started or time.monotonic() > deadline:
                break
        assert {"redis", "label-studio"} <= set(started), started
        time.sleep(2)
        demo.send_signal(sig)
        demo.wait(60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0
    time.sleep(1)
    assert not [name for name, pid in started.items() if _alive(pid)], started
