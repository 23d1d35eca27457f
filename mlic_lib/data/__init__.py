"""Data: the embedded digit pool and composites (ML-MNIST, scenes), label statistics, and loaders
for the real datasets (VOC, COCO) in their standard on-disk layouts."""

from mlic_lib.data.coco import coco_dataset, read_coco_labels
from mlic_lib.data.digits import digit_pool
from mlic_lib.data.errors import CorruptImageError, DatasetNotFoundError
from mlic_lib.data.images import ImageListDataset
from mlic_lib.data.mlmnist import CanvasSet, make_ml_mnist
from mlic_lib.data.scenes import SceneSet, SceneSpec, SceneWorld, make_scenes, make_world
from mlic_lib.data.tensors import TensorImageDataset
from mlic_lib.data.voc import VOC_CLASSES, read_voc_csv, read_voc_labels, voc_dataset

__all__ = [
    "VOC_CLASSES",
    "CanvasSet",
    "CorruptImageError",
    "DatasetNotFoundError",
    "ImageListDataset",
    "coco_dataset",
    "read_coco_labels",
    "read_voc_csv",
    "read_voc_labels",
    "voc_dataset",
    "SceneSet",
    "SceneSpec",
    "SceneWorld",
    "TensorImageDataset",
    "digit_pool",
    "make_ml_mnist",
    "make_scenes",
    "make_world",
]
