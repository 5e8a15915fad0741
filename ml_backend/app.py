"""The Flask app: /setup, /predict, /webhook, /health (+ /metrics, /versions, /is_training).

It replaces label-studio-ml's own app (``label_studio_ml.api``) because that one drops
training jobs while one is queued, ignores START_TRAINING and keeps its state in module
globals.  Everything here lives on the app object created by :func:`create_app`.
"""
from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import logging
import threading
import time

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import Forbidden, HTTPException, NotFound

from .labelconfig import LabelConfigError, parse_label_config
from .ls_client import LabelStudioAuthError, LabelStudioClient, LabelStudioError
from .model import NoiseRobustImageClassifier, parse_project_id
from .quality_report import project_report
from .reconcile import Reconciler, project_stores, projects_with_refused_events
from .review import ensure_review_order
from .training_queue import QueueUnavailable, RQTrainingQueue, ThreadTrainingQueue, Watchdog, make_redis
from .settings import Settings
from .store import ProjectStore, ResultsCache
from .training import config_fingerprint, run_training_job

logger = logging.getLogger(__name__)

#: webhook actions that (may) change the labels a model should learn from
TRAIN_EVENTS = frozenset({
    "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "ANNOTATIONS_DELETED",
    "ANNOTATIONS_CREATED", "START_TRAINING", "PROJECT_UPDATED",
})


def _error(status: int, message: str):
    return jsonify({"status": "error", "error": message}), status


def _refused(settings: Settings, project_id: int, action: str, exc: QueueUnavailable) -> str:
    """Record a webhook event the training queue refused (Label Studio never sends it again) and
    log it; returns what becomes of it, for the answer."""
    try:
        ProjectStore(settings.model_dir, project_id).record_refused_event(action)
    except OSError as disk:
        logger.error("webhook %s for project %d NOT queued (%s) and NOT recorded (%s): the reconciliation finds "
                     "it only by the project's state in Label Studio, which a first training does not have",
                     action, project_id, exc, disk)
        return "not recorded either"
    logger.error("webhook %s for project %d NOT queued (%s); recorded: the reconciliation queues a training for "
                 "it once redis answers (ALR_RECONCILE_SECONDS)", action, project_id, exc)
    return "recorded: a training is queued for it once redis answers"


def make_training_queue(settings: Settings):
    """rq on redis when ALR_USE_REDIS (default), else the in-process thread fallback."""
    if not settings.use_redis:
        return ThreadTrainingQueue(lambda p, reason: run_training_job(p, settings=settings, reason=reason))
    return RQTrainingQueue(make_redis(settings), settings.rq_queue_name, job_timeout=settings.job_timeout)


