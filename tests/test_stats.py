"""Label statistics (mlic_lib.data.stats) against direct loops over a small multi-hot matrix."""

from __future__ import annotations

import numpy as np
import pytest

from mlic_lib.data import stats

# 6 images x 5 classes; class 4 never appears, class 3 appears only alone, classes 0-2 co-occur.
T = np.array([
    [1, 1, 0, 0, 0],
    [1, 0, 1, 0, 0],
    [1, 1, 1, 0, 0],
    [0, 1, 0, 0, 0],
    [0, 0, 0, 1, 0],
    [1, 0, 0, 0, 0],
])


def _loop_cooccurrence(t):
    c = t.shape[1]
    return np.array([[sum(1 for row in t if row[i] and row[j]) for j in range(c)] for i in range(c)])


def test_class_frequency_is_the_fraction_of_images_with_each_class():
    expected = [sum(row[i] for row in T) / len(T) for i in range(T.shape[1])]
    np.testing.assert_allclose(stats.class_frequency(T), expected)
    np.testing.assert_allclose(stats.class_frequency(T), [4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])  # written out
    np.testing.assert_allclose(stats.class_frequency(T.astype(bool)), expected)  # boolean labels too
    with pytest.raises(ValueError, match="multi-hot"):
        stats.class_frequency(np.where(T == 1, 1, -1))  # VOC {1, -1} labels must be converted first
    with pytest.raises(ValueError, match="2-D"):
        stats.class_frequency(T[0])


def test_cooccurring_classes_counts_other_classes_seen_together():
    expected = [sum(1 for j in range(T.shape[1]) if j != i and any(row[i] and row[j] for row in T))
                for i in range(T.shape[1])]
    assert stats.cooccurring_classes(T).tolist() == expected
    assert expected == [2, 2, 2, 0, 0]  # class 3 is only ever alone (its own diagonal is not counted)


def test_mean_other_labels_is_the_mean_over_each_class_images_written_out():
    expected = [np.mean([row.sum() - 1 for row in T if row[k]]) if T[:, k].any() else np.nan
                for k in range(T.shape[1])]
    np.testing.assert_allclose(stats.mean_other_labels(T), expected)
    assert np.isnan(stats.mean_other_labels(np.array([[1, 0], [1, 0]]))[1])  # a class without images
    rng = np.random.default_rng(0)
    t = (rng.random((40, 5)) < 0.4).astype(int)
    null = stats.shuffled_cooccurring_classes(t, 3, seed=2, keep="both", statistic=stats.mean_other_labels)
    g = np.random.default_rng(2)  # the same shuffles as the default statistic's
    for k in range(3):
        np.testing.assert_allclose(null[k], stats.mean_other_labels(stats.curveball_shuffle(t, 50, g)))


def test_shuffled_cooccurring_classes_is_the_count_on_independently_shuffled_columns():
    rng = np.random.default_rng(0)
    t = (rng.random((60, 6)) < np.linspace(0.05, 0.6, 6)).astype(int)
    null = stats.shuffled_cooccurring_classes(t, n_shuffles=3, seed=5)
    ref_rng = np.random.default_rng(5)  # the same draws, written out
    for k in range(3):
        shuffled = np.stack([ref_rng.permutation(t[:, j]) for j in range(6)], axis=1)
        assert (shuffled.sum(0) == t.sum(0)).all()  # every class keeps its number of images
        assert null[k].tolist() == stats.cooccurring_classes(shuffled).tolist()
    assert (stats.shuffled_cooccurring_classes(t, 3, seed=5) == null).all()
    with pytest.raises(ValueError, match="n_shuffles"):
        stats.shuffled_cooccurring_classes(t, 0)


def test_curveball_keeps_both_margins_and_samples_them_uniformly():
    rng = np.random.default_rng(0)
    t = (rng.random((61, 7)) < np.linspace(0.05, 0.6, 7)).astype(int)  # an odd number of images
    out = stats.curveball_shuffle(t, steps=10, rng=1)
    assert out.dtype == bool and (out.sum(0) == t.sum(0)).all() and (out.sum(1) == t.sum(1)).all()
    assert not (out == t.astype(bool)).all()
    assert (stats.curveball_shuffle(t, 10, 1) == out).all()
    # every 3x3 0/1 matrix with one label per image and one image per class (the 6 permutation matrices) is
    # equally likely: 3,000 independent chains of 5 rounds from the identity, about 500 of each
    seen: dict[bytes, int] = {}
    g = np.random.default_rng(2)
    for _ in range(3000):
        key = stats.curveball_shuffle(np.eye(3, dtype=int), 5, g).tobytes()
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 6 and min(seen.values()) > 420 and max(seen.values()) < 580
    with pytest.raises(ValueError, match="steps"):
        stats.curveball_shuffle(t, 0)


