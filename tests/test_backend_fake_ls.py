"""A minimal in-process imitation of the Label Studio API the backend uses (fast tests only).

It serves GET /health, /api/current-user/whoami, GET/PATCH /api/projects/<id>, GET /api/tasks,
POST /api/projects/<id>/import/predictions, POST /api/token/refresh/ and /data/upload/...
files, with both auth kinds (legacy ``Token`` and PAT refresh -> ``Bearer`` access).  It counts
the requests of each route and answers the next few of a route with an error on demand
(:meth:`FakeLabelStudio.fail_next`).  The real server is used by tests/e2e.
"""
from __future__ import annotations

import base64
import io
import json
import threading
from collections import Counter

import numpy as np
from flask import Flask, jsonify, request, send_file
from PIL import Image
from werkzeug.serving import make_server

LEGACY_TOKEN = "a" * 40
PAT = "eyJhbGciOiJIUzI1NiJ9." + base64.urlsafe_b64encode(b'{"token_type":"refresh"}').decode().rstrip("=") + ".sig"
ACCESS = "access-token-123"

DIGITS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image" choice="single">
    <Choice value="0"/><Choice value="1"/><Choice value="2"/>
  </Choices>
</View>"""


def png_bytes(value: int, size: int = 8) -> bytes:
    """A small grey PNG whose shape, not only brightness, tells its class: a vertical bar for dark
    values, a horizontal bar for middling ones, a frame for bright ones (a CNN learns it in a few epochs)."""
    pixels = np.full((size, size), 10, np.uint8)
    middle = slice(size // 2 - 1, size // 2 + 1)
    if value < 85:
        pixels[:, middle] = 250
    elif value < 170:
        pixels[middle, :] = 250
    else:
        pixels[[0, -1], :] = pixels[:, [0, -1]] = 250
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class FakeLabelStudio:
    def __init__(self, *, legacy_enabled: bool = True, tls: tuple[str, str] | None = None):
        """``tls``: (certificate, key) files to serve HTTPS with instead of HTTP."""
        self.legacy_enabled = legacy_enabled
        self.lock = threading.Lock()
        self.projects: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}
        self.files: dict[str, bytes] = {}
        self.predictions: list[dict] = []
        self.users: list[dict] = []          # /api/users/
        self.max_page_size: int | None = None   # Label Studio's TASK_API_PAGE_SIZE_MAX: larger pages are cut
        self.ml_backend_url: str | None = None  # the URL the project's ML backend was connected with (/api/ml)
        self.webhooks: list[dict] = []          # /api/webhooks/: {"id", "project", "url", "headers"}
        self.seen_auth: list[str] = []
        self.requests: Counter[str] = Counter()           # route (its function's name below) -> requests received
        self._failures: dict[str, tuple[int, int, bool]] = {}   # route -> (how many more, status, after): fail_next
        self._next_annotation = 1
        self._clock = 0                      # updated_at of tasks: bumped like Label Studio's (see touch)
        self.app = self._make_app()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True, ssl_context=tls)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()

    def fail_next(self, route: str, times: int, *, status: int = 503, answer_lost: bool = False) -> None:
        """Answer the next ``times`` authorised requests to ``route`` (the name of its function below:
        "tasks", "import_predictions", "model_versions", "upload", ...) with ``status`` instead: 503 is
        Label Studio or its proxy going away for a moment, 404 a Label Studio without the route.  With
        ``answer_lost`` the request is carried out first and only its answer replaced (a proxy's 504
        after Label Studio did the work).  ``times`` 0 heals it."""
        with self.lock:
            self._failures[route] = (times, status, answer_lost)

    def _take_failure(self, route: str, *, after: bool) -> int | None:
        """The status to answer instead, if a failure of ``route`` is due at this point of the request."""
        with self.lock:
            times, status, answer_lost = self._failures.get(route, (0, 0, False))
            if times <= 0 or answer_lost != after:
                return None
            self._failures[route] = (times - 1, status, answer_lost)
            return status

    # -- data -------------------------------------------------------------------------
    def add_project(self, pid: int, label_config: str = DIGITS_CONFIG) -> None:
        self.projects[pid] = {"id": pid, "label_config": label_config, "model_version": "",
                              "sampling": "Sequential sampling"}

    def add_task(self, pid: int, tid: int, *, label, pixel: int, image: bytes | None = None,
                 url: str | None = None) -> None:
        path = url or f"/data/upload/{pid}/task-{tid}.png"
        if url is None:
            self.files[path] = image if image is not None else png_bytes(pixel)
        self.tasks[tid] = {"id": tid, "project": pid, "data": {"image": path, "label": label},
                           "annotations": [], "predictions": []}
        self.touch(tid)

    def touch(self, tid: int) -> None:
        """Bump a task's updated_at, as Label Studio does when the task's data or one of its annotations
        changes (not for predictions imported in bulk)."""
        self._clock += 1
        self.tasks[tid]["updated_at"] = f"2026-01-01T00:00:00.{self._clock:06d}Z"

    def edit_task_data(self, tid: int, **data) -> None:
        """PATCH /api/tasks/<id> of the real server: new data (a given label), no webhook."""
        with self.lock:
            self.tasks[tid]["data"].update(data)
            self.touch(tid)

    def annotate(self, tid: int, choice: str, *, cancelled: bool = False) -> dict:
        with self.lock:
            aid = self._next_annotation
            self._next_annotation += 1
            ann = {"id": aid, "task": tid, "project": self.tasks[tid]["project"], "was_cancelled": cancelled,
                   "created_at": f"2026-01-01T00:00:{aid:06d}", "updated_at": f"2026-01-01T00:00:{aid:06d}",
                   "result": [] if cancelled else [{"from_name": "label", "to_name": "image", "type": "choices",
                                                    "value": {"choices": [choice]}}]}
            self.tasks[tid]["annotations"].append(ann)
            self.touch(tid)
            return ann

    # -- server -----------------------------------------------------------------------
    def _authorised(self) -> bool:
        header = request.headers.get("Authorization", "")
        self.seen_auth.append(header.split(" ")[0])
        if header == f"Token {LEGACY_TOKEN}":
            return self.legacy_enabled
        return header == f"Bearer {ACCESS}"

    def _make_app(self) -> Flask:
        app = Flask("fake_label_studio")
        fake = self

        @app.before_request
        def auth():
            if request.path in ("/health", "/api/token/refresh/"):
                return None
            if not fake._authorised():
                return jsonify({"detail": "Authentication credentials were not provided."}), 401
            return None

        @app.before_request
        def count_and_fail():
            with fake.lock:
                fake.requests[request.endpoint] += 1
            status = fake._take_failure(request.endpoint, after=False)
            return None if status is None else (jsonify({"detail": f"injected fault: HTTP {status}"}), status)

        @app.after_request
        def lose_the_answer(response):
            if response.status_code >= 400:          # refused or failed: nothing was done to lose
                return response
            status = fake._take_failure(request.endpoint, after=True)
            return response if status is None else app.make_response((jsonify({"detail": "answer lost"}), status))

        @app.route("/health")
        def health():
            return jsonify({"status": "UP"})

        @app.route("/api/token/refresh/", methods=["POST"])
        def refresh():
            if (request.get_json(silent=True) or {}).get("refresh") != PAT:
                return jsonify({"detail": "Token is invalid"}), 401
            return jsonify({"access": ACCESS})

        @app.route("/api/current-user/whoami")
        def whoami():
            return jsonify({"id": 1, "email": "test@example.com"})

        @app.route("/api/ml")
        def ml_backends():      # the real one calls each backend's /setup and stores its model_version
            pid = int(request.args.get("project", 0))
            if pid not in fake.projects:
                return jsonify({"detail": "Not found."}), 404
            return jsonify([{"id": 1, "project": pid, "model_version": fake.projects[pid].get("model_version"),
                             "url": fake.ml_backend_url}])

        @app.route("/api/webhooks/")
        def webhooks():
            pid = int(request.args.get("project", 0))
            with fake.lock:
                return jsonify([h for h in fake.webhooks if h["project"] == pid])

        @app.route("/api/webhooks/<int:hid>/", methods=["PATCH"])
        def webhook(hid):
            with fake.lock:
                hook = next((h for h in fake.webhooks if h["id"] == hid), None)
                if hook is None:
                    return jsonify({"detail": "Not found."}), 404
                hook.update(request.get_json())
                return jsonify(hook)

        @app.route("/api/users/")
        def users():
            return jsonify(fake.users)

        @app.route("/api/projects/<int:pid>", methods=["GET", "PATCH"])
        def project(pid):
            if pid not in fake.projects:
                return jsonify({"detail": "Not found."}), 404
            if request.method == "PATCH":
                fake.projects[pid].update(request.get_json())
            annotations = [a for t in fake.tasks.values() if t["project"] == pid for a in t["annotations"]]
            counts = {  # as the real one reports them (reconciliation compares these)
                "total_annotations_number": sum(not a["was_cancelled"] for a in annotations),
                "skipped_annotations_number": sum(a["was_cancelled"] for a in annotations),
                "num_tasks_with_annotations": sum(any(not a["was_cancelled"] for a in t["annotations"])
                                                  for t in fake.tasks.values() if t["project"] == pid)}
            return jsonify({**fake.projects[pid], **counts})

        @app.route("/api/projects/<int:pid>/summary/")
        def summary(pid):         # the real one counts every annotation's labels, updated on each edit
            counts: dict = {}
            for t in fake.tasks.values():
                for ann in t["annotations"] if t["project"] == pid else []:
                    for result in ann["result"]:
                        for choice in result["value"].get("choices", []):
                            per_label = counts.setdefault(result["from_name"], {})
                            per_label[choice] = per_label.get(choice, 0) + 1
            return jsonify({"project": pid, "created_labels": counts})

        @app.route("/api/tasks")
        def tasks():
            pid = int(request.args["project"])
            page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
            size = min(size, fake.max_page_size or size)
            with fake.lock:
                rows = [json.loads(json.dumps(t)) for t in fake.tasks.values() if t["project"] == pid]
            ordering = json.loads(request.args.get("query", "{}")).get("ordering", [])
            if ordering == ["-tasks:updated_at"]:           # the one ordering the backend asks for
                rows.sort(key=lambda t: t["updated_at"], reverse=True)
            chunk = rows[(page - 1) * size: page * size]
            if not chunk and page > 1:
                return jsonify({"detail": "Invalid page."}), 404
            return jsonify({"tasks": chunk, "total": len(rows)})

        @app.route("/api/tasks/<int:tid>")
        def task(tid):
            with fake.lock:
                if tid not in fake.tasks:
                    return jsonify({"detail": "Not found."}), 404
                return jsonify(json.loads(json.dumps(fake.tasks[tid])))

        @app.route("/api/projects/<int:pid>/import/predictions", methods=["POST"])
        def import_predictions(pid):
            items = request.get_json()
            with fake.lock:
                for item in items:
                    if fake.tasks.get(item["task"], {}).get("project") != pid:
                        return jsonify({"detail": f"task {item['task']} not found"}), 400
                fake.predictions.extend(items)
            return jsonify({"created": len(items)}), 201

        @app.route("/api/projects/<int:pid>/model-versions/", methods=["GET", "DELETE"])
        def model_versions(pid):
            with fake.lock:
                if request.method == "DELETE":
                    version = request.get_json()["model_version"]
                    before = len(fake.predictions)
                    fake.predictions[:] = [p for p in fake.predictions if p["model_version"] != version]
                    return jsonify(before - len(fake.predictions))
                counts: dict = {}
                for p in reversed(fake.predictions):          # newest first
                    counts[p["model_version"]] = counts.get(p["model_version"], 0) + 1
                return jsonify(counts)

        @app.route("/data/upload/<path:rest>")
        def upload(rest):
            data = fake.files.get(f"/data/upload/{rest}")
            if data is None:
                return "not found", 404
            return send_file(io.BytesIO(data), mimetype="image/png")

        return app
