"""Shared fixtures: a real redis-server on a free loopback port, backend settings, markers.

redis-server comes from the Debian package (``apt-get install -y redis-server``); tests that
need it are skipped with a message when the binary is missing.  End-to-end tests (marker
``e2e``, tests/e2e/) run only when selected: ``pytest -m e2e``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end tests against a real Label Studio (pytest -m e2e)")
    config.addinivalue_line("markers", "redis: needs redis-server (apt-get install -y redis-server)")


def pytest_collection_modifyitems(config, items):
    if "e2e" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="end-to-end test: run with `pytest -m e2e`")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start_redis_server(port: int, workdir, *, appendonly: bool = False) -> subprocess.Popen:
    """A throw-away redis-server on 127.0.0.1:``port``, listening when this returns; skips the test
    when redis-server is not installed.  ``appendonly``: persisted in ``workdir`` as in production
    (docker/), so that one restarted on the same folder has its keys back."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes" if appendonly else "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return proc


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A throw-away redis-server on 127.0.0.1:<free port>; yields its URL."""
    port = free_port()
    proc = start_redis_server(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def redis_url(redis_server):
    import redis

    conn = redis.Redis.from_url(redis_server)
    conn.flushdb()
    yield redis_server
    conn.flushdb()


@pytest.fixture
def backend_env(tmp_path, monkeypatch):
    """Environment of a backend using the fake engine, a temp MODEL_DIR and no redis."""
    env = {
        "MODEL_DIR": str(tmp_path / "models"),
        "ALR_IMAGE_SIZE": "8",
        "ALR_EPOCHS": "10",
        "ALR_FINETUNE_EPOCHS": "2",
        "ALR_FORGET_RATE": "0.2",
        "ALR_CHANNELS": "1",
        "ALR_MIN_LABELLED_TASKS": "3",
        "ALR_USE_REDIS": "false",
        "LABEL_STUDIO_URL": "http://127.0.0.1:9",
        "LABEL_STUDIO_API_KEY": "",
        "PYTHONPATH": str(REPO),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
