"""Benchmark of the ML backend: /predict latency from the cache, and pushing 1,000 predictions.

    python benchmarks/bench_backend.py                    # starts its own Label Studio (needs .ls-venv)
    python benchmarks/bench_backend.py --ls-url http://127.0.0.1:8080 --ls-token <legacy token>
    python benchmarks/bench_backend.py --no-label-studio  # push against the in-process fake API only

Writes the section "ML backend (benchmarks/bench_backend.py)" of benchmarks/RESULTS.md
(benchmarks/_results.replace_section).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._results import code_version, replace_section  # noqa: E402
from ml_backend.app import create_app  # noqa: E402
from ml_backend.demo import choice_annotation  # noqa: E402
from ml_backend.labelconfig import parse_label_config  # noqa: E402
from ml_backend.ls_client import LabelStudioClient  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402
from ml_backend.store import ProjectStore, atomic_write_json  # noqa: E402
from ml_backend.training import prediction_for  # noqa: E402

SECTION = "ML backend (benchmarks/bench_backend.py)"
CONFIG = ("<View><Image name=\"image\" value=\"$image\"/><Choices name=\"label\" toName=\"image\" "
          "choice=\"single\">" + "".join(f'<Choice value="{k}"/>' for k in range(10)) + "</Choices></View>")


def record(tid: int) -> dict:
    return {"suggested": str(tid % 10), "given": str((tid + 1) % 10), "trusted": False,
            "score": (tid % 997) / 997, "prob_label_wrong": 0.5, "loss": 1.0, "vog": 0.1, "priority": 0.5}


def write_version(model_dir: str, project: int, n_tasks: int) -> str:
    store = ProjectStore(model_dir, project)
    version = store.next_version()
    tmp = store.begin(version)
    atomic_write_json(tmp / "results.json", {"version": version, "project": project,
                                             "class_names": [str(k) for k in range(10)],
                                             "items": {str(t): record(t) for t in range(1, n_tasks + 1)}})
    atomic_write_json(tmp / "meta.json", {"version": version})
    store.commit(version, tmp)
    return version


def bench_predict(n_tasks: int = 100, repeats: int = 200) -> dict:
    """Median / p95 latency of POST /predict for n_tasks cached tasks (Flask test client and
    real HTTP on loopback through Werkzeug's threaded server)."""
    from werkzeug.serving import make_server

    with tempfile.TemporaryDirectory() as model_dir:
        settings = Settings(model_dir=model_dir, use_redis=False, label_studio_url="http://127.0.0.1:9")
        write_version(model_dir, 1, 10_000)
        app = create_app(settings)
        tasks = [{"id": t, "data": {"image": f"/data/upload/1/{t}.png", "label": "3"}, "annotations": [],
                  "predictions": []} for t in range(1, n_tasks + 1)]
        body = {"tasks": tasks, "project": "1.1700000000", "label_config": CONFIG, "params": {}}
        client = app.test_client()
        assert len(client.post("/predict", json=body).get_json()["results"]) == n_tasks   # warm-up + load
        inproc = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.post("/predict", json=body)
            inproc.append(time.perf_counter() - t0)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_port}/predict"
        session = requests.Session()
        payload = json.dumps(body)
        http = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = session.post(url, data=payload, headers={"Content-Type": "application/json"})
            http.append(time.perf_counter() - t0)
            assert r.status_code == 200
        server.shutdown()
    q = lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))] * 1000  # noqa: E731
    return {"test_client_median_ms": statistics.median(inproc) * 1000, "test_client_p95_ms": q(inproc, 0.95),
            "http_median_ms": statistics.median(http) * 1000, "http_p95_ms": q(http, 0.95)}


def import_tasks(client: LabelStudioClient, project: int, n: int, *, chunk: int = 2000) -> None:
    """n tasks with a given label and an image reference nothing serves (nothing here downloads it)."""
    for start in range(0, n, chunk):
        client.request("POST", f"/api/projects/{project}/import", timeout=300, json=[
            {"image": f"/data/upload/none/{i}.png", "label": str(i % 10)} for i in range(start, min(n, start + chunk))])


