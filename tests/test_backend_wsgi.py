"""The production entry points start and serve /health: `python ml_backend/_wsgi.py` (what
`label-studio-ml start ml_backend` runs), `label-studio-ml start` itself, and gunicorn, and cap
a chunked request body like one of announced length."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, free_port

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("entry", ["script", "label-studio-ml", "gunicorn"])
def test_entry_point_serves_health_on_loopback(entry, backend_env, tmp_path):
    port = free_port()
    argv = {
        "script": [sys.executable, str(REPO / "ml_backend" / "_wsgi.py"), "--port", str(port)],
        "label-studio-ml": [str(BIN / "label-studio-ml"), "start", "ml_backend", "--port", str(port)],
        "gunicorn": [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1",
                     "ml_backend._wsgi:app"],
    }[entry]
    if not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]} is not installed")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", ALR_MAX_REQUEST_BYTES="2000")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and body is None:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                body = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except requests.RequestException:
                time.sleep(0.3)
        assert body and body["status"] == "UP" and body["queue"]["kind"] == "thread"
        # a chunked body announces no length: capped all the same (ALR_MAX_REQUEST_BYTES=2000 here)
        def chunked(size):
            yield b'{"project": 1, "padding": "'
            yield b"x" * size
            yield b'"}'
        r = requests.post(f"http://127.0.0.1:{port}/versions", data=chunked(100), timeout=10,
                          headers={"Content-Type": "application/json"})
        assert r.request.headers.get("Transfer-Encoding") == "chunked" and r.status_code == 200, r.text
        assert r.json()["versions"] == []
        r = requests.post(f"http://127.0.0.1:{port}/versions", data=chunked(50_000), timeout=10,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "ALR_MAX_REQUEST_BYTES" in r.json()["error"]
        if shutil.which("ss"):               # iproute2: check the bind address too
            out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
            listening = [line for line in out.splitlines() if f":{port} " in line]
            assert listening and all("127.0.0.1:" in line for line in listening), listening
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
        log.close()


def _own_network_address() -> str | None:
    """This machine's address on its network (not loopback), or None."""
    import ipaddress
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))          # no packet is sent: this only picks the route's address
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_without_credentials_a_backend_bound_to_every_interface_answers_other_hosts_403(backend_env, tmp_path):
    """`python ml_backend/_wsgi.py --host 0.0.0.0` with no BASIC_AUTH_*: a request over the machine's
    network address (a peer that is not loopback) gets 403 and /health's bare status; loopback works."""
    address = _own_network_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback")
    port = free_port()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "ml_backend" / "_wsgi.py"), "--host", "0.0.0.0", "--port",
                             str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except requests.RequestException:
                time.sleep(0.3)
        remote = requests.post(f"http://{address}:{port}/versions", json={"project": 1}, timeout=10)
        assert remote.status_code == 403 and "BASIC_AUTH_USER" in remote.json()["error"]
        assert set(requests.get(f"http://{address}:{port}/health", timeout=10).json()) == \
            {"status", "model_class", "training_ready"}
        assert requests.post(f"http://127.0.0.1:{port}/versions", json={"project": 1}, timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
        log.close()
