"""One entry point for the real datasets of the ``full`` profiles: :func:`real_data` turns a profile's
``data:`` section into train/test datasets with the paper's pre-processing (:mod:`.presets`).

========== ========================================= ============================================
dataset    train                                     test
========== ========================================= ============================================
voc2007    VOC2007 trainval                          VOC2007 test (difficult ignored in AP)
coco2014   COCO train2014 (ML-GCN class order)       COCO val2014
coco2017   COCO train2017 (ML-GCN class order)       COCO val2017
voc_lt     VOC-LT split of VOC2012 trainval          VOC2007 test (difficult positive, as DBL)
coco_lt    COCO-LT split of COCO train2017           COCO val2017 (category-id order)
nuswide    NUS-WIDE official train list (81)         official test list (user-supplied images)
========== ========================================= ============================================

``data:`` keys: ``dataset``, ``image_size``, ``augment`` (see :func:`.presets.train_preset`), ``normalize``
(``imagenet``, the default, or ``none``), ``resize`` (``pil``, the default, or ``cv2`` as DistributionBalancedLoss),
``difficult_train`` / ``difficult_eval`` (VOC: ``negative`` (SpliceMix's code) / ``ignore`` (AP) by default;
``ignore`` in training gives ``(x, y, mask)`` items; VOC-LT reads ``difficult_eval`` only, default ``positive``
as in DistributionBalancedLoss's evaluation), ``head_min`` / ``tail_max`` (read by the LTML chapter),
``n_train`` / ``n_test`` (``null`` = all; else a seeded random subset, for quick checks), ``subset_seed``,
``root`` (``null`` = ``$MLIC_DATA``; relative paths are relative to the working directory, i.e. ``notebooks/``
when a chapter runs), ``split_dir`` (long-tailed splits; ``null`` = ``<root>/<dataset>``).
Missing files raise :class:`~mlic_lib.data.errors.DatasetNotFoundError` naming ``mlic data prepare NAME``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fingerprint import data_fingerprint
from .images import ImageListDataset
from .presets import eval_preset, train_preset

__all__ = ["REAL_DATASETS", "RealData", "check_options", "is_real", "real_data", "subset"]

REAL_DATASETS = ("voc2007", "coco2014", "coco2017", "voc_lt", "coco_lt", "nuswide")
_KEYS = {"dataset", "image_size", "augment", "normalize", "resize", "difficult_train", "difficult_eval", "n_train",
         "n_test", "subset_seed", "root", "split_dir", "head_min", "tail_max"}


@dataclass
class RealData:
    """Train/test datasets of one real benchmark (the interface of :class:`~mlic_lib.experiments.SceneData`
    that the training helpers use: ``train_ds``, ``test_ds``, ``num_classes``)."""

    name: str
    train_ds: ImageListDataset
    test_ds: ImageListDataset
    class_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.train_ds.num_classes

    @property
    def train_targets(self) -> np.ndarray:
        """Training labels ``(N, C)`` as ``uint8`` (label statistics, partitions, samplers)."""
        return self.train_ds.targets.numpy().astype(np.uint8)

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`~mlic_lib.data.fingerprint.data_fingerprint` of the training set (its labels and image ids or
        paths; no file is read), as :attr:`mlic_lib.experiments.SceneData.fingerprint`."""
        return data_fingerprint(self.train_ds)

    def describe(self) -> str:
        """One line for figure provenance, e.g. ``"voc2007 (5011 train / 4952 test images, 448 px)"``."""
        missing = sum(self.extra.get("missing_images", {}).values())  # NUS-WIDE: listed, not on disk
        return (f"{self.name} ({len(self.train_ds)} train / {len(self.test_ds)} test images, "
                f"{self.extra.get('image_size', '?')} px"
                + (f"; {missing} listed image{'s' if missing > 1 else ''} missing" if missing else "")
                + ")")


def is_real(data: Mapping[str, Any]) -> bool:
    """True when a profile's ``data:`` section names a real dataset rather than the embedded scenes."""
    return data.get("dataset", "scenes") not in ("scenes", None)


