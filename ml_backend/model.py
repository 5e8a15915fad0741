"""The model class Label Studio talks to (label-studio-ml 1.0.9 API).

``predict`` answers from the current model version's cached per-task results (written by
the training job, loaded once per version); tasks the model has never seen are scored by a
forward pass (``engine.score_images``) and remembered for that version.
"""
from __future__ import annotations

import logging
import threading

import numpy as np
from label_studio_ml.model import LabelStudioMLBase

from .images import ImageCache, cache_task_images
from .labelconfig import label_index, label_key, parse_label_config
from .labels import extract_task_labels
from .ls_client import LabelStudioClient, LabelStudioError
from .settings import Settings
from .store import ResultsCache
from .training import build_records, expert_ids, load_engine, prediction_for, run_training_job

logger = logging.getLogger(__name__)

UNTRAINED_VERSION = "alr-untrained"


def parse_project_id(project) -> int | None:
    """Project id from Label Studio's '<id>.<created epoch>' string, an int or {'id': ...}."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or isinstance(project, bool):
        return None
    try:
        return int(str(project).split(".")[0])
    except ValueError:
        return None


class NoiseRobustImageClassifier(LabelStudioMLBase):
    """Suggests a label per image and ranks tasks for review (lower score = review sooner).

    Parameters
    ----------
    label_config : the project's labelling config (one Image + one single-choice Choices);
        a LabelConfigError (ValueError) is raised for anything else.
    project : Label Studio's project string ('<id>.<epoch>') or id.
    settings : backend settings (default: Settings.from_env()).
    results_cache : shared per-app cache of version results.
    """

    def __init__(self, label_config=None, train_output=None, *, project=None,
                 settings: Settings | None = None, results_cache: ResultsCache | None = None,
                 **kwargs):
        self.info = parse_label_config(label_config)   # first: the base class's parser fails on bad XML
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)   # with a bare error
        self.settings = settings or Settings.from_env()
        self.project_id = parse_project_id(project)
        self.results_cache = results_cache or ResultsCache(self.settings.model_dir)
        self._unseen_lock = threading.Lock()
        self._unseen: dict[tuple[str, int], dict] = {}   # (version, task id) -> record

    @property
    def model_version(self) -> str:
        if self.project_id is None:
            return UNTRAINED_VERSION
        results = self.results_cache.get(self.project_id)
        return results.version if results else UNTRAINED_VERSION

    # -- prediction -------------------------------------------------------------------
    def predict(self, tasks, **kwargs) -> list[dict]:
        """One prediction per task, in order (Label Studio drops an answer of another length)."""
        tasks = list(tasks or [])
        results = self.results_cache.get(self.project_id) if self.project_id is not None else None
        if results is None:
            return [{"result": [], "model_version": UNTRAINED_VERSION} for _ in tasks]
        version = results.version
        records: list[dict | None] = []
        unseen: list[tuple[int, dict]] = []
        for pos, task in enumerate(tasks):
            tid = task.get("id") if isinstance(task, dict) else None
            rec = results.items.get(int(tid)) if isinstance(tid, int) else None
            if rec is None and isinstance(tid, int):
                with self._unseen_lock:
                    rec = self._unseen.get((version, tid))
            if rec is None and isinstance(task, dict):
                unseen.append((pos, task))
            records.append(rec)
        if unseen:
            scored = self._score_unseen([t for _, t in unseen], results)
            for (pos, task), rec in zip(unseen, scored):
                records[pos] = rec
        out = []
        for rec in records:
            if rec is None:
                out.append({"result": [], "model_version": version})
            else:
                out.append(prediction_for(rec, self.info, version, preselect=self.settings.preselect))
        return out

    def _score_unseen(self, tasks: list[dict], results) -> list[dict | None]:
        """Forward pass for tasks the current version has not seen; None where impossible."""
        limit = self.settings.max_unseen_per_request
        if len(tasks) > limit:
            logger.warning("/predict: %d unseen tasks, scoring the first %d (ALR_MAX_UNSEEN_PER_REQUEST)",
                           len(tasks), limit)
        todo = tasks[:limit]
        out: list[dict | None] = [None] * len(tasks)
        try:
            engine = load_engine()
        except ImportError:
            logger.exception("the engine (model.engine) cannot be imported: is the project installed?")
            return out
        url = self.settings.label_studio_url or self.hostname
        key = self.settings.label_studio_api_key or self.access_token
        cache = ImageCache(self.settings.cache_dir,
                           LabelStudioClient(url, key, timeout=self.settings.request_timeout,
                                             image_hosts=self.settings.image_hosts),
                           max_cache_bytes=self.settings.image_cache_max_mb * 2**20,
                           protect_seconds=self.settings.job_timeout, attempts=1)   # Label Studio asks again
        load_image = self.settings.image_loader(engine.load_image)
        try:
            experts = expert_ids(cache.client, self.settings)      # as the training job counts them
        except LabelStudioError as exc:
            logger.warning("/predict: the experts' e-mails cannot be resolved (%s): ALR_EXPERT_USER_IDS only", exc)
            experts = self.settings.expert_user_ids
        labelled, given = [], {}
        for i, task in enumerate(todo):
            try:
                given[int(task["id"])] = extract_task_labels(
                    task, self.info, label_source=self.settings.label_source, experts=experts,
                    trust_ground_truth=self.settings.trust_ground_truth, label_field=self.settings.label_field).noisy
                labelled.append(i)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("/predict: task %s skipped: %s", task.get("id"), exc)
        # the files as the training job reads them, so that fast mode keys their embeddings by the same
        # bytes (the next training finds them) and downloads run in parallel
        ok, paths, _ = cache_task_images([todo[i] for i in labelled], self.info.image_field, cache, load_image,
                                         image_size=self.settings.image_size, channels=self.settings.channels)
        if not ok:
            return out
        pos_ok = [labelled[j] for j in ok]
        ids = [int(todo[i]["id"]) for i in pos_ok]
        if tuple(results.class_names) != tuple(self.info.class_names):
            # the labelling config changed since this version was trained (its retraining is coming):
            # a given label is the version's class of that name; one the version does not know is none
            in_version = label_index(results.class_names)
            given = {tid: None if g is None else in_version.get(label_key(self.info.class_names[g]))
                     for tid, g in given.items()}
        labels = np.array([-1 if given[tid] is None else given[tid] for tid in ids], dtype=np.int64)
        images = engine.FileImages(paths, image_size=self.settings.image_size, channels=self.settings.channels,
                                   resize=self.settings.resize)
        # decoded in this process: forking DataLoader workers from the threaded web app for a few images
        # costs more than it saves and is not safe
        scored = engine.score_images(str(results.checkpoint), images, labels, num_workers=0)
        scored.sample_ids = np.array(ids, dtype=np.int64)
        recs = build_records(scored, class_names=results.class_names, given=given, trusted={})
        with self._unseen_lock:
            for tid, rec in recs.items():
                self._unseen[(results.version, tid)] = rec
        for i, tid in zip(pos_ok, ids):
            out[i] = recs[tid]
        return out

    # -- training (label-studio-ml's own path; the app enqueues instead) --------------
    def fit(self, tasks, workdir=None, **kwargs):
        """Train synchronously (used only when label-studio-ml's job managers call fit)."""
        if self.project_id is None:
            raise ValueError("fit() needs the project id")
        return run_training_job(self.project_id, settings=self.settings, reason=kwargs.get("event", "fit"))
