"""Tests for :mod:`mlic_lib.metrics` against scikit-learn and direct loop implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    log_loss,
    precision_score,
    recall_score,
)

from mlic_lib.metrics import (
    THRESHOLD_KEYS,
    average_precision,
    constant_predictor_bce,
    example_metrics,
    group_map,
    mean_average_precision,
    multilabel_report,
    threshold_metrics,
    voc_targets,
)


def _data(seed: int, n: int = 500, c: int = 20, rate: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Random binary targets and scores correlated with them (every class has positives)."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < rate).astype(np.int64)
    targets[0] = 1  # make sure every class has a positive ...
    targets[1] = 0  # ... and a negative
    scores = 1.0 / (1.0 + np.exp(-(2.0 * targets - 1.0 + rng.normal(scale=1.5, size=(n, c)))))
    return scores, targets


def _sklearn_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.array([average_precision_score(targets[:, c], scores[:, c]) for c in range(targets.shape[1])])


# --------------------------------------------------------------------------------------------
# Average precision
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ap_matches_sklearn_continuous(seed):
    scores, targets = _data(seed)
    np.testing.assert_allclose(average_precision(scores, targets), _sklearn_ap(scores, targets), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [0, 1, 2])
def test_ap_matches_sklearn_with_ties(seed, decimals):
    scores, targets = _data(seed)
    scores = np.round(scores, decimals)  # decimals=0: only two distinct values, huge tie groups
    assert len(np.unique(scores)) < scores.size // 4
    np.testing.assert_allclose(average_precision(scores, targets), _sklearn_ap(scores, targets), atol=1e-6)


def test_ap_all_scores_tied_equals_prevalence():
    targets = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    ap = average_precision(np.zeros((4, 2)), targets)
    np.testing.assert_allclose(ap, [0.5, 0.5])


def test_chance_map_is_mean_prevalence_and_the_random_scorer_level():
    from mlic_lib.metrics import chance_map

    _, targets = _data(3, n=400, c=6, rate=0.15)
    prevalence = targets.mean(0)
    assert chance_map(targets) == pytest.approx(prevalence[prevalence > 0].mean())
    rng = np.random.default_rng(0)
    random_maps = [_sklearn_ap(rng.random(targets.shape), targets).mean() for _ in range(100)]
    assert chance_map(targets) == pytest.approx(np.mean(random_maps), abs=0.02)
    mask = np.ones_like(targets)
    mask[:100] = 0  # masked rows do not count
    assert chance_map(targets, mask) == pytest.approx(targets[100:].mean(0)[targets[100:].sum(0) > 0].mean())


def test_ap_perfect_and_worst_ranking():
    targets = np.array([[1], [1], [0], [0]])
    assert average_precision(np.array([[4.0], [3.0], [2.0], [1.0]]), targets)[0] == pytest.approx(1.0)
    # Positives ranked last: AP = (1/2)(1/3 + 2/4).
    worst = average_precision(np.array([[1.0], [2.0], [3.0], [4.0]]), targets)[0]
    assert worst == pytest.approx(0.5 * (1 / 3 + 2 / 4))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("decimals", [None, 1])
def test_ap_mask_equals_sklearn_on_unmasked_rows(seed, decimals):
    scores, targets = _data(seed)
    if decimals is not None:
        scores = np.round(scores, decimals)
    rng = np.random.default_rng(100 + seed)
    mask = rng.random(scores.shape) < 0.7
    mask[0] = True  # keep the guaranteed positive of every class
    expected = [
        average_precision_score(targets[mask[:, c], c], scores[mask[:, c], c]) for c in range(scores.shape[1])
    ]
    np.testing.assert_allclose(average_precision(scores, targets, mask), expected, atol=1e-6)


def test_ap_masked_entries_are_neither_tp_nor_fp():
    # A masked negative scored highest must not lower the AP; a masked positive must not count.
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    targets = np.array([[0], [1], [1], [0]])
    mask = np.array([[False], [True], [True], [True]])
    assert average_precision(scores, targets, mask)[0] == pytest.approx(1.0)
    mask_pos = np.array([[True], [False], [True], [True]])
    assert average_precision(scores, targets, mask_pos)[0] == pytest.approx(0.5)


def test_class_without_positive_is_nan_and_ignored_by_map():
    scores, targets = _data(0, c=6)
    targets[:, 2] = 0
    ap = average_precision(scores, targets)
    assert np.isnan(ap[2])
    assert not np.isnan(np.delete(ap, 2)).any()
    assert mean_average_precision(scores, targets) == pytest.approx(np.delete(ap, 2).mean())
    # Positives that are all masked count as no positive.
    targets2 = targets.copy()
    targets2[:5, 2] = 1
    mask = np.ones_like(targets2, dtype=bool)
    mask[:5, 2] = False
    assert np.isnan(average_precision(scores, targets2, mask)[2])


def test_map_without_any_positive_raises():
    with pytest.raises(ValueError, match="none of the 3 classes has a positive"):
        mean_average_precision(np.random.default_rng(0).random((10, 3)), np.zeros((10, 3)))


def test_ap_invariant_to_monotone_transform():
    rng = np.random.default_rng(5)
    targets = rng.random((300, 10)) < 0.3
    logits = rng.normal(size=(300, 10)) * 3 + targets
    probs = 1.0 / (1.0 + np.exp(-logits))
    ap_logits = average_precision(logits, targets)
    np.testing.assert_allclose(average_precision(probs, targets), ap_logits, atol=1e-12)
    np.testing.assert_allclose(average_precision(logits**3 + 7, targets), ap_logits, atol=1e-12)


def test_accepts_torch_tensors_and_bool_targets():
    scores, targets = _data(3, n=100, c=5)
    expected = average_precision(scores, targets)
    got = average_precision(torch.from_numpy(scores).float(), torch.from_numpy(targets).bool())
    np.testing.assert_allclose(got, _sklearn_ap(scores.astype(np.float32), targets), atol=1e-6)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_ap_row_order_does_not_matter():
    scores, targets = _data(7, c=8)
    scores = np.round(scores, 1)
    perm = np.random.default_rng(0).permutation(scores.shape[0])
    np.testing.assert_allclose(
        average_precision(scores[perm], targets[perm]), average_precision(scores, targets)
    )


# --------------------------------------------------------------------------------------------
# VOC labels
# --------------------------------------------------------------------------------------------
def test_voc_targets_conversion():
    labels = np.array([[1, 0, -1], [-1, 1, 0]])
    targets, mask = voc_targets(labels)
    np.testing.assert_array_equal(targets, [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(mask, [[True, False, True], [True, True, False]])
    assert mask.dtype == bool
    t2, m2 = voc_targets(torch.tensor(labels))
    np.testing.assert_array_equal(t2, targets)
    np.testing.assert_array_equal(m2, mask)


def test_voc_targets_rejects_other_values():
    with pytest.raises(ValueError, match=r"values in \{1, 0, -1\}"):
        voc_targets(np.array([[1, 2, -1]]))


def test_voc_targets_refuses_01_labels_it_would_mask():
    """0/1 labels are valid VOC values but no VOC matrix: converting them would hide every negative (mAP 1.0 on
    random scores), so they are refused, as are booleans; an empty matrix converts to empty arrays."""
    with pytest.raises(ValueError, match="no -1: they look like 0/1 labels, which need no conversion"):
        voc_targets(np.array([[1, 0, 0], [0, 1, 0]]))
    with pytest.raises(ValueError, match="boolean labels need no conversion"):
        voc_targets(np.array([[True, False]]))
    targets, mask = voc_targets(np.zeros((0, 3), dtype=np.int64))
    assert targets.shape == mask.shape == (0, 3)


def test_voc_difficult_ignored_in_ap():
    rng = np.random.default_rng(11)
    labels = rng.choice([1, 0, -1], size=(200, 4), p=[0.3, 0.1, 0.6])
    labels[0] = 1
    scores = rng.random((200, 4)) + (labels == 1)
    targets, mask = voc_targets(labels)
    for c in range(4):
        keep = labels[:, c] != 0
        ref = average_precision_score(labels[keep, c] == 1, scores[keep, c])
        assert average_precision(scores, targets, mask)[c] == pytest.approx(ref, abs=1e-6)


def test_non_binary_targets_point_to_voc_targets():
    with pytest.raises(ValueError, match="targets must be binary.*voc_targets"):
        average_precision(np.zeros((3, 2)), np.array([[1, -1], [0, 1], [0, 0]]))


# --------------------------------------------------------------------------------------------
# Threshold metrics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_threshold_metrics_match_sklearn(seed, threshold):
    scores, targets = _data(seed)
    assert (targets.sum(0) > 0).all()  # CR equals sklearn's macro recall only then
    pred = (scores >= threshold).astype(int)
    got = threshold_metrics(scores, targets, threshold=threshold)
    assert set(got) == set(THRESHOLD_KEYS)
    cp = precision_score(targets, pred, average="macro", zero_division=0)
    cr = recall_score(targets, pred, average="macro", zero_division=0)
    assert got["CP"] == pytest.approx(cp, abs=1e-12)
    assert got["CR"] == pytest.approx(cr, abs=1e-12)
    assert got["CF1"] == pytest.approx(2 * cp * cr / (cp + cr), abs=1e-12)
    assert got["OP"] == pytest.approx(
        precision_score(targets, pred, average="micro", zero_division=0), abs=1e-12
    )
    assert got["OR"] == pytest.approx(
        recall_score(targets, pred, average="micro", zero_division=0), abs=1e-12
    )
    assert got["OF1"] == pytest.approx(f1_score(targets, pred, average="micro", zero_division=0), abs=1e-12)


def test_cf1_is_harmonic_mean_of_averages_not_mean_f1():
    scores, targets = _data(4, c=10)
    got = threshold_metrics(scores, targets)
    pred = (scores >= 0.5).astype(int)
    mean_f1 = f1_score(targets, pred, average="macro", zero_division=0)
    assert got["CF1"] == pytest.approx(2 * got["CP"] * got["CR"] / (got["CP"] + got["CR"]))
    assert got["CF1"] != pytest.approx(mean_f1, abs=1e-9)


def _loop_threshold_metrics(scores, targets, threshold, top_k=None, mask=None):
    """Direct, loop-based reference of the ML-GCN conventions."""
    n, c = scores.shape
    mask = np.ones((n, c), bool) if mask is None else mask
    pred = np.zeros((n, c), bool)
    for i in range(n):
        top = sorted(range(c), key=lambda j: -scores[i, j])[: (top_k or c)]
        for j in top:
            pred[i, j] = scores[i, j] >= threshold
    nc, np_, ng = np.zeros(c), np.zeros(c), np.zeros(c)
    for i in range(n):
        for j in range(c):
            if not mask[i, j]:
                continue
            nc[j] += pred[i, j] and targets[i, j] == 1
            np_[j] += pred[i, j]
            ng[j] += targets[i, j] == 1
    cp = float(np.mean([nc[j] / np_[j] if np_[j] else 0.0 for j in range(c)]))
    cr = float(np.mean([nc[j] / ng[j] for j in range(c) if ng[j]]))
    op = nc.sum() / np_.sum() if np_.sum() else 0.0
    orr = nc.sum() / ng.sum()
    return {
        "CP": cp,
        "CR": cr,
        "CF1": 2 * cp * cr / (cp + cr) if cp + cr else 0.0,
        "OP": op,
        "OR": orr,
        "OF1": 2 * op * orr / (op + orr) if op + orr else 0.0,
    }


@pytest.mark.parametrize("decimals", [None, 1], ids=["distinct", "ties"])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_top3_matches_loop(threshold, decimals):
    """Rounded scores tie at the 3rd place: the loop's stable sort gives a tied place to the lower class index."""
    scores, targets = _data(8, n=120, c=12)
    if decimals is not None:
        scores = np.round(scores, decimals)
        assert any(np.sort(r)[-3] == np.sort(r)[-4] for r in scores)  # the case is exercised
    got = threshold_metrics(scores, targets, threshold=threshold, top_k=3)
    ref = _loop_threshold_metrics(scores, targets, threshold, top_k=3)
    assert got == pytest.approx(ref, abs=1e-12)
    # top_k >= C is the same as no top-k restriction.
    assert threshold_metrics(scores, targets, threshold, top_k=12) == pytest.approx(
        threshold_metrics(scores, targets, threshold)
    )


