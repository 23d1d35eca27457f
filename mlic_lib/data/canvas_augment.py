"""Training augmentation of composite canvases, cell by cell (INDeeD's ML-CIFAR-10 recipe).

INDeeD (section "Evaluation on ML-CIFAR-10") trains ML-CIFAR-10 "with well known augmentation [6, 7]":
RandAugment (Cubuk et al. 2020) and Cutout (DeVries & Taylor 2017). The paper does not say whether they act on
the 96x96 canvas or on each 32x32 CIFAR image in it. Our reading: on each image, i.e. each non-empty cell of
the 3x3 grid, as both methods were designed for CIFAR-sized images and a 16 px Cutout (the CIFAR-10 setting of
DeVries & Taylor) then hides part of one object, never a whole one; empty cells stay empty. A cell counts as
empty when all its pixels are 0 (how :func:`mlic_lib.indeed.compose_canvases` leaves it).

The canvases stay ``uint8``: :class:`CellAugment` maps a ``uint8 (n, C, G*H, G*W)`` batch to one of the
same shape, and :class:`~mlic_lib.data.tensors.TensorImageDataset` applies it before normalising.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["RANDAUGMENT_OPS", "CellAugment", "randaugment_op"]

# torchvision's RandAugment: 14 operations; at its default magnitude (bin 9 of 31) the signed ones get a random sign
RANDAUGMENT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                   "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
_SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                     "Sharpness"})


def _magnitude(name: str, height: int, width: int, level: int = 9, bins: int = 31) -> float:
    """torchvision's RandAugment magnitude of ``name`` at bin ``level`` of ``bins`` (its defaults: 9 of 31)."""
    t = level / (bins - 1)
    return {"ShearX": 0.3 * t, "ShearY": 0.3 * t, "TranslateX": 150.0 / 331.0 * width * t,
            "TranslateY": 150.0 / 331.0 * height * t, "Rotate": 30.0 * t, "Brightness": 0.9 * t, "Color": 0.9 * t,
            "Contrast": 0.9 * t, "Sharpness": 0.9 * t, "Posterize": float(8 - round(level / ((bins - 1) / 4))),
            "Solarize": 255.0 * (1 - t)}.get(name, 0.0)


