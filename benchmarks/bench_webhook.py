"""Webhook answer times under a burst, against Label Studio's 1 s webhook timeout (no retry).

    python benchmarks/bench_webhook.py [--burst 50] [--rounds 5]

Starts a real redis-server on a free loopback port and the backend as users run it
(``python ml_backend/_wsgi.py``, basic auth on), then sends ``--burst`` concurrent
ANNOTATION_CREATED webhooks (one connection each) per round, for several projects so that
both paths run: a new job (enqueue) and an event folded into the pending job.  No worker
runs, so the jobs stay queued and every answer is the webhook's own work.  Writes the
section "Reliability: webhook answer times" of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._results import markdown_table, provenance, replace_section  # noqa: E402

AUTH = ("label-studio", "bench-password")
BUDGET_MS = 1000.0          # Label Studio's webhook timeout
TARGET_P99_MS = 250.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def burst(url: str, size: int, projects: int, round_no: int) -> list[float]:
    """``size`` webhooks at once; their answer times in ms."""
    start, times, errors = threading.Barrier(size), [0.0] * size, []

    def send(i: int) -> None:
        body = {"action": "ANNOTATION_CREATED", "project": {"id": 1 + (i + round_no) % projects},
                "annotation": {"id": i, "was_cancelled": False, "result": []}}
        with requests.Session() as s:
            start.wait()
            t0 = time.perf_counter()
            r = s.post(f"{url}/webhook", json=body, auth=AUTH, timeout=5)
            times[i] = 1000 * (time.perf_counter() - t0)
            if r.status_code != 201:
                errors.append(r.status_code)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"webhooks answered {sorted(set(errors))}")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--projects", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-webhook-"))
    redis_port, port = free_port(), free_port()
    procs = [subprocess.Popen([shutil.which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)]
    env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", MODEL_DIR=str(work / "models"),
               BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS=AUTH[1], LABEL_STUDIO_URL="http://127.0.0.1:9",
               LABEL_STUDIO_API_KEY="", LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
    procs.append(subprocess.Popen([sys.executable, str(REPO / "ml_backend" / "_wsgi.py"), "--port", str(port)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(f"{url}/health")
        burst(url, 5, args.projects, 0)                      # warm-up: imports, connection pools
        rows, every = [], []
        for round_no in range(args.rounds):
            times = np.array(burst(url, args.burst, args.projects, round_no))
            every.extend(times)
            rows.append([round_no + 1, f"{np.median(times):.1f}", f"{np.percentile(times, 99):.1f}",
                         f"{times.max():.1f}"])
        every = np.array(every)
        p99 = float(np.percentile(every, 99))
        rows.append(["all", f"{np.median(every):.1f}", f"{p99:.1f}", f"{every.max():.1f}"])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    table = markdown_table(["round", "median ms", "p99 ms", "max ms"], rows)
    verdict = "met" if p99 < TARGET_P99_MS else "MISSED"
    body = (f"{provenance()}\n\n{args.burst} concurrent ANNOTATION_CREATED webhooks per round (basic auth on, "
            f"{args.projects} projects, real redis-server, `python ml_backend/_wsgi.py` over loopback), "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores.\n\n{table}\n\n"
            f"p99 {p99:.0f} ms = {p99 / BUDGET_MS:.2f} of Label Studio's 1 s webhook timeout; target p99 < "
            f"{TARGET_P99_MS:.0f} ms: {verdict}.")
    print(body)
    replace_section("Reliability: webhook answer times", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