def test_threshold_metrics_with_mask_match_loop():
    scores, targets = _data(9, n=120, c=12)
    mask = np.random.default_rng(1).random(scores.shape) < 0.8
    mask[0] = True
    for top_k in (None, 3):
        got = threshold_metrics(scores, targets, mask=mask, top_k=top_k)
        assert got == pytest.approx(_loop_threshold_metrics(scores, targets, 0.5, top_k, mask), abs=1e-12)


def _mlgcn_evaluation(scores, voc_labels, threshold):
    """ML-GCN's ``AveragePrecisionMeter.evaluation`` conventions (reused by SpliceMix), written out per class:
    VOC labels ``{1, 0 (difficult), -1}``; ``-1`` becomes 0, so a difficult entry is a negative."""
    n, c = scores.shape
    nc, np_, ng = np.zeros(c), np.zeros(c), np.zeros(c)
    for k in range(c):
        t = voc_labels[:, k].copy()
        t[t == -1] = 0
        ng[k] = np.sum(t == 1)
        np_[k] = np.sum(scores[:, k] >= threshold)
        nc[k] = np.sum(t * (scores[:, k] >= threshold))
    cp = np.mean([a / b if b else 0.0 for a, b in zip(nc, np_, strict=True)])
    cr = np.mean([a / b for a, b in zip(nc, ng, strict=True) if b])
    op, orr = nc.sum() / np_.sum(), nc.sum() / ng.sum()
    return {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr), "OP": op, "OR": orr, "OF1": 2 * op * orr / (op + orr)}


