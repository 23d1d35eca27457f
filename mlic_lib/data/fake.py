"""Small datasets written in the exact on-disk layout of the real ones, so that a ``full`` pipeline can
be run end to end without the downloads (tests, CI, a dry run before renting a GPU).

``mlic data fake NAME --data-dir DIR`` calls :func:`write_fake`. The images are synthetic: each object is a
rectangle in its class's colour on a noisy background at the annotated box, so a model can learn
something, but no number obtained on them says anything about the papers. Layouts written:

* ``voc2007`` / ``voc2012``: ``VOCdevkit/VOC<year>/{JPEGImages,Annotations,ImageSets/Main}`` with the 20
  VOC classes (some objects marked ``difficult``);
* ``coco2014`` / ``coco2017``: ``coco/annotations/instances_{train,val}<year>.json`` and the image
  folders, with ``n_classes`` categories of non-contiguous ids;
* ``voc_lt`` / ``coco_lt``: the base images above plus ``<name>/{img_id.txt,class_freq.pkl,class_split.pkl}``
  in the DistributionBalancedLoss format, drawn with a long tail;
* ``nuswide``: ``nuswide/{Concepts81.txt,ImageList,Groundtruth/TrainTestLabels,Flickr}`` with ``n_classes``
  concepts, Windows-style list paths, one listed image missing and some images without labels;
* ``mnist``: ``mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` from the embedded (real) digits;
* ``cifar10``: ``cifar10/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .voc import VOC_CLASSES

__all__ = ["FAKE_DATASETS", "write_fake"]

FAKE_STAMP = "MLIC_FAKE_DATA.txt"  # the datasets `mlic data fake` wrote into a folder, one per line
FAKE_DATASETS = ("voc2007", "voc2012", "coco2014", "coco2017", "voc_lt", "coco_lt", "nuswide", "mnist", "cifar10")


def _palette(n: int) -> np.ndarray:
    return np.random.default_rng(12345).integers(30, 226, size=(n, 3))


def _draw(rng: np.random.Generator, path: Path, objects: Sequence[tuple[int, tuple[int, int, int, int]]],
          size: tuple[int, int], palette: np.ndarray) -> None:
    w, h = size
    img = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8) + 100
    for c, (x0, y0, x1, y1) in objects:
        img[y0:y1, x0:x1] = palette[c]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="JPEG", quality=90)


def _objects(rng: np.random.Generator, n_classes: int, size: tuple[int, int], weights: np.ndarray | None,
             max_objects: int = 3) -> list[tuple[int, tuple[int, int, int, int]]]:
    w, h = size
    k = int(rng.integers(1, max_objects + 1))
    p = None if weights is None else weights / weights.sum()
    classes = rng.choice(n_classes, size=min(k, n_classes), replace=False, p=p)
    out = []
    for c in classes:
        bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        out.append((int(c), (x0, y0, x0 + bw, y0 + bh)))
    return out


def _size(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    return int(image_size * rng.uniform(0.8, 1.25)), image_size


def _voc_xml(objects, size, difficult: Sequence[bool]) -> str:
    parts = [f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for (c, (x0, y0, x1, y1)), d in zip(objects, difficult, strict=True):
        parts.append(f"<object><name>{VOC_CLASSES[c]}</name><difficult>{int(d)}</difficult><bndbox>"
                     f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>")
        if VOC_CLASSES[c] == "person":  # as in the real layout: body parts, whose <name> is not a class
            parts.append(f"<part><name>head</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
                         f"<xmax>{(x0 + x1) // 2}</xmax><ymax>{(y0 + y1) // 2}</ymax></bndbox></part>")
        parts.append("</object>")
    return "".join(parts) + "</annotation>"


def _tail_weights(n: int, exponent: float) -> np.ndarray:
    return 1.0 / np.arange(1, n + 1) ** exponent


def write_voc(root: Path, year: str, splits: dict[str, int], image_size: int = 64, seed: int = 0,
              tail: float = 0.0) -> dict[str, list[str]]:
    """VOC ``year`` with ``splits`` (e.g. ``{"trainval": 40, "test": 30}``); returns the ids per split."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / f"VOC{year}"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    pal, weights = _palette(len(VOC_CLASSES)), (_tail_weights(len(VOC_CLASSES), tail) if tail else None)
    ids: dict[str, list[str]] = {}
    k = 0
    for split, n in splits.items():
        ids[split] = []
        for _ in range(n):
            image_id = f"{year}_{k:06d}" if year == "2012" else f"{k:06d}"
            k += 1
            size = _size(rng, image_size)
            objs = _objects(rng, len(VOC_CLASSES), size, weights)
            diff = [bool(rng.random() < 0.1) and j > 0 for j in range(len(objs))]
            (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(objs, size, diff))
            _draw(rng, voc / "JPEGImages" / f"{image_id}.jpg", objs, size, pal)
            ids[split].append(image_id)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids[split]) + "\n")
    return ids