def create_app(settings: Settings | None = None, *, training_queue=None) -> Flask:
    """Build the app (reads the environment now when ``settings`` is None)."""
    settings = settings or Settings.from_env()
    app = Flask("ml_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_SORT_KEYS"] = False
    queue = training_queue if training_queue is not None else make_training_queue(settings)
    if isinstance(queue, RQTrainingQueue) and settings.watchdog_seconds > 0:
        app.extensions["alr_watchdog"] = Watchdog(queue, period=settings.watchdog_seconds).start()
    if settings.reconcile_seconds > 0 and settings.label_studio_api_key:
        app.extensions["alr_reconciler"] = Reconciler(queue, settings).start()
    results_cache = ResultsCache(settings.model_dir)
    models: dict[tuple[int | None, str], NoiseRobustImageClassifier] = {}
    models_lock = threading.Lock()
    reviewed_projects: set[int] = set()      # projects this process has set up for review
    app.extensions["alr"] = {"settings": settings, "queue": queue, "results": results_cache}
    logger.info("ML backend ready: model_dir=%s, training queue=%s, Label Studio=%s",
                settings.model_dir, queue.kind, settings.label_studio_url)
    warn_about_credentials(settings)

    def check_project(project_id: int | None) -> None:
        if project_id is not None and not settings.project_allowed(project_id):
            raise Forbidden(f"project {project_id} is not served by this backend (ALR_PROJECTS)")

    def set_up_project(project_id: int, webhook_url: str) -> None:
        if not _set_up_project(project_id, settings, webhook_url, queue):
            with models_lock:       # the next /setup of the project tries again
                reviewed_projects.discard(project_id)

    def served_project(value, what: str) -> int:
        """The project id in ``value``: 400 when there is none, 403 outside ALR_PROJECTS."""
        project_id = parse_project_id(value)
        if project_id is None:
            raise _BadRequest(f"{what} is missing")
        check_project(project_id)
        return project_id

    readable = ReadableProjects(settings)

    def get_model(project, label_config, **kwargs) -> NoiseRobustImageClassifier:
        check_project(parse_project_id(project))
        key = (parse_project_id(project), label_config or "")
        with models_lock:
            model = models.get(key)
        if model is None:
            model = NoiseRobustImageClassifier(label_config=label_config, project=project, settings=settings,
                                               results_cache=results_cache, **kwargs)
            with models_lock:
                models[key] = model
        return model

    def caller_refused() -> int | None:
        """401 (credentials missing or wrong) or 403 (another host, and no credentials to ask for)
        when the caller may not use the backend's routes; None when it may."""
        if not settings.auth_enabled:
            return None if settings.open_to_network or _is_local(request.remote_addr) else 403
        return None if credentials_ok(request.authorization, settings) else 401

    @app.before_request
    def authenticate():
        """Basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS) on every route but the health check;
        without it, loopback callers only (ALR_OPEN_TO_NETWORK opens the routes to every host).
        Label Studio sends the credentials on /setup, /predict, /train; its webhook carries them in
        the headers the backend adds to that webhook when it sets the project up (_set_up_project)."""
        if request.path in OPEN_ROUTES:
            return None
        refused = caller_refused()
        if refused == 403:
            logger.warning("%s %s refused: from %s, and this backend has no credentials to ask for (BASIC_AUTH_USER "
                           "and BASIC_AUTH_PASS unset), so it answers only on loopback", request.method, request.path,
                           request.remote_addr)
            return _error(403, "this backend has no credentials set and answers only on this host: set "
                               "BASIC_AUTH_USER and BASIC_AUTH_PASS (and \"Use basic auth\" in Label Studio), or "
                               "ALR_OPEN_TO_NETWORK=true on a network where anyone may read the scores")
        if refused == 401:
            logger.warning("%s %s refused: missing or wrong credentials (from %s)", request.method, request.path,
                           request.remote_addr)
            response, status = _error(401, "authentication required")
            response.headers["WWW-Authenticate"] = 'Basic realm="ml_backend"'
            return response, status
        return None

    @app.before_request
    def cap_size():
        """Refuse bodies over ALR_MAX_REQUEST_BYTES up front (get_json(silent=True) would swallow
        Werkzeug's 413).  A chunked body announces no length and this Werkzeug does not cap what it
        reads of one: at most the cap (+1 byte to tell) is read here, and the request goes on with
        those bytes as its body."""
        cap = settings.max_request_bytes
        if request.content_length is not None:
            size = request.content_length
        elif request.environ.get("wsgi.input_terminated"):      # chunked (gunicorn, the Werkzeug server)
            data = request.environ["wsgi.input"].read(cap + 1)
            request.environ["wsgi.input"] = io.BytesIO(data)     # still "terminated": read to its end
            size = len(data)
        else:
            return None
        return _error(413, f"request body larger than ALR_MAX_REQUEST_BYTES={cap}") if size > cap else None

    def body() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise _BadRequest("request body must be a JSON object")
        return data

    @app.errorhandler(_BadRequest)
    def bad_request(exc):
        return _error(400, str(exc))

    @app.errorhandler(LabelConfigError)
    def bad_config(exc):
        return _error(400, f"unsupported labelling config: {exc}")

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc):
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, f"{type(exc).__name__}: {exc}")

    @app.route("/setup", methods=["POST"])
    def setup():
        data = body()
        schema = data.get("schema") or data.get("label_config")
        if not isinstance(schema, (str, type(None))):
            raise _BadRequest("'schema' must be the project's labelling config (an XML string)")
        hostname, access_token = data.get("hostname") or "", data.get("access_token") or ""
        if not isinstance(hostname, str) or not isinstance(access_token, str):
            raise _BadRequest("'hostname' and 'access_token' must be strings")
        model = get_model(data.get("project"), schema, hostname=hostname, access_token=access_token)
        project_id = model.project_id
        if project_id is not None and settings.label_studio_api_key:
            with models_lock:
                first_time = project_id not in reviewed_projects
                reviewed_projects.add(project_id)
            if first_time:      # once per project and process, off the request path
                threading.Thread(target=set_up_project, args=(project_id, request.url_root + "webhook"),
                                 daemon=True, name=f"alr-setup-{project_id}").start()
        return jsonify({"model_version": model.model_version})

    @app.route("/predict", methods=["POST"])
    def predict():
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise _BadRequest("'tasks' must be a list of task objects")
        label_config = data.get("label_config")
        if not label_config or not isinstance(label_config, str):
            raise _BadRequest("'label_config' must be the project's labelling config (an XML string)")
        project = data.get("project")
        if project is None and tasks:
            project = tasks[0].get("project")
        model = get_model(project, label_config)
        t0 = time.perf_counter()
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise _BadRequest("'params' must be an object")
        results = model.predict(tasks, **{str(k): v for k, v in params.items()})
        logger.debug("/predict: %d tasks in %.1f ms", len(tasks), 1000 * (time.perf_counter() - t0))
        return jsonify({"results": results, "model_version": model.model_version})

    @app.route("/webhook", methods=["POST"])
    def webhook():
        data = body()
        action = data.get("action")
        if not isinstance(action, str) or not action:
            raise _BadRequest("webhook payload has no 'action'")
        if action not in TRAIN_EVENTS:
            return jsonify({"status": "ignored", "action": action}), 200
        project_id = parse_project_id(data.get("project"))
        if project_id is None and isinstance(data.get("annotation"), dict):
            project_id = parse_project_id(data["annotation"].get("project"))
        if project_id is None:
            raise _BadRequest(f"{action}: payload has no project id")
        check_project(project_id)
        if not readable(project_id):
            raise NotFound(f"project {project_id} cannot be read with LABEL_STUDIO_API_KEY: no job queued")
        skip = _skip_reason(action, data, project_id, settings)
        if skip:
            return jsonify({"status": "ignored", "action": action, "reason": skip}), 200
        try:
            job = queue.request_training(project_id, action)
        except QueueUnavailable as exc:
            return _error(503, f"training queue unavailable: {exc}; {_refused(settings, project_id, action, exc)}")
        logger.info("webhook %s for project %d -> %s job %s", action, project_id,
                    "coalesced into" if job["coalesced"] else "new", job["job_id"])
        return jsonify({"status": "queued", "action": action, **job}), 201

    @app.route("/train", methods=["POST"])
    def train():   # deprecated in Label Studio >= 1.4.1; kept as a manual trigger
        data = body()
        project_id = served_project(data.get("project"), "'project'")
        try:
            job = queue.request_training(project_id, "TRAIN")
        except QueueUnavailable as exc:
            return _error(503, f"training queue unavailable: {exc}")
        return jsonify({"status": "queued", **job}), 201

    @app.route("/health", methods=["GET"])
    @app.route("/", methods=["GET"])
    def health():
        queue_status = queue.status()
        ok = queue_status.get("redis") is not False and queue_status.get("workers", 0) > 0
        if caller_refused():
            # open to anyone: only whether the backend is up and can train, nothing about projects,
            # and no call to Label Studio made on a stranger's behalf
            return jsonify({"status": "UP", "model_class": NoiseRobustImageClassifier.__name__,
                            "training_ready": bool(ok)})
        # Label Studio only needs 200 + status UP to connect; the details say what is missing
        return jsonify({"status": "UP", "model_class": NoiseRobustImageClassifier.__name__,
                        "training_ready": bool(ok), "queue": queue_status,
                        "label_studio": label_studio_status(settings),
                        "model_versions": {str(store.project_id): store.current_version()
                                           for store in project_stores(settings)},
                        "refused_events": {str(p): n for p, n in projects_with_refused_events(settings).items()}})

    @app.route("/metrics", methods=["GET"])
    def metrics():
        return jsonify({})

    @app.route("/versions", methods=["POST"])
    def versions():
        data = body()
        project_id = served_project(data.get("project"), "'project'")
        store = ProjectStore(settings.model_dir, project_id)
        return jsonify({"versions": store.list_versions(), "current": store.current_version()})

    @app.route("/report", methods=["GET"])
    def report():
        """The project's label-quality report, an HTML page (same credentials as every route)."""
        project_id = served_project(request.args.get("project"), "query parameter 'project'")
        results = results_cache.get(project_id)
        if results is None:
            return _error(404, f"project {project_id} has no model version yet: the report follows the first training")
        return Response(project_report(project_id, results, settings), mimetype="text/html")

    @app.route("/is_training", methods=["GET"])
    def is_training():
        project_id = served_project(request.args.get("project"), "query parameter 'project'")
        try:
            st = queue.project_status(project_id)
        except Exception as exc:       # redis down: say so instead of crashing
            return _error(503, f"training queue unavailable: {type(exc).__name__}")
        return jsonify({"is_training": st["running"], **st})

    return app


