"""Datasets with ground truth for simulations: digits, .npz, ImageFolder, the original's HDF5.

Every loader returns a :class:`LabelledImages`; :func:`make_imbalanced` and
:func:`inject_noise` turn a clean, balanced one into the imbalanced, noisy data
the method is for, with a seed.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.data import as_image_array, load_image

logger = logging.getLogger(__name__)

# Separate random streams per use: with one seed for everything, a "random"
# ranking drawn with the data's seed would replay the very draw that chose
# which labels to flip.
_IMBALANCE_STREAM, _NOISE_STREAM = 101, 102
NOISE_KINDS = ("symmetric", "class_dependent", "pair_random")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


@dataclass(frozen=True)
class LabelledImages:
    """images (N, H, W, C) uint8 or float in [0, 1]; labels (N,) as given; labels_true (N,) or None."""

    images: np.ndarray
    labels: np.ndarray
    labels_true: np.ndarray | None
    class_names: tuple[str, ...]

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.labels_true is not None and len(self.labels_true) != len(self.labels):
            raise ValueError(f"{len(self.labels_true)} true labels but {len(self.labels)} given labels")
        for name, values in (("labels", self.labels), ("labels_true", self.labels_true)):
            if values is not None and len(values) and (values.min() < 0 or values.max() >= len(self.class_names)):
                raise ValueError(f"{name} must lie in [0, {len(self.class_names)}) for classes "
                                 f"{list(self.class_names)}; found {sorted(set(values.tolist()))[:10]}...")

    def subset(self, idx: np.ndarray) -> "LabelledImages":
        return replace(self, images=self.images[idx], labels=self.labels[idx],
                       labels_true=None if self.labels_true is None else self.labels_true[idx])


def load_digits_dataset() -> LabelledImages:
    """scikit-learn's bundled digits: 1797 8x8 grey images, 10 classes, clean labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]  # values 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    return LabelledImages(images, labels, labels.copy(), tuple(str(c) for c in range(10)))


def load_npz(path: str | Path) -> tuple[LabelledImages, LabelledImages | None]:
    """The simulation's .npz (see ../shared/INTERFACES.md): the training set and the optional test set."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .npz file (numpy.savez writes one)")
    with np.load(path, allow_pickle=False) as data:
        missing = {"images", "labels_noisy"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; it holds {sorted(data.files)}")
        labels = _int_labels(data["labels_noisy"], "labels_noisy")
        if not len(labels):
            raise ValueError(f"{path} holds no samples (labels_noisy is empty)")
        labels_true = _int_labels(data["labels_true"], "labels_true") if "labels_true" in data.files else None
        num_classes = int(max(labels.max(), -1 if labels_true is None else labels_true.max())) + 1
        class_names = tuple(str(c) for c in data["class_names"]) if "class_names" in data.files else \
            tuple(str(c) for c in range(num_classes))
        train = LabelledImages(as_image_array(data["images"]), labels, labels_true, class_names)
        test = None
        if "test_images" in data.files or "test_labels" in data.files:
            if not {"test_images", "test_labels"} <= set(data.files):
                raise ValueError(f"{path} must hold both test_images and test_labels, or neither")
            test_labels = _int_labels(data["test_labels"], "test_labels")
            test = LabelledImages(as_image_array(data["test_images"]), test_labels, test_labels, class_names)
    return train, test


def _int_labels(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {values.dtype}")
    if len(values) and values.min() < 0:
        raise ValueError(f"{name} holds negative class indices")
    return values.astype(np.int64)


def load_image_folder(root: str | Path, *, image_size: int, channels: int) -> LabelledImages:
    """torchvision's ImageFolder layout: root/<class name>/<image>, classes in sorted order.

    The folder names are taken as the true labels (use inject_noise for a
    simulation).  Unreadable files are skipped with a warning naming each.
    """
    root = Path(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not class_dirs:
        raise ValueError(f"{root} has no class folders (expected root/<class>/<image files>)")
    images, labels, skipped = [], [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    images.append(load_image(file, image_size=image_size, channels=channels))
                    labels.append(label)
                except ValueError as error:
                    skipped.append(str(error))
    for message in skipped:
        logger.warning("Skipped: %s", message)
    if not images:
        raise ValueError(f"no readable images under {root}")
    labels = np.asarray(labels, dtype=np.int64)
    return LabelledImages(np.stack(images), labels, labels.copy(), tuple(d.name for d in class_dirs))


def load_hdf5(path: str | Path, *, class_names: tuple[str, ...] | None = None) -> LabelledImages:
    """The original code's HDF5 layout: dataset/images (N, H, W[, C]) uint8 and dataset/targets (N,)."""
    import h5py

    with h5py.File(path, "r") as handle:
        if "dataset/images" not in handle or "dataset/targets" not in handle:
            raise ValueError(f"{path} lacks dataset/images or dataset/targets")
        images = as_image_array(handle["dataset/images"][()])
        labels = _int_labels(handle["dataset/targets"][()].reshape(-1), "dataset/targets")
    names = class_names or tuple(str(c) for c in range(int(labels.max()) + 1))
    return LabelledImages(images, labels, labels.copy(), names)