def test_masked_as_negative_matches_the_mlgcn_evaluation_and_ignore_differs():
    rng = np.random.default_rng(4)
    labels = rng.choice([1, 0, -1], size=(200, 10), p=[0.25, 0.1, 0.65])
    scores = np.where(labels >= 0, rng.uniform(0.3, 1.0, labels.shape), rng.uniform(0.0, 0.7, labels.shape))
    targets, mask = voc_targets(labels)
    got = threshold_metrics(scores, targets, mask=mask, masked="negative")
    assert got == pytest.approx(_mlgcn_evaluation(scores, labels, 0.5), abs=1e-12)
    ignored = threshold_metrics(scores, targets, mask=mask)
    assert ignored["OR"] == pytest.approx(got["OR"]) and ignored["OP"] > got["OP"] + 0.01  # difficult hits are FPs
    rep = multilabel_report(scores, targets, mask=mask, masked="negative")
    assert rep["OF1"] == pytest.approx(got["OF1"]) and rep["mAP"] == multilabel_report(scores, targets, mask)["mAP"]
    top3 = threshold_metrics(scores, targets, mask=mask, top_k=3, masked="negative")  # the report's top-3 too
    assert {k: rep[f"{k}_top3"] for k in top3} == pytest.approx(top3)
    assert top3["OP"] != pytest.approx(threshold_metrics(scores, targets, mask=mask, top_k=3)["OP"])
    with pytest.raises(ValueError, match="masked must be 'ignore'.*'negative'"):
        threshold_metrics(scores, targets, mask=mask, masked="drop")