def bench_push(ls_url: str, api_key: str, n_tasks: int = 1000, batch_sizes=(100, 500, 1000)) -> list[dict]:
    """Time to push predictions for n_tasks tasks in bulk, per batch size (a fresh project each)."""
    client = LabelStudioClient(ls_url, api_key, timeout=300)
    info = parse_label_config(CONFIG)
    rows = []
    for batch in (None, *batch_sizes):      # None: an untimed warm-up round
        n = 100 if batch is None else n_tasks
        project = client.request("POST", "/api/projects", json={"title": f"bench push {batch}",
                                                                 "label_config": CONFIG})["id"]
        import_tasks(client, project, n)
        ids = [t["id"] for t in client.iter_tasks(project, page_size=500)]
        preds = [dict(prediction_for(record(i), info, "bench-v1"), task=tid) for i, tid in enumerate(ids)]
        t0 = time.perf_counter()
        created = client.import_predictions(project, preds, batch_size=batch or 100)
        push = time.perf_counter() - t0
        t0 = time.perf_counter()
        client.patch_project(project, model_version="bench-v1")
        patch = time.perf_counter() - t0
        t0 = time.perf_counter()                 # what the next version's job does to this one
        client.delete_prediction_version(project, "bench-v1")
        delete = time.perf_counter() - t0
        if batch is None:
            continue
        rows.append({"batch": batch, "tasks": len(ids), "created": created, "push_s": push, "patch_s": patch,
                     "delete_s": delete})
    # for comparison: one prediction per request (POST /api/predictions), 100 of them, x10
    t0 = time.perf_counter()
    for pred in preds[:100]:
        client.request("POST", "/api/predictions", json={**pred, "project": project})
    single = (time.perf_counter() - t0) * len(preds) / 100
    rows.append({"batch": 1, "tasks": len(ids), "created": len(ids), "push_s": single, "patch_s": float("nan"),
                 "delete_s": float("nan"), "note": "POST /api/predictions one by one; 100 timed, x10"})
    return rows


RECONCILE_ANNOTATED = 50     # tasks annotated in each project of bench_reconcile
RECONCILE_REPEATS = 5        # timed calls of each kind, after one untimed