def write_coco(root: Path, year: str, splits: dict[str, int], n_classes: int = 12, image_size: int = 64,
               seed: int = 0, tail: float = 0.0) -> dict[str, list[int]]:
    """COCO ``year`` with ``splits`` (``{"train": n, "val": m}``) and ``n_classes`` categories; every fifth image
    also has a crowd annotation (``iscrowd: 1``, an RLE mask) of a class it does not draw."""
    rng = np.random.default_rng(seed + 1)
    base = root / "coco"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    cat_ids = [3 * i + 1 for i in range(n_classes)]  # non-contiguous, as COCO's
    names = [f"category{(7 * i) % n_classes:02d}" for i in range(n_classes)]  # name order != id order
    categories = [{"id": c, "name": n, "supercategory": f"super{i % 3}"} for i, (c, n) in
                  enumerate(zip(cat_ids, names, strict=True))]
    pal, weights = _palette(n_classes), (_tail_weights(n_classes, tail) if tail else None)
    out: dict[str, list[int]] = {}
    image_id, ann_id = 1, 1
    for split, n in splits.items():
        images, anns, out[split] = [], [], []
        for _ in range(n):
            size = _size(rng, image_size)
            objs = _objects(rng, n_classes, size, weights)
            fname = f"{image_id:012d}.jpg" if year == "2017" else f"COCO_{split}{year}_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": fname, "width": size[0], "height": size[1]})
            for c, (x0, y0, x1, y1) in objs:
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat_ids[c], "iscrowd": 0,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0))})
                ann_id += 1
            free = sorted(set(range(n_classes)) - {c for c, _ in objs})
            if image_id % 5 == 0 and free:  # a crowd annotation (an RLE mask, as in real COCO) of a class that has
                c, (x0, y0, x1, y1) = free[image_id % len(free)], objs[0][1]  # no other annotation on the image
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat_ids[c], "iscrowd": 1,
                             "segmentation": {"counts": [0, size[0] * size[1]], "size": [size[1], size[0]]},
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0))})
                ann_id += 1
            _draw(rng, base / f"{split}{year}" / fname, objs, size, pal)
            out[split].append(image_id)
            image_id += 1
        payload = {"images": images, "annotations": anns, "categories": categories}
        (base / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(payload))
    return out


