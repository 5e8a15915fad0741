"""One real Label Studio 1.23.2 server for the whole e2e session.

Starting Label Studio costs about a minute on 2 cores (migrations the first time), so every
e2e module shares one server (``label_studio``) and brings its own redis-server, backend and rq
worker with :func:`backend_stack` (a :class:`ml_backend.demo.Stack` that talks to the shared
server), each in its own project.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from ml_backend.demo import LS, REPO, Stack

#: Label Studio's task lock for the session: minutes, as the README recommends for review
TASK_LOCK_TTL_SECONDS = 120


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """The shared Label Studio server: a Stack with only Label Studio started."""
    if not (REPO / ".ls-venv" / "bin" / "label-studio").exists():
        pytest.skip("Label Studio is not installed: bash scripts/setup_label_studio.sh")
    stack = Stack(tmp_path_factory.mktemp("label-studio"), task_lock_ttl=TASK_LOCK_TTL_SECONDS)
    t0 = time.monotonic()
    try:
        stack.start_label_studio()
        print(f"Label Studio started in {time.monotonic() - t0:.0f}s at {stack.ls_url}")
        yield stack
    finally:
        stack.stop()
        log = Path(stack.workdir) / "label-studio.log"
        if log.exists():
            print("--- label-studio.log (tail) ---\n" + log.read_text()[-3000:])


@pytest.fixture(scope="session")
def admin_pat(label_studio) -> str:
    """The admin's personal access token (Label Studio allows one per user: made once)."""
    return ls_api(label_studio).create_pat()


def backend_stack(label_studio: Stack, workdir: Path) -> Stack:
    """A Stack for one test module: its own redis, backend and worker (started by the caller
    with ``start_redis()`` / ``start_backend(...)``), the shared Label Studio."""
    return Stack(workdir, ls_port=label_studio.ls_port, token=label_studio.token,
                 username=label_studio.username, password=label_studio.password)


def ls_api(label_studio: Stack) -> LS:
    """The Label Studio API as the admin user (legacy token)."""
    return LS(label_studio.ls_url, label_studio.token)


def print_logs(stack: Stack, names=("backend", "worker")) -> None:
    for name in names:
        log = Path(stack.workdir) / f"{name}.log"
        if log.exists():
            print(f"--- {name}.log (tail) ---\n" + log.read_text()[-4000:])


def wait_idle(stack: Stack, project_id: int, timeout: float = 400) -> None:
    """Until the backend has no running and no pending training job for the project."""
    deadline = time.monotonic() + timeout
    idle_since = None
    while time.monotonic() < deadline:
        st = requests.get(f"{stack.backend_url}/is_training", params={"project": project_id},
                          auth=stack.backend_auth, timeout=10).json()
        if not st["is_training"] and not st["pending_job"]:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.0:
                return
        else:
            idle_since = None
        time.sleep(0.5)
    raise TimeoutError("training did not finish")


def current_predictions(ls: LS, project_id: int, version: str) -> dict[int, dict]:
    return {p["task"]: p for p in ls.predictions(project_id) if p["model_version"] == version}
