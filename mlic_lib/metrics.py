"""Evaluation metrics for multi-label image classification (MLIC).

All functions take a score matrix ``scores`` of shape ``(N, C)`` (``N`` images, ``C`` classes)
and a binary ground-truth matrix ``targets`` of the same shape. Scores may be probabilities,
logits or any other monotone score: the ranking metrics (AP, mAP) only depend on the order of
the scores within each class. NumPy arrays and PyTorch tensors (any device; they are detached
and copied to the CPU) are accepted. Every computation is vectorised over classes and samples.

Metrics
-------
**Average precision (AP)** of class ``c`` is the area under its precision-recall curve in the
step-wise form used by :func:`sklearn.metrics.average_precision_score`: with the distinct
scores of the class taken as thresholds in decreasing order,

.. math:: \\mathrm{AP}_c = \\sum_n (R_n - R_{n-1}) P_n ,

where ``P_n`` and ``R_n`` are the precision and recall when every image scoring at least the
``n``-th threshold is called positive. Images with *tied* scores therefore enter together:
the precision used for each of them is the one at the end of its tie group. This is the
non-interpolated AP that the MLIC literature (ML-GCN, ASL, Query2Label, ...) reports for
PASCAL VOC 2007 and MS-COCO; it is *not* the 11-point interpolated VOC2007 detection AP.

**Mean average precision (mAP)** is the mean of the per-class APs over the classes that have
at least one positive image (a class without positives has an undefined AP, reported as NaN).

**Threshold metrics** (CP, CR, CF1, OP, OR, OF1) follow the ML-GCN evaluation code (Chen et
al., CVPR 2019); see :func:`threshold_metrics` for the exact conventions.

**Example-based metrics** judge each image's predicted label *set* (:func:`example_metrics`): the Hamming
loss is the share of wrong image-label decisions, the subset accuracy the share of images whose whole set is
right. The MLIC papers in this book do not report them; they are the classic multi-label metrics of the
wider literature.

Ignored entries ("difficult" labels)
------------------------------------
PASCAL VOC marks some objects as *difficult*; the MLIC protocol ignores them, i.e. the pair
(image, class) counts neither as a positive nor as a negative. Every function accepts an
optional boolean ``mask`` of shape ``(N, C)``: ``False`` removes the entry from every count.
:func:`voc_targets` turns a VOC label matrix with values ``{1, 0, -1}`` into
``(targets, mask)``.

Examples
--------
>>> import numpy as np
>>> from mlic_lib.metrics import mean_average_precision, multilabel_report
>>> rng = np.random.default_rng(0)
>>> targets = rng.random((100, 5)) < 0.3
>>> scores = targets + rng.normal(scale=0.5, size=targets.shape)
>>> 0.0 <= mean_average_precision(scores, targets) <= 1.0
True
>>> sorted(multilabel_report(scores, targets))[:4]
['AP', 'CF1', 'CF1_top3', 'CP']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "average_precision",
    "chance_map",
    "constant_predictor_bce",
    "example_metrics",
    "group_map",
    "mean_average_precision",
    "multilabel_report",
    "threshold_metrics",
    "voc_targets",
]

#: Keys of the dictionary returned by :func:`threshold_metrics`, in order.
THRESHOLD_KEYS: tuple[str, ...] = ("CP", "CR", "CF1", "OP", "OR", "OF1")


# --------------------------------------------------------------------------------------------
# Input conversion and validation
# --------------------------------------------------------------------------------------------
def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a NumPy array; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):  # a torch.Tensor
        x = x.detach().cpu()
        try:
            return x.numpy()
        except TypeError:  # bfloat16 and other dtypes NumPy does not know
            return x.float().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} could not be converted to a NumPy array ({err}); pass a numeric array or tensor "
            "of shape (n_samples, n_classes)"
        ) from err


def _check_binary(arr: np.ndarray, name: str, hint: str) -> np.ndarray:
    """Return ``arr`` as a bool array, raising if it holds anything other than 0/1."""
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be a bool or 0/1 numeric array; got dtype {arr.dtype}. {hint}")
    is_one = arr == 1
    bad = ~(is_one | (arr == 0))
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        examples = np.unique(arr[bad])[:5].tolist()
        raise ValueError(
            f"{name} must be binary (0/1 or bool); found {n_bad} entries with other values "
            f"(e.g. {examples}). {hint}"
        )
    return is_one


def _validate(
    scores: Any, targets: Any, mask: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Convert and check the common ``(scores, targets, mask)`` inputs of every public metric.

    Returns
    -------
    scores : np.ndarray
        ``(N, C)`` floating array (float32/float64 kept, anything else converted to float64).
    targets : np.ndarray
        ``(N, C)`` bool array.
    mask : np.ndarray or None
        ``(N, C)`` bool array (``True`` = evaluate the entry) or ``None``.

    Raises
    ------
    ValueError
        On a wrong number of dimensions, mismatched shapes, no rows or no columns, non-finite
        scores, non-binary targets or a malformed mask. Messages name the problem and the fix.
    """
    s = _to_numpy(scores, "scores")
    t = _to_numpy(targets, "targets")
    for name, arr in (("scores", s), ("targets", t)):
        if arr.ndim != 2:
            raise ValueError(
                f"{name} must be a 2-D array of shape (n_samples, n_classes); got shape {arr.shape} "
                f"({arr.ndim}-D). For a single sample use {name}[None, :]; flatten extra dimensions first."
            )
    if s.shape != t.shape:
        raise ValueError(
            f"scores and targets must have the same shape (n_samples, n_classes); got scores {s.shape} "
            f"and targets {t.shape}. Check that both come from the same split and class list."
        )
    n, c = s.shape
    if n == 0:
        raise ValueError(
            f"scores and targets have 0 rows (shape {s.shape}): need at least one sample to evaluate; "
            "check that the data loader / split is not empty."
        )
    if c == 0:
        raise ValueError(f"scores and targets have 0 columns (shape {s.shape}): need at least one class.")

    if s.dtype == np.bool_ or np.issubdtype(s.dtype, np.integer):
        s = s.astype(np.float64)
    elif s.dtype == np.float16:
        s = s.astype(np.float32)
    elif not np.issubdtype(s.dtype, np.floating):
        raise ValueError(f"scores must be a real numeric array; got dtype {s.dtype}.")
    n_bad = s.size - int(np.count_nonzero(np.isfinite(s)))
    if n_bad:
        raise ValueError(
            f"scores contain {n_bad} non-finite values (NaN or inf) out of {s.size}; check the model "
            "output (a diverging loss / exploding logits, a log of 0, a bad checkpoint) before "
            "computing metrics."
        )

    t = _check_binary(
        t,
        "targets",
        "For VOC-style labels {1, 0, -1} (present, difficult, absent) use "
        "mlic_lib.metrics.voc_targets(labels) to get (targets, mask).",
    )

    m = None
    if mask is not None:
        m = _to_numpy(mask, "mask")
        if m.shape != s.shape:
            raise ValueError(
                f"mask must have the same shape as scores and targets; got mask {m.shape} and scores "
                f"{s.shape}. Pass one bool per (sample, class) entry, False = ignore."
            )
        m = _check_binary(m, "mask", "Use a bool array: True = evaluate the entry, False = ignore it.")
    return s, t, m


