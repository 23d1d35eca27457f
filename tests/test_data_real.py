"""Tests of the real-dataset loaders (VOC, COCO) on tiny synthetic fixtures.

The shared reference label files (``../shared/data`` next to the repository) are used when
present and the corresponding tests are skipped otherwise. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlic_lib.data.coco import coco_dataset, read_coco_labels
from mlic_lib.data.errors import CorruptImageError, DatasetNotFoundError, missing_dataset
from mlic_lib.data.images import ImageListDataset, default_transform
from mlic_lib.data.paths import data_root, reference_data_dir
from mlic_lib.data.voc import VOC_CLASSES, read_voc_csv, read_voc_labels, voc_dataset, write_voc_csv

SHARED = reference_data_dir()  # $MLIC_REFERENCE_DATA, else <repo>/../shared/data

# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

# id -> list of (class name, difficult)
VOC_OBJECTS: dict[str, list[tuple[str, int]]] = {
    "000005": [("chair", 0), ("chair", 1)],  # non-difficult wins -> 1
    "000007": [("car", 0)],
    "000009": [("horse", 0), ("person", 0), ("person", 1), ("dog", 1)],  # dog difficult-only -> 0
    "000012": [("tvmonitor", 1)],  # only difficult -> 0, nothing positive
}


def _voc_xml(objects: list[tuple[str, int]]) -> str:
    parts = ["<annotation><folder>VOC2007</folder><size><width>8</width><height>6</height></size>"]
    for name, diff in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{diff}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
            f"<xmax>4</xmax><ymax>4</ymax></bndbox>"
            # a person's body parts and actions (VOC2012 layout): their <name>s are not classes
            + ("<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part>"
               "<actions><jumping>0</jumping></actions>" if name == "person" else "")
            + "</object>"
        )
    parts.append("</annotation>")
    return "".join(parts)


def _jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for k, (image_id, objects) in enumerate(VOC_OBJECTS.items()):
        (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(objects))
        _jpeg(voc / "JPEGImages" / f"{image_id}.jpg", (40 * k, 100, 200))
    ids = list(VOC_OBJECTS)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    (voc / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    return tmp_path


def _idx(name: str) -> int:
    return VOC_CLASSES.index(name)


COCO_CATEGORIES = [  # ids out of order, names not alphabetical by id
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    base = tmp_path / "coco"
    images = [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 8, "height": 6},
        {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "width": 8, "height": 6},
        {"id": 99, "file_name": "COCO_val2014_000000000099.jpg", "width": 8, "height": 6},  # empty
    ]
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 18, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 18, "iscrowd": 0},  # duplicate class
        {"id": 3, "image_id": 42, "category_id": 3, "iscrowd": 1},
        {"id": 4, "image_id": 7, "category_id": 3, "iscrowd": 0},
    ]
    (base / "annotations").mkdir(parents=True)
    payload = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
    (base / "annotations" / "instances_val2014.json").write_text(json.dumps(payload))
    for k, im in enumerate(images):
        _jpeg(base / "val2014" / im["file_name"], (0, 60 * k, 0))
    return tmp_path


# ---------------------------------------------------------------------------------------------
# errors / paths
# ---------------------------------------------------------------------------------------------


def test_missing_dataset_message(tmp_path: Path) -> None:
    err = missing_dataset("VOC2007", tmp_path / "VOCdevkit" / "VOC2007" / "Annotations")
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert msg.startswith("VOC2007 not found: expected ")
    assert "Annotations (missing)" in msg
    assert "`mlic data prepare voc2007`" in msg and "MLIC_DATA" in msg
    assert err.filename.endswith("Annotations") and err.path.name == "Annotations"
    assert "Errno" not in msg


def test_data_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLIC_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("MLIC_DATA")
    assert data_root() == Path("~/.cache/mlic/data").expanduser()
    monkeypatch.setenv("MLIC_DATA", "")  # an empty value is unset, not the working directory
    assert data_root() == Path("~/.cache/mlic/data").expanduser()


# ---------------------------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------------------------


def test_read_voc_labels(voc_root: Path) -> None:
    ids, labels = read_voc_labels(voc_root, "2007", "trainval")
    assert ids == list(VOC_OBJECTS)
    assert all(isinstance(i, str) for i in ids)
    assert labels.dtype == np.int8 and labels.shape == (4, 20)
    expected = np.full((4, 20), -1, dtype=np.int8)
    expected[0, _idx("chair")] = 1
    expected[1, _idx("car")] = 1
    expected[2, [_idx("horse"), _idx("person")]] = 1
    expected[2, _idx("dog")] = 0
    expected[3, _idx("tvmonitor")] = 0
    np.testing.assert_array_equal(labels, expected)
    ids_train, labels_train = read_voc_labels(voc_root, 2007, "train")
    assert ids_train == ids[:2]
    np.testing.assert_array_equal(labels_train, expected[:2])


def test_read_voc_labels_unknown_class(voc_root: Path) -> None:
    bad = voc_root / "VOCdevkit" / "VOC2007" / "Annotations" / "000007.xml"
    bad.write_text(_voc_xml([("unicorn", 0)]))
    with pytest.raises(ValueError, match=r"000007\.xml.*unicorn"):
        read_voc_labels(voc_root, "2007", "trainval")


def test_voc_csv_roundtrip(voc_root: Path, tmp_path: Path) -> None:
    ids, labels = read_voc_labels(voc_root, "2007", "trainval")
    path = tmp_path / "cls.csv"
    write_voc_csv(path, ids, labels)
    assert path.read_text().splitlines()[0] == "name," + ",".join(VOC_CLASSES)
    ids2, labels2 = read_voc_csv(path)
    assert ids2 == ids  # zero-padded strings survive
    assert labels2.dtype == np.int8
    np.testing.assert_array_equal(labels2, labels)


def test_voc_csv_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    header = ["name", *VOC_CLASSES]
    header[1], header[2] = header[2], header[1]
    path.write_text(",".join(header) + "\n000005" + ",-1" * 20 + "\n")
    with pytest.raises(ValueError, match="header"):
        read_voc_csv(path)


def test_voc_csv_with_a_byte_order_mark(voc_root: Path, tmp_path: Path) -> None:
    """Excel and other Windows tools save CSVs with a UTF-8 byte-order mark: it was refused as a "bad VOC CSV
    header" whose printed header looked right."""
    ids, labels = read_voc_labels(voc_root, "2007", "trainval")
    path = tmp_path / "cls.csv"
    write_voc_csv(path, ids, labels)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ids2, labels2 = read_voc_csv(path)
    assert ids2 == ids
    np.testing.assert_array_equal(labels2, labels)


