"""Keep a Label Studio project set up so that its label stream serves the suspects first.

Label Studio serves "Label All Tasks" by the PROJECT's sampling (the Data Manager drops a tab's
ordering from that request; ../shared/LABEL_STUDIO.md).  Under "Uncertainty sampling" it serves
the unlabelled task whose prediction of the project's ``model_version`` has the lowest score,
and falls back to random when no such prediction exists.  So the backend makes sure of three
things, when it is connected to a project and after each version it publishes:

* the sampling is "Uncertainty sampling" (unless ``ALR_SET_SAMPLING=false``: the user's choice
  is then kept and logged);
* the project's ``model_version`` names a version whose predictions cover every task it
  scored (it is PATCHed only after the push is complete and counted; on connection it is set
  back from the backend's title to the served version when that version's predictions are in);
* with labels taken from annotations, every task is "labelled" (its annotations reach the
  project's "annotations per task") and the stream is empty.  After each version, the
  ``ALR_REOPEN_SUSPECTS`` lowest-scored tasks without a trusted label are REOPENED: their own
  ``overlap`` is raised by one (``is_labeled`` false), the project's setting is left alone, so
  "Label All Tasks" serves exactly those, in score order, and the reviewer's annotation labels
  the task again.  Tasks reopened earlier that are no longer suspects get the project's overlap
  back.  (Measured in 1.23.2: raising the project's annotations per task instead makes Label
  Studio serve "breadth first", at random among the tasks with the most annotations, before any
  sampling: a fresh reviewer got the task ranked 119 of 120.);
* with ``ALR_CREATE_VIEW=true``, a Data Manager tab "Suspects first" ordered by prediction score
  (lowest first) is the project's first tab, for browsing (its "Label Tasks As Displayed" is no
  review queue: measured, it served the tasks ranked 23 and 114 of 120);
* Label Studio's record of the backend's version (what the Data Manager's prediction-score
  column counts) is refreshed after each published version.
"""
from __future__ import annotations

import logging

from .ls_client import LabelStudioClient
from .settings import Settings

logger = logging.getLogger(__name__)

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
REVIEW_VIEW_TITLE = "Suspects first"
REVIEW_VIEW_DATA = {"title": REVIEW_VIEW_TITLE, "ordering": ["tasks:predictions_score"],
                    "filters": {"conjunction": "and", "items": []}}


class IncompletePublish(RuntimeError):
    """Label Studio holds fewer predictions of a version than were pushed: not made current."""


def review_project_changes(project: dict, settings: Settings, *, served_version: str | None,
                           served_version_complete: bool) -> dict:
    """The fields to PATCH on ``project`` so that its label stream follows the scores."""
    changes: dict = {}
    if settings.set_sampling and project.get("sampling") != UNCERTAINTY_SAMPLING:
        changes["sampling"] = UNCERTAINTY_SAMPLING
    if served_version and served_version_complete and project.get("model_version") != served_version:
        changes["model_version"] = served_version
    return changes


def ensure_review_order(client: LabelStudioClient, project_id: int, settings: Settings, *,
                        served_version: str | None = None, expected_predictions: int | None = None) -> dict:
    """PATCH the project so that "Label All Tasks" serves the lowest scores first; returns the
    changes made.

    ``served_version`` is made the project's ``model_version`` only when Label Studio holds at
    least ``expected_predictions`` of its predictions (any number > 0 when None); otherwise
    :class:`IncompletePublish` is raised when ``expected_predictions`` was given (a publish),
    and the model_version is left alone on a mere connection.
    """
    project = client.get_project(project_id)
    complete = False
    if served_version:
        held = int((client.prediction_versions(project_id) or {}).get(served_version, 0))
        complete = held >= (expected_predictions or 1)
        if expected_predictions is not None and not complete:
            raise IncompletePublish(
                f"project {project_id}: Label Studio holds {held} predictions of {served_version}, "
                f"{expected_predictions} were pushed: model_version left at {project.get('model_version')!r}")
    if not settings.set_sampling and project.get("sampling") != UNCERTAINTY_SAMPLING:
        logger.info("project %d: sampling is %r and ALR_SET_SAMPLING=false: kept; \"Label All Tasks\" "
                    "will not follow the backend's scores (the Data Manager's sort by prediction score "
                    "still does)", project_id, project.get("sampling"))
    changes = review_project_changes(project, settings, served_version=served_version,
                                     served_version_complete=complete)
    if changes:
        client.patch_project(project_id, **changes)
        logger.info("project %d set up for review: %s", project_id,
                    ", ".join(f"{k}={v!r}" for k, v in changes.items()))
    if settings.create_view:
        ensure_review_view(client, project_id)
    return changes


