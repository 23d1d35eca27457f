"""A short hash of a training set, for the cache keys of runs trained on data passed in by the caller.

A run's key holds the profile's settings; a trainer that also takes the data (:func:`mlic_lib.ltml.train_ltml`,
:func:`mlic_lib.experiments.train_scene_model`) adds :func:`data_fingerprint`, so that a run trained on other images
or labels under the same settings is trained, not loaded."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

__all__ = ["data_fingerprint"]


def _array(x: Any) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))


def data_fingerprint(dataset: Any, targets: Any = None) -> str:
    """sha256 (first 16 hex digits) of a training set: its labels (``targets``, default ``dataset.targets``) and
    what names its images, i.e. the pixels of an in-memory dataset (an ``images`` array or tensor, as in
    :class:`~mlic_lib.data.tensors.TensorImageDataset`), else its ``ids`` or ``paths`` (as in
    :class:`~mlic_lib.data.images.ImageListDataset`; no file is read). A dataset with none of these is known by its
    labels and length only."""
    targets = getattr(dataset, "targets", None) if targets is None else targets
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no .targets: pass the training labels as targets=")
    h = hashlib.sha256(_array(targets).astype(np.float32).tobytes())
    images = getattr(dataset, "images", None)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        h.update(_array(images).tobytes())
    else:
        names = getattr(dataset, "ids", None) or getattr(dataset, "paths", None) or []
        h.update(repr([str(n) for n in names]).encode())
        h.update(str(len(dataset) if hasattr(dataset, "__len__") else -1).encode())
    return h.hexdigest()[:16]