def test_voc_csv_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("name," + ",".join(VOC_CLASSES) + "\n000005" + ",-1" * 19 + ",2\n")
    with pytest.raises(ValueError, match="tvmonitor"):
        read_voc_csv(path)
    path.write_text("name," + ",".join(VOC_CLASSES) + "\n000005" + ",-1" * 19 + "\n")
    with pytest.raises(ValueError, match="fields"):
        read_voc_csv(path)


def test_voc_dataset_items_and_policies(voc_root: Path) -> None:
    ds = voc_dataset(voc_root, "2007", "trainval", transform=default_transform(16, train=False))
    assert len(ds) == 4 and ds.num_classes == 20 and ds.class_names == list(VOC_CLASSES)
    assert ds.ids == list(VOC_OBJECTS)
    image, target, mask = ds[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert target.dtype == torch.float32 and mask.dtype == torch.bool
    assert target[_idx("person")] == 1 and target[_idx("horse")] == 1 and target.sum() == 2
    assert target[_idx("dog")] == 0 and not mask[_idx("dog")]
    assert mask.sum() == 19
    # difficult-only image: nothing positive, one masked entry
    _, target3, mask3 = ds[3]
    assert target3.sum() == 0 and not mask3[_idx("tvmonitor")]

    neg = voc_dataset(voc_root, "2007", "trainval", difficult="negative")
    item = neg[2]
    assert len(item) == 2 and neg.mask is None
    assert isinstance(item[0], Image.Image) and item[0].mode == "RGB"
    torch.testing.assert_close(neg.targets, ds.targets)

    pos = voc_dataset(voc_root, "2007", "trainval", difficult="positive")
    assert pos.mask is None
    assert pos.targets[2, _idx("dog")] == 1 and pos.targets[3, _idx("tvmonitor")] == 1
    assert pos.targets.sum() == ds.targets.sum() + 2

    with pytest.raises(ValueError, match="difficult"):
        voc_dataset(voc_root, difficult="maybe")


def test_voc_dataset_from_csv(voc_root: Path, tmp_path: Path) -> None:
    ids, labels = read_voc_labels(voc_root, "2007", "trainval")
    path = tmp_path / "cls.csv"
    write_voc_csv(path, ids[::-1], labels[::-1])
    ds = voc_dataset(voc_root, labels_csv=path, difficult="negative")
    assert ds.ids == ids[::-1]
    assert ds.paths[0].name == f"{ids[-1]}.jpg"
    np.testing.assert_array_equal(ds.targets.numpy(), (labels[::-1] == 1).astype(np.float32))


def test_voc_missing_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetNotFoundError, match="mlic data prepare voc2007"):
        voc_dataset(tmp_path / "nowhere", "2007")
    monkeypatch.setenv("MLIC_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as info:
        voc_dataset(year="2012")
    assert "mlic data prepare voc2012" in str(info.value) and "nowhere" in str(info.value)
    with pytest.raises(ValueError, match="year"):
        voc_dataset(tmp_path, year="2010")


def test_voc_missing_split_and_annotation(voc_root: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"val\.txt"):
        read_voc_labels(voc_root, "2007", "val")
    (voc_root / "VOCdevkit" / "VOC2007" / "Annotations" / "000009.xml").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"000009\.xml"):
        read_voc_labels(voc_root, "2007", "trainval")