def bench_reconcile(ls_url: str, api_key: str, sizes=(200, 5000, 20000)) -> list[dict]:
    """What one reconciliation period asks Label Studio per served project (ml_backend.reconcile.annotation_state:
    the project, its summary, its most recently updated task), against what a job's task listing costs."""
    client = LabelStudioClient(ls_url, api_key, timeout=300)
    rows = []
    for n in sizes:
        project = client.request("POST", "/api/projects", json={"title": f"bench reconcile {n}",
                                                                 "label_config": CONFIG})["id"]
        import_tasks(client, project, n)
        first = client.request("GET", "/api/tasks", params={"project": project, "page_size": RECONCILE_ANNOTATED})
        for task in first["tasks"] if isinstance(first, dict) else first:
            client.request("POST", f"/api/tasks/{task['id']}/annotations", json=choice_annotation(1))
        calls = {"project": lambda: client.get_project(project),
                 "summary": lambda: client.get_project_summary(project),
                 "newest task update": lambda: client.newest_task_update(project)}
        row = {"tasks": n}
        for name, call in calls.items():
            call()
            t0 = time.perf_counter()
            for _ in range(RECONCILE_REPEATS):
                call()
            row[name] = 1000 * (time.perf_counter() - t0) / RECONCILE_REPEATS
        t0 = time.perf_counter()
        listed = sum(1 for _ in client.iter_tasks(project))
        row["listing_s"] = time.perf_counter() - t0
        if listed != n:
            raise RuntimeError(f"the listing gave {listed} of the project's {n} tasks: its time would mislead")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ls-url")
    parser.add_argument("--ls-token", default=os.environ.get("LABEL_STUDIO_API_KEY", ""))
    parser.add_argument("--no-label-studio", action="store_true")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    pred = bench_predict(repeats=args.repeats)
    print("predict:", pred, flush=True)

    stack = None
    reconcile_rows = []
    target = "real Label Studio 1.23.2"
    try:
        if args.no_label_studio:
            from tests.test_backend_fake_ls import LEGACY_TOKEN, FakeLabelStudio
            fake = FakeLabelStudio().__enter__()
            fake.add_project(1)
            target = "in-process fake Label Studio API (NOT the real server)"
            rows = []
            for batch in (100, 500, 1000):
                fake.predictions.clear()
                fake.tasks.clear()
                for t in range(1, 1001):
                    fake.tasks[t] = {"id": t, "project": 1, "data": {}, "annotations": []}
                client = LabelStudioClient(fake.url, LEGACY_TOKEN)
                info = parse_label_config(CONFIG)
                preds = [dict(prediction_for(record(t), info, "bench-v1"), task=t) for t in range(1, 1001)]
                t0 = time.perf_counter()
                created = client.import_predictions(1, preds, batch_size=batch)
                rows.append({"batch": batch, "tasks": 1000, "created": created,
                             "push_s": time.perf_counter() - t0, "patch_s": float("nan"), "delete_s": float("nan")})
        else:
            url, token = args.ls_url, args.ls_token
            if not url:
                from ml_backend.demo import Stack
                stack = Stack(Path(tempfile.mkdtemp(prefix="alr-bench-")))
                stack.start_label_studio()
                url, token = stack.ls_url, stack.token
            rows = bench_push(url, token)
            reconcile_rows = bench_reconcile(url, token)
    finally:
        if stack is not None:
            stack.stop()
    for row in rows:
        print("push:", row, flush=True)

    cmd = "python benchmarks/bench_backend.py" + (" --no-label-studio" if args.no_label_studio else "") + \
        (f" --ls-url {args.ls_url} --ls-token <token>" if args.ls_url else "")
    lines = [f"Command: `{cmd}` (code: {code_version()}; {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"{os.cpu_count()} CPU cores, Python {platform.python_version()}).", "",
             f"`/predict` for 100 tasks answered from the cached results of a 10,000-task version "
             f"({args.repeats} requests after one warm-up):", "",
             "| path | median (ms) | p95 (ms) |", "|---|---|---|",
             f"| Flask test client (in process) | {pred['test_client_median_ms']:.2f} | {pred['test_client_p95_ms']:.2f} |",
             f"| HTTP on loopback (Werkzeug threaded server) | {pred['http_median_ms']:.2f} | {pred['http_p95_ms']:.2f} |",
             "", f"Pushing predictions for 1,000 tasks (`POST /api/projects/<id>/import/predictions`, "
             f"then `PATCH model_version`), and deleting them again as the next version's job does (`DELETE "
             f"/api/projects/<id>/model-versions/`), against the {target}:", "",
             "| batch size | requests | created | push (s) | PATCH (s) | predictions / s | delete the version (s) "
             "| note |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['batch']} | {-(-row['tasks'] // row['batch'])} | {row['created']} | "
                     f"{row['push_s']:.2f} | {row['patch_s']:.2f} | {row['created'] / row['push_s']:.0f} | "
                     f"{row['delete_s']:.2f} | {row.get('note', '')} |")
    if reconcile_rows:
        lines += ["", f"One reconciliation period per served project (`ALR_RECONCILE_SECONDS`: the project, its "
                  f"summary, its most recently updated task; mean of {RECONCILE_REPEATS} calls) against a job's "
                  f"listing of every task (pages of 200), on the {target} with SQLite, {RECONCILE_ANNOTATED} tasks "
                  f"annotated:", "",
                  "| tasks | project (ms) | summary (ms) | newest task update (ms) | job's task listing (s) |",
                  "|---|---|---|---|---|"]
        for row in reconcile_rows:
            lines.append(f"| {row['tasks']:,} | {row['project']:.0f} | {row['summary']:.0f} | "
                         f"{row['newest task update']:.0f} | {row['listing_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
