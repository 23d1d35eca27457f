"""Parallel Self-Distillation (PSD / CPSD; Xu et al., IJCAI 2022, Sec. 3.3): sub-task teachers, label merging
and the distilled student.

* **Sub-tasks** ``T_t = (X_{C_t}, Y_{C_t})`` (Sec. 3.1): labels restricted to a category subset ``C_t``
  (:mod:`mlic_lib.partition` makes the subsets). Which images a teacher sees is an option,
  ``images='containing'`` (the paper: ``X_{C_t}`` = images that contain a category of ``C_t``) or
  ``images='all'`` (the authors' code: every training image, labels restricted to ``C_t``).
* **Teachers** ``F_{C_t}`` (Eq. 3) are trained on their sub-task with the Asymmetric Loss (Eq. 4,
  :class:`ASLStep`; ``gamma_- = 4, gamma_+ = 0, clip mu = 0.05``, the values of the CPSD authors' code and
  ASL's recommended setting). They are independent, so
  :func:`train_teachers` / :func:`pretrain_teachers` run them sequentially, in a spawn-based process pool, or
  one per rank under ``torchrun``; a finished teacher is cached and reused (e.g. the CGP teachers of a ``k``
  serve both the CGPD and the CPSD students). Students and baselines of fixed teachers are independent too:
  :func:`train_runs` trains a list of them, in a pool where ``parallel`` says so.
* **Label merging** ``rho`` (Eq. 5, :func:`merge_logits`) scatters each teacher's logits back to the global
  class order; :func:`split_logits` is its inverse; :class:`TeacherEnsemble` is ``rho`` over all teachers
  of one decomposition.
* **Student** (Eqs. 6-7, :class:`DistillationStep`): the same architecture on the full label set, trained
  with ``L_cls^C + L_kd``, ``L_kd = 1/2 sum_i sum_teachers ||y_s - y_teacher||^2`` on logits (MSE), with the
  CGP and the DGP ensembles as the two teachers (CPSD), one of them (CGPD / DGPD), or a single full-label
  teacher (self-distillation, SD, = a ``k = 1`` decomposition).

Reading of the paper (stated because the paper leaves it open): ``L_kd`` is summed over images and
classes like ASL (``reduction='sum'``, as printed); with one teacher the factor 1/2 is kept. Eq. 5 writes
``rho({F_{C_t}(x_i) | x_i in X_{C_t}})``: teacher ``t`` gives soft targets on the images of its sub-task
only. ``kd_images='subtask'`` (default) follows that formula: the KD term of teacher ``t``'s classes is masked
on images outside ``X_{C_t}`` (:func:`kd_domain_mask`), which matters under ``images='containing'`` (a
teacher never saw those images, so its logits there are not targets). The reading is contested: the text
around Eq. 5 speaks of merging the teachers' predictions into a "complete logit prediction", and the mask
drops most of Eq. 6's terms on real label sets (an image holds few classes, so it lies outside most
sub-tasks: on VOC2007 trainval at ``k = 5``, 61 % of the terms for CGP, 71 % for DGP). ``kd_images='all'``
distils every teacher on every image (with ``images='all'``, as in the authors' code, the two are the same);
the CPSD chapter compares both (its section 3b). On in-memory
data without augmentation (the embedded scenes) teacher logits are computed once for the training set and
fed with the batch, which equals computing them on the fly; on image datasets with augmentation (the
``full`` profile, :class:`~mlic_lib.data.images.ImageListDataset`) the teachers run on each augmented batch.

Training data: either in-memory ``uint8`` images (``(N, 3, H, W)``, fast path) or any map-style dataset of
``(x, y[, mask])`` items; sub-tasks then wrap it (:class:`SubtaskDataset`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mlic_lib.data.tensors import TensorImageDataset
from mlic_lib.engine import FitResult, TrainConfig, fit, is_finished, run_dir_for
from mlic_lib.experiments import build_scene_model
from mlic_lib.losses import AsymmetricLoss
from mlic_lib.utils import host_to_device, object_key, pick_device

__all__ = [
    "IMAGE_SELECTIONS",
    "KD_IMAGES",
    "ASLStep",
    "DistillDataset",
    "DistillationStep",
    "TeacherEnsemble",
    "TeacherSpec",
    "build_psd_model",
    "decomposition_teachers",
    "kd_domain_mask",
    "kd_loss",
    "merge_logits",
    "predict_logits",
    "split_logits",
    "SubtaskDataset",
    "subtask_dataset",
    "subtask_indices",
    "train_baseline",
    "train_student",
    "train_teacher",
    "train_teachers",
    "pretrain_teachers",
    "matched_epochs",
    "teacher_steps",
    "selection_variants",
    "RunRequest",
    "train_runs",
    "resolve_mode",
    "study_decompositions",
    "study_inputs",
    "PSDStudy",
    "run_study",
    "teacher_key",
    "check_options",
]

IMAGE_SELECTIONS = ("containing", "all")
KD_IMAGES = ("subtask", "all")
KD_REDUCTIONS = ("sum", "mean")
#: psd.teacher_epochs: 'fixed' = every teacher trains teacher_train.epochs over its own images (the paper's 20);
#: 'matched_steps' = a teacher on the images containing its classes trains as many optimiser steps as one on all
TEACHER_EPOCHS = ("fixed", "matched_steps")
PARALLEL_MODES = ("auto", "sequential", "process", "torchrun")


# ------------------------------------------------------------------------------------ sub-tasks
def _subset(subset: Sequence[int], num_classes: int) -> np.ndarray:
    s = np.asarray(subset, dtype=np.int64).ravel()
    if s.size == 0:
        raise ValueError("empty category subset: a sub-task needs at least one class")
    if s.min() < 0 or s.max() >= num_classes:
        raise ValueError(f"subset indices must be in 0..{num_classes - 1}, got {s.tolist()}")
    if len(np.unique(s)) != len(s):
        raise ValueError(f"subset has repeated classes: {s.tolist()}")
    return s


def subtask_indices(targets, subset: Sequence[int], images: str = "containing") -> np.ndarray:
    """Indices of the images of sub-task ``T_t``: those with a label in ``subset`` (``'containing'``, the
    paper's ``X_{C_t}``) or all images (``'all'``, the authors' code). A label counts as present above 0.5,
    as in :func:`kd_domain_mask` (the same ``X_{C_t}`` for soft labels too)."""
    if images not in IMAGE_SELECTIONS:
        raise ValueError(f"images must be one of {IMAGE_SELECTIONS} ('containing' = paper, 'all' = authors' code), "
                         f"got {images!r}")
    t = np.asarray(targets)
    s = _subset(subset, t.shape[1])
    if images == "all":
        return np.arange(len(t))
    return np.flatnonzero((t[:, s] > 0.5).any(1))


class SubtaskDataset(Dataset):
    """A sub-task view of a map-style dataset: items ``indices`` of ``base`` with targets restricted to
    ``subset`` (and the mask, if the base yields one, restricted alike)."""

    def __init__(self, base: Dataset, indices: np.ndarray, subset: np.ndarray):
        self.base, self.indices, self.subset = base, np.asarray(indices), torch.as_tensor(np.asarray(subset))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        item = self.base[int(self.indices[i])]
        return (item[0], *(t[self.subset] for t in item[1:3]))


def subtask_dataset(data, targets, subset: Sequence[int], images: str = "containing") -> Dataset:
    """The sub-task ``T_t = (X_{C_t}, Y_{C_t})``: selected images with labels restricted to ``subset`` (in the
    subset's order, the order of the teacher's outputs).

    ``data``: a :class:`TensorImageDataset` (returns one over the selected images, with the same normalisation
    and augmentation), in-memory ``uint8`` images ``(N, 3, H, W)`` (returns a :class:`TensorImageDataset` with
    its default normalisation) or another map-style dataset whose items start with ``(x, y)`` (returns a
    :class:`SubtaskDataset`); ``targets`` are its labels ``(N, C)``."""
    t = np.asarray(targets)
    s = _subset(subset, t.shape[1])
    idx = subtask_indices(t, s, images)
    if idx.size == 0:
        raise ValueError(f"no training image contains a class of subset {s.tolist()}; use images='all'")
    if isinstance(data, Dataset):
        if len(data) != len(t):
            raise ValueError(f"{len(data)} images but {len(t)} label rows")
        if isinstance(data, TensorImageDataset):  # batched fetches, and the student's own preprocessing
            return TensorImageDataset(data.images[torch.as_tensor(idx)], t[idx][:, s],
                                      mean=data.mean.flatten().tolist(), std=data.std.flatten().tolist(),
                                      transform=data.transform)
        return SubtaskDataset(data, idx, s)
    return TensorImageDataset(np.asarray(data)[idx], t[idx][:, s])


# ------------------------------------------------------------------------------------ rho (Eq. 5)
def merge_logits(parts: Sequence[Tensor], subsets: Sequence[Sequence[int]], num_classes: int | None = None) -> Tensor:
    """``rho`` of Eq. 5: place teacher ``t``'s logits ``(B, |C_t|)`` at the global columns ``C_t``.

    The subsets must partition ``0..num_classes-1`` (checked). Differentiable (index_copy)."""
    from mlic_lib.partition import check_partition

    if len(parts) != len(subsets):
        raise ValueError(f"got {len(parts)} logit blocks for {len(subsets)} subsets")
    C = num_classes if num_classes is not None else sum(len(s) for s in subsets)
    check_partition(subsets, C)
    B = parts[0].shape[0]
    for p, s in zip(parts, subsets, strict=True):
        if p.ndim != 2 or p.shape != (B, len(s)):
            raise ValueError(f"teacher logits of shape {tuple(p.shape)} do not fit a subset of {len(s)} classes "
                             f"and batch {B}")
    cat = torch.cat(list(parts), dim=1)
    index = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in subsets]))
    return _place(cat, host_to_device(index, cat.device), C)


def _place(cat: Tensor, index: Tensor, num_classes: int) -> Tensor:
    """Columns ``j`` of ``cat`` at columns ``index[j]`` of a ``(B, num_classes)`` zero tensor (``rho``)."""
    return cat.new_zeros(cat.shape[0], num_classes).index_copy(1, index, cat)


def split_logits(logits: Tensor, subsets: Sequence[Sequence[int]]) -> list[Tensor]:
    """Inverse of :func:`merge_logits`: the columns of each subset, in the subset's order."""
    return [logits[:, torch.as_tensor(np.asarray(s, dtype=np.int64), device=logits.device)] for s in subsets]


