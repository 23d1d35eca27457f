"""NUS-WIDE (81 concepts) from the official label lists and user-supplied images.

The images are no longer distributed by their authors, so ``mlic data prepare nuswide`` cannot fetch
them; place the official files under the data root::

    <root>/nuswide/Concepts81.txt  or  ConceptsList/Concepts81.txt  (one concept per line)
    <root>/nuswide/ImageList/{TrainImagelist,TestImagelist}.txt     (one image path per line; also
                                                                     ImageList/ImageList/, as the zip unpacks)
    <root>/nuswide/Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt   (one 0/1 per line)
    <root>/nuswide/Flickr/<folder>/<file>.jpg                       (the images)

Image-list lines use Windows separators (``actor\\0001_2124494179.jpg``, sometimes with a longer prefix
such as ``C:\\ImageData\\Flickr\\``); the last two components name the file under ``Flickr/``.

``Concepts81.txt`` must list the 81 official concepts in their official (alphabetical) order,
:data:`NUSWIDE_CONCEPTS`: the label columns follow that file, and index-based class data (CPSD's published
partitions, say) would not line up with another order.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import missing_dataset
from .images import ImageListDataset
from .paths import data_root

__all__ = ["NUSWIDE_CONCEPTS", "nuswide_dataset", "read_nuswide_labels"]

_SPLITS = {"train": "Train", "test": "Test"}

#: The 81 concepts of the official ``Concepts81.txt``, in its order (alphabetical).
NUSWIDE_CONCEPTS = (
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars", "castle", "cat",
    "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog", "earthquake", "elk", "fire", "fish", "flags",
    "flowers", "food", "fox", "frost", "garden", "glacier", "grass", "harbor", "horses", "house", "lake", "leaf", "map",
    "military", "moon", "mountain", "nighttime", "ocean", "person", "plane", "plants", "police", "protest",
    "railroad", "rainbow", "reflection", "road", "rocks", "running", "sand", "sign", "sky", "snow", "soccer",
    "sports", "statue", "street", "sun", "sunset", "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town",
    "toy", "train", "tree", "valley", "vehicle", "water", "waterfall", "wedding", "whales", "window", "zebra",
)


def _base(root: str | os.PathLike | None) -> Path:
    return (Path(root).expanduser() if root is not None else data_root()) / "nuswide"


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise missing_dataset("NUS-WIDE", path, "missing", key="nuswide")
    return path


def _first_file(preferred: Path, alternative: Path) -> Path:
    """``preferred``, or ``alternative`` where only that one exists (errors then name ``preferred``)."""
    return alternative if alternative.is_file() and not preferred.is_file() else preferred


def _lines(path: Path) -> list[str]:
    text = _require_file(path).read_text(encoding="utf-8-sig", errors="replace")  # -sig: drop a byte-order mark
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_concepts(concepts: list[str], path: Path) -> None:
    if tuple(concepts) == NUSWIDE_CONCEPTS:
        return
    if sorted(concepts) == sorted(NUSWIDE_CONCEPTS):
        problem = "lists the official concepts in another order"
    else:
        unknown = sorted(set(concepts) - set(NUSWIDE_CONCEPTS))
        absent = sorted(set(NUSWIDE_CONCEPTS) - set(concepts))
        problem = (f"has {len(concepts)} concepts" + (f"; unknown: {', '.join(unknown[:5])}" if unknown else "")
                   + (f"; absent: {', '.join(absent[:5])}" if absent else ""))
    raise ValueError(f"{path} {problem}: the label columns follow this file, so it must be the official "
                     "Concepts81.txt (81 concepts, alphabetical: mlic_lib.data.nuswide.NUSWIDE_CONCEPTS)")


def read_nuswide_labels(root: str | os.PathLike | None = None, split: str = "train"
                        ) -> tuple[list[str], np.ndarray, list[str]]:
    """``(relative image paths under Flickr/, labels uint8 (N, 81), concept names)`` of one official split.

    Raises
    ------
    DatasetNotFoundError
        When a list or label file is missing (the message names the file and ``nuswide``).
    ValueError
        For an unknown split, or a label file whose length differs from the image list.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    base = _base(root)
    # ConceptsList/ as the official archive unpacks; ImageList/ImageList/ as ImageList.zip unpacked into ImageList/
    concepts_file = _first_file(base / "Concepts81.txt", base / "ConceptsList" / "Concepts81.txt")
    concepts = _lines(concepts_file)
    _check_concepts(concepts, concepts_file)
    name = f"{_SPLITS[split]}Imagelist.txt"
    image_list = _first_file(base / "ImageList" / name, base / "ImageList" / "ImageList" / name)
    paths = ["/".join(p.replace("\\", "/").split("/")[-2:]) for p in _lines(image_list)]
    if not paths:
        raise ValueError(f"{image_list} lists no image: the file is empty or was cut short; put the official "
                         f"{name} back (from NUS-WIDE's ImageList.zip)")
    labels = np.zeros((len(paths), len(concepts)), dtype=np.uint8)
    for j, concept in enumerate(concepts):
        f = base / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{_SPLITS[split]}.txt"
        col = np.array([int(float(v)) for v in _lines(f)], dtype=np.int64)
        if len(col) != len(paths):
            raise ValueError(f"{f} has {len(col)} labels for {len(paths)} images in the {split} image list")
        if not np.isin(col, (0, 1)).all():
            raise ValueError(f"{f}: labels must be 0 or 1")
        labels[:, j] = col
    return paths, labels, concepts