def test_a_blank_difficult_tag_is_an_ordinary_object(tmp_path: Path) -> None:
    """A ``<difficult>`` tag left empty or holding only whitespace (pretty-printed by an annotation tool) counts as
    not difficult: a positive."""
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations" / "000001.xml").write_text(
        "<annotation><object><name>cat</name><difficult></difficult></object>"
        "<object><name>bird</name><difficult>\n    </difficult></object>"
        "<object><name>dog</name><difficult> 1 </difficult></object></annotation>")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("000001\n")
    _, labels = read_voc_labels(tmp_path, "2007", "val")
    assert labels[0, _idx("cat")] == 1 and labels[0, _idx("bird")] == 1 and labels[0, _idx("dog")] == 0


def test_write_voc_csv_refuses_labels_of_the_wrong_shape(tmp_path: Path) -> None:
    """A label matrix without 20 columns (or one row per id) is refused, and no unreadable CSV is written."""
    path = tmp_path / "cls.csv"
    with pytest.raises(ValueError, match=r"shape \(2, 20\)"):
        write_voc_csv(path, ["000001", "000002"], np.ones((2, 19), dtype=np.int8))
    with pytest.raises(ValueError, match=r"shape \(2, 20\)"):
        write_voc_csv(path, ["000001", "000002"], np.ones((3, 20), dtype=np.int8))
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# ImageListDataset
# ---------------------------------------------------------------------------------------------


def test_corrupt_image(voc_root: Path) -> None:
    ds = voc_dataset(voc_root, difficult="negative")
    bad = voc_root / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000007.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 4)
    with pytest.raises(CorruptImageError) as info:
        ds[1]
    assert str(bad) in str(info.value) and "mlic data prepare voc2007 --force" in str(info.value)
    assert info.value.path == bad
    ds[0]  # the others still load