def class_subsets(subsets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """``(num_classes,)`` int64: the index of the subset that holds each class, ``len(subsets)`` for a class in
    none."""
    out = np.full(num_classes, len(subsets), dtype=np.int64)
    for i, sub in enumerate(subsets):
        out[np.asarray(sub, dtype=np.int64)] = i
    return out


def kd_domain_mask(targets: Tensor, subsets: Sequence[Sequence[int]] | None) -> Tensor:
    """``(B, C)`` float mask of Eq. 5's domain: entry ``(i, c)`` is 1 when image ``i`` contains a class of the
    subset that holds ``c`` (``x_i in X_{C_t}``), else 0 (also for a class in no subset). ``subsets=None`` (a
    teacher over the whole label set without a decomposition) gives all ones."""
    y = torch.as_tensor(targets) > 0.5
    if y.ndim != 2:
        raise ValueError(f"targets must be (B, C) multi-hot labels, got shape {tuple(y.shape)}")
    if subsets is None:
        return torch.ones(y.shape, dtype=torch.float32, device=y.device)
    owner = host_to_device(torch.from_numpy(class_subsets(subsets, y.shape[1])), y.device)
    return _domain_mask(y, owner, len(subsets))


def _domain_mask(y: Tensor, owner: Tensor, n_subsets: int) -> Tensor:
    """:func:`kd_domain_mask` from boolean targets ``y`` and :func:`class_subsets` ``owner`` (on ``y``'s device):
    whether image ``i`` has a positive in each subset (a scatter-max over the classes; the slot ``n_subsets``
    collects the classes in no subset and is never set), read back at each class's subset. No host sync."""
    owner = owner.expand(y.shape[0], -1)
    present = torch.zeros(y.shape[0], n_subsets + 1, dtype=torch.float32, device=y.device)
    present = present.scatter_reduce(1, owner, y.float() * (owner < n_subsets), "amax")
    return present.gather(1, owner)


def _teacher_masks(teachers: Sequence[nn.Module], targets: Tensor) -> Tensor:
    """``(B, T, C)``: :func:`kd_domain_mask` of each teacher (its ``subsets`` if it is a decomposition; a
    :class:`TeacherEnsemble`'s from its own device-resident class map)."""
    return torch.stack([t.domain_mask(targets) if isinstance(t, TeacherEnsemble)
                        else kd_domain_mask(targets, getattr(t, "subsets", None)) for t in teachers], dim=1)


class TeacherEnsemble(nn.Module):
    """The teachers of one decomposition and ``rho``: ``forward(x)`` gives merged logits ``(B, C)``."""

    def __init__(self, teachers: Sequence[nn.Module], subsets: Sequence[Sequence[int]], num_classes: int,
                 specs: Sequence[TeacherSpec] | None = None):
        """``specs``: the teachers' :class:`TeacherSpec` when they come from the run cache (:func:`train_teachers`
        sets them), so that a pool worker of :func:`train_runs` can load the same teachers from there."""
        super().__init__()
        from mlic_lib.partition import check_partition

        if len(teachers) != len(subsets):
            raise ValueError(f"{len(teachers)} teachers for {len(subsets)} subsets")
        if specs is not None and len(specs) != len(teachers):
            raise ValueError(f"{len(specs)} teacher specs for {len(teachers)} teachers")
        check_partition(subsets, num_classes)
        self.teachers = nn.ModuleList(teachers)
        self.subsets = [np.asarray(s, dtype=np.int64) for s in subsets]
        self.num_classes = num_classes
        self.specs = list(specs) if specs is not None else None
        # rho's column index and the class -> subset map, as buffers (not saved) that move with the module: a step
        # that calls the teachers on each batch then sends nothing from the host (no host sync per step on CUDA)
        self.register_buffer("merge_index", torch.from_numpy(np.concatenate(self.subsets)), persistent=False)
        self.register_buffer("owner", torch.from_numpy(class_subsets(self.subsets, num_classes)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Merged logits ``(B, C)`` (:func:`merge_logits`; the partition was checked when the ensemble was
        built). In float32 whatever each teacher's output dtype: under the engine's bf16 autocast the teachers
        compute in bf16, as the student does."""
        cat = torch.cat([t(x).float() for t in self.teachers], dim=1)
        return _place(cat, self.merge_index, self.num_classes)

    def domain_mask(self, targets: Tensor) -> Tensor:
        """:func:`kd_domain_mask` of this ensemble's subsets, from the buffer on the module's device."""
        y = torch.as_tensor(targets) > 0.5
        if y.ndim != 2 or y.shape[1] != self.num_classes:
            raise ValueError(f"targets must be (B, {self.num_classes}) multi-hot labels, got shape {tuple(y.shape)}")
        return _domain_mask(y, self.owner.to(y.device), len(self.subsets))

    def teacher_for(self, cls: int) -> tuple[nn.Module, int]:
        """``(teacher, local output index)`` of the teacher whose subset holds global class ``cls``."""
        for t, s in zip(self.teachers, self.subsets, strict=True):
            hit = np.flatnonzero(s == int(cls))
            if hit.size:
                return t, int(hit[0])
        raise ValueError(f"class {cls} is in no subset")


# ------------------------------------------------------------------------------ losses / steps
def kd_loss(student_logits: Tensor, teacher_logits: Tensor | Sequence[Tensor], reduction: str = "sum",
            mask: Tensor | None = None) -> Tensor:
    """Eq. 6: ``1/2 sum_teachers ||y_s - y_teacher||^2`` on logits.

    ``teacher_logits`` is ``(B, T, C)`` or a list of ``T`` tensors ``(B, C)`` (teachers are not trained:
    they are detached). ``mask`` (``(B, T, C)`` of 0/1, e.g. :func:`kd_domain_mask` per teacher) drops the
    entries where a teacher gives no target (Eq. 5's ``x_i in X_{C_t}``). ``reduction='sum'`` sums over
    images and classes (Eq. 6); ``'mean'`` divides by ``B * C``.

    With both kinds of teachers (CPSD) the authors' script weighs ASL and the two MSE terms as Eq. 6 does, up
    to a global factor (``0.5 ASL + 0.25 MSE_CGP + 0.25 MSE_DGP``). With one kind (SD, CGPD, DGPD of Fig. 3,
    ``alpha`` 0 or 1 there) it gives ``0.5 ASL + 0.5 MSE``, twice Eq. 6's ``1/2``: ``kd_weight=2`` reproduces
    that for those students."""
    if not isinstance(teacher_logits, Tensor):
        teacher_logits = torch.stack(list(teacher_logits), dim=1)
    if teacher_logits.ndim == 2:
        teacher_logits = teacher_logits[:, None]
    if teacher_logits.ndim != 3 or teacher_logits.shape[0] != student_logits.shape[0] \
            or teacher_logits.shape[2] != student_logits.shape[1]:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must be (B, T, C) for student logits "
                         f"{tuple(student_logits.shape)}")
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"reduction must be 'sum' (Eq. 6) or 'mean', got {reduction!r}")
    diff = student_logits.float()[:, None] - teacher_logits.detach().float()
    sq = diff.pow(2)
    if mask is not None:
        if mask.shape != sq.shape:
            raise ValueError(f"kd mask {tuple(mask.shape)} must match the teacher logits {tuple(sq.shape)}")
        sq = sq * mask.to(sq.dtype)
    loss = 0.5 * sq.sum()
    return loss if reduction == "sum" else loss / student_logits.numel()


def _asl(options: Mapping[str, Any] | None) -> AsymmetricLoss:
    o = {"gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05, **dict(options or {})}
    return AsymmetricLoss(**o)


class ASLStep:
    """Eqs. 3-4: a (sub-)task model trained with the Asymmetric Loss on its own labels (a third batch item is
    the label mask, e.g. VOC difficult labels with ``difficult_train: ignore``)."""

    def __init__(self, asl: Mapping[str, Any] | None = None):
        self.loss = _asl(asl)

    def __call__(self, model: nn.Module, batch, device):
        mask = batch[2] if len(batch) > 2 else None
        return self.loss(model(batch[0]).float(), batch[1], mask), {}


class DistillationStep:
    """Eq. 7: ``L_cls^C + kd_weight * L_kd`` for the student.

    With ``teachers`` (modules returning global-order logits, e.g. :class:`TeacherEnsemble`) the batch is
    ``(x, y[, mask])`` and the teachers run on it without gradients; without them it is
    ``(x, y, teacher_logits (B, T, C)[, kd_mask (B, T, C)])`` from a :class:`DistillDataset`. A label mask
    (VOC difficult labels) applies to the classification term only. ``kd_subtask_only`` (with ``teachers``;
    default True, Eq. 5) restricts each teacher's KD term to its sub-task's images (:func:`kd_domain_mask`; a
    teacher without ``subsets``, i.e. a full-label one, gives targets everywhere); False distils every teacher on
    every image, as the authors' code does (there the teachers were trained on all images).

    Under the engine's autocast (bf16 on CUDA) the teachers run in bf16, as the student does, and their logits
    are cast to float32 for the loss; the precomputed targets of a :class:`DistillDataset`
    (:func:`predict_logits`) are computed in float32, as evaluation is."""

    def __init__(self, asl: Mapping[str, Any] | None = None, kd_weight: float = 1.0, reduction: str = "sum",
                 teachers: Sequence[nn.Module] | None = None, kd_subtask_only: bool = True):
        if kd_weight < 0:
            raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")
        self.cls = _asl(asl)
        self.kd_weight = float(kd_weight)
        self.reduction = reduction
        self.teachers = list(teachers) if teachers is not None else None
        self.kd_subtask_only = bool(kd_subtask_only)

    def __call__(self, model: nn.Module, batch, device):
        x, y = batch[0], batch[1]
        mask, kd_mask = None, None
        if self.teachers:
            mask = batch[2] if len(batch) > 2 else None
            with torch.no_grad():
                t = torch.stack([teacher.eval().to(x.device)(x).float() for teacher in self.teachers], dim=1)
            if self.kd_subtask_only:
                kd_mask = _teacher_masks(self.teachers, y)
        elif len(batch) > 2:
            t = batch[2]
            kd_mask = batch[3] if len(batch) > 3 else None
        else:
            raise ValueError("DistillationStep needs teacher logits in the batch (x, y, t) or teachers=...")
        logits = model(x).float()
        cls = self.cls(logits, y, mask)
        kd = kd_loss(logits, t, self.reduction, kd_mask)
        return cls + self.kd_weight * kd, {"cls": cls.detach(), "kd": kd.detach()}


class DistillDataset(Dataset):
    """``(x, y, teacher_logits (T, C)[, kd_mask (T, C)])`` items: a :class:`TensorImageDataset` plus
    precomputed teacher logits (and the Eq. 5 mask of each teacher's targets, when given)."""

    def __init__(self, base: TensorImageDataset, teacher_logits: Tensor, kd_mask: Tensor | None = None):
        teacher_logits = torch.as_tensor(teacher_logits, dtype=torch.float32)
        if teacher_logits.ndim == 2:
            teacher_logits = teacher_logits[:, None]
        if len(teacher_logits) != len(base) or teacher_logits.shape[2] != base.targets.shape[1]:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match {len(base)} images with "
                             f"{base.targets.shape[1]} classes")
        if kd_mask is not None:
            kd_mask = torch.as_tensor(kd_mask, dtype=torch.float32)
            if kd_mask.shape != teacher_logits.shape:
                raise ValueError(f"kd_mask {tuple(kd_mask.shape)} must match the teacher logits "
                                 f"{tuple(teacher_logits.shape)}")
        self.base = base
        self.logits = teacher_logits
        self.kd_mask = kd_mask

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return (x, y, self.logits[i]) if self.kd_mask is None else (x, y, self.logits[i], self.kd_mask[i])

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        x = self.base.normalise(self.base._images(idx))  # with the base's transform, as __getitem__
        parts = [x, self.base.targets[idx], self.logits[idx]]
        if self.kd_mask is not None:
            parts.append(self.kd_mask[idx])
        return list(zip(*parts, strict=True))


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: TensorImageDataset, batch_size: int = 256,
                   device: torch.device | str | None = None) -> Tensor:
    """Logits ``(N, C)`` of ``model`` (eval mode) over a dataset, on the CPU."""
    device = pick_device(device) if not isinstance(device, torch.device) else device
    was = model.training
    model.eval().to(device)
    out = []
    for start in range(0, len(dataset), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(dataset)))
        x = dataset.normalise(dataset.images[idx]).to(device)
        out.append(model(x).float().cpu())
    model.train(was)
    return torch.cat(out)


def _digest(h, t: Tensor) -> None:
    """Add the values, dtype and shape of ``t`` (:func:`mlic_lib.utils.object_key`'s digest) and its layout
    (channels_last weights give other float sums) to the hash ``h``."""
    h.update(f"{object_key(t)} {t.stride()}".encode())


def _dataset_digest(dataset: TensorImageDataset) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in (dataset.images, dataset.mean, dataset.std):
        _digest(h, t)
    return h.hexdigest()


#: The temporary files of :func:`teacher_logits`' atomic writes (``.<32 hex digits>.pt.XXXXXXXX.tmp``).
_LOGITS_TEMP_NAME = re.compile(r"\.[0-9a-f]{32}\.pt\.[a-z0-9_]{8}\.tmp")


def teacher_logits(teacher: nn.Module, dataset: TensorImageDataset, data_digest: str | None = None) -> Tensor:
    """:func:`predict_logits` of ``teacher`` over ``dataset``, kept in the run cache (``teacher-logits/``) under a
    hash of the teacher's weights, the images, their normalisation, the device, the torch thread count, the library
    code and torch's version, so that
    students sharing a teacher (CGPD-k, DGPD-k and CPSD-k; the student seeds and variants of the chapter's
    section 3) run it over the training set once. A :class:`TeacherEnsemble` is merged (``rho``) from its teachers'
    logits, each kept alone: the same numbers as ``predict_logits(ensemble, dataset)``."""
    import hashlib
    import pickle

    from mlic_lib.engine import cache_root, remove_stale_temp_files
    from mlic_lib.utils import atomic_torch_save, library_digest, load_checkpoint

    data_digest = data_digest or _dataset_digest(dataset)
    if isinstance(teacher, TeacherEnsemble):
        cat = torch.cat([teacher_logits(t, dataset, data_digest) for t in teacher.teachers], dim=1)
        return _place(cat, teacher.merge_index.cpu(), teacher.num_classes)
    device = pick_device(None)
    # the code that computes them (this module, the models, as the run keys name it) and torch's version too: an
    # edited predict_logits or eval-mode forward would otherwise read the logits of the code before the edit
    code = f"{library_digest((__name__,))} {torch.__version__}"
    h = hashlib.sha256(f"{data_digest} {device} {torch.get_num_threads()} {type(teacher).__qualname__} {code}".encode())
    for name, t in teacher.state_dict().items():
        h.update(name.encode())
        _digest(h, t)
    path = cache_root() / "teacher-logits" / f"{h.hexdigest()[:32]}.pt"
    remove_stale_temp_files(path.parent, names=_LOGITS_TEMP_NAME)  # left by a writer killed mid-write
    try:
        logits = load_checkpoint(path)  # checked against its CRC-32s: a flipped bit is computed again, not distilled
        if isinstance(logits, Tensor) and logits.dtype == torch.float32 and len(logits) == len(dataset):
            return logits
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # not there yet, or unreadable:
        pass  # computed again
    logits = predict_logits(teacher, dataset, device=device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(logits, path)
    except OSError:  # a read-only cache: only this call pays
        pass
    return logits


# --------------------------------------------------------------------------------- training glue
def build_psd_model(model_settings: Mapping[str, Any], num_classes: int, seed: int) -> nn.Module:
    """The common architecture of teachers and student (``model:`` section: backbone, pool, widths, weights)."""
    return build_scene_model(model_settings, num_classes, seed)


@dataclass
class TeacherSpec:
    """Everything that defines one teacher run (picklable, for the process pool)."""

    model: dict
    train: dict
    asl: dict
    subset: list[int]
    images: str
    seed: int
    data_key: Any

    def key(self) -> dict:
        return {"role": "asl-model", "model": self.model, "train": TrainConfig.from_dict(self.train).key_dict(),
                "asl": self.asl,
                "subset": self.subset, "images": self.images, "seed": self.seed, "data": self.data_key}

    def run_dir(self) -> Path:
        # keyed on the code psd and the data modules import, not on this process's imports: `mlic teachers`
        # trains what the chapter then loads
        return run_dir_for(f"psd-asl-{len(self.subset)}c-s{self.seed}", self.key(), code=(__name__,))


def matched_epochs(epochs: int, batch_size: int, n_images: int, n_all: int) -> int:
    """The epochs over ``n_images`` whose optimiser steps come closest to ``epochs`` epochs over ``n_all`` images
    (batches of ``batch_size``, the last one kept), never fewer than ``epochs``: ``psd.teacher_epochs:
    matched_steps``, which gives a teacher on the images containing its classes the training length of a teacher
    on all images."""
    if not 0 < n_images <= n_all or epochs < 1 or batch_size < 1:
        raise ValueError(f"need 0 < n_images <= n_all and epochs, batch_size >= 1, got {n_images}, {n_all}, {epochs}, "
                         f"{batch_size}")
    per_epoch, target = -(-n_images // batch_size), epochs * -(-n_all // batch_size)
    return max(epochs, round(target / per_epoch))


def _teacher_spec(settings: Mapping[str, Any], subset, *, seed: int, train: Mapping | None = None,
                  images: str | None = None, targets=None) -> TeacherSpec:
    """``targets`` (the training labels) are needed only under ``psd.teacher_epochs: matched_steps``."""
    p = settings.get("psd", {})
    overrides = dict(train if train is not None else settings.get("teacher_train", {}))
    spec_train = {**settings["train"], **overrides, "seed": seed}
    images = images or p.get("image_selection", "containing")
    if p.get("teacher_epochs", "fixed") == "matched_steps" and images == "containing":
        if targets is None:
            raise ValueError("psd.teacher_epochs: matched_steps sets each teacher's epochs from its number of images: "
                             "pass the training labels (targets=)")
        targets = np.asarray(targets)
        cfg = TrainConfig.from_dict(spec_train)
        spec_train["epochs"] = matched_epochs(cfg.epochs, cfg.batch_size, len(subtask_indices(targets, subset)),
                                              len(targets))
    return TeacherSpec(model=dict(settings["model"]), train=spec_train,
                       asl=dict(p.get("asl", {})), subset=[int(c) for c in subset],
                       images=images, seed=seed,
                       data_key={"data": settings.get("data"), "chapter": settings.get("chapter")})


def _fit_teacher(spec: TeacherSpec, train_data, targets, device: str | None = None, progress: bool = False,
                 run_dir: str | Path | None = None) -> FitResult:
    cfg = TrainConfig.from_dict({**spec.train, **({"device": device} if device else {})})
    ds = subtask_dataset(train_data, targets, spec.subset, spec.images)
    model = build_psd_model(spec.model, len(spec.subset), spec.seed)
    return fit(model, ds, None, cfg, step=ASLStep(spec.asl), run_dir=run_dir or spec.run_dir(), progress=progress)


def train_teacher(settings: Mapping[str, Any], train_data, targets, subset: Sequence[int], *, seed: int = 0,
                  train: Mapping | None = None, images: str | None = None, progress: bool = False) -> FitResult:
    """Train (or load from the cache) the teacher of one sub-task (Eqs. 3-4).

    ``train_data``: ``uint8`` images or a dataset (see :func:`subtask_dataset`). ``train`` overrides
    ``settings['train']`` (default ``settings['teacher_train']``); ``images`` overrides
    ``settings['psd']['image_selection']``."""
    return _fit_teacher(_teacher_spec(settings, subset, seed=seed, train=train, images=images, targets=targets),
                        train_data, targets,
                        progress=progress)


def _pool_worker(spec: TeacherSpec, train_data, targets) -> tuple[str, bool]:
    run = _fit_teacher(spec, train_data, targets)
    return str(run.run_dir), run.cached


@contextlib.contextmanager
def _single_process_env():
    """Hide torchrun's WORLD_SIZE/RANK from ``fit`` so that each rank trains its own teachers without DDP."""
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ["WORLD_SIZE"], os.environ["RANK"] = "1", "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_done(spec: TeacherSpec) -> bool:
    d = spec.run_dir()
    return (d / "results.json").is_file() and (d / "final.pt").is_file()


def resolve_mode(settings: Mapping[str, Any], parallel: str | None = None) -> str:
    """``'sequential'``, ``'process'`` or ``'torchrun'`` for ``parallel`` (default ``settings['psd']['parallel']``,
    else ``'auto'``). ``'auto'`` is ``'torchrun'`` under ``torchrun`` (``WORLD_SIZE > 1``), else
    :func:`mlic_lib.process_pool.resolve_parallel`'s choice: a process pool on a multi-core CPU (on 2 cores, two
    one-thread workers train the `default` profile's 27 teachers in 28 s instead of 50 s), one run after another on
    a GPU."""
    from mlic_lib.process_pool import resolve_parallel

    mode = parallel or settings.get("psd", {}).get("parallel") or "auto"
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if mode == "process" and under_torchrun:
        raise ValueError("psd.parallel: process under torchrun would start a process pool in every rank, whose "
                         "workers inherit the rank's torchrun variables: use psd.parallel: torchrun (or auto), which "
                         "shares the teachers among the ranks, or run without torchrun")
    if mode == "auto":
        if under_torchrun:
            return "torchrun"
        return resolve_parallel("auto", settings.get("train", {}).get("device"), option="psd.parallel")
    return mode


def _rank_device(local: int) -> str | None:
    """``cuda:local`` for a torchrun process that trains whole runs on its own GPU, made the current CUDA device
    (the loader's pinned-memory thread and device-less CUDA calls use the current one: without it every process
    would also open a context on GPU 0); ``None`` without CUDA."""
    if not torch.cuda.is_available():
        return None
    if local >= torch.cuda.device_count():
        raise RuntimeError(f"torchrun started process {local} on this node, but it has {torch.cuda.device_count()} "
                           "CUDA device(s), one per process: launch with --nproc_per_node at most the number of GPUs")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process alone keeps its caller's current device
        torch.cuda.set_device(local)
    return f"cuda:{local}"


def train_teachers(settings: Mapping[str, Any], train_data, targets, subsets: Sequence[Sequence[int]], *,
                   seed: int = 0, parallel: str | None = None, max_workers: int | None = None,
                   timeout_s: float = 24 * 3600) -> tuple[TeacherEnsemble, list[FitResult]]:
    """All teachers of one decomposition, then ``rho`` over them (:class:`TeacherEnsemble`).

    ``train_data``: ``uint8`` images ``(N, 3, H, W)`` or a map-style dataset (see :func:`subtask_dataset`).

    ``parallel`` (default ``settings['psd']['parallel']`` or ``'auto'``):

    * ``'sequential'``: one after the other in this process;
    * ``'process'``: :func:`mlic_lib.process_pool.map_in_processes` (``max_workers``, default one per CPU,
      at most one per teacher), each worker with ``cpus // workers`` threads, training the teachers not yet cached;
    * ``'torchrun'``: under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` trains teachers ``r, r + W, ...``
      on ``cuda:LOCAL_RANK`` (no DDP), then waits until every teacher is in the cache;
    * ``'auto'``: see :func:`resolve_mode`.

    Every teacher is cached under a hash of its spec, so all modes end by loading the same files, and a
    teacher shared by two studies (CGPD and CPSD) is trained once. A pool started for one decomposition has only
    ``k`` tasks; to train many decompositions, :func:`pretrain_teachers` puts all their teachers in one pool.
    """
    mode = resolve_mode(settings, parallel)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not isinstance(train_data, Dataset):
        train_data = np.asarray(train_data)
    targets = np.asarray(targets)
    C = targets.shape[1]
    from mlic_lib.partition import check_partition

    check_partition(subsets, C)
    specs = [_teacher_spec(settings, s, seed=seed, targets=targets) for s in subsets]
    todo = [i for i, s in enumerate(specs) if not _is_done(s)]
    pooled: dict[int, tuple[str, bool]] = {}  # {teacher: (run folder, cached)} from the workers
    if mode == "process" and todo:
        from mlic_lib.process_pool import run_missing

        # loaded below, as the workers wrote them
        pooled = run_missing(_pool_worker, {i: (s, train_data, targets) for i, s in enumerate(specs)},
                             lambda i: i not in todo, max_workers=max_workers)
    elif mode == "torchrun" and world > 1:
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = _rank_device(local) or "cpu"
        with _single_process_env():
            for i, s in enumerate(specs):
                if i % world == rank and not _is_done(s):
                    _fit_teacher(s, train_data, targets, device=device)
        deadline = time.monotonic() + timeout_s
        while not all(_is_done(s) for s in specs):
            if time.monotonic() > deadline:
                raise TimeoutError("other ranks did not finish their teachers in time")
            time.sleep(2.0)
    # trains what is left, else loads
    results = [_fit_teacher(s, train_data, targets, run_dir=pooled[i][0] if i in pooled else None)
               for i, s in enumerate(specs)]
    for i, (_, cached) in pooled.items():  # loaded here from a worker's folder: a cache hit only if it was one there
        results[i].cached = cached
    ensemble = TeacherEnsemble([r.model for r in results], subsets, C, specs=specs).eval()
    return ensemble, results


def train_baseline(settings: Mapping[str, Any], data, *, seed: int = 0) -> FitResult:
    """The plain model: the full label set, ASL, the student's recipe (``settings['train']``), evaluated
    on the test set. Its run is the same as a full-label teacher trained with that recipe."""
    spec = _baseline_spec(settings, data.num_classes, seed)
    model = build_psd_model(spec.model, data.num_classes, seed)
    return fit(model, data.train_ds, data.test_ds, TrainConfig.from_dict(spec.train), step=ASLStep(spec.asl),
               run_dir=_baseline_run_dir(settings, data.num_classes, seed, spec), progress=False)


def _baseline_spec(settings: Mapping[str, Any], num_classes: int, seed: int) -> TeacherSpec:
    return _teacher_spec(settings, range(num_classes), seed=seed, train={}, images="all")


def _baseline_run_dir(settings: Mapping[str, Any], num_classes: int, seed: int,
                      spec: TeacherSpec | None = None) -> Path:
    spec = spec or _baseline_spec(settings, num_classes, seed)
    return run_dir_for(f"psd-baseline-s{seed}", {**spec.key(), "role": "baseline"}, code=(__name__,))


def _kd_subtask_only(p: Mapping[str, Any]) -> bool:
    kd_images = p.get("kd_images", "subtask")
    if kd_images not in KD_IMAGES:
        raise ValueError(f"psd.kd_images must be one of {KD_IMAGES} ('subtask' = Eq. 5), got {kd_images!r}")
    return kd_images == "subtask" and p.get("image_selection", "containing") == "containing"


def _student_run_dir(settings: Mapping[str, Any], seed: int, name: str, teacher_key: Any) -> Path:
    p = settings.get("psd", {})
    cfg = TrainConfig.from_dict({**settings["train"], "seed": seed})
    key = {"role": "student", "name": name, "model": dict(settings["model"]), "train": cfg.key_dict(),
           "asl": dict(p.get("asl", {})), "kd_weight": p.get("kd_weight", 1.0),
           "kd_reduction": p.get("kd_reduction", "sum"), "teachers": teacher_key, "seed": seed,
           "kd_subtask_only": _kd_subtask_only(p), "data": settings.get("data"), "chapter": settings.get("chapter")}
    return run_dir_for(f"psd-{name}-s{seed}", key, code=(__name__,))


def _teachers_key(teachers: Sequence[nn.Module], teacher_key: Any) -> Any:
    """The cache-key fragment naming a student's teachers: ``teacher_key`` when given, else each teacher's own
    (an ensemble's ``run_key`` from :func:`decomposition_teachers`, or its teachers' :class:`TeacherSpec` run
    folders). Teachers that cannot name themselves are refused: a student keyed on ``None`` would be loaded back
    for any other teachers."""
    if teacher_key is not None:
        return teacher_key
    keys = []
    for t in teachers:
        if getattr(t, "run_key", None) is not None:
            keys.append(t.run_key)
        elif getattr(t, "specs", None) is not None:
            keys.append([spec.run_dir().name for spec in t.specs])
        else:
            raise ValueError(f"teacher_key is needed: a teacher ({type(t).__name__}) has no run_key or TeacherSpec "
                             "to name it in the student's cache key, so another set of teachers would load this "
                             "student back. Pass teacher_key= (e.g. psd.teacher_key(runs) of the teachers' FitResults)")
    return keys[0] if len(keys) == 1 else keys


def train_student(settings: Mapping[str, Any], data, teachers: Sequence[nn.Module], *, seed: int = 0,
                  name: str = "student", teacher_key: Any = None) -> FitResult:
    """Eq. 7: distil ``teachers`` (global-order logit models, e.g. :class:`TeacherEnsemble`) into a student of
    the same architecture on the full task. ``teacher_key`` (e.g. the teachers' run dirs) enters the cache
    key; by default each teacher's own (an ensemble's ``run_key`` or its specs' run folders; a teacher with
    neither is refused). On an in-memory :class:`TensorImageDataset` without a transform the teacher logits of the
    training set are computed once; on any other dataset (real images, or any augmentation) the teachers run on each
    training batch, so they see the very images the student sees (as in the authors' code).
    ``psd.kd_images`` (``'subtask'``, default, Eq. 5; or ``'all'``) says where each teacher's KD term applies;
    it only matters when the teachers were trained on ``image_selection: containing``."""
    p = settings.get("psd", {})
    subtask_only = _kd_subtask_only(p)
    cfg = TrainConfig.from_dict({**settings["train"], "seed": seed})
    run_dir = _student_run_dir(settings, seed, name, _teachers_key(teachers, teacher_key))
    model = build_psd_model(settings["model"], data.num_classes, seed)
    on_the_fly = not isinstance(data.train_ds, TensorImageDataset) or data.train_ds.transform is not None
    if on_the_fly or is_finished(run_dir):
        ds: Dataset = data.train_ds  # augmented images (teachers run per batch), or cached: fit only loads
    else:
        digest = _dataset_digest(data.train_ds)
        logits = torch.stack([teacher_logits(t, data.train_ds, digest) for t in teachers], dim=1)
        masks = _teacher_masks(teachers, data.train_ds.targets) if subtask_only else None
        ds = DistillDataset(data.train_ds, logits, masks)
    step = DistillationStep(p.get("asl"), p.get("kd_weight", 1.0), p.get("kd_reduction", "sum"),
                            teachers=list(teachers) if on_the_fly else None, kd_subtask_only=subtask_only)
    return fit(model, ds, data.test_ds, cfg, step=step, run_dir=run_dir, progress=False)


def teacher_key(results: Sequence[FitResult]) -> list[str]:
    """A cache-key fragment naming a set of teachers by their run directories."""
    return [Path(r.run_dir).name if r.run_dir is not None else "uncached" for r in results]


@dataclass
class RunRequest:
    """One run for :func:`train_runs`: a student of ``teachers`` (:func:`train_student`, Eq. 7), or, with no
    teachers, the baseline (:func:`train_baseline`). ``teacher_key`` enters the student's cache key as in
    :func:`train_student` (default: the teachers' own)."""

    settings: Mapping[str, Any]
    seed: int = 0
    name: str = "student"
    teachers: Sequence[TeacherEnsemble] = ()
    teacher_key: Any = None

    def run_dir(self, num_classes: int) -> Path:
        if not self.teachers:
            return _baseline_run_dir(self.settings, num_classes, self.seed)
        return _student_run_dir(self.settings, self.seed, self.name, _teachers_key(self.teachers, self.teacher_key))


def _run_request(req: RunRequest, data) -> FitResult:
    if not req.teachers:
        return train_baseline(req.settings, data, seed=req.seed)
    return train_student(req.settings, data, req.teachers, seed=req.seed, name=req.name, teacher_key=req.teacher_key)


def _pool_request(req: RunRequest, specs: list[list[TeacherSpec]], data) -> tuple[str, bool]:
    """A pool worker's run: the teachers are loaded from the cache (their specs), not sent pickled; one missing
    there (a cleaned cache, another ``MLIC_CACHE``) is an error, not a silent retraining."""
    missing = [str(s.run_dir()) for group in specs for s in group if not _is_done(s)]
    if missing:
        raise RuntimeError(f"a student's teachers are not in the run cache ({missing}); train_runs' pool workers load "
                           "them from there: train them first (train_teachers) with the same MLIC_CACHE")
    ensembles = [TeacherEnsemble([_fit_teacher(s, _teacher_images(data), data.train_targets).model for s in group],
                                 [s.subset for s in group], data.num_classes, specs=group).eval() for group in specs]
    run = _run_request(dataclasses.replace(req, teachers=ensembles), data)
    return str(run.run_dir), run.cached


def train_runs(requests: Sequence[RunRequest], data, *, parallel: str | None = None,
               max_workers: int | None = None) -> list[FitResult]:
    """Train (or load) independent students and baselines, one :class:`~mlic_lib.engine.FitResult` per request, in
    the requests' order (:func:`train_student` or :func:`train_baseline` each).

    ``parallel`` (default the first request's ``psd.parallel``, see :func:`resolve_mode`): ``'process'`` trains the
    runs not yet cached in one process pool (:func:`mlic_lib.process_pool.run_missing`; its workers load each
    student's teachers from the run cache, so every teacher needs its :class:`TeacherSpec`, as those of
    :func:`train_teachers` have), then loads them all here; any other mode trains them one after another in this
    process (under ``torchrun`` every rank takes part in each run, as in :func:`train_student`). The results are
    the same files either way."""
    requests = list(requests)
    if not requests:
        return []
    mode = resolve_mode(requests[0].settings, parallel)
    if mode == "process":
        from mlic_lib.process_pool import run_missing

        unspecced = [r.name for r in requests if any(e.specs is None for e in r.teachers)]
        if unspecced:
            raise ValueError(f"parallel='process' loads each student's teachers from the run cache, but the teachers "
                             f"of {unspecced} have no TeacherSpec (they were not made by train_teachers): train them "
                             "with train_teachers / decomposition_teachers, or use parallel='sequential'")
        jobs = {i: (dataclasses.replace(r, teachers=()), [list(e.specs) for e in r.teachers], data)
                for i, r in enumerate(requests)}
        pooled = run_missing(_pool_request, jobs, lambda i: is_finished(requests[i].run_dir(data.num_classes)),
                             max_workers=max_workers, desc="students and baselines")
    else:
        pooled = {}
    results = [_run_request(r, data) for r in requests]  # trains what is left, else loads what the workers wrote
    for i, (_, cached) in pooled.items():  # a cache hit only if it was one in the worker
        results[i].cached = cached
    return results


# ------------------------------------------------------------------------------------ the study
def _decompose(settings: Mapping[str, Any], S: np.ndarray, strategy: str, k: int, num_classes: int,
               rseed: int = 0) -> list[np.ndarray]:
    """The ``k`` subsets of one decomposition with the profile's partition options (Eqs. 1-2)."""
    from mlic_lib.partition import partition_labels

    p = settings.get("psd", {})
    return partition_labels(strategy, k, S=S, num_classes=num_classes, tau=p.get("tau", 3.0),
                            complement=p.get("complement", "ones"),
                            seed=rseed if strategy == "random" else p.get("cluster_seed", 0),
                            n_init=p.get("n_init", 20), laplacian=p.get("laplacian", "eq2"),
                            random_sizes=p.get("random_sizes", "equal"))


def _teacher_images(data):
    """The training dataset the student reads: the teachers see its images with its normalisation and augmentation
    (in-memory scenes keep their batched fetches, :func:`subtask_dataset`)."""
    return data.train_ds


def study_inputs(settings: Mapping[str, Any]):
    """``(data, S)`` of the chapter: the profile's data (``RealData`` for a real dataset, else the embedded scenes'
    ``SceneData``) and the class co-occurrence matrix of its training labels (Eq. 1's ``S``). The chapter and
    ``mlic teachers`` both build them here, so their teachers' cache keys agree."""
    from mlic_lib.data.real import is_real, real_data
    from mlic_lib.experiments import scene_data
    from mlic_lib.partition import similarity_matrix

    data = real_data(settings["data"]) if is_real(settings["data"]) else scene_data(settings)
    return data, similarity_matrix(targets=data.train_targets)


def check_options(p: Mapping[str, Any]) -> None:
    """Check a profile's ``psd`` section before anything trains (a bad value would otherwise surface only after
    the teachers, hours into a ``full`` run). Raises ``ValueError`` naming the key and its valid values."""
    from mlic_lib.checks import number, whole_list
    from mlic_lib.partition import COMPLEMENTS, LAPLACIANS, RANDOM_SIZES

    choices = {"image_selection": IMAGE_SELECTIONS, "kd_images": KD_IMAGES, "parallel": PARALLEL_MODES,
               "teacher_epochs": TEACHER_EPOCHS,
               "laplacian": LAPLACIANS, "complement": COMPLEMENTS, "kd_reduction": KD_REDUCTIONS,
               "random_sizes": RANDOM_SIZES}
    for key, valid in choices.items():
        if key in p and p[key] not in valid:
            raise ValueError(f"psd.{key} must be one of {valid}, got {p[key]!r}")
    if p.get("complement") == "identity":
        raise ValueError("psd.complement: 'identity' is Eq. 1 as printed, P- = I - R, whose off-diagonal weights are "
                         "negative: the DGP graph has no normalised cut and spectral_partition refuses it. Use "
                         "'ones' (P- = 1 - R, the authors' code); 'identity' is for mlic_lib.partition.affinity only")
    def at_least(low: float, whole: bool = False, strict: bool = False):
        return lambda v: (x := number(v, whole)) is not None and (x > low if strict else x >= low)

    checks = {  # key: (test, what it must be)
        "cpsd_k": (at_least(2, whole=True), "a whole number >= 2 (k = 1 is self-distillation, one teacher)"),
        "n_init": (at_least(1, whole=True), "a whole number >= 1"),
        "cluster_seed": (at_least(0, whole=True), "a whole number >= 0"),
        "ks": (lambda v: whole_list(v, 1), "a non-empty list of whole numbers >= 1"),
        "random_seeds": (lambda v: whole_list(v, 0), "a non-empty list of whole numbers >= 0"),
        "tau": (at_least(0, strict=True), "a number > 0"),
        "kd_weight": (at_least(0), "a number >= 0"),
    }
    checks["matched_steps_check"] = (lambda v: isinstance(v, bool), "true or false")
    for key, (ok, what) in checks.items():
        if key in p and not ok(p[key]):
            raise ValueError(f"psd.{key} must be {what}, got {p[key]!r}")
    if isinstance(p.get("asl"), Mapping):  # Eq. 4's parameters, as every teacher's and student's step takes them
        try:
            _asl(p["asl"])
        except (ValueError, TypeError) as err:
            raise ValueError(f"psd.asl: {err}") from None
    if "ks" in p and any(a >= b for a, b in zip(p["ks"][:-1], p["ks"][1:], strict=True)):
        raise ValueError(f"psd.ks must be in ascending order without repeats (Fig. 3's x-axis: the chapter reads its "
                         f"trends from the first k to the last), got {list(p['ks'])}; e.g. {sorted(set(p['ks']))}")
    if "ks" in p and int(p.get("cpsd_k", 5)) not in [int(k) for k in p["ks"]]:
        raise ValueError(f"psd.cpsd_k ({p.get('cpsd_k', 5)}) must be one of psd.ks ({list(p['ks'])}): Table 3 compares "
                         "the CPSD student with the CGPD and DGPD students of that k, which are trained for each k "
                         "of psd.ks (add it to ks, or pick a cpsd_k from them)")


def study_decompositions(settings: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """The ``(strategy, k, random seed)`` decompositions whose teachers :func:`run_study` trains, in its order:
    ``k = 1`` (the SD teacher), CGP, DGP and the random partitions of every other ``k`` in ``psd.ks``, then CGP and
    DGP at ``psd.cpsd_k``."""
    p = settings.get("psd", {})
    check_options(p)
    plan = [("cgp", 1, 0)]
    for k in (int(k) for k in p.get("ks", [1, 2, 3, 5])):
        if k != 1:
            plan += [("cgp", k, 0), ("dgp", k, 0)] + [("random", k, int(r)) for r in p.get("random_seeds", [0])]
    cpsd_k = int(p.get("cpsd_k", 5))
    plan += [("cgp", cpsd_k, 0), ("dgp", cpsd_k, 0)]
    return list(dict.fromkeys(plan))


def planned_decompositions(settings: Mapping[str, Any], data, S: np.ndarray) -> dict[tuple[str, int, int], list]:
    """Every decomposition of :func:`study_decompositions`, computed and checked before anything trains:
    ``{(strategy, k, random seed): subsets}``. A ``k`` larger than the number of classes, or (under
    ``image_selection: containing``) a sub-task whose classes no training image contains, raises here, not
    hours into a run when its teacher's turn comes."""
    sel = settings.get("psd", {}).get("image_selection", "containing")
    out = {}
    for strategy, k, rseed in study_decompositions(settings):
        subsets = _decompose(settings, S, strategy, k, data.num_classes, rseed)
        empty = [list(map(int, sub)) for sub in subsets
                 if sel == "containing" and len(subtask_indices(data.train_targets, sub)) == 0]
        if empty:
            raise ValueError(f"the {strategy.upper()} decomposition at k={k} has sub-task(s) {empty} whose classes no "
                             f"training image contains (classes without a training positive form such a sub-task), so "
                             "their teachers would have nothing to train on: use more training images (data.n_train), "
                             "or psd.image_selection: all (the authors' code)")
        out[strategy, k, rseed] = subsets
    return out


def teacher_steps(settings: Mapping[str, Any], subsets: Sequence[Sequence[int]], targets) -> list[int]:
    """The optimiser steps each teacher of ``subsets`` takes under ``settings`` (its images, epochs and batch size,
    ``psd.teacher_epochs`` included; one process, the last batch of an epoch kept, as :func:`train_teachers`)."""
    targets = np.asarray(targets)
    out = []
    for sub in subsets:
        spec = _teacher_spec(settings, sub, seed=0, targets=targets)
        n = len(subtask_indices(targets, sub, spec.images))
        cfg = TrainConfig.from_dict(spec.train)
        out.append(cfg.epochs * -(-n // cfg.batch_size))
    return out


def selection_variants(settings: Mapping[str, Any]) -> dict[str, dict]:
    """The teacher settings the chapter's section 3b sets beside the profile's own, by column name: the other
    ``image_selection``; and, when the profile's teachers see only the images containing their classes for a fixed
    number of epochs and ``psd.matched_steps_check`` is on (the default), those teachers trained for as many
    optimiser steps as teachers on all images (``'containing, matched steps'``, ``teacher_epochs: matched_steps``),
    which separates the training length from the images in the difference between the two selections."""
    p = settings.get("psd", {})
    sel = p.get("image_selection", "containing")
    alt = "all" if sel == "containing" else "containing"
    out = {alt: {**settings, "psd": {**p, "image_selection": alt, "teacher_epochs": "fixed"}}}
    if sel == "containing" and p.get("teacher_epochs", "fixed") == "fixed" and p.get("matched_steps_check", True):
        out["containing, matched steps"] = {**settings, "psd": {**p, "teacher_epochs": "matched_steps"}}
    return out


def pretrain_teachers(settings: Mapping[str, Any], data, S: np.ndarray, *, seed: int = 0,
                      other_selection: bool = True, progress: bool = True, parallel: str | None = None,
                      max_workers: int | None = None) -> int:
    """Train every teacher the chapter needs into the cache, in one process pool or the ranks of ``torchrun``
    sharing them.

    The teachers are those of :func:`study_decompositions` and, with ``other_selection``, the CGP and DGP teachers
    at ``cpsd_k`` of each :func:`selection_variants` (the chapter's section 3b). Under ``torchrun``
    (``WORLD_SIZE > 1``) rank ``r`` trains teachers ``r, r + W, ...`` of the whole list on ``cuda:LOCAL_RANK``,
    without DDP and without waiting for the other ranks between decompositions. In one process, ``parallel``
    (default ``psd.parallel``, see :func:`resolve_mode`) ``'process'`` trains them all in one process pool, else
    one after another (``max_workers``: the pool's size, default one per CPU). A teacher already in the cache is
    skipped, so an interrupted run resumes. Afterwards the
    chapter (``mlic reproduce psd``) finds every teacher cached and trains only the students. Returns the number
    of teachers this process (or its pool) trained.
    """
    from tqdm.auto import tqdm

    from mlic_lib.utils import distributed_info

    mode = resolve_mode(settings, parallel)
    p = settings.get("psd", {})
    jobs = [(settings, sub) for subsets in planned_decompositions(settings, data, S).values() for sub in subsets]
    if other_selection:
        jobs += [(v, sub) for v in selection_variants(settings).values() for strat in ("cgp", "dgp")
                 for sub in _decompose(v, S, strat, int(p.get("cpsd_k", 5)), data.num_classes)]
    specs = list({spec.run_dir(): spec for spec in (_teacher_spec(st, sub, seed=seed, targets=data.train_targets)
                                                    for st, sub in jobs)}.values())
    world, rank, local = distributed_info()
    if world == 1 and mode == "process":
        from mlic_lib.process_pool import run_missing

        images = _teacher_images(data)
        jobs = {i: (spec, images, data.train_targets) for i, spec in enumerate(specs)}
        out = run_missing(_pool_worker, jobs, lambda i: _is_done(specs[i]), max_workers=max_workers,
                          desc="teachers" if progress else None)
        return sum(not cached for _, cached in out.values())  # another process may have finished one meanwhile
    device = _rank_device(local)
    mine = [s for i, s in enumerate(specs) if i % world == rank and not _is_done(s)]
    with _single_process_env():
        for spec in tqdm(mine, desc=f"teachers (rank {rank} of {world})", disable=not progress):
            _fit_teacher(spec, _teacher_images(data), data.train_targets, device=device)
    return len(mine)


def decomposition_teachers(settings: Mapping[str, Any], data, S: np.ndarray, strategy: str, k: int, *,
                           seed: int = 0, rseed: int = 0, subsets: list[np.ndarray] | None = None,
                           parallel: str | None = None) -> tuple[list[np.ndarray], TeacherEnsemble, float]:
    """One task decomposition and its teachers: ``(subsets, rho-merged ensemble, ensemble test mAP)``.

    ``strategy`` is ``'cgp'``, ``'dgp'`` or ``'random'`` (seeded by ``rseed``); the partition uses the profile's
    ``tau``, ``complement``, ``cluster_seed`` and ``n_init``, the teachers ``teacher_train`` and
    ``image_selection``. ``data`` is a ``SceneData`` (uint8 fast path) or a ``RealData`` (image files). The
    ensemble carries ``run_key`` (its teachers' run directories) for the student's cache key. ``subsets``: the
    decomposition when already computed (:func:`planned_decompositions`). ``parallel``: as :func:`train_teachers`."""
    from mlic_lib.engine import evaluate

    if subsets is None:
        subsets = _decompose(settings, S, strategy, k, data.num_classes, rseed)
    ens, runs = train_teachers(settings, _teacher_images(data), data.train_targets, subsets, seed=seed,
                               parallel=parallel)
    ens.run_key = teacher_key(runs)  # type: ignore[attr-defined]
    workers = int(settings["train"].get("num_workers", 0))
    emap = float(evaluate(ens, data.test_ds, num_workers=workers).metrics["mAP"])
    return subsets, ens, emap


@dataclass
class PSDStudy:
    """Everything the chapter reports: decompositions, teacher ensembles, students and the baseline.

    ``students`` maps ``'sd'``, ``'cgpd-k'``, ``'dgpd-k'``, ``'random-k-s<seed>'`` and ``'cpsd-k'`` to their
    runs; ``ensemble_map`` holds the test mAP of each merged teacher ensemble (``rho`` of Eq. 5)."""

    subsets: dict[tuple[str, int, int], list[np.ndarray]]
    ensembles: dict[tuple[str, int, int], TeacherEnsemble]
    ensemble_map: dict[tuple[str, int, int], float]
    students: dict[str, FitResult]
    baseline: FitResult
    seconds: float

    def student_map(self, name: str) -> float:
        return float(self.students[name].final["mAP"])


def run_study(settings: Mapping[str, Any], data, S: np.ndarray, *, seed: int = 0,
              parallel: str | None = None, max_workers: int | None = None) -> PSDStudy:
    """Fig. 3 and Table 3 of the paper on ``data``: baseline, SD, CGPD / DGPD / random students for every
    ``k`` in ``settings['psd']['ks']`` and the CPSD student at ``settings['psd']['cpsd_k']``.

    Decompositions come from ``S`` (:func:`mlic_lib.partition.similarity_matrix` of the training labels) with
    the profile's ``tau`` and ``complement``. Teachers are shared: the CGP and DGP teachers of ``cpsd_k`` serve
    the CGPD, DGPD and CPSD students; the ``k = 1`` teacher (the whole task) is the SD teacher.

    The teachers train first, then the baseline and the students (:func:`train_runs`). ``parallel`` (default
    ``psd.parallel``, see :func:`resolve_mode`) ``'process'`` trains all teachers in one process pool
    (:func:`pretrain_teachers`) and then the baseline and all students in another: two pool start-ups instead of
    one per decomposition (``max_workers``: their size, default one per CPU)."""
    t0 = time.perf_counter()
    p = settings.get("psd", {})
    ks = [int(k) for k in p.get("ks", [1, 2, 3, 5])]
    cpsd_k = int(p.get("cpsd_k", 5))
    random_seeds = [int(s) for s in p.get("random_seeds", [0])]
    mode = resolve_mode(settings, parallel)
    plan = planned_decompositions(settings, data, S)  # all of them checked before the first run trains
    if mode == "process":
        pretrain_teachers(settings, data, S, seed=seed, other_selection=False, progress=False, parallel=mode,
                          max_workers=max_workers)
    subsets: dict = {}
    ensembles: dict = {}
    emap: dict = {}
    for key, subs in plan.items():  # trains what no pool did, else loads
        subsets[key], ensembles[key], emap[key] = decomposition_teachers(settings, data, S, key[0], key[1], seed=seed,
                                                                         rseed=key[2], subsets=subs, parallel=mode)

    def student(run_name: str, *keys: tuple[str, int, int]) -> RunRequest:
        return RunRequest(settings, seed, run_name, [ensembles[k] for k in keys])  # keyed on their run_keys

    requests = {"baseline": RunRequest(settings, seed, "baseline"), "sd": student("sd", ("cgp", 1, 0))}
    for k in ks:
        if k == 1:
            continue
        for strategy in ("cgp", "dgp"):
            requests[f"{strategy}d-{k}"] = student(f"{strategy}d-{k}", (strategy, k, 0))
        for rs in random_seeds:
            requests[f"random-{k}-s{rs}"] = student(f"random-{k}", ("random", k, rs))
    requests[f"cpsd-{cpsd_k}"] = student(f"cpsd-{cpsd_k}", ("cgp", cpsd_k, 0), ("dgp", cpsd_k, 0))
    runs = dict(zip(requests, train_runs(list(requests.values()), data, parallel=mode, max_workers=max_workers),
                    strict=True))
    baseline = runs.pop("baseline")
    return PSDStudy(subsets, ensembles, emap, runs, baseline, time.perf_counter() - t0)
