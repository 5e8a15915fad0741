"""The label-quality report of a project (GET /report?project=<id>): the current version's
figures through :func:`selection.report.label_quality_report`, thumbnails and links pointing at
Label Studio (the reviewer's browser loads them with its own Label Studio session)."""
from __future__ import annotations

import logging

import numpy as np

from selection.report import VersionProgress, label_quality_report, suspect_order

from .images import task_image_url
from .labelconfig import parse_label_config
from .ls_client import LabelStudioClient, LabelStudioError
from .settings import Settings
from .store import ProjectStore, VersionResults

logger = logging.getLogger(__name__)

TOP = 24
HISTORY = 20        # versions in the progress table (each is one results file to read)


def version_arrays(results: VersionResults) -> dict[str, np.ndarray]:
    """The per-task arrays of a version (task ids ascending): given label index (-1: none),
    suggested index, P(label wrong), priority (higher = look first) and the trusted mask."""
    index = {name: i for i, name in enumerate(results.class_names)}
    ids = np.array(sorted(results.items), dtype=np.int64)
    records = [results.items[int(t)] for t in ids]
    return {
        "sample_ids": ids,
        "labels": np.array([index.get(r.get("given"), -1) for r in records], dtype=np.int64),
        "suggested": np.array([index[r["suggested"]] for r in records], dtype=np.int64),
        "prob_label_wrong": np.array([r.get("prob_label_wrong") or 0.0 for r in records], dtype=float),
        "priority": -np.array([r["score"] for r in records], dtype=float),      # Label Studio: lower score first
        "trusted_mask": np.array([bool(r.get("trusted")) for r in records], dtype=bool),
    }


def version_progress(results: VersionResults) -> VersionProgress:
    """Relabels in a version, how many changed the given label, the errors it estimates are left,
    and whether it fine-tuned the version before or trained from scratch (and why, after a first one)."""
    a = version_arrays(results)
    trained = results.meta.get("trained_task_labels") or {}
    trusted_ids = a["sample_ids"][a["trusted_mask"]]
    given = dict(zip(a["sample_ids"].tolist(), a["labels"].tolist()))
    changed = sum(1 for t in trusted_ids.tolist() if str(t) in trained and trained[str(t)] != given[t])
    untrusted = ~a["trusted_mask"] & (a["labels"] >= 0)
    how = {1: "from scratch", 2: "fine-tuned"}.get(results.meta.get("phase"), "")
    return VersionProgress(results.version, int(a["trusted_mask"].sum()), changed,
                           float(a["prob_label_wrong"][untrusted].sum()), trained=how,
                           trained_because=str(results.meta.get("phase_reason") or ""))


def project_report(project_id: int, results: VersionResults, settings: Settings) -> str:
    store = ProjectStore(settings.model_dir, project_id)
    history = []
    for version in store.list_versions()[-HISTORY:]:
        try:
            history.append(version_progress(results if version == results.version else store.load(version)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("project %d: version %s left out of the report's progress (%s)", project_id, version, exc)
    a = version_arrays(results)
    public = settings.label_studio_public_url or settings.label_studio_url
    links = [f"{public}/projects/{project_id}/data?task={t}" for t in a["sample_ids"].tolist()]
    thumbnails: list[str | None] = [None] * len(links)
    top = suspect_order(a["labels"], a["priority"], trusted_mask=a["trusted_mask"], top=TOP)
    subtitle = f"project {project_id}, model version {results.version}"
    try:
        client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key,
                                   timeout=settings.request_timeout)
        field = parse_label_config(client.get_project(project_id).get("label_config")).image_field
        for i in top.tolist():
            url = task_image_url(client.request("GET", f"/api/tasks/{int(a['sample_ids'][i])}"), field)
            if isinstance(url, str):
                thumbnails[i] = url if url.startswith(("http://", "https://")) else public + "/" + url.lstrip("/")
    except (LabelStudioError, ValueError, KeyError) as exc:
        logger.warning("project %d: the report has no thumbnails: Label Studio could not be asked (%s)", project_id, exc)
        subtitle += " (no thumbnails: Label Studio could not be reached)"
    return label_quality_report(a["labels"], a["suggested"], a["prob_label_wrong"], priority=a["priority"],
                                trusted_mask=a["trusted_mask"], sample_ids=a["sample_ids"],
                                class_names=results.class_names, thumbnails=thumbnails, links=links,
                                history=history, title="Label quality", subtitle=subtitle, top=TOP)
