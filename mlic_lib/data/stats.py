"""Label statistics of a multi-hot label matrix: counts, co-occurrence, conditional probabilities.

These are the quantities behind the papers' analyses: the co-occurrence matrix (ML-GCN ``adj``
format: ``e_ij`` = number of images with both i and j, ``n_i`` = images with i), the conditional
probability ``P(j | i) = e_ij / n_i`` (CPSD Eq. 1, AssocFormer's target association), class
frequencies and head/medium/tail groups (LTML).
"""

from __future__ import annotations

import numpy as np


def _as_binary(targets) -> np.ndarray:
    t = np.asarray(targets)
    if t.ndim != 2:
        raise ValueError(f"targets must be a 2-D (images, classes) matrix, got shape {t.shape}")
    if t.shape[0] == 0:
        raise ValueError("targets has no rows: statistics of an empty label set are undefined")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("targets must be multi-hot (0/1); convert VOC {1,0,-1} labels with (labels == 1)")
    return t.astype(np.float64)


def class_counts(targets) -> np.ndarray:
    """``n_i``: number of images that contain class i, shape (C,)."""
    return _as_binary(targets).sum(0).astype(np.int64)


def cooccurrence(targets) -> np.ndarray:
    """``e_ij``: number of images containing both i and j, shape (C, C); the diagonal is ``n_i``."""
    t = _as_binary(targets)
    return (t.T @ t).astype(np.int64)


def conditional_probability(counts: np.ndarray, nums: np.ndarray | None = None) -> np.ndarray:
    """``P(j | i) = e_ij / n_i`` (row i conditions on class i). Rows of absent classes are 0.

    ``counts`` is either a co-occurrence matrix (then ``nums`` defaults to its diagonal) or, when it is
    not square, a label matrix from which the co-occurrence is computed first.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {counts.shape}")
    if counts.shape[0] != counts.shape[1]:
        counts = cooccurrence(counts).astype(np.float64)
    n = np.diag(counts) if nums is None else np.asarray(nums, dtype=np.float64)
    if n.shape != (counts.shape[0],):
        raise ValueError(f"nums must have shape ({counts.shape[0]},), got {n.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n[:, None] > 0, counts / n[:, None], 0.0)
    return p


def class_frequency(targets) -> np.ndarray:
    """Fraction of images that contain each class, shape (C,)."""
    t = _as_binary(targets)
    return t.mean(0)


def labels_per_image(targets) -> np.ndarray:
    """Number of positive labels of each image, shape (N,)."""
    return _as_binary(targets).sum(1).astype(np.int64)


def cooccurring_classes(targets) -> np.ndarray:
    """For each class, how many *other* classes ever appear with it (LTML Fig. 5), shape (C,)."""
    e = cooccurrence(targets)
    np.fill_diagonal(e, 0)
    return (e > 0).sum(1)


def shuffled_cooccurring_classes(targets, n_shuffles: int = 20, seed: int = 0) -> np.ndarray:
    """A null reference for :func:`cooccurring_classes`: the same counts on label matrices whose classes are
    *independent*, each class's column shuffled across the images on its own (every class keeps its number of
    images; which classes meet becomes chance). Shape ``(n_shuffles, C)``; the shuffles come from one
    ``np.random.default_rng(seed)``, column by column, so a call is reproducible. A frequent class meets more
    classes by chance alone; this says how many."""
    t = _as_binary(targets)
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    rng = np.random.default_rng(seed)
    out = np.empty((n_shuffles, t.shape[1]), dtype=np.int64)
    for k in range(n_shuffles):
        out[k] = cooccurring_classes(np.stack([rng.permutation(col) for col in t.T], axis=1))
    return out


def head_medium_tail(counts, head_min: int, tail_max: int) -> dict[str, np.ndarray]:
    """Split classes by training-image count: head ``n >= head_min``, tail ``n <= tail_max``, rest medium.

    DistributionBalancedLoss / LTML use head >= 100 and tail < 20 (<= 19) images on VOC-LT and COCO-LT.
    """
    counts = np.asarray(counts)
    if head_min <= tail_max:
        raise ValueError(f"head_min ({head_min}) must exceed tail_max ({tail_max})")
    groups = {
        "head": np.flatnonzero(counts >= head_min),
        "medium": np.flatnonzero((counts < head_min) & (counts > tail_max)),
        "tail": np.flatnonzero(counts <= tail_max),
    }
    return groups
