"""The UDA RandAugment of the ASL / CPSD code: each operation against PIL directly, and the policy's draws."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from mlic_lib.data import rand_augment
from mlic_lib.data.presets import eval_preset, train_preset
from mlic_lib.data.rand_augment import OPS, UDARandAugment, apply_op


def _photo(w: int = 66, h: int = 44, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


class _Sign(random.Random):
    """A generator whose ``choice`` of a direction is fixed, for exact comparisons."""

    def __init__(self, sign: int):
        super().__init__(0)
        self.sign = sign

    def choice(self, seq):
        return self.sign if tuple(seq) == (-1, 1) else super().choice(seq)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def test_pixel_operations_match_pil_at_their_magnitudes():
    img = _photo()
    assert np.array_equal(_arr(apply_op(img, "Invert", 5)), 255 - _arr(img))
    assert np.array_equal(_arr(apply_op(img, "Solarize", 9)), 255 - _arr(img))  # threshold 256 (1 - 9/9) = 0
    assert np.array_equal(_arr(apply_op(img, "Solarize", 0)), _arr(img))  # threshold 256: nothing
    assert np.array_equal(_arr(apply_op(img, "Posterize", 9)), _arr(img) & 0xF0)  # 4 bits
    assert np.array_equal(_arr(apply_op(img, "Posterize", 4)), _arr(ImageOps.posterize(img, 6)))  # round(8 - 16/9)
    assert np.array_equal(_arr(apply_op(img, "Equalize", 3)), _arr(ImageOps.equalize(img)))
    assert np.array_equal(_arr(apply_op(img, "AutoContrast", 3)), _arr(ImageOps.autocontrast(img)))
    for name, enh in (("Brightness", ImageEnhance.Brightness), ("Color", ImageEnhance.Color),
                      ("Contrast", ImageEnhance.Contrast), ("Sharpness", ImageEnhance.Sharpness)):
        for sign in (-1, 1):
            want = enh(img).enhance(1 + sign * 0.9 * 6 / 9)
            assert np.array_equal(_arr(apply_op(img, name, 6, _Sign(sign))), _arr(want)), (name, sign)


def test_geometric_operations_shift_rotate_and_fill_grey():
    img = _photo()
    w, h = img.size
    for sign in (-1, 1):
        out = _arr(apply_op(img, "TranslateX", 9, _Sign(sign)))
        t = round(150 / 331 * w)  # 30 px of 66 at level 9
        if sign > 0:  # output column x shows input column x + t
            assert np.array_equal(out[:, : w - t], _arr(img)[:, t:]) and (out[:, w - t + 1:] == 128).all()
        else:
            assert np.array_equal(out[:, t:], _arr(img)[:, : w - t]) and (out[:, : t - 1] == 128).all()
        out = _arr(apply_op(img, "TranslateY", 9, _Sign(sign)))
        t = round(150 / 331 * h)  # 20 px of the 44 rows (the width would give 30: the image is not square)
        if sign > 0:  # output row y shows input row y + t
            assert np.array_equal(out[: h - t], _arr(img)[t:]) and (out[h - t + 1:] == 128).all()
        else:
            assert np.array_equal(out[t:], _arr(img)[: h - t]) and (out[: t - 1] == 128).all()
    assert np.array_equal(_arr(apply_op(img, "ShearX", 0)), _arr(img))
    assert np.array_equal(_arr(apply_op(img, "Rotate", 9)), _arr(img.rotate(30, fillcolor=(128, 128, 128))))
    assert (_arr(apply_op(img, "Rotate", 9))[0, 0] == 128).all()  # a corner leaves the frame
    sheared = _arr(apply_op(img, "ShearY", 9, _Sign(1)))
    assert (sheared[-1, -1] == 128).all() and not np.array_equal(sheared, _arr(img))


@pytest.mark.parametrize("level", [3, 6, 9])
def test_affine_operations_use_the_policys_magnitudes(level, monkeypatch):
    """The affine coefficients PIL receives: shear 0.3 m, translation 150/331 m of the side along its own axis
    (m = level / 9), bicubic for shears and nearest for translations, grey fill (the ASL/CPSD RandAugment)."""
    seen = []
    real = Image.Image.transform

    def spy(self, size, method, data, resample, **kw):
        seen.append((method, tuple(data), resample, kw.get("fillcolor")))
        return real(self, size, method, data, resample, **kw)

    monkeypatch.setattr(Image.Image, "transform", spy)
    img, m = _photo(), level / 9
    w, h = img.size
    want = {"ShearX": (1, 0.3 * m, 0, 0, 1, 0), "ShearY": (1, 0, 0, 0.3 * m, 1, 0),
            "TranslateX": (1, 0, 150 / 331 * m * w, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, 150 / 331 * m * h)}
    for name, coeffs in want.items():
        for sign in (-1, 1):
            apply_op(img, name, level, _Sign(sign))
            method, data, resample, fill = seen[-1]
            assert method == Image.AFFINE and fill == (128, 128, 128), name
            assert resample == (Image.BICUBIC if name.startswith("Shear") else Image.NEAREST), name
            signed = tuple(c * sign if k in (1, 2, 3, 5) else c for k, c in enumerate(coeffs))
            assert data == pytest.approx(signed), (name, sign)


@pytest.mark.parametrize("level", [1, 5, 9])
def test_cutout_is_a_grey_square_of_the_levels_side(level):
    img = Image.new("RGB", (200, 200), (0, 0, 0))
    rng = random.Random(1)
    rng.randrange = lambda n: 100  # centre of the image: no clipping
    out = _arr(apply_op(img, "Cutout", level, rng))
    hole = (out == (125, 122, 113)).all(-1)
    side = 2 * (round(20 * level / 9) // 2)
    assert hole.sum() == side * side and hole[100 - side // 2: 100 + side // 2, 100 - side // 2: 100 + side // 2].all()


def test_policy_draws_two_ops_uniform_levels_each_with_probability_half(monkeypatch):
    calls: list[list[tuple[str, int]]] = []

    def record(img, name, level, rng=None):
        calls[-1].append((name, level))
        return img

    monkeypatch.setattr(rand_augment, "apply_op", record)
    aug, rng, img = UDARandAugment(), random.Random(0), _photo(8, 8)
    for _ in range(6000):
        calls.append([])
        aug(img, rng)
    n = np.array([len(c) for c in calls])
    assert abs((n == 0).mean() - 0.25) < 0.02 and abs(n.mean() - 1.0) < 0.03 and n.max() == 2
    names = [op for c in calls for op, _ in c]
    levels = [lv for c in calls for _, lv in c]
    assert set(names) == set(OPS) and set(levels) == set(range(1, 10))
    freq = np.array([names.count(op) for op in OPS]) / len(names)
    assert np.abs(freq - 1 / 15).max() < 0.015


def test_presets_accept_uda_and_unnormalised_and_reject_bad_values():
    random.seed(0)
    x = train_preset(32, {"randaugment": "uda", "cutout": 0.5}, normalize="none")(_photo())
    assert x.shape == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    y = eval_preset(32, normalize="none")(_photo())
    assert 0 <= float(y.min()) and float(y.max()) <= 1 and float(eval_preset(32)(_photo()).min()) < 0
    with pytest.raises(ValueError, match="randaugment"):
        train_preset(32, {"randaugment": "strong"})
    # values that used to pass: cutout true was a factor of 1.0 (half the image hidden on average), a string hflip
    # was true, a resize_factor of 0 failed only at the first image, naming no setting
    for augment, match in (({"cutout": True}, r"augment.cutout must be a fraction .* got True"),
                           ({"cutout": 16}, "augment.cutout must be a fraction"),
                           ({"resize_factor": 0}, r"augment.resize_factor must be a number > 0 .*got 0"),
                           ({"resize_factor": None}, "augment.resize_factor must be a number"),
                           ({"hflip": "no"}, "augment.hflip must be true or false, got 'no'"),
                           ("strong", "augment must be a mapping of options")):
        with pytest.raises(ValueError, match=match):
            train_preset(32, augment)
    with pytest.raises(ValueError, match="normalize"):
        eval_preset(32, normalize="coco")
    with pytest.raises(ValueError, match="unknown operation"):
        apply_op(_photo(), "Mixup", 3)
    with pytest.raises(ValueError, match="level"):
        apply_op(_photo(), "Rotate", 10)
    with pytest.raises(ValueError, match="p must"):
        UDARandAugment(p=1.5)


def test_posterize_keeps_the_rounded_number_of_bits_at_every_level():
    img = _photo()
    for level in range(10):
        bits = round(8 - 4 * level / 9)  # level 1: 7.56 -> 8 bits (nothing changes); truncating gave 7
        assert np.array_equal(_arr(apply_op(img, "Posterize", level)), _arr(ImageOps.posterize(img, bits))), level


def test_cutout_centred_on_the_last_pixel_reaches_the_border():
    img = Image.new("RGB", (50, 40), (0, 0, 0))
    rng = random.Random(0)
    rng.randrange = lambda n: n - 1  # centre on the bottom-right pixel
    hole = (_arr(apply_op(img, "Cutout", 9, rng)) == (125, 122, 113)).all(-1)
    # side 20: 10 px before the centre, the centre itself, and nothing beyond the image
    assert hole.sum() == 11 * 11 and hole[29:, 39:].all()


def test_policy_applies_each_drawn_op_with_probability_p(monkeypatch):
    calls = []
    monkeypatch.setattr(rand_augment, "apply_op", lambda img, name, level, rng=None: calls.append(name) or img)
    rng, img = random.Random(1), _photo(8, 8)
    for p, want in ((0.0, 0), (1.0, 2)):
        calls.clear()
        UDARandAugment(p=p)(img, rng)
        assert len(calls) == want, p
    calls.clear()
    aug = UDARandAugment(p=0.2)
    for _ in range(3000):
        aug(img, rng)
    assert abs(len(calls) / 6000 - 0.2) < 0.02
