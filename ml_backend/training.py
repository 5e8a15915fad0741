"""The training job: Label Studio -> images -> engine -> new model version -> predictions.

``train_project_job(project_id, reason)`` is the rq entry point (arguments are plain ids and
strings; settings come from the worker's environment).  ``run_training_job`` does the work
and is the only place that calls the engine (``model.engine.train_and_score``).

Two ways to train, the same records after: in the worker's own process (default), or, when
ALR_GPUS_PER_JOB (or ALR_TRAIN_PROCESSES) > 1, ``torchrun -m model.train`` as a subprocess
with one process per GPU (DDP; gloo ranks on a CPU), which hands back ``scores.npz``.
Large projects (more than ALR_STREAM_ABOVE_TASKS tasks) are not held in memory: their images
are decoded once into a file that training streams (``model.sources.DecodedImages``), or, where
the disk lacks room, streamed from the image cache's files (``model.sources.FileImages``).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from model.processes import kill_process_tree

from .images import ImageCache, ImageHostDown, cache_task_images, load_task_images
from .labelconfig import LabelConfigInfo, parse_label_config
from .labels import extract_labels
from .ls_client import LabelStudioClient, LabelStudioError
from .reconcile import annotation_state
from .review import ensure_review_order, refresh_backend_version, reopen_suspects
from .settings import Settings
from .store import ProjectStore, atomic_write_json

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


def load_engine():
    """model.engine, imported when a job or an unseen task needs it (torch is heavy to import)."""
    return importlib.import_module("model.engine")


#: the settings that shape a version's model or predictions: a change in one makes the next job retrain
MODEL_SETTINGS = ("arch", "pretrained_weights", "frozen_backbone", "image_size", "resize", "channels", "epochs",
                  "finetune_epochs", "batch_size", "forget_rate", "class_forget_rates", "seed", "label_source",
                  "label_field", "preselect")
#: how a job ran, recorded in meta.json beside MODEL_SETTINGS but no reason to retrain
RESOURCE_SETTINGS = ("gpus_per_job", "train_processes", "stream_above_tasks", "dataloader_workers")
#: reasons that train even when nothing a training reads has changed (a person asked for it)
FORCED_REASONS = frozenset({"TRAIN", "START_TRAINING"})
#: tries of each repeatable Label Studio API call of a job, 1 s then 2 s apart (LabelStudioClient's attempts): a
#: proxy's 502 or a Label Studio restart of a few seconds does not throw away a listing of 20,000 tasks
JOB_API_ATTEMPTS = 3


def training_inputs(tasks: list[dict], labels: list, info: LabelConfigInfo, settings: Settings) -> str:
    """A digest of everything a training reads: each task's id, image reference, given and trusted
    label and team agreement, the labelling config and MODEL_SETTINGS.  Two jobs with the same
    digest would train on the same inputs."""
    rows = [[int(task["id"]), str(task.get("data", {}).get(info.image_field)), tl.noisy, tl.trusted, tl.agreement]
            for task, tl in zip(tasks, labels)]
    used = {name: getattr(settings, name) for name in MODEL_SETTINGS}
    raw = json.dumps([sorted(rows), config_fingerprint(info), used], default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


def config_fingerprint(info: LabelConfigInfo) -> str:
    """What must not change between a checkpoint and the project for fine-tuning to apply."""
    raw = json.dumps([info.from_name, info.to_name, info.image_field, list(info.class_names)])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def engine_config(engine, settings: Settings, *, class_forget_rates: tuple[float, ...] | None = None,
                  streaming: bool = False):
    """The EngineConfig of a job; DataLoader workers only matter (and are only set) when streaming.
    ``class_forget_rates``: Settings.class_forget_rates_for(the project's labels)."""
    extra = {"num_workers": settings.dataloader_workers} if streaming else {}
    return engine.EngineConfig(arch=settings.arch, image_size=settings.image_size, resize=settings.resize,
                               pretrained_weights=settings.pretrained_weights or None,
                               frozen_backbone=settings.frozen_backbone,
                               embedding_cache_dir=settings.embedding_cache_dir if settings.frozen_backbone else None,
                               epochs=settings.epochs, finetune_epochs=settings.finetune_epochs,
                               batch_size=settings.batch_size, forget_rate=settings.forget_rate,
                               class_forget_rates=class_forget_rates, seed=settings.seed, **extra)


class TrainingProcessError(RuntimeError):
    """The torchrun training subprocess failed or ran out of time (the message has its last output)."""


class SupersededError(RuntimeError):
    """The job lost its project to another job (its running lock lapsed while redis was away and the
    other took it): stopped mid-training, or, found only at publish time (``may_publish`` said no),
    its version stays on disk unpublished (a later job on the same inputs publishes it, no training)."""


_EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)")