class _BadRequest(ValueError):
    pass


OPEN_ROUTES = frozenset({"/health", "/"})


class ReadableProjects:
    """Whether the API key can read a project (GET /api/projects/<id>), remembered for
    ``ttl`` seconds so that a burst of webhooks costs one call.  Only a clear 403/404 says no:
    when Label Studio cannot be asked, the event is let through (a job fails later, loudly,
    rather than an annotation being dropped)."""

    def __init__(self, settings: Settings, *, ttl: float = 300.0):
        self.settings, self.ttl = settings, ttl
        self._known: dict[int, tuple[bool, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, project_id: int) -> bool:
        if not self.settings.label_studio_api_key:
            return True
        with self._lock:
            known = self._known.get(project_id)
        if known is not None and time.monotonic() - known[1] < self.ttl:
            return known[0]
        client = LabelStudioClient(self.settings.label_studio_url, self.settings.label_studio_api_key, timeout=2)
        try:
            client.get_project(project_id)
            answer = True
        except LabelStudioError as exc:
            if exc.status not in (403, 404):
                return True
            answer = False
        with self._lock:
            self._known[project_id] = (answer, time.monotonic())
        return answer


def label_studio_status(settings: Settings) -> dict:
    """What /health says of Label Studio: whether it answers, whether it takes LABEL_STUDIO_API_KEY
    (one GET /api/current-user/whoami, 2 s at most), and when not, the error that says why (an
    untrusted certificate, a refused key, no answer), which is what a job would fail with."""
    status = {"url": settings.label_studio_url, "reachable": None, "api_key_accepted": None}
    if not settings.label_studio_url:
        return status
    try:
        LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key, timeout=2).whoami()
    except LabelStudioAuthError as exc:
        if settings.label_studio_api_key:      # refused by the server, which therefore answered
            status.update(reachable=True, api_key_accepted=False)
        status["error"] = str(exc)
    except LabelStudioError as exc:
        status.update(reachable=exc.status is not None, error=str(exc))
    else:
        status.update(reachable=True, api_key_accepted=True)
    return status