def ensure_review_view(client: LabelStudioClient, project_id: int) -> int:
    """The project's "Suspects first" tab (made once), placed first; returns its id."""
    views = client.request("GET", "/api/dm/views/", params={"project": int(project_id)}) or []
    view = next((v for v in views if (v.get("data") or {}).get("title") == REVIEW_VIEW_TITLE), None)
    if view is None:
        view = client.request("POST", "/api/dm/views/", json={"project": int(project_id), "data": REVIEW_VIEW_DATA})
        logger.info("project %d: Data Manager tab %r created (ordered by prediction score)", project_id,
                    REVIEW_VIEW_TITLE)
    others = [v["id"] for v in views if v["id"] != view["id"]]
    if views and views[0]["id"] != view["id"]:
        client.request("POST", "/api/dm/views/order/", json={"project": int(project_id), "ids": [view["id"], *others]})
    return int(view["id"])


def refresh_backend_version(client: LabelStudioClient, project_id: int, version: str) -> None:
    """Make Label Studio hear the backend's new version.  The Data Manager's prediction-score
    column, and so the "Suspects first" tab and any sort by it, average only the predictions of
    the version each connected ML backend last reported from /setup, not the project's
    model_version (1.23.2, data_manager.managers.annotate_predictions_score); Label Studio's
    ``GET /api/ml?project=`` calls /setup on each of them and stores the answer."""
    backends = client.request("GET", "/api/ml", params={"project": int(project_id)}) or []
    if not any(b.get("model_version") == version for b in backends):
        logger.warning("project %d: no connected ML backend reports version %s after /setup: the Data Manager's "
                       "prediction-score sort uses %s", project_id, version,
                       sorted({str(b.get('model_version')) for b in backends}) or "no backend")


def overlap_changes(tasks: list[dict], records: dict[int, dict], *, maximum_annotations: int,
                    reopen: int) -> dict[int, dict]:
    """The task PATCHes that leave exactly the ``reopen`` lowest-scored untrusted tasks of
    ``records`` open for one more annotation (``{task id: {"overlap", "is_labeled"}}``).

    A task counts as reopened by the backend when its overlap exceeds the project's
    ``maximum_annotations``; reopening sets it to the task's annotations + 1, closing sets the
    project's value back (``is_labeled`` as Label Studio computes it)."""
    wanted = sorted((tid for tid, rec in records.items() if not rec.get("trusted")),
                    key=lambda tid: records[tid]["score"])[:max(reopen, 0)]
    wanted = set(wanted)
    changes = {}
    for task in tasks:
        tid, done = int(task["id"]), int(task.get("total_annotations") or 0)
        overlap = int(task.get("overlap") or 1)
        if tid in wanted and task.get("is_labeled"):
            changes[tid] = {"overlap": done + 1, "is_labeled": False}
        elif tid not in wanted and overlap > maximum_annotations:
            changes[tid] = {"overlap": maximum_annotations, "is_labeled": done >= maximum_annotations}
    return changes


def reopen_suspects(client: LabelStudioClient, project_id: int, records: dict[int, dict],
                    settings: Settings) -> int:
    """Apply :func:`overlap_changes` to the project (labels from annotations only); returns how
    many tasks are open for review."""
    project = client.get_project(project_id)
    tasks = list(client.iter_tasks(project_id))
    changes = overlap_changes(tasks, records, maximum_annotations=int(project.get("maximum_annotations") or 1),
                              reopen=settings.reopen_suspects)
    for tid, fields in changes.items():     # absolute values: safe to send again after a blip
        client.request("PATCH", f"/api/tasks/{tid}", json=fields, repeatable=True)
    reopened = sum(not f["is_labeled"] for f in changes.values())
    open_now = sum(1 for t in tasks if not t.get("is_labeled") and int(t["id"]) not in changes) + reopened
    logger.info("project %d: %d suspects reopened for review, %d closed again; %d tasks in the label stream",
                project_id, reopened, len(changes) - reopened, open_now)
    return open_now
