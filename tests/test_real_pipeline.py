"""The ``full`` (real-data) path, offline: pre-processing presets, the synthetic datasets written in the real
on-disk layouts (:mod:`mlic_lib.data.fake`), :func:`mlic_lib.data.real.real_data`, PSD on image datasets,
and every chapter notebook run with ``profile="full"`` on those files with shrunken models."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlic_lib.data.errors import DatasetNotFoundError
from mlic_lib.data.fake import FAKE_DATASETS, write_fake
from mlic_lib.data.presets import (
    Cutout,
    CV2Resize,
    MultiScaleCrop,
    PhotoMetricDistortion,
    RandomPatchCrop,
    eval_preset,
    hsv_to_rgb,
    rgb_to_hsv,
    train_preset,
)
from mlic_lib.data.real import REAL_DATASETS, is_real, real_data, subset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake_data")
    for name in ("voc2007", "coco2014", "voc_lt", "coco_lt", "nuswide"):
        write_fake(name, root, n_train=40, n_test=30, image_size=40)
    write_fake("mnist", root, n_train=500, n_test=200)
    write_fake("cifar10", root, n_train=100, n_test=50)
    return root


# ------------------------------------------------------------------------------------------- presets
def _image(w: int = 60, h: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("augment", [None, {"crop": "multiscale"}, {"crop": "random_resized", "hflip": False},
                                     {"cutout": 0.5, "randaugment": True, "hflip": False},
                                     {"crop": "random_patch", "photometric": True}])
def test_train_preset_shapes(augment):
    x = train_preset(32, augment)(_image())
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_eval_preset_is_deterministic_and_normalised():
    img = Image.new("RGB", (50, 30), (124, 116, 104))  # ~ the ImageNet mean
    a, b = eval_preset(16)(img), eval_preset(16)(img)
    assert torch.equal(a, b) and a.shape == (3, 16, 16) and a.abs().max() < 0.05


def test_multiscale_crop_params_stay_inside_and_respect_scales():
    crop = MultiScaleCrop(24, scales=(1.0, 0.5))
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        left, top, cw, ch = crop.params(80, 60, rng)
        assert 0 <= left and left + cw <= 80 and 0 <= top and top + ch <= 60
        seen.add((cw, ch))
    assert seen <= {(60, 60), (60, 30), (30, 60), (30, 30)} and len(seen) == 4
    assert crop(_image(80, 60)).size == (24, 24)


def test_multiscale_crop_follows_the_authors_positions_aspects_and_snap():
    # 13 fixed positions on quarter steps of the free margin (here 40 x 20 px free -> steps of 10 and 5)
    assert sorted(MultiScaleCrop.fixed_positions(100, 60, 60, 40)) == sorted(
        (10 * i, 5 * j) for i, j in [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                                     (1, 1), (3, 1), (1, 3), (3, 3)])
    rng = random.Random(0)
    crop = MultiScaleCrop(24, scales=(1.0, 0.75, 0.5))
    got = [crop.params(100, 60, rng) for _ in range(2000)]
    sides = {(cw, ch) for _, _, cw, ch in got}
    assert (60, 30) in sides and (30, 60) in sides  # 2 scale steps apart: allowed with the default max_distort=2
    for left, top, cw, ch in got:
        assert (left, top) in MultiScaleCrop.fixed_positions(100, 60, cw, ch)
    assert {(cw, ch) for _, _, cw, ch in (MultiScaleCrop(24, (1.0, 0.75, 0.5), max_distort=0).params(100, 60, rng)
                                          for _ in range(300))} == {(60, 60), (45, 45), (30, 30)}
    free = MultiScaleCrop(24, (0.5,), fixed_offsets=False)
    assert len({free.params(100, 60, rng)[:2] for _ in range(300)}) > 13
    # a side within 3 px of the output size becomes the output size (512 * 0.875 = 448 exactly; 446 -> 448)
    assert MultiScaleCrop(448, (0.875,)).params(510, 510, rng)[2:] == (448, 448)
    assert MultiScaleCrop(448, (1.0,)).params(446, 446, rng)[2:] == (446, 446)  # never beyond the image
    with pytest.raises(ValueError, match="max_distort"):
        MultiScaleCrop(24, max_distort=-1)


def test_cv2_resize_is_opencvs_bilinear_without_antialiasing_in_both_presets():
    import cv2

    img = _image(120, 90)
    got = np.asarray(CV2Resize(32)(img))
    assert np.array_equal(got, cv2.resize(np.asarray(img), (32, 32), interpolation=cv2.INTER_LINEAR))
    assert not np.array_equal(got, np.asarray(img.resize((32, 32), Image.BILINEAR)))  # PIL antialiases
    random.seed(0)
    plain = eval_preset(32, resize="cv2")(img)
    ref = torch.from_numpy(got.copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(eval_preset(32, normalize="none", resize="cv2")(img), ref)
    assert plain.shape == (3, 32, 32)
    steps = train_preset(32, {"crop": "random_patch"}, resize="cv2").transforms
    assert any(isinstance(t, CV2Resize) for t in steps)
    # the multi-scale crop's resize to 32 x 32 follows resize="cv2" too (it was PIL's, whatever resize said)
    big = _image(300, 400)
    tf = train_preset(32, {"crop": "multiscale", "hflip": False, "scales": (1.0, 0.5), "resize_factor": 4},
                      normalize="none", resize="cv2")
    random.seed(5)
    got = tf(big)
    random.seed(5)
    pre = Image.fromarray(cv2.resize(np.asarray(big), (128, 128), interpolation=cv2.INTER_LINEAR))
    left, top, cw, ch = MultiScaleCrop(32, (1.0, 0.5)).params(128, 128, random)
    crop = np.ascontiguousarray(np.asarray(pre)[top:top + ch, left:left + cw])
    want = torch.from_numpy(cv2.resize(crop, (32, 32), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1) / 255
    assert torch.allclose(got, want)
    with pytest.raises(ValueError, match="resize must be one of"):
        eval_preset(32, resize="lanczos")


def test_cutout_fills_one_rectangle_or_nothing():
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    assert np.array_equal(np.asarray(Cutout(0.5, p=0.0)(img)), np.asarray(img))
    random.seed(3)
    changed = [np.asarray(Cutout(0.5, p=1.0)(img)).any(-1) for _ in range(20)]
    for m in changed:
        ys, xs = np.nonzero(m)
        if len(ys):  # a random colour can be black; otherwise the changed pixels form one box <= half a side
            assert m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
            assert ys.max() - ys.min() + 1 <= 20 and xs.max() - xs.min() + 1 <= 20
    inside = [m for m in changed if m[0].sum() == 0 and m[-1].sum() == 0 and m[:, 0].sum() == 0 and m[:, -1].sum() == 0]
    assert all(m.sum() == 400 for m in inside if m.any())  # a box away from the borders is exactly 20 x 20
    assert sum(m.any() for m in changed) >= 15


def test_hsv_conversions_match_opencv():
    cv2 = pytest.importorskip("cv2")
    rgb = np.random.default_rng(1).uniform(0, 255, (13, 17, 3)).astype(np.float32)
    rgb[0, :4] = (20, 20, 20)  # grey: no hue, no saturation
    rgb[1, :3], rgb[2, :3], rgb[3, :3] = (200, 40, 40), (40, 200, 40), (40, 40, 200)  # each channel the max
    ref = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    mine = torch.stack(rgb_to_hsv(torch.from_numpy(rgb).permute(2, 0, 1)), -1).numpy()
    np.testing.assert_allclose(mine, ref, atol=1e-3)
    ref[..., 1] *= 1.4  # saturation beyond 1, as the distortion makes it
    ref[..., 0] = (ref[..., 0] + 17) % 360
    back = hsv_to_rgb(*(torch.from_numpy(np.ascontiguousarray(ref[..., i])) for i in range(3))).permute(1, 2, 0)
    np.testing.assert_allclose(back.numpy(), cv2.cvtColor(ref, cv2.COLOR_HSV2RGB), atol=1e-2)
    # after a negative brightness shift: pixels with every channel below 0 (OpenCV divides by |v|, which reflects
    # them on the way back; dividing by v left them unchanged)
    dark = rgb - 32.0
    dark[4, :3] = (-31, -1, -30)
    assert (dark.max(-1) < 0).sum() >= 3
    ref = cv2.cvtColor(dark, cv2.COLOR_RGB2HSV)
    mine = torch.stack(rgb_to_hsv(torch.from_numpy(dark).permute(2, 0, 1)), -1).numpy()
    np.testing.assert_allclose(mine, ref, atol=1e-3)
    back = hsv_to_rgb(*(torch.from_numpy(np.ascontiguousarray(ref[..., i])) for i in range(3))).permute(1, 2, 0)
    np.testing.assert_allclose(back.numpy(), cv2.cvtColor(ref, cv2.COLOR_HSV2RGB), atol=1e-2)


class _Draws:
    """A stand-in for ``random``: every coin comes up heads, and the given values are drawn in order."""

    def __init__(self, uniforms, contrast_first=False, order=(2, 0, 1)):
        self.uniforms, self.contrast_first, self.order, self.coins = list(uniforms), contrast_first, order, 0

    def random(self):
        self.coins += 1
        return 0.9 if self.coins == 2 and not self.contrast_first else 0.1  # 2nd coin: contrast before HSV?

    def uniform(self, lo, hi):
        v = self.uniforms.pop(0)
        assert lo <= v <= hi
        return v

    def sample(self, population, k):
        return list(self.order)


def test_photometric_distortion_matches_the_reference_steps():
    """Every step on, contrast after the HSV steps, against the same steps done with OpenCV on 0-255 floats."""
    cv2 = pytest.importorskip("cv2")
    x = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(0))
    out = PhotoMetricDistortion()(x, _Draws([10.0, 1.3, 12.0, 0.8]))  # brightness, saturation, hue, contrast
    img = x.permute(1, 2, 0).numpy() * 255 + 10.0
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 1] *= 1.3
    hsv[..., 0] = (hsv[..., 0] + 12.0) % 360
    ref = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 0.8
    ref = ref[..., [2, 0, 1]] / 255
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-4)
    first = PhotoMetricDistortion()(x, _Draws([0.0, 1.5, 1.0, 0.0], contrast_first=True, order=(0, 1, 2)))
    torch.testing.assert_close(first, x * 1.5, atol=1e-4, rtol=1e-4)  # contrast only (the rest is neutral)


def test_random_patch_crop_params():
    crop, rng = RandomPatchCrop(0.8), random.Random(0)
    for _ in range(200):
        left, top, cw, ch = crop.params(100, 60, rng)
        assert 0 <= left and left + cw <= 100 and 0 <= top and top + ch <= 60
        assert cw >= 79 and ch >= 47 and 0.5 <= ch / cw <= 2
    assert RandomPatchCrop(1.0).params(100, 10, rng) == (0, 0, 100, 10)  # no patch with h/w in [0.5, 2]
    with pytest.raises(ValueError, match="min_crop"):
        RandomPatchCrop(0.0)


def test_bad_augment_options():
    with pytest.raises(ValueError, match="unknown augment option"):
        train_preset(32, {"mixup": True})
    with pytest.raises(ValueError, match="augment.crop"):
        train_preset(32, {"crop": "center"})
    with pytest.raises(ValueError, match="factor"):
        Cutout(1.5)
    with pytest.raises(ValueError, match="scales"):
        MultiScaleCrop(32, scales=(0.0,))


# ------------------------------------------------------------------------------------- real_data
@pytest.mark.parametrize("name", REAL_DATASETS)
def test_real_data_on_fake_layouts(fake_root, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = real_data({"dataset": name, "image_size": 24, "root": str(fake_root), "augment": {"crop": "multiscale"}})
    assert d.name == name
    if name == "nuswide":  # images without labels and the missing file are left out, with a warning and a note
        assert 30 <= len(d.train_ds) < 40 and 20 <= len(d.test_ds) <= 30 and d.num_classes == 81
        warned = any("listed images are missing" in str(w.message) for w in caught)
        assert warned == ("1 listed image missing" in d.describe())
    else:
        assert len(d.train_ds) == 40 and len(d.test_ds) == 30
        assert d.num_classes == (20 if name.startswith("voc") else 12) == len(d.class_names)
    item = d.train_ds[0]
    assert item[0].shape == (3, 24, 24) and item[1].shape == (d.num_classes,)
    assert d.train_targets.dtype == np.uint8 and d.train_targets.sum() > 0
    test_item = d.test_ds[0]
    # VOC2007: difficult objects masked out of the AP; VOC-LT: counted as positives, as DistributionBalancedLoss
    assert len(test_item) == (3 if name == "voc2007" else 2)
    assert name in d.describe()
    if name.endswith("_lt"):
        assert set(d.extra["split"].groups) == {"head", "medium", "tail"}
        counts = d.train_targets.sum(0)
        assert counts[d.extra["split"].groups["head"]].min() >= counts[d.extra["split"].groups["tail"]].max()


def test_voc_lt_test_labels_follow_the_difficult_policy(fake_root):
    """VOC-LT's test set counts difficult-only classes as present (DBL); ``difficult_eval: ignore`` masks them."""
    from mlic_lib.data.voc import read_voc_labels

    _, raw = read_voc_labels(fake_root, "2007", "test")  # 1 present, 0 difficult-only, -1 absent
    assert (raw == 0).any(), "the fake VOC2007 test set should have difficult-only labels"
    dbl = real_data({"dataset": "voc_lt", "image_size": 24, "root": str(fake_root)}).test_ds
    np.testing.assert_array_equal(np.asarray(dbl.targets), (raw >= 0).astype(np.uint8))
    assert getattr(dbl, "mask", None) is None
    voc = real_data({"dataset": "voc_lt", "image_size": 24, "root": str(fake_root), "difficult_eval": "ignore"}).test_ds
    np.testing.assert_array_equal(np.asarray(voc.mask), raw != 0)


