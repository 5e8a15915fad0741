"""Configuration of the ML backend, read from environment variables.

Everything is read by :meth:`Settings.from_env` when the app (or a training job)
is set up, never at import time, so a test can set variables per test.  The
table of variables and defaults lives in ``ml_backend/README.md``; keep both in
sync.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Mapping

from .labelconfig import label_key

LABEL_SOURCES = ("data", "annotation")
PRESELECT_CHOICES = ("suggested", "given", "none")


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _optional_float(value: str) -> float | None:
    return None if value.strip().lower() in ("", "none", "auto") else float(value)


def _label_rates(value: str) -> tuple[tuple[str, float], ...]:
    """"Benign=0.1, Malignant=0.35" -> (("Benign", 0.1), ("Malignant", 0.35)); each rate in [0, 1)."""
    rates: dict[str, float] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, sep, rate = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{item!r} is not <label>=<rate>")
        if name in rates:
            raise ValueError(f"label {name!r} is given twice")
        rates[name] = float(rate)
        if not 0.0 <= rates[name] < 1.0:
            raise ValueError(f"the rate of {name!r} must lie in [0, 1), got {rates[name]}")
    return tuple(rates.items())


@dataclass(frozen=True)
class Settings:
    """All settings of the backend and its training jobs (see README.md for the table)."""

    label_studio_url: str = "http://127.0.0.1:8080"
    label_studio_public_url: str = ""     # where browsers reach Label Studio (report links); "" = LABEL_STUDIO_URL
    label_studio_api_key: str = field(default="", repr=False)  # never printed
    basic_auth_user: str = ""             # with basic_auth_pass: every route but /health needs them
    basic_auth_pass: str = field(default="", repr=False)
    allowed_projects: frozenset[int] | None = None   # ALR_PROJECTS: the only project ids served; None = all
    open_to_network: bool = False         # without basic auth, answer other hosts too (not only loopback)
    redis_url: str | None = None          # REDIS_URL wins over host/port/db when set
    redis_host: str = "localhost"
    redis_port: int = 6379
    redis_db: int = 0
    use_redis: bool = True                # False: in-process thread fallback, no redis at all
    rq_queue_name: str = "alr-training"
    job_timeout: int = 3600               # seconds; one training job
    running_lock_ttl: int = 30            # seconds a killed job keeps its project from other jobs
    watchdog_seconds: float = 30.0        # web app: re-queue projects whose job died this often; 0 = off
    reconcile_seconds: float = 300.0      # web app: compare Label Studio's annotation counts this often; 0 = off
    model_dir: str = "./runs/ml_backend"
    image_cache_dir: str | None = None    # default <model_dir>/image_cache
    image_cache_max_mb: int = 2048        # cap on the image cache; LRU files not in use are evicted; 0 = no cap
    stream_above_tasks: int = 5000        # more tasks: images streamed from the cache (FileImages), not in memory
    dataloader_workers: int = 2           # DataLoader worker processes decoding streamed images
    gpus_per_job: int = 1                 # > 1: the job trains with torchrun, one process per GPU (DDP)
    train_processes: int = 0              # torchrun processes; 0 = gpus_per_job (> 1 on a CPU: gloo ranks)
    label_source: str = "data"            # "data" (task data field) or "annotation" (first annotation)
    label_field: str = "label"            # task data field with the noisy label (label_source=data)
    expert_user_ids: frozenset[int] = frozenset()     # ALR_EXPERT_USER_IDS: their annotations are trusted
    expert_emails: frozenset[str] = frozenset()       # ALR_EXPERT_EMAILS: the same, by e-mail
    relabel_budget: int = 0               # trusted relabels after which retraining stops; 0 = unlimited
    min_labelled_tasks: int = 10          # fewer usable labelled images: the job does not train
    predictions_batch_size: int = 500     # predictions per bulk import request
    preselect: str = "suggested"          # label pre-selected in the labelling view: suggested | given | none
    set_sampling: bool = True             # make the project's sampling "Uncertainty sampling" (review order)
    create_view: bool = False             # a "Suspects first" Data Manager tab, ordered by score, placed first
    reopen_suspects: int = 50             # label_source=annotation: lowest-scored tasks reopened for review
    trust_ground_truth: bool = False      # annotations marked ground truth are trusted (LS marks imports so)
    keep_prediction_versions: int = 1     # this backend's versions whose predictions stay in LS; 0 = all
    keep_checkpoints: int = 3             # versions on disk that keep their checkpoint (the current always); 0 = all
                                          # (not read from the environment yet)
    image_hosts: tuple[str, ...] = ()     # ALR_IMAGE_HOSTS: hosts besides Label Studio's images may come from
    request_timeout: float = 30.0         # seconds, each Label Studio API / image request
    max_request_bytes: int = 32 * 1024 * 1024
    max_unseen_per_request: int = 256     # /predict: unseen tasks scored by a forward pass per call
    # engine hyperparameters (model.engine.EngineConfig)
    arch: str = "auto"
    pretrained_weights: str = ""          # ALR_PRETRAINED_WEIGHTS: a ResNet weights file, "imagenet" (torch cache) or ""
    frozen_backbone: bool = False         # ALR_FROZEN_BACKBONE: fast mode (embeddings of a frozen ResNet, two small heads)
    image_size: int = 32
    resize: str = "stretch"               # ALR_RESIZE: non-square images made square by stretch, pad or crop
    channels: int = 3
    epochs: int = 30
    finetune_epochs: int = 10
    batch_size: int = 128
    forget_rate: float | None = None
    class_forget_rates: tuple[tuple[str, float], ...] = ()  # ALR_CLASS_FORGET_RATES: (label, share of wrong
                                          # labels) from an audit, for every label; () = estimated
    seed: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``environ`` (default: ``os.environ``).

        Raises
        ------
        ValueError
            A variable holds a value of the wrong type or outside its allowed set;
            the message names the variable.
        """
        env = os.environ if environ is None else environ
        values: dict = {}
        for name, (var, conv) in _ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[name] = conv(raw)
            except ValueError as exc:
                raise ValueError(f"environment variable {var}={raw!r} is invalid: {exc}") from None
        settings = cls(**values)
        settings.validate()
        return settings

    def image_loader(self, load_image):
        """``load_image`` (model.data's) with this backend's ALR_RESIZE."""
        return functools.partial(load_image, resize=self.resize)

    def validate(self) -> None:
        if self.label_source not in LABEL_SOURCES:
            raise ValueError(
                f"ALR_LABEL_SOURCE must be one of {LABEL_SOURCES}, got {self.label_source!r}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (or neither)")
        if self.preselect not in PRESELECT_CHOICES:
            raise ValueError(f"ALR_PRESELECT must be one of {PRESELECT_CHOICES}, got {self.preselect!r}")
        for name in ("redis_port", "job_timeout", "predictions_batch_size", "image_size",
                     "batch_size", "max_request_bytes", "gpus_per_job"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.running_lock_ttl < 3:
            raise ValueError(f"ALR_RUNNING_LOCK_TTL must be at least 3 seconds (the lock is renewed every third of "
                             f"it), got {self.running_lock_ttl!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"ALR_CHANNELS must be 1 or 3, got {self.channels!r}")
        if self.keep_prediction_versions < 0:
            raise ValueError(f"keep_prediction_versions must be >= 0, got {self.keep_prediction_versions!r}")
        for name, var in (("image_cache_max_mb", "ALR_IMAGE_CACHE_MAX_MB"), ("stream_above_tasks", "ALR_STREAM_ABOVE_TASKS"),
                          ("dataloader_workers", "ALR_DATALOADER_WORKERS"), ("train_processes", "ALR_TRAIN_PROCESSES"),
                          ("reopen_suspects", "ALR_REOPEN_SUSPECTS"), ("keep_checkpoints", "ALR_KEEP_CHECKPOINTS")):
            if getattr(self, name) < 0:
                raise ValueError(f"{var} must be >= 0, got {getattr(self, name)!r}")
        from model.data import RESIZE_MODES

        if self.resize not in RESIZE_MODES:
            raise ValueError(f"ALR_RESIZE must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.frozen_backbone and self.arch not in ("auto", "resnet18", "resnet34", "resnet50"):
            raise ValueError(f"ALR_FROZEN_BACKBONE needs a ResNet backbone: ALR_ARCH=auto (ResNet-18), resnet18, "
                             f"resnet34 or resnet50, got {self.arch!r}")
        if self.pretrained_weights and not self.frozen_backbone:
            from model.networks import resolve_arch

            if resolve_arch(self.arch, self.image_size) == "smallcnn":
                raise ValueError(f"ALR_PRETRAINED_WEIGHTS needs a ResNet: set ALR_ARCH=resnet18/34/50 (ALR_ARCH="
                                 f"{self.arch!r} at ALR_IMAGE_SIZE={self.image_size} is the small CNN)")
        if self.relabel_budget < 0:
            raise ValueError(f"ALR_RELABEL_BUDGET must be >= 0, got {self.relabel_budget!r}")

    def class_forget_rates_for(self, class_names) -> tuple[float, ...] | None:
        """ALR_CLASS_FORGET_RATES in the order of a project's labels (None when unset).

        Raises
        ------
        ValueError
            The setting misses one of the project's labels or names a label the project does not have.
        """
        if not self.class_forget_rates:
            return None
        rates = {label_key(name): rate for name, rate in self.class_forget_rates}
        keys = [label_key(name) for name in class_names]
        missing = [name for name, key in zip(class_names, keys) if key not in rates]
        unknown = [name for name, _ in self.class_forget_rates if label_key(name) not in keys]
        if missing or unknown:
            raise ValueError(f"ALR_CLASS_FORGET_RATES must give a rate for every label of the project and no other: "
                             f"missing {missing}, not a label of the project {unknown} (labels: {list(class_names)})")
        return tuple(rates[key] for key in keys)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_user or self.basic_auth_pass)

    def project_allowed(self, project_id: int) -> bool:
        return self.allowed_projects is None or int(project_id) in self.allowed_projects

    @property
    def training_processes(self) -> int:
        """Processes one training job runs (1 = in the worker's own process, the default; always 1 in
        fast mode, whose heads train in seconds)."""
        return 1 if self.frozen_backbone else self.train_processes or self.gpus_per_job

    @property
    def embedding_cache_dir(self) -> str:
        """Fast mode's embeddings, by backbone and image (small: 2-8 KB an image)."""
        return os.path.join(self.model_dir, "embedding_cache")

    @property
    def cache_dir(self) -> str:
        return self.image_cache_dir or os.path.join(self.model_dir, "image_cache")

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


_ENV = {
    "label_studio_url": ("LABEL_STUDIO_URL", lambda v: v.rstrip("/")),
    "label_studio_public_url": ("LABEL_STUDIO_PUBLIC_URL", lambda v: v.rstrip("/")),
    "label_studio_api_key": ("LABEL_STUDIO_API_KEY", str.strip),
    "basic_auth_user": ("BASIC_AUTH_USER", str.strip),
    "basic_auth_pass": ("BASIC_AUTH_PASS", str),
    "open_to_network": ("ALR_OPEN_TO_NETWORK", _bool),
    "allowed_projects": ("ALR_PROJECTS", lambda v: frozenset(int(x) for x in v.replace(",", " ").split())),
    "redis_url": ("REDIS_URL", str),
    "redis_host": ("REDIS_HOST", str),
    "redis_port": ("REDIS_PORT", int),
    "redis_db": ("REDIS_DB", int),
    "use_redis": ("ALR_USE_REDIS", _bool),
    "rq_queue_name": ("RQ_QUEUE_NAME", str),
    "job_timeout": ("ALR_JOB_TIMEOUT", int),
    "running_lock_ttl": ("ALR_RUNNING_LOCK_TTL", int),
    "watchdog_seconds": ("ALR_WATCHDOG_SECONDS", float),
    "reconcile_seconds": ("ALR_RECONCILE_SECONDS", float),
    "model_dir": ("MODEL_DIR", str),
    "image_cache_dir": ("ALR_IMAGE_CACHE_DIR", str),
    "image_cache_max_mb": ("ALR_IMAGE_CACHE_MAX_MB", int),
    "stream_above_tasks": ("ALR_STREAM_ABOVE_TASKS", int),
    "dataloader_workers": ("ALR_DATALOADER_WORKERS", int),
    "gpus_per_job": ("ALR_GPUS_PER_JOB", int),
    "train_processes": ("ALR_TRAIN_PROCESSES", int),
    "label_source": ("ALR_LABEL_SOURCE", str),
    "label_field": ("ALR_LABEL_FIELD", str),
    "expert_user_ids": ("ALR_EXPERT_USER_IDS", lambda v: frozenset(int(x) for x in v.replace(",", " ").split())),
    "expert_emails": ("ALR_EXPERT_EMAILS", lambda v: frozenset(x.strip().lower() for x in v.split(",") if x.strip())),
    "relabel_budget": ("ALR_RELABEL_BUDGET", int),
    "keep_checkpoints": ("ALR_KEEP_CHECKPOINTS", int),
    "preselect": ("ALR_PRESELECT", str),
    "set_sampling": ("ALR_SET_SAMPLING", _bool),
    "reopen_suspects": ("ALR_REOPEN_SUSPECTS", int),
    "trust_ground_truth": ("ALR_TRUST_GROUND_TRUTH", _bool),
    "create_view": ("ALR_CREATE_VIEW", _bool),
    "min_labelled_tasks": ("ALR_MIN_LABELLED_TASKS", int),
    "predictions_batch_size": ("ALR_PREDICTIONS_BATCH_SIZE", int),
    "image_hosts": ("ALR_IMAGE_HOSTS", lambda v: tuple(h.strip() for h in v.split(",") if h.strip())),
    "request_timeout": ("ALR_REQUEST_TIMEOUT", float),
    "max_request_bytes": ("ALR_MAX_REQUEST_BYTES", int),
    "max_unseen_per_request": ("ALR_MAX_UNSEEN_PER_REQUEST", int),
    "arch": ("ALR_ARCH", str),
    "pretrained_weights": ("ALR_PRETRAINED_WEIGHTS", str),
    "frozen_backbone": ("ALR_FROZEN_BACKBONE", _bool),
    "image_size": ("ALR_IMAGE_SIZE", int),
    "resize": ("ALR_RESIZE", str),
    "channels": ("ALR_CHANNELS", int),
    "epochs": ("ALR_EPOCHS", int),
    "finetune_epochs": ("ALR_FINETUNE_EPOCHS", int),
    "batch_size": ("ALR_BATCH_SIZE", int),
    "forget_rate": ("ALR_FORGET_RATE", _optional_float),
    "class_forget_rates": ("ALR_CLASS_FORGET_RATES", _label_rates),
    "seed": ("ALR_SEED", int),
}
