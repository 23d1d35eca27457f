"""Long-tailed multi-label data: VOC-LT / COCO-LT split files, and long-tailed embedded scenes.

VOC-LT and COCO-LT (Wu et al., ECCV 2020; used by LTML, Guo & Wang, CVPR 2021, Sec. 4.1) are defined by the
DistributionBalancedLoss ``appendix`` files, one folder per dataset::

    img_id.txt       one training image id per line (VOC2012 ids such as 2008_000023; COCO-2017 ids)
    class_freq.pkl   dict: gt_labels (N lists/arrays of K 0/1), class_freq (K,), neg_class_freq (K,),
                     condition_prob (K, K)
    class_split.pkl  dict: head / middle / tail -> sets of class indices

``class_freq.pkl`` and ``class_split.pkl`` are Python pickles. Unpickling runs code chosen by whoever
wrote the file, so :func:`read_lt_split` must only be given these trusted reference files (the
DistributionBalancedLoss release, or the copies under the project's shared data folder).

Training labels are read from the original annotations (VOC2012 XML, COCO-2017 ``instances_train2017``
JSON) for the listed ids and can be checked against ``gt_labels`` (:func:`check_labels`). The test sets
are the VOC2007 test set (4,952 images) and COCO-2017 val (5,000 images), read with the foundation's
loaders. Head / medium / tail: >= 100, 20..99 and < 20 training images per class (6/6/8 classes on
VOC-LT, 22/33/25 on COCO-LT).

For the embedded data, :func:`longtail_scene_spec` and :func:`scene_groups` make a long-tailed version of
the scenes with head/medium/tail groups whose thresholds scale VOC-LT's (100 and 20 images out of 1,142)
to the number of training scenes.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlic_lib.data import stats

__all__ = [
    "GROUP_NAMES",
    "LTSplit",
    "check_labels",
    "coco_lt_labels",
    "head_to_tail_order",
    "longtail_scene_spec",
    "read_lt_split",
    "scene_groups",
    "scaled_thresholds",
    "voc_lt_labels",
]

GROUP_NAMES = ("head", "medium", "tail")
#: VOC-LT: 1,142 training images; the split files put classes with >= 100 images in head and < 20 in tail
#: (the paper's Sec. 4.1 says "more than 100"; the files include the class with exactly 100).
VOC_LT_REFERENCE = {"n_train": 1142, "head_min": 100, "tail_max": 19}


@dataclass
class LTSplit:
    """One long-tailed split file set (VOC-LT or COCO-LT)."""

    name: str
    image_ids: list[str]
    gt_labels: np.ndarray  # (N, K) uint8
    class_freq: np.ndarray  # (K,) positives per class
    neg_class_freq: np.ndarray  # (K,) negatives per class
    condition_prob: np.ndarray  # (K, K)
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # head / medium / tail class indices

    @property
    def num_classes(self) -> int:
        return self.gt_labels.shape[1]

    def __len__(self) -> int:
        return len(self.image_ids)


def _load_pickle(path: Path) -> Any:
    # Trusted reference files only (see the module docstring): pickle can execute arbitrary code.
    with path.open("rb") as fh:
        return pickle.load(fh)  # noqa: S301


def read_lt_split(folder: str | os.PathLike, name: str | None = None) -> LTSplit:
    """Read ``img_id.txt``, ``class_freq.pkl`` and ``class_split.pkl`` from ``folder``.

    Raises ``FileNotFoundError`` naming a missing file and ``ValueError`` when the files disagree (number
    of ids vs labels, class counts vs ``class_freq``, groups that do not partition the classes).
    """
    folder = Path(folder).expanduser()
    files = {f: folder / f for f in ("img_id.txt", "class_freq.pkl", "class_split.pkl")}
    for p in files.values():
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} is missing: a long-tailed split folder needs img_id.txt, class_freq.pkl and class_split.pkl "
                "(the DistributionBalancedLoss appendix files)")
    ids = [line.strip() for line in files["img_id.txt"].read_text().splitlines() if line.strip()]
    freq = _load_pickle(files["class_freq.pkl"])
    split = _load_pickle(files["class_split.pkl"])
    if not isinstance(freq, Mapping) or "gt_labels" not in freq or "class_freq" not in freq:
        raise ValueError(f"{files['class_freq.pkl']}: expected a dict with gt_labels and class_freq")
    labels = np.asarray([np.asarray(r) for r in freq["gt_labels"]], dtype=np.uint8)
    if labels.ndim != 2 or len(labels) != len(ids):
        raise ValueError(f"{folder}: {len(ids)} image ids but gt_labels has shape {labels.shape}")
    class_freq = np.asarray(freq["class_freq"], dtype=np.int64)
    if not np.array_equal(labels.sum(0), class_freq):
        raise ValueError(f"{folder}: class_freq does not equal the column sums of gt_labels")
    neg = np.asarray(freq.get("neg_class_freq", len(ids) - class_freq), dtype=np.int64)
    cond = np.asarray(freq["condition_prob"] if "condition_prob" in freq
                      else stats.conditional_probability(stats.cooccurrence(labels)), dtype=np.float64)
    groups: dict[str, np.ndarray] = {}
    for ours, theirs in (("head", "head"), ("medium", "middle"), ("tail", "tail")):
        members = split.get(theirs, split.get(ours)) if isinstance(split, Mapping) else None
        if members is None:
            raise ValueError(f"{files['class_split.pkl']}: no {theirs!r} group (expected head/middle/tail)")
        groups[ours] = np.array(sorted(int(c) for c in members), dtype=np.int64)
    allc = np.sort(np.concatenate(list(groups.values())))
    if not np.array_equal(allc, np.arange(labels.shape[1])):
        raise ValueError(f"{files['class_split.pkl']}: head/middle/tail do not partition the {labels.shape[1]} classes")
    return LTSplit(name or folder.name, ids, labels, class_freq, neg, cond, groups)


def check_labels(split: LTSplit, labels: np.ndarray) -> float:
    """Fraction of label entries that agree with ``split.gt_labels`` (1.0 = identical)."""
    labels = np.asarray(labels)
    if labels.shape != split.gt_labels.shape:
        raise ValueError(f"labels have shape {labels.shape}, the split's gt_labels {split.gt_labels.shape}")
    return float(((labels > 0) == (split.gt_labels > 0)).mean())


def voc_lt_labels(split: LTSplit, root: str | os.PathLike | None = None,
                  difficult_positive: bool = True) -> np.ndarray:
    """VOC-LT training labels ``(N, 20)`` from the VOC2012 XML annotations of ``split.image_ids``.

    ``difficult_positive``: count a class whose only objects are *difficult* as present (our reading of
    how the DistributionBalancedLoss annotations were built; :func:`check_labels` measures the agreement).
    """
    from mlic_lib.data.voc import read_voc_labels

    ids, labels = read_voc_labels(root, "2012", "trainval")
    row = {i: r for r, i in enumerate(ids)}
    missing = [i for i in split.image_ids if i not in row]
    if missing:
        raise ValueError(f"{len(missing)} VOC-LT ids (e.g. {missing[0]}) are not in VOC2012 trainval")
    sel = labels[[row[i] for i in split.image_ids]]
    return (sel >= 0 if difficult_positive else sel == 1).astype(np.uint8)


def coco_lt_labels(split: LTSplit, instances_json: str | os.PathLike) -> np.ndarray:
    """COCO-LT training labels ``(N, 80)`` (category-id order) from ``instances_train2017.json``.

    Annotations flagged ``ignore``, of zero area or with a box side below 1 pixel are left out, as in
    DistributionBalancedLoss's COCO loader, which produced the split's ``gt_labels``.
    """
    from mlic_lib.data.coco import read_coco_labels

    ids, _, labels, _ = read_coco_labels(instances_json, class_order="coco", skip_degenerate=True)
    row = {int(i): r for r, i in enumerate(ids)}
    missing = [i for i in split.image_ids if int(i) not in row]
    if missing:
        raise ValueError(f"{len(missing)} COCO-LT ids (e.g. {missing[0]}) are not in {instances_json}")
    return labels[[row[int(i)] for i in split.image_ids]]


# ------------------------------------------------------------------------------ embedded scenes
def longtail_scene_spec(exponent: float = 2.0, **overrides: Any):
    """A :class:`~mlic_lib.data.scenes.SceneSpec` whose class weights follow ``(rank + 1) ** -exponent``."""
    from mlic_lib.data.scenes import SceneSpec

    if exponent <= 0:
        raise ValueError(f"exponent must be positive for a long tail, got {exponent}")
    return SceneSpec(long_tail_exponent=exponent, **overrides)


def scaled_thresholds(n_train: int, reference: Mapping[str, int] = VOC_LT_REFERENCE) -> tuple[int, int]:
    """``(head_min, tail_max)`` for ``n_train`` images, scaling VOC-LT's 100 / 19 out of 1,142 images."""
    if n_train < 1:
        raise ValueError(f"n_train must be positive, got {n_train}")
    scale = n_train / reference["n_train"]
    head = max(3, round(reference["head_min"] * scale))
    tail = max(1, min(head - 1, round(reference["tail_max"] * scale)))
    return head, tail


