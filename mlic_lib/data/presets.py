"""Image pre-processing presets for the real datasets (the ``full`` profiles), split as in torchvision's
``references/classification/presets.py``: one train preset and one eval preset, built from a small
mapping that the chapter profiles carry under ``data.augment``.

Training recipes of the papers:

* SpliceMix (Sec. IV-A) follows ML-GCN: resize, then a random *multi-scale crop* resized to ``size``
  with horizontal flips -> ``{"crop": "multiscale", "hflip": True}``; the crop's aspect and its 13 fixed
  positions follow the authors' code (:class:`MultiScaleCrop`, ``max_distort``, ``fixed_offsets``).
* AssocFormer (Sec. 4.1) follows ASL: resize to ``size``, Cutout with factor 0.5 and RandAugment ->
  ``{"crop": "none", "hflip": False, "cutout": 0.5, "randaugment": True}`` (torchvision's RandAugment, the
  policy of the paper's reference [6]). CPSD's paper names no augmentation; its authors' code runs the ASL
  code's pipeline, whose RandAugment is the UDA variant of the ``randaugment`` package ->
  ``"randaugment": "uda"`` (:class:`~mlic_lib.data.rand_augment.UDARandAugment`); that code also leaves the
  images in [0, 1] without the ImageNet mean/std (``normalize: "none"`` in :func:`train_preset` /
  :func:`eval_preset`).
* LTML (Sec. 4.1: "standard data augmentations ... as in" DistributionBalancedLoss): DBL's colour
  distortion (:class:`PhotoMetricDistortion`) and random patch (:class:`RandomPatchCrop`, at least 0.8
  of each side), resize to ``size``, random flip -> ``{"crop": "random_patch", "photometric": True}``.

Evaluation always resizes to ``(size, size)``. Both presets normalise with the ImageNet mean/std (what
torchvision's ImageNet weights expect) unless ``normalize="none"``. Images are PIL images in, ``float32``
tensors ``(3, size, size)`` out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw

from .images import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CV2Resize", "Cutout", "MultiScaleCrop", "PhotoMetricDistortion", "RandomPatchCrop", "eval_preset",
           "hsv_to_rgb", "rgb_to_hsv", "train_preset"]

CROPS = ("none", "multiscale", "random_resized", "random_patch")
RANDAUGMENTS = (False, True, "torchvision", "uda")
NORMALIZE = ("imagenet", "none")
RESIZES = ("pil", "cv2")
_KEYS = {"crop", "hflip", "cutout", "randaugment", "scales", "max_distort", "fixed_offsets", "resize_factor",
         "photometric", "min_crop"}


class MultiScaleCrop:
    """ML-GCN style crop, as in the SpliceMix authors' code (the paper, Sec. IV-A, only says "randomly cropped
    and resized to 448x448 with horizontal flips", following ML-GCN).

    A crop width and a crop height are each a fraction from ``scales`` of the image's short side (a side within
    ``snap`` pixels of ``size`` becomes ``size``), with the two fractions' positions in ``scales`` at most
    ``max_distort`` apart; the crop is placed at one of 13 fixed positions (the four corners, the centre, the
    four edge midpoints and the four quarter points, on a grid of quarter steps of the free margin) or, with
    ``fixed_offsets=False``, anywhere; then it is resized to ``size x size`` (bilinear).

    Parameters
    ----------
    size : int
        Output side in pixels.
    scales : sequence of float, default (1, .875, .75, .66, .5)
        Fractions of the image's short side.
    max_distort : int, default 2
        Largest difference between the width's and the height's index in ``scales`` (ML-GCN and the SpliceMix
        code pass 2; 0 gives square crops only).
    fixed_offsets : bool, default True
        Place the crop at the 13 fixed positions (the authors' code) instead of uniformly at random.
    snap : int, default 3
        A crop side closer than this many pixels to ``size`` is set to ``size`` (the authors' code), unless
        the image's short side is below ``size``.
    resize : ``"pil"`` (default: PIL's bilinear, the authors' code) or ``"cv2"`` (:class:`CV2Resize`)
        How the crop is resized to ``size x size``.
    """

    def __init__(self, size: int, scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66, 0.5), max_distort: int = 2,
                 fixed_offsets: bool = True, snap: int = 3, resize: str = "pil"):
        if not scales or any(not 0 < s <= 1 for s in scales):
            raise ValueError(f"scales must be fractions in (0, 1], got {list(scales)}")
        if int(max_distort) != max_distort or max_distort < 0:
            raise ValueError(f"max_distort must be an integer >= 0, got {max_distort!r}")
        if int(snap) != snap or snap < 0:
            raise ValueError(f"snap must be an integer number of pixels >= 0, got {snap!r}")
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.size, self.resize = int(size), resize
        self.scales = tuple(float(s) for s in scales)
        self.max_distort, self.fixed_offsets, self.snap = int(max_distort), bool(fixed_offsets), int(snap)

    @staticmethod
    def fixed_positions(width: int, height: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
        """The 13 ``(left, top)`` positions of a ``crop_w x crop_h`` crop: corners, centre, edge midpoints and
        quarter points, in steps of a quarter of the free margin (rounded down)."""
        sx, sy = (width - crop_w) // 4, (height - crop_h) // 4
        grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2),  # corners, centre
                (0, 2), (4, 2), (2, 4), (2, 0),  # edge midpoints
                (1, 1), (3, 1), (1, 3), (3, 3)]  # quarter points
        return [(i * sx, j * sy) for i, j in grid]

    def params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """``(left, top, crop_w, crop_h)`` of one random crop of a ``width x height`` image."""
        base = min(width, height)
        sides = [max(1, int(base * s)) for s in self.scales]
        sides = [self.size if abs(s - self.size) < self.snap and self.size <= base else s for s in sides]
        pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= self.max_distort]
        cw, ch = rng.choice(pairs)
        if self.fixed_offsets:
            left, top = rng.choice(self.fixed_positions(width, height, cw, ch))
        else:
            left, top = rng.randint(0, width - cw), rng.randint(0, height - ch)
        return left, top, cw, ch

    def __call__(self, img: Image.Image) -> Image.Image:
        left, top, cw, ch = self.params(img.width, img.height, random)
        crop = img.crop((left, top, left + cw, top + ch))
        if self.resize == "cv2":
            return CV2Resize(self.size)(crop)
        return crop.resize((self.size, self.size), Image.BILINEAR)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scales={self.scales}, max_distort={self.max_distort}, "
                f"fixed_offsets={self.fixed_offsets}, snap={self.snap}, resize={self.resize!r})")


class Cutout:
    """Cutout (DeVries & Taylor 2017) in the form of the ASL training recipe that AssocFormer follows: one
    rectangle of ``factor`` times the image height and width (clipped at the borders), centred at a random
    pixel, filled with one random colour, applied to every image before RandAugment.

    Parameters
    ----------
    factor : float in (0, 1]
        Side of the rectangle as a fraction of the image side (the paper's "factor of 0.5").
    p : float, default 1.0
        Probability that an image is cut (ASL: always).
    """

    def __init__(self, factor: float = 0.5, p: float = 1.0):
        if not 0 < factor <= 1:
            raise ValueError(f"cutout factor must lie in (0, 1], got {factor}")
        if not 0 <= p <= 1:
            raise ValueError(f"cutout probability must lie in [0, 1], got {p}")
        self.factor, self.p = float(factor), float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        img = img.copy()
        w, h = img.size
        ch, cw = max(1, round(self.factor * h)), max(1, round(self.factor * w))
        cy, cx = random.randrange(h), random.randrange(w)
        x0, y0 = cx - cw // 2, cy - ch // 2  # PIL rectangles include both corners: the last pixel is x0 + cw - 1
        box = (max(0, x0), max(0, y0), min(w - 1, x0 + cw - 1), min(h - 1, y0 + ch - 1))
        ImageDraw.Draw(img).rectangle(box, fill=tuple(random.randrange(256) for _ in range(3)))
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(factor={self.factor}, p={self.p})"


class RandomPatchCrop:
    """DistributionBalancedLoss's random crop: a patch whose width and height are drawn uniformly from
    ``[min_crop * W, W]`` and ``[min_crop * H, H]``, redrawn (up to 50 times, then the whole image) until its
    height / width lies in ``[0.5, 2]``, at a uniformly random position. Resizing is left to the next step.
    """

    def __init__(self, min_crop: float = 0.8):
        if not 0 < min_crop <= 1:
            raise ValueError(f"min_crop must lie in (0, 1], got {min_crop}")
        self.min_crop = float(min_crop)

    def params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """``(left, top, crop_w, crop_h)`` of one patch of a ``width x height`` image."""
        for _ in range(50):
            cw, ch = rng.uniform(self.min_crop * width, width), rng.uniform(self.min_crop * height, height)
            if 0.5 <= ch / cw <= 2:
                left, top = int(rng.uniform(0, width - cw)), int(rng.uniform(0, height - ch))
                return left, top, max(1, int(left + cw) - left), max(1, int(top + ch) - top)
        return 0, 0, width, height

    def __call__(self, img: Image.Image) -> Image.Image:
        left, top, cw, ch = self.params(img.width, img.height, random)
        return img.crop((left, top, left + cw, top + ch))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_crop={self.min_crop})"


def rgb_to_hsv(img):
    """``(3, H, W)`` RGB (any scale) -> hue in degrees ``[0, 360)``, saturation, value (OpenCV's float rule:
    ``s = (v - min) / (|v| + FLT_EPSILON)``, so a pixel whose channels are all negative, after a negative brightness
    shift, has a negative ``s`` and comes back from :func:`hsv_to_rgb` reflected, as in DistributionBalancedLoss's
    ``mmcv.bgr2hsv`` / ``hsv2bgr``)."""
    r, g, b = img.unbind(0)
    v, mn = img.amax(0), img.amin(0)
    delta = v - mn
    safe = torch.where(delta != 0, delta, torch.ones_like(delta))
    h = torch.where(v == r, 60 * (g - b) / safe,
                    torch.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    h = torch.where(h < 0, h + 360, h)
    s = delta / (v.abs() + 1.1920929e-07)  # OpenCV's FLT_EPSILON
    return h, s, v


# sector of the hue -> which of (v, q, p, t) is R, G, B
_HSV_SECTORS = ((0, 3, 2), (1, 0, 2), (2, 0, 3), (2, 1, 0), (3, 2, 0), (0, 2, 1))


def hsv_to_rgb(h, s, v):
    """Inverse of :func:`rgb_to_hsv`: hue in degrees, saturation, value -> ``(3, H, W)`` RGB."""
    hh = torch.remainder(h, 360) / 60
    sector = hh.floor().long().clamp(0, 5)
    f = hh - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    vals = torch.stack([v, q, p, t])  # (4, H, W)
    index = torch.tensor(_HSV_SECTORS, device=h.device)[sector]  # (H, W, 3)
    return vals.gather(0, index.permute(2, 0, 1))


class PhotoMetricDistortion:
    """DistributionBalancedLoss's colour distortion (the mmdetection v1 recipe LTML reuses) on a float
    tensor ``(3, H, W)`` in ``[0, 1]``, computed on the 0-255 scale like the original. Each step happens
    with probability 1/2: brightness ``+ U(-32, 32)``; contrast ``x U(0.5, 1.5)``, before or after the HSV
    steps (a fair coin); saturation ``x U(0.5, 1.5)``; hue ``+ U(-18, 18)`` degrees (wrapped); a random
    order of the channels. Values are not clipped, as in the original.

    The original distorts the image before its crop and resize; here it runs after them, on the
    ``size x size`` tensor (cheaper). The brightness and contrast steps commute with a bilinear resize;
    the HSV steps differ only where the resize mixes pixels of different colour.
    """

    def __init__(self, brightness_delta: float = 32.0, contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5), hue_delta: float = 18.0):
        self.brightness_delta, self.hue_delta = float(brightness_delta), float(hue_delta)
        self.contrast, self.saturation = tuple(contrast), tuple(saturation)

    def __call__(self, x, rng: random.Random | None = None):
        rng = rng or random
        img = x * 255.0
        if rng.random() < 0.5:
            img = img + rng.uniform(-self.brightness_delta, self.brightness_delta)
        contrast_first = rng.random() < 0.5
        if contrast_first and rng.random() < 0.5:
            img = img * rng.uniform(*self.contrast)
        h, s, v = rgb_to_hsv(img)
        if rng.random() < 0.5:
            s = s * rng.uniform(*self.saturation)
        if rng.random() < 0.5:
            h = torch.remainder(h + rng.uniform(-self.hue_delta, self.hue_delta), 360.0)
        img = hsv_to_rgb(h, s, v)
        if not contrast_first and rng.random() < 0.5:
            img = img * rng.uniform(*self.contrast)
        if rng.random() < 0.5:
            img = img[rng.sample(range(3), 3)]
        return img / 255.0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(brightness_delta={self.brightness_delta}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue_delta={self.hue_delta})")


def _check(augment: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(augment, Mapping):
        raise ValueError(f"augment must be a mapping of options ({', '.join(sorted(_KEYS))}), got {augment!r}")
    unknown = set(augment) - _KEYS
    if unknown:
        raise ValueError(f"unknown augment option(s) {sorted(unknown)}; valid: {sorted(_KEYS)}")
    a = {"crop": "none", "hflip": True, "cutout": 0.0, "randaugment": False, "resize_factor": 512 / 448,
         "scales": (1.0, 0.875, 0.75, 0.66, 0.5), "max_distort": 2, "fixed_offsets": True, "photometric": False,
         "min_crop": 0.8, **augment}
    if a["crop"] not in CROPS:
        raise ValueError(f"augment.crop must be one of {CROPS}, got {a['crop']!r}")
    if a["randaugment"] not in RANDAUGMENTS:
        raise ValueError(f"augment.randaugment must be one of {RANDAUGMENTS} (true = 'torchvision'), "
                         f"got {a['randaugment']!r}")
    for key in ("hflip", "fixed_offsets", "photometric"):  # a string such as "no" would be true
        if not isinstance(a[key], bool):
            raise ValueError(f"augment.{key} must be true or false, got {a[key]!r}")
    # numbers only: a bool would pass float() (cutout: true -> a Cutout as large as the image), and a bad
    # resize_factor would only fail on the first image, naming no setting
    number = (int, float)
    cutout, factor = a["cutout"], a["resize_factor"]
    if isinstance(cutout, bool) or not isinstance(cutout, number) or not 0 <= cutout <= 1:
        raise ValueError(f"augment.cutout must be a fraction of the image side in [0, 1] (0 = off; the ASL recipe: "
                         f"0.5), got {cutout!r}")
    if isinstance(factor, bool) or not isinstance(factor, number) or not factor > 0:
        raise ValueError(f"augment.resize_factor must be a number > 0 (the multi-scale crop's pre-resize, "
                         f"default 512/448), got {factor!r}")
    return a


class CV2Resize:
    """Resize a PIL image to ``size x size`` with OpenCV's bilinear filter, without antialiasing: ``mmcv.imresize``,
    as DistributionBalancedLoss (and so LTML) resizes. torchvision's ``Resize`` on a PIL image antialiases, which
    on a 600x512 -> 224 resize differs by a few 1/255 per pixel on average (1.4 to 5.7 on photographs tried)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        import cv2
        import numpy as np

        out = cv2.resize(np.asarray(img), (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return Image.fromarray(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _resize(size: int, resize: str):
    from torchvision import transforms as T

    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    return CV2Resize(size) if resize == "cv2" else T.Resize((size, size))


def _normalize(normalize: str):
    from torchvision import transforms as T

    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    return [T.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize == "imagenet" else []


def train_preset(size: int, augment: Mapping[str, Any] | None = None, normalize: str = "imagenet",
                 resize: str = "pil") -> Callable[[Image.Image], Any]:
    """Training transform: crop policy, flips, Cutout, RandAugment, tensor (+ ImageNet normalisation).

    Parameters
    ----------
    size : int
        Output side.
    augment : mapping, optional
        ``crop`` (``"none"``: resize to ``size``; ``"multiscale"``: resize to ``resize_factor * size``
        (default 512/448, ML-GCN) then :class:`MultiScaleCrop`; ``"random_resized"``: torchvision's
        ``RandomResizedCrop``; ``"random_patch"``: :class:`RandomPatchCrop` with ``min_crop``, default 0.8,
        then resize to ``size``), ``hflip`` (bool), ``cutout`` (factor, 0 = off), ``scales``, ``max_distort``
        (default 2) and ``fixed_offsets`` (default True) for the multi-scale crop, ``randaugment`` (``true`` /
        ``"torchvision"``: torchvision's; ``"uda"``: :class:`~mlic_lib.data.rand_augment.UDARandAugment`),
        ``photometric`` (bool: :class:`PhotoMetricDistortion` before the normalisation).
    normalize : ``"imagenet"`` (default) or ``"none"`` (tensors left in [0, 1], as the ASL / CPSD code).
    resize : ``"pil"`` (default: torchvision's ``Resize``, antialiased) or ``"cv2"`` (:class:`CV2Resize`, as
        DistributionBalancedLoss), for every resize to a fixed size (not ``random_resized``'s own).

    Raises
    ------
    ValueError
        For an unknown option or crop policy.
    """
    from torchvision import transforms as T

    a = _check(augment or {})
    steps: list[Any] = []
    if a["crop"] == "multiscale":
        big = int(round(size * float(a["resize_factor"])))
        steps += [_resize(big, resize),
                  MultiScaleCrop(size, a["scales"], max_distort=a["max_distort"], fixed_offsets=a["fixed_offsets"],
                                 resize=resize)]
    elif a["crop"] == "random_resized":
        steps.append(T.RandomResizedCrop(size))
    elif a["crop"] == "random_patch":
        steps += [RandomPatchCrop(float(a["min_crop"])), _resize(size, resize)]
    else:
        steps.append(_resize(size, resize))
    if a["hflip"]:
        steps.append(T.RandomHorizontalFlip())
    if a["cutout"]:  # before RandAugment, as in the ASL recipe
        steps.append(Cutout(float(a["cutout"])))
    if a["randaugment"] == "uda":
        from .rand_augment import UDARandAugment

        steps.append(UDARandAugment())
    elif a["randaugment"]:
        steps.append(T.RandAugment())
    steps.append(T.ToTensor())
    if a["photometric"]:
        steps.append(PhotoMetricDistortion())
    return T.Compose(steps + _normalize(normalize))


def eval_preset(size: int, normalize: str = "imagenet", resize: str = "pil") -> Callable[[Image.Image], Any]:
    """Evaluation transform: resize to ``(size, size)`` (``resize``: ``"pil"`` or ``"cv2"``), tensor, ImageNet
    normalisation (``normalize``: ``"imagenet"`` or ``"none"``, images left in [0, 1])."""
    from torchvision import transforms as T

    return T.Compose([_resize(size, resize), T.ToTensor(), *_normalize(normalize)])
