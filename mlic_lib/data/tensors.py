"""In-memory image datasets for the embedded data (scenes, ML-MNIST).

Images stay ``uint8`` in memory and are converted to normalised float on access, so thousands of
canvases cost a few MB and, without a ``transform``, a data loader needs no worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def check_label_range(targets: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` unless every known entry of ``targets`` (``mask`` True, or all) is a label in [0, 1]
    (multi-hot or soft). Datasets check once when built, so the losses can skip their per-call check on an
    accelerator, where it would cost a host sync."""
    known = targets if mask is None else targets[mask]
    if known.numel() and not bool(((known >= 0) & (known <= 1)).all()):  # NaN fails both comparisons
        raise ValueError("targets must be multi-hot (or soft) labels in [0, 1]; for VOC-style labels with "
                         "1 / 0 (difficult) / -1 use mlic_lib.metrics.voc_targets(labels) to get (targets, mask), "
                         "and map {-1, 1} labels to {0, 1} with (y + 1) / 2")


class TensorImageDataset(Dataset):
    """``(image float (C, H, W), target float (K,))`` pairs from uint8 arrays.

    Parameters
    ----------
    images : uint8 array/tensor (N, C, H, W).
    targets : (N, K) multi-hot labels.
    mean, std : per-channel normalisation applied after scaling to [0, 1]; default 0.5/0.5.
    transform : optional training augmentation of the ``uint8`` images, called on a ``(n, C, H, W)`` batch
        before the normalisation (e.g. :class:`~mlic_lib.data.canvas_augment.CellAugment`).
    """

    def __init__(self, images, targets, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        images = torch.as_tensor(np.asarray(images))
        targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if targets.ndim != 2 or len(targets) != len(images):
            raise ValueError(
                f"targets must be (N, K) with N = {len(images)} images, got shape {tuple(targets.shape)}"
            )
        check_label_range(targets)  # once here, not at every loss call
        channels = images.shape[1]
        self.images = images
        self.targets = targets
        for name, v in (("mean", mean), ("std", std)):  # a 3-value mean on 1-channel images would broadcast them to 3
            if v is not None and len(v) not in (1, channels):
                raise ValueError(f"{name} has {len(v)} values for images with {channels} channel(s): give one value "
                                 f"or one per channel")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = torch.tensor(mean if mean is not None else [0.5] * channels).view(-1, 1, 1)
        self.std = torch.tensor(std if std is not None else [0.5] * channels).view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def normalise(self, images_u8: torch.Tensor) -> torch.Tensor:
        return (images_u8.float() / 255.0 - self.mean) / self.std

    def _images(self, index) -> torch.Tensor:
        if (isinstance(index, torch.Tensor) and index.ndim == 1 and index.dtype in (torch.int64, torch.int32)
                and (len(index) == 0 or int(index.min()) >= 0)):  # index_select takes no negative index
            x = self.images.index_select(0, index)  # a batch: self.images[index], about 20x faster on uint8 rows
        else:
            x = self.images[index]
        return x if self.transform is None else self.transform(x)

    def __getitem__(self, index: int):
        return self.normalise(self._images(index)), self.targets[index]

    def __getitems__(self, indices: list[int]):
        """Batched fetch used by ``DataLoader``: one indexing and normalisation op per batch."""
        idx = torch.as_tensor(indices)
        return list(zip(self.normalise(self._images(idx)), self.targets[idx], strict=True))

    def unnormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] for display."""
        return (x * self.std + self.mean).clamp(0, 1)
