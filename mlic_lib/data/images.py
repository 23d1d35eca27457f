"""A map-style dataset over a list of image files with multi-label targets.

Images are decoded with PIL (``torchvision.io`` is not used: its decoders are unavailable on
some of the project's machines).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import CorruptImageError, DatasetNotFoundError, repair_hint
from .tensors import check_label_range

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageListDataset", "default_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageListDataset(Dataset):
    """Images read from files, each with a multi-hot target vector and an optional mask.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        One image file per sample.
    targets : array_like, shape (N, C)
        Multi-hot targets; stored as ``float32``.
    mask : array_like of bool, shape (N, C), optional
        ``True`` where the target counts (e.g. ``False`` for VOC "difficult" labels). When given,
        items are ``(image, target, mask)`` instead of ``(image, target)``.
    transform : callable, optional
        Applied to the RGB :class:`PIL.Image.Image` (e.g. :func:`default_transform`). Without
        one, the PIL image itself is returned, which the default ``DataLoader`` collate cannot
        batch.
    name : str, optional
        Name of the dataset (shown by ``repr`` and in error messages), e.g. ``"voc2007"``.
    source : str, optional
        Registry key of the dataset whose files these are, for the repair hint of a missing or corrupt
        image (``mlic data prepare SOURCE --force``); defaults to ``name``. VOC-LT's training images,
        for instance, are VOC 2012's (``name="voc_lt", source="voc2012"``).
    class_names : sequence of str, optional
        Column names of ``targets``; stored as :attr:`class_names`.
    ids : sequence, optional
        Sample identifiers (VOC ids, COCO image ids); stored as :attr:`ids`.

    Raises
    ------
    ValueError
        If the lengths or shapes of ``paths``, ``targets`` and ``mask`` disagree, or a known target is not a
        label in [0, 1].

    Notes
    -----
    ``__getitem__`` raises :class:`~mlic_lib.data.errors.DatasetNotFoundError` when a file is
    missing and :class:`~mlic_lib.data.errors.CorruptImageError` when it cannot be decoded; both
    messages name the file.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        targets: Any,
        mask: Any = None,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        name: str | None = None,
        source: str | None = None,
        class_names: Sequence[str] | None = None,
        ids: Sequence[Any] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        t = np.asarray(targets, dtype=np.float32)
        if t.ndim != 2 or t.shape[0] != len(self.paths):
            raise ValueError(f"targets must have shape (N={len(self.paths)}, C), got {t.shape}")
        self.targets = torch.from_numpy(np.ascontiguousarray(t))
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            if m.shape != t.shape:
                raise ValueError(f"mask shape {m.shape} differs from targets shape {t.shape}")
            self.mask: torch.Tensor | None = torch.from_numpy(np.ascontiguousarray(m))
        else:
            self.mask = None
        check_label_range(self.targets, self.mask)  # once here: the losses check no labels on an accelerator
        self.transform = transform
        self.name = name
        self.source = source
        if class_names is not None and len(class_names) != t.shape[1]:
            raise ValueError(f"{len(class_names)} class names for {t.shape[1]} target columns")
        self.class_names = list(class_names) if class_names is not None else None
        if ids is not None and len(ids) != len(self.paths):
            raise ValueError(f"{len(ids)} ids for {len(self.paths)} paths")
        self.ids = list(ids) if ids is not None else None

    @property
    def num_classes(self) -> int:
        """Number of target columns ``C``."""
        return int(self.targets.shape[1])

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Image.Image:
        """Open sample ``index`` as an RGB PIL image (no transform).

        Raises
        ------
        DatasetNotFoundError
            If the file does not exist.
        CorruptImageError
            If PIL cannot decode it.
        """
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(
                f"image file not found: {path}. The dataset looks incomplete. {repair_hint(self._key, True)}",
                path=path,
            ) from exc
        except (PermissionError, IsADirectoryError):
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise CorruptImageError(
                f"cannot decode image {path}: {exc}. The file is corrupt or truncated. {repair_hint(self._key, True)}",
                path=path,
            ) from exc

    @property
    def _key(self) -> str | None:
        """The registry key of the dataset whose files these are (for repair hints)."""
        return self.source or self.name

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image: Any = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.mask is None:
            return image, self.targets[index]
        return image, self.targets[index], self.mask[index]

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return (
            f"{type(self).__name__}{label}(n={len(self)}, classes={self.num_classes}, "
            f"mask={'yes' if self.mask is not None else 'no'})"
        )


def default_transform(size: int = 448, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to ``(size, size)`` (no aspect ratio kept), a random horizontal flip when ``train``, tensor and
    ImageNet normalisation: :func:`~mlic_lib.data.presets.train_preset` with ``crop="none"`` or
    :func:`~mlic_lib.data.presets.eval_preset` (the presets give the papers' other augmentations).

    Returns
    -------
    torchvision.transforms.Compose
        PIL image -> normalised ``float32`` tensor of shape ``(3, size, size)``.
    """
    from .presets import eval_preset, train_preset

    return train_preset(size, {"crop": "none", "hflip": True}) if train else eval_preset(size)
