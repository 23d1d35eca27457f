"""The RandAugment variant of the ASL and CPSD training code (CPSD's full profile).

ASL's and the CPSD authors' training scripts import ``RandAugment`` from the ``randaugment`` package on PyPI
(a port of the UDA variant of RandAugment, Xie et al. 2019), not the policy of Cubuk et al. 2020 that
torchvision implements. It differs from torchvision's ``RandAugment()`` (2 operations at magnitude 9 of 31,
always applied, black fill) in every parameter:

* two operations are drawn uniformly, with replacement, from 15: Invert, Cutout, Sharpness, AutoContrast,
  Posterize, ShearX, TranslateX, TranslateY, ShearY, Rotate, Equalize, Contrast, Color, Solarize, Brightness
  (no Identity);
* each gets its own magnitude level ``m``, uniform in 1..9, and is applied with probability 0.5;
* at level ``m`` (of 9) the strengths are: shear ``0.3 m/9``, translation ``(150/331) m/9`` of the image side,
  rotation ``30 m/9`` degrees (counter-clockwise only), enhancement factors ``1 +- 0.9 m/9`` (colour, contrast,
  sharpness, brightness), posterize to ``round(8 - 4 m/9)`` bits, solarize above ``256 (1 - m/9)``, and a Cutout
  square of side ``2 floor(round(20 m/9) / 2)`` filled with (125, 122, 113);
* shears and translations draw their direction at random; fills are grey (128, 128, 128).

We wrote this from that description; :func:`apply_op` applies one operation, so each can be tested alone.
Randomness comes from Python's ``random`` module (seeded per data-loader worker by PyTorch).
"""

from __future__ import annotations

import random

from PIL import Image, ImageEnhance, ImageOps

__all__ = ["OPS", "UDARandAugment", "apply_op"]

OPS = ("Invert", "Cutout", "Sharpness", "AutoContrast", "Posterize", "ShearX", "TranslateX", "TranslateY",
       "ShearY", "Rotate", "Equalize", "Contrast", "Color", "Solarize", "Brightness")
FILL = (128, 128, 128)
CUTOUT_FILL = (125, 122, 113)
MAX_LEVEL = 9


def _cutout(img: Image.Image, side: int, rng: random.Random) -> Image.Image:
    """A ``side x side`` square (clipped at the borders) centred at a uniformly drawn pixel."""
    img = img.copy()
    w, h = img.size
    cx, cy = rng.randrange(w), rng.randrange(h)
    half = side // 2
    box = (max(0, cx - half), max(0, cy - half), min(w, cx + half), min(h, cy + half))
    if box[2] > box[0] and box[3] > box[1]:
        img.paste(CUTOUT_FILL[:len(img.getbands())] if img.mode != "L" else CUTOUT_FILL[0], box)
    return img


def apply_op(img: Image.Image, name: str, level: int, rng: random.Random | None = None) -> Image.Image:
    """Apply one operation of :data:`OPS` at magnitude ``level`` (0..9) to an RGB PIL image.

    ``rng`` draws the direction of shears, translations and enhancements and the Cutout centre
    (default: the ``random`` module).
    """
    if name not in OPS:
        raise ValueError(f"unknown operation {name!r}; choose one of {OPS}")
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be in 0..{MAX_LEVEL}, got {level}")
    rng = rng if rng is not None else random
    m = level / MAX_LEVEL
    sign = rng.choice((-1, 1)) if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast",
                                           "Sharpness", "Brightness") else 1
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Posterize":
        return ImageOps.posterize(img, int(round(8 - 4 * m)))
    if name == "Solarize":
        return ImageOps.solarize(img, 256 * (1 - m))
    if name == "Cutout":
        return _cutout(img, 2 * (int(round(20 * m)) // 2), rng)
    if name == "Rotate":  # grey where the rotated image leaves the frame
        return img.rotate(30 * m, fillcolor=FILL)
    enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness,
               "Brightness": ImageEnhance.Brightness}
    if name in enhance:
        return enhance[name](img).enhance(1 + 0.9 * m * sign)
    w, h = img.size
    coeffs = {"ShearX": (1, 0.3 * m * sign, 0, 0, 1, 0), "ShearY": (1, 0, 0, 0.3 * m * sign, 1, 0),
              "TranslateX": (1, 0, 150 / 331 * m * w * sign, 0, 1, 0),
              "TranslateY": (1, 0, 0, 0, 1, 150 / 331 * m * h * sign)}[name]
    resample = Image.BICUBIC if name.startswith("Shear") else Image.NEAREST
    return img.transform(img.size, Image.AFFINE, coeffs, resample, fillcolor=FILL)


class UDARandAugment:
    """Two operations of :data:`OPS`, each with a level uniform in 1..9 and applied with probability ``p``.

    Parameters
    ----------
    n_ops : int, default 2
    p : float, default 0.5
        Probability of applying each drawn operation.
    """

    def __init__(self, n_ops: int = 2, p: float = 0.5):
        if int(n_ops) != n_ops or n_ops < 1:
            raise ValueError(f"n_ops must be a positive integer, got {n_ops!r}")
        if not 0 <= p <= 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.n_ops, self.p = int(n_ops), float(p)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        rng = rng if rng is not None else random
        draws = [(rng.choice(OPS), rng.randint(1, MAX_LEVEL)) for _ in range(self.n_ops)]
        for name, level in draws:
            if rng.random() < self.p:
                img = apply_op(img, name, level, rng)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_ops={self.n_ops}, p={self.p})"