def test_truncated_image(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    _jpeg(path, (1, 2, 3), size=(64, 64))
    path.write_bytes(path.read_bytes()[:200])
    ds = ImageListDataset([path], np.zeros((1, 2)), name="voc2007")
    with pytest.raises(CorruptImageError, match="mlic data prepare voc2007 --force"):
        ds[0]


def test_image_errors_name_the_dataset_that_holds_the_files(tmp_path: Path) -> None:
    """VOC-LT's training images are VOC 2012's: the repair hint names ``voc2012``, not ``voc_lt`` (whose
    `prepare` only copies split files); NUS-WIDE's images cannot be downloaded, so its hint says so."""
    ds = ImageListDataset([tmp_path / "2012_000001.jpg"], np.ones((1, 2)), name="voc_lt", source="voc2012")
    with pytest.raises(DatasetNotFoundError, match="mlic data prepare voc2012 --force") as info:
        ds[0]
    assert "voc_lt" not in str(info.value)
    nus = ImageListDataset([tmp_path / "gone.jpg"], np.ones((1, 2)), name="nuswide")
    with pytest.raises(DatasetNotFoundError, match="not redistributed by their authors") as info:
        nus[0]
    assert "mlic data prepare" not in str(info.value)


def test_missing_files_of_a_prepared_dataset_point_to_force(voc_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain `prepare` skips a prepared dataset, so once its marker exists the hint must be `--force`."""
    monkeypatch.setenv("MLIC_DATA", str(voc_root))
    shutil.rmtree(voc_root / "VOCdevkit" / "VOC2007" / "Annotations")
    with pytest.raises(DatasetNotFoundError, match="Fetch it with `mlic data prepare voc2007`"):
        read_voc_labels(voc_root, "2007", "trainval")  # no marker (test.txt): never prepared here
    (voc_root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    with pytest.raises(DatasetNotFoundError, match="mlic data prepare voc2007 --force"):
        read_voc_labels(voc_root, "2007", "trainval")


def test_a_malformed_annotation_names_the_fix_and_a_fake_root_its_own(voc_root: Path, tmp_path: Path) -> None:
    """A truncated annotation named the file but no fix; on `mlic data fake`'s files the fix is to write them again
    (not to download the real dataset)."""
    from mlic_lib.data.fake import write_fake

    ann = sorted((voc_root / "VOCdevkit" / "VOC2007" / "Annotations").glob("*.xml"))[0]
    ann.write_text(ann.read_text()[:40])
    with pytest.raises(ValueError, match=r"malformed XML annotation .*mlic data prepare voc2007 --force"):
        read_voc_labels(voc_root, "2007", "trainval")
    fake = tmp_path / "fake"
    write_fake("voc2007", fake, n_train=10, n_test=10)
    ann = sorted((fake / "VOCdevkit" / "VOC2007" / "Annotations").glob("*.xml"))[0]
    ann.write_text(ann.read_text()[:40])
    # the command repeats the sizes the files were written with, so the rewrite matches the rest of the folder
    with pytest.raises(ValueError, match=rf"synthetic files .*mlic data fake voc2007 --n-train 10 --n-test 10 "
                                         rf"--image-size 64 --data-dir {fake} --force"):
        for split in ("trainval", "test"):
            read_voc_labels(fake, "2007", split)


def test_the_hint_looks_for_the_marker_under_the_given_root(voc_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A root passed to the loader decides, not $MLIC_DATA: a prepared dataset elsewhere says nothing about it."""
    prepared = tmp_path / "elsewhere"
    (prepared / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main").mkdir(parents=True)
    (prepared / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    monkeypatch.setenv("MLIC_DATA", str(prepared))
    shutil.rmtree(voc_root / "VOCdevkit" / "VOC2007" / "Annotations")
    with pytest.raises(DatasetNotFoundError, match="Fetch it with `mlic data prepare voc2007`"):
        read_voc_labels(voc_root, "2007", "trainval")  # voc_root was never prepared
    (voc_root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    monkeypatch.setenv("MLIC_DATA", str(prepared / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="mlic data prepare voc2007 --force"):
        read_voc_labels(voc_root, "2007", "trainval")  # the marker under the given root, none under $MLIC_DATA


def test_voc_split_errors_name_the_splits_present_and_refuse_an_empty_one(voc_root: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="the splits present are .*trainval"):
        read_voc_labels(voc_root, "2007", "tset")
    (voc_root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("\n")
    with pytest.raises(ValueError, match="lists no image.*prepare voc2007 --force"):
        voc_dataset(voc_root, split="trainval")


def test_missing_image(tmp_path: Path) -> None:
    ds = ImageListDataset([tmp_path / "gone.jpg"], np.ones((1, 3)))
    with pytest.raises(DatasetNotFoundError, match="gone.jpg"):
        ds[0]


def test_image_list_dataset_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"targets must have shape \(N=1, C\), got \(2, 3\)"):
        ImageListDataset([tmp_path / "a.jpg"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"mask shape \(1, 2\) differs from targets shape \(1, 3\)"):
        ImageListDataset([tmp_path / "a.jpg"], np.zeros((1, 3)), mask=np.ones((1, 2), dtype=bool))
    # labels outside [0, 1] ({-1, 1}, NaN) are refused when the dataset is built: on an accelerator the losses check
    # none, so they would train silently; an entry the mask hides may hold anything
    for bad in ([[1.0, -1.0, -1.0]], [[1.0, float("nan"), 0.0]]):
        with pytest.raises(ValueError, match=r"labels in \[0, 1\].*\(y \+ 1\) / 2"):
            ImageListDataset([tmp_path / "a.jpg"], np.array(bad))
    ok = ImageListDataset([tmp_path / "a.jpg"], np.array([[1.0, -1.0, 0.5]]), mask=np.array([[True, False, True]]))
    assert ok.targets.shape == (1, 3)


def test_default_transform_train_flip(tmp_path: Path) -> None:
    path = tmp_path / "grad.png"
    arr = np.tile(np.linspace(0, 255, 8, dtype=np.uint8)[None, :, None], (8, 1, 3))
    Image.fromarray(arr).save(path)
    ds = ImageListDataset([path], np.ones((1, 1)), transform=default_transform(8, train=True))
    torch.manual_seed(0)
    outs = [ds[0][0] for _ in range(12)]
    assert all(o.shape == (3, 8, 8) for o in outs)
    flipped = [bool(o[0, 0, 0] > o[0, 0, -1]) for o in outs]
    assert any(flipped) and not all(flipped)
    test_out = default_transform(8, train=False)(Image.open(path).convert("RGB"))
    expected = (arr[0, 0, 0] / 255 - 0.485) / 0.229
    assert test_out[0, 0, 0].item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------


def test_read_coco_labels_orders(coco_root: Path) -> None:
    ann = coco_root / "coco" / "annotations" / "instances_val2014.json"
    ids, files, labels, names = read_coco_labels(ann, class_order="coco")
    assert ids == [42, 7, 99]
    assert files[0] == "COCO_val2014_000000000042.jpg"
    assert names == ["car", "dog"]  # id 3 before id 18
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[1, 1], [1, 0], [0, 0]])

    _, _, labels_m, names_m = read_coco_labels(ann, class_order="mlgcn")
    assert names_m == sorted(names_m)
    np.testing.assert_array_equal(labels_m[:, [names_m.index(n) for n in names]], labels)

    ids_d, files_d, labels_d, _ = read_coco_labels(ann, drop_empty=True)
    assert ids_d == [42, 7] and len(files_d) == 2 and labels_d.shape == (2, 2)

    with pytest.raises(ValueError, match="class_order"):
        read_coco_labels(ann, class_order="random")


def test_read_coco_labels_unknown_ids(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    base = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": COCO_CATEGORIES}
    path.write_text(json.dumps({**base, "annotations": [{"image_id": 2, "category_id": 3}]}))
    with pytest.raises(ValueError, match="image id 2"):
        read_coco_labels(path)
    path.write_text(json.dumps({**base, "annotations": [{"image_id": 1, "category_id": 5}]}))
    with pytest.raises(ValueError, match="category id 5"):
        read_coco_labels(path)


def test_voc2012_ids_name_their_images_and_an_object_without_a_difficult_tag_counts(tmp_path: Path) -> None:
    """VOC2012 ids look like 2008_000023 (the fixtures' 2007 ids are numbers, so zero-padding an id as a number
    passed); an <object> without <difficult> is an ordinary positive (the fixtures always wrote the tag)."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations" / "2008_000023.xml").write_text(_voc_xml([("dog", 0)]))
    (voc / "Annotations" / "2008_000024.xml").write_text("<annotation><object><name>cat</name></object></annotation>")
    _jpeg(voc / "JPEGImages" / "2008_000023.jpg", (1, 2, 3))
    _jpeg(voc / "JPEGImages" / "2008_000024.jpg", (4, 5, 6))
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000023\n2008_000024\n")
    ds = voc_dataset(tmp_path, "2012", "val")
    assert [p.name for p in ds.paths] == ["2008_000023.jpg", "2008_000024.jpg"]
    assert ds[0][0].size == (8, 6)  # the image loads (a PIL image without a transform)
    _, labels = read_voc_labels(tmp_path, "2012", "val")
    assert labels[0, VOC_CLASSES.index("dog")] == 1 and labels[1, VOC_CLASSES.index("cat")] == 1


def test_a_one_pixel_coco_box_is_kept(tmp_path: Path) -> None:
    """DistributionBalancedLoss drops boxes narrower than 1 px, not those of exactly 1 px (COCO-LT's labels)."""
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}], "categories": COCO_CATEGORIES,
                                "annotations": [{"image_id": 1, "category_id": 3, "area": 1.0, "bbox": [0, 0, 1, 1]}]}))
    assert read_coco_labels(path, skip_degenerate=True)[2].tolist() == [[1, 0]]


def test_read_coco_labels_skip_degenerate(tmp_path: Path) -> None:
    """DistributionBalancedLoss's COCO rule: drop ignored, zero-area and sub-pixel boxes; crowds stay."""
    anns = [
        {"image_id": 1, "category_id": 3, "area": 50.0, "bbox": [0, 0, 5, 10]},  # kept
        {"image_id": 1, "category_id": 18, "area": 0.0, "bbox": [0, 0, 5, 10]},  # zero area
        {"image_id": 2, "category_id": 18, "area": 4.0, "bbox": [0, 0, 0.5, 8]},  # narrower than 1 px
        {"image_id": 3, "category_id": 3, "area": 9.0, "bbox": [0, 0, 3, 3], "ignore": 1},  # flagged ignore
        {"image_id": 4, "category_id": 18, "area": 9.0, "bbox": [0, 0, 3, 3], "iscrowd": 1},  # a crowd: kept
    ]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4)],
                                "categories": COCO_CATEGORIES, "annotations": anns}))
    _, _, every, names = read_coco_labels(path)
    assert names == ["car", "dog"]
    np.testing.assert_array_equal(every, [[1, 1], [0, 1], [1, 0], [0, 1]])
    _, _, kept, _ = read_coco_labels(path, skip_degenerate=True)
    np.testing.assert_array_equal(kept, [[1, 0], [0, 0], [0, 0], [0, 1]])
    ids, _, kept_nonempty, _ = read_coco_labels(path, skip_degenerate=True, drop_empty=True)
    assert ids == [1, 4] and kept_nonempty.shape == (2, 2)


