"""MS-COCO multi-label classification labels and datasets.

Expected layout (the official 2014/2017 archives extracted under the data root)::

    <root>/coco/annotations/instances_train2014.json
    <root>/coco/train2014/COCO_train2014_000000000009.jpg

An image is labelled with every category that has at least one instance annotation on it
(crowd annotations included).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import missing_dataset, repair_hint
from .images import ImageListDataset
from .paths import data_root

__all__ = ["COCO_CLASS_ORDERS", "coco_dataset", "read_coco_labels"]

#: ``"coco"``: category id ascending (person first). ``"mlgcn"``: category name ascending, the
#: alphabetical order used by ML-GCN (``airplane`` first).
COCO_CLASS_ORDERS = ("coco", "mlgcn")


def _order_categories(categories: list[dict[str, Any]], class_order: str) -> list[dict[str, Any]]:
    if class_order == "coco":
        return sorted(categories, key=lambda c: int(c["id"]))
    if class_order == "mlgcn":
        return sorted(categories, key=lambda c: str(c["name"]))
    raise ValueError(f"class_order must be one of {COCO_CLASS_ORDERS}, got {class_order!r}")


def read_coco_labels(
    instances_json: str | os.PathLike,
    class_order: str = "coco",
    drop_empty: bool = False,
    skip_degenerate: bool = False,
) -> tuple[list[int], list[str], np.ndarray, list[str]]:
    """Build the multi-hot label matrix of a COCO ``instances_*.json`` file.

    Parameters
    ----------
    instances_json : str or os.PathLike
        A COCO detection annotation file (``images``, ``annotations``, ``categories``).
    class_order : {"coco", "mlgcn"}, default "coco"
        Column order: ``"coco"`` sorts categories by id (person first), ``"mlgcn"`` by name
        (alphabetical, the order of ML-GCN's ``category.json``).
    drop_empty : bool, default False
        By default images without any annotation are kept with an all-zero label row (COCO 2014
        train has about 700 of them, val about 300). ``True`` removes them.
    skip_degenerate : bool, default False
        ``True`` leaves out the annotations flagged ``ignore`` and those with ``area <= 0`` or a box
        narrower or lower than 1 pixel, as DistributionBalancedLoss's COCO loader does (the labels of
        COCO-LT and of its val2017 test set). Applied before ``drop_empty``.

    Returns
    -------
    image_ids : list of int
        In the order of the ``images`` list of the file.
    file_names : list of str
        File names relative to the split's image folder.
    labels : numpy.ndarray of uint8, shape (N, K)
        ``1`` where the image has an instance of the category; ``K`` = number of categories (80).
    class_names : list of str
        Category names in column order.

    Raises
    ------
    ValueError
        For an unknown ``class_order``, or an annotation that refers to an image or category id
        absent from the file.
    """
    path = Path(instances_json)
    with path.open("rb") as fh:
        try:
            data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): the file is damaged or was cut short.") from err
    categories = _order_categories(list(data.get("categories", [])), class_order)
    images = data.get("images", [])
    annotations = data.get("annotations", [])

    image_ids = np.fromiter((int(im["id"]) for im in images), dtype=np.int64, count=len(images))
    file_names = [str(im["file_name"]) for im in images]
    cat_ids = np.fromiter((int(c["id"]) for c in categories), dtype=np.int64, count=len(categories))
    class_names = [str(c["name"]) for c in categories]
    if skip_degenerate:
        annotations = [a for a in annotations if not a.get("ignore", False) and float(a.get("area", 1.0)) > 0
                       and min(float(v) for v in a.get("bbox", (0, 0, 1, 1))[2:4]) >= 1]
    ann_img = np.fromiter((a["image_id"] for a in annotations), dtype=np.int64, count=len(annotations))
    ann_cat = np.fromiter((a["category_id"] for a in annotations), dtype=np.int64, count=len(annotations))

    # image id -> row, via a sorted copy of the ids
    img_order = np.argsort(image_ids, kind="stable")
    sorted_img = image_ids[img_order]
    pos = np.searchsorted(sorted_img, ann_img).clip(max=max(len(sorted_img) - 1, 0))
    bad = ~(sorted_img[pos] == ann_img) if len(sorted_img) else np.ones(len(ann_img), dtype=bool)
    if bad.any():
        raise ValueError(f"{path}: annotation refers to unknown image id {int(ann_img[bad][0])}")
    rows = img_order[pos]

    # category id -> column, via a lookup table
    lookup = np.full(int(max(cat_ids.max(initial=0), ann_cat.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[cat_ids] = np.arange(len(cat_ids))
    cols = lookup[ann_cat] if len(ann_cat) else ann_cat
    if (cols < 0).any():
        raise ValueError(f"{path}: annotation refers to unknown category id {int(ann_cat[cols < 0][0])}")

    labels = np.zeros((len(images), len(categories)), dtype=np.uint8)
    labels[rows, cols] = 1

    ids_out = image_ids.tolist()
    if drop_empty:
        keep = labels.any(axis=1)
        labels = labels[keep]
        ids_out = [i for i, k in zip(ids_out, keep.tolist(), strict=True) if k]
        file_names = [f for f, k in zip(file_names, keep.tolist(), strict=True) if k]
    return ids_out, file_names, labels, class_names


def coco_dataset(
    root: str | os.PathLike | None = None,
    year: str | int = "2014",
    split: str = "train",
    transform: Callable[[Any], Any] | None = None,
    class_order: str = "mlgcn",
    *,
    drop_empty: bool = False,
    skip_degenerate: bool = False,
) -> ImageListDataset:
    """MS-COCO multi-label classification dataset.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data root holding ``coco/``; defaults to :func:`~mlic_lib.data.paths.data_root`.
    year : str, default "2014"
        ``"2014"`` or ``"2017"``.
    split : {"train", "val"}, default "train"
    transform : callable, optional
        Applied to each RGB PIL image (see :func:`~mlic_lib.data.images.default_transform`).
    class_order : {"coco", "mlgcn"}, default "mlgcn"
        See :func:`read_coco_labels`.
    drop_empty : bool, default False
        Remove images without annotations (kept with all-zero targets by default, as DistributionBalancedLoss
        keeps them in COCO-LT's test set; the ML-GCN, ASL, SpliceMix and CPSD loaders drop them, and
        :func:`~mlic_lib.data.real.real_data` passes ``True`` for those recipes).
    skip_degenerate : bool, default False
        Leave out ignored, zero-area and sub-pixel annotations (see :func:`read_coco_labels`).

    Returns
    -------
    ImageListDataset
        Items ``(image, target)``; ``ids`` are COCO image ids, ``class_names`` the category
        names in column order, ``name="coco<year>"``.

    Raises
    ------
    DatasetNotFoundError
        If the annotation file or image folder is missing (message names
        ``mlic data prepare coco<year>``).

    Notes
    -----
    Parsing ``instances_train2014.json`` (about 450 MB) takes tens of seconds and a few GB of
    memory; cache the result of :func:`read_coco_labels` if you build the dataset often.
    """
    year = str(year)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    base = (Path(root).expanduser() if root is not None else data_root()) / "coco"
    name = f"COCO{year}"
    ann = base / "annotations" / f"instances_{split}{year}.json"
    img_dir = base / f"{split}{year}"
    if not ann.is_file():
        raise missing_dataset(name, ann, "missing")
    if not img_dir.is_dir():
        raise missing_dataset(name, img_dir, "not a directory" if img_dir.exists() else "missing")
    try:
        ids, files, labels, class_names = read_coco_labels(ann, class_order=class_order, drop_empty=drop_empty,
                                                           skip_degenerate=skip_degenerate)
    except ValueError as err:
        if isinstance(err.__cause__, (json.JSONDecodeError, UnicodeDecodeError)):  # a damaged file: how to repair it
            raise ValueError(f"{err} {repair_hint(f'coco{year}', True)}") from err.__cause__
        raise
    if not ids:
        raise ValueError(f"{ann} gives no image{' with an annotation' if drop_empty else ''}: the file is damaged "
                         f"or cut short. {repair_hint(f'coco{year}', True)}")
    return ImageListDataset(
        [img_dir / f for f in files],
        labels,
        transform=transform,
        name=f"coco{year}",
        class_names=class_names,
        ids=ids,
    )