def test_a_masked_positive_counts_as_negative_under_masked_negative():
    """voc_targets puts 0 on difficult entries, so the test above cannot see whether a masked *positive* target is
    turned negative; here entry (1, 0) is a positive under the mask."""
    targets = np.array([[1, 0], [1, 1], [0, 1]])
    scores = np.array([[0.9, 0.1], [0.8, 0.9], [0.2, 0.7]])
    mask = np.ones_like(targets, dtype=bool)
    mask[1, 0] = False
    got = threshold_metrics(scores, targets, mask=mask, masked="negative")
    assert got["OR"] == pytest.approx(1.0) and got["OP"] == pytest.approx(0.75)  # 3 of 4 predictions, 3 of 3 positives
    ignored = threshold_metrics(scores, targets, mask=mask)
    assert ignored["OP"] == pytest.approx(1.0) and ignored["OR"] == pytest.approx(1.0)  # the entry is left out


def test_threshold_metrics_zero_denominators():
    targets = np.array([[1, 0], [0, 0]])
    got = threshold_metrics(np.zeros((2, 2)), targets, threshold=0.5)  # nothing predicted
    assert got == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}
    # Class 1 has no positive: it is left out of CR but counts (as 0) in CP.
    got = threshold_metrics(np.ones((2, 2)), targets, threshold=0.5)
    assert got["CR"] == pytest.approx(1.0)
    assert got["CP"] == pytest.approx((0.5 + 0.0) / 2)
    # Class 1 is never predicted (Np = 0): it still counts, as 0, in CP's mean over all C classes (sklearn's
    # macro precision with zero_division=0), not only over the classes with a prediction.
    targets = np.array([[1, 0], [0, 1]])
    scores = np.array([[0.9, 0.1], [0.8, 0.2]])
    got = threshold_metrics(scores, targets, threshold=0.5)
    assert got["CP"] == pytest.approx(0.25)
    assert got["CP"] == pytest.approx(precision_score(targets, scores >= 0.5, average="macro", zero_division=0))


