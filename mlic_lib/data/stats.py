"""Label statistics of a multi-hot label matrix: counts, co-occurrence, conditional probabilities.

These are the quantities behind the papers' analyses: the co-occurrence matrix (ML-GCN ``adj``
format: ``e_ij`` = number of images with both i and j, ``n_i`` = images with i), the conditional
probability ``P(j | i) = e_ij / n_i`` (CPSD Eq. 1, AssocFormer's target association), class
frequencies and head/medium/tail groups (LTML); and, for drawn scenes, how crowded their objects are
(:func:`box_coverage`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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

    ``counts`` is a co-occurrence matrix (:func:`cooccurrence`; ``nums`` defaults to its diagonal). A label
    matrix is refused rather than guessed from its shape (one with as many images as classes is square too):
    pass ``cooccurrence(labels)``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be a square (classes, classes) co-occurrence matrix, got shape {counts.shape}; "
                         "for a label matrix (images, classes) pass stats.cooccurrence(labels)")
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


def mean_other_labels(targets) -> np.ndarray:
    """For each class, the mean number of *other* labels on the images that hold it, shape (C,); NaN for a class
    without images. The second reading of LTML Fig. 5's "number of co-occurred classes on the same image"
    (:func:`cooccurring_classes` is the first: distinct partners over the whole set)."""
    t = _as_binary(targets).astype(np.float64)
    counts = t.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, t.T @ (t.sum(1) - 1.0) / counts, np.nan)


def curveball_shuffle(targets, steps: int = 50, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """A random binary label matrix with the same labels per image *and* images per class as ``targets``:
    ``steps`` rounds of the global curveball algorithm (Carstens, Berger & Strona 2016; Strona et al. 2014's
    curveball, every row in one round). Each round pairs the images at random; each pair keeps the classes both
    have and deals out the classes only one has, at random, each image keeping its count. The chain converges to
    the uniform distribution over such matrices (a test checks it on a small case); on VOC-LT / COCO-LT the
    co-occurrence counts settle within about 20 rounds. Returns a boolean ``(N, C)`` array."""
    t = _as_binary(targets).astype(bool)  # a new array: the rounds below swap in place
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    m = len(t) // 2 * 2  # an odd image out sits out one round
    for _ in range(steps):
        order = rng.permutation(len(t))
        a, b = order[0:m:2], order[1:m:2]
        ra, rb = t[a], t[b]
        both, only = ra & rb, ra ^ rb
        u = rng.random(ra.shape)
        u[~only] = 2.0  # the classes to deal first, in random order
        rank = np.argsort(np.argsort(u, axis=1), axis=1)
        to_a = only & (rank < (ra & only).sum(1, keepdims=True))
        t[a], t[b] = both | to_a, both | (only & ~to_a)
    return t


#: What :func:`shuffled_cooccurring_classes` keeps: the images per class, or those and the labels per image.
NULL_MARGINS = ("classes", "both")


def shuffled_cooccurring_classes(targets, n_shuffles: int = 20, seed: int = 0, keep: str = "classes",
                                 steps: int = 50, statistic: Callable[[np.ndarray], np.ndarray] | None = None
                                 ) -> np.ndarray:
    """A null reference for :func:`cooccurring_classes`: the same counts on label matrices in which which classes
    meet is chance. Shape ``(n_shuffles, C)``; the shuffles come from one ``np.random.default_rng(seed)``, so a
    call is reproducible. A frequent class meets more classes by chance alone; this says how many.
    ``statistic`` (default :func:`cooccurring_classes`) is what is computed per shuffle, e.g.
    :func:`mean_other_labels`; the same ``seed`` gives the same shuffles whatever it is.

    ``keep='classes'``: each class's column is shuffled across the images on its own; every class keeps its number
    of images, but the number of labels per image changes (some images get more labels than any real one, some
    none). ``keep='both'``: :func:`curveball_shuffle` with ``steps`` rounds keeps the labels per image too, the
    right null when the number of partners a class can have is capped by the labels an image holds."""
    t = _as_binary(targets)
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    if keep not in NULL_MARGINS:
        raise ValueError(f"keep must be one of {NULL_MARGINS}, got {keep!r}")
    statistic = statistic or cooccurring_classes
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_shuffles):
        shuffled = (np.stack([rng.permutation(col) for col in t.T], axis=1) if keep == "classes"
                    else curveball_shuffle(t, steps, rng))
        out.append(statistic(shuffled))
    return np.stack(out)


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


def box_coverage(boxes: Sequence[np.ndarray], canvas: int) -> np.ndarray:
    """How crowded drawn scenes are: for every object of every image, the share of its box that lies inside the
    union of the *other* objects' boxes of the same image (0: nothing over it, 1: its box wholly under others').

    ``boxes``: one ``(k, 5)`` array per image with rows ``(class, x0, y0, x1, y1)`` in half-open pixels of a
    ``canvas x canvas`` image (:class:`mlic_lib.data.scenes.SceneSet`'s ``boxes``). The boxes bound the objects'
    ink, not the ink itself: a part of a box under other boxes is where other objects *may* cover this one (a
    digit's strokes can show through the gaps of another's). Returns one float per object, images in order (NaN for
    a box of no area)."""
    if not isinstance(canvas, int | np.integer) or canvas < 1:
        raise ValueError(f"canvas must be a positive whole number of pixels, got {canvas!r}")
    out = []
    for i, b in enumerate(boxes):
        b = np.asarray(b).reshape(-1, 5)
        xy = b[:, 1:].astype(np.int64)
        if (xy < 0).any() or (xy > canvas).any() or (xy[:, 2] < xy[:, 0]).any() or (xy[:, 3] < xy[:, 1]).any():
            raise ValueError(f"image {i} has a box outside the {canvas}-px canvas or with x1 < x0 / y1 < y0: "
                             f"{b.tolist()}")
        depth = np.zeros((canvas, canvas), dtype=np.int32)  # how many boxes cover each pixel
        for x0, y0, x1, y1 in xy:
            depth[y0:y1, x0:x1] += 1
        for x0, y0, x1, y1 in xy:
            region = depth[y0:y1, x0:x1]
            out.append(float((region > 1).mean()) if region.size else np.nan)
    return np.asarray(out, dtype=np.float64)
