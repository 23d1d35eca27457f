"""PASCAL VOC 2007 / 2012 classification labels and datasets.

Expected layout (the official tarballs extracted under the data root)::

    <root>/VOCdevkit/VOC2007/Annotations/000005.xml
    <root>/VOCdevkit/VOC2007/ImageSets/Main/trainval.txt
    <root>/VOCdevkit/VOC2007/JPEGImages/000005.jpg

Labels follow the VOC classification ground truth: ``1`` when the image has at least one
non-difficult object of the class, ``0`` when it only has difficult ones, ``-1`` otherwise.
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlic_lib.utils import atomic_open

from .errors import DatasetNotFoundError, missing_dataset, repair_hint
from .images import ImageListDataset
from .paths import data_root

__all__ = [
    "VOC_CLASSES",
    "VOC_YEARS",
    "read_voc_csv",
    "read_voc_labels",
    "voc_dataset",
    "voc_dir",
    "write_voc_csv",
]

#: The 20 VOC classes in the standard (devkit) order.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
VOC_YEARS: tuple[str, ...] = ("2007", "2012")
_DIFFICULT_POLICIES = ("ignore", "negative", "positive")
_CLASS_INDEX = {c: i for i, c in enumerate(VOC_CLASSES)}


def _check_year(year: str | int) -> str:
    y = str(year)
    if y not in VOC_YEARS:
        raise ValueError(f"VOC year must be one of {VOC_YEARS}, got {year!r}")
    return y


def voc_dir(root: str | os.PathLike | None, year: str | int) -> Path:
    """Return ``<root>/VOCdevkit/VOC<year>`` (``root`` defaults to :func:`data_root`)."""
    base = Path(root).expanduser() if root is not None else data_root()
    return base / "VOCdevkit" / f"VOC{_check_year(year)}"


def _require(path: Path, year: str, is_dir: bool) -> None:
    if is_dir and not path.is_dir():
        raise missing_dataset(f"VOC{year}", path, "not a directory" if path.exists() else "missing")
    if not is_dir and not path.is_file():
        raise missing_dataset(f"VOC{year}", path, "missing")


def _read_split(voc: Path, year: str, split: str) -> list[str]:
    split_file = voc / "ImageSets" / "Main" / f"{split}.txt"
    _require(voc, year, is_dir=True)
    if not split_file.is_file() and split_file.parent.is_dir():
        # the devkit is there: name the splits it has (a misspelt split, or an incomplete dataset)
        known = sorted(f.stem for f in split_file.parent.glob("*.txt") if "_" not in f.stem)
        if known:
            raise DatasetNotFoundError(
                f"VOC{year} has no split {split!r} ({split_file} is missing); the splits present are "
                f"{', '.join(known)}. Check the split name. If the file was deleted: {repair_hint(f'voc{year}', True)}",
                path=split_file)
    _require(split_file, year, is_dir=False)
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{split_file} lists no image: the split file is empty or was cut short. "
                         + repair_hint(f"voc{year}", True))
    return ids


def _parse_annotation(xml_path: Path, out: np.ndarray) -> None:
    """Fill one label row ``out`` (initialised to -1) from a VOC XML annotation."""
    tree = ET.parse(xml_path)
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        idx = _CLASS_INDEX.get(name)
        if idx is None:
            raise ValueError(f"{xml_path}: unknown VOC class name {name!r} (expected one of VOC_CLASSES)")
        difficult = (obj.findtext("difficult") or "0").strip() not in ("", "0")
        if not difficult:
            out[idx] = 1
        elif out[idx] != 1:
            out[idx] = 0


def read_voc_labels(
    root: str | os.PathLike | None, year: str | int = "2007", split: str = "trainval"
) -> tuple[list[str], np.ndarray]:
    """Read image ids and classification labels of a VOC split from the XML annotations.

    Parameters
    ----------
    root : str or os.PathLike or None
        Data root holding ``VOCdevkit``; ``None`` uses :func:`~mlic_lib.data.paths.data_root`.
    year : {"2007", "2012"}
    split : str, default "trainval"
        Name of a file in ``ImageSets/Main`` (``train``, ``val``, ``trainval``, ``test``).

    Returns
    -------
    ids : list of str
        Image ids as in the split file (zero-padded strings such as ``"000005"``).
    labels : numpy.ndarray of int8, shape (N, 20)
        ``1`` present, ``0`` difficult-only, ``-1`` absent, columns in :data:`VOC_CLASSES` order.

    Raises
    ------
    DatasetNotFoundError
        If the VOC folder, the split file or an annotation file is missing.
    ValueError
        If an annotation names a class outside :data:`VOC_CLASSES`.
    """
    year = _check_year(year)
    voc = voc_dir(root, year)
    ids = _read_split(voc, year, split)
    ann_dir = voc / "Annotations"
    _require(ann_dir, year, is_dir=True)
    labels = np.full((len(ids), len(VOC_CLASSES)), -1, dtype=np.int8)
    for row, image_id in enumerate(ids):
        xml_path = ann_dir / f"{image_id}.xml"
        try:
            _parse_annotation(xml_path, labels[row])
        except FileNotFoundError as exc:
            raise missing_dataset(f"VOC{year}", xml_path, "missing annotation") from exc
        except ET.ParseError as exc:
            raise ValueError(f"{xml_path}: malformed XML annotation ({exc}). "
                             f"{repair_hint(f'voc{year}', damaged=True, root=root)}") from exc
    return ids, labels


def read_voc_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a VOC classification CSV (``name,aeroplane,...,tvmonitor`` header).

    Parameters
    ----------
    path : str or os.PathLike
        CSV whose rows are an image id followed by 20 values in ``{1, 0, -1}``.

    Returns
    -------
    ids : list of str
        Image ids, kept as strings (leading zeros preserved).
    labels : numpy.ndarray of int8, shape (N, 20)

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the header is not ``name`` + :data:`VOC_CLASSES`, a row has the wrong number of
        fields, or a value is not one of ``1, 0, -1``.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: drop a byte-order mark (Excel's CSVs)
        reader = csv.reader(fh)
        header = next(reader, None)
        expected = ["name", *VOC_CLASSES]
        if header is None or [h.strip() for h in header] != expected:
            raise ValueError(f"{path}: bad VOC CSV header {header!r}; expected {','.join(expected)!r}")
        ids: list[str] = []
        rows: list[list[str]] = []
        for lineno, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(expected):
                raise ValueError(f"{path}:{lineno}: expected {len(expected)} fields, got {len(row)}")
            ids.append(row[0].strip())
            rows.append(row[1:])
    if not rows:
        return ids, np.empty((0, len(VOC_CLASSES)), dtype=np.int8)
    raw = np.char.strip(np.asarray(rows, dtype=str))
    valid = np.isin(raw, ["1", "0", "-1"])
    if not valid.all():
        r, c = np.argwhere(~valid)[0]
        raise ValueError(
            f"{path}:{r + 2}: value {raw[r, c]!r} for class {VOC_CLASSES[c]!r} is not one of 1, 0, -1"
        )
    return ids, (raw == "1").astype(np.int8) - (raw == "-1").astype(np.int8)


def write_voc_csv(path: str | os.PathLike, ids: Sequence[str], labels: Any) -> None:
    """Write ids and ``(N, 20)`` labels in the format read by :func:`read_voc_csv` (atomically: an interrupted write
    leaves the previous file, never half a table)."""
    lab = np.asarray(labels)
    if lab.shape != (len(ids), len(VOC_CLASSES)):
        raise ValueError(f"labels must have shape ({len(ids)}, {len(VOC_CLASSES)}), got {lab.shape}")
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["name", *VOC_CLASSES])
        for image_id, row in zip(ids, lab.astype(int).tolist(), strict=True):
            writer.writerow([str(image_id), *row])


def voc_dataset(
    root: str | os.PathLike | None = None,
    year: str | int = "2007",
    split: str = "trainval",
    transform: Callable[[Any], Any] | None = None,
    difficult: str = "ignore",
    *,
    labels_csv: str | os.PathLike | None = None,
) -> ImageListDataset:
    """PASCAL VOC classification dataset over ``JPEGImages``.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data root holding ``VOCdevkit``; defaults to :func:`~mlic_lib.data.paths.data_root`.
    year : {"2007", "2012"}
    split : str, default "trainval"
    transform : callable, optional
        Applied to each RGB PIL image (see :func:`~mlic_lib.data.images.default_transform`).
    difficult : {"ignore", "negative", "positive"}, default "ignore"
        How difficult-only labels (``0``) become targets. ``"ignore"``: target 0 with mask
        ``False`` (items are ``(image, target, mask)``; the evaluation convention).
        ``"negative"``: target 0, no mask (the training convention of e.g. SpliceMix).
        ``"positive"``: target 1, no mask.
    labels_csv : str or os.PathLike, optional
        Take ids and labels from a classification CSV (see :func:`read_voc_csv`) instead of the
        split file and XML annotations; images still come from ``JPEGImages``.

    Returns
    -------
    ImageListDataset
        With ``class_names = list(VOC_CLASSES)``, ``ids`` the image ids and ``name="voc<year>"``.

    Raises
    ------
    DatasetNotFoundError
        If the VOC folder, split file or ``JPEGImages`` is missing (message names
        ``mlic data prepare voc<year>``).
    ValueError
        For an unknown ``year`` or ``difficult`` policy.
    """
    if difficult not in _DIFFICULT_POLICIES:
        raise ValueError(f"difficult must be one of {_DIFFICULT_POLICIES}, got {difficult!r}")
    year = _check_year(year)
    voc = voc_dir(root, year)
    if labels_csv is not None:
        _require(voc, year, is_dir=True)
        ids, labels = read_voc_csv(labels_csv)
    else:
        ids, labels = read_voc_labels(root, year, split)
    img_dir = voc / "JPEGImages"
    _require(img_dir, year, is_dir=True)
    targets = labels == 1 if difficult != "positive" else labels >= 0
    mask = labels != 0 if difficult == "ignore" else None
    return ImageListDataset(
        [img_dir / f"{i}.jpg" for i in ids],
        targets,
        mask=mask,
        transform=transform,
        name=f"voc{year}",
        class_names=list(VOC_CLASSES),
        ids=ids,
    )