def train_with_torchrun(images, *, labels: np.ndarray, sample_ids: np.ndarray, trusted_mask: np.ndarray,
                        class_names: list[str], config, previous_checkpoint, checkpoint_path: Path, work_dir: Path,
                        processes: int, timeout: float, progress: Progress, stage: str) -> SimpleNamespace:
    """Phase 1 / Phase 2 in ``processes`` torchrun ranks (``python -m model.train``); the result
    read back from its scores.npz carries the fields :func:`build_records` uses.

    ``images``: (N, H, W, C) uint8, copied into ``work_dir/job.npz``; or a
    ``model.sources.DecodedImages`` / ``FileImages``, of which only the file names go there (each
    rank streams them).  The log lines of rank 0 go into this job's log; the subprocess group is
    killed after ``timeout`` seconds or when this job is interrupted.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"labels_noisy": np.asarray(labels, np.int64), "sample_ids": np.asarray(sample_ids, np.int64),
              "trusted_mask": np.asarray(trusted_mask, bool), "class_names": np.array(class_names, dtype=str)}
    engine = load_engine()
    if isinstance(images, engine.DecodedImages):
        arrays.update(decoded_images=np.array(images.path), decoded_shape=np.array(images.shape, np.int64),
                      decoded_rows=images.rows)
    elif isinstance(images, engine.FileImages):
        arrays.update(image_paths=np.array(images.paths, dtype=str), channels=np.int64(images.channels))
    else:
        arrays["images"] = np.asarray(images)
    np.savez(work_dir / "job.npz", **arrays)
    (work_dir / "config.json").write_text(json.dumps(config.to_dict()))
    out = work_dir / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "model.train", "--npz", str(work_dir / "job.npz"), "--out", str(out),
               "--config-json", str(work_dir / "config.json"), "--checkpoint", str(checkpoint_path),
               "--exit-with-pid", str(os.getpid())]      # a job killed with SIGKILL leaves no rank behind
    if previous_checkpoint is not None:
        command += ["--previous-checkpoint", str(previous_checkpoint)]
    model_root = str(Path(importlib.util.find_spec("model").origin).resolve().parents[1])
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1",       # line-by-line logs, no progress bars
               PYTHONPATH=os.pathsep.join(p for p in (model_root, env.get("PYTHONPATH")) if p))
    logger.info("training with torchrun, %d processes: %s", processes, " ".join(command))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill():
        if proc.poll() is None:
            kill_process_tree(proc.pid)

    def on_timeout():
        timed_out.set()
        kill()

    timer = threading.Timer(max(float(timeout), 1.0), on_timeout)
    timer.daemon = True
    timer.start()
    tail: deque[str] = deque(maxlen=40)
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            logger.info("torchrun: %s", line)
            m = _EPOCH_LINE.search(line)
            if m:
                progress(stage, int(m.group(1)) / max(int(m.group(2)), 1))
        returncode = proc.wait()
    finally:
        timer.cancel()
        kill()                    # interrupted (rq timeout, shutdown): leave no ranks behind
        proc.stdout.close()
    if timed_out.is_set():
        raise TrainingProcessError(f"torchrun training did not finish within {timeout:.0f} s (the job timeout, "
                                   "ALR_JOB_TIMEOUT) and was killed; last output:\n" + "\n".join(tail))
    if returncode != 0:
        raise TrainingProcessError(f"torchrun training failed with exit code {returncode}; last output:\n"
                                   + "\n".join(tail))
    with np.load(out / "scores.npz") as scores:
        result = SimpleNamespace(sample_ids=scores["sample_ids"], predicted_labels=scores["predicted_labels"],
                                 ls_score=scores["ls_score"], prob_label_wrong=scores["prob_label_wrong"],
                                 loss=scores["loss"], vog_scores=scores["vog"], priority=scores["priority"],
                                 lnl_clean_mask=scores["lnl_clean_mask"], phase=int(scores["phase"]),
                                 phase_reason=str(scores["phase_reason"]))
    if not np.array_equal(result.sample_ids, sample_ids):
        raise TrainingProcessError("torchrun's scores.npz does not hold the job's samples in order")
    shutil.rmtree(work_dir, ignore_errors=True)      # the arrays were a copy; keep the version small
    return result


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def expert_ids(client: LabelStudioClient, settings: Settings) -> frozenset[int]:
    """The user ids whose annotations are trusted: ALR_EXPERT_USER_IDS plus the ids of the
    ALR_EXPERT_EMAILS users (one GET /api/users/ per job); an unknown e-mail is logged."""
    ids = set(settings.expert_user_ids)
    if settings.expert_emails:
        users = client.request("GET", "/api/users/") or []
        by_email = {str(u.get("email", "")).lower(): int(u["id"]) for u in users if "id" in u}
        missing = sorted(settings.expert_emails - set(by_email))
        if missing:
            logger.warning("ALR_EXPERT_EMAILS names no Label Studio user for %s: their annotations are not trusted",
                           missing)
        ids |= {by_email[e] for e in settings.expert_emails if e in by_email}
    return frozenset(ids)


def build_records(result, *, class_names: list[str], given: dict[int, int | None],
                  trusted: dict[int, bool], agreement: dict[int, float | None] | None = None) -> dict[int, dict]:
    """Per-task records /predict answers from (JSON-ready), keyed by task id."""
    out = {}
    agreement = agreement or {}
    for i, tid in enumerate(np.asarray(result.sample_ids).tolist()):
        g = given.get(int(tid))
        out[int(tid)] = {
            "agreement": agreement.get(int(tid)),
            "suggested": class_names[int(result.predicted_labels[i])],
            "given": class_names[g] if g is not None else None,
            "trusted": bool(trusted.get(int(tid), False)),
            "score": float(result.ls_score[i]),
            "prob_label_wrong": _num(result.prob_label_wrong[i]),
            "loss": _num(result.loss[i]),
            "vog": _num(result.vog_scores[i]),
            "priority": _num(result.priority[i]),
        }
    return out


#: which label a prediction pre-selects in the labelling view (ALR_PRESELECT)
PRESELECT = {"suggested": lambda record: record["suggested"], "given": lambda record: record["given"],
             "none": lambda record: None}


def prediction_for(record: dict, info: LabelConfigInfo, version: str, *, preselect: str = "suggested") -> dict:
    """One Label Studio prediction (result, score, model_version) from a task record.

    Label Studio shows a prediction as a pre-annotation: the label chosen by ``preselect``
    ("suggested": the model's, "given": the task's current label, "none": nothing) arrives
    pre-selected, so a Submit without a click accepts it.  The per-task figures ride along
    in the Choices region's ``meta`` (``meta.text`` is shown with the region); with "none"
    there is no region and only the score orders the tasks.
    """
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    choice = PRESELECT[preselect](record)
    index = info.index_of(choice)
    if index is None:     # nothing to pre-select, or a label the config no longer has (it changed since)
        return {"result": [], "score": record["score"], "model_version": version}
    choice = info.class_names[index]       # as the config spells it
    text = (f"given: {record['given']}{' (trusted)' if record['trusted'] else ''}; "
            f"suggested: {record['suggested']}; P(label wrong): {fmt(record['prob_label_wrong'], '.3f')}; "
            f"loss: {fmt(record['loss'], '.3f')}; VoG: {fmt(record['vog'], '.3g')}")
    region = {
        "from_name": info.from_name, "to_name": info.to_name, "type": "choices",
        "value": {"choices": [choice]},
        "meta": {"text": [text], "given_label": record["given"], "suggested_label": record["suggested"],
                 "prob_label_wrong": record["prob_label_wrong"], "loss": record["loss"],
                 "vog": record["vog"], "trusted": record["trusted"], "agreement": record.get("agreement")},
    }
    return {"result": [region], "score": record["score"], "model_version": version}


class _JobProgress:
    """Progress into rq job.meta (throttled) and the log. Once ``lost`` is set (the job's running
    lock went to another job), the next call raises :class:`SupersededError`: the job stops
    training rather than compete with the job that has its project (two trainings on one GPU)."""

    def __init__(self, job=None, *, lost: threading.Event | None = None):
        self.job = job
        self.lost = lost
        self._last = 0.0
        self._stage = None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.lost is not None and self.lost.is_set():
            raise SupersededError(f"another job took the project over (its running lock lapsed while redis was "
                                  f"away): stopped at '{self._stage}', nothing kept")
        now = time.monotonic()
        if stage != self._stage:
            logger.info("training progress: %s", stage)
        if self.job is not None and (stage != self._stage or now - self._last > 1.0 or fraction >= 1.0):
            self.job.meta["progress"] = {"stage": stage, "fraction": round(float(fraction), 4)}
            try:
                self.job.save_meta()
            except Exception:      # progress is best effort; never fail the job for it
                logger.debug("could not save job meta", exc_info=True)
            self._last = now
        self._stage = stage


#: images whose host failed that a training may skip: this share of the project's tasks, at most UNREACHABLE_MAX
UNREACHABLE_SHARE = 0.02
UNREACHABLE_MAX = 20


def unreachable_allowance(num_tasks: int) -> int:
    """How many images whose host did not answer (after the cache's retries) a training may skip.

    A few such images are a flaky file; more are a host that is down, and training on the rest
    would publish a version that lacks those tasks (no prediction, so the label stream loses
    their order) and their experts' labels.  Beyond the allowance the job fails and the served
    version stays: 2% of the tasks, never more than 20, none for a project under 50 tasks."""
    return min(UNREACHABLE_MAX, int(UNREACHABLE_SHARE * num_tasks))


def run_training_job(project_id: int, *, settings: Settings | None = None, reason: str = "",
                     progress: Progress | None = None, client: LabelStudioClient | None = None,
                     may_publish: Callable[[], bool] | None = None,
                     newer_job_queued: Callable[[], bool] | None = None) -> dict:
    """Train (Phase 1 first, Phase 2 fine-tuning after), publish a version, push predictions.

    Returns a summary dict (also the rq job result).  Raises on errors that must fail the
    job (Label Studio unreachable, bad key, bad config); a half-written version is removed.
    ``may_publish`` is asked right before a version is published (the rq job: does it still hold
    its project's running lock?); False raises :class:`SupersededError`.  ``newer_job_queued`` is
    asked before older versions' predictions are deleted (the rq job: did events come meanwhile?);
    True leaves them to that job (:func:`prune_unless_a_newer_job_is_queued`).
    """
    settings = settings or Settings.from_env()
    progress = progress or _JobProgress()
    t0 = time.monotonic()
    p = int(project_id)
    engine = load_engine()
    client = client or LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key,
                                         timeout=settings.request_timeout, image_hosts=settings.image_hosts,
                                         attempts=JOB_API_ATTEMPTS)
    store = ProjectStore(settings.model_dir, p)
    store.clean_temp()

    progress("fetch", 0.0)
    refused_events = store.refused_events()      # refused webhooks (redis down) whose annotations the tasks hold
    try:
        project = client.get_project(p)
    except LabelStudioError as exc:
        if exc.status == 404 and refused_events:     # the project is gone: nothing will ever train for them
            store.forget_refused_events(refused_events)
            logger.warning("project %d no longer exists in Label Studio: forgot its %d refused webhook event(s)",
                           p, len(refused_events))
        raise
    annotations_before = annotation_state(client, p, project)      # read before the tasks: see reconcile.py
    info = parse_label_config(project.get("label_config"))
    class_forget_rates = settings.class_forget_rates_for(info.class_names)   # a wrong list fails before any work
    tasks = list(client.iter_tasks(p))
    store.forget_refused_events(refused_events)
    experts = expert_ids(client, settings)
    labels = extract_labels(tasks, info, label_source=settings.label_source, label_field=settings.label_field,
                            experts=experts, trust_ground_truth=settings.trust_ground_truth)
    n_trusted = sum(tl.is_trusted for tl in labels)
    logger.info("project %d: %d tasks, %d with a trusted label (reason: %s)", p, len(tasks),
                n_trusted, reason or "-")

    previous = store.current_version()
    prev_meta = store.load_meta(previous) if previous else {}
    if settings.relabel_budget and previous and prev_meta.get("n_trusted", 0) >= settings.relabel_budget:
        logger.warning("project %d: relabel budget spent (%d trusted labels >= ALR_RELABEL_BUDGET=%d): "
                       "not retraining; version %s stays current", p, prev_meta.get("n_trusted", 0),
                       settings.relabel_budget, previous)
        return {"status": "budget_spent", "project": p, "model_version": previous}
    inputs = training_inputs(tasks, labels, info, settings)
    forced = FORCED_REASONS.intersection(reason.split(","))
    if previous and prev_meta.get("training_inputs") == inputs and not forced:
        store.update_meta(previous, annotation_state=annotations_before)    # reconciliation: seen, nothing to do
        pruned = prune_unless_a_newer_job_is_queued(client, p, settings, previous, newer_job_queued)  # left by the last
        progress("done", 1.0)
        logger.info("project %d: no label, task, labelling config or setting changed since version %s (reason: "
                    "%s): not retraining. A TRAIN request retrains anyway.", p, previous, reason or "-")
        return {"status": "unchanged", "project": p, "model_version": previous, "pruned_versions": pruned}
    trained = None if forced else unpublished_version(store, inputs)
    if trained:
        logger.warning("project %d: version %s was trained on these very inputs but never published (its push failed, "
                       "or its job lost the project to another): publishing it now instead of training again", p, trained)
        store.update_meta(trained, annotation_state=annotations_before)
        results = store.load(trained)
        client.delete_prediction_version(p, trained)      # what a job killed mid-push left of it
        served = serve_version(client, store, p, trained, results.items, info, settings, progress, may_publish,
                               newer_job_queued)
        return {"status": "published", "project": p, "model_version": trained, **served,
                "seconds": round(time.monotonic() - t0, 2)}

    progress("download", 0.0)
    logger.info("project %d: images made %d x %d px by %s, %s (ALR_IMAGE_SIZE, ALR_RESIZE, ALR_CHANNELS); "
                "network %s%s%s", p, settings.image_size, settings.image_size, settings.resize,
                "RGB" if settings.channels == 3 else "grey",
                settings.arch, f", weights {settings.pretrained_weights}" if settings.pretrained_weights else "",
                ", frozen: fast mode (ALR_FROZEN_BACKBONE)" if settings.frozen_backbone else "")
    cache = ImageCache(settings.cache_dir, client, max_cache_bytes=settings.image_cache_max_mb * 2**20,
                       protect_seconds=settings.job_timeout)
    load_image = settings.image_loader(engine.load_image)
    # A large project is not held in memory: the check below decodes each image once into a file that the
    # epochs read back (DecodedImages), or, where the disk has no room for it, DataLoader workers decode the
    # cached files per batch (FileImages). Fast mode streams the files too: its embeddings are found again by
    # the files' bytes (a retraining decodes no image it has seen).
    streaming = settings.frozen_backbone or len(tasks) > settings.stream_above_tasks
    decoded_dir = store.root / ".tmp-decoded"          # removed when training ends; a killed job's by the next job
    writer = None
    if streaming:
        logger.info("project %d: streaming images from the cache (%s)", p,
                    "fast mode" if settings.frozen_backbone else
                    f"{len(tasks)} tasks > ALR_STREAM_ABOVE_TASKS={settings.stream_above_tasks}")
        if not settings.frozen_backbone:
            decoded_dir.mkdir(parents=True, exist_ok=True)
            writer = engine.DecodedImagesWriter(decoded_dir / "images.u8", capacity=len(tasks),
                                                image_shape=(settings.channels, settings.image_size,
                                                             settings.image_size))
    fetch = partial(cache_task_images, keep=writer and writer.append) if streaming else load_task_images
    try:
        ok_idx, fetched, errors = fetch(tasks, info.image_field, cache, load_image, image_size=settings.image_size,
                                        channels=settings.channels, max_unreachable=unreachable_allowance(len(tasks)))
    except ImageHostDown as exc:
        shutil.rmtree(decoded_dir, ignore_errors=True)
        logger.error("project %d: not training: %s Version %s stays served; the next event, or reconciliation "
                     "(ALR_RECONCILE_SECONDS) once a version exists, tries again.", p, exc, previous or "(none)")
        raise
    decoded = writer and writer.finish()
    if decoded is not None:
        logger.info("project %d: %d images decoded once into %s (%.0f MB); the epochs read them from there", p,
                    len(decoded), decoded.path, os.path.getsize(decoded.path) / 2**20)

    def images_at(pos):
        if decoded is not None:
            return decoded.select(pos)
        if streaming:
            return engine.FileImages([fetched[j] for j in pos], image_size=settings.image_size,
                                     channels=settings.channels, resize=settings.resize)
        return fetched[pos]
    ok_tasks = [tasks[i] for i in ok_idx]
    ok_labels = [labels[i] for i in ok_idx]
    train_pos = [j for j, tl in enumerate(ok_labels) if tl.label is not None]
    other_pos = [j for j, tl in enumerate(ok_labels) if tl.label is None]
    if len(train_pos) < settings.min_labelled_tasks:
        shutil.rmtree(decoded_dir, ignore_errors=True)
        logger.error("project %d: only %d labelled tasks with a usable image (< ALR_MIN_LABELLED_TASKS=%d): "
                     "not training", p, len(train_pos), settings.min_labelled_tasks)
        return {"status": "not_enough_data", "project": p, "labelled": len(train_pos),
                "skipped_images": len(errors)}

    fingerprint = config_fingerprint(info)
    previous_checkpoint, not_fine_tuned = None, ""
    if previous and prev_meta.get("config_fingerprint") == fingerprint:
        previous_checkpoint = store.version_dir(previous) / "checkpoint.pt"
    elif previous:
        not_fine_tuned = (f"The labelling config changed since {previous}" if "config_fingerprint" in prev_meta
                          else f"{previous}'s meta.json records no labelling config (missing or unreadable)")
        logger.warning("project %d: %s: training from scratch (Phase 1)", p, not_fine_tuned)

    version = store.next_version()
    tmp = store.begin(version)
    try:
        ids = np.array([int(ok_tasks[j]["id"]) for j in train_pos], dtype=np.int64)
        y = np.array([ok_labels[j].label for j in train_pos], dtype=np.int64)
        trusted_mask = np.array([ok_labels[j].is_trusted for j in train_pos], dtype=bool)
        stage = "train"          # the engine reports "co-teaching" or "fine-tuning" once it knows which runs
        progress(stage, 0.0)
        config = engine_config(engine, settings, class_forget_rates=class_forget_rates, streaming=streaming)
        processes = settings.training_processes
        if processes > 1:
            result = train_with_torchrun(
                images_at(train_pos), labels=y, sample_ids=ids, trusted_mask=trusted_mask,
                class_names=list(info.class_names), config=config, previous_checkpoint=previous_checkpoint,
                checkpoint_path=tmp / "checkpoint.pt", work_dir=tmp / "torchrun", processes=processes,
                timeout=settings.job_timeout - (time.monotonic() - t0), progress=progress, stage=stage)
        else:
            result = engine.train_and_score(
                images_at(train_pos), y, sample_ids=ids, class_names=list(info.class_names),
                trusted_mask=trusted_mask, previous_checkpoint=previous_checkpoint,
                checkpoint_path=tmp / "checkpoint.pt", config=config, progress=progress,
                progress_bar=False)                  # progress goes to job.meta and the log instead
        given = {int(ok_tasks[j]["id"]): ok_labels[j].noisy for j in range(len(ok_tasks))}
        trusted = {int(ok_tasks[j]["id"]): ok_labels[j].is_trusted for j in range(len(ok_tasks))}
        agreement = {int(ok_tasks[j]["id"]): ok_labels[j].agreement for j in range(len(ok_tasks))}
        records = build_records(result, class_names=list(info.class_names), given=given, trusted=trusted,
                                agreement=agreement)
        if other_pos:
            progress("score unlabelled", 0.0)
            scored = engine.score_images(tmp / "checkpoint.pt", images_at(other_pos), None)
            scored.sample_ids = np.array([int(ok_tasks[j]["id"]) for j in other_pos], dtype=np.int64)
            records.update(build_records(scored, class_names=list(info.class_names), given=given,
                                         trusted=trusted, agreement=agreement))
        atomic_write_json(tmp / "results.json", {
            "version": version, "project": p, "class_names": list(info.class_names),
            "items": {str(k): v for k, v in records.items()}})
        meta = {"version": version, "project": p, "phase": result.phase, "previous": previous,
                "phase_reason": not_fine_tuned or result.phase_reason,     # why a Phase 1 after a version
                "annotation_state": annotations_before,
                "reason": reason, "config_fingerprint": fingerprint,
                "class_names": list(info.class_names), "n_tasks": len(tasks),
                "n_trained": len(train_pos), "n_trusted": n_trusted,
                "n_scored_only": len(other_pos), "skipped_images": errors,
                "train_processes": processes, "streamed_images": streaming,
                "images_decoded_once": decoded is not None,
                "trained_task_labels": {str(int(ok_tasks[j]["id"])): int(ok_labels[j].label)
                                        for j in train_pos},
                "trusted_task_ids": [int(ok_tasks[j]["id"]) for j in train_pos if ok_labels[j].is_trusted],
                "settings": {name: getattr(settings, name) for name in MODEL_SETTINGS + RESOURCE_SETTINGS},
                "training_inputs": inputs,
                "train_seconds": round(time.monotonic() - t0, 2)}
        atomic_write_json(tmp / "meta.json", meta)
        store.commit(version, tmp, make_current=False)     # served only once Label Studio has it all
    except BaseException:
        store.abort(tmp)
        raise
    finally:
        shutil.rmtree(decoded_dir, ignore_errors=True)
    logger.info("project %d: model version %s saved (phase %d, %d trained, %d trusted)", p, version,
                meta["phase"], len(train_pos), n_trusted)
    served = serve_version(client, store, p, version, records, info, settings, progress, may_publish,
                           newer_job_queued)
    return {"status": "trained", "project": p, "model_version": version, "phase": meta["phase"],
            "n_trained": len(train_pos), "n_trusted": n_trusted, "skipped_images": len(errors), **served,
            "seconds": round(time.monotonic() - t0, 2)}


def unpublished_version(store: ProjectStore, inputs: str) -> str | None:
    """The newest version on disk, newer than the served one, trained on exactly ``inputs`` but never
    published (its push failed, or its job lost the project at publish time); None if there is none.
    Its checkpoint must be there (new tasks are scored with it, the next training starts from it)."""
    current = store.current_version()
    versions = store.list_versions()
    newer = versions[versions.index(current) + 1:] if current in versions else versions
    for version in reversed(newer):
        if (store.load_meta(version).get("training_inputs") == inputs
                and (store.version_dir(version) / "checkpoint.pt").exists()):
            return version
    return None


def serve_version(client: LabelStudioClient, store: ProjectStore, p: int, version: str, records: dict[int, dict],
                  info: LabelConfigInfo, settings: Settings, progress: Progress,
                  may_publish: Callable[[], bool] | None = None,
                  newer_job_queued: Callable[[], bool] | None = None) -> dict:
    """Publish a version on disk to Label Studio (all or nothing, :func:`publish_version`), make it the
    backend's CURRENT, point the review at it, and prune older predictions and checkpoints.
    Returns the figures of the push for the job's summary; raises :class:`SupersededError` when
    ``may_publish`` says no."""
    if may_publish is not None and not may_publish():
        raise SupersededError(f"another job took the project over before version {version} was published; "
                              "it stays on disk unpublished")
    progress("push predictions", 0.0)
    t_push = time.monotonic()
    created = publish_version(client, p, version, records, info, settings)
    store.set_current(version)
    try:
        refresh_backend_version(client, p, version)
    except Exception as exc:      # noqa: BLE001 - the stream still follows the project's model_version
        logger.warning("project %d: could not refresh Label Studio's record of the backend's version (%s): the "
                       "Data Manager's prediction-score sort follows on its next /setup call", p, exc)
    if settings.label_source == "annotation":        # ALR_REOPEN_SUSPECTS=0 closes what was reopened
        try:
            reopen_suspects(client, p, records, settings)
        except Exception as exc:      # noqa: BLE001 - the version is published; the next one tries again
            logger.warning("project %d: could not reopen the suspects for review (%s): the label stream stays as "
                           "it was until the next version", p, exc)
    push_seconds = time.monotonic() - t_push
    pruned = prune_unless_a_newer_job_is_queued(client, p, settings, version, newer_job_queued)
    try:
        store.prune_checkpoints(keep=settings.keep_checkpoints)
    except OSError as exc:        # the version is published; the next job prunes again
        logger.warning("project %d: could not delete old versions' checkpoints (%s): they take disk space until "
                       "the next training", p, exc)
    progress("done", 1.0)
    logger.info("project %d: pushed %d predictions in %.1fs; project model_version is now %s",
                p, created, push_seconds, version)
    return {"predictions": created, "push_seconds": round(push_seconds, 2), "pruned_versions": pruned}


def publish_version(client: LabelStudioClient, project_id: int, version: str, records: dict[int, dict],
                    info: LabelConfigInfo, settings: Settings) -> int:
    """Push every task's prediction of ``version``, then make it the project's model_version.

    All or nothing: the project's model_version (what the label stream orders by) changes only
    once Label Studio holds a prediction of the version for every record; if the push fails
    (after the client's retries) or comes up short, the version's predictions are deleted again,
    the project keeps serving the previous version and the error fails the job.
    Returns the number of predictions created."""
    predictions = [dict(prediction_for(rec, info, version, preselect=settings.preselect), task=tid) for tid, rec in records.items()]
    try:
        try:
            created = client.import_predictions(project_id, predictions, batch_size=settings.predictions_batch_size)
        except LabelStudioError as refusal:
            predictions = _predictions_of_tasks_still_there(client, project_id, predictions, refusal)
            client.delete_prediction_version(project_id, version)         # the batches before the refused one
            created = client.import_predictions(project_id, predictions, batch_size=settings.predictions_batch_size)
        ensure_review_order(client, project_id, settings, served_version=version,
                            expected_predictions=len(predictions))
    except BaseException:
        logger.error("project %d: publishing %s failed; the project keeps its previous model version",
                     project_id, version)
        try:
            client.delete_prediction_version(project_id, version)
        except Exception as exc:      # noqa: BLE001 - the original error is the one to report
            logger.warning("project %d: could not delete the half-pushed predictions of %s: %s",
                           project_id, version, exc)
        raise
    return created


def _predictions_of_tasks_still_there(client: LabelStudioClient, project_id: int, predictions: list[dict],
                                     refusal: LabelStudioError) -> list[dict]:
    """After Label Studio refused an import with 400: the predictions whose tasks it still has, when
    tasks were deleted while the job trained (it refuses a whole batch for one task it no longer
    has); any other refusal is raised as it came."""
    if refusal.status != 400:
        raise refusal
    there = {int(task["id"]) for task in client.iter_tasks(project_id)}
    kept = [p for p in predictions if p["task"] in there]
    if len(kept) == len(predictions):
        raise refusal
    logger.warning("project %d: %d task(s) were deleted while the job trained (e.g. task %d): the version is "
                   "published without them", project_id, len(predictions) - len(kept),
                   next(p["task"] for p in predictions if p["task"] not in there))
    return kept


def prune_unless_a_newer_job_is_queued(client: LabelStudioClient, project_id: int, settings: Settings, current: str,
                                       newer_job_queued: Callable[[], bool] | None) -> list[str]:
    """:func:`prune_prediction_versions`, unless events came while this job ran and a newer job of the
    project is queued: Label Studio deletes predictions one at a time (19 ms each on SQLite, 1.23.2: 95 s
    for a 5,000-task version), and the relabels that job trains on should not wait for that.  It prunes
    every older version when it publishes, or when it finds nothing to train."""
    if newer_job_queued is not None and newer_job_queued():
        logger.info("project %d: a newer job is queued: the older versions' predictions are left for it to delete",
                    project_id)
        return []
    return prune_prediction_versions(client, project_id, keep=settings.keep_prediction_versions, current=current)


def prune_prediction_versions(client: LabelStudioClient, project_id: int, *, keep: int, current: str) -> list[str]:
    """Delete the predictions of this backend's older versions (names ``alr-...``) from Label
    Studio, keeping the newest ``keep`` (0 = keep all).  Other models' predictions are never
    touched.  Best effort: a failure is logged, the new version stays current."""
    if keep <= 0:
        return []
    try:
        ours = [v for v in client.prediction_versions(project_id) if v.startswith("alr-")]
        ours = [current] + [v for v in ours if v != current]          # newest first
        old = ours[keep:]
        for v in old:
            client.delete_prediction_version(project_id, v)
    except Exception as exc:      # noqa: BLE001 - pruning must never fail a finished job
        logger.warning("project %d: could not delete old predictions: %s", project_id, exc)
        return []
    if old:
        logger.info("project %d: deleted the predictions of %d older version(s)", project_id, len(old))
    return old


def _claimed_events(job, project_id: int, reason: str) -> tuple[int, str]:
    """The webhook events a claimed job stands for, and their actions (comma-separated); kept in
    the job's meta too, for anyone looking at the queue.  A job enqueued by hand stands for one."""
    from .training_queue import job_events

    events, reasons = job_events(job.connection, project_id, job.id)
    events, reasons = max(events, 1), reasons or reason.split(",")
    job.meta.update(events=events, reasons=reasons)
    job.save_meta()
    return events, ",".join(reasons)


def train_project_job(project_id: int, reason: str = "") -> dict:
    """rq entry point: hold the project's running lock (or hand the events on), claim the pending
    slot, train; the project stays marked dirty until the job ends, so that a job killed mid-way
    is queued again by the web app's watchdog."""
    from rq import get_current_job

    from .training_queue import (RQTrainingQueue, RunningLock, claim_pending, clear_dirty, live_pending_job,
                                 mark_dirty, worker_asked_to_stop)

    if not logging.getLogger().handlers:      # an rq worker configures only its own logger
        logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    job = get_current_job()
    if job is None:
        return run_training_job(project_id, settings=settings, reason=reason)
    lock = RunningLock(job.connection, project_id, ttl=settings.running_lock_ttl)
    progress = _JobProgress(job, lost=lock.lost)
    progress("waiting for the project's running lock", 0.0)
    queue = RQTrainingQueue(job.connection, job.origin, job_timeout=settings.job_timeout)
    while not lock.acquire():
        stopping = worker_asked_to_stop(job.connection, job.worker_name)
        if queue.queue.count == 0 and not stopping:
            continue         # nothing else to do for this worker: keep waiting (a few seconds a try)
        # another job trains this project, and other work waits or this worker was asked to stop
        # (it would wait for the other training to end): hand the events to a pending job at the
        # back of the queue rather than hold this worker until that job ends
        claim_pending(job.connection, project_id, job.id)
        events, reasons = _claimed_events(job, project_id, reason)
        handed = queue.request_training(project_id, reasons, events=events)
        logger.info("project %d is being trained by another job: events handed to %s%s", project_id,
                    handed["job_id"], " (this worker is asked to stop)" if stopping else "")
        return {"status": "deferred", "project": int(project_id), "to": handed["job_id"]}
    try:
        claim_pending(job.connection, project_id, job.id)
        mark_dirty(job.connection, project_id, job.id)
        _, reasons = _claimed_events(job, project_id, reason)
        try:
            result = run_training_job(
                project_id, settings=settings, reason=reasons, progress=progress, may_publish=lock.still_held,
                newer_job_queued=lambda: live_pending_job(job.connection, project_id) is not None)
        except SupersededError as exc:
            logger.warning("project %d: %s", project_id, exc)   # its dirty mark is the other job's now: left as it is
            return {"status": "superseded", "project": int(project_id)}
        except LabelStudioError as exc:
            if not exc.transient:                        # the project is gone or the key cannot read it
                clear_dirty(job.connection, project_id)  # fail once, do not loop
            raise            # Label Studio away: stays dirty, the watchdog queues the project again
        except BaseException:
            clear_dirty(job.connection, project_id)      # a bad project: fail once, do not loop
            raise
        clear_dirty(job.connection, project_id)
        return result
    finally:
        lock.release()