def test_real_data_subset_is_seeded(fake_root):
    spec = {"dataset": "voc2007", "image_size": 16, "root": str(fake_root), "n_train": 10, "n_test": 5}
    a, b = real_data(spec), real_data(spec)
    assert len(a.train_ds) == 10 and len(a.test_ds) == 5
    assert a.train_ds.ids == b.train_ds.ids
    c = real_data({**spec, "subset_seed": 1})
    assert c.train_ds.ids != a.train_ds.ids
    # the subset keeps the test set's "difficult" mask of the images it picks (else those labels count as negatives)
    whole = real_data({**spec, "n_test": None}).test_ds
    assert whole.mask is not None and not bool(whole.mask.all())
    pick = [whole.ids.index(i) for i in a.test_ds.ids]
    np.testing.assert_array_equal(np.asarray(a.test_ds.mask), np.asarray(whole.mask)[pick])
    assert subset(a.train_ds, None) is a.train_ds
    with pytest.raises(ValueError, match="at least one"):
        subset(a.train_ds, 0)


def test_real_data_errors(tmp_path):
    assert is_real({"dataset": "voc2007"}) and not is_real({"dataset": "scenes"}) and not is_real({})
    with pytest.raises(ValueError, match="unknown real dataset"):
        real_data({"dataset": "imagenet"})
    with pytest.raises(ValueError, match="unknown data option"):
        real_data({"dataset": "voc2007", "batch": 3})
    with pytest.raises(DatasetNotFoundError, match="mlic data prepare voc2007"):
        real_data({"dataset": "voc2007", "root": str(tmp_path)})
    with pytest.raises(DatasetNotFoundError, match="coco2014"):
        real_data({"dataset": "coco2014", "root": str(tmp_path)})