def randaugment_op(images: Tensor, name: str, magnitude: float) -> Tensor:
    """One RandAugment operation, as torchvision applies it, on a ``uint8 (n, C, h, w)`` batch at once."""
    from torchvision.transforms import functional as F
    from torchvision.transforms.functional import InterpolationMode

    nearest = InterpolationMode.NEAREST
    if name == "ShearX":
        return F.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(magnitude)), 0.0],
                        interpolation=nearest, center=[0, 0])
    if name == "ShearY":
        return F.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(magnitude))],
                        interpolation=nearest, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return F.affine(images, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    if name == "Rotate":
        return F.rotate(images, magnitude, interpolation=nearest)
    enhance = {"Brightness": F.adjust_brightness, "Color": F.adjust_saturation, "Contrast": F.adjust_contrast,
               "Sharpness": F.adjust_sharpness}
    if name in enhance:
        return enhance[name](images, 1.0 + magnitude)
    if name == "Posterize":
        return F.posterize(images, int(magnitude))
    if name == "Solarize":
        return F.solarize(images, magnitude)
    if name == "AutoContrast":
        return F.autocontrast(images)
    if name == "Equalize":
        return F.equalize(images)
    if name == "Identity":
        return images
    raise ValueError(f"unknown RandAugment operation {name!r}; choose one of {RANDAUGMENT_OPS}")


class CellAugment:
    """RandAugment and Cutout applied independently to every non-empty cell of ``grid x grid`` canvases.

    Parameters
    ----------
    grid : int, default 3
        Cells per side (ML-MNIST / ML-CIFAR-10: 3).
    randaugment : bool, default True
        torchvision's RandAugment on each cell: 2 operations drawn from :data:`RANDAUGMENT_OPS`, at magnitude 9 of
        31, with a random sign where the operation has one (its defaults). Each operation runs once on all the
        cells that drew it, not cell by cell.
    cutout : int, default 16
        Side in pixels of the square hole, centred at a uniformly drawn pixel of the cell and clipped to the
        cell (DeVries & Taylor's CIFAR-10 setting: 16); 0 = no Cutout.
    fill : sequence of int, optional
        The hole's colour per channel, in 0..255. Default: ``mean`` (the dataset's normalisation mean, so
        the hole is 0 after normalising, as in DeVries & Taylor, who cut the normalised image) or else 0.
    mean : sequence of float, optional
        Per-channel mean in [0, 1] used for the default ``fill``.

    Randomness comes from torch's global generator (seeded by the engine and by each data loader worker).
    """

    n_ops = 2

    def __init__(self, grid: int = 3, randaugment: bool = True, cutout: int = 16,
                 fill: Sequence[int] | None = None, mean: Sequence[float] | None = None):
        if int(grid) != grid or grid < 1:
            raise ValueError(f"grid must be a positive integer, got {grid!r}")
        if int(cutout) != cutout or cutout < 0:
            raise ValueError(f"cutout must be a hole side in pixels >= 0 (0 = off), got {cutout!r}")
        if fill is None and mean is not None:
            fill = [round(255 * float(m)) for m in mean]
        if fill is not None and any(not 0 <= int(v) <= 255 for v in fill):
            raise ValueError(f"fill must be colours in 0..255, got {list(fill)}")
        self.grid, self.cutout, self.randaugment = int(grid), int(cutout), bool(randaugment)
        self.fill = None if fill is None else tuple(int(v) for v in fill)

    def _randaugment(self, cells: Tensor) -> Tensor:
        h, w = cells.shape[-2:]
        for _ in range(self.n_ops):
            ops = torch.randint(len(RANDAUGMENT_OPS), (len(cells),))
            negative = torch.randint(2, (len(cells),)).bool()
            for k, name in enumerate(RANDAUGMENT_OPS):
                mag = _magnitude(name, h, w)
                groups = ((ops == k) & ~negative, (ops == k) & negative) if name in _SIGNED else (ops == k,)
                for sign, sel in zip((1.0, -1.0), groups, strict=False):
                    idx = torch.nonzero(sel).flatten()
                    if len(idx):
                        cells[idx] = randaugment_op(cells[idx], name, sign * mag)
        return cells

    def _cutout(self, cells: Tensor) -> Tensor:
        n, c, h, w = cells.shape
        top = torch.randint(0, h, (n, 1)) - self.cutout // 2
        left = torch.randint(0, w, (n, 1)) - self.cutout // 2
        ys, xs = torch.arange(h), torch.arange(w)
        rows = (ys >= top) & (ys < top + self.cutout)  # (n, h): clipped at the cell's border by construction
        cols = (xs >= left) & (xs < left + self.cutout)
        hole = (rows[:, :, None] & cols[:, None, :])[:, None]
        fill = torch.tensor(self.fill or (0,) * c, dtype=cells.dtype).view(1, c, 1, 1)
        return torch.where(hole, fill, cells)

    def __call__(self, images: Tensor) -> Tensor:
        """Augment a ``uint8 (n, C, G*H, G*W)`` batch (or one ``(C, G*H, G*W)`` canvas); returns a new tensor."""
        single = images.ndim == 3
        x = images.unsqueeze(0) if single else images
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"CellAugment needs uint8 canvases (n, C, H, W), got {x.dtype} {tuple(x.shape)}")
        n, c, height, width = x.shape
        g = self.grid
        if height % g or width % g:
            raise ValueError(f"canvas size {height}x{width} is not divisible into a {g}x{g} grid")
        h, w = height // g, width // g
        if self.cutout >= min(h, w):  # the hole could cover a whole cell, erasing a labelled object
            raise ValueError(f"cutout={self.cutout} px can hide a whole {h}x{w} cell and the object it holds; "
                             f"use a hole smaller than the cell (DeVries & Taylor: 16 px on 32 px images)")
        if self.fill is not None and len(self.fill) != c:
            raise ValueError(f"fill has {len(self.fill)} channel value(s) but the canvases have {c} channel(s)")
        cells = x.reshape(n, c, g, h, g, w).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, c, h, w).clone()
        occupied = torch.nonzero(cells.flatten(1).any(dim=1)).flatten()
        part = cells[occupied]
        if self.randaugment:
            part = self._randaugment(part)
        if self.cutout:
            part = self._cutout(part)
        cells[occupied] = part
        out = cells.reshape(n, g, g, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, height, width)
        return out[0] if single else out.contiguous()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(grid={self.grid}, randaugment={self.randaugment}, cutout={self.cutout}, "
                f"fill={self.fill})")