def test_the_null_that_keeps_both_margins_keeps_the_labels_per_image():
    rng = np.random.default_rng(0)
    t = (rng.random((80, 6)) < np.linspace(0.05, 0.6, 6)).astype(int)
    both = stats.shuffled_cooccurring_classes(t, n_shuffles=4, seed=3, keep="both", steps=20)
    g = np.random.default_rng(3)  # the same draws, written out
    for k in range(4):
        assert both[k].tolist() == stats.cooccurring_classes(stats.curveball_shuffle(t, 20, g)).tolist()
    assert both.shape == (4, 6) and (both <= 5).all()
    with pytest.raises(ValueError, match="keep must be one of"):
        stats.shuffled_cooccurring_classes(t, keep="rows")


def test_conditional_probability_with_nums_for_an_adj_without_diagonal():
    """ML-GCN's ``adj`` stores 0 on the diagonal and the per-class counts apart (``nums``)."""
    e = _loop_cooccurrence(T)
    nums = T.sum(0)
    adj = e.copy()
    np.fill_diagonal(adj, 0)
    p = stats.conditional_probability(adj, nums=nums)
    c = T.shape[1]
    for i in range(c):
        for j in range(c):
            expected = 0.0 if i == j or nums[i] == 0 else e[i, j] / nums[i]
            assert p[i, j] == pytest.approx(expected), (i, j)
    assert p[0, 1] == pytest.approx(2 / 4) and p[1, 0] == pytest.approx(2 / 3)  # P(j | i) is not symmetric
    assert not p[4].any()  # an absent class (nums 0) has a zero row, not NaN
    # without nums the (zero) diagonal would be the divisor: every row 0
    assert not stats.conditional_probability(adj).any()
    with pytest.raises(ValueError, match=r"nums must have shape \(5,\)"):
        stats.conditional_probability(adj, nums=nums[:4])


def test_conditional_probability_nums_override_the_diagonal():
    e = _loop_cooccurrence(T)
    nums = np.array([8, 6, 4, 2, 0])  # e.g. counts of a larger set: every row is divided by its own nums
    p = stats.conditional_probability(e, nums=nums)
    for i in range(5):
        for j in range(5):
            assert p[i, j] == pytest.approx(e[i, j] / nums[i] if nums[i] else 0.0), (i, j)
    assert p[0, 0] == pytest.approx(0.5)
    # a label matrix is refused, not guessed from its shape (a square one, as many images as classes, was read
    # as a co-occurrence matrix): the error names the fix
    with pytest.raises(ValueError, match=r"pass stats.cooccurrence\(labels\)"):
        stats.conditional_probability(T, nums=nums)
    square = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])  # 3 images, 3 classes
    np.testing.assert_allclose(stats.conditional_probability(stats.cooccurrence(square))[1], [0.5, 1, 0])


def test_box_coverage_against_a_direct_count():
    """Each object's share of its box under the union of the other boxes of its image (not their sum)."""
    from mlic_lib.data.stats import box_coverage

    boxes = [np.array([[0, 0, 0, 4, 4], [1, 2, 0, 6, 4]]),  # half of each under the other
             np.array([[0, 0, 0, 4, 4], [1, 0, 0, 2, 4], [2, 1, 0, 3, 4], [3, 6, 6, 8, 8]]),  # overlapping covers
             np.array([[0, 1, 1, 3, 3]]),  # alone
             np.zeros((0, 5), dtype=np.int64)]  # no object
    cov = box_coverage(boxes, 8)
    np.testing.assert_allclose(cov, [0.5, 0.5, 0.75, 1.0, 1.0, 0.0, 0.0])  # 3 of 4 columns of box 0 under the union
    rng = np.random.default_rng(0)  # random boxes against a pixel-by-pixel loop
    many = []
    for _ in range(20):
        xy = np.sort(rng.integers(0, 13, (rng.integers(1, 5), 2, 2)), axis=2)
        many.append(np.column_stack([np.zeros(len(xy), int), xy[:, 0, 0], xy[:, 1, 0], xy[:, 0, 1] + 1,
                                     xy[:, 1, 1] + 1]))
    ref = []
    for b in many:
        for k, (_, x0, y0, x1, y1) in enumerate(b):
            pixels = [(x, y) for x in range(x0, x1) for y in range(y0, y1)]
            others = [o for j, o in enumerate(b) if j != k]
            ref.append(np.mean([any(o[1] <= x < o[3] and o[2] <= y < o[4] for o in others) for x, y in pixels]))
    np.testing.assert_allclose(box_coverage(many, 14), ref)
    with pytest.raises(ValueError, match="outside the 8-px canvas"):
        box_coverage([np.array([[0, 0, 0, 9, 4]])], 8)
    with pytest.raises(ValueError, match="canvas must be a positive"):
        box_coverage(boxes, 0)