def test_fake_lt_split_agrees_with_annotations(fake_root):
    from mlic_lib.data.longtail import check_labels, read_lt_split, voc_lt_labels

    split = read_lt_split(fake_root / "voc_lt")
    assert check_labels(split, voc_lt_labels(split, fake_root)) == 1.0


def test_lt_datasets_warns_when_annotation_labels_differ_from_the_split(fake_root, monkeypatch):
    """LTML's rho comes from the training labels: a disagreement with DBL's gt_labels is reported, not hidden."""
    import warnings

    from mlic_lib.data import longtail

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fake files agree: no warning
        longtail.lt_datasets("voc_lt", root=fake_root)
    real = longtail.voc_lt_labels

    def one_flipped(split, root=None, **kw):
        labels = real(split, root, **kw).copy()
        labels[0, 0] = 1 - labels[0, 0]
        return labels

    monkeypatch.setattr(longtail, "voc_lt_labels", one_flipped)
    with pytest.warns(UserWarning, match=r"gt_labels on .*\(1 differ\)"):
        longtail.lt_datasets("voc_lt", root=fake_root)


def test_fake_layouts_carry_voc_parts_and_coco_crowds_that_the_readers_handle(fake_root):
    """The fake files mimic two details of the real formats: VOC persons have <part> children (head, hand,
    ...) whose <name> is not a class, and COCO has crowd annotations (RLE masks), which the reader counts as
    any other annotation."""
    import json

    from mlic_lib.data.coco import read_coco_labels
    from mlic_lib.data.voc import VOC_CLASSES, read_voc_labels

    ann = fake_root / "VOCdevkit" / "VOC2007" / "Annotations"
    with_parts = [p for p in ann.glob("*.xml") if "<part>" in p.read_text()]
    assert with_parts, "no fake VOC person carries a <part>: the fixture no longer exercises the case"
    for split in ("trainval", "test"):
        ids, labels = read_voc_labels(fake_root, "2007", split)  # raises on a part's <name> read as a class
        has = {i for i, row in zip(ids, labels, strict=True) if row[VOC_CLASSES.index("person")] >= 0}
        assert {p.stem for p in with_parts if p.stem in ids} <= has
    path = fake_root / "coco" / "annotations" / "instances_train2014.json"
    payload = json.loads(path.read_text())
    crowd = [a for a in payload["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"], dict) for a in crowd)
    plain = {(a["image_id"], a["category_id"]) for a in payload["annotations"] if not a["iscrowd"]}
    assert not any((a["image_id"], a["category_id"]) in plain for a in crowd)  # the crowd is the class's only label
    ids, _, labels, _ = read_coco_labels(path)
    col = {c["id"]: j for j, c in enumerate(sorted(payload["categories"], key=lambda c: c["id"]))}
    assert all(labels[ids.index(a["image_id"]), col[a["category_id"]]] == 1 for a in crowd)


