"""Model versions on disk, one directory per project.

Layout::

    <MODEL_DIR>/project-<id>/
        versions/<version>/checkpoint.pt     the engine's checkpoint (of the current version and the newest
                                             ALR_KEEP_CHECKPOINTS: Settings.keep_checkpoints)
        versions/<version>/results.json      per-task results /predict answers from
        versions/<version>/meta.json         config, counts, timings
        CURRENT                              the served version's name (one line)
        .tmp-<version>/                      a version being written (never served)
        refused-events/<time>-<id>.json      a webhook the training queue refused (redis down); the newest
                                             REFUSED_EVENTS_KEPT

A version is written into ``.tmp-<version>`` and renamed into ``versions/`` only when all
its files are complete; ``CURRENT`` is then replaced atomically (write a temp file +
``os.replace``).  A reader therefore sees either the old or the new version, never a
half-written one; a crashed job leaves only a ``.tmp-*`` directory, removed by the next job.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from model.files import atomic_write

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
# Refused webhook events kept per project.  One record is enough to bring a training that reads
# every task; the rest only count.  A day of redis down under a busy team (a webhook a second) would
# otherwise leave ~86k files in one directory, listed by every /health and reconciliation check.
REFUSED_EVENTS_KEPT = 1000


def _version_number(name: str) -> int:
    """n of alr-v<n>-<time>; -1 for any other name."""
    m = re.match(r"alr-v(\d+)-", name)
    return int(m.group(1)) if m else -1


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda out: out.write(text.encode("utf-8")))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))


@dataclass
class VersionResults:
    """A version's per-task results, as loaded by the web process."""

    version: str
    class_names: list[str]
    items: dict[int, dict]          # task id -> record (see training.build_records)
    checkpoint: Path
    meta: dict


