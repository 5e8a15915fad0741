"""Where the noisy and the trusted label of a task come from.

The rule (documented in ml_backend/README.md and tested in tests/test_backend_labels.py):

* Skipped annotations (``was_cancelled`` true) and annotations with no choice of this
  project's Choices control (or a choice that is not in the config) are ignored.
  "Usable annotations" below means the others, ordered by (created_at, id).
* Label source ``data`` (default): the noisy label is ``task.data[<ALR_LABEL_FIELD>]``
  (matched as a string against the config's class names). EVERY usable annotation was
  made by an annotator in Label Studio, so the task is TRUSTED and its trusted label is
  the one of the most recently updated usable annotation (updated_at, then id).
* Label source ``annotation``: the noisy label is the FIRST usable annotation (the
  imported one). Any later usable annotation makes the task trusted; the most recently
  updated of those later annotations wins.
* Teams: annotations by the experts the operator names (ALR_EXPERT_USER_IDS, ALR_EXPERT_EMAILS;
  ``completed_by`` is a user id) are TRUSTED whatever the label source; the most recently
  updated of them wins.  So are annotations marked ground truth, with ALR_TRUST_GROUND_TRUTH=true
  only: Label Studio 1.23.2 marks every IMPORTED annotation ground truth (measured), and the
  imported labels are the ones under suspicion.  When experts are
  named, the other annotators are a team, not experts: with label source ``annotation`` the noisy
  label is the MAJORITY of their choices (one vote per annotator, their latest annotation; a tie
  goes to the label chosen earliest) and none of them makes the task trusted.  The share of votes
  for that label (``agreement``) goes into the prediction's meta; ``annotators`` counts the voters.
  With no experts named, the two single-annotator rules above apply unchanged.
* A trusted label overrides the noisy label; trusted tasks are never discarded by the
  noise-robust selection (the engine's ``trusted_mask``).
* A task with neither a usable noisy nor a trusted label is not trained on; it is still
  scored (forward pass) and gets a prediction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

from .labelconfig import LabelConfigInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskLabels:
    task_id: int
    noisy: int | None         # class index of the noisy (given) label, None if absent/invalid
    trusted: int | None       # class index of the annotators' label, None if not trusted
    invalid_labels: tuple[str, ...] = ()   # label values not in the config (logged once)
    agreement: float | None = None         # team rule: share of the annotators' votes for the noisy label
    annotators: int = 0                    # team rule: how many (non-expert) annotators voted

    @property
    def label(self) -> int | None:
        """The label used for training: trusted overrides noisy."""
        return self.trusted if self.trusted is not None else self.noisy

    @property
    def is_trusted(self) -> bool:
        return self.trusted is not None


def _annotation_choice(annotation: dict, info: LabelConfigInfo) -> tuple[int | None, str | None]:
    """(class index, raw value) of the annotation's choice for our control."""
    for region in annotation.get("result") or []:
        if not isinstance(region, dict):
            continue
        if region.get("from_name") != info.from_name or region.get("type", "choices") != "choices":
            continue
        choices = (region.get("value") or {}).get("choices") or []
        if choices:
            raw = str(choices[0])
            return info.index_of(raw), raw
    return None, None


def _order_key(annotation: dict, field: str) -> tuple:
    return (str(annotation.get(field) or annotation.get("created_at") or ""), annotation.get("id") or 0)


def _from_data_field(task, usable, info, label_field, invalid):
    """Noisy label in task.data; every usable annotation is an annotator's, so trusted."""
    raw = (task.get("data") or {}).get(label_field)
    noisy = info.index_of(raw)
    if noisy is None and raw not in (None, ""):
        invalid.append(str(raw))
    return noisy, usable


def _from_first_annotation(task, usable, info, label_field, invalid):
    """Noisy label = the first usable annotation (the imported one); later ones are trusted."""
    return (usable[0][1] if usable else None), usable[1:]


_SOURCES = {"data": _from_data_field, "annotation": _from_first_annotation}


def _annotator(annotation: dict):
    who = annotation.get("completed_by")
    return who.get("id") if isinstance(who, dict) else who


def _team_majority(usable: list[tuple[dict, int]]) -> tuple[int | None, float | None, int]:
    """(majority label, agreement, voters): one vote per annotator (their latest annotation);
    a tie goes to the label whose first vote came earliest.  ``usable`` is in creation order."""
    latest: dict = {}
    for annotation, idx in usable:
        who = _annotator(annotation)
        if who not in latest or _order_key(annotation, "updated_at") >= _order_key(latest[who][0], "updated_at"):
            latest[who] = (annotation, idx)
    if not latest:
        return None, None, 0
    votes: dict[int, list] = {}
    for annotation, idx in latest.values():
        votes.setdefault(idx, []).append(_order_key(annotation, "created_at"))
    label = min(votes, key=lambda k: (-len(votes[k]), min(votes[k])))
    return label, len(votes[label]) / len(latest), len(latest)


def extract_task_labels(task: dict, info: LabelConfigInfo, *, label_source: str = "data",
                        label_field: str = "label", experts: frozenset = frozenset(),
                        trust_ground_truth: bool = False) -> TaskLabels:
    """Noisy and trusted label of one task (the rule is in the module docstring);
    ``experts``: the user ids whose annotations are trusted."""
    invalid: list[str] = []
    usable: list[tuple[dict, int]] = []
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        idx, raw = _annotation_choice(annotation, info)
        if idx is None:
            if raw is not None:
                invalid.append(raw)
            continue
        usable.append((annotation, idx))
    usable.sort(key=lambda pair: _order_key(pair[0], "created_at"))

    try:
        source = _SOURCES[label_source]
    except KeyError:
        raise ValueError(f"label_source must be one of {sorted(_SOURCES)}, got {label_source!r}") from None
    authoritative = [(a, i) for a, i in usable
                     if (trust_ground_truth and a.get("ground_truth")) or _annotator(a) in experts]
    agreement, voters = None, 0
    if experts:
        team = [(a, i) for a, i in usable if (a, i) not in authoritative]
        if label_source == "annotation":
            noisy, agreement, voters = _team_majority(team)
        else:
            noisy, _ = source(task, [], info, label_field, invalid)
        trusted_pool = authoritative
    else:
        noisy, trusted_pool = source(task, [p for p in usable if p not in authoritative], info, label_field, invalid)
        trusted_pool = list(trusted_pool) + authoritative
        if label_source == "annotation" and noisy is None and authoritative:
            noisy = authoritative[0][1]
    trusted = None
    if trusted_pool:
        trusted = max(trusted_pool, key=lambda pair: _order_key(pair[0], "updated_at"))[1]
    return TaskLabels(task_id=int(task["id"]), noisy=noisy, trusted=trusted, invalid_labels=tuple(invalid),
                      agreement=agreement, annotators=voters)


def extract_labels(tasks: Iterable[dict], info: LabelConfigInfo, *, label_source: str = "data",
                   label_field: str = "label", experts: frozenset = frozenset(),
                   trust_ground_truth: bool = False) -> list[TaskLabels]:
    """:func:`extract_task_labels` for every task; logs labels that are not in the config."""
    out = []
    bad: dict[str, int] = {}
    for task in tasks:
        tl = extract_task_labels(task, info, label_source=label_source, label_field=label_field, experts=experts,
                                 trust_ground_truth=trust_ground_truth)
        for raw in tl.invalid_labels:
            bad[raw] = bad.get(raw, 0) + 1
        out.append(tl)
    if bad:
        logger.warning("labels not in the labelling config were ignored: %s (classes: %s)",
                       dict(sorted(bad.items())[:20]), list(info.class_names))
    return out