# --------------------------------------------------------------------------------------------
# Label conversion
# --------------------------------------------------------------------------------------------
def voc_targets(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Split a PASCAL VOC label matrix with values ``{1, 0, -1}`` into ``(targets, mask)``.

    VOC classification labels use ``1`` for *present*, ``0`` for *difficult* (present but hard;
    ignored by the evaluation) and ``-1`` for *absent*.

    Parameters
    ----------
    labels : array_like or torch.Tensor
        Label matrix, usually of shape ``(N, C)``, with values in ``{1, 0, -1}`` only.

    Returns
    -------
    targets : np.ndarray
        ``int64`` array of the same shape: 1 where ``labels == 1``, 0 elsewhere (difficult
        entries get 0, and are excluded through ``mask``).
    mask : np.ndarray
        ``bool`` array of the same shape: ``False`` where ``labels == 0`` (difficult).

    Raises
    ------
    ValueError
        If ``labels`` holds any value other than 1, 0 and -1, or (non-empty) no -1 at all: 0/1 labels need no
        conversion, and this one would take every 0 for a difficult label and hide it from the evaluation.

    Examples
    --------
    >>> t, m = voc_targets([[1, 0, -1]])
    >>> t.tolist(), m.tolist()
    ([[1, 0, 0]], [[True, False, True]])
    """
    lab = _to_numpy(labels, "labels")
    if lab.dtype == np.bool_ or not np.issubdtype(lab.dtype, np.number):
        raise ValueError(f"labels must be numeric with values in {{1, 0, -1}}; got dtype {lab.dtype} "
                         "(0/1 or boolean labels need no conversion: pass them to the metrics as they are)")
    present = lab == 1
    difficult = lab == 0
    bad = ~(present | difficult | (lab == -1))
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        examples = np.unique(lab[bad])[:5].tolist()
        raise ValueError(
            f"VOC labels must take values in {{1, 0, -1}} (present, difficult, absent); found {n_bad} "
            f"entries with other values (e.g. {examples}). Labels that are already 0/1 need no conversion."
        )
    if lab.size and not np.any(lab == -1):
        raise ValueError("VOC labels hold -1 for every absent class, but these have no -1: they look like 0/1 "
                         "labels, which need no conversion (voc_targets would take every 0 for a difficult label "
                         "and hide it from the evaluation); pass them to the metrics as they are")
    return present.astype(np.int64), ~difficult


# --------------------------------------------------------------------------------------------
# Average precision
# --------------------------------------------------------------------------------------------
def _average_precision(s: np.ndarray, t: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Per-class AP on validated inputs (see :func:`average_precision`)."""
    n = s.shape[0]
    # Work class-major (C, N) so that every per-class operation runs over contiguous memory.
    s_cm = np.ascontiguousarray(s.T)
    pos = t if m is None else t & m
    order = np.argsort(-s_cm, axis=1)  # decreasing score; order inside a tie group does not matter
    s_sorted = np.take_along_axis(s_cm, order, axis=1)
    pos_sorted = np.take_along_axis(np.ascontiguousarray(pos.T), order, axis=1)
    tp = np.cumsum(pos_sorted, axis=1, dtype=np.int64)  # true positives down to each rank
    n_pos = tp[:, -1]
    if m is None:
        n_called = np.arange(1, n + 1, dtype=np.int64)  # TP + FP down to each rank
    else:  # masked entries are neither TP nor FP
        n_called = np.cumsum(np.take_along_axis(np.ascontiguousarray(m.T), order, axis=1), axis=1)
    # Precision at every rank. Where nothing is called yet (only masked entries so far) the
    # value is never used for a positive; max(., 1) just avoids 0 / 0.
    precision = tp / np.maximum(n_called, 1)

    # A threshold admits a whole run of tied scores, so every position takes the precision at
    # the last index of its tie group: ``end[i]`` is the smallest group-end index >= i, found
    # by a reverse running minimum.
    is_end = np.empty(s_sorted.shape, dtype=bool)
    np.not_equal(s_sorted[:, 1:], s_sorted[:, :-1], out=is_end[:, :-1])
    is_end[:, -1] = True
    if not is_end.all():  # else: no ties at all, the usual case for continuous scores
        idx = np.where(is_end, np.arange(n, dtype=np.intp), n - 1)
        end = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
        precision = np.take_along_axis(precision, end, axis=1)

    # sum_n (R_n - R_{n-1}) P_n = (1 / n_pos) * (sum over positives of the precision at the end
    # of their tie group): each positive raises the recall by 1 / n_pos at that threshold.
    ap_sum = np.where(pos_sorted, precision, 0.0).sum(axis=1)
    ap = np.full(ap_sum.shape, np.nan)
    np.divide(ap_sum, n_pos, out=ap, where=n_pos > 0)
    return ap


def average_precision(scores: Any, targets: Any, mask: Any = None) -> np.ndarray:
    """Per-class average precision, identical to :func:`sklearn.metrics.average_precision_score`.

    .. math:: \\mathrm{AP}_c = \\sum_n (R_n - R_{n-1}) P_n

    over the distinct scores of class ``c`` in decreasing order (``R_0 = 0``). Tied scores form
    one threshold, so the precision used for a tie group is the one at its end. The result does
    not depend on the order of tied entries nor on any strictly increasing transform of the
    scores (logits or sigmoid probabilities give the same AP, as long as the sigmoid keeps them apart: in
    float32 it is exactly 1.0 from a logit of about 16.7, hence the float64 scores of ``engine.evaluate``).

    Parameters
    ----------
    scores : array_like or torch.Tensor
        ``(N, C)`` scores, higher = more likely present. Must be finite.
    targets : array_like or torch.Tensor
        ``(N, C)`` ground truth with values in ``{0, 1}`` (or bool).
    mask : array_like or torch.Tensor, optional
        ``(N, C)`` bool; ``False`` entries (e.g. VOC *difficult*) are removed from the class's
        ranking: they count neither as true nor as false positives.

    Returns
    -------
    np.ndarray
        ``(C,)`` float64 AP per class; ``NaN`` for a class with no (unmasked) positive.

    Raises
    ------
    ValueError
        On malformed inputs (see the module docstring).

    Notes
    -----
    Implementation: one argsort per class (all classes at once), cumulative true and
    false positive counts, tie-group ends by a reverse running minimum, one gather. Cost
    ``O(N log N * C)`` time and a few ``N x C`` temporary arrays.
    """
    s, t, m = _validate(scores, targets, mask)
    return _average_precision(s, t, m)


def _nanmean_or_raise(ap: np.ndarray) -> float:
    """Mean of the non-NaN APs; raise if every class lacks a positive."""
    valid = ~np.isnan(ap)
    if not valid.any():
        raise ValueError(
            f"mAP is undefined: none of the {ap.size} classes has a positive (unmasked) example. "
            "Check the targets (all zeros?), the mask, or evaluate on a larger split."
        )
    return float(ap[valid].mean())


def mean_average_precision(scores: Any, targets: Any, mask: Any = None) -> float:
    """Mean of :func:`average_precision` over the classes that have at least one positive.

    Parameters
    ----------
    scores, targets, mask
        As in :func:`average_precision`.

    Returns
    -------
    float
        mAP in ``[0, 1]`` (multiply by 100 for the percentages quoted in papers).

    Raises
    ------
    ValueError
        On malformed inputs, or if no class has a positive (mAP undefined).
    """
    return _nanmean_or_raise(average_precision(scores, targets, mask))


def chance_map(targets: Any, mask: Any = None) -> float:
    """The mAP of a constant (tied) scorer: every image gets the same score, so each class's AP is its
    prevalence among the (unmasked) test images and mAP is their mean over the classes with a positive.
    A random ranking's expected AP is close to it for classes with many test positives and higher for
    classes with only a few (e.g. about 1.6 % against a prevalence of 0.7 % with 4 positives in 600
    images), so read it as the level of an uninformative model, not as a hard floor."""
    t = _to_numpy(targets, "targets")
    return mean_average_precision(np.zeros(t.shape, dtype=np.float32), t, mask)


def constant_predictor_bce(targets: Any) -> float:
    """Mean per-class binary cross-entropy (nats) of the best constant predictor, which outputs each
    class's training prevalence; the loss level of a model that has learned only how often each class
    appears.

    With ``p_c`` the fraction of the ``N`` rows of ``targets`` in which class ``c`` is present, the
    constant prediction ``p_c`` minimises the class's mean BCE, which is then the binary entropy

    .. math:: H(p_c) = -p_c \\log p_c - (1 - p_c) \\log(1 - p_c) ,

    and the result is ``mean_c H(p_c)``: the BCE averaged over classes and samples that a training
    loss (e.g. ``torch.nn.functional.binary_cross_entropy_with_logits``) starts near once the model
    has learned the class prevalences, and that a model must fall below to have learned more. The
    prevalences are clipped away from 0 and 1 before the logarithm, so a class that is never (or
    always) present contributes exactly 0 (``0 * log 0 = 0``).

    Parameters
    ----------
    targets : array-like or torch.Tensor, shape (N, C)
        Binary (0/1 or bool) labels of the training set.

    Raises
    ------
    ValueError
        If ``targets`` is not a 2-D array with at least one row, or is not binary.
    """
    t = _to_numpy(targets, "targets")
    if t.ndim != 2:
        raise ValueError(f"targets must be a 2-D array (n_samples, n_classes) of 0/1 labels; got shape {t.shape}")
    if t.shape[0] == 0:
        raise ValueError(f"targets has 0 rows (shape {t.shape}): the prevalences are undefined")
    t = _check_binary(t, "targets", "Pass the 0/1 training labels of shape (n_samples, n_classes).")
    p = t.mean(axis=0, dtype=np.float64)
    tiny = np.finfo(np.float64).tiny
    h = -(p * np.log(np.clip(p, tiny, 1.0)) + (1.0 - p) * np.log(np.clip(1.0 - p, tiny, 1.0)))
    return float(h.mean())


# --------------------------------------------------------------------------------------------
# Threshold-based metrics
# --------------------------------------------------------------------------------------------
def _safe_div(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def _harmonic(a: float, b: float) -> float:
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


def _threshold_metrics(
    s: np.ndarray, t: np.ndarray, m: np.ndarray | None, threshold: float, top_k: int | None,
    masked: str = "ignore",
) -> dict[str, float]:
    """Threshold metrics on validated inputs (see :func:`threshold_metrics`)."""
    pred = s >= threshold
    n_classes = s.shape[1]
    if top_k is not None and top_k < n_classes:
        # The k-th largest score of each row (a partition, no full sort). Scores above it are in
        # the top k; of the scores equal to it, the ones with the lowest class indices fill the
        # remaining places (the order a stable descending sort would give).
        kth = np.partition(s, n_classes - top_k, axis=1)[:, n_classes - top_k, None]
        above = s > kth
        tied = s == kth
        room = top_k - np.count_nonzero(above, axis=1, keepdims=True)
        pred &= above | (tied & (np.cumsum(tied, axis=1) <= room))
    if m is not None:
        t = t & m
        if masked == "ignore":
            pred &= m
    n_correct = np.count_nonzero(pred & t, axis=0).astype(np.float64)  # Nc
    n_pred = np.count_nonzero(pred, axis=0).astype(np.float64)  # Np
    n_gt = np.count_nonzero(t, axis=0).astype(np.float64)  # Ng

    per_class_p = np.divide(n_correct, n_pred, out=np.zeros_like(n_correct), where=n_pred > 0)
    cp = float(per_class_p.mean())
    has_gt = n_gt > 0
    cr = float((n_correct[has_gt] / n_gt[has_gt]).mean()) if has_gt.any() else 0.0
    op = _safe_div(n_correct.sum(), n_pred.sum())
    orr = _safe_div(n_correct.sum(), n_gt.sum())
    return {"CP": cp, "CR": cr, "CF1": _harmonic(cp, cr), "OP": op, "OR": orr, "OF1": _harmonic(op, orr)}


MASKED_MODES = ("ignore", "negative")


def _check_masked(masked: str) -> str:
    if masked not in MASKED_MODES:
        raise ValueError(f"masked must be 'ignore' (masked entries leave every count) or 'negative' (they count as "
                         f"negatives, as in the ML-GCN / SpliceMix evaluation code), got {masked!r}")
    return masked


def _check_threshold_args(threshold: float, top_k: int | None) -> tuple[float, int | None]:
    try:
        thr = float(threshold)
    except (TypeError, ValueError) as err:
        raise ValueError(f"threshold must be a real number, got {threshold!r}") from err
    if np.isnan(thr):
        raise ValueError("threshold must not be NaN (use 0.5 for probabilities, 0.0 for logits)")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        top_k = int(top_k)
    return thr, top_k


def threshold_metrics(
    scores: Any,
    targets: Any,
    threshold: float = 0.5,
    mask: Any = None,
    top_k: int | None = None,
    masked: str = "ignore",
) -> dict[str, float]:
    """Per-class and overall precision, recall and F1 at a fixed threshold (ML-GCN protocol).

    An entry is *predicted positive* when ``score >= threshold``, as in the ML-GCN evaluation code
    (SpliceMix's Sec. IV-A says "larger than 0.5"; the two differ only for a score of exactly 0.5,
    a logit of exactly 0). With ``top_k`` given, an
    entry is predicted positive when it is among the ``top_k`` highest scores of its row
    **and** ``score >= threshold`` -- the convention of the ML-GCN evaluation code (Chen et
    al., CVPR 2019) for the "top-3" numbers. The top-k ranking uses all entries of the row
    (masked ones included, the model does not know which labels are difficult); ties at the
    k-th place go to the lower class index.

    For class ``c``, with the masked entries removed, let ``Nc`` be the number of true
    positives, ``Np`` the number of predicted positives and ``Ng`` the number of ground-truth
    positives. Then

    * ``CP = mean_c Nc/Np`` over **all** ``C`` classes, a class with ``Np = 0`` contributing 0
      (as ``sklearn.metrics.precision_score(average='macro', zero_division=0)``);
    * ``CR = mean_c Nc/Ng`` over the classes with ``Ng > 0`` only (0 if there is none);
    * ``CF1 = 2 CP CR / (CP + CR)``, the harmonic mean of the two *averages* (ML-GCN's
      definition; this is *not* the mean of the per-class F1 scores);
    * ``OP = sum Nc / sum Np``, ``OR = sum Nc / sum Ng`` (micro averages over all entries);
    * ``OF1 = 2 OP OR / (OP + OR)``.

    Every ratio whose denominator is 0 is defined as 0.

    A masked entry (VOC "difficult") is never a ground-truth positive. With ``masked="ignore"`` (the default,
    as the VOC protocol treats difficult labels in AP) it leaves every count, so a prediction on it is neither
    right nor wrong. The ML-GCN evaluation code, which SpliceMix's reuses, sets difficult labels to 0 instead:
    ``masked="negative"`` reproduces that, a prediction on a masked entry then adds to ``Np`` (a false
    positive). The two differ only when ``mask`` is given; the papers' VOC tables report mAP, which both share.

    Parameters
    ----------
    scores, targets, mask
        As in :func:`average_precision`.
    threshold : float, default 0.5
        Decision threshold on ``scores`` (0.5 for probabilities; use 0.0 for logits).
    top_k : int, optional
        Restrict the predictions of every row to its ``top_k`` highest scores.
    masked : {"ignore", "negative"}, default "ignore"
        How masked entries count (see above).

    Returns
    -------
    dict
        Keys ``CP, CR, CF1, OP, OR, OF1``, each a float in ``[0, 1]``.
    """
    thr, top_k = _check_threshold_args(threshold, top_k)
    _check_masked(masked)
    s, t, m = _validate(scores, targets, mask)
    return _threshold_metrics(s, t, m, thr, top_k, masked)


def _example_metrics(s: np.ndarray, t: np.ndarray, m: np.ndarray | None, threshold: float) -> dict[str, float]:
    """Example-based metrics on validated inputs (see :func:`example_metrics`)."""
    wrong = (s >= threshold) != t
    if m is not None:
        wrong &= m
        n_entries = np.count_nonzero(m)
    else:
        n_entries = wrong.size
    return {"hamming_loss": _safe_div(np.count_nonzero(wrong), n_entries),
            "subset_accuracy": float(np.mean(~wrong.any(axis=1)))}


def example_metrics(scores: Any, targets: Any, threshold: float = 0.5, mask: Any = None) -> dict[str, float]:
    """Hamming loss and subset accuracy of the label sets ``scores >= threshold``.

    * ``hamming_loss``: the share of the ``N x C`` image-label decisions that are wrong (a missed label or a
      false one), as :func:`sklearn.metrics.hamming_loss` on the thresholded predictions. Frequent and rare
      classes weigh alike per decision, and with few labels per image a model that predicts nothing scores
      low: compare it with the label density ``targets.mean()``, the Hamming loss of predicting no label.
    * ``subset_accuracy``: the share of images whose predicted set equals the true set exactly, as
      :func:`sklearn.metrics.accuracy_score` on multi-label indicator matrices (one wrong label of twenty fails
      the image).

    Masked entries (VOC "difficult") are left out: they are neither right nor wrong decisions, and an image
    needs only its unmasked decisions right.

    Returns
    -------
    dict
        Keys ``hamming_loss`` and ``subset_accuracy``, floats in ``[0, 1]``.
    """
    thr, _ = _check_threshold_args(threshold, None)
    s, t, m = _validate(scores, targets, mask)
    return _example_metrics(s, t, m, thr)


# --------------------------------------------------------------------------------------------
# Class groups and report
# --------------------------------------------------------------------------------------------
def group_map(ap: Any, groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Mean AP over groups of classes (e.g. head / medium / tail by training frequency).

    Parameters
    ----------
    ap : array_like or torch.Tensor
        ``(C,)`` per-class AP, as returned by :func:`average_precision` (may contain NaN).
    groups : mapping of str to sequence of int
        Group name to class indices in ``[0, C)``.

    Returns
    -------
    dict
        Group name to the mean of the non-NaN APs of its classes (NaN if all are NaN).

    Raises
    ------
    ValueError
        If ``ap`` is not 1-D, a group is empty, or an index is not an integer in ``[0, C)``.
    """
    ap_arr = _to_numpy(ap, "ap")
    if ap_arr.ndim != 1:
        raise ValueError(f"ap must be a 1-D array of per-class APs; got shape {ap_arr.shape}")
    ap_arr = ap_arr.astype(np.float64)
    n_classes = ap_arr.shape[0]
    out: dict[str, float] = {}
    for name, members in groups.items():
        idx = np.asarray(list(members))
        if idx.size == 0:
            raise ValueError(f"class group {name!r} is empty; every group needs at least one class index")
        if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"class group {name!r} must hold integer class indices; got dtype {idx.dtype}")
        outside = idx[(idx < 0) | (idx >= n_classes)]
        if outside.size:
            raise ValueError(
                f"class group {name!r} has class index {int(outside[0])} out of range [0, {n_classes}) "
                f"(ap has {n_classes} classes); check the group definition against the class list"
            )
        vals = ap_arr[idx]
        vals = vals[~np.isnan(vals)]
        out[name] = float(vals.mean()) if vals.size else float("nan")
    return out


def multilabel_report(
    scores: Any,
    targets: Any,
    mask: Any = None,
    threshold: float = 0.5,
    groups: Mapping[str, Sequence[int]] | None = None,
    masked: str = "ignore",
) -> dict[str, Any]:
    """All the standard MLIC numbers in one dictionary.

    Parameters
    ----------
    scores, targets, mask
        As in :func:`average_precision`.
    threshold : float, default 0.5
        Decision threshold for the threshold metrics (use 0.0 for logits).
    groups : mapping of str to sequence of int, optional
        Class groups for :func:`group_map`.
    masked : {"ignore", "negative"}, default "ignore"
        How masked entries count in the threshold metrics (see :func:`threshold_metrics`); AP always ignores them.

    Returns
    -------
    dict
        ``'mAP'`` (float), ``'AP'`` (list of ``C`` floats, NaN for classes without positives),
        ``'CP', 'CR', 'CF1', 'OP', 'OR', 'OF1'`` (all predictions over the threshold), the same
        six with the suffix ``'_top3'`` (``top_k=3``, see :func:`threshold_metrics`),
        ``'hamming_loss'`` and ``'subset_accuracy'`` (:func:`example_metrics`) and, if ``groups`` is given,
        ``'mAP_<group>'`` for each group.

    Raises
    ------
    ValueError
        On malformed inputs, bad groups, or if no class has a positive.
    """
    thr, _ = _check_threshold_args(threshold, None)
    _check_masked(masked)
    s, t, m = _validate(scores, targets, mask)
    ap = _average_precision(s, t, m)
    report: dict[str, Any] = {"mAP": _nanmean_or_raise(ap), "AP": ap.tolist()}
    report.update(_threshold_metrics(s, t, m, thr, None, masked))
    top3 = _threshold_metrics(s, t, m, thr, 3, masked)
    report.update({f"{k}_top3": v for k, v in top3.items()})
    report.update(_example_metrics(s, t, m, thr))
    if groups is not None:
        report.update({f"mAP_{k}": v for k, v in group_map(ap, groups).items()})
    return report