class ProjectStore:
    """The model versions of one project."""

    def __init__(self, model_dir: str | os.PathLike, project_id: int):
        self.project_id = int(project_id)
        self.root = Path(model_dir) / f"project-{self.project_id}"

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def current_version(self) -> str | None:
        try:
            name = (self.root / "CURRENT").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name if name and (self.versions_dir / name).is_dir() else None

    def version_dir(self, version: str) -> Path:
        if not _VERSION_RE.match(version):
            raise ValueError(f"bad model version name {version!r}")
        return self.versions_dir / version

    def list_versions(self) -> list[str]:
        """The versions on disk, oldest first (by their number: alr-v10 comes after alr-v9)."""
        if not self.versions_dir.is_dir():
            return []
        return sorted((p.name for p in self.versions_dir.iterdir() if p.is_dir()),
                      key=lambda name: (_version_number(name), name))

    def next_version(self) -> str:
        """A new, unique version name: alr-v<n>-<UTC timestamp>."""
        n = 1 + max((_version_number(v) for v in self.list_versions() if _version_number(v) >= 0), default=0)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        return f"alr-v{n}-{stamp}"

    def clean_temp(self) -> None:
        if self.root.is_dir():
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)

    def begin(self, version: str) -> Path:
        """Directory to write a new version into (not yet visible)."""
        self.version_dir(version)   # validates the name
        tmp = self.root / f".tmp-{version}"
        tmp.mkdir(parents=True, exist_ok=False)
        return tmp

    def commit(self, version: str, tmp: Path, *, make_current: bool = True) -> Path:
        """Publish a fully written version directory, then point CURRENT at it."""
        final = self.version_dir(version)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)      # atomic rename of the whole directory
        if make_current:
            self.set_current(version)
        return final

    def set_current(self, version: str) -> None:
        if not self.version_dir(version).is_dir():
            raise FileNotFoundError(f"model version {version!r} does not exist")
        atomic_write_text(self.root / "CURRENT", version + "\n")

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def prune_checkpoints(self, *, keep: int) -> list[str]:
        """Delete the checkpoints of all but the newest ``keep`` versions (0 = keep all); the current
        version's always stays.  Their results.json and meta.json stay: the report's progress over
        versions reads those.  Returns the versions whose checkpoint was deleted.

        A checkpoint holds both networks, their optimiser states and the best epoch's weights: a
        ResNet-18's is a few hundred MB, and a project retrained after every burst of relabels
        would fill the disk.  Only the current checkpoint is ever read (new tasks scored, the next
        training's Phase 2 start); the previous ones guard a /predict that opened the version
        just replaced."""
        if keep <= 0:
            return []
        current = self.current_version()
        pruned = []
        for version in self.list_versions()[:-keep]:
            checkpoint = self.version_dir(version) / "checkpoint.pt"
            if version != current and checkpoint.exists():
                checkpoint.unlink(missing_ok=True)
                pruned.append(version)
        return pruned

    def load_meta(self, version: str) -> dict:
        """The version's meta.json; {} where it is missing, or unreadable (logged): the version then
        counts as knowing nothing of its inputs, so the next job trains a new one rather than fail on it."""
        path = self.version_dir(version) / "meta.json"
        try:
            with open(path, encoding="utf-8") as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            return {}
        except ValueError as exc:        # not JSON, not UTF-8
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if isinstance(meta, dict):
                return meta
            reason = "not a JSON object"
        logger.error("project %d: %s cannot be read (%s): treated as empty; the next training writes a new version",
                     self.project_id, path, reason)
        return {}

    def update_meta(self, version: str, **changes) -> None:
        """Rewrite some fields of a published version's meta.json (atomically)."""
        atomic_write_json(self.version_dir(version) / "meta.json", {**self.load_meta(version), **changes})

    @property
    def refused_events_dir(self) -> Path:
        return self.root / "refused-events"

    def record_refused_event(self, action: str) -> Path:
        """Remember a webhook event the training queue refused (redis down), so that a training still
        comes for it: the web app's reconciliation queues one while any is recorded, and the job that
        reads the tasks after it forgets it (:meth:`forget_refused_events`).

        One file per event: web processes never overwrite each other's, and the job forgets exactly
        the events it listed before reading the tasks, never one recorded while it read them.  Past
        ``REFUSED_EVENTS_KEPT`` the oldest records are dropped: the newest is the one a job may not
        have seen, and any record still brings the training.
        """
        now = datetime.now(timezone.utc)
        path = self.refused_events_dir / f"{now.strftime('%Y%m%dT%H%M%S.%f')}-{uuid.uuid4().hex}.json"
        atomic_write_json(path, {"action": str(action), "refused_at": now.isoformat()})
        events = self.refused_events()
        if len(events) > REFUSED_EVENTS_KEPT:
            dropped = events[:-REFUSED_EVENTS_KEPT]
            self.forget_refused_events(dropped)
            logger.warning("project %d: more than %d refused webhook events recorded; dropped the %d oldest "
                           "(the newest bring the same training). Is redis down? See /health.",
                           self.project_id, REFUSED_EVENTS_KEPT, len(dropped))
        return path

    def refused_events(self) -> list[Path]:
        """The recorded refused events, oldest first."""
        if not self.refused_events_dir.is_dir():
            return []
        return sorted(path for path in self.refused_events_dir.iterdir()
                      if path.suffix == ".json" and not path.name.startswith("."))

    def forget_refused_events(self, events: list[Path]) -> None:
        """Forget these recorded events (those a job listed before it read the tasks)."""
        for path in events:
            path.unlink(missing_ok=True)

    def load(self, version: str) -> VersionResults:
        d = self.version_dir(version)
        with open(d / "results.json", encoding="utf-8") as fh:
            body = json.load(fh)
        return VersionResults(version=version, class_names=list(body["class_names"]),
                              items={int(k): v for k, v in body["items"].items()},
                              checkpoint=d / "checkpoint.pt", meta=self.load_meta(version))


class ResultsCache:
    """Per-process cache: the current version's results of each project, loaded once per
    version (a version is immutable once committed).  Thread-safe; one instance per app."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self._lock = threading.Lock()
        self._loaded: dict[int, VersionResults] = {}

    def get(self, project_id: int) -> VersionResults | None:
        store = ProjectStore(self.model_dir, project_id)
        version = store.current_version()
        if version is None:
            return None
        with self._lock:
            cached = self._loaded.get(store.project_id)
            if cached is not None and cached.version == version:
                return cached
        try:
            results = store.load(version)        # outside the lock: may take a moment
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("project %d: the files of model version %s cannot be read (%s: %s): serving no "
                         "predictions until the next training replaces it", store.project_id, version,
                         type(exc).__name__, exc)
            return None
        with self._lock:
            self._loaded[store.project_id] = results
        return results