def subset(ds: ImageListDataset, n: int | None, seed: int = 0) -> ImageListDataset:
    """A seeded random subset of ``n`` items of ``ds`` (all of it when ``n`` is ``None`` or >= its size)."""
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise ValueError(f"a subset needs at least one image, got n={n}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    mask = ds.mask[idx].numpy() if ds.mask is not None else None
    return ImageListDataset([ds.paths[i] for i in idx], ds.targets[idx].numpy(), mask, ds.transform, name=ds.name,
                            source=ds.source,
                            class_names=ds.class_names,
                            ids=[ds.ids[i] for i in idx] if ds.ids is not None else None)


def check_options(data: Mapping[str, Any]) -> None:
    """Check a real dataset's ``data:`` section without reading any file: known keys, a known ``dataset``, an
    ``image_size`` >= 1 and known ``normalize`` / ``resize`` / difficulty policies (``ValueError`` naming the key)."""
    from .presets import NORMALIZE, RESIZES
    from .voc import _DIFFICULT_POLICIES

    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"unknown data option(s) {sorted(unknown)} for a real dataset; valid: {sorted(_KEYS)}")
    name = data.get("dataset")
    if name not in REAL_DATASETS:
        raise ValueError(f"unknown real dataset {name!r}; choose one of {REAL_DATASETS}")
    size = data.get("image_size", 448)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size must be a whole number of pixels >= 1, got {size!r}")
    for key, allowed in (("normalize", NORMALIZE), ("resize", RESIZES), ("difficult_train", _DIFFICULT_POLICIES),
                         ("difficult_eval", _DIFFICULT_POLICIES)):
        if key in data and data[key] not in allowed:  # null too: real_data would refuse it after a kernel started
            raise ValueError(f"{key} must be one of {allowed}, got {data[key]!r}"
                             + (" (leave the key out for its default)" if data[key] is None else ""))
    if data.get("augment") is not None:  # the presets' own checks, now rather than in a kernel or at the first image
        try:
            train_preset(size, data["augment"], data.get("normalize", "imagenet"), data.get("resize", "pil"))
        except (TypeError, ValueError) as err:
            raise ValueError(str(err) if str(err).startswith("augment") else f"augment: {err}") from err


def real_data(data: Mapping[str, Any]) -> RealData:
    """Build the datasets that a profile's ``data:`` section names (see the module docstring).

    Raises
    ------
    ValueError
        For an unknown dataset or option.
    DatasetNotFoundError
        When the files are not under the data root (the message says which ``mlic data prepare`` to run).
    """
    from .coco import coco_dataset
    from .longtail import lt_datasets
    from .nuswide import nuswide_dataset
    from .voc import voc_dataset

    check_options(data)
    name = data["dataset"]
    size = int(data.get("image_size", 448))
    norm, resize = data.get("normalize", "imagenet"), data.get("resize", "pil")
    train_tf, test_tf = train_preset(size, data.get("augment"), norm, resize), eval_preset(size, norm, resize)
    root = data.get("root")
    root = Path(os.path.expanduser(root)) if root else None
    extra: dict[str, Any] = {"image_size": size}
    if name == "voc2007":
        train = voc_dataset(root, "2007", "trainval", train_tf, difficult=data.get("difficult_train", "negative"))
        test = voc_dataset(root, "2007", "test", test_tf, difficult=data.get("difficult_eval", "ignore"))
    elif name in ("coco2014", "coco2017"):
        year = name[-4:]
        # images without any annotation are left out, as in ML-GCN's protocol (82,081 / 40,137 for 2014)
        train = coco_dataset(root, year, "train", train_tf, drop_empty=True)
        test = coco_dataset(root, year, "val", test_tf, drop_empty=True)
    elif name == "nuswide":
        train, test = nuswide_dataset(root, "train", train_tf), nuswide_dataset(root, "test", test_tf)
        extra["missing_images"] = {"train": train.n_missing, "test": test.n_missing}
    else:
        train, _, test, split = lt_datasets(name, data.get("split_dir"), root, train_transform=train_tf,
                                            test_transform=test_tf,
                                            difficult_eval=data.get("difficult_eval", "positive"))
        extra["split"] = split
    seed = int(data.get("subset_seed", 0))
    train, test = subset(train, data.get("n_train"), seed), subset(test, data.get("n_test"), seed + 1)
    names = train.class_names or [str(i) for i in range(train.num_classes)]
    return RealData(name, train, test, list(names), extra)
