"""Where the real datasets come from: one registry of official URLs with size and sha256 per file.

Checksums are the public ones (the TensorFlow Datasets checksum files for VOC, COCO, MNIST and
CIFAR-10; for the DistributionBalancedLoss split files, the digests of the reference copies that
ship with this project's test data). A file whose sha256 is not known is marked ``sha256=None``:
``mlic data prepare`` refuses it unless ``--allow-unverified`` is given, and then prints the digest
it computed so it can be recorded here.

Each dataset lists its files and where they are unpacked under ``$MLIC_DATA``; the resulting layout
is the one the loaders in :mod:`mlic_lib.data.voc` and :mod:`mlic_lib.data.coco` read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_VOC = "http://host.robots.ox.ac.uk/pascal/VOC"
_VOC_MIRROR = "https://pjreddie.com/media/files"
_COCO = "http://images.cocodataset.org"
_DBL = "https://raw.githubusercontent.com/wutong16/DistributionBalancedLoss/master/appendix"


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: URLs (first = official, then mirrors), size in bytes, sha256, and what
    to do with it: ``extract`` into ``dest`` (tar/zip) or ``copy`` it to ``dest/<save_as or name>``."""

    name: str
    urls: tuple[str, ...]
    size: int | None
    sha256: str | None
    dest: str = "."
    action: str = "extract"  # or "copy"
    save_as: str | None = None  # a copy's file name under dest, when it differs from the download's

    @property
    def saved_name(self) -> str:
        return self.save_as or self.name


@dataclass(frozen=True)
class DatasetEntry:
    key: str
    title: str
    files: tuple[RemoteFile, ...]
    marker: str  # a path under $MLIC_DATA that exists once the dataset is prepared
    needs: tuple[str, ...] = ()  # other datasets this one uses (e.g. VOC-LT uses VOC2012 images)
    notes: str = ""
    #: further paths that must exist for the dataset to be usable, each a tuple of alternatives (one is enough);
    #: for data placed by hand in one of several layouts (NUS-WIDE)
    also: tuple[tuple[str, ...], ...] = ()
    extra: dict = field(default_factory=dict)


def _voc(name: str, year: str, size: int, sha: str) -> RemoteFile:
    return RemoteFile(name, (f"{_VOC}/voc{year}/{name}", f"{_VOC_MIRROR}/{name}"), size, sha)


def _copies(base: str, dest: str, rows) -> tuple[RemoteFile, ...]:
    """Files copied as they are from ``base/<name>`` to ``dest/<name>``; rows are ``(name, size, sha256)``."""
    return tuple(RemoteFile(n, (f"{base}/{n}",), size, sha, dest, "copy") for n, size, sha in rows)


def _coco(name: str, size: int, sha: str, folder: str = "zips") -> RemoteFile:
    return RemoteFile(name, (f"{_COCO}/{folder}/{name}",), size, sha, dest="coco")


def _coco_entry(year: str, annotations: tuple[int, str], train: tuple[int, str], val: tuple[int, str]) -> DatasetEntry:
    """COCO ``year``: the instances annotations and the train / val image zips, each given as ``(size, sha256)``."""
    return DatasetEntry(
        f"coco{year}", f"MS-COCO {year} (train + val images, instances annotations)",
        (_coco(f"annotations_trainval{year}.zip", *annotations, "annotations"),
         _coco(f"train{year}.zip", *train), _coco(f"val{year}.zip", *val)),
        marker=f"coco/annotations/instances_val{year}.json",
        also=((f"coco/train{year}",), (f"coco/val{year}",)),  # the annotations alone are not the dataset
    )


