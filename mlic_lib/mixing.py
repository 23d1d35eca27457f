"""Mix-style batch transforms for multi-label images: SpliceMix and the baselines it is compared with.

Paper: Wang et al., *SpliceMix: A Cross-scale and Semantic Blending Augmentation Strategy for
Multi-label Image Classification* (``../shared/papers/splicemix.txt``).

Every transform works on a batch that is already on the device and returns a :class:`MixResult`
``(x, y, layout, info)``; all randomness comes from PyTorch (the global RNG, or a
``torch.Generator`` when one is passed), so a training run is deterministic for a seed and resumes
exactly (the engine checkpoints the torch RNG state).

* :class:`SpliceMix` -- Eqs. 2-3: a *mixed set* of ``|B'|`` images (default ``B // 4``), each a
  ``r x c`` grid of downsampled regular images, label = union of the sources' labels (Eq. 3);
  *spliced* to the regular batch: ``B_hat = B ∪ B'``. Grid strategy: one grid per batch from the family
  ``F_mg = {1x2, 2x2, 2x3}`` of Eq. 4 (Sec. IV-A samples it "randomly"; the probabilities
  ``{1x2: .3, 2x2: .4, 2x3: .3}`` are the authors' code's), asymmetric grids transposed with probability .5
  (Sec. III-B: "a coin with a flipped probability of 0.5" picks ``r x c`` or ``c x r``), and with probability .3
  (Sec. IV-A) a *grid dropout* of ``d ~ U{1..r*c-1}`` cells (blank cells, labels removed).
  The :class:`GridLayout` it returns says which regular image sits in which cell, for SpliceMix-CL
  (:mod:`mlic_lib.splicemix_cl`).
* :class:`Mixup` and :class:`CutMix` (alpha = 0.5, the paper's grid-searched value): one
  ``lam ~ Beta(alpha, alpha)`` and one permutation per batch; the multi-label target is the same
  convex combination ``lam * y + (1 - lam) * y[perm]`` (CutMix: ``lam`` = the kept area).
* :class:`Mosaic` (YOLOv4 style, 4 images): labels come from the object *boxes* -- a class is kept
  when at least half of its box area survives the crop (the rule of Sec. IV-C-1).
* :class:`BatchAugmentation` (Hoffer et al., ``M = 2`` copies of the batch, each with its own
  random affine augmentation).
* :func:`noisy_correlation_ratios` (one simulated run; :func:`noisy_correlation_over_seeds` for several
  simulation seeds) -- Eqs. 8-10: the in-sample ``r_in`` and out-of-sample
  ``r_out`` ratios of label correlations a mixing method creates that never occur in the training
  set (Table VII), for any transform with a ``mix_labels`` method.

Implementation choices where the paper is silent (from the authors' code): the grid probabilities
above; downsampling is bilinear
with ``align_corners=True`` to ``(H // r, W // c)``; when ``r * (H // r)`` differs from ``H`` the tiled image is
resized back to ``H x W`` (so cells of a 2x3 grid on a 64-px canvas are 21/22 px); dropped cells are filled with
``fill`` (default 0.0, as the authors zero them: with ImageNet normalisation 0 is the data's mean colour; for data
normalised otherwise pass the normalised value of a blank pixel, e.g. -1 for the book's scenes, whose background is
black); sources are drawn from repeated random permutations of the regular batch (an image appears in the mixed set
at most once while ``|B'| * r * c <= B``). Which cells are dropped is drawn independently per mixed image; the
number dropped is one per batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mlic_lib.utils import host_to_device

__all__ = [
    "DEFAULT_GRIDS",
    "BatchAugmentation",
    "CutMix",
    "GridLayout",
    "MixResult",
    "Mixup",
    "Mosaic",
    "SpliceMix",
    "cell_bounds",
    "cooccurrence_mask",
    "mosaic_label_loss",
    "noisy_correlation_indicators",
    "noisy_correlation_over_seeds",
    "noisy_correlation_ratios",
    "pad_boxes",
    "parse_grid",
]

#: the grid family ``F_mg`` of Eq. 4 / Sec. IV-A, with the authors' code's probabilities (the paper says only
#: "randomly sample")
DEFAULT_GRIDS: dict[str, float] = {"1x2": 0.3, "2x2": 0.4, "2x3": 0.3}


# ------------------------------------------------------------------------------------ helpers
def parse_grid(grid: str | Sequence[int]) -> tuple[int, int]:
    """``"2x3"`` or ``(2, 3)`` -> ``(2, 3)``; raises ``ValueError`` for anything else."""
    if isinstance(grid, str):
        parts = grid.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"grid {grid!r} must look like 'RxC', e.g. '2x3'")
        r, c = int(parts[0]), int(parts[1])
    else:
        if len(grid) != 2:
            raise ValueError(f"grid {grid!r} must be (rows, cols)")
        r, c = int(grid[0]), int(grid[1])
    if r < 1 or c < 1 or r * c < 2:
        raise ValueError(f"grid {r}x{c} must have positive rows/cols and at least 2 cells")
    return r, c


def cell_bounds(size: int, parts: int) -> list[int]:
    """Proportional split of ``size`` pixels into ``parts`` cells: boundaries ``round(i * size / parts)``.

    This is how a grid cell of the *image* maps onto a coarser *feature map* (a 2x3 grid on an
    8x8 map gives rows 0-4-8 and columns 0-3-5-8). Raises ``ValueError`` if a cell would be empty.
    """
    if parts < 1 or size < parts:
        raise ValueError(f"cannot split {size} pixels into {parts} non-empty cells; use a larger input/map")
    return [int(math.floor(i * size / parts + 0.5)) for i in range(parts + 1)]


def _check_batch(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"x must be an image batch (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, Tensor) or y.ndim != 2 or len(y) != len(x):
        raise ValueError(f"y must be (B, num_classes) with B = {len(x)}, got {getattr(y, 'shape', type(y))}")
    if len(x) < 1:
        raise ValueError("the batch is empty")


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """``Beta(alpha, alpha)`` drawn with a NumPy generator seeded from the torch RNG (so torch seeds it)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _randperm(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.randperm(n, generator=generator)


@dataclass
class MixResult:
    """Output of a transform: the training batch ``x``/``y`` (regular images first when spliced), the
    SpliceMix ``layout`` (``None`` for other methods) and method-specific ``info`` (lam, perm, ...)."""

    x: Tensor
    y: Tensor
    layout: GridLayout | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class GridLayout:
    """Where each regular image went in the mixed set of one SpliceMix call.

    ``sources[m, k]`` is the index (in the regular batch) of the image in cell ``k`` (row-major) of
    mixed image ``m``; ``keep[m, k]`` is ``False`` for a dropped (blank, label-removed) cell.
    Mixed image ``m`` is row ``n_regular + m`` of the SpliceMixed batch.
    """

    rows: int
    cols: int
    sources: Tensor  # (M, rows*cols) long
    keep: Tensor  # (M, rows*cols) bool
    n_regular: int

    @property
    def n_mixed(self) -> int:
        return int(self.sources.shape[0])

    @property
    def n_cells(self) -> int:
        return self.rows * self.cols

    @property
    def grid(self) -> str:
        return f"{self.rows}x{self.cols}"

    def cell_slices(self, height: int, width: int) -> list[tuple[slice, slice]]:
        """Row-major ``(rows, cols)`` slices of each cell on an ``height x width`` map (proportional,
        see :func:`cell_bounds`)."""
        rb, cb = cell_bounds(height, self.rows), cell_bounds(width, self.cols)
        return [(slice(rb[i], rb[i + 1]), slice(cb[j], cb[j + 1])) for i in range(self.rows) for j in range(self.cols)]

    def to(self, device: torch.device | str) -> GridLayout:
        return GridLayout(self.rows, self.cols, host_to_device(self.sources, device), host_to_device(self.keep, device),
                          self.n_regular)


# --------------------------------------------------------------------------------- SpliceMix
class SpliceMix:
    """SpliceMix (Eqs. 2-4) as a batch transform: ``x_hat, y_hat = cat(x, x'), cat(y, y')``.

    Parameters
    ----------
    grids : mapping ``{"RxC": probability}`` (or a sequence of grids, equally likely, or one grid ``"RxC"``): the
        grid family ``F_mg`` of Eq. 4. Default :data:`DEFAULT_GRIDS` = ``{"1x2": .3, "2x2": .4, "2x3": .3}`` (the
        authors' code; a sequence such as ``["1x2", "2x2", "2x3"]`` samples the paper's family uniformly).
        One grid per batch.
    p_drop : probability that a batch uses grid dropout (0.3); then ``d ~ U{1..r*c-1}`` cells of
        every mixed image are blanked and their labels removed.
    p_transpose : probability of using ``c x r`` instead of ``r x c`` for an asymmetric grid (0.5).
    mixed_size : ``|B'|``: a float is a fraction of the batch (``floor(f * B)``, default 0.25 =
        the paper's ``B // 4``), an int a fixed count.
    fill : value of a dropped cell (0.0, as the authors: the mean colour under ImageNet normalisation).
    align_corners : of the bilinear resizes (True, as the authors).
    """

    def __init__(self, grids: Mapping[str, float] | Sequence[str | Sequence[int]] | None = None,
                 p_drop: float = 0.3, p_transpose: float = 0.5, mixed_size: float | int = 0.25,
                 fill: float = 0.0, align_corners: bool = True):
        grids = DEFAULT_GRIDS if grids is None else grids
        if isinstance(grids, str):  # one grid ("2x2"), not a sequence of one-character grids
            grids = [grids]
        if isinstance(grids, Mapping):
            items = [(parse_grid(k), float(v)) for k, v in grids.items()]
        else:
            items = [(parse_grid(g), 1.0) for g in grids]
        if not items:
            raise ValueError("grids is empty: give at least one grid such as {'2x2': 1.0}")
        probs = torch.tensor([p for _, p in items], dtype=torch.float64)
        if (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"grid probabilities must be non-negative with a positive sum, got {probs.tolist()}")
        for name, p in (("p_drop", p_drop), ("p_transpose", p_transpose)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if isinstance(mixed_size, bool) or (isinstance(mixed_size, int) and mixed_size < 0) or (
                isinstance(mixed_size, float) and not 0.0 <= mixed_size <= 16.0):
            raise ValueError(f"mixed_size must be a fraction in [0, 16] of the batch or a count >= 0, got {mixed_size}")
        self.grids = [g for g, _ in items]
        self.probs = probs / probs.sum()
        self.p_drop, self.p_transpose = float(p_drop), float(p_transpose)
        self.mixed_size = mixed_size
        self.fill, self.align_corners = float(fill), bool(align_corners)

    def __repr__(self) -> str:
        g = ", ".join(f"{r}x{c}: {p:.2f}" for (r, c), p in zip(self.grids, self.probs.tolist(), strict=True))
        return f"SpliceMix(grids={{{g}}}, p_drop={self.p_drop}, p_transpose={self.p_transpose}, " \
               f"mixed_size={self.mixed_size})"

    def n_mixed(self, batch_size: int) -> int:
        """``|B'|`` for a regular batch of ``batch_size``."""
        if isinstance(self.mixed_size, float):
            return int(math.floor(self.mixed_size * batch_size + 1e-9))
        return int(self.mixed_size)

    def sample_layout(self, batch_size: int, generator: torch.Generator | None = None) -> GridLayout:
        """Draw the grid, transpose, dropout and source images of one batch (CPU tensors)."""
        k = int(torch.multinomial(self.probs, 1, generator=generator))
        r, c = self.grids[k]
        if r != c and _rand(generator) < self.p_transpose:
            r, c = c, r
        n, m = r * c, self.n_mixed(batch_size)
        reps = max(1, math.ceil(m * n / batch_size))
        perm = torch.cat([_randperm(batch_size, generator) for _ in range(reps)])
        sources = perm[: m * n].view(m, n)
        keep = torch.ones(m, n, dtype=torch.bool)
        if m and _rand(generator) < self.p_drop:
            d = int(torch.randint(1, n, (1,), generator=generator))
            order = torch.rand(m, n, generator=generator).argsort(dim=1)
            keep.scatter_(1, order[:, :d], False)
        return GridLayout(r, c, sources, keep, batch_size)

    def mix_images(self, x: Tensor, layout: GridLayout) -> Tensor:
        """Eq. 2: ``x' = f_mg({f_ds(x_i) | i in Omega})`` for every mixed image, ``(M, C, H, W)``."""
        B, C, H, W = x.shape
        r, c, m = layout.rows, layout.cols, layout.n_mixed
        h, w = H // r, W // c
        if h < 1 or w < 1:
            raise ValueError(f"a {r}x{c} grid needs images of at least {r}x{c} pixels, got {H}x{W}")
        if m == 0:
            return x.new_zeros((0, C, H, W))
        src = x[host_to_device(layout.sources.reshape(-1), x.device)]
        small = F.interpolate(src, size=(h, w), mode="bilinear", align_corners=self.align_corners)
        drop = ~host_to_device(layout.keep.reshape(-1), x.device)
        small = torch.where(drop[:, None, None, None], torch.full_like(small, self.fill), small)
        tiled = small.view(m, r, c, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(m, C, r * h, c * w)
        if (r * h, c * w) != (H, W):
            tiled = F.interpolate(tiled, size=(H, W), mode="bilinear", align_corners=self.align_corners)
        return tiled

    @staticmethod
    def mix_labels_for(y: Tensor, layout: GridLayout) -> Tensor:
        """Eq. 3: ``y' = ∪_{i in Omega} y_i`` over the *kept* cells (max for soft labels)."""
        if layout.n_mixed == 0:
            return y.new_zeros((0, y.shape[1]))
        ys = y[host_to_device(layout.sources, y.device)]  # (M, n, C)
        ys = ys * host_to_device(layout.keep, y.device)[..., None].to(y.dtype)
        return ys.amax(dim=1)

    def mix_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Labels of the SpliceMixed batch only (regular + mixed), for :func:`noisy_correlation_ratios`."""
        layout = self.sample_layout(len(y), generator)
        return torch.cat([y, self.mix_labels_for(y, layout)])

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> MixResult:
        _check_batch(x, y)
        layout = self.sample_layout(len(x), generator)  # drawn on the host, moved to the device once
        on_device = layout.to(x.device)
        xm = self.mix_images(x, on_device)
        ym = self.mix_labels_for(y, on_device)
        return MixResult(torch.cat([x, xm]), torch.cat([y, ym.to(y.dtype)]), on_device,
                         {"grid": layout.grid, "n_dropped": int((~layout.keep[0]).sum()) if layout.n_mixed else 0})


# ----------------------------------------------------------------------------- Mixup, CutMix
class Mixup:
    """Mixup (Zhang et al.) for multi-label targets: ``x = lam x + (1-lam) x[perm]``, same for ``y``.

    One ``lam ~ Beta(alpha, alpha)`` and one permutation per batch; the batch is *replaced* (same
    size), as in the original method. ``alpha = 0.5`` (the paper's grid search, Sec. IV-C-1).
    """

    def __init__(self, alpha: float = 0.5):
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.alpha})"

    def sample(self, batch_size: int, height: int = 1, width: int = 1,
               generator: torch.Generator | None = None) -> dict[str, Any]:
        return {"lam": _beta(self.alpha, generator), "perm": _randperm(batch_size, generator)}

    @staticmethod
    def _labels(y: Tensor, params: Mapping[str, Any]) -> Tensor:
        lam, perm = params["lam"], host_to_device(params["perm"], y.device)
        return lam * y + (1.0 - lam) * y[perm]

    def mix_labels(self, y: Tensor, generator: torch.Generator | None = None, image_size=(1, 1)) -> Tensor:
        return self._labels(y, self.sample(len(y), *image_size, generator=generator))

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> MixResult:
        _check_batch(x, y)
        p = self.sample(len(x), x.shape[2], x.shape[3], generator)
        lam, perm = p["lam"], host_to_device(p["perm"], x.device)  # one copy for the images and the labels
        return MixResult(lam * x + (1.0 - lam) * x[perm], self._labels(y, {**p, "perm": perm}), None, p)


class CutMix(Mixup):
    """CutMix (Yun et al.): paste a box of ``x[perm]`` into ``x``; target ``lam y + (1-lam) y[perm]``
    with ``lam`` the kept area fraction. Box side ``sqrt(1 - lam0)`` of the image, centre uniform,
    clipped to the image; ``lam0 ~ Beta(alpha, alpha)``, ``alpha = 0.5``."""

    def __repr__(self) -> str:
        return f"CutMix(alpha={self.alpha})"

    def sample(self, batch_size: int, height: int = 448, width: int = 448,
               generator: torch.Generator | None = None) -> dict[str, Any]:
        lam0 = _beta(self.alpha, generator)
        perm = _randperm(batch_size, generator)
        cut = math.sqrt(1.0 - lam0)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(torch.randint(0, height, (1,), generator=generator)), int(
            torch.randint(0, width, (1,), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return {"lam": lam, "perm": perm, "box": (x0, y0, x1, y1)}

    def mix_labels(self, y: Tensor, generator: torch.Generator | None = None, image_size=(448, 448)) -> Tensor:
        return self._labels(y, self.sample(len(y), *image_size, generator=generator))

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> MixResult:
        _check_batch(x, y)
        p = self.sample(len(x), x.shape[2], x.shape[3], generator)
        x0, y0, x1, y1 = p["box"]
        perm = host_to_device(p["perm"], x.device)  # one copy for the images and the labels
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        return MixResult(out, self._labels(y, {**p, "perm": perm}), None, p)


# ------------------------------------------------------------------------------------ Mosaic
def pad_boxes(boxes: Sequence[np.ndarray]) -> Tensor:
    """Per-image ``(k_i, 5)`` box arrays ``(class, x0, y0, x1, y1)`` -> one ``(N, K, 5)`` long tensor,
    padded with rows of class ``-1`` (what :class:`Mosaic` and the Mosaic step look up by index)."""
    k = max((len(b) for b in boxes), default=0)
    out = torch.full((len(boxes), max(k, 1), 5), -1, dtype=torch.long)
    out[..., 1:] = 0
    for i, b in enumerate(boxes):
        b = np.asarray(b).reshape(-1, 5)
        if len(b):
            out[i, : len(b)] = torch.as_tensor(b, dtype=torch.long)
    return out


class Mosaic:
    """Mosaic (YOLOv4) for MLIC: each output image shows four images of the batch around a random centre.

    Image ``k`` of the four fills one quadrant, placed so that its corner facing the centre touches
    the centre (a crop at full resolution, no rescaling). A class is positive when the part of its
    box inside the crop keeps at least ``min_area_ratio`` (0.5) of the box area (Sec. IV-C-1). Needs
    the per-image boxes (``(B, K, 5)``, class ``-1`` = padding; see :func:`pad_boxes`). One centre
    per batch; the first image of output ``i`` is image ``i`` and the other three come from random
    permutations of the batch (the paper reads 4x more images from disk instead). Same batch size.
    """

    def __init__(self, min_area_ratio: float = 0.5, center_range: tuple[float, float] = (0.25, 0.75)):
        lo, hi = center_range
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"center_range must satisfy 0 < lo <= hi < 1, got {center_range}")
        if not 0.0 < min_area_ratio <= 1.0:
            raise ValueError(f"min_area_ratio must be in (0, 1], got {min_area_ratio}")
        self.min_area_ratio, self.center_range = float(min_area_ratio), (float(lo), float(hi))

    def __repr__(self) -> str:
        return f"Mosaic(min_area_ratio={self.min_area_ratio}, center_range={self.center_range})"

    def __call__(self, x: Tensor, y: Tensor, boxes: Tensor, generator: torch.Generator | None = None) -> MixResult:
        _check_batch(x, y)
        B, C, H, W = x.shape
        if boxes is None or boxes.ndim != 3 or boxes.shape[0] != B or boxes.shape[2] != 5:
            raise ValueError(f"Mosaic needs boxes (B={B}, K, 5) with rows (class, x0, y0, x1, y1); got "
                             f"{None if boxes is None else tuple(boxes.shape)} (build them with pad_boxes)")
        if boxes.device.type == "cpu" and boxes.numel():  # checked where it costs no device sync
            cls = boxes[..., 0]
            wrong = (cls < -1) | (cls >= y.shape[1]) | (cls != cls.round())
            if bool(wrong.any()):
                bad = cls[wrong][0].item()
                raise ValueError(f"box classes must be whole numbers in 0..{y.shape[1] - 1} (or -1 = padding, as "
                                 f"pad_boxes writes), the columns of y; got {bad!r}")
        lo, hi = self.center_range
        cy = int(round(H * (lo + (hi - lo) * _rand(generator))))
        cx = int(round(W * (lo + (hi - lo) * _rand(generator))))
        cy, cx = min(max(cy, 1), H - 1), min(max(cx, 1), W - 1)
        srcs = torch.stack([torch.arange(B)] + [_randperm(B, generator) for _ in range(3)])  # (4, B)
        out = torch.empty_like(x)
        # (canvas rows, canvas cols, source rows, source cols) per quadrant TL, TR, BL, BR
        quads = [((0, cy), (0, cx), (H - cy, H), (W - cx, W)), ((0, cy), (cx, W), (H - cy, H), (0, W - cx)),
                 ((cy, H), (0, cx), (0, H - cy), (W - cx, W)), ((cy, H), (cx, W), (0, H - cy), (0, W - cx))]
        y_out = torch.zeros_like(y)
        y_seen = torch.zeros_like(y)  # classes with any part of a box in a crop, whatever the area rule
        boxes, srcs_on_device = host_to_device(boxes, x.device), host_to_device(srcs, x.device)
        for k, ((a0, a1), (b0, b1), (s0, s1), (t0, t1)) in enumerate(quads):
            idx = srcs_on_device[k]
            out[:, :, a0:a1, b0:b1] = x[idx, :, s0:s1, t0:t1]
            bx = boxes[idx]  # (B, K, 5)
            cls = bx[..., 0].long()  # whole numbers (checked above on the CPU), of any dtype
            bx0, by0, bx1, by1 = (bx[..., j].float() for j in range(1, 5))
            area = ((bx1 - bx0).clamp(min=0) * (by1 - by0).clamp(min=0))
            iw = (bx1.clamp(max=float(t1)) - bx0.clamp(min=float(t0))).clamp(min=0)
            ih = (by1.clamp(max=float(s1)) - by0.clamp(min=float(s0))).clamp(min=0)
            real = (cls >= 0) & (area > 0)
            kept = real & (iw * ih >= self.min_area_ratio * area - 1e-6)
            onehot = F.one_hot(cls.clamp(min=0), y.shape[1]).to(y.dtype)
            y_out = torch.maximum(y_out, (onehot * kept[..., None].to(y.dtype)).amax(dim=1))
            y_seen = torch.maximum(y_seen, (onehot * (real & (iw * ih > 0))[..., None].to(y.dtype)).amax(dim=1))
        return MixResult(out, y_out, None, {"center": (cx, cy), "sources": srcs, "visible_labels": y_seen})


def mosaic_label_loss(x: Tensor, y: Tensor, boxes: Tensor, mosaic: Mosaic | None = None,
                      generator: torch.Generator | None = None) -> dict[str, int]:
    """How many labels Mosaic's area rule (Sec. IV-C-1) removes from objects that are still partly visible.

    One call of ``mosaic`` (default :class:`Mosaic`); its ``info["visible_labels"]`` marks the classes with any
    part of a box inside a crop. Returns counts: ``visible`` (image-class pairs with some part of a box in the
    crops), ``lost`` (of those, dropped by the rule), ``labels_in`` (positive labels of the regular batch) and
    ``labels_out`` (of the mosaics). The draw advances ``generator`` (default torch's global RNG) as one Mosaic
    call does.
    """
    res = (mosaic or Mosaic())(x, y, boxes, generator=generator)
    seen, kept = res.info["visible_labels"] > 0, res.y > 0
    return {"visible": int(seen.sum()), "lost": int((seen & ~kept).sum()), "labels_in": int((y > 0).sum()),
            "labels_out": int(kept.sum())}


# ---------------------------------------------------------------------------- Batch Augmentation
class BatchAugmentation:
    """Batch Augmentation (Hoffer et al.): ``M`` copies of the batch, each with its own random
    augmentation (here a random scale in ``scale`` and shift up to ``max_shift`` of the side, plus a
    horizontal flip with probability 0.5 when ``flip``), concatenated: ``M * B`` images. ``M = 2``
    is the paper's best value (Sec. IV-C-1). The sampled window always lies inside the image (the shift
    is capped at ``1 - scale`` in normalised coordinates), so each copy is a crop of at least ``scale``
    of the side; labels are repeated, as in Hoffer et al. (an object that lies entirely in the cropped-off
    margin keeps its label)."""

    def __init__(self, m: int = 2, max_shift: float = 0.125, scale: tuple[float, float] = (0.85, 1.0),
                 flip: bool = False):
        if m < 1:
            raise ValueError(f"m (number of copies) must be >= 1, got {m}")
        if not 0.0 <= max_shift < 1.0 or not 0.0 < scale[0] <= scale[1]:
            raise ValueError(f"bad augmentation ranges max_shift={max_shift}, scale={scale}")
        self.m, self.max_shift, self.scale, self.flip = int(m), float(max_shift), tuple(scale), bool(flip)

    def __repr__(self) -> str:
        return f"BatchAugmentation(m={self.m}, max_shift={self.max_shift}, scale={self.scale}, flip={self.flip})"

    def mix_labels(self, y: Tensor, generator: torch.Generator | None = None, image_size=(1, 1)) -> Tensor:
        return y.repeat(self.m, 1)

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> MixResult:
        _check_batch(x, y)
        n = self.m * len(x)
        xs = x.repeat(self.m, 1, 1, 1)
        lo, hi = self.scale
        s = lo + (hi - lo) * torch.rand(n, generator=generator)
        room = torch.clamp(1.0 - s, max=2 * self.max_shift)[:, None]  # window [t - s, t + s] inside [-1, 1]
        t = (torch.rand(n, 2, generator=generator) * 2 - 1) * room
        sx = s * (torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if self.flip else 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = sx, s, t
        # sampled in float32 (float64 kept): torch's CPU grid_sample with a float16/bfloat16 grid reads outside the
        # image (NaN and garbage pixels), and integer images have no bilinear kernel; cast back afterwards
        # float64 also for 32/64-bit integers: float32 rounds values above 2**24, and 2**31 - 1 up to 2**31 (overflow)
        work = torch.float64 if x.dtype in (torch.float64, torch.int32, torch.int64) else torch.float32
        grid = F.affine_grid(host_to_device(theta, x.device).to(work), list(xs.shape), align_corners=False)
        out = F.grid_sample(xs.to(work), grid, mode="bilinear", padding_mode="border", align_corners=False)
        if not x.is_floating_point():
            out = out.round()
        return MixResult(out.to(x.dtype), y.repeat(self.m, 1), None, {"m": self.m})


# ------------------------------------------------------------------- noisy label correlations
def _binary(labels) -> Tensor:
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
    if t.ndim != 2:
        raise ValueError(f"labels must be (N, num_classes), got shape {tuple(t.shape)}")
    return (t > 0).float()


def cooccurrence_mask(labels, min_count: int = 1) -> Tensor:
    """``A`` of Eq. 8: ``A[i, j] = 1`` iff classes ``i`` and ``j`` co-occur in at least ``min_count``
    images (the paper: 1; ``A[i, i] = 1`` iff class ``i`` occurs that often). Positive = value > 0, so
    VOC's ``{1, 0, -1}`` treats *difficult* (0) as negative, as the authors do. A larger ``min_count``
    treats rare co-occurrences as absent (useful when, as on the scenes, every pair co-occurs once)."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    p = _binary(labels)
    return (p.T @ p) >= min_count


def noisy_correlation_indicators(mixed_labels, A) -> tuple[Tensor, Tensor]:
    """Per-sample ``I_in`` (Eq. 9) and ``I_out`` (Eq. 10) for labels ``(N, C)`` (positive = > 0).

    ``I_in = |y_P|^-2 sum_{i, j in y_P} (1 - A_ij)``; ``I_out = 1`` iff some pair of positives never
    co-occurs in training. A sample without positives scores 0 on both.
    """
    p = _binary(mixed_labels)
    A = torch.as_tensor(A)
    if A.shape != (p.shape[1], p.shape[1]):
        raise ValueError(f"A must be ({p.shape[1]}, {p.shape[1]}) for {p.shape[1]} classes, got {tuple(A.shape)}")
    bad = ((p @ (1.0 - A.float())) * p).sum(1)
    n_pos = p.sum(1)
    i_in = torch.where(n_pos > 0, bad / n_pos.clamp(min=1) ** 2, torch.zeros_like(bad))
    return i_in, (bad > 0).float()


def noisy_correlation_ratios(labels, mixer=None, batch_size: int = 32, epochs: int = 1, seed: int = 0,
                             A=None, image_size: tuple[int, int] = (448, 448),
                             drop_last: bool = False) -> dict[str, float]:
    """Eq. 8: ``r = mean over every training sample of every batch of an epoch of I(y, A)``, in [0, 1].

    Parameters
    ----------
    labels : ``(N, C)`` training labels (positive = > 0).
    mixer : anything with ``mix_labels(y, generator)`` (:class:`SpliceMix`, :class:`Mixup`,
        :class:`CutMix`, :class:`BatchAugmentation`), or ``None`` for the plain baseline. The
        labels it returns for a batch are exactly the targets the model would be trained on (for
        SpliceMix: the regular *and* the mixed ones, so the regular samples count in the mean).
    batch_size : the regular batch size ``|B|`` (paper: 16 on VOC, 32 on COCO).
    epochs : epochs to simulate (more = less sampling noise).
    seed : seeds the shuffling and the mixing (torch generator).
    A : co-occurrence mask; default :func:`cooccurrence_mask` of ``labels``.
    image_size : only CutMix's box areas depend on it.

    Returns ``{"r_in", "r_out", "n_samples"}``.
    """
    y = _binary(labels)
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be positive, got {batch_size}, {epochs}")
    if mixer is not None and not hasattr(mixer, "mix_labels"):
        raise ValueError(f"{type(mixer).__name__} has no mix_labels(y, generator); Mosaic needs boxes and is "
                         "not supported here")
    A = cooccurrence_mask(y) if A is None else torch.as_tensor(A)
    g = torch.Generator().manual_seed(int(seed))
    outs = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), batch_size):
            idx = order[start: start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yb = y[idx]
            if mixer is None:
                outs.append(yb)
            elif isinstance(mixer, SpliceMix | BatchAugmentation):
                outs.append(mixer.mix_labels(yb, g))
            else:
                outs.append(mixer.mix_labels(yb, g, image_size=image_size))
    i_in, i_out = noisy_correlation_indicators(torch.cat(outs), A)
    return {"r_in": float(i_in.mean()), "r_out": float(i_out.mean()), "n_samples": int(len(i_in))}


def noisy_correlation_over_seeds(labels, mixers: Mapping[str, Any], seeds: Sequence[int], batch_size: int = 32,
                                 epochs: int = 1, A=None, image_size: tuple[int, int] = (448, 448)
                                 ) -> dict[str, np.ndarray]:
    """:func:`noisy_correlation_ratios` (Eq. 8) of each named mixer for each simulation seed, so a table can show
    the spread that the shuffling and the mixing alone put on ``r_in`` and ``r_out`` (the labels are fixed).

    Returns ``{name: array (len(seeds), 2)}`` of ``(r_in, r_out)`` per seed, in [0, 1]. ``A`` (Eq. 8's
    co-occurrence mask, :func:`cooccurrence_mask` of ``labels`` when None) is shared by every run.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or not mixers:
        raise ValueError(f"need at least one seed and one mixer, got seeds={seeds} and mixers={list(mixers)}")
    A = cooccurrence_mask(labels) if A is None else A
    return {name: np.array([[r["r_in"], r["r_out"]] for r in (
        noisy_correlation_ratios(labels, mixer, batch_size, epochs, seed=s, A=A, image_size=image_size)
        for s in seeds)]) for name, mixer in mixers.items()}
