"""Label Studio failing, or the worker killed, while a version's predictions are pushed: the
real server behind a fault-injecting proxy (standard library) that the backend and its worker
talk to.

The push answers 500 from its second batch on: the job's retries fail, the half-pushed
predictions are deleted, the project keeps serving the previous version.  When Label Studio
heals, the version trained before the failure is published without a new event (the job left its
project dirty; the web app's watchdog queues it) and without training again, with exactly one
prediction per task.
"""
from __future__ import annotations

import http.client
import http.server
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pytest

from ml_backend.demo import build_demo_project, choice_annotation, make_digits_project
from ml_backend.store import ProjectStore
from tests.e2e.conftest import backend_stack, current_predictions, ls_api, print_logs, wait_idle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


class FaultProxy:
    """Forwards every request to Label Studio; while ``failing``, answers 500 to prediction
    imports after the first ``pass_batches`` of each push; while ``holding``, holds those imports
    unanswered (``held`` is set) until ``release`` is set, then answers 500; :meth:`blip` answers
    502 to the next few requests whose path and query contain a given text, as a proxy does
    while its upstream restarts, or forwards them and answers 502 instead of Label Studio's answer
    (the answer lost on the way back)."""

    def __init__(self, target: str, *, path_prefix: str = ""):
        """``path_prefix``: served under it, and taken off the path before forwarding (a reverse proxy
        that publishes ``target`` at ``<proxy>/<prefix>``)."""
        self.target = urlparse(target)
        self.failing = False
        self.holding = False
        self.held = threading.Event()
        self.release = threading.Event()
        self.pass_batches = 1
        self.imports_seen = 0
        self.refused = 0
        self.blipped = 0
        self._blips: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                blip = outer._take_blip(self.path)
                if blip == "refuse":
                    self._answer(502, b"")
                    return
                if self.command == "POST" and "/import/predictions" in self.path:
                    outer.imports_seen += 1
                    held = outer.holding and outer.imports_seen > outer.pass_batches
                    if held:
                        outer.held.set()
                        outer.release.wait(300)
                    if held or (outer.failing and outer.imports_seen > outer.pass_batches):
                        outer.refused += 1
                        self._answer(500, b"")
                        return
                conn = http.client.HTTPConnection(outer.target.hostname, outer.target.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                path = self.path
                if path_prefix and path.startswith(path_prefix):
                    path = path[len(path_prefix):] or "/"
                conn.request(self.command, path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                if blip == "lose":
                    self._answer(502, b"")
                else:
                    self._answer(answer.status, data, answer.getheaders())

            def _answer(self, status, data, headers=()):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], ConnectionError):    # a killed worker's socket: expected
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def blip(self, path_part: str, times: int, *, answer_lost: bool = False) -> None:
        """Answer 502 to the next ``times`` requests whose path (with its query) contains ``path_part``;
        ``answer_lost``: after forwarding them to Label Studio."""
        with self._lock:
            self._blips[path_part] = (times, answer_lost)

    def _take_blip(self, path: str) -> str | None:
        """"refuse" or "lose" where a blip is due for this request, else None."""
        with self._lock:
            part = next((p for p, (left, _) in self._blips.items() if left > 0 and p in path), None)
            if part is None:
                return None
            left, answer_lost = self._blips[part]
            self._blips[part] = (left - 1, answer_lost)
            self.blipped += 1
            return "lose" if answer_lost else "refuse"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def faulty(label_studio, admin_pat, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults")
    stack = backend_stack(label_studio, workdir)
    proxy = FaultProxy(label_studio.ls_url)
    ls = ls_api(label_studio)
    try:
        stack.start_redis()
        stack.start_backend(admin_pat, {"ALR_IMAGE_SIZE": "8", "ALR_CHANNELS": "1", "ALR_EPOCHS": "15",
                                        "ALR_FINETUNE_EPOCHS": "2", "ALR_FORGET_RATE": "0.2",
                                        "ALR_PREDICTIONS_BATCH_SIZE": "40", "ALR_WATCHDOG_SECONDS": "2",
                                        "LABEL_STUDIO_URL": proxy.url})
        data = make_digits_project(n_images=100, noise_rate=0.2, seed=7)
        project_id, _, mapping = build_demo_project(stack, ls, data, title="Faults")
        ls.wait_model_version(project_id, timeout=400)
        wait_idle(stack, project_id)
        yield {"stack": stack, "ls": ls, "project": project_id, "proxy": proxy, "workdir": workdir,
               "truth": {tid: (data.given[i], data.truth[i]) for tid, i in mapping.items()}}
    finally:
        stack.stop()
        proxy.close()
        print_logs(stack)


def test_a_backend_published_under_a_path_prefix_gets_its_webhook_credentials_and_trains_on_annotations(faulty):
    """Label Studio connects the model at <proxy>/alr, a reverse proxy with a path prefix in front of the
    backend: /setup reaches the backend under another URL than the one Label Studio named the webhook
    after (<proxy>/alr/webhook). The backend still finds that webhook (the project's only ML backend)
    and gives it its credentials, so an annotation made in Label Studio reaches a model."""
    ls, stack = faulty["ls"], faulty["stack"]
    front = FaultProxy(stack.backend_url, path_prefix="/alr")
    try:
        data = make_digits_project(n_images=40, noise_rate=0.2, seed=11)
        pid = ls.create_project("Behind a proxy")
        mapping = ls.upload_images(pid, data)
        ls.connect_backend(pid, front.url + "/alr", stack.backend_auth)
        first = ls.wait_model_version(pid, timeout=400)          # the connection's own first training
        wait_idle(stack, pid)
        hooks = [h for h in ls.call("GET", "/api/webhooks/", params={"project": pid})
                 if h["url"] == front.url + "/alr/webhook"]
        assert len(hooks) == 1 and (hooks[0].get("headers") or {}).get("Authorization", "").startswith("Basic ")
        tid, i = next(iter(mapping.items()))
        ls.call("POST", f"/api/tasks/{tid}/annotations", json=choice_annotation(data.truth[i]))
        new = ls.wait_model_version(pid, not_in={first}, timeout=300)
        store = ProjectStore(Path(faulty["workdir"]) / "models", pid)
        assert tid in store.load_meta(new)["trusted_task_ids"]
        # through the webhook, not the reconciliation: the backend accepted Label Studio's event
        assert f"webhook ANNOTATION_CREATED for project {pid} -> " in (Path(faulty["workdir"]) / "backend.log").read_text()
    finally:
        front.close()


def test_a_failed_push_keeps_the_previous_version_and_the_next_push_completes(faulty):
    ls, pid, proxy, stack = faulty["ls"], faulty["project"], faulty["proxy"], faulty["stack"]
    store = ProjectStore(Path(faulty["workdir"]) / "models", pid)
    before = ls.project(pid)["model_version"]
    assert store.current_version() == before
    tid, (given, true) = next(iter(faulty["truth"].items()))
    proxy.imports_seen, proxy.failing = 0, True
    t0 = time.monotonic()
    ls.call("POST", f"/api/tasks/{tid}/annotations", json=choice_annotation(true))
    worker_log = Path(faulty["workdir"]) / "worker.log"
    deadline = time.monotonic() + 300
    while "publishing" not in worker_log.read_text() or proxy.refused < 3:
        assert time.monotonic() < deadline, "the push never failed"
        time.sleep(0.5)
    time.sleep(2)
    # all or nothing: Label Studio still serves the previous version, whole, and no half version
    assert ls.project(pid)["model_version"] == before and store.current_version() == before
    versions = ls.call("GET", f"/api/projects/{pid}/model-versions/")
    assert set(v for v in versions if v.startswith("alr-")) <= {before}, versions
    assert set(current_predictions(ls, pid, before)) == set(faulty["truth"])
    trained = store.list_versions()[-1]        # trained, never published

    proxy.failing = False                      # Label Studio heals: no new event is sent
    healed = time.monotonic()
    new = ls.wait_model_version(pid, not_in={before}, timeout=300)
    wait_idle(stack, pid)
    new = ls.project(pid)["model_version"]
    print(f"push failed {proxy.refused} times; published {time.monotonic() - healed:.0f}s after Label Studio "
          f"healed ({time.monotonic() - t0:.0f}s after the annotation)")
    per_task = Counter(p["task"] for p in ls.predictions(pid) if p["model_version"] == new)
    assert set(per_task) == set(faulty["truth"]) and set(per_task.values()) == {1}
    meta = json.loads((store.version_dir(new) / "meta.json").read_text())
    assert tid in meta["trusted_task_ids"] and meta["trained_task_labels"][str(tid)] == true
    assert store.current_version() == new
    # the version trained before the push failed is the one published: the re-runs trained nothing
    assert new == trained and store.list_versions()[-2:] == [before, trained]


def test_a_worker_killed_mid_push_leaves_the_served_version_whole_and_a_new_worker_publishes(faulty):
    """kill -9 of the worker and its work horse while Label Studio holds the second batch of a
    version's predictions: nobody deletes the half push. Label Studio keeps serving the previous
    version, whole; the running lock lapses, the watchdog queues the project again, and a new
    worker publishes the version the killed job trained, without training it again, with one
    prediction per task (the killed job's first batch replaced, not doubled)."""
    ls, pid, proxy, stack = faulty["ls"], faulty["project"], faulty["proxy"], faulty["stack"]
    wait_idle(stack, pid)
    store = ProjectStore(Path(faulty["workdir"]) / "models", pid)
    before = ls.project(pid)["model_version"]
    tid = next(t for t in faulty["truth"] if not ls.call("GET", f"/api/tasks/{t}/annotations"))
    true = faulty["truth"][tid][1]
    proxy.imports_seen, proxy.holding = 0, True
    proxy.held.clear(), proxy.release.clear()
    ls.call("POST", f"/api/tasks/{tid}/annotations", json=choice_annotation(true))
    assert proxy.held.wait(300), "the push never reached its second batch"
    half = [v for v in ls.call("GET", f"/api/projects/{pid}/model-versions/") if v.startswith("alr-") and v != before]
    assert len(half) == 1, half                          # the first batch of the version being pushed is in
    t_kill = time.monotonic()
    stack.kill("worker")
    proxy.holding = False
    proxy.release.set()
    time.sleep(2)
    # nothing cleaned up after the killed job, and nothing needed to: the stream still follows `before`
    assert ls.project(pid)["model_version"] == before and store.current_version() == before
    assert set(current_predictions(ls, pid, before)) == set(faulty["truth"])

    stack.start_worker()
    new = ls.wait_model_version(pid, not_in={before}, timeout=300)
    wait_idle(stack, pid)
    new = ls.project(pid)["model_version"]
    print(f"worker killed mid-push: version {new} published {time.monotonic() - t_kill:.0f}s after the kill")
    assert [new] == half and store.list_versions()[-2:] == [before, new]
    per_task = Counter(p["task"] for p in ls.predictions(pid) if p["model_version"] == new)
    assert set(per_task) == set(faulty["truth"]) and set(per_task.values()) == {1}
    assert {v for v in ls.call("GET", f"/api/projects/{pid}/model-versions/") if v.startswith("alr-")} == {new}
    meta = json.loads((store.version_dir(new) / "meta.json").read_text())
    assert tid in meta["trusted_task_ids"] and meta["trained_task_labels"][str(tid)] == true
    assert store.current_version() == new


def test_a_proxy_blip_on_the_job_s_reads_is_asked_again_and_the_job_trains_through(faulty):
    """The proxy answers 502 twice to the job's listing of the tasks, once to its count of the new
    version's predictions, and once in place of Label Studio's answer to a batch of predictions it
    created: the job asks again, sends that batch only once, and publishes the version trusting the
    new annotation with one prediction per task; no job fails (before, the first 502 failed the job
    and the watchdog ran it again from the start: on a 20,000-task project, 25 s of listing for
    each blip)."""
    ls, pid, proxy, stack = faulty["ls"], faulty["project"], faulty["proxy"], faulty["stack"]
    store = ProjectStore(Path(faulty["workdir"]) / "models", pid)
    worker_log = Path(faulty["workdir"]) / "worker.log"
    wait_idle(stack, pid)
    tracebacks = worker_log.read_text().count("Traceback")
    before = ls.project(pid)["model_version"]
    annotated = {t["id"] for t in ls.tasks(pid) if t.get("annotations")}
    tid, (given, true) = next((t, gt) for t, gt in faulty["truth"].items() if t not in annotated)
    proxy.blip("fields=all", 2)
    proxy.blip("/model-versions/", 1)
    proxy.blip("/import/predictions", 1, answer_lost=True)
    t0 = time.monotonic()
    ls.call("POST", f"/api/tasks/{tid}/annotations", json=choice_annotation(true))
    new = ls.wait_model_version(pid, not_in={before}, timeout=300)
    wait_idle(stack, pid)
    print(f"{proxy.blipped} answers of 502 (one after Label Studio created a batch); published {time.monotonic() - t0:.0f}s after the annotation")
    log = worker_log.read_text()
    assert proxy.blipped == 4 and log.count("asking again") >= 4 and "its answer was lost" in log
    assert log.count("Traceback") == tracebacks, "a job failed on a blip"
    assert ls.project(pid)["model_version"] == store.current_version() == new
    assert tid in store.load_meta(new)["trusted_task_ids"]
    per_task = Counter(p["task"] for p in ls.predictions(pid) if p["model_version"] == new)
    assert set(per_task) == set(faulty["truth"]) and set(per_task.values()) == {1}
