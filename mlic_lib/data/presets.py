"""Image pre-processing presets for the real datasets (the ``full`` profiles), split as in torchvision's
``references/classification/presets.py``: one train preset and one eval preset, built from a small
mapping that the chapter profiles carry under ``data.augment``.

Training recipes of the papers:

* SpliceMix (Sec. IV-A) and CPSD follow ML-GCN: resize, then a random *multi-scale crop* resized to
  ``size`` with horizontal flips -> ``{"crop": "multiscale", "hflip": True}``.
* AssocFormer (Sec. 4.1) follows ASL: resize to ``size``, Cutout with factor 0.5 and RandAugment ->
  ``{"crop": "none", "hflip": False, "cutout": 0.5, "randaugment": True}``.
* LTML / DistributionBalancedLoss: resize + random flip -> the default ``{"crop": "none", "hflip": True}``.

Evaluation always resizes to ``(size, size)`` and normalises with the ImageNet mean/std. Images are
PIL images in, normalised ``float32`` tensors ``(3, size, size)`` out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw

from .images import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Cutout", "MultiScaleCrop", "eval_preset", "train_preset"]

CROPS = ("none", "multiscale", "random_resized")
_KEYS = {"crop", "hflip", "cutout", "randaugment", "scales", "resize_factor"}


class MultiScaleCrop:
    """ML-GCN style crop: pick a crop side from ``scales`` times the short side (width and height
    independently, at most one scale step apart), place it at a random position, resize to ``size``.

    Parameters
    ----------
    size : int
        Output side in pixels.
    scales : sequence of float, default (1, .875, .75, .66, .5)
        Fractions of the image's short side.
    """

    def __init__(self, size: int, scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66, 0.5)):
        if not scales or any(not 0 < s <= 1 for s in scales):
            raise ValueError(f"scales must be fractions in (0, 1], got {list(scales)}")
        self.size = int(size)
        self.scales = tuple(float(s) for s in scales)

    def params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """``(left, top, crop_w, crop_h)`` of one random crop of a ``width x height`` image."""
        base = min(width, height)
        sides = [max(1, int(base * s)) for s in self.scales]
        pairs = [(w, h) for i, w in enumerate(sides) for j, h in enumerate(sides) if abs(i - j) <= 1]
        cw, ch = rng.choice(pairs)
        return rng.randint(0, width - cw), rng.randint(0, height - ch), cw, ch

    def __call__(self, img: Image.Image) -> Image.Image:
        left, top, cw, ch = self.params(img.width, img.height, random)
        return img.crop((left, top, left + cw, top + ch)).resize((self.size, self.size), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scales={self.scales})"


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


def _check(augment: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(augment) - _KEYS
    if unknown:
        raise ValueError(f"unknown augment option(s) {sorted(unknown)}; valid: {sorted(_KEYS)}")
    a = {"crop": "none", "hflip": True, "cutout": 0.0, "randaugment": False, "resize_factor": 512 / 448,
         "scales": (1.0, 0.875, 0.75, 0.66, 0.5), **augment}
    if a["crop"] not in CROPS:
        raise ValueError(f"augment.crop must be one of {CROPS}, got {a['crop']!r}")
    return a


def train_preset(size: int, augment: Mapping[str, Any] | None = None) -> Callable[[Image.Image], Any]:
    """Training transform: crop policy, flips, RandAugment, Cutout, tensor + ImageNet normalisation.

    Parameters
    ----------
    size : int
        Output side.
    augment : mapping, optional
        ``crop`` (``"none"``: resize to ``size``; ``"multiscale"``: resize to ``resize_factor * size``
        (default 512/448, ML-GCN) then :class:`MultiScaleCrop`; ``"random_resized"``: torchvision's
        ``RandomResizedCrop``), ``hflip`` (bool), ``randaugment`` (bool, torchvision defaults),
        ``cutout`` (factor, 0 = off), ``scales`` (for the multi-scale crop).

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
        steps += [T.Resize((big, big)), MultiScaleCrop(size, a["scales"])]
    elif a["crop"] == "random_resized":
        steps.append(T.RandomResizedCrop(size))
    else:
        steps.append(T.Resize((size, size)))
    if a["hflip"]:
        steps.append(T.RandomHorizontalFlip())
    if a["cutout"]:  # before RandAugment, as in the ASL recipe
        steps.append(Cutout(float(a["cutout"])))
    if a["randaugment"]:
        steps.append(T.RandAugment())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_preset(size: int) -> Callable[[Image.Image], Any]:
    """Evaluation transform: resize to ``(size, size)``, tensor, ImageNet normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