def test_coco_orders_match_shared(tmp_path: Path) -> None:
    cats_path = SHARED / "coco" / "categories.json"
    order_path = SHARED / "coco" / "categories_mlgcn_order.json"
    if not (cats_path.is_file() and order_path.is_file()):
        pytest.skip(f"shared COCO category files not found under {SHARED}")
    categories = json.loads(cats_path.read_text())
    mlgcn = json.loads(order_path.read_text())
    assert len(categories) == 80
    rng = np.random.default_rng(0)
    shuffled = [categories[i] for i in rng.permutation(len(categories))]
    payload = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"image_id": 1, "category_id": c["id"]} for c in categories[:3]],
        "categories": shuffled,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(payload))
    _, _, labels, names = read_coco_labels(path, class_order="mlgcn")
    assert names == sorted(mlgcn, key=mlgcn.__getitem__)
    assert labels.shape == (1, 80)
    _, _, labels_c, names_c = read_coco_labels(path, class_order="coco")
    assert names_c[0] == "person"
    assert names_c == [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    assert labels_c[0, :3].tolist() == [1, 1, 1] and labels_c.sum() == 3


def test_coco_dataset(coco_root: Path) -> None:
    ds = coco_dataset(coco_root, "2014", "val", transform=default_transform(12))
    assert len(ds) == 3 and ds.class_names == ["car", "dog"] and ds.ids == [42, 7, 99]
    image, target = ds[0]
    assert image.shape == (3, 12, 12)
    assert target.tolist() == [1.0, 1.0]
    assert ds[2][1].tolist() == [0.0, 0.0]
    assert coco_dataset(coco_root, "2014", "val", class_order="coco").class_names == ["car", "dog"]


def test_coco_missing(tmp_path: Path, coco_root: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="mlic data prepare coco2014"):
        coco_dataset(tmp_path / "nowhere", "2014", "train")
    with pytest.raises(DatasetNotFoundError, match="instances_train2014.json"):
        coco_dataset(coco_root, "2014", "train")
    with pytest.raises(ValueError, match="split"):
        coco_dataset(coco_root, "2014", "test")


def test_coco_dataset_orders_classes_by_name_by_default(tmp_path: Path) -> None:
    """``coco_dataset``'s default column order is ML-GCN's (category names ascending), not the category ids'."""
    base = tmp_path / "coco"
    (base / "annotations").mkdir(parents=True)
    payload = {"images": [{"id": 1, "file_name": "1.jpg"}],
               "categories": [{"id": 2, "name": "zebra"}, {"id": 5, "name": "apple"}],
               "annotations": [{"image_id": 1, "category_id": 2}]}
    (base / "annotations" / "instances_val2014.json").write_text(json.dumps(payload))
    _jpeg(base / "val2014" / "1.jpg", (0, 0, 0))
    ds = coco_dataset(tmp_path, "2014", "val")
    assert ds.class_names == ["apple", "zebra"] and ds.targets.tolist() == [[0.0, 1.0]]
    assert coco_dataset(tmp_path, "2014", "val", class_order="coco").class_names == ["zebra", "apple"]


# ---------------------------------------------------------------------------------------------
# shared reference CSVs
# ---------------------------------------------------------------------------------------------


def _shared_csv(rel: str) -> Path:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"shared reference file {path} not found")
    return path