def test_bad_top_k_raises():
    scores, targets = _data(0, n=10, c=4)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        threshold_metrics(scores, targets, top_k=0)


# --------------------------------------------------------------------------------------------
# Groups and report
# --------------------------------------------------------------------------------------------
def test_group_map():
    ap = np.array([0.1, 0.2, 0.3, np.nan, 0.5])
    got = group_map(ap, {"head": [0, 1], "tail": [2, 3, 4]})
    assert got == pytest.approx({"head": 0.15, "tail": 0.4})


def test_group_map_errors():
    ap = np.linspace(0, 1, 5)
    with pytest.raises(ValueError, match="'tail' has class index 5 out of range"):
        group_map(ap, {"head": [0, 1], "tail": [4, 5]})
    with pytest.raises(ValueError, match="out of range"):
        group_map(ap, {"head": [-1]})
    with pytest.raises(ValueError, match="'medium' is empty"):
        group_map(ap, {"medium": []})


def test_multilabel_report_keys_and_values():
    scores, targets = _data(2, c=10)
    groups = {"head": [0, 1, 2], "medium": [3, 4, 5, 6], "tail": [7, 8, 9]}
    rep = multilabel_report(scores, targets, groups=groups)
    expected_keys = {"mAP", "AP", *THRESHOLD_KEYS, *(f"{k}_top3" for k in THRESHOLD_KEYS), "hamming_loss",
                     "subset_accuracy"}
    expected_keys |= {"mAP_head", "mAP_medium", "mAP_tail"}
    assert set(rep) == expected_keys
    ap = _sklearn_ap(scores, targets)
    np.testing.assert_allclose(rep["AP"], ap, atol=1e-6)
    assert isinstance(rep["AP"], list) and len(rep["AP"]) == 10
    assert rep["mAP"] == pytest.approx(ap.mean(), abs=1e-6)
    assert rep["mAP_medium"] == pytest.approx(ap[3:7].mean(), abs=1e-6)
    assert {k: rep[k] for k in THRESHOLD_KEYS} == pytest.approx(threshold_metrics(scores, targets))
    top3 = threshold_metrics(scores, targets, top_k=3)
    assert {k: rep[f"{k}_top3"] for k in THRESHOLD_KEYS} == pytest.approx(top3)
    assert {k: rep[k] for k in ("hamming_loss", "subset_accuracy")} == example_metrics(scores, targets)
    assert all(0.0 <= rep[k] <= 1.0 for k in expected_keys if k != "AP")


def test_multilabel_report_with_mask():
    scores, targets = _data(6, c=8)
    mask = np.random.default_rng(2).random(scores.shape) < 0.9
    mask[0] = True
    rep = multilabel_report(scores, targets, mask=mask)
    assert rep["mAP"] == pytest.approx(mean_average_precision(scores, targets, mask))
    assert rep["OF1"] == pytest.approx(threshold_metrics(scores, targets, mask=mask)["OF1"])


# --------------------------------------------------------------------------------------------
# Example-based metrics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_example_metrics_match_sklearn(seed, threshold):
    scores, targets = _data(seed, n=300, c=6, rate=0.3)  # few classes: some images get their whole set right
    pred = (scores >= threshold).astype(int)
    got = example_metrics(scores, targets, threshold)
    assert got["hamming_loss"] == pytest.approx(hamming_loss(targets, pred), abs=1e-12)
    assert got["subset_accuracy"] == pytest.approx(accuracy_score(targets, pred), abs=1e-12)
    assert 0.0 < got["subset_accuracy"] < 1.0 and 0.0 < got["hamming_loss"] < 1.0  # neither trivial


def test_example_metrics_with_a_mask_leave_masked_decisions_out():
    targets = np.array([[1, 0, 0], [0, 1, 1]])
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.1, 0.7]])  # wrong: (0, 1) and (1, 1)
    assert example_metrics(scores, targets) == pytest.approx({"hamming_loss": 2 / 6, "subset_accuracy": 0.0})
    mask = np.array([[1, 0, 1], [1, 1, 1]], dtype=bool)  # (0, 1) masked: image 0 is right on what counts
    assert example_metrics(scores, targets, mask=mask) == pytest.approx({"hamming_loss": 1 / 5,
                                                                         "subset_accuracy": 0.5})
    assert example_metrics(scores, targets, threshold=0.05) == pytest.approx({"hamming_loss": 3 / 6,
                                                                             "subset_accuracy": 0.0})
    with pytest.raises(ValueError, match="threshold"):
        example_metrics(scores, targets, threshold=float("nan"))