DATASETS: dict[str, DatasetEntry] = {
    "voc2007": DatasetEntry(
        "voc2007", "PASCAL VOC 2007 (trainval + test)",
        (
            _voc("VOCtrainval_06-Nov-2007.tar", "2007", 460032000,
                 "7d8cd951101b0957ddfd7a530bdc8a94f06121cfc1e511bb5937e973020c7508"),
            _voc("VOCtest_06-Nov-2007.tar", "2007", 451020800,
                 "6836888e2e01dca84577a849d339fa4f73e1e4f135d312430c4856b5609b4892"),
        ),
        marker="VOCdevkit/VOC2007/ImageSets/Main/test.txt",
        also=(("VOCdevkit/VOC2007/ImageSets/Main/trainval.txt",),),  # one path from each of the two tars
    ),
    "voc2012": DatasetEntry(
        "voc2012", "PASCAL VOC 2012 (trainval)",
        (_voc("VOCtrainval_11-May-2012.tar", "2012", 1999639040,
              "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb"),),
        marker="VOCdevkit/VOC2012/ImageSets/Main/trainval.txt",
    ),
    "coco2014": _coco_entry(
        "2014", (252872794, "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009"),
        (13510573713, "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"),
        (6645013297, "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0")),
    "coco2017": _coco_entry(
        "2017", (252907541, "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268"),
        (19336861798, "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929"),
        (815585330, "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05")),
    "mnist": DatasetEntry(
        "mnist", "MNIST (IDX files, kept gzipped)",
        _copies(
            "https://storage.googleapis.com/cvdf-datasets/mnist", "mnist", (
                ("train-images-idx3-ubyte.gz", 9912422,
                 "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                ("train-labels-idx1-ubyte.gz", 28881,
                 "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
                ("t10k-images-idx3-ubyte.gz", 1648877,
                 "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                ("t10k-labels-idx1-ubyte.gz", 4542,
                 "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
            )
        ),
        marker="mnist/t10k-labels-idx1-ubyte.gz",
    ),
    "cifar10": DatasetEntry(
        "cifar10", "CIFAR-10 (binary version)",
        (RemoteFile("cifar-10-binary.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
                    170052171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", "cifar10"),),
        marker="cifar10/cifar-10-batches-bin/test_batch.bin",
    ),
    "voc_lt": DatasetEntry(
        "voc_lt", "VOC-LT split files (DistributionBalancedLoss) over VOC 2012 images",
        _copies(
            f"{_DBL}/VOCdevkit/longtail2012", "voc_lt", (
                ("img_id.txt", 13704, "6e49185d5421236718f7393e952f5790e5c0cfeb1694892b1b971f59725d5ebc"),
                ("class_freq.pkl", 269857, "cc7c8c401a2ffb8b47a5b0c2eca55a3b485cfa6658581c33e27ccbd27b145c5d"),
                ("class_split.pkl", 918, "4400870c72d66673dd58f46f9102633579c0c70d6c1c33a0496edb4008cb04bc"),
            )
        ),
        marker="voc_lt/class_split.pkl",
        needs=("voc2012", "voc2007"),  # VOC2012 training images, VOC2007 test set
    ),
    "coco_lt": DatasetEntry(
        "coco_lt", "COCO-LT split files (DistributionBalancedLoss) over COCO 2017 images",
        (
            # despite its extension, DBL's COCO-LT img_id.pkl is a text file of image ids, one per line
            # (the same bytes as the shared reference img_id.txt), so it is saved under the VOC-LT name
            RemoteFile("img_id.pkl", (f"{_DBL}/coco/longtail2017/img_id.pkl",), 13023,
                       "f31e853d2c7b69512c62b65ff1db067a49b3ab86a62f685c7da86b7c3dd04768", "coco_lt", "copy",
                       save_as="img_id.txt"),
            RemoteFile("class_freq.pkl", (f"{_DBL}/coco/longtail2017/class_freq.pkl",), 1421819,
                       "7edbc381296400727d1fd8afa01af51403de8d0e892230e16312b2ae7f6a469c", "coco_lt", "copy"),
            RemoteFile("class_split.pkl", (f"{_DBL}/coco/longtail2017/class_split.pkl",), 3519,
                       "923d001a2d117e250caf48833f7082dc090aa405a1769489bf66137c8a2c5560", "coco_lt", "copy"),
        ),
        marker="coco_lt/class_split.pkl",
        needs=("coco2017",),
    ),
    "nuswide": DatasetEntry(
        "nuswide", "NUS-WIDE (user-supplied images)", (),
        marker="nuswide/Flickr",
        also=(("nuswide/Concepts81.txt", "nuswide/ConceptsList/Concepts81.txt"),
              ("nuswide/ImageList/TrainImagelist.txt", "nuswide/ImageList/ImageList/TrainImagelist.txt"),
              ("nuswide/ImageList/TestImagelist.txt", "nuswide/ImageList/ImageList/TestImagelist.txt"),
              ("nuswide/Groundtruth/TrainTestLabels",)),
        notes=("NUS-WIDE images are not redistributed by their authors any more: place the 'Flickr' image "
               "folder and the official lists (Concepts81.txt, ImageList/, Groundtruth/TrainTestLabels/) under "
               "$MLIC_DATA/nuswide/; mlic_lib.data.nuswide reads that layout."),
    ),
}


def get(key: str) -> DatasetEntry:
    """The registry entry for ``key``; an unknown key is an error listing the known ones."""
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {key!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[key]