@pytest.mark.parametrize(
    ("rel", "rows"),
    [
        ("voc2007/classification_trainval.csv", 5011),
        ("voc2007/classification_test.csv", 4952),
        # the shared "voc2012" file is VOC2007 trainval + VOC2012 trainval (the 07+12 set)
        ("voc2012/classification_trainval.csv", 5011 + 11540),
    ],
)
def test_shared_voc_csv(rel: str, rows: int) -> None:
    ids, labels = read_voc_csv(_shared_csv(rel))
    assert len(ids) == rows and labels.shape == (rows, 20)
    assert len(set(ids)) == rows
    assert set(np.unique(labels).tolist()) <= {-1, 0, 1}
    assert ((labels == 1).sum(axis=0) > 0).all()
    if rel.startswith("voc2007"):
        assert all(len(i) == 6 and i.isdigit() for i in ids)  # zero-padded ids kept as strings


def test_shared_voc2012_contains_voc2007() -> None:
    ids07, labels07 = read_voc_csv(_shared_csv("voc2007/classification_trainval.csv"))
    ids12, labels12 = read_voc_csv(_shared_csv("voc2012/classification_trainval.csv"))
    n = len(ids07)
    assert ids12[:n] == ids07
    np.testing.assert_array_equal(labels12[:n], labels07)
    assert all("_" in i and i[:4] in {"2008", "2009", "2010", "2011"} for i in ids12[n:])


def test_shared_voc2007_person_most_frequent() -> None:
    _, labels = read_voc_csv(_shared_csv("voc2007/classification_trainval.csv"))
    counts = (labels == 1).sum(axis=0)
    assert VOC_CLASSES[14] == "person"
    assert int(np.argmax(counts)) == 14


def test_reference_data_dir_env_and_default(monkeypatch, tmp_path):
    from mlic_lib.data.paths import reference_data_dir

    monkeypatch.setenv("MLIC_REFERENCE_DATA", str(tmp_path))
    assert reference_data_dir() == tmp_path
    monkeypatch.delenv("MLIC_REFERENCE_DATA")
    monkeypatch.chdir(tmp_path)  # not relative to the working directory
    assert reference_data_dir() == Path(__file__).resolve().parents[2] / "shared" / "data"