def test_fake_mnist_and_cifar_load(fake_root):
    from mlic_lib import indeed

    x, y = indeed.load_mnist("train", fake_root)
    assert x.shape == (500, 28, 28) and set(np.unique(y)) == set(range(10))
    x, y = indeed.load_cifar10("test", fake_root)
    assert x.shape == (50, 3, 32, 32) and set(np.unique(y)) == set(range(10))


def test_data_check_tells_fake_files_from_real_data(fake_root, tmp_path):
    from mlic_lib.data import download

    states = download.check(fake_root)
    for name in ("voc2007", "voc2012", "coco2014", "coco2017", "voc_lt", "coco_lt", "mnist", "cifar10"):
        assert states[name] == "present (synthetic files from `mlic data fake`, not the real dataset)", name
    # a synthetic dataset that uses another one still says when that one is gone (VOC-LT reads VOC2012's images)
    import shutil

    root = shutil.copytree(fake_root, tmp_path / "data")  # the fixture is shared with other tests: damage a copy
    shutil.rmtree(root / "VOCdevkit" / "VOC2012")
    states = download.check(root)
    assert states["voc2012"] == "missing" and states["voc_lt"] == (
        "present (synthetic files from `mlic data fake`, not the real dataset; needs voc2012: missing)"), states


def test_a_fake_voc_lt_alone_passes_its_own_check(tmp_path):
    """VOC-LT's fake wrote only VOC2007's test split, so `mlic data check voc_lt` called the folder incomplete (and a
    dry run warned that VOC2007's parts would fail); a folder's own fake voc2007 is left as it is."""
    from mlic_lib.data import download

    write_fake("voc_lt", tmp_path, n_train=20, n_test=10, image_size=16)
    assert download.check(tmp_path)["voc_lt"] == "present (synthetic files from `mlic data fake`, not the real dataset)"
    main = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    assert len((main / "test.txt").read_text().split()) == 10 and (main / "trainval.txt").is_file()


def test_preparing_real_data_clears_the_fake_mark(tmp_path):
    from mlic_lib.data.errors import repair_hint
    from mlic_lib.data.fake import fake_commands, fake_names, forget_fake

    write_fake("mnist", tmp_path, n_train=20, n_test=20)
    write_fake("cifar10", tmp_path, n_train=20, n_test=20)
    assert fake_names(tmp_path) == {"mnist", "cifar10"}
    forget_fake(tmp_path, "mnist")  # what a successful `mlic data prepare mnist` does
    assert fake_names(tmp_path) == {"cifar10"}
    forget_fake(tmp_path, "cifar10")
    assert not (tmp_path / "MLIC_FAKE_DATA.txt").exists()
    write_fake("voc_lt", tmp_path, n_train=20, n_test=12, image_size=32)  # its VOC files are voc_lt's to rewrite
    assert fake_commands(tmp_path) == dict.fromkeys(
        ("voc_lt", "voc2012", "voc2007"), "voc_lt --n-train 20 --n-test 12 --image-size 32")
    (tmp_path / "MLIC_FAKE_DATA.txt").write_text("mnist\nvoc_lt\n")  # a stamp from older code: names only
    assert fake_commands(tmp_path) == {"mnist": "", "voc_lt": ""} and "mlic data fake mnist --data-dir" in (
        repair_hint("mnist", root=tmp_path))


