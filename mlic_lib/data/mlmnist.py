"""ML-MNIST canvases as in INDeeD (section "Evaluation on ML-MNIST" of ``indeed.txt``).

Each canvas is 84x84: a 3x3 grid of 28x28 cells. A training canvas holds ``N`` *distinct* digit
classes in ``N`` distinct random cells (N in {2, 3, 5, 7} in the paper); a test canvas holds a single
digit in one random cell, so the test measures whether a model trained on co-occurring digits can
recognise each digit alone. Generation is fully vectorised and deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlic_lib.data.digits import digit_pool

GRID = 3
CELL = 28
CANVAS = GRID * CELL
NUM_CLASSES = 10


@dataclass
class CanvasSet:
    """Images ``uint8 (n, 1, 84, 84)``, multi-hot ``targets float32 (n, 10)``, and for every canvas
    the digit class in each of the 9 cells (``cells int64 (n, 9)``, -1 for an empty cell)."""

    images: np.ndarray
    targets: np.ndarray
    cells: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def make_ml_mnist(
    n_images: int,
    n_digits: int,
    seed: int = 0,
    split: str = "train",
    pool: tuple[np.ndarray, np.ndarray] | None = None,
) -> CanvasSet:
    """Build ``n_images`` canvases with ``n_digits`` distinct digits each (1 for single-label tests).

    Parameters
    ----------
    n_images : number of canvases.
    n_digits : distinct digit classes per canvas, 1..9 (INDeeD trains with 2, 3, 5, 7 and tests with 1).
    seed : seed of this draw.
    split : which part of the embedded pool the digits come from ('train' or 'test': 80% / 20%, disjoint).
    pool : optional ``(images (m, 28, 28) uint8, labels (m,))`` to draw from instead (e.g. full MNIST).
    """
    if not 1 <= n_digits <= min(GRID * GRID, NUM_CLASSES):
        raise ValueError(f"n_digits must be between 1 and 9 (distinct digits in distinct cells), got {n_digits}")
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    digits, labels = pool if pool is not None else digit_pool(split)
    rng = np.random.default_rng(seed)
    classes = rng.permuted(np.tile(np.arange(NUM_CLASSES), (n_images, 1)), axis=1)[:, :n_digits]
    slots = rng.permuted(np.tile(np.arange(GRID * GRID), (n_images, 1)), axis=1)[:, :n_digits]

    # one random pool image of the right class for every (canvas, slot)
    by_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    if any(len(ix) == 0 for ix in by_class):
        raise ValueError("the digit pool must contain every class 0-9")
    counts = np.array([len(ix) for ix in by_class])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    flat = np.concatenate(by_class)
    pick = flat[offsets[classes] + (rng.random(classes.shape) * counts[classes]).astype(np.int64)]

    blocks = np.zeros((n_images, GRID * GRID, CELL, CELL), dtype=np.uint8)
    rows = np.repeat(np.arange(n_images), n_digits)
    blocks[rows, slots.ravel()] = digits[pick.ravel()]
    images = blocks.reshape(n_images, GRID, GRID, CELL, CELL).transpose(0, 1, 3, 2, 4)
    images = np.ascontiguousarray(images.reshape(n_images, 1, CANVAS, CANVAS))

    targets = np.zeros((n_images, NUM_CLASSES), dtype=np.float32)
    targets[rows, classes.ravel()] = 1.0
    cells = np.full((n_images, GRID * GRID), -1, dtype=np.int64)
    cells[rows, slots.ravel()] = classes.ravel()
    return CanvasSet(images=images, targets=targets, cells=cells)