def nuswide_dataset(root: str | os.PathLike | None = None, split: str = "train",
                    transform: Callable[[Any], Any] | None = None, *, drop_empty: bool = True,
                    missing: str = "skip") -> ImageListDataset:
    """NUS-WIDE multi-label dataset over the user-supplied ``Flickr/`` images.

    Parameters
    ----------
    drop_empty : bool, default True
        Remove images without any of the 81 labels (the usual protocol of the MLIC papers).
    missing : {"skip", "error"}, default "skip"
        Images listed but absent from ``Flickr/`` (common: many of the original Flickr images are gone)
        are left out with a warning (``"skip"``; the count is in the dataset's ``n_missing`` attribute) or
        raise. When none of the listed images is found, both raise: the ``Flickr/`` layout is wrong.
    """
    if missing not in ("skip", "error"):
        raise ValueError(f"missing must be 'skip' or 'error', got {missing!r}")
    base = _base(root)
    paths, labels, concepts = read_nuswide_labels(root, split)
    flickr = base / "Flickr"
    if not flickr.is_dir():
        raise missing_dataset("NUS-WIDE", flickr, "missing", key="nuswide")
    keep = labels.any(1) if drop_empty else np.ones(len(paths), dtype=bool)
    exists = np.array([(flickr / p).is_file() for p in paths])
    n_missing = int((keep & ~exists).sum())
    if n_missing and n_missing == int(keep.sum()):  # a wrong layout, not a few lost images
        raise missing_dataset("NUS-WIDE", flickr / paths[int(np.flatnonzero(keep)[0])],
                              f"none of the {n_missing:,} listed {split} images is under Flickr/; expected "
                              "Flickr/<concept folder>/<file>.jpg as in the image list", key="nuswide")
    if missing == "error" and n_missing:
        first = paths[int(np.flatnonzero(keep & ~exists)[0])]
        raise missing_dataset("NUS-WIDE", flickr / first, "missing", key="nuswide")
    if n_missing:
        warnings.warn(f"NUS-WIDE {split}: {n_missing:,} of {int(keep.sum()):,} listed images are missing under "
                      f"{flickr} and left out", stacklevel=2)
    keep &= exists
    idx = np.flatnonzero(keep)
    ds = ImageListDataset([flickr / paths[i] for i in idx], labels[idx], transform=transform, name="nuswide",
                          class_names=concepts, ids=[paths[i] for i in idx])
    ds.n_missing = n_missing  # type: ignore[attr-defined]
    return ds