#: shorter basic-auth passwords get a warning at start (``openssl rand -base64 24`` gives 32 characters)
MIN_PASSWORD_LENGTH = 16


def warn_about_credentials(settings: Settings) -> None:
    """Log, at start, where the backend's routes are open or guarded by a guessable password."""
    if not settings.auth_enabled and settings.open_to_network:
        logger.warning("BASIC_AUTH_USER and BASIC_AUTH_PASS are not set and ALR_OPEN_TO_NETWORK is true: anyone who "
                       "can reach this backend's port can read the projects' scores and queue trainings. Set both "
                       "(BASIC_AUTH_PASS=$(openssl rand -base64 24)) and connect the model with \"Use basic auth\"")
    elif not settings.auth_enabled:
        logger.warning("BASIC_AUTH_USER and BASIC_AUTH_PASS are not set: only clients on this host (loopback) are "
                       "answered, other hosts get 403. To serve a Label Studio elsewhere, set both "
                       "(BASIC_AUTH_PASS=$(openssl rand -base64 24)) and connect the model with \"Use basic auth\"")
    elif len(settings.basic_auth_pass) < MIN_PASSWORD_LENGTH:
        logger.warning("BASIC_AUTH_PASS has %d characters: a password that short can be guessed by anyone on the "
                       "network; use at least %d random ones (openssl rand -base64 24)",
                       len(settings.basic_auth_pass), MIN_PASSWORD_LENGTH)


def _is_local(address: str | None) -> bool:
    """Whether a peer is on this host: a loopback address, or none at all (a unix socket, which only
    this host's processes can open, or an in-process call)."""
    if not address:
        return True
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def credentials_ok(authorization, settings: Settings) -> bool:
    """Whether a request's basic-auth credentials are the backend's (constant-time comparison)."""
    if authorization is None or authorization.type != "basic":
        return False
    user_ok = hmac.compare_digest((authorization.username or "").encode(), settings.basic_auth_user.encode())
    pass_ok = hmac.compare_digest((authorization.password or "").encode(), settings.basic_auth_pass.encode())
    return user_ok and pass_ok