def test_write_fake_rejects_unknown(tmp_path):
    assert set(REAL_DATASETS) <= set(FAKE_DATASETS)
    with pytest.raises(ValueError, match="unknown fake dataset"):
        write_fake("imagenet", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_cli_data_fake(tmp_path):
    from mlic_lib.cli import main

    assert main(["data", "fake", "coco2017", "--data-dir", str(tmp_path), "--n-train", "12", "--n-test", "10"]) == 0
    d = real_data({"dataset": "coco2017", "image_size": 16, "root": str(tmp_path)})
    assert (len(d.train_ds), len(d.test_ds)) == (12, 10)
    assert main(["data", "fake", "coco2017"]) == 2  # no --data-dir: a clear error, nothing written
    for flag in ("--check", "--allow-unverified", "--delete-archives"):  # ignored before: a check wrote files
        other = tmp_path / flag.strip("-")
        assert main(["data", "fake", "mnist", "--data-dir", str(other), flag]) == 2 and not other.exists()


# --------------------------------------------------------------------------------- PSD on images
def test_psd_subtask_view_and_on_the_fly_student(fake_root):
    from mlic_lib import psd

    d = real_data({"dataset": "coco2014", "image_size": 16, "root": str(fake_root)})
    view = psd.subtask_dataset(d.train_ds, d.train_targets, [3, 1])
    idx = psd.subtask_indices(d.train_targets, [3, 1])
    assert len(view) == len(idx)
    x, y = view[0]
    assert x.shape == (3, 16, 16) and torch.equal(y, d.train_ds.targets[idx[0]][[3, 1]])
    settings = {"chapter": "psd-real-test", "data": {"dataset": "coco2014"},
                "model": {"backbone": "small_resnet", "pool": "max", "widths": [4, 8, 8, 8]},
                "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "optimizer": "adam", "scheduler": "none"},
                "teacher_train": {"epochs": 1}, "psd": {"image_selection": "all", "parallel": "sequential"}}
    ens, runs = psd.train_teachers(settings, d.train_ds, d.train_targets, [np.arange(6), np.arange(6, 12)])
    assert len(runs) == 2
    student = psd.train_student(settings, d, [ens], name="cgpd-2", teacher_key=psd.teacher_key(runs))
    base = psd.train_baseline(settings, d)
    assert "kd" in student.history[-1] and student.history[-1]["kd"] > 0
    moved = [not torch.equal(a, b) for a, b in zip(student.model.state_dict().values(),
                                                  base.model.state_dict().values(), strict=True)
             if a.is_floating_point()]
    assert any(moved)  # the KD term changed the training


# --------------------------------------------------------------------- chapters, full profile, offline
SMALL_CNN = {"model.backbone": "small_resnet", "model.widths": [8, 16, 32, 64], "model.weights": None,
             "train.num_workers": 0}
FULL_RUNS = {
    "01_splicemix": (["voc2007"], {**SMALL_CNN, "data.n_train": 64, "data.n_test": 32, "data.n_bias_test": 32,
                                   "data.scenes": {}, "data.real.image_size": 32, "train.epochs": 1,
                                   "train.batch_size": 16, "seeds": [0], "analysis.cam_images": 2,
                                   "analysis.ratio_epochs": 1, "methods": ["baseline", "splicemix", "splicemix_cl"]}),
    "02_psd": (["coco2014"], {**SMALL_CNN, "data.image_size": 32, "train.epochs": 1, "train.batch_size": 16,
                              "teacher_train.epochs": 1, "psd.ks": [1, 2], "psd.cpsd_k": 2, "psd.random_seeds": [0],
                              "psd.parallel": "auto", "psd.n_init": 2}),
    "03_assocformer": (["voc2007"], {"data.image_size": 32, "model.pretrained": False, "train.num_workers": 0,
                                     "model.backbone_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                                               "depth": 1, "num_heads": 2},
                                     "model.backbone": "vit_tiny_patch16_224", "train.epochs": 1,
                                     "train.batch_size": 16, "seeds": [0], "analysis.regularizers": ["none", "l2"],
                                     "analysis.cost_classes": [10, 20], "analysis.cost_dim": 32,
                                     "analysis.paper_dim": 64, "analysis.cost_repeats": 1}),
    "04_indeed": (["mnist", "cifar10"], {"data.n_train": 200, "data.n_test": 100, "model.widths": [8, 16, 16],
                                         "model.hidden": 32, "train.epochs": 2, "train.batch_size": 32,
                                         "train.num_workers": 0, "train.milestones": [1], "seeds": [0],
                                         "ablation_seeds": [0], "ablation_n_labels": [7], "analysis.cam_images": 4,
                                         "cifar.data.n_train": 100, "cifar.data.n_test": 50,
                                         "cifar.model.width": 0.0625, "cifar.model.hidden": 32,
                                         "cifar.train.epochs": 1, "cifar.train.num_workers": 0,
                                         "cifar.train.batch_size": 32}),
    "05_ltml": (["voc_lt"], {**SMALL_CNN, "model.frozen_stages": 0, "data.image_size": 32, "train.epochs": 1,
                             "train.batch_size": 16, "train.milestones": [1], "train.warmup_steps": 0, "seeds": [0],
                             "ltml.samples_per_class": 1, "ltml.lambda_sweep": [0.1]}),
}


def test_full_runs_cover_every_paper_chapter():
    chapters = {p.stem for p in (REPO / "notebooks").glob("0[1-9]_*.ipynb")}
    assert chapters == set(FULL_RUNS)


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", sorted(FULL_RUNS))
def test_chapter_full_profile_on_real_layout(chapter, tmp_path, monkeypatch):
    """profile="full" end to end on synthetic files in the real layouts (small models and sizes through
    the notebook's ``overrides`` parameter): the real-data branches of every chapter execute."""
    from mlic_lib.book import execute_notebook
    from mlic_lib.profiles import load_profile

    datasets, overrides = FULL_RUNS[chapter]
    load_profile(chapter.split("_", 1)[1], "full", overrides)  # every override key is valid
    for name in datasets:
        big = name in ("mnist", "cifar10")
        write_fake(name, tmp_path / "data", n_train=500 if big else 48, n_test=200 if big else 32, image_size=40)
    monkeypatch.setenv("MLIC_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    out = tmp_path / f"{chapter}.ipynb"
    execute_notebook(REPO / "notebooks" / f"{chapter}.ipynb", out, "full", {"overrides": overrides}, timeout=600)
    cells = json.loads(out.read_text())["cells"]
    assert not [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))
    assert "not available" not in text  # the real-data branch ran, it did not skip
    results = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert results["profile"] == "full"


def test_cli_reproduce_passes_overrides(tmp_path):
    """`mlic reproduce -o key=value` reaches the notebook (an invalid key fails inside the chapter)."""
    env = {**os.environ, "MLIC_CACHE": str(tmp_path / "c"), "MLIC_RESULTS": str(tmp_path / "r")}
    (tmp_path / "notebooks").mkdir()
    nb = "00_multilabel_primer.ipynb"
    (tmp_path / "notebooks" / nb).write_text((REPO / "notebooks" / nb).read_text())
    r = subprocess.run([sys.executable, "-m", "mlic_lib.cli", "--root", str(tmp_path), "reproduce", "primer",
                        "--profile", "smoke", "-o", "no.such.key=1"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0 and "no.such.key" in (r.stdout + r.stderr)


# ------------------------------------------------------------------------------------------- NUS-WIDE
def test_nuswide_lists_labels_and_missing_images(tmp_path):
    from mlic_lib.data.nuswide import nuswide_dataset, read_nuswide_labels

    write_fake("nuswide", tmp_path, n_train=30, n_test=20)
    paths, labels, concepts = read_nuswide_labels(tmp_path, "train")
    assert len(paths) == 30 and labels.shape == (30, 81) and concepts[0] == "airport"
    assert all("\\" not in p and p.count("/") == 1 for p in paths)  # Windows paths -> folder/file
    with pytest.warns(UserWarning, match="1 of") if labels[-1].any() else contextlib.nullcontext():
        ds = nuswide_dataset(tmp_path, "train")
    present_and_labelled = labels[:-1].any(1).sum()  # the last listed image is missing on disk
    assert len(ds) == present_and_labelled and ds.n_missing == int(labels[-1].any())
    assert ds.targets.sum(1).min() >= 1  # drop_empty
    with pytest.warns(UserWarning, match="1 of 30 listed images are missing"):
        assert len(nuswide_dataset(tmp_path, "train", drop_empty=False)) == 29
    if labels[-1].any():
        with pytest.raises(DatasetNotFoundError, match="nuswide"):
            nuswide_dataset(tmp_path, "train", missing="error")
    lab = tmp_path / "nuswide" / "Groundtruth" / "TrainTestLabels" / "Labels_bear_Test.txt"
    lab.write_text("0\n1\n")
    with pytest.raises(ValueError, match="2 labels for 20 images"):
        read_nuswide_labels(tmp_path, "test")
    (tmp_path / "nuswide" / "Concepts81.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="Concepts81.txt"):
        read_nuswide_labels(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        read_nuswide_labels(tmp_path, "val")


def test_nuswide_label_columns_are_the_concepts_label_files(tmp_path):
    """Column j of the label matrix is Labels_<concept j>_<Split>.txt, value for value (no test compared them: a
    shifted or reversed column order passed)."""
    from mlic_lib.data.nuswide import read_nuswide_labels

    write_fake("nuswide", tmp_path, n_train=30, n_test=20)
    for split, suffix in (("train", "Train"), ("test", "Test")):
        _, labels, concepts = read_nuswide_labels(tmp_path, split)
        assert 0 < int(labels.any(0).sum()) < len(concepts)  # some concepts empty: a column mix-up shows
        for j, c in enumerate(concepts):
            f = tmp_path / "nuswide" / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_{suffix}.txt"
            assert labels[:, j].tolist() == [int(v) for v in f.read_text().split()], (split, c)


# ------------------------------------------------------------------------------- review follow-ups
def test_write_fake_refuses_the_real_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="real data root"):
        write_fake("voc2007", tmp_path)
    assert not any(tmp_path.iterdir())
    write_fake("voc2007", tmp_path, n_train=10, n_test=10, force=True)
    assert (tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages").is_dir()
    with pytest.raises(ValueError, match="n_train >= 10"):
        write_fake("voc2007", tmp_path / "other", n_train=2)


def test_nuswide_concepts_in_conceptslist_folder(tmp_path):
    from mlic_lib.data.nuswide import read_nuswide_labels

    write_fake("nuswide", tmp_path, n_train=12, n_test=10)
    base = tmp_path / "nuswide"
    (base / "ConceptsList").mkdir()
    (base / "Concepts81.txt").rename(base / "ConceptsList" / "Concepts81.txt")
    assert len(read_nuswide_labels(tmp_path, "test")[2]) == 81


def test_nuswide_prefers_the_top_level_files_over_the_nested_copies(tmp_path):
    """Where both exist, ``Concepts81.txt`` and ``ImageList/<Split>Imagelist.txt`` are read, not the nested
    ``ConceptsList/`` or ``ImageList/ImageList/`` copies (here stale ones that would be refused or shorter)."""
    from mlic_lib.data.nuswide import NUSWIDE_CONCEPTS, read_nuswide_labels

    write_fake("nuswide", tmp_path, n_train=12, n_test=10)
    base = tmp_path / "nuswide"
    (base / "ConceptsList").mkdir()
    (base / "ConceptsList" / "Concepts81.txt").write_text("\n".join(reversed(NUSWIDE_CONCEPTS)))
    (base / "ImageList" / "ImageList").mkdir()
    (base / "ImageList" / "ImageList" / "TestImagelist.txt").write_text("a\\1.jpg\n")
    paths, labels, names = read_nuswide_labels(tmp_path, "test")
    assert tuple(names) == NUSWIDE_CONCEPTS and len(paths) == 10 == labels.shape[0]


def test_nuswide_label_values_other_than_0_and_1_are_refused(tmp_path):
    """A label file with a value outside {0, 1} (a damaged or foreign file) is an error, not a label of 2 or 255."""
    from mlic_lib.data.nuswide import read_nuswide_labels

    write_fake("nuswide", tmp_path, n_train=12, n_test=10)
    lab = tmp_path / "nuswide" / "Groundtruth" / "TrainTestLabels" / "Labels_bear_Test.txt"
    for bad in ("2", "-1"):
        lab.write_text("\n".join(["0"] * 9 + [bad]) + "\n")
        with pytest.raises(ValueError, match=r"Labels_bear_Test\.txt: labels must be 0 or 1"):
            read_nuswide_labels(tmp_path, "test")


def test_nuswide_list_variants_and_layout_errors(tmp_path):
    """A byte-order mark, the image lists nested as ImageList.zip unpacks, a re-ordered or foreign concepts file,
    and a Flickr/ folder where no listed image is found."""
    from mlic_lib.data.nuswide import NUSWIDE_CONCEPTS, nuswide_dataset, read_nuswide_labels

    write_fake("nuswide", tmp_path, n_train=12, n_test=10)
    base = tmp_path / "nuswide"
    concepts = base / "Concepts81.txt"
    concepts.write_bytes(b"\xef\xbb\xbf" + concepts.read_bytes())
    lists = base / "ImageList"
    (lists / "ImageList").mkdir()
    for split in ("Train", "Test"):
        (lists / f"{split}Imagelist.txt").rename(lists / "ImageList" / f"{split}Imagelist.txt")
    paths, labels, names = read_nuswide_labels(tmp_path, "test")
    assert tuple(names) == NUSWIDE_CONCEPTS and len(paths) == 10 == labels.shape[0]
    concepts.write_text("\n".join(reversed(NUSWIDE_CONCEPTS)))
    with pytest.raises(ValueError, match="another order"):
        read_nuswide_labels(tmp_path, "test")
    concepts.write_text("\n".join(NUSWIDE_CONCEPTS[:80] + ("zebras",)))
    with pytest.raises(ValueError, match="unknown: zebras; absent: zebra"):
        read_nuswide_labels(tmp_path, "test")
    concepts.write_text("\n".join(NUSWIDE_CONCEPTS))
    shutil.rmtree(base / "Flickr")
    (base / "Flickr" / "elsewhere").mkdir(parents=True)
    for missing in ("skip", "error"):  # a wrong layout, whichever the policy for a few lost images
        with pytest.raises(DatasetNotFoundError, match="none of the .* listed test images is under Flickr/"):
            nuswide_dataset(tmp_path, "test", missing=missing)
    (lists / "ImageList" / "TestImagelist.txt").write_text("")  # cut short to nothing (an interrupted copy)
    with pytest.raises(ValueError, match=r"TestImagelist\.txt lists no image: .* put the official TestImagelist\.txt"):
        nuswide_dataset(tmp_path, "test")  # was numpy's "ufunc 'invert' not supported"


def test_coco_annotation_file_errors(tmp_path):
    from mlic_lib.data.coco import coco_dataset

    write_fake("coco2014", tmp_path, n_train=10, n_test=10)
    ann = tmp_path / "coco" / "annotations" / "instances_val2014.json"
    good = ann.read_text()
    ann.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="instances_val2014.json is not valid JSON.*prepare coco2014 --force"):
        coco_dataset(tmp_path, "2014", "val")
    data = json.loads(good)
    data["annotations"] = []
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="gives no image with an annotation"):
        coco_dataset(tmp_path, "2014", "val", drop_empty=True)
    assert len(coco_dataset(tmp_path, "2014", "val")) == len(data["images"])  # kept, all-zero targets


def test_psd_steps_use_the_mask_and_never_mistake_it_for_teacher_logits():
    from mlic_lib import psd
    from mlic_lib.losses import AsymmetricLoss

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    x, y = torch.randn(5, 6), (torch.rand(5, 4) > 0.5).float()
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[:, 0] = False
    loss, _ = psd.ASLStep()(model, (x, y, mask), "cpu")
    ref = AsymmetricLoss(gamma_pos=0.0, gamma_neg=4.0, clip=0.05)(model(x).float(), y, mask)
    torch.testing.assert_close(loss, ref)
    teacher = torch.nn.Linear(6, 4)
    step = psd.DistillationStep(teachers=[teacher])
    total, logs = step(model, (x, y, mask), "cpu")
    with torch.no_grad():
        kd = psd.kd_loss(model(x), teacher(x)[:, None], "sum")
    torch.testing.assert_close(logs["kd"], kd)  # the teacher ran; the mask was not read as logits
    torch.testing.assert_close(logs["cls"], ref.detach())


def test_training_on_images_with_workers_is_deterministic(fake_root, tmp_path):
    """Random crops/flips run in DataLoader workers: two runs with the same seed give the same weights."""
    from mlic_lib.engine import TrainConfig, fit
    from mlic_lib.models import build_model

    d = real_data({"dataset": "voc2007", "image_size": 24, "root": str(fake_root),
                   "augment": {"crop": "multiscale", "hflip": True}})
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, num_workers=2, seed=3)

    def weights():
        torch.manual_seed(0)
        model = build_model("small_resnet", 20, widths=(4, 8, 8, 8))
        return fit(model, d.train_ds, None, cfg, progress=False).model.state_dict()

    a, b = weights(), weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_note():
    from mlic_lib.experiments import pretraining_note

    assert "from scratch" in pretraining_note({"backbone": "resnet101", "weights": None})
    assert pretraining_note({"backbone": "resnet101", "weights": "/w/resnet101.pth"}) == ""
    assert pretraining_note({"backbone": "small_resnet"}) == ""  # the CPU model is meant to train from scratch


def test_coco_lt_leaves_ignored_and_zero_area_annotations_out_of_its_train_and_test_labels(tmp_path):
    """DistributionBalancedLoss's COCO loader drops annotations flagged ``ignore`` or of zero area; so do COCO-LT's
    training labels and its val2017 test labels (the fake files have none of them, so they are added here)."""
    from mlic_lib.data.longtail import lt_datasets

    write_fake("coco_lt", tmp_path, n_train=30, n_test=20, image_size=32)
    ann_dir = tmp_path / "coco" / "annotations"
    before = lt_datasets("coco_lt", root=tmp_path, image_size=16)
    for split, ds in (("train2017", before[0]), ("val2017", before[2])):
        path = ann_dir / f"instances_{split}.json"
        payload = json.loads(path.read_text())
        cat_ids = [c["id"] for c in payload["categories"]]
        image_id = int(ds.ids[0]) if split == "train2017" else payload["images"][0]["id"]
        have = {a["category_id"] for a in payload["annotations"] if a["image_id"] == image_id}
        free = [c for c in cat_ids if c not in have][:2]
        for k, (cat, extra) in enumerate(zip(free, ({"ignore": 1, "area": 25.0}, {"area": 0.0}), strict=True)):
            payload["annotations"].append({"id": 10**6 + k, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                                           "bbox": [1, 1, 5, 5], **extra})
        path.write_text(json.dumps(payload))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the labels still agree with the split file's gt_labels
        after = lt_datasets("coco_lt", root=tmp_path, image_size=16)
    for i in (0, 2):
        np.testing.assert_array_equal(np.asarray(after[i].targets), np.asarray(before[i].targets))


def test_multiscale_crop_snaps_only_sides_strictly_within_snap_pixels():
    rng = random.Random(0)
    assert MultiScaleCrop(448, (0.875,)).params(509, 509, rng)[2:] == (445, 445)  # 3 px off: kept (the code's < 3)
    assert MultiScaleCrop(448, (0.875,)).params(510, 510, rng)[2:] == (448, 448)  # 2 px off: snapped


def test_train_preset_steps_in_the_recipes_order_with_flips_by_default():
    """Cutout before RandAugment (the ASL recipe), a horizontal flip unless ``hflip: false``, the photometric
    distortion on the tensor."""
    from torchvision import transforms as T

    from mlic_lib.data.rand_augment import UDARandAugment

    kinds = [type(t) for t in train_preset(32, {"cutout": 0.5, "randaugment": True}).transforms]
    assert kinds == [T.Resize, T.RandomHorizontalFlip, Cutout, T.RandAugment, T.ToTensor, T.Normalize]
    kinds = [type(t) for t in train_preset(32, {"crop": "random_patch", "photometric": True, "hflip": False,
                                                "randaugment": "uda"}, normalize="none").transforms]
    assert kinds == [RandomPatchCrop, T.Resize, UDARandAugment, T.ToTensor, PhotoMetricDistortion]


def test_nuswide_counts_only_the_missing_images_it_would_have_kept(tmp_path):
    """With ``drop_empty``, a listed image without any label is left out anyway: its absence is not 'missing'."""
    from mlic_lib.data.nuswide import nuswide_dataset, read_nuswide_labels

    write_fake("nuswide", tmp_path, n_train=30, n_test=20)
    paths, labels, concepts = read_nuswide_labels(tmp_path, "train")
    base = tmp_path / "nuswide"
    for c in concepts:  # image 0 loses its labels, and its file
        f = base / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_Train.txt"
        f.write_text("\n".join(["0", *f.read_text().split()[1:]]) + "\n")
    (base / "Flickr" / paths[0]).unlink()
    last = int(labels[-1].any())  # the fake's last listed image is missing too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nuswide_dataset(tmp_path, "train").n_missing == last
        assert nuswide_dataset(tmp_path, "train", drop_empty=False).n_missing == 2
