"""Training augmentation of composite canvases, cell by cell (INDeeD's ML-CIFAR-10 recipe).

INDeeD (Sec. 4.2) trains ML-CIFAR-10 "with well known augmentation [6, 7]": RandAugment (Cubuk et al.
2020) and Cutout (DeVries & Taylor 2017). The paper does not say whether they act on the 96x96 canvas or
on each 32x32 CIFAR image in it. Our reading: on each image, i.e. each non-empty cell of the 3x3 grid,
as both methods were designed for CIFAR-sized images and a 16 px Cutout (the CIFAR-10 setting of DeVries &
Taylor) then hides part of one object, never a whole one; empty cells stay empty. A cell counts as empty
when all its pixels are 0 (how :func:`mlic_lib.indeed.compose_canvases` leaves it).

The canvases stay ``uint8``: :class:`CellAugment` maps a ``uint8 (n, C, G*H, G*W)`` batch to one of the
same shape, and :class:`~mlic_lib.data.tensors.TensorImageDataset` applies it before normalising.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CellAugment"]


class CellAugment:
    """RandAugment and Cutout applied independently to every non-empty cell of ``grid x grid`` canvases.

    Parameters
    ----------
    grid : int, default 3
        Cells per side (ML-MNIST / ML-CIFAR-10: 3).
    randaugment : bool, default True
        torchvision's ``RandAugment`` (2 operations of magnitude 9 out of 31, its defaults) on each cell.
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
        self._ra = None
        if self.randaugment:
            from torchvision.transforms import RandAugment

            self._ra = RandAugment()

    def _cut(self, cell: Tensor) -> None:
        """Cutout of one ``(C, h, w)`` cell, in place."""
        _, h, w = cell.shape
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        y0, y1 = max(0, cy - self.cutout // 2), min(h, cy - self.cutout // 2 + self.cutout)
        x0, x1 = max(0, cx - self.cutout // 2), min(w, cx - self.cutout // 2 + self.cutout)
        fill = torch.tensor(self.fill or (0,) * cell.shape[0], dtype=cell.dtype).view(-1, 1, 1)
        cell[:, y0:y1, x0:x1] = fill

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
        if self.fill is not None and len(self.fill) != c:
            raise ValueError(f"fill has {len(self.fill)} channel value(s) but the canvases have {c} channel(s)")
        cells = x.reshape(n, c, g, h, g, w).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, c, h, w).clone()
        for i in torch.nonzero(cells.flatten(1).any(dim=1)).flatten().tolist():
            cell = cells[i]
            if self._ra is not None:
                cell = self._ra(cell)
            if self.cutout:
                cell = cell.clone()
                self._cut(cell)
            cells[i] = cell
        out = cells.reshape(n, g, g, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, height, width)
        return out[0] if single else out.contiguous()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(grid={self.grid}, randaugment={self.randaugment}, cutout={self.cutout}, "
                f"fill={self.fill})")