@pytest.mark.parametrize("threshold", [0.5, 0.0])
def test_example_metrics_count_a_score_at_the_threshold_as_predicted(threshold):
    """A score exactly at the threshold is a predicted label (``>=``, as in threshold_metrics, so that one report
    calls the same entries positive): a sigmoid of a zero logit is exactly 0.5. Scores rounded to one decimal put
    many entries on the threshold."""
    scores, targets = _data(0, n=300, c=6, rate=0.3)
    scores = np.round(scores - 0.5 + threshold, 1)
    assert np.count_nonzero(scores == threshold) > 50  # the case under test occurs
    pred = (scores >= threshold).astype(int)
    got = example_metrics(scores, targets, threshold)
    assert got["hamming_loss"] == pytest.approx(hamming_loss(targets, pred), abs=1e-12)
    assert got["subset_accuracy"] == pytest.approx(accuracy_score(targets, pred), abs=1e-12)
    at = np.array([[threshold, threshold - 0.3]])  # by hand: the label on the threshold is predicted, and right
    assert example_metrics(at, np.array([[1, 0]]), threshold) == pytest.approx({"hamming_loss": 0.0,
                                                                              "subset_accuracy": 1.0})


# --------------------------------------------------------------------------------------------
# Constant-predictor BCE
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_constant_predictor_bce_matches_sklearn_log_loss_and_torch_bce(seed):
    _, targets = _data(seed, n=300, c=7, rate=0.3)
    p = targets.mean(0)

    def per_class_log_loss(pred):  # sklearn's log loss of one constant prediction per class, averaged
        return np.mean([log_loss(targets[:, c], np.full(len(targets), pred[c]), labels=[0, 1]) for c in range(7)])

    ref = per_class_log_loss(p)
    assert constant_predictor_bce(targets) == pytest.approx(ref, rel=1e-9)
    assert constant_predictor_bce(targets.astype(bool)) == pytest.approx(ref, rel=1e-9)
    t = torch.from_numpy(targets).double()
    ref_torch = torch.nn.functional.binary_cross_entropy(t.mean(0).expand_as(t), t).item()
    assert constant_predictor_bce(t) == pytest.approx(ref_torch, rel=1e-9)
    for q in (0.9 * p, np.clip(1.1 * p, 0, 0.99)):  # the prevalence is the best constant
        assert constant_predictor_bce(targets) < per_class_log_loss(q)


def test_constant_predictor_bce_degenerate_classes_contribute_zero():
    targets = np.zeros((8, 3), dtype=np.int64)
    targets[:, 1] = 1  # class 0 never present, class 1 always present
    targets[:2, 2] = 1  # class 2 present in a quarter of the rows
    h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert constant_predictor_bce(targets) == pytest.approx(h / 3, rel=1e-12)
    assert constant_predictor_bce(targets[:, :2]) == 0.0
    assert constant_predictor_bce(np.array([[1, 0], [0, 1]])) == pytest.approx(np.log(2))


def test_constant_predictor_bce_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D array"):
        constant_predictor_bce(np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="2-D array"):
        constant_predictor_bce(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="0 rows"):
        constant_predictor_bce(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="targets must be binary"):
        constant_predictor_bce(np.array([[0.5, 1.0], [0.0, 1.0]]))


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------
def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"same shape.*scores \(5, 3\) and targets \(5, 4\)"):
        average_precision(np.zeros((5, 3)), np.zeros((5, 4)))


def test_not_2d_raises():
    with pytest.raises(ValueError, match="must be a 2-D array"):
        average_precision(np.zeros(5), np.zeros(5))


def test_nan_in_scores_raises():
    scores, targets = _data(0, n=20, c=3)
    scores[3, 1] = np.nan
    scores[4, 2] = np.inf
    with pytest.raises(ValueError, match="2 non-finite values.*check the model output"):
        mean_average_precision(scores, targets)
    with pytest.raises(ValueError, match="non-finite"):
        threshold_metrics(scores, targets)


