"""Training engine shared by every chapter: ``fit`` = ``train_one_epoch`` + ``evaluate`` per epoch.

Modelled on torchvision's ``references/classification``. What it adds for the book:

* **methods plug in as a step**: ``step(model, batch, device) -> (loss, logs)``. The default
  :class:`SupervisedStep` is ``loss_fn(model(x), y)``; a chapter's method (SpliceMix, INDeeD, ...)
  supplies its own step and keeps the rest of the loop. A step may also define
  ``host_batch(batch) -> batch``, called on the loader's CPU batch before the copy to the device, for
  work that needs the labels on the host (INDeeD draws its pairs there; drawing them from labels on a
  GPU would make the host wait for the device at every step);
* **checkpoints and resume**: with a ``run_dir`` every epoch ends with an atomic ``last.pt``
  (model, optimizer, scheduler, EMA, RNG states, history); an interrupted ``fit`` called again
  continues where it stopped and ends with the same numbers as an uninterrupted run (exactly on a CPU; on a
  GPU only as exactly as two uninterrupted runs agree, since nothing turns on deterministic algorithms, e.g.
  cuDNN's or atomics in backward kernels). A run folder is only
  loaded or resumed by the training config that wrote it (up to :data:`RUN_CONFIG_IGNORED`); a damaged file in
  it is moved aside (``<name>.corrupt``) with a warning and the run trained again, and the temporary files a
  killed writer left there are removed;
* **cache**: :func:`run_dir_for` names the folder after a hash of (config, library version, library
  source), so a finished run is loaded instead of retrained (``results.json`` + ``final.pt``);
* **GPU path**: bf16 autocast (training; evaluation runs in fp32) and channels_last on CUDA, non-blocking
  copies, losses accumulated on the device (one host sync per logging interval, not per step), an EMA of the
  weights that does not wait for the GPU (:class:`mlic_lib.ema.WeightEMA`); DDP under
  ``torchrun`` (``WORLD_SIZE > 1``) with a ``DistributedSampler``; a run folder records the number of processes
  and refuses to resume or load under another.

Checkpoints are read with ``torch.load(weights_only=True)``, after their records are checked against the CRC-32s of
the zip archive (:func:`mlic_lib.utils.verify_checkpoint`: ``torch.load`` does not notice a flipped bit in the weights).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import random
import re
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mlic_lib import metrics as M
from mlic_lib.losses import BCEWithLogits
from mlic_lib.utils import (
    atomic_torch_save,
    atomic_write_json,
    bar_disabled,
    config_hash,
    distributed_info,
    env_path,
    load_checkpoint,
    model_device,
    pick_device,
    seed_everything,
    verify_checkpoint,
)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "onecycle", "step", "cosine", "cosine_restarts")
AMP_MODES = ("auto", "bf16", "fp16", "off")


def _typed(name: str, value: Any, kind: str) -> Any:
    """``value`` checked against a :class:`TrainConfig` field's annotation ``kind`` (``'int'``, ``'float | None'``,
    ...). A number written as text (``'1e-3'``: YAML 1.1 reads an exponent without a dot as a string) becomes a
    number; anything else of the wrong type is a ``ValueError`` naming the option."""
    base, optional = kind.replace(" | None", ""), kind.endswith("| None")
    if value is None:
        if optional:
            return None
        raise ValueError(f"train option {name!r} needs a value ({base}), got null")
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        value = value.item()  # a numpy or 0-d torch scalar, e.g. from np.logspace in a sweep
    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"train option {name!r} takes true or false, got {value!r}")
        return value
    if base in ("int", "float"):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"train option {name!r} takes a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"train option {name!r} takes a finite number, got {value!r}")
        if base == "int":
            if value != int(value):
                raise ValueError(f"train option {name!r} takes a whole number, got {value!r}")
            return int(value)
        return float(value)  # 0 and 0.0 are one setting, so one cache key
    if base == "str":
        if not isinstance(value, str):
            hint = (" (YAML reads off/on/yes/no as false/true: quote the name, e.g. -o \"train.amp='off'\")"
                    if isinstance(value, bool) else "")
            raise ValueError(f"train option {name!r} takes a name (text), got {value!r}{hint}")
        return value
    if base.startswith("tuple"):  # milestones: whole numbers
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ValueError(f"train option {name!r} takes a list of epochs, e.g. [40, 60]; got {value!r}")
        return tuple(_typed(name, v, "int") for v in value)
    return value


@dataclass
class TrainConfig:
    """Hyper-parameters of one ``fit``. Built from a profile's ``train:`` section via :meth:`from_dict`."""

    epochs: int = 10
    batch_size: int = 64  # per process: under torchrun with W processes the global batch is W * batch_size
    eval_batch_size: int = 256
    eval_every: int = 1  # evaluate ``val_data`` after every k-th epoch and always after the last; 0 = last only
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 1.0  # lr factor for parameters under ``model.features`` (SpliceMix: 0.1)
    decay_norm_and_bias: bool = True  # False: no weight decay on biases, norm weights, other 1-d or scalar
    #   parameters (as ASL's and timm's "filter_bias_and_bn") and the names a submodule's ``no_weight_decay()`` lists
    scheduler: str = "onecycle"
    onecycle_pct_start: float = 0.2  # share of the steps one-cycle spends warming up (ASL: 0.2; CPSD's code: 0.1)
    milestones: tuple[int, ...] = ()  # epochs at which 'step' multiplies the lr by ``gamma``
    gamma: float = 0.1
    restart_epochs: float = 10.0  # 'cosine_restarts' (SGDR, Loshchilov & Hutter 2017): length T_0 of the first cycle
    restart_mult: int = 2  # and the factor T_mult by which each next cycle is longer
    warmup_epochs: float = 0.0  # linear warm-up for 'step' / 'cosine' / 'cosine_restarts'
    warmup_steps: int = 0  # the warm-up in optimiser steps instead (wins over warmup_epochs when > 0)
    warmup_start: float = 0.0  # lr factor the linear warm-up starts from (mmcv / DistributionBalancedLoss: 1/3)
    ema_decay: float | None = None  # evaluate an exponential moving average of the weights
    grad_clip: float | None = None
    amp: str = "auto"  # training steps: auto = bf16 autocast on CUDA, off on CPU (evaluation always runs in fp32)
    channels_last: bool | None = None  # None = on for CUDA. On a CPU it speeds up small convnets too (the CPU profiles
    #   turn it on), but torch 2.13's CPU weight gradient of a *strided 1x1* convolution corrupts memory in it with odd
    #   batch sizes and >1 thread: small_resnet avoids that op (models.backbones.StridedPointwiseConv), torchvision
    #   ResNets' shortcuts do not
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    log_every: int = 20

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), str(f.type)))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not self.weight_decay >= 0:
            raise ValueError(f"lr must be a finite number > 0 and weight_decay >= 0, got {self.lr} and "
                             f"{self.weight_decay}")
        if self.eval_batch_size < 1 or self.log_every < 1 or self.num_workers < 0:
            raise ValueError(f"eval_batch_size and log_every must be >= 1 and num_workers >= 0, got "
                             f"{self.eval_batch_size}, {self.log_every} and {self.num_workers}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (the largest gradient norm) or null for no clipping, got "
                             f"{self.grad_clip}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = evaluate after the last epoch only), got {self.eval_every}")
        if self.warmup_steps < 0 or self.warmup_epochs < 0 or not 0.0 <= self.warmup_start < 1.0:
            raise ValueError("warmup_steps and warmup_epochs must be >= 0 and warmup_start in [0, 1), got "
                             f"{self.warmup_steps}, {self.warmup_epochs} and {self.warmup_start}")
        if not self.restart_epochs > 0 or self.restart_mult < 1:
            raise ValueError("restart_epochs must be > 0 and restart_mult an integer >= 1, got "
                             f"{self.restart_epochs} and {self.restart_mult}")
        if not 0.0 < self.onecycle_pct_start < 1.0:
            raise ValueError(f"onecycle_pct_start must be in (0, 1), got {self.onecycle_pct_start}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a finite number > 0 (the factor 'step' multiplies the lr by at each "
                             f"milestone, e.g. 0.1), got {self.gamma}")
        if not (self.backbone_lr_mult >= 0 and math.isfinite(self.backbone_lr_mult)):
            raise ValueError(f"backbone_lr_mult must be a finite number >= 0 (0 freezes the backbone), got "
                             f"{self.backbone_lr_mult}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(d) - valid)
        if bad:
            raise ValueError(f"unknown training option(s) {bad}; valid options: {sorted(valid)}")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return asdict(self)

    def key_dict(self) -> dict:
        """The fields that say what is trained and what a run's history holds: :meth:`to_dict` without
        :data:`RUN_KEY_IGNORED`. The runs' cache keys use it, so more data workers, another device or another
        memory layout find the same run."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_KEY_IGNORED}


# --------------------------------------------------------------------------------------- steps
class SupervisedStep:
    """The plain multi-label step: ``loss_fn(model(x), y)`` (default masked BCE)."""

    def __init__(self, loss_fn: Callable | None = None):
        self.loss_fn = loss_fn or BCEWithLogits()

    def __call__(self, model: nn.Module, batch, device: torch.device):
        x, y = batch[0], batch[1]
        logits = model(x)
        loss = self.loss_fn(logits.float(), y) if len(batch) < 3 else self.loss_fn(logits.float(), y, batch[2])
        return loss, {}


def sigmoid_scores(logits: torch.Tensor) -> torch.Tensor:
    """Evaluation scores from logits: their sigmoid in float64. A float32 sigmoid is exactly 1.0 from a logit of
    about 16.7, so a confident model's top images would tie and their AP drop (by 10 points in a test); float64
    resolves logits up to about 36.7."""
    return torch.sigmoid(logits.double())


def default_predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Scores used for evaluation: sigmoid of the logits (:func:`sigmoid_scores`)."""
    return sigmoid_scores(model(x))


# ------------------------------------------------------------------------------------ helpers
def _setup_distributed(device: torch.device) -> torch.device:
    world, _, local = distributed_info()
    if world <= 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        if torch.cuda.device_count() == 0:
            raise RuntimeError("train.device asks for CUDA, but this machine has no CUDA device: under torchrun "
                               "train on the CPU instead (train.device: cpu, gloo)")
        if local >= torch.cuda.device_count():  # else CUDA's bare "invalid device ordinal"
            raise RuntimeError(
                f"torchrun started process {local} on this node, but it has {torch.cuda.device_count()} CUDA "
                "device(s), one per process: launch with --nproc_per_node at most the number of GPUs, or train "
                "on the CPU (train.device: cpu, gloo)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _autocast(device: torch.device, amp: str):
    mode = amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "off":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return torch.autocast(device.type, dtype=dtype), scaler


def _warn_strided_pointwise(model: nn.Module) -> None:
    """Warn about strided 1x1 convolutions in a CPU ``channels_last`` run (see ``TrainConfig.channels_last``;
    ``StridedPointwiseConv`` is a stride-1 convolution of a sub-sampled input, so it is not listed)."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)]
    if names and torch.get_num_threads() > 1:
        warnings.warn(f"channels_last on CPU with strided 1x1 convolutions ({', '.join(names[:3])}"
                      f"{', ...' if len(names) > 3 else ''}): torch 2.13's CPU kernel for their weight gradient can "
                      "corrupt memory with odd batch sizes. Set channels_last: false (TrainConfig / the profile's "
                      "train section), or replace them with mlic_lib.models.backbones.StridedPointwiseConv.",
                      RuntimeWarning, stacklevel=3)


def _broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics) to every rank. DDP broadcasts them only at the
    start of a training forward, so after the last step each rank holds statistics of its own last batch while
    the parameters agree. A collective: every rank must call it."""
    import torch.distributed as dist

    for b in module.buffers():
        dist.broadcast(b, src=0)


def _process_group():
    """``torch.distributed`` when this process is one of several in an initialised process group (torchrun), else
    None: the test before any collective."""
    if distributed_info()[0] > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist
    return None


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite, on every rank under DDP (one small all-reduce): all the ranks then stop together
    with the same error, instead of one raising while the others wait in the next gradient all-reduce."""
    ok = torch.isfinite(loss.detach()).all()
    dist = _process_group()
    if dist is not None:
        flag = (~ok).to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag.item())
    return bool(ok)


def _to_device(batch, device: torch.device, channels_last: bool):
    """The batch's tensors on ``device``; with ``channels_last``, every floating-point 4-D one (the images, and
    LTML's second view) in that layout."""
    out = []
    for t in batch:
        if isinstance(t, torch.Tensor):
            t = t.to(device, non_blocking=True)
            if channels_last and t.ndim == 4 and t.is_floating_point():
                t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank`` under DDP: ``seed`` itself on rank 0 (so one process draws what a run
    without ``torchrun`` draws), another stream on every other rank, so that the ranks' random augmentations
    and dropout differ (the data order comes from ``DistributedSampler``, seeded alike on every rank)."""
    return seed + 1_000_003 * rank


def make_loader(data: Dataset | Iterable, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                num_workers: int = 0, drop_last: bool = False, device: torch.device | None = None):
    """A ``DataLoader`` whose order depends only on ``(seed, epoch)`` (so resumed runs see the same
    batches). Anything that is not a ``Dataset`` (e.g. a chapter's own loader) is returned unchanged,
    after ``data.set_epoch(epoch)`` when it has one (so a resumed run sees the same batches).
    Under ``torchrun`` the worker processes' seeds also depend on the rank (:func:`rank_seed`)."""
    if not isinstance(data, Dataset):
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        return data
    sampler = None
    world, rank, _ = distributed_info()
    if world > 1 and shuffle:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(rank_seed(seed * 100_003 + epoch, rank))  # also seeds the workers
    return DataLoader(
        data, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, generator=gen,
        num_workers=num_workers, drop_last=drop_last,
        pin_memory=device is not None and device.type == "cuda", persistent_workers=False,
    )


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that ``decay_norm_and_bias=False`` exempts from weight decay: every 1-d or
    scalar parameter (biases, batch/layer-norm weights, learned scales) and the names (or name prefixes)
    returned by any submodule's ``no_weight_decay()`` (timm's convention: position embeddings, Swin's
    relative-position bias tables)."""
    listed = set()
    for prefix, module in model.named_modules():  # a timm backbone may sit inside our wrapper
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            listed |= {f"{prefix}.{k}" if prefix else k for k in hook()}
    return {n for n, p in model.named_parameters()
            if p.ndim <= 1 or n in listed or any(n.startswith(f"{k}.") for k in listed)}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam/AdamW/SGD; parameters under ``model.features`` get ``lr * backbone_lr_mult``.

    With ``cfg.decay_norm_and_bias=False`` the parameters of :func:`no_decay_names` go into groups with
    ``weight_decay=0`` (each group keeps its own lr)."""
    backbone = getattr(model, "features", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    exempt = set() if cfg.decay_norm_and_bias else no_decay_names(model)
    groups = []
    for in_body, lr in ((True, cfg.lr * cfg.backbone_lr_mult), (False, cfg.lr)):
        for no_decay in (False, True):
            params = [p for n, p in model.named_parameters()
                      if p.requires_grad and (id(p) in backbone_ids) == in_body and (n in exempt) == no_decay]
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # torch picks the per-tensor loop on a CPU; the foreach kernels do the same arithmetic per parameter (the same
    # numbers) in a few calls: 0.35 ms less per step for small_resnet's 38 tensors, 0.05 ms for the simple CNN
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **({"foreach": True} if on_cpu else {}))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step LR schedule (``scheduler.step()`` after every optimiser step).

    ``'cosine'`` anneals from the lr to 0 over the run; ``'cosine_restarts'`` is SGDR: cosine cycles of
    ``restart_epochs``, ``restart_epochs * restart_mult``, ... epochs, each restarting at the full lr (with
    ``restart_epochs=20, restart_mult=2`` four cycles end exactly at epoch 300)."""
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_steps or int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.scheduler == "onecycle" and total < 4:  # too few steps for a warm-up/anneal cycle
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    if cfg.scheduler == "onecycle":  # at least 2 warm-up steps (a tiny run would divide by 0)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=max(cfg.onecycle_pct_start, 2.0 / total))  # total >= 4: 2 / total <= 0.5
    if cfg.scheduler == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    milestones = [m * steps_per_epoch for m in cfg.milestones]

    def factor(s: int) -> float:
        w = min(1.0, cfg.warmup_start + (1.0 - cfg.warmup_start) * (s + 1) / warm) if warm > 0 else 1.0
        if cfg.scheduler == "step":
            return w * cfg.gamma ** sum(s >= m for m in milestones)
        if cfg.scheduler == "cosine_restarts":
            t, length = s / steps_per_epoch, float(cfg.restart_epochs)
            while t >= length:
                t, length = t - length, length * cfg.restart_mult
            return w * 0.5 * (1.0 + math.cos(math.pi * t / length))
        return w * 0.5 * (1.0 + math.cos(math.pi * min(1.0, s / max(1, total))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` s a caller's own loader draws its order from (a ``DataLoader``'s ``generator`` and its
    sampler's), when it has no ``set_epoch`` to say the order: :func:`fit` keeps their states in its checkpoints, or
    a resumed run would start them again from their seed and replay the first epoch's order."""
    if isinstance(data, Dataset) or hasattr(data, "set_epoch"):
        return []
    found: dict[int, torch.Generator] = {}
    batch_sampler = getattr(data, "batch_sampler", None)
    for obj in (data, getattr(data, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


def _rng_state(loader_generators: Iterable[torch.Generator] = ()) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["loader"] = [g.get_state() for g in loader_generators]  # [] too: tells a checkpoint of older code apart
    return state


def _rng_states_of_all_ranks(loader_generators: Iterable[torch.Generator] = ()) -> list[dict] | None:
    """Every rank's :func:`_rng_state` in rank order, on rank 0 (``None`` elsewhere). Under DDP a collective:
    every rank must call it (``fit`` does, at each checkpoint; ``run_dir`` is the same on every rank)."""
    state = _rng_state(loader_generators)
    world, rank, _ = distributed_info()
    if world <= 1:
        return [state]
    import torch.distributed as dist

    states: list | None = [None] * world if rank == 0 else None
    dist.gather_object(state, states, dst=0)
    return states


def _set_rng_state(state: Mapping, loader_generators: list[torch.Generator] | None = None) -> None:
    """Restore :func:`_rng_state`'s states (CPU tensors, as :func:`_read_last` reads them)."""
    generators = loader_generators or []
    if "loader" not in state:  # written before the loaders' generators were kept
        if generators:
            warnings.warn("the checkpoint predates the saving of the training loader's generator states: the "
                          "resumed run restarts them from their seed (the first epoch's order)", RuntimeWarning,
                          stacklevel=3)
    elif len(state["loader"]) != len(generators):
        raise ValueError(f"the checkpoint holds the states of {len(state['loader'])} generator(s) of the training "
                         f"loader, but the loader passed now has {len(generators)}: resume with a loader built as "
                         "the interrupted run's was (with or without its generator), or delete the run folder")
    else:
        for g, saved in zip(generators, state["loader"], strict=True):
            g.set_state(saved)
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # a machine with fewer GPUs restores those it has
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


@contextlib.contextmanager
def _global_rng_kept():
    """Restore the global random-number states (torch, CUDA, NumPy, Python) on exit."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


# ------------------------------------------------------------------------------- train / eval
@contextlib.contextmanager
def _skipped_steps_count():
    """The schedule counts the steps taken, those the fp16 scaler skipped too (torch's AMP recipe); torch warns
    when the scaler skipped the very first step (an overflow) as if the two calls were misordered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
        yield


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, step: Callable,
                    device: torch.device, *, scheduler=None, scaler=None, autocast=None, ema=None,
                    grad_clip: float | None = None, channels_last: bool = False, progress=None,
                    log_every: int = 20) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss and, for every float the step logged, its mean over the steps
    that logged it (a step may log a key only on some batches, e.g. SpliceMix's ``loss_mixed`` needs a mixed
    image). Under DDP both are taken over every process's steps, on the union of the keys the ranks logged, so
    every rank returns the same means.

    A non-finite loss is a :class:`FloatingPointError`: checked on the device every ``log_every`` steps (a host
    sync; under DDP on every rank at once, so they all stop together) and, for the steps in between, through the
    epoch's mean at the end (the sync the mean needs anyway), so a NaN never reaches a checkpoint or a history."""
    if log_every < 1 or (grad_clip is not None and not grad_clip > 0):
        raise ValueError(f"log_every must be >= 1 and grad_clip > 0 or None, got {log_every} and {grad_clip}")
    model.train()
    autocast = autocast or contextlib.nullcontext()
    total = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}  # steps that logged each key
    n = 0
    host_batch = getattr(step, "host_batch", None)
    for i, batch in enumerate(loader):
        if host_batch is not None:
            batch = host_batch(batch)
        batch = _to_device(batch, device, channels_last)
        with autocast:
            loss, logs = step(model, batch, device)
        if i % log_every == 0 and not _finite_on_every_rank(loss):
            value = loss.item()
            where = (f"loss became {value}" if not math.isfinite(value)
                     else f"the loss of another DDP rank was not finite (this rank's: {value:.4f})")
            raise FloatingPointError(f"{where} at step {i}: lower the learning rate or check the inputs")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            with _skipped_steps_count() if scaler is not None else contextlib.nullcontext():
                scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total += loss.detach().float()
        for k, v in logs.items():  # a float stays on the host: copied to the device per step it would be a host sync
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            sums[k] = sums[k] + v if k in sums else v
            counts[k] = counts.get(k, 0) + 1
        n += 1
        if progress is not None:
            progress.update(1)
            if i % log_every == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
    if n == 0:
        raise ValueError("the training loader yielded no batch: is the training set empty?")
    names = sorted(sums)
    dist = _process_group()
    if dist is not None:  # the same keys on every rank, or the all-reduce below would pair different ones (or hang)
        seen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, names)
        names = sorted(set().union(*seen))
    zero = torch.zeros((), device=device)
    sums_n = torch.stack([total] + [zero + sums[k] if k in sums else zero for k in names]).double()
    steps_n = torch.tensor([n] + [counts.get(k, 0) for k in names], dtype=torch.float64, device=device)
    both = torch.cat([sums_n, steps_n])
    if dist is not None:  # under DDP: sums and step counts over every process's shard, the same on every rank
        dist.all_reduce(both)
    sums_n, steps_n = both.chunk(2)
    values = (sums_n / steps_n).tolist()  # the host sync of the epoch's logs (under DDP with the key exchange above)
    out = {"loss": values[0]}
    if not math.isfinite(out["loss"]):
        raise FloatingPointError(f"the loss was not finite at some step of this epoch (mean {out['loss']}; "
                                 f"checked every {log_every} steps and at the end): lower the learning rate or check "
                                 "the inputs")
    out.update(zip(names, values[1:], strict=True))
    return out


@dataclass
class EvalResult:
    """Scores and targets of a whole evaluation set, plus :func:`metrics.multilabel_report` of them."""

    scores: np.ndarray
    targets: np.ndarray
    mask: np.ndarray | None
    metrics: dict[str, Any]


@torch.no_grad()
def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid scores of one image ``(C, H, W) -> (K,)`` or a batch ``(B, C, H, W) -> (B, K)``.

    ``x`` goes to the model's device (a model trained on a GPU stays there); the scores come back on the
    CPU as float32. The caller sets eval/train mode."""
    if x.dim() not in (3, 4):
        raise ValueError(f"probabilities expects one image (C, H, W) or a batch (B, C, H, W), got shape "
                         f"{tuple(x.shape)}; add or remove the batch dimension")
    scores = torch.sigmoid(model((x[None] if x.dim() == 3 else x).to(model_device(model))).float()).cpu()
    return scores[0] if x.dim() == 3 else scores


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, predict_fn: Callable = default_predict,
            channels_last: bool = False, autocast=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Run ``predict_fn`` over ``loader``; returns ``(scores, targets, mask or None)`` as NumPy arrays.

    Batches stay on the device until the end (one transfer, no per-batch host sync)."""
    was_training = model.training
    model.eval()
    autocast = autocast or contextlib.nullcontext()
    scores, targets, masks = [], [], []
    try:
        for batch in loader:
            batch = _to_device(batch, device, channels_last)
            with autocast:
                scores.append(predict_fn(model, batch[0]).double())  # float32 ties near-certain scores
            targets.append(batch[1])
            if len(batch) > 2:
                masks.append(batch[2])
    finally:
        model.train(was_training)
    if not scores:
        raise ValueError("the evaluation loader yielded no batch: is the evaluation set empty?")
    mask = torch.cat(masks).bool().cpu().numpy() if masks else None
    return torch.cat(scores).cpu().numpy(), torch.cat(targets).cpu().numpy(), mask


def predict_sharded(model: nn.Module, data: Dataset, device: torch.device, batch_size: int,
                    predict_fn: Callable = default_predict, channels_last: bool = False,
                    num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`predict` over ``data`` split between the ``torchrun`` processes, as :func:`predict` returns it.

    Rank ``r`` of ``W`` scores the contiguous share ``[n r / W, n (r + 1) / W)`` of the ``n`` items (nothing is
    padded or repeated, so no image counts twice), then every rank receives all the shares in order: the result
    is the same on every rank and equals a single process's :func:`predict`, for a W-th of the work each. A
    collective under DDP: every rank must call it. Without ``torchrun`` it is :func:`predict` over ``data``."""
    world, rank, _ = distributed_info()
    n = len(data)
    lo, hi = n * rank // world, n * (rank + 1) // world
    part = None
    if hi > lo:
        from torch.utils.data import Subset

        loader = make_loader(Subset(data, range(lo, hi)) if world > 1 else data, batch_size, False,
                             num_workers=num_workers, device=device)
        part = predict(model, loader, device, predict_fn, channels_last)
    if world == 1:
        if part is None:
            raise ValueError("the evaluation set is empty")
        return part
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, part)  # NumPy arrays, in rank order (= the data's order)
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError("the evaluation set is empty")
    masks = [p[2] for p in parts]
    mask = None if any(m is None for m in masks) else np.concatenate(masks)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), mask


def evaluate(model: nn.Module, data: Dataset | Iterable, device: torch.device | str | None = None, *,
             batch_size: int = 256, predict_fn: Callable = default_predict, groups: Mapping | None = None,
             channels_last: bool = False, autocast=None, num_workers: int = 0) -> EvalResult:
    """Scores on ``data`` and the multi-label report (mAP, CP/CR/CF1/OP/OR/OF1, top-3, group mAP).

    ``device``: where to compute, by default the device ``model`` is on (a model trained with
    ``train.device=cpu`` on a GPU machine stays on the CPU). ``num_workers`` decode a ``Dataset`` in parallel
    (image files); in-memory tensors need none."""
    if device is None:
        device = model_device(model)
    device = pick_device(device) if not isinstance(device, torch.device) else device
    loader = (make_loader(data, batch_size, shuffle=False, num_workers=num_workers, device=device)
              if isinstance(data, Dataset) else data)
    scores, targets, mask = predict(model, loader, device, predict_fn, channels_last, autocast)
    report = M.multilabel_report(scores, targets, mask=mask, groups=groups)
    return EvalResult(scores, targets, mask, report)


# ------------------------------------------------------------------------------------- cache
def cache_root() -> Path:
    """Where trained runs are cached: ``$MLIC_CACHE`` or ``~/.cache/mlic/runs``."""
    return env_path("MLIC_CACHE", "~/.cache/mlic/runs")


#: The modules that build a chapter's data (the scenes, the real datasets, their presets and tensor datasets).
#: Every run key covers them (:func:`run_dir_for`), since a run's data transforms execute inside :func:`fit`.
DATA_CODE: tuple[str, ...] = ("mlic_lib.experiments", "mlic_lib.data.real")


def run_dir_for(name: str, config: Mapping[str, Any], code: Iterable[str] = ()) -> Path:
    """``cache_root()/<name>-<hash>``: the hash covers ``config``, the library version and the source of the
    ``mlic_lib`` modules ``code`` (the method's modules, e.g. ``(__name__,)``) and :data:`DATA_CODE` import,
    read from their import statements (:func:`mlic_lib.utils.library_digest`), so a run has the same key in
    every process."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return cache_root() / f"{safe}-{config_hash(config, code=(*code, *DATA_CODE))}"


@dataclass
class FitResult:
    """What ``fit`` returns: the trained model (EMA weights if enabled), per-epoch history, the final
    evaluation, where it lives, whether it came from the cache, and how many of its epochs an interrupted run's
    ``last.pt`` had already trained (``resumed_epochs``; 0 for a run trained from its start or loaded)."""

    model: nn.Module
    history: list[dict[str, float]]
    final: dict[str, Any]
    run_dir: Path | None
    cached: bool
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)
    resumed_epochs: int = 0


def _strip_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------ run folders
#: :class:`TrainConfig` fields that may differ between the ``fit`` that wrote a run folder and a ``fit`` that loads
#: or resumes it: they say where, how fast or how often something runs, not what is trained (the runs' cache keys
#: leave them out but ``eval_every``: :data:`RUN_KEY_IGNORED`). ``device`` and
#: ``channels_last``: the same computation on other hardware or in another memory layout (a run trained on a GPU
#: loads on a laptop; ``psd`` trains its teachers on ``cuda:LOCAL_RANK`` and loads them with ``auto``);
#: ``num_workers``: how many processes read the data (with random augmentation the draws come from other
#: streams, the recipe is the same); ``log_every``: how often the progress bar, and the finite-loss check, read the
#: loss; ``eval_batch_size`` and ``eval_every``: evaluation only, the training is the same (a loaded run's history
#: has the evaluations of the run that wrote it). Every other field changes the trained weights (or, like
#: ``epochs`` and ``batch_size``, the LR schedule a checkpoint's scheduler state belongs to).
RUN_CONFIG_IGNORED: tuple[str, ...] = ("device", "channels_last", "num_workers", "log_every", "eval_batch_size",
                                       "eval_every")
#: The fields the runs' cache keys leave out (:meth:`TrainConfig.key_dict`): :data:`RUN_CONFIG_IGNORED` but
#: ``eval_every``, which decides the evaluations in a run's history (the curves a chapter draws), so a run asked
#: for with another cadence is trained again rather than loaded without its curve.
RUN_KEY_IGNORED: tuple[str, ...] = tuple(f for f in RUN_CONFIG_IGNORED if f != "eval_every")

#: What reading a damaged checkpoint / ``results.json`` raises: ``torch.load`` of a truncated or empty file, or of
#: one whose pickle or zip structure is damaged, raises any of these (``ValueError`` covers ``JSONDecodeError`` and
#: ``UnicodeDecodeError``; and :class:`~mlic_lib.utils.CorruptCheckpointError`, a record of the zip archive that fails
#: its CRC-32, such as a flipped bit inside the tensor data); ``KeyError``: an entry ``fit`` writes is missing.
#: :func:`_is_damage` tells those that say nothing about the file.
UNREADABLE = (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, KeyError, IndexError)
#: A full GPU (``map_location``) and a file of another user's are errors of their own, never a reason to retrain.
_NOT_DAMAGE = (torch.OutOfMemoryError, PermissionError)


def _is_damage(error: BaseException) -> bool:
    """Whether an error of :data:`UNREADABLE` says the file is damaged, not that reading it failed for another
    reason: an ``OSError`` counts only without an errno or with ``EINVAL`` (what torch's zip reader raises for a
    truncated file), not a transient one (``EIO``, ``ESTALE``, too many open files); a CUDA error is not damage."""
    if isinstance(error, _NOT_DAMAGE):
        return False
    if isinstance(error, OSError) and error.errno not in (None, errno.EINVAL):
        return False
    return not (isinstance(error, RuntimeError) and "CUDA" in str(error))

#: The entries of ``last.pt`` (``ema`` and ``scaler`` only when used) and of ``results.json`` that ``fit`` needs.
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "rng_ranks", "config")
_RESULTS_KEYS = ("history", "final", "config")

#: The temporary files :func:`mlic_lib.utils.atomic_open` creates for ``fit``'s files: ``.<name>.<8 random
#: characters of tempfile.mkstemp>.tmp``. A writer killed mid-write (SIGKILL, the OOM killer, a power cut) leaves
#: one behind; ``fit`` removes those older than :data:`STALE_TEMP_SECONDS` (a live writer's file is younger: every
#: write updates its modification time).
_TEMP_NAME = re.compile(r"\.(?:last\.pt|final\.pt|results\.json)\.[a-z0-9_]{8}\.tmp")
STALE_TEMP_SECONDS = 300.0


def remove_stale_temp_files(run_dir: str | Path, older_than: float = STALE_TEMP_SECONDS,
                            names: re.Pattern = _TEMP_NAME) -> list[Path]:
    """Delete the temporary files of ``fit``'s atomic writes (``.last.pt.XXXXXXXX.tmp``, ...) in ``run_dir`` that
    were last modified more than ``older_than`` seconds ago: leftovers of a killed writer. Returns what it
    deleted. Files of another name are never touched (``names``: the pattern of the temporary files' names, by
    default those of ``fit``'s files)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed, now = [], time.time()
    with contextlib.suppress(OSError):  # a tidy-up: a folder or file it may not touch never stops a run
        for f in run_dir.iterdir():
            if not names.fullmatch(f.name):
                continue
            with contextlib.suppress(OSError):  # gone (its writer renamed it), or not ours to delete
                st = f.lstat()
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than:
                    f.unlink()
                    removed.append(f)
    return removed


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def set_aside_damaged(path: Path, error: BaseException, rank: int, then: str) -> None:
    """Rename the damaged ``path`` to ``<name>.corrupt`` (replacing an older one) and warn; under DDP only rank 0
    renames and warns (every rank reads the same file and reaches the same decision). An ``error`` that does not
    say the file is damaged (:func:`_is_damage`) is raised again instead. A rename that fails is a warning, never
    an error on rank 0 alone (the other ranks would wait for it forever): the run is trained again all the same,
    and its new files replace the damaged one. A file that is gone since the caller saw it (``FileNotFoundError``)
    counts as absent, with nothing to move: under torchrun, rank 0 has set it aside as damaged between another rank's
    ``is_file()`` and its read, so that rank must decide as rank 0 did (train again), not fail alone."""
    if isinstance(error, FileNotFoundError):
        return
    if not _is_damage(error):
        raise error
    if rank != 0:
        return
    aside = path.with_name(f"{path.name}.corrupt")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    except OSError as e:
        warnings.warn(f"{path} is damaged or unreadable ({_describe(error)}) and could not be moved aside ({e}); "
                      f"{then}, and the new file will replace it", RuntimeWarning, stacklevel=4)
        return
    warnings.warn(f"{path} is damaged or unreadable ({_describe(error)}); moved it to {aside.name}, {then}",
                  RuntimeWarning, stacklevel=4)


def _checked_entries(obj: Any, required: tuple[str, ...]) -> dict:
    """``obj`` if it is a dict with every key of ``required`` (and a dict as its ``config``, if required); else the
    error that makes the file count as damaged."""
    if not isinstance(obj, dict):
        raise ValueError(f"it holds a {type(obj).__name__}, not the dict fit writes")
    missing = [k for k in required if k not in obj]
    if missing:
        raise KeyError(f"no {', '.join(missing)} entry")
    if "config" in required and not isinstance(obj["config"], dict):
        raise ValueError(f"its config is a {type(obj['config']).__name__}, not a dict")
    return obj


def _read_checkpoint(path: Path, device: torch.device, required: tuple[str, ...]) -> dict:
    return _checked_entries(load_checkpoint(path, map_location=device), required)


def _read_results(path: Path) -> dict:
    return _checked_entries(json.loads(path.read_text(encoding="utf-8")), _RESULTS_KEYS)


def _saved_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """The config a run folder records: ``cfg`` and the number of processes that trained it (``world_size``:
    ``batch_size`` is per process, so the global batch and the LR schedule's steps depend on it)."""
    return {**cfg.to_dict(), "world_size": int(world)}


def _config_changes(saved: Mapping[str, Any], cfg: TrainConfig, world: int = 1) -> list[str]:
    """The fields (outside :data:`RUN_CONFIG_IGNORED`) in which the config ``saved`` in a run folder differs from
    ``cfg`` run by ``world`` processes (:func:`_saved_config`), as ``'name: old -> new'``. A field the saved
    config lacks (written before the field existed) counts as its default (``world_size``: 1); lists and tuples
    compare alike (``results.json`` stores tuples as lists)."""
    now, defaults, absent = _saved_config(cfg, world), _saved_config(TrainConfig(), 1), "<no such option>"

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, (list, tuple)) else v

    changes = []
    for name in sorted(set(saved) | set(now)):
        old = plain(saved[name]) if name in saved else plain(defaults.get(name, absent))
        new = plain(now.get(name, absent))
        if name not in RUN_CONFIG_IGNORED and old != new:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def _check_config(saved: Mapping[str, Any], cfg: TrainConfig, path: Path, what: str) -> None:
    changes = _config_changes(saved, cfg, distributed_info()[0])
    if changes:
        world = ("; world_size is the number of torchrun processes (batch_size is per process): run it with as many "
                 "as it was trained with" if any(c.startswith("world_size:") for c in changes) else "")
        raise ValueError(
            f"{path} is {what} with another training config ({'; '.join(changes)}{world}). Pass another run_dir for "
            f"these settings, delete {path.parent} to train it again with them, or restore the old settings to "
            f"{'load' if path.name == 'results.json' else 'resume'} it (fields that may differ: "
            f"{', '.join(RUN_CONFIG_IGNORED)}).")


def is_finished(run_dir: str | Path) -> bool:
    """Whether ``fit`` will load ``run_dir`` instead of training: a readable ``results.json`` and a readable
    ``final.pt`` (its records checked against their CRC-32s and its pickle read as ``fit`` reads it, the tensors
    memory-mapped rather than loaded: one cut short, empty, with a damaged pickle or a flipped bit is not). For a
    caller that prepares costly training inputs only when a run will train (CPSD's teacher logits); the config is
    checked by ``fit``."""
    run_dir = Path(run_dir)
    results, final = run_dir / "results.json", run_dir / "final.pt"
    if not (results.is_file() and final.is_file()):
        return False
    try:
        _read_results(results)
        verify_checkpoint(final)
        _checked_entries(torch.load(final, map_location="cpu", weights_only=True, mmap=True), ("model",))
    except UNREADABLE:
        return False  # damaged (fit trains again) or unreadable for now: either way, prepare the inputs
    return True


def _load_finished(run_dir: Path, model: nn.Module, cfg: TrainConfig, device: torch.device,
                   rank: int) -> FitResult | None:
    """The cached run in ``run_dir`` (``results.json`` + ``final.pt``) with its weights loaded into ``model``, or
    ``None`` when there is none or one of the two files is damaged (then moved aside: the run is trained again)."""
    results, final = run_dir / "results.json", run_dir / "final.pt"
    if not (results.is_file() and final.is_file()):
        return None
    then = "so the run is trained again (or resumed from last.pt)"
    try:
        saved = _read_results(results)
    except UNREADABLE as e:
        set_aside_damaged(results, e, rank, then)
        return None
    _check_config(saved["config"], cfg, results, "a finished run")
    try:
        state = _read_checkpoint(final, device, ("model",))
    except UNREADABLE as e:
        set_aside_damaged(final, e, rank, then)
        return None
    model.load_state_dict(state["model"])
    return FitResult(model, saved["history"], saved["final"], run_dir, True, saved.get("seconds", 0.0),
                     saved.get("extras", {}))


def _read_last(run_dir: Path, cfg: TrainConfig, rank: int) -> dict | None:
    """The checkpoint ``last.pt`` of an interrupted run in ``run_dir``, or ``None`` when there is none or it is
    damaged (then moved aside: training starts from scratch). A config that differs is a ``ValueError``.

    Read onto the CPU whatever the training device: the random-number states in it must stay CPU tensors
    (``torch.set_rng_state`` refuses others), and ``load_state_dict`` moves the weights and the optimiser's
    state to their parameters' device anyway."""
    path = run_dir / "last.pt"
    if not path.is_file():
        return None
    try:
        ckpt = _read_checkpoint(path, torch.device("cpu"), _CHECKPOINT_KEYS)
    except UNREADABLE as e:
        set_aside_damaged(path, e, rank, "so training starts from scratch")
        return None
    _check_config(ckpt["config"], cfg, path, "the checkpoint of an interrupted run")
    return ckpt


def fit(model: nn.Module, train_data: Dataset | Iterable, val_data: Dataset | Iterable | None,
        cfg: TrainConfig, *, step: Callable | None = None, run_dir: str | Path | None = None,
        resume: bool = True, progress: bool = True, predict_fn: Callable = default_predict,
        groups: Mapping | None = None, on_epoch_end: Callable[[int, dict], None] | None = None,
        steps_per_epoch: int | None = None) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` and evaluate on ``val_data`` (see ``cfg.eval_every``).

    Parameters
    ----------
    model : the network; moved to the device. With ``cfg.ema_decay`` it ends holding the averaged weights (those
        ``final.pt`` keeps and a loaded run holds), the model ``FitResult.model`` returns.
    train_data : a ``Dataset`` (a seeded loader is built) or any iterable of batches ``(x, y[, mask])``.
    val_data : evaluated after every ``cfg.eval_every``-th epoch and after the last one (mAP etc. recorded in
        that epoch's history entry); ``None`` to skip.
    cfg : :class:`TrainConfig`.
    step : the method, ``step(model, batch, device) -> (loss, logs)``; default :class:`SupervisedStep`.
        Under DDP the step must call ``model(...)`` (the wrapper's forward) for gradients to sync; a step
        with ``find_unused_parameters = True`` gets a wrapper that tolerates parameters without gradient.
    run_dir : folder for ``last.pt`` / ``final.pt`` / ``results.json``. If ``results.json`` and
        ``final.pt`` exist the run is loaded, not trained; if ``last.pt`` exists (an interrupted run)
        and ``resume`` is true, training continues from it. ``None`` disables both. Either is a ``ValueError``
        when the folder's run had another config (fields outside :data:`RUN_CONFIG_IGNORED`). A damaged file
        is moved aside to ``<name>.corrupt`` with a warning (the run is trained again, or resumed from a readable
        ``last.pt``); leftover temporary files of a killed writer are removed (:func:`remove_stale_temp_files`).
        Only ``cfg`` is checked against the folder: the data, ``step``, ``val_data``, ``predict_fn`` and ``groups``
        must be in the key the folder's name comes from (:func:`run_dir_for`), as the library's trainers put them,
        or a loaded run returns the metrics they had when it was trained.
    on_epoch_end : ``callback(epoch, logs)`` after each epoch's checkpoint is written. The global random states are
        restored after it (and after each evaluation), so what it draws does not change the training.
    steps_per_epoch : needed for the LR schedule when ``train_data`` is an iterable without ``len``: the number of
        batches it yields per epoch. An epoch that takes another number of steps is a ``ValueError`` (the schedule
        would end early or late).

    With a ``run_dir`` (outside ``torchrun``) the run is trained or loaded under :func:`run_lock`: a second process
    asking for the same run (another kernel, ``make lab`` beside ``make book``) waits, then loads it.
    """
    kwargs = dict(step=step, run_dir=run_dir, resume=resume, progress=progress, predict_fn=predict_fn,
                  groups=groups, on_epoch_end=on_epoch_end, steps_per_epoch=steps_per_epoch)
    if run_dir is None or distributed_info()[0] > 1:  # torchrun: the ranks share one run and agree by barriers
        return _fit(model, train_data, val_data, cfg, **kwargs)
    with run_lock(run_dir):
        return _fit(model, train_data, val_data, cfg, **kwargs)


@contextlib.contextmanager
def run_lock(run_dir: str | Path):
    """Hold an exclusive advisory lock on ``run_dir`` (``flock`` on ``run_dir/.lock``, which names its holder).

    A process that finds the lock held waits for it (and says so on stderr, unless ``TQDM_DISABLE`` is set, as
    in the book's build). The lock goes with its holder's
    process, so a killed run never leaves it behind. Where locks are not available (no ``fcntl`` on Windows, a
    file system without them) nothing is locked and concurrent processes may train the same run twice, which is
    wasted work, not damage: every file of the folder is written atomically.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    fd = None
    if fcntl is not None:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            fd = os.open(Path(run_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # a read-only cache: nothing will be written there either
            fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not bar_disabled(True):  # a progress notice: not in the book's executed notebooks
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    print(f"{Path(run_dir).name}: {holder} holds this run (training or loading it); waiting for it, "
                          "then loading the run it finished (or resuming it, if it stopped first)", file=sys.stderr,
                          flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no locks on this file system
                os.close(fd)
                fd = None
        if fd is not None:
            import socket

            with contextlib.suppress(OSError):  # the holder's name is a notice: a full disk still loads a run
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _fit(model: nn.Module, train_data: Dataset | Iterable, val_data: Dataset | Iterable | None,
         cfg: TrainConfig, *, step: Callable | None, run_dir: str | Path | None, resume: bool, progress: bool,
         predict_fn: Callable, groups: Mapping | None, on_epoch_end: Callable[[int, dict], None] | None,
         steps_per_epoch: int | None) -> FitResult:
    """:func:`fit`'s work (under :func:`run_lock` when it has a run folder)."""
    if isinstance(train_data, Iterator) and not hasattr(train_data, "set_epoch") and cfg.epochs > 1:
        raise ValueError(f"train_data is a one-shot iterator ({type(train_data).__name__}): it would be used up by "
                         f"the first of the {cfg.epochs} epochs. Pass a Dataset, a DataLoader, a list of batches or an "
                         "object whose __iter__ starts a new pass each time")
    step = step or SupervisedStep()
    device = _setup_distributed(pick_device(cfg.device))
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    run_dir = Path(run_dir) if run_dir is not None else None
    start_time = time.perf_counter()

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    world, rank, _ = distributed_info()
    ckpt = None
    if run_dir is not None:
        if world > 1:  # every rank reads what rank 0 wrote before (an earlier fit's checkpoint): same decisions
            import torch.distributed as dist

            dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
        if rank == 0:
            remove_stale_temp_files(run_dir)
        cached = _load_finished(run_dir, model, cfg, device, rank)
        if cached is not None:
            return cached
        if resume:
            ckpt = _read_last(run_dir, cfg, rank)

    if channels_last and device.type == "cpu":  # only when it trains (a cached run only loads)
        _warn_strided_pointwise(model)
    seed_everything(rank_seed(cfg.seed, rank))
    autocast, scaler = _autocast(device, cfg.amp)
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(step, "find_unused_parameters", False)))
    optimizer = build_optimizer(model, cfg)
    loader_generators = _loader_generators(train_data)
    first_loader = make_loader(train_data, cfg.batch_size, True, cfg.seed, 0, cfg.num_workers, device=device)
    try:
        n_steps = steps_per_epoch or len(first_loader)
    except TypeError:
        raise TypeError(f"train_data ({type(train_data).__name__}) has no len(), which the LR schedule needs: pass "
                        "fit(..., steps_per_epoch=<the number of batches it yields per epoch>)") from None
    scheduler = build_scheduler(optimizer, cfg, n_steps)
    ema = None
    if cfg.ema_decay:
        from mlic_lib.ema import WeightEMA

        ema = WeightEMA(model, cfg.ema_decay)  # torch's AveragedModel would wait for the GPU at every step
    history: list[dict[str, float]] = []
    final: dict[str, Any] = {}
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None and "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        history = [dict(h) for h in ckpt["history"]]
        final = dict(ckpt.get("final") or {})  # the latest evaluation (older checkpoints: none, evaluated again below)
        start_epoch = int(ckpt["epoch"]) + 1
        _set_rng_state(ckpt["rng_ranks"][rank], loader_generators)  # each rank goes on with its own streams
        ckpt = None  # its CPU copy of the weights and the optimiser's state is not needed for the rest of the run

    from tqdm.auto import tqdm

    eval_model = ema.module if ema is not None else model

    def validate() -> dict[str, Any]:  # in fp32 whatever cfg.amp: bf16 logits (8-bit mantissa) tie scores and
        # shift the AP, and the run's metrics then match a later evaluate() of the same model
        with _global_rng_kept():  # a caller's loader or predict_fn may draw from the global streams; evaluating must
            # leave the training's draws as they are (eval_every says what is evaluated, not what is trained)
            if world > 1:
                _broadcast_buffers(eval_model)  # rank 0's BatchNorm statistics, which final.pt keeps, on every rank
            if world > 1 and isinstance(val_data, Dataset):  # each rank scores its share; all ranks get every score
                scores, targets, mask = predict_sharded(eval_model, val_data, device, cfg.eval_batch_size, predict_fn,
                                                        channels_last, cfg.num_workers)
                return M.multilabel_report(scores, targets, mask=mask, groups=groups)
            loader = make_loader(val_data, cfg.eval_batch_size, False, num_workers=cfg.num_workers, device=device)
            return evaluate(eval_model, loader, device, predict_fn=predict_fn, groups=groups,
                            channels_last=channels_last).metrics

    bar = tqdm(total=cfg.epochs * n_steps, initial=start_epoch * n_steps, desc="train", unit="step",
               disable=bar_disabled(progress and rank == 0), leave=False, mininterval=1.0)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            loader = first_loader if epoch == 0 else make_loader(
                train_data, cfg.batch_size, True, cfg.seed, epoch, cfg.num_workers, device=device)
            t0 = time.perf_counter()
            logs = train_one_epoch(train_model, loader, optimizer, step, device, scheduler=scheduler,
                                   scaler=scaler, autocast=autocast, ema=ema, grad_clip=cfg.grad_clip,
                                   channels_last=channels_last, progress=bar, log_every=cfg.log_every)
            if cfg.scheduler != "none" and scheduler.last_epoch != (epoch + 1) * n_steps:
                raise ValueError(f"epoch {epoch} took {scheduler.last_epoch - epoch * n_steps} steps, but the LR "
                                 f"schedule was built for {n_steps} per epoch (steps_per_epoch or len(train_data)): "
                                 "pass the number of batches the training loader yields per epoch")
            logs = {"epoch": epoch, "train_seconds": time.perf_counter() - t0, **logs}
            last = epoch == cfg.epochs - 1
            if val_data is not None and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                final = validate()
                logs.update({k: v for k, v in final.items() if isinstance(v, float)})
            history.append(logs)
            # a collective: every rank calls it
            rng = _rng_states_of_all_ranks(loader_generators) if run_dir is not None else []
            if run_dir is not None and rank == 0:
                ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                        "rng_ranks": rng, "config": _saved_config(cfg, world), "final": final}
                if ema is not None:
                    ckpt["ema"] = ema.state_dict()
                if scaler is not None:
                    ckpt["scaler"] = scaler.state_dict()
                atomic_torch_save(ckpt, run_dir / "last.pt")
            if on_epoch_end is not None:
                with _global_rng_kept():  # after the checkpoint took the RNG states: a resumed run must go on
                    on_epoch_end(epoch, logs)  # from the same ones, whatever the callback draws
    finally:
        bar.close()
    if ema is not None:  # the model passed in ends with the weights final.pt keeps, as it does when a run is loaded
        model.load_state_dict(ema.module.state_dict())
        eval_model = model
    if not final and val_data is not None and start_epoch >= cfg.epochs:
        final = validate()  # resumed from the last epoch's checkpoint (stopped before final.pt was written)
    if world > 1:
        _broadcast_buffers(eval_model)  # every rank returns the model final.pt holds
    seconds = time.perf_counter() - start_time + sum(h.get("train_seconds", 0.0) for h in history[:start_epoch])
    result = FitResult(eval_model, history, final, run_dir, False, seconds, resumed_epochs=start_epoch)
    if run_dir is not None and rank == 0:
        atomic_torch_save({"model": _strip_ddp(eval_model).state_dict()}, run_dir / "final.pt")
        atomic_write_json({"history": history, "final": final, "config": _saved_config(cfg, world), "seconds": seconds,
                           "device": str(device)}, run_dir / "results.json")
        (run_dir / "last.pt").unlink(missing_ok=True)
    return result
