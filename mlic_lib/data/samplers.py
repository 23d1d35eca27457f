"""Uniform and re-balanced (class-aware) sampling, and a loader that yields one batch of each per step.

LTML (Guo & Wang, CVPR 2021, Sec. 3.1) trains its two branches on two samplings of the same training set:

* **uniform**: every image with probability ``1/N`` (:class:`UniformSampler`, a fresh permutation per epoch);
* **re-balanced**: a class with probability ``1/K``, then an image of that class, so image ``i`` is drawn
  with probability ``(1/K) * sum_k y_ik / N_k`` (:class:`ClassAwareSampler`).

The re-balanced sampler follows the class-aware sampler of DistributionBalancedLoss (Wu et al., ECCV 2020),
whose setup LTML reuses: classes are visited in a shuffled cycle (reshuffled each time the cycle is
exhausted) and each visit takes the next image(s) of that class from its own shuffled list (reshuffled
when exhausted). This is a re-implementation from that description, not a copy of their code.

:class:`TwoStreamLoader` zips the two into ``(x_u, y_u, x_r, y_r)`` batches. It is re-iterable and
deterministic: the ``e``-th pass over it (``e`` = how many times it was iterated, or :meth:`set_epoch`)
draws its indices from ``(seed, e)`` only, so ``engine.fit`` can use it as ``train_data``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlic_lib.utils import distributed_info

__all__ = ["ClassAwareSampler", "TwoStreamLoader", "UniformSampler", "sampling_probabilities"]


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(stream)])


def _check_targets(targets) -> np.ndarray:
    t = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if t.ndim != 2:
        raise ValueError(f"targets must be a 2-D (images, classes) label matrix, got shape {t.shape}")
    if t.shape[0] == 0:
        raise ValueError("targets has no rows: cannot sample from an empty training set")
    return t > 0.5


def sampling_probabilities(targets, kind: str = "class_aware") -> np.ndarray:
    """Per-image sampling probability of LTML Sec. 3.1: ``1/N`` (``"uniform"``) or
    ``(1/K') sum_k y_ik / N_k`` over the ``K'`` classes that have images (``"class_aware"``)."""
    t = _check_targets(targets)
    if kind == "uniform":
        return np.full(len(t), 1.0 / len(t))
    if kind != "class_aware":
        raise ValueError(f"kind must be 'uniform' or 'class_aware', got {kind!r}")
    n_k = t.sum(0)
    present = n_k > 0
    return (t[:, present] / n_k[present]).sum(1) / present.sum()


class UniformSampler:
    """Instance-level uniform sampling: a permutation of ``range(n)`` per epoch (``num_samples`` indices,
    cycling through fresh permutations if it exceeds ``n``)."""

    def __init__(self, n: int, num_samples: int | None = None, seed: int = 0):
        if n < 1:
            raise ValueError(f"n must be positive (the number of training images), got {n}")
        self.n = int(n)
        self.num_samples = int(n if num_samples is None else num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive (indices per epoch), got {num_samples}; None = n")
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, epoch: int = 0) -> np.ndarray:
        rng = _rng(self.seed, epoch, 0)
        reps = -(-self.num_samples // self.n)
        return np.concatenate([rng.permutation(self.n) for _ in range(reps)])[: self.num_samples]


class ClassAwareSampler:
    """Class-aware (re-balanced) sampling as in DistributionBalancedLoss / LTML Sec. 3.1.

    Parameters
    ----------
    targets : (N, K) multi-hot labels of the training set.
    num_samples : indices per epoch. ``None`` = ``N`` (the uniform epoch's length, so that LTML draws one
        re-balanced batch per uniform batch); DistributionBalancedLoss uses ``max_k N_k * K / reduce``
        (``reduce=4``), available as ``num_samples="db"``.
    samples_per_class : consecutive images taken per class visit (DistributionBalancedLoss: 3 in their
        config; 1 gives the textbook ``1/K`` class probability per draw).
    reduce : the divisor of the ``"db"`` epoch length.
    seed : the draw of epoch ``e`` depends only on ``(seed, e)``.

    Classes without any positive image are left out of the class cycle (they cannot be sampled).

    Each epoch starts from freshly shuffled cycles (so that epoch ``e`` depends on ``(seed, e)`` only and a
    resumed run draws what an uninterrupted one would). DistributionBalancedLoss's ``RandomCycleIter``s instead
    carry their position over from one epoch to the next; the probability of drawing each image is the same.
    """

    def __init__(self, targets, num_samples: int | str | None = None, samples_per_class: int = 1,
                 reduce: int = 4, seed: int = 0):
        t = _check_targets(targets)
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        self.class_members = [np.flatnonzero(t[:, k]) for k in range(t.shape[1])]
        self.classes = np.array([k for k, m in enumerate(self.class_members) if len(m)], dtype=np.int64)
        if len(self.classes) == 0:
            raise ValueError("no class has a positive image: class-aware sampling needs labelled images")
        if num_samples == "db":
            num_samples = max(1, int(max(len(m) for m in self.class_members) * t.shape[1] / reduce))
        elif isinstance(num_samples, str):
            raise ValueError(f"num_samples must be an int, None or 'db', got {num_samples!r}")
        self.num_samples = int(len(t) if num_samples is None else num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive (indices per epoch), got {self.num_samples}; None = the "
                             "number of images, 'db' = the DB-loss epoch length")
        self.samples_per_class = int(samples_per_class)
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, epoch: int = 0) -> np.ndarray:
        """The ``num_samples`` image indices of epoch ``epoch``."""
        rng = _rng(self.seed, epoch, 1)
        class_cycle = rng.permutation(self.classes)
        c_pos = 0
        lists = {int(k): rng.permutation(self.class_members[k]) for k in self.classes}
        pos = dict.fromkeys(lists, 0)
        out = np.empty(self.num_samples, dtype=np.int64)
        i = 0
        while i < self.num_samples:
            if c_pos == len(class_cycle):  # cycle of classes exhausted: reshuffle
                class_cycle, c_pos = rng.permutation(self.classes), 0
            k = int(class_cycle[c_pos])
            c_pos += 1
            for _ in range(min(self.samples_per_class, self.num_samples - i)):
                if pos[k] == len(lists[k]):  # this class's images exhausted: reshuffle them
                    lists[k], pos[k] = rng.permutation(self.class_members[k]), 0
                out[i] = lists[k][pos[k]]
                pos[k] += 1
                i += 1
        return out


class TwoStreamLoader:
    """Yields ``(x_u, y_u, x_r, y_r)`` per step: one uniform and one re-balanced batch (LTML Fig. 2).

    Parameters
    ----------
    dataset : a ``Dataset`` of ``(image, target)`` items (``TensorImageDataset``, ``ImageListDataset``).
    targets : its (N, K) labels (used by the class-aware sampler).
    batch_size : images per stream and step.
    seed : epoch ``e`` draws from ``(seed, e)``.
    steps : steps per epoch; default ``N // batch_size`` (one pass of the uniform stream, last partial batch
        dropped); ``"db"``: DistributionBalancedLoss's class-aware epoch, ``ClassAwareSampler(targets, "db")``'s
        ``max_k N_k * K / 4`` images, ``// batch_size``.
    samples_per_class : see :class:`ClassAwareSampler`.
    num_workers : worker processes of the two underlying ``DataLoader``s (real images).

    The epoch counter advances by one at every ``iter()``; :meth:`set_epoch` sets it (e.g. after resuming).
    Under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` takes the epoch's batches ``r, r + world, ...``
    (``steps // world`` each, as ``DistributedSampler`` shares an epoch out), so the ranks see different
    images and the global batch is ``batch_size * world``.
    """

    def __init__(self, dataset: Dataset, targets, batch_size: int, seed: int = 0, steps: int | str | None = None,
                 samples_per_class: int = 1, num_workers: int = 0, pin_memory: bool = False):
        t = _check_targets(targets)
        if len(t) != len(dataset):
            raise ValueError(f"targets has {len(t)} rows but the dataset has {len(dataset)} items")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if getattr(dataset, "mask", None) is not None:  # the streams yield (x, y) only: a mask would be dropped
            raise ValueError("two-stream training has no label mask, but the dataset has one (VOC with "
                             "difficult_train: ignore); use difficult_train: negative or positive")
        if steps == "db":
            steps = max(1, ClassAwareSampler(t, "db").num_samples // batch_size)
        elif isinstance(steps, str) or (steps is not None and int(steps) < 1):
            raise ValueError(f"steps must be a positive int, None (N // batch_size) or 'db', got {steps!r}")
        self.steps = int(steps or max(1, len(t) // batch_size))
        n = self.steps * batch_size
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.uniform = UniformSampler(len(t), n, seed)
        self.rebalanced = ClassAwareSampler(t, n, samples_per_class, seed=seed)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0

    def __len__(self) -> int:
        return self._share()[0]

    def _share(self) -> tuple[int, int, int]:
        """``(steps of this rank, rank, world)``."""
        world, rank, _ = distributed_info()
        if world > self.steps:
            raise ValueError(f"{world} processes but only {self.steps} steps per epoch: use fewer processes or "
                             "a smaller batch_size")
        return self.steps // world, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _loader(self, idx: np.ndarray) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=idx.tolist(), drop_last=True,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def epoch_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The (uniform, re-balanced) index sequences of ``epoch`` for this process (all of them unless
        under ``torchrun``)."""
        steps, rank, world = self._share()
        b = self.batch_size

        def mine(idx: np.ndarray) -> np.ndarray:
            return idx.reshape(self.steps, b)[rank::world][:steps].reshape(-1)

        return mine(self.uniform.indices(epoch)), mine(self.rebalanced.indices(epoch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        iu, ir = self.epoch_indices(self.epoch)
        self.epoch += 1
        for (xu, yu, *_), (xr, yr, *_) in zip(self._loader(iu), self._loader(ir), strict=True):
            yield xu, yu, xr, yr