def _set_up_project(project_id: int, settings: Settings, webhook_url: str, queue) -> bool:
    """On connection: the project's sampling and served version follow the backend's scores,
    the webhook Label Studio made for the backend carries the backend's credentials, and a
    project with no model version yet gets its first training (the PROJECT_UPDATED event of the
    connection itself comes before the webhook has the credentials and is refused).  False when
    the webhook could not be given the credentials (to be tried again at the next /setup)."""
    authenticated = True
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key,
                               timeout=settings.request_timeout)
    try:
        ensure_review_order(client, project_id, settings,
                            served_version=ProjectStore(settings.model_dir, project_id).current_version())
    except Exception as exc:      # noqa: BLE001 - the next published version tries again
        logger.warning("project %d: could not set the project up for review (%s); the next model "
                       "version will try again", project_id, exc)
    if settings.auth_enabled:
        token = base64.b64encode(f"{settings.basic_auth_user}:{settings.basic_auth_pass}".encode()).decode()
        try:
            authenticated = authenticate_webhook(client, project_id, webhook_url, {"Authorization": f"Basic {token}"})
        except Exception as exc:      # noqa: BLE001 - logged with what to do
            authenticated = False
            logger.error("project %d: could not add the backend's credentials to its webhook %s (%s): Label "
                         "Studio's annotation events will be refused with 401 (trainings come only from the "
                         "reconciliation) until it is done: the backend tries again at Label Studio's next /setup "
                         "call (open the project's Settings > Model page)", project_id, webhook_url, exc)
    if ProjectStore(settings.model_dir, project_id).current_version() is None:
        try:
            job = queue.request_training(project_id, "CONNECTED")
            logger.info("project %d has no model version yet: first training queued (%s)", project_id, job["job_id"])
        except QueueUnavailable as exc:
            logger.error("project %d: first training NOT queued (%s); press Start Training when the queue is back",
                         project_id, exc)
    return authenticated


def authenticate_webhook(client: LabelStudioClient, project_id: int, webhook_url: str, headers: dict, *,
                         wait_seconds: float = 30.0) -> bool:
    """Add ``headers`` to the project's webhook for this backend (Label Studio creates it just
    after the /setup that starts this, so wait for it).  True when the webhook carries them.

    Label Studio names the webhook after the URL the backend was connected with (``<URL>/webhook``):
    the URL /setup came to (``webhook_url``), or, where a proxy changes it (https outside, http here;
    a path prefix), the URL of the project's only ML backend."""
    deadline = time.monotonic() + wait_seconds

    def to(url: str) -> dict | None:
        return next((h for h in hooks if str(h.get("url", "")).rstrip("/") == url.rstrip("/")), None)

    while True:
        hooks = client.request("GET", "/api/webhooks/", params={"project": int(project_id)}) or []
        hook = to(webhook_url)
        if hook is None:
            backends = client.request("GET", "/api/ml", params={"project": int(project_id)}) or []
            if len(backends) == 1 and backends[0].get("url"):
                hook = to(str(backends[0]["url"]).rstrip("/") + "/webhook")
        if hook is not None:
            if any((hook.get("headers") or {}).get(k) != v for k, v in headers.items()):
                client.request("PATCH", f"/api/webhooks/{int(hook['id'])}/",
                               json={"headers": {**(hook.get("headers") or {}), **headers}})
                logger.info("project %d: webhook %s now authenticates to the backend", project_id, webhook_url)
            return True
        if time.monotonic() > deadline:
            logger.warning("project %d: no webhook to %s (nor to the project's only ML backend) in Label Studio "
                           "after %.0fs: annotations will not trigger training until the backend finds it at "
                           "Label Studio's next /setup call (open the project's Settings > Model page)",
                           project_id, webhook_url, wait_seconds)
            return False
        time.sleep(1.0)


def _skip_reason(action: str, data: dict, project_id: int, settings: Settings) -> str | None:
    """Why a training event needs no job, or None.

    * a skipped task (ANNOTATION_CREATED with was_cancelled) changes no label;
    * PROJECT_UPDATED is sent for every project change, including the backend's own
      PATCH of model_version after each training: it trains only when no version exists
      yet or the labelling config (classes, names) differs from the current version's.
    """
    annotation = data.get("annotation")
    if action == "ANNOTATION_CREATED" and isinstance(annotation, dict) and annotation.get("was_cancelled"):
        return "skipped task (was_cancelled): no label changed"
    if action == "PROJECT_UPDATED":
        store = ProjectStore(settings.model_dir, project_id)
        current = store.current_version()
        if current is None:
            return None
        project = data.get("project") if isinstance(data.get("project"), dict) else {}
        try:
            fingerprint = config_fingerprint(parse_label_config(project.get("label_config")))
        except LabelConfigError:
            return "labelling config not supported"
        if fingerprint == store.load_meta(current).get("config_fingerprint"):
            return "labelling config unchanged since the current model version"
    return None
