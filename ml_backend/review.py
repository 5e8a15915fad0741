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
* with ``ALR_REVIEW_OVERLAP=true`` and labels taken from annotations, the project allows 2
  annotations per task, so that tasks whose given label is an annotation are not "labelled"
  and come back to the Data Manager's queue, the reviewer's annotation becoming the trusted
  label.  Measured in 1.23.2: with more than one annotation per task, "Label All Tasks" serves
  such tasks "breadth first" (at random among the tasks with the most annotations) BEFORE any
  sampling, so there the order comes from the review tab below;
* with ``ALR_CREATE_VIEW=true``, a Data Manager tab "Suspects first" ordered by prediction score
  (lowest first) is the project's first tab; its "Label Tasks As Displayed" serves the top
  unlabelled suspect (to every reviewer alike: Label Studio checks no other user's lock there).
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
REVIEW_OVERLAP = 2          # the given label's annotation + the reviewer's


class IncompletePublish(RuntimeError):
    """Label Studio holds fewer predictions of a version than were pushed: not made current."""


def review_project_changes(project: dict, settings: Settings, *, served_version: str | None,
                           served_version_complete: bool) -> dict:
    """The fields to PATCH on ``project`` so that its label stream follows the scores."""
    changes: dict = {}
    if settings.set_sampling and project.get("sampling") != UNCERTAINTY_SAMPLING:
        changes["sampling"] = UNCERTAINTY_SAMPLING
    if (settings.review_overlap and settings.label_source == "annotation"
            and int(project.get("maximum_annotations") or 1) < REVIEW_OVERLAP):
        changes["maximum_annotations"] = REVIEW_OVERLAP
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