def test_non_binary_targets_raise():
    with pytest.raises(ValueError, match=r"targets must be binary.*e\.g\. \[0\.5, 2\.0\]"):
        multilabel_report(np.zeros((3, 2)), np.array([[0.5, 1.0], [2.0, 0.0], [1.0, 0.0]]))


def test_empty_input_raises():
    with pytest.raises(ValueError, match="0 rows"):
        average_precision(np.zeros((0, 4)), np.zeros((0, 4)))


def test_bad_mask_raises():
    scores, targets = _data(0, n=10, c=3)
    with pytest.raises(ValueError, match=r"mask must have the same shape"):
        average_precision(scores, targets, np.ones((10, 2), bool))
    with pytest.raises(ValueError, match="mask must be binary"):
        average_precision(scores, targets, np.full((10, 3), 3))


def test_group_out_of_range_in_report_raises():
    scores, targets = _data(0, n=30, c=4)
    with pytest.raises(ValueError, match="out of range"):
        multilabel_report(scores, targets, groups={"tail": [3, 4]})


def test_bad_threshold_columns_and_dtype_raise():
    scores, targets = _data(0, n=10, c=3)
    with pytest.raises(ValueError, match=r"threshold must not be NaN \(use 0.5 for probabilities"):
        threshold_metrics(scores, targets, threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold must be a real number, got 'high'"):
        threshold_metrics(scores, targets, threshold="high")
    with pytest.raises(ValueError, match=r"0 columns \(shape \(10, 0\)\): need at least one class"):
        average_precision(np.zeros((10, 0)), np.zeros((10, 0)))
    with pytest.raises(ValueError, match="scores must be a real numeric array; got dtype <U1"):
        average_precision(np.full((10, 3), "a"), targets)


def test_group_map_of_the_report_skips_classes_without_test_positives():
    """A class without a positive has no AP (NaN); a group's mAP is the mean over its classes that have one, in
    :func:`multilabel_report` as in :func:`group_map` (a NaN read as 0 would pull the tail's mAP down)."""
    scores, targets = _data(4, c=6)
    targets[:, 5] = 0
    rep = multilabel_report(scores, targets, groups={"head": [0, 1], "tail": [4, 5]})
    ap = average_precision(scores, targets)
    assert np.isnan(ap[5]) and np.isnan(rep["AP"][5])
    assert rep["mAP_tail"] == pytest.approx(ap[4], abs=1e-12)
    assert rep["mAP_head"] == pytest.approx((ap[0] + ap[1]) / 2, abs=1e-12)


def test_multilabel_report_with_a_mask_and_a_threshold_is_the_functions_it_reports():
    """With a mask, a threshold other than 0.5 and either masked mode, every number of the report is the one the
    matching function gives with the same arguments: the top-3 metrics at that threshold and the example-based
    metrics with the mask (not a 0.5 threshold nor an unmasked count)."""
    scores, targets = _data(7, c=8)
    mask = np.random.default_rng(3).random(scores.shape) < 0.85
    mask[0] = True
    for thr in (0.3, 0.7):
        assert example_metrics(scores, targets, thr, mask=mask) != example_metrics(scores, targets, thr)
        assert threshold_metrics(scores, targets, thr, top_k=3) != threshold_metrics(scores, targets, 0.5, top_k=3)
        for masked in ("ignore", "negative"):
            rep = multilabel_report(scores, targets, mask=mask, threshold=thr, masked=masked)
            want = threshold_metrics(scores, targets, thr, mask=mask, masked=masked)
            assert {k: rep[k] for k in THRESHOLD_KEYS} == pytest.approx(want)
            top3 = threshold_metrics(scores, targets, thr, mask=mask, top_k=3, masked=masked)
            assert {k: rep[f"{k}_top3"] for k in THRESHOLD_KEYS} == pytest.approx(top3)
            example = example_metrics(scores, targets, thr, mask=mask)
            assert {k: rep[k] for k in ("hamming_loss", "subset_accuracy")} == pytest.approx(example)


def test_group_map_refuses_boolean_or_float_class_indices():
    """A group of booleans would select classes as a mask (NumPy's boolean indexing), not by index: refused."""
    ap = np.linspace(0, 1, 3)
    with pytest.raises(ValueError, match="integer class indices"):
        group_map(ap, {"head": [True, False, True]})
    with pytest.raises(ValueError, match="integer class indices"):
        group_map(ap, {"head": [0.0, 1.0]})