def class_sizes(max_size: int, num_classes: int, *, imbalance_ratio: float, kind: str) -> np.ndarray:
    """Per-class sizes, largest first: "long_tailed" (exponential decay) or "step" (half the classes rare)."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if kind == "long_tailed":
        sizes = max_size * imbalance_ratio ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    elif kind == "step":
        sizes = np.where(np.arange(num_classes) < (num_classes + 1) // 2, max_size, max_size / imbalance_ratio)
    else:
        raise ValueError(f"unknown imbalance kind {kind!r}; choose 'long_tailed' or 'step'")
    return np.maximum(np.floor(sizes), 1).astype(np.int64)


def make_imbalanced(data: LabelledImages, *, imbalance_ratio: float, kind: str = "long_tailed",
                    seed: int = 0) -> LabelledImages:
    """Subsample each class (by its true label) to an imbalanced profile; class 0 stays the largest."""
    truth = data.labels_true if data.labels_true is not None else data.labels
    num_classes = len(data.class_names)
    available = np.bincount(truth, minlength=num_classes)
    sizes = np.minimum(class_sizes(int(available.min()), num_classes, imbalance_ratio=imbalance_ratio, kind=kind),
                       available)
    rng = np.random.default_rng([seed, _IMBALANCE_STREAM])
    keep = np.concatenate([rng.choice(np.flatnonzero(truth == c), size=sizes[c], replace=False)
                           for c in range(num_classes)])
    return data.subset(np.sort(keep))


def inject_noise(data: LabelledImages, *, rate: float, kind: str = "symmetric", seed: int = 0) -> LabelledImages:
    """Flip given labels with probability ``rate``, keeping the truth in labels_true.

    "symmetric": to a different class chosen uniformly (the paper's noise).
    "class_dependent": class c goes to c + 1 (mod K), the pair-flip noise of the
    Co-teaching paper: look-alike classes confused systematically.
    "pair_random": pair-flip to a random fixed partner, class c to perm[c] for a
    random permutation with no fixed point (drawn from the same seeded stream):
    on long-tailed data c + 1 is always the next smaller class, whereas here a
    common class may pour its wrong labels into a rare label or the reverse.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    truth = data.labels_true if data.labels_true is not None else data.labels
    num_classes = len(data.class_names)
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    flip = rng.random(len(truth)) < rate
    noisy = truth.copy()
    if kind == "symmetric":
        offsets = rng.integers(1, num_classes, size=len(truth))
        noisy[flip] = (truth[flip] + offsets[flip]) % num_classes
    elif kind == "class_dependent":
        noisy[flip] = (truth[flip] + 1) % num_classes
    elif kind == "pair_random":
        noisy[flip] = _derangement(num_classes, rng)[truth[flip]]
    else:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {NOISE_KINDS}")
    return replace(data, labels=noisy, labels_true=truth.copy())


def _derangement(num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of range(num_classes) with no fixed point (rejection: about e tries)."""
    while True:
        perm = rng.permutation(num_classes)
        if num_classes < 2 or (perm != np.arange(num_classes)).all():
            return perm


def stratified_split(labels: np.ndarray, *, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, second) with ``fraction`` of each class in the second part."""
    rng = np.random.default_rng(seed)
    second = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        second.extend(idx[: int(round(fraction * len(idx)))])
    second = np.sort(np.asarray(second, dtype=np.int64))
    first = np.setdiff1d(np.arange(len(labels)), second)
    return first, second