def scene_groups(targets, head_min: int | None = None, tail_max: int | None = None) -> dict[str, np.ndarray]:
    """Head / medium / tail classes of a training label matrix (default thresholds: :func:`scaled_thresholds`).

    Raises ``ValueError`` if a group comes out empty (then choose other thresholds or another exponent).
    """
    counts = stats.class_counts(targets)
    h, t = scaled_thresholds(len(np.asarray(targets)))
    groups = stats.head_medium_tail(counts, h if head_min is None else head_min, t if tail_max is None else tail_max)
    empty = [g for g, m in groups.items() if len(m) == 0]
    if empty:
        raise ValueError(f"group(s) {empty} are empty for class counts {sorted(counts.tolist())}: "
                         "change head_min / tail_max or the long-tail exponent")
    return groups


def head_to_tail_order(counts) -> np.ndarray:
    """Class indices sorted by decreasing training count (ties by index): the x-axis of Figs. 3-5."""
    counts = np.asarray(counts)
    return np.lexsort((np.arange(len(counts)), -counts))


# ------------------------------------------------------------------------------ real data (full profile)
def lt_datasets(dataset: str, split_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                image_size: int = 224, *, train_transform=None, test_transform=None,
                difficult_eval: str = "positive"):
    """``(train_ds, train_targets, test_ds, split)`` for ``"voc_lt"`` or ``"coco_lt"`` (full profile).

    Train: the split's images (VOC2012 ``JPEGImages`` / COCO ``train2017``) with labels from the
    annotations; test: VOC2007 test / COCO-2017 val (category-id order), labelled as DistributionBalancedLoss
    labels them, whose evaluation the LTML paper reuses: on VOC every object counts, difficult or not
    (``difficult_eval="positive"``; ``"ignore"`` is the VOC AP convention of the other chapters), and on COCO
    ignored, zero-area and sub-pixel annotations are left out. ``split_dir``
    defaults to ``<data root>/<dataset>``. The transforms default to resize to ``image_size`` (+ random
    flip for training). Missing data raises ``DatasetNotFoundError`` (fetching the images is the job of
    ``mlic data prepare``). Tested on files in the real layout (``tests/test_real_pipeline.py``).
    """
    from mlic_lib.data.coco import coco_dataset
    from mlic_lib.data.errors import missing_dataset
    from mlic_lib.data.images import ImageListDataset, default_transform
    from mlic_lib.data.paths import data_root
    from mlic_lib.data.voc import VOC_CLASSES, voc_dataset, voc_dir

    if dataset not in ("voc_lt", "coco_lt"):
        raise ValueError(f"dataset must be 'voc_lt' or 'coco_lt', got {dataset!r}")
    base = Path(root).expanduser() if root is not None else data_root()
    folder = Path(split_dir).expanduser() if split_dir is not None else base / dataset
    if not (folder / "img_id.txt").is_file():
        raise missing_dataset(dataset.upper().replace("_", "-"), folder / "img_id.txt", key=dataset)
    split = read_lt_split(folder, dataset)
    train_tf = train_transform if train_transform is not None else default_transform(image_size, train=True)
    test_tf = test_transform if test_transform is not None else default_transform(image_size)
    if dataset == "voc_lt":
        labels = voc_lt_labels(split, base)
        img_dir = voc_dir(base, "2012") / "JPEGImages"
        train = ImageListDataset([img_dir / f"{i}.jpg" for i in split.image_ids], labels, transform=train_tf,
                                 name="voc_lt", source="voc2012", class_names=list(VOC_CLASSES), ids=split.image_ids)
        test = voc_dataset(base, "2007", "test", transform=test_tf, difficult=difficult_eval)
    else:
        ann = base / "coco" / "annotations" / "instances_train2017.json"
        if not ann.is_file():
            raise missing_dataset("COCO2017", ann, key="coco2017")
        labels = coco_lt_labels(split, ann)
        img_dir = base / "coco" / "train2017"
        test = coco_dataset(base, "2017", "val", transform=test_tf, class_order="coco", skip_degenerate=True)
        train = ImageListDataset([img_dir / f"{int(i):012d}.jpg" for i in split.image_ids], labels,
                                 transform=train_tf, name="coco_lt", source="coco2017", class_names=test.class_names,
                                 ids=split.image_ids)
    agree = check_labels(split, labels)
    if agree < 1.0:  # rho of LTML's weights comes from these labels; say when they are not DBL's gt_labels
        warnings.warn(f"{dataset}: the labels read from the annotations agree with the split file's gt_labels on "
                      f"{100 * agree:.3f}% of entries ({int(round((1 - agree) * labels.size))} differ); training "
                      "uses the annotation labels", stacklevel=2)
    return train, labels, test, split