def _write_lt_split(folder: Path, ids: Sequence, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    counts = labels.sum(0).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))
    n = len(order)
    head, middle = order[: max(1, n * 3 // 10)], order[max(1, n * 3 // 10): max(2, n * 6 // 10)]
    tail = order[max(2, n * 6 // 10):]
    (folder / "img_id.txt").write_text("\n".join(str(i) for i in ids) + "\n")
    freq = {"gt_labels": [row.astype(np.int64) for row in labels], "class_freq": counts,
            "neg_class_freq": len(ids) - counts}
    (folder / "class_freq.pkl").write_bytes(pickle.dumps(freq))
    split = {"head": set(map(int, head)), "middle": set(map(int, middle)), "tail": set(map(int, tail))}
    (folder / "class_split.pkl").write_bytes(pickle.dumps(split))


def write_nuswide(root: Path, n_train: int, n_test: int, n_classes: int = 10, image_size: int = 64,
                  seed: int = 0) -> None:
    """NUS-WIDE's official list/label layout with ``Flickr/`` images (the last training image is listed but
    absent, and about one image in ten has no label). ``Concepts81.txt`` and the label files cover the 81
    official concepts; the images show objects of the first ``n_classes`` of them only."""
    from .nuswide import NUSWIDE_CONCEPTS

    rng = np.random.default_rng(seed + 3)
    base = root / "nuswide"
    concepts = list(NUSWIDE_CONCEPTS)
    (base / "ImageList").mkdir(parents=True, exist_ok=True)
    (base / "Groundtruth" / "TrainTestLabels").mkdir(parents=True, exist_ok=True)
    (base / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    pal = _palette(n_classes)
    k = 0
    for split, n in (("Train", n_train), ("Test", n_test)):
        lines, labels = [], np.zeros((n, len(concepts)), dtype=np.uint8)
        for i in range(n):
            rel = f"folder{k % 4}/{k:04d}_{1000 + k}.jpg"
            k += 1
            lines.append("C:\\ImageData\\Flickr\\" + rel.replace("/", "\\"))
            size = _size(rng, image_size)
            objs = [] if rng.random() < 0.1 else _objects(rng, n_classes, size, None)
            for c, _ in objs:
                labels[i, c] = 1
            if not (split == "Train" and i == n - 1):  # one listed image is missing, as in real copies
                _draw(rng, base / "Flickr" / rel, objs, size, pal)
        (base / "ImageList" / f"{split}Imagelist.txt").write_text("\r\n".join(lines) + "\r\n")
        for j, c in enumerate(concepts):
            (base / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_{split}.txt").write_text(
                "".join(f"{v} \n" for v in labels[:, j]))


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    body = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(body)
    else:
        path.write_bytes(body)


def write_mnist(root: Path, n_train: int = 2000, n_test: int = 500) -> None:
    """IDX files from the embedded MNIST digits (train digits -> train files, test digits -> t10k)."""
    from .digits import digit_pool

    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = digit_pool(split)  # sorted by class: take a seeded sample of every class
        idx = np.random.default_rng(0).permutation(len(labels))[:n]
        # gzipped, as the official files (`mlic data check` looks for them)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[idx].reshape(-1, 28, 28))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[idx].astype(np.uint8))


def write_cifar10(root: Path, n_train: int = 500, n_test: int = 200, seed: int = 0) -> None:
    """CIFAR-10 binary batches: class-coloured squares on noise (``n_train`` split over 5 batches)."""
    rng = np.random.default_rng(seed + 2)
    folder = root / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    pal = _palette(10)

    def records(n: int) -> bytes:
        labels = np.arange(n) % 10
        imgs = rng.integers(0, 80, size=(n, 3, 32, 32)).astype(np.uint8)
        for i, c in enumerate(labels):
            x0, y0 = rng.integers(0, 16, size=2)
            imgs[i, :, y0:y0 + 16, x0:x0 + 16] = pal[c][:, None, None]
        return np.concatenate([labels[:, None].astype(np.uint8), imgs.reshape(n, -1)], axis=1).tobytes()

    per = max(10, n_train // 5)
    for b in range(1, 6):
        (folder / f"data_batch_{b}.bin").write_bytes(records(per))
    (folder / "test_batch.bin").write_bytes(records(max(10, n_test)))


def write_fake(name: str, root: str | Path, n_train: int = 60, n_test: int = 40, image_size: int = 64,
               seed: int = 0, force: bool = False) -> Path:
    """Write dataset ``name`` (see :data:`FAKE_DATASETS`) under ``root``; returns ``root``.

    Existing files of the same layout are overwritten, so ``root`` must not be the real data root
    (``$MLIC_DATA``) unless ``force=True``.

    Raises
    ------
    ValueError
        For an unknown name, sizes below the minimum, or ``root`` equal to the real data root.
    """
    from .paths import data_root

    root = Path(root).expanduser()
    if name not in FAKE_DATASETS:
        raise ValueError(f"unknown fake dataset {name!r}; choose one of {FAKE_DATASETS}")
    if n_train < 10 or n_test < 10 or image_size < 16:
        raise ValueError(f"need n_train >= 10, n_test >= 10 and image_size >= 16 (got {n_train}, {n_test}, "
                         f"{image_size})")
    if not force and root.resolve() == data_root().resolve():
        raise ValueError(f"{root} is the real data root ($MLIC_DATA): fake files would overwrite real ones; "
                         "write them to another folder (or pass --force, force=True in Python)")
    if name == "voc2007":
        write_voc(root, "2007", {"trainval": n_train, "test": n_test}, image_size, seed)
    elif name == "voc2012":
        write_voc(root, "2012", {"trainval": n_train}, image_size, seed)
    elif name in ("coco2014", "coco2017"):
        write_coco(root, name[-4:], {"train": n_train, "val": n_test}, image_size=image_size, seed=seed)
    elif name == "voc_lt":
        ids = write_voc(root, "2012", {"trainval": n_train}, image_size, seed, tail=1.5)["trainval"]
        # VOC-LT tests on VOC2007 test; a VOC2007 without trainval is "incomplete" to `mlic data check`, which
        # then failed `mlic data check voc_lt` on this very folder: a small trainval after the test images
        splits07 = {"test": n_test}
        if not (root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").is_file():
            splits07["trainval"] = n_test
        write_voc(root, "2007", splits07, image_size, seed + 7)
        from .voc import read_voc_labels

        all_ids, labels = read_voc_labels(root, "2012", "trainval")  # difficult-only counts as present
        _write_lt_split(root / "voc_lt", ids, (labels[[all_ids.index(i) for i in ids]] >= 0).astype(np.uint8))
    elif name == "coco_lt":
        ids = write_coco(root, "2017", {"train": n_train, "val": n_test}, image_size=image_size, seed=seed,
                         tail=1.5)["train"]
        from .coco import read_coco_labels

        all_ids, _, labels, _ = read_coco_labels(root / "coco" / "annotations" / "instances_train2017.json")
        row = {i: r for r, i in enumerate(all_ids)}
        _write_lt_split(root / "coco_lt", ids, labels[[row[i] for i in ids]])
    elif name == "nuswide":
        write_nuswide(root, n_train, n_test, image_size=image_size, seed=seed)
    elif name == "mnist":
        write_mnist(root, n_train, n_test)
    else:
        write_cifar10(root, n_train, n_test, seed)
    written = {name, *{"voc_lt": ("voc2012", "voc2007"), "coco_lt": ("coco2017",)}.get(name, ())}
    # each name with the command that wrote it, so a repair hint can repeat it with the same sizes
    command = f"{name} --n-train {n_train} --n-test {n_test} --image-size {image_size}"
    _write_fake_commands(root, {**fake_commands(root), **dict.fromkeys(written, command)})
    return root


def fake_commands(root: Path) -> dict[str, str]:
    """The datasets whose files under ``root`` :func:`write_fake` wrote, each with the arguments of the ``mlic data
    fake`` command that wrote them (``""`` in a stamp from older code, which kept names only)."""
    stamp = Path(root) / FAKE_STAMP
    if not stamp.is_file():
        return {}
    lines = (line.split("\t", 1) for line in stamp.read_text().splitlines() if line.strip())
    return {p[0].strip(): (p[1].strip() if len(p) > 1 else "") for p in lines}


def fake_names(root: Path) -> set[str]:
    """The datasets whose files under ``root`` :func:`write_fake` wrote (``mlic data check`` reports them as
    synthetic); ``mlic data prepare`` of real data removes its name."""
    return set(fake_commands(root))


def _write_fake_commands(root: Path, commands: dict[str, str]) -> None:
    stamp = Path(root) / FAKE_STAMP
    if commands:
        stamp.write_text("".join(f"{k}\t{v}\n" if v else f"{k}\n" for k, v in sorted(commands.items())))
    else:
        stamp.unlink(missing_ok=True)


def forget_fake(root: Path, name: str) -> None:
    """Real files of ``name`` replaced the synthetic ones under ``root``."""
    commands = fake_commands(root)
    if commands.pop(name, None) is not None:
        _write_fake_commands(root, commands)
