"""Reconciliation: events that never arrived still reach a model.

Label Studio sends each webhook once, with a 1 s timeout and no retry: while redis is down an
annotation's event is answered 503, and while the backend is down it is not answered at all.
Every ``ALR_RECONCILE_SECONDS`` the web app queues a training for

* every project with an event the web app answered 503 (it recorded it in MODEL_DIR:
  :meth:`ProjectStore.record_refused_event`); the job that reads the project's tasks after the
  event forgets it.  This catches every refused event, a project's first START_TRAINING included
  (a project without a version has no state to compare), and needs nothing of Label Studio;
* every project with a model version whose annotation state in Label Studio differs from the
  state the version was trained from (``meta.json``: ``annotation_state``): the events that
  never reached the web app (sent while it was down), and the changes Label Studio sends no
  webhook for (a task's data edited: its given label, its image; tasks imported).  The state is
  the project's annotation counts (``GET /api/projects/<id>``: annotations created, skipped,
  deleted), how many annotations chose each label (``GET /api/projects/<id>/summary/``:
  ``created_labels``, which moves when an annotation is edited to another label), and the most
  recently updated task with its ``updated_at`` (one task of ``GET /api/tasks`` ordered by
  ``-tasks:updated_at``), which moves on every edit of a task's data or annotations, two edits
  that swap two labels included, and not on the backend's own prediction pushes.  A part Label
  Studio does not answer is left out of the comparison.
"""
from __future__ import annotations

import logging
import os
import threading

from .ls_client import LabelStudioClient, LabelStudioError
from .settings import Settings
from .store import ProjectStore

logger = logging.getLogger(__name__)

#: the project fields whose change means "annotations changed"
COUNT_FIELDS = ("total_annotations_number", "skipped_annotations_number", "num_tasks_with_annotations")


def annotation_state(client: LabelStudioClient, project_id: int, project: dict | None = None) -> dict:
    """What reconciliation compares: the project's annotation counts, its annotations per label and
    its most recently updated task (each None where Label Studio does not answer it).
    ``project``: the project as just fetched (GET /api/projects/<id>), to save that call."""
    project = client.get_project(project_id) if project is None else project
    summary = _optional(project_id, "label counts of the project summary", client.get_project_summary)
    return {"counts": [project.get(field) for field in COUNT_FIELDS],
            "labels": summary.get("created_labels") if isinstance(summary, dict) else None,
            "newest_task_update": _optional(project_id, "most recently updated task", client.newest_task_update)}


def _optional(project_id: int, what: str, call):
    try:
        return call(project_id)
    except LabelStudioError as exc:
        # the counts still see annotations created and deleted; what this part sees waits for the next event
        (logger.debug if exc.status == 404 else logger.warning)(
            "project %d: Label Studio did not give the %s (%s): the reconciliation compares without it",
            project_id, what, exc)
        return None


def changed_since(trained: dict, now: dict) -> bool:
    """Whether the annotations or tasks moved between two :func:`annotation_state`; each part but the
    counts is compared only where both states have it (a version from before it was recorded has not)."""
    if trained["counts"] != now["counts"]:
        return True
    return any(trained.get(part) is not None and now.get(part) is not None and trained[part] != now[part]
               for part in ("labels", "newest_task_update"))


def project_stores(settings: Settings) -> list[ProjectStore]:
    """The projects in MODEL_DIR (those in ALR_PROJECTS when set), by id."""
    if not os.path.isdir(settings.model_dir):
        return []
    ids = sorted(int(name[8:]) for name in os.listdir(settings.model_dir)
                 if name.startswith("project-") and name[8:].isdigit())
    return [ProjectStore(settings.model_dir, p) for p in ids if settings.project_allowed(p)]


def served_projects(settings: Settings) -> list[int]:
    """Projects with a model version in MODEL_DIR (and in ALR_PROJECTS when set)."""
    return [store.project_id for store in project_stores(settings) if store.current_version()]


def projects_with_refused_events(settings: Settings) -> dict[int, int]:
    """Projects with webhook events the training queue refused and no job has read since: {id: how many}."""
    refused = {store.project_id: len(store.refused_events()) for store in project_stores(settings)}
    return {p: n for p, n in refused.items() if n}


def stale_projects(client: LabelStudioClient, settings: Settings, *, refused: set[int] | None = None) -> list[int]:
    """Projects whose annotations changed since their current version was trained.

    A project Label Studio refuses (deleted there, or out of the API key's reach) is left out with a
    warning, the first time only when the caller keeps ``refused`` (the projects warned about), and
    the others are still compared; Label Studio away (no answer, 5xx) raises, since every project
    would wait for it in turn."""
    refused = set() if refused is None else refused
    stale = []
    for p in served_projects(settings):
        store = ProjectStore(settings.model_dir, p)
        meta = store.load_meta(store.current_version())
        trained = meta.get("annotation_state")
        if trained is None and meta.get("annotation_counts") is not None:     # a version from before labels
            trained = {"counts": meta["annotation_counts"], "labels": None}
        if trained is None:
            continue
        try:
            now = annotation_state(client, p)
        except LabelStudioError as exc:
            if exc.transient:
                raise
            if p not in refused:
                logger.warning("project %d: Label Studio refuses it (%s), so its changes are not reconciled; if the "
                               "project was deleted, delete %s to stop this, else give LABEL_STUDIO_API_KEY access",
                               p, exc, store.root)
            refused.add(p)
            continue
        refused.discard(p)
        if changed_since(trained, now):
            stale.append(p)
    return stale


class Reconciler:
    """A thread of the web app that queues a training for every stale project each period."""

    def __init__(self, queue, settings: Settings):
        self.queue, self.settings = queue, settings
        self.client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key,
                                        timeout=settings.request_timeout)
        self._stop = threading.Event()
        self._refused: set[int] = set()      # projects Label Studio refuses, warned about once
        self.thread = threading.Thread(target=self._run, name="alr-reconcile", daemon=True)

    def start(self) -> "Reconciler":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check_once(self) -> list[int]:
        """Queue a training for each project that needs one; the projects queued.  The refused events
        come first: they need nothing of Label Studio, which may be what is away."""
        queued = []
        for p, count in projects_with_refused_events(self.settings).items():
            if self._queue(p):
                logger.warning("project %d: %d webhook event(s) were refused while the training queue was down: "
                               "queued a training for them", p, count)
                queued.append(p)
        for p in stale_projects(self.client, self.settings, refused=self._refused):
            if p not in queued and self._queue(p):
                logger.warning("project %d: its annotations changed since the current model version but no event "
                               "reached the backend (sent while the backend was down?): queued a training", p)
                queued.append(p)
        return queued

    def _queue(self, project_id: int) -> bool:
        if self.queue.project_status(project_id).get("pending_job"):
            return False        # a job is coming anyway, and it reads the tasks after every event so far
        job = self.queue.request_training(project_id, "RECONCILE")
        logger.info("project %d: reconciliation queued %s", project_id, job["job_id"])
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reconcile_seconds):
            try:
                self.check_once()
            except Exception as exc:      # noqa: BLE001 - Label Studio or redis away: next period
                logger.info("reconciliation skipped this period: %s", exc)
