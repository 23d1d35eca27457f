"""SpliceMix-CL (Eqs. 5-7) and the training steps of every mix-style method, for :func:`engine.fit`.

SpliceMix-CL (Sec. III-C): the last feature map ``F`` of a mixed image is split by its grid into the
cells' maps ``F'`` (the inverse of ``f_mg``), each cell is pooled with the model's global pooling
``g`` and classified by the *shared* classifier, ``p' = sigmoid(f_cls(g(F')))``, and the cell is
asked to agree with the prediction ``p`` of its regular image (Eq. 6):

    L_cl = sum_{mixed m} sum_{cells j of m} BCE(p'_j, p̄_j),     L = L_bce + L_cl   (Eqs. 5, 7)

with ``p̄`` a copy of ``p`` *without* back-propagation (the paper; ``detach=True``). The authors' VOC
code does not detach (``detach=False``), their COCO code does. Dropped (blank) cells
are masked out.

**Cell split on the feature map.** SpliceMix resizes each source to ``(H // r, W // c)`` and the
feature map is ``h x w`` (8x8 for small_resnet on 64 px, 14x14 for ResNet-101 on 448 px), so a
cell does not always cover a whole number of map positions. We split the map *proportionally*:
cell ``(i, j)`` gets rows ``round(i h / r) .. round((i+1) h / r)`` and likewise columns
(:func:`mlic_lib.mixing.cell_bounds`); for a 2x3 grid on an 8x8 map the columns are 3/2/3 wide.

**Loss scale.** Eqs. 5 and 6 are *sums*. We divide both by the same number, ``|B_hat| * C`` (so
``L_bce`` is the usual mean BCE of the SpliceMixed batch), which keeps the paper's relative weight
of the two terms (``cl_norm="paper"``, the default). The authors' code adds two *means* instead: the BCE
over ``|B_hat| * C`` plus the cell term over every cell of the grids, dropped ones included
(``M * r * c * C``; a dropped cell's logits and target are both set to -1000, so it adds ~0 but counts).
That weights Eq. 6 by ``|B_hat| / (M r c)`` relative to the paper: 2.5 for 1x2, 1.25 for 2x2 and 0.83 for
2x3 at ``|B'| = B/4`` (``cl_norm="authors"``).

**BCE or KL.** The BCE of Eq. 6 is not zero when ``p' = p̄`` (it equals the entropy of ``p̄``;
its gradient w.r.t. the cell logits is zero there); ``form="kl"`` subtracts that entropy, giving
``KL(p̄ || p')`` which is zero at agreement (same gradient for the cell when the target is detached).

**Cell split, authors' code.** Where ``h`` or ``w`` is not a multiple of the grid, the authors resize the
map bilinearly to ``(h // r * r, w // c * c)`` and split it evenly (a 14x14 map, 2x3: 7x4 cells of a
14x12 map); the proportional split above keeps every position (7 x 5/4/5). The paper only says "splitting
F according to the grid form"; the book keeps the proportional split (no option).

**Repeated sources.** The paper says a regular image attends to the mixed images "at most once" (Sec.
III-C), which cannot hold when ``M * r * c > B`` (2x3 at ``|B'| = B/4`` needs 1.5 B cells). Like the
authors' code, :class:`~mlic_lib.mixing.SpliceMix` draws the sources from repeated permutations of the
batch: every image once before any twice; Eq. 6 then asks each copy to agree with the same ``p̄``.

**DDP.** Through a ``DistributedDataParallel`` wrapper the step calls ``model(x, return_features=True)``
(:class:`~mlic_lib.models.backbones.MultiLabelNet`), so the forward goes through the wrapper and its gradient
sync; the cells then use the wrapped module's ``forward_head``.

Steps (``step(model, batch, device) -> (loss, logs)``; batches are ``(x, y)`` or ``(x, y, index)``
from :class:`IndexedDataset`):

* :class:`MixStep` -- baseline (no mixer), Mixup, CutMix, Batch Augmentation: BCE on the transformed
  batch;
* :class:`SpliceMixStep` -- SpliceMix (``cl_weight=0``) and SpliceMix-CL (``cl_weight=1``); logs the
  BCE of the regular and of the mixed part separately (Table X);
* :class:`MosaicStep` -- looks the boxes of the batch's images up by index (the dataset must be an
  :class:`IndexedDataset`).

The chapter's evaluation protocols (Fig. 6 low-resolution inference, Table VIII biased pairs) are in
:mod:`mlic_lib.analysis.robustness`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mlic_lib.mixing import BatchAugmentation, CutMix, GridLayout, Mixup, Mosaic, SpliceMix, pad_boxes
from mlic_lib.utils import host_to_device

__all__ = [
    "CL_FORMS",
    "CL_NORMS",
    "METHODS",
    "check_methods",
    "check_regime",
    "check_regime_methods",
    "make_step",
    "splicemix_from_options",
    "train_method",
    "IndexedDataset",
    "MixStep",
    "MethodRuns",
    "MosaicStep",
    "SpliceMixStep",
    "cell_logits",
    "consistency_loss",
]

CL_FORMS = ("bce", "kl")
CL_NORMS = ("paper", "authors")
METHODS = ("baseline", "mixup", "cutmix", "mosaic", "batch_aug", "splicemix", "splicemix_cl")


def _check_model(model: nn.Module) -> None:
    for name in ("forward_features", "forward_head"):
        if not callable(getattr(model, name, None)):
            raise ValueError(f"SpliceMix-CL needs a model with {name}() (a mlic_lib MultiLabelNet); "
                             f"got {type(model).__name__}")


def _features_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, nn.Module]:
    """``(feature map, logits, the module whose forward_head scores cells)``. A DDP wrapper is called through its
    forward (``return_features=True``), so its gradient sync sees the step; calling the wrapped module's
    ``forward_features`` directly would bypass it."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        net = model.module
        _check_model(net)
        try:
            logits, fmap = model(x, return_features=True)
        except TypeError as err:
            raise ValueError(f"SpliceMix-CL under DDP needs a model whose forward takes return_features=True and "
                             f"returns (logits, feature map), like MultiLabelNet; got {type(net).__name__}") from err
        return fmap, logits, net
    _check_model(model)
    fmap = model.forward_features(x)
    return fmap, model.forward_head(fmap), model


# ------------------------------------------------------------------------------ SpliceMix-CL
def cell_logits(model: nn.Module, fmap_mixed: Tensor, layout: GridLayout) -> Tensor:
    """Split each mixed image's feature map ``(M, D, h, w)`` by its grid, pool every cell with the model's
    pooling and apply the shared classifier: logits ``(M, r*c, C)`` (cells row-major, as in ``layout``)."""
    _check_model(model)
    if fmap_mixed.ndim != 4 or len(fmap_mixed) != layout.n_mixed:
        raise ValueError(f"fmap_mixed must be (M={layout.n_mixed}, D, h, w), got {tuple(fmap_mixed.shape)}")
    h, w = fmap_mixed.shape[2:]
    cells = [model.forward_head(fmap_mixed[:, :, rs, cs]) for rs, cs in layout.cell_slices(h, w)]
    return torch.stack(cells, dim=1)


def consistency_loss(cells: Tensor, regular_logits: Tensor, layout: GridLayout, detach: bool = True,
                     form: str = "bce", normaliser: float | None = None) -> Tensor:
    """Eq. 6: BCE between each kept cell's prediction and its regular image's prediction.

    Parameters
    ----------
    cells : ``(M, r*c, C)`` cell logits (:func:`cell_logits`).
    regular_logits : ``(B, C)`` logits of the regular batch.
    layout : the :class:`GridLayout` of the SpliceMix call.
    detach : stop the gradient through the target ``p̄`` (paper: True; authors' VOC code: False).
    form : ``"bce"`` (Eq. 6) or ``"kl"`` (Eq. 6 minus the target's entropy; zero at agreement).
    normaliser : divide the sum by this (default: the number of kept cells x C, a mean).
    """
    if form not in CL_FORMS:
        raise ValueError(f"form must be one of {CL_FORMS}, got {form!r}")
    m, n = layout.n_mixed, layout.n_cells
    if cells.ndim != 3 or cells.shape[:2] != (m, n):
        raise ValueError(f"cells must be (M={m}, cells={n}, C), got {tuple(cells.shape)}")
    if regular_logits.ndim != 2 or len(regular_logits) != layout.n_regular:
        raise ValueError(f"regular_logits must be (B={layout.n_regular}, C), got {tuple(regular_logits.shape)}")
    if m == 0:
        return cells.sum() * 0.0
    src = host_to_device(layout.sources, cells.device)
    tgt_logits = regular_logits.float()[src]  # (M, n, C)
    if detach:
        tgt_logits = tgt_logits.detach()
    target = torch.sigmoid(tgt_logits)
    loss = F.binary_cross_entropy_with_logits(cells.float(), target, reduction="none")
    if form == "kl":
        loss = loss - F.binary_cross_entropy_with_logits(tgt_logits, target, reduction="none")
    keep = host_to_device(layout.keep, cells.device)[..., None].float()
    total = (loss * keep).sum()
    if normaliser is None:
        normaliser = float(keep.sum()) * cells.shape[2]
    return total / max(float(normaliser), 1.0)


# ------------------------------------------------------------------------------------ datasets
_NO_MASK = ("the SpliceMix chapter's steps train on (image, labels) only and have no label mask, but the data "
            "carry one (VOC with difficult_train: ignore): use difficult_train: negative (the papers') or positive")


def _refuse_mask(batch) -> None:
    """Raise ``ValueError`` when a batch's third element is a label mask (bool, the shape of the labels): the mixing
    steps would train its unknown entries as negatives without a word (their third element is an index)."""
    if len(batch) > 2 and batch[2].dtype == torch.bool and batch[2].shape == batch[1].shape:
        raise ValueError(_NO_MASK)


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(x, y)`` to yield ``(x, y, index)``, so a step can look per-image data
    (Mosaic's boxes) up by index. Use it for *training* only: ``engine.evaluate`` reads a third
    element as a label mask. A dataset with a label mask (``base.mask``) is refused: it would be dropped."""

    def __init__(self, base: Dataset):
        if getattr(base, "mask", None) is not None:
            raise ValueError(_NO_MASK)
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index][:2]
        return x, y, torch.tensor(index)

    def __getitems__(self, indices: list[int]):
        getitems = getattr(self.base, "__getitems__", None)
        items = getitems(indices) if getitems is not None else [self.base[i] for i in indices]
        return [(it[0], it[1], torch.tensor(i)) for it, i in zip(items, indices, strict=True)]


# --------------------------------------------------------------------------------------- steps
def _bce_parts(logits: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none")


class MixStep:
    """Baseline (``mixer=None``), Mixup, CutMix or Batch Augmentation: mean BCE on ``mixer(x, y)``."""

    def __init__(self, mixer: Callable | None = None):
        if isinstance(mixer, SpliceMix | Mosaic):
            raise ValueError(f"use {'SpliceMixStep' if isinstance(mixer, SpliceMix) else 'MosaicStep'} "
                             f"for {type(mixer).__name__}")
        self.mixer = mixer

    def __call__(self, model: nn.Module, batch, device: torch.device):
        _refuse_mask(batch)
        x, y = batch[0], batch[1]
        if self.mixer is not None:
            res = self.mixer(x, y)
            x, y = res.x, res.y
        loss = _bce_parts(model(x), y).mean()
        return loss, {}


class MosaicStep:
    """Mosaic: the batch must be ``(x, y, index)`` (:class:`IndexedDataset`); boxes are looked up in
    ``boxes`` (a list of per-image ``(k, 5)`` arrays, e.g. ``SceneSet.boxes``, or a padded tensor)."""

    def __init__(self, boxes: Sequence[np.ndarray] | Tensor, mosaic: Mosaic | None = None):
        self.boxes = boxes if isinstance(boxes, Tensor) else pad_boxes(boxes)
        self.mosaic = mosaic or Mosaic()

    @staticmethod
    def _check(batch) -> None:
        if len(batch) < 3:
            raise ValueError("MosaicStep needs batches (x, y, index): wrap the training set in IndexedDataset")
        _refuse_mask(batch)

    def host_batch(self, batch):
        """Engine hook: look the boxes up on the host, where the loader's indices are, before the batch goes to
        the device (looked up from indices on a GPU, the host would wait for the device at every step);
        returns ``[x, y, index, boxes]``."""
        self._check(batch)
        return [*batch[:3], self.boxes[batch[2].long().cpu()]]  # .cpu(): a no-op on the loader's batch

    def __call__(self, model: nn.Module, batch, device: torch.device):
        """``batch``: ``[x, y, index]``, or ``[x, y, index, boxes]`` after :meth:`host_batch` (the engine calls it)."""
        self._check(batch)
        if len(batch) == 3:  # called without the engine's hook: look the boxes up here, the same way
            batch = self.host_batch(batch)
        x, y, boxes = batch[0], batch[1], batch[3]
        res = self.mosaic(x, y, boxes)
        loss = _bce_parts(model(res.x), res.y).mean()
        return loss, {}


class SpliceMixStep:
    """SpliceMix (``cl_weight=0``) or SpliceMix-CL (``cl_weight=1``, Eq. 7) training step.

    ``cl_norm="paper"``: ``loss = [sum BCE(B_hat) + cl_weight * sum_{kept cells} CE(p', p̄)] / (|B_hat| * C)``
    (Eqs. 5-7 are sums; one normaliser keeps their relative weight). ``cl_norm="authors"``: the authors' code,
    ``mean BCE(B_hat) + cl_weight * sum_{kept cells} CE(p', p̄) / (M * r * c * C)`` (each term its own mean, the
    cell term over every cell, dropped ones included). Logs ``loss_regular`` / ``loss_mixed`` (mean BCE of each
    part) and ``loss_cl`` (the cell term as it enters the loss, before ``cl_weight``).
    """

    def __init__(self, splicemix: SpliceMix | None = None, cl_weight: float = 0.0, detach: bool = True,
                 cl_form: str = "bce", cl_norm: str = "paper"):
        if cl_form not in CL_FORMS:
            raise ValueError(f"cl_form must be one of {CL_FORMS}, got {cl_form!r}")
        if cl_norm not in CL_NORMS:
            raise ValueError(f"cl_norm must be one of {CL_NORMS} ('paper': one normaliser for Eqs. 5 and 6; "
                             f"'authors': a mean of each), got {cl_norm!r}")
        if cl_weight < 0:
            raise ValueError(f"cl_weight must be >= 0, got {cl_weight}")
        self.splicemix = splicemix or SpliceMix()
        self.cl_weight, self.detach, self.cl_form, self.cl_norm = float(cl_weight), bool(detach), cl_form, cl_norm

    def __call__(self, model: nn.Module, batch, device: torch.device):
        _refuse_mask(batch)
        x, y = batch[0], batch[1]
        B = len(x)
        res = self.splicemix(x, y)
        if self.cl_weight > 0:
            fmap, logits, net = _features_and_logits(model, res.x)
        else:
            logits = model(res.x)  # plain SpliceMix needs no feature map: any model, any wrapper
        parts = _bce_parts(logits, res.y)
        norm = float(parts.numel())
        loss = parts.sum() / norm
        logs = {"loss_regular": parts[:B].mean().detach()}
        if len(parts) > B:
            logs["loss_mixed"] = parts[B:].mean().detach()
        if self.cl_weight > 0:
            lay = res.layout
            cells = cell_logits(net, fmap[B:], lay)
            cl_norm = norm if self.cl_norm == "paper" else float(lay.n_mixed * lay.n_cells * logits.shape[1])
            cl = consistency_loss(cells, logits[:B], lay, self.detach, self.cl_form, normaliser=cl_norm)
            loss = loss + self.cl_weight * cl
            logs["loss_cl"] = cl.detach()
        return loss, logs


def splicemix_from_options(options: dict | None = None) -> SpliceMix:
    """The :class:`~mlic_lib.mixing.SpliceMix` transform of a profile's ``mixing`` options (``grids, p_drop,
    p_transpose, mixed_size, fill``; missing = the paper's / authors' defaults)."""
    o = options or {}
    return SpliceMix(o.get("grids"), p_drop=o.get("p_drop", 0.3), p_transpose=o.get("p_transpose", 0.5),
                     mixed_size=o.get("mixed_size", 0.25), fill=o.get("fill", 0.0))


def check_mixing(options: Any) -> None:
    """Check a profile's ``mixing`` section by building every step that reads it (:func:`make_step` for each method
    but ``baseline`` and ``mosaic``), so the methods' own checks run now (the profile loader has checked each
    value's type). Raises ``ValueError`` naming the section."""
    if not isinstance(options, Mapping):
        raise ValueError(f"mixing must be a mapping of the methods' options, got {options!r}")
    for method in METHODS:
        if method not in ("baseline", "mosaic"):
            try:
                make_step(method, dict(options))
            except (TypeError, ValueError) as err:
                raise ValueError(f"mixing: {err}") from None


def check_methods(methods: Any, key: str = "methods") -> None:
    """Check a profile's list of methods (``methods``, ``regime_check.methods``): a non-empty list of distinct
    names from :data:`METHODS`; raises ``ValueError`` naming the key."""
    if not isinstance(methods, (list, tuple)) or not methods:
        raise ValueError(f"{key} must be a non-empty list of methods from {METHODS}, got {methods!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"{key}: unknown method(s) {unknown}; choose from {METHODS}")
    if len(set(methods)) < len(methods):
        raise ValueError(f"{key} names a method twice: {list(methods)}")


def check_regime(rc: Any) -> None:
    """Check a profile's ``regime_check`` (null/false = skipped, else ``{n_train, epochs, methods}`` with Baseline
    and SpliceMix, which the chapter compares)."""
    if not rc:
        return
    if not isinstance(rc, Mapping) or set(rc) != {"n_train", "epochs", "methods"}:
        raise ValueError(f"regime_check must be null or a mapping with keys n_train, epochs and methods, got {rc!r}")
    for k in ("n_train", "epochs"):
        if isinstance(rc[k], bool) or not isinstance(rc[k], int) or rc[k] < 1:
            raise ValueError(f"regime_check.{k} must be a whole number >= 1, got {rc[k]!r}")
    check_methods(rc["methods"], "regime_check.methods")
    if not {"baseline", "splicemix"} <= set(rc["methods"]):
        raise ValueError(f"regime_check.methods must include baseline and splicemix (the chapter compares them), "
                         f"got {rc['methods']!r}")


def check_no_label_mask(settings: Mapping[str, Any]) -> None:
    """The chapter's steps have no label mask: refuse ``data.real.difficult_train: ignore`` when the profile is
    loaded (:class:`IndexedDataset` refuses a masked dataset too, for code that builds its own data)."""
    data = settings.get("data")
    real = data.get("real") if isinstance(data, Mapping) else None
    if isinstance(real, Mapping) and real.get("difficult_train") == "ignore":
        raise ValueError(f"data.real: {_NO_MASK}")


def check_regime_methods(settings: Mapping[str, Any]) -> None:
    """The regime check's methods must be among ``methods`` (the chapter compares each with its section-3 runs)."""
    rc, methods = settings.get("regime_check"), settings.get("methods") or []
    if rc and isinstance(rc, Mapping) and isinstance(rc.get("methods"), (list, tuple)):
        missing = [m for m in rc["methods"] if m not in methods]
        if missing:
            raise ValueError(f"regime_check.methods {missing} are not in methods {list(methods)}: the regime check "
                             "compares each with its run in section 3; add them to methods")


def make_step(method: str, options: dict | None = None, boxes: Sequence[np.ndarray] | Tensor | None = None):
    """The training step of ``method`` (one of :data:`METHODS`) from a profile's ``mixing`` options
    (``grids, p_drop, p_transpose, mixed_size, fill, alpha, cl_weight, cl_detach, cl_form, cl_norm``; missing = the
    paper's / authors' defaults). ``mosaic`` needs ``boxes`` (per-image ``(k, 5)`` arrays, e.g. ``SceneSet.boxes``)."""
    o = dict(options or {})
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")

    def splicemix() -> SpliceMix:
        return splicemix_from_options(o)

    if method == "baseline":
        return MixStep()
    if method in ("mixup", "cutmix"):
        return MixStep((Mixup if method == "mixup" else CutMix)(alpha=o.get("alpha", 0.5)))
    if method == "batch_aug":
        return MixStep(BatchAugmentation(m=o.get("ba_copies", 2)))
    if method == "mosaic":
        if boxes is None:
            raise ValueError("the mosaic step needs the per-image boxes (e.g. boxes=scenes.boxes)")
        return MosaicStep(boxes)
    if method == "splicemix":
        return SpliceMixStep(splicemix())
    return SpliceMixStep(splicemix(), cl_weight=o.get("cl_weight", 1.0), detach=o.get("cl_detach", True),
                         cl_form=o.get("cl_form", "bce"), cl_norm=o.get("cl_norm", "paper"))


def time_steps(models: Mapping[str, nn.Module], steps: Mapping[str, Callable], batch, device: torch.device,
               rounds: int = 10, warmup: int = 2, lr: float = 1e-3) -> dict[str, list[float]]:
    """Seconds of one training iteration of each method (Table II, compute only): its step (mixing, forward,
    loss), the backward pass and an SGD update of its own model, on the same regular ``batch`` (``[x, y,
    index]`` on ``device``), or on its own one where ``batch`` maps each method to a batch (Table II keeps the
    *final* batch size: SpliceMix reads 28 images and adds 4 mixed ones where the others read 32). Methods are
    interleaved round by round, after ``warmup`` untimed rounds, so a change of machine load hits them all alike;
    returns ``{method: [seconds per round]}`` (take the median). On a GPU each iteration is synchronised before it
    is timed; that wait is the measurement here, not a needless sync."""
    if set(models) != set(steps):
        raise ValueError(f"models and steps must name the same methods, got {sorted(models)} and {sorted(steps)}")
    batches = dict(batch) if isinstance(batch, Mapping) else {m: batch for m in models}
    if set(batches) != set(models):
        raise ValueError(f"a batch per method must name the methods of models, got {sorted(batches)} and "
                         f"{sorted(models)}")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=lr, momentum=0.9) for m in models}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one(m: str) -> float:
        models[m].train()
        sync()
        t0 = time.perf_counter()
        loss, _ = steps[m](models[m], batches[m], device)
        opts[m].zero_grad(set_to_none=True)
        loss.backward()
        opts[m].step()
        sync()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {m: [] for m in models}
    for r in range(warmup + rounds):
        for m in models:
            t = one(m)
            if r >= warmup:
                times[m].append(t)
    return times


def _mixing_key(method: str, options: Mapping[str, Any]) -> Any:
    """What of the ``mixing`` options ``method``'s step computes with (:func:`mlic_lib.utils.object_key` of its
    :func:`make_step`): another method's options leave its runs alone (SpliceMix's grids do not retrain Mixup).
    Mosaic reads only its images' boxes, which the data settings fix."""
    from mlic_lib.utils import object_key

    if method in ("baseline", "mosaic"):
        return {}
    return object_key(make_step(method, dict(options)))


def method_run_dir(settings, method: str, seed: int = 0, tag: str = ""):
    """The cache folder of :func:`train_method`'s run (the key: chapter, method, data/model/train settings,
    the seed, the mixing options the method's step reads, and the library's version and source)."""
    from mlic_lib.data.section import data_key
    from mlic_lib.engine import TrainConfig, run_dir_for

    cfg = TrainConfig.from_dict({**settings["train"], "seed": seed})
    key = {"chapter": settings.get("chapter"), "name": method, "data": data_key(settings["data"]),
           "model": settings["model"],
           "train": cfg.key_dict(), "mixing": _mixing_key(method, settings["mixing"])}
    return run_dir_for(f"splicemix-{method}{tag}-s{seed}", key, code=(__name__,))


def train_method(settings, data, method: str, seed: int = 0, tag: str = "", progress: bool = False,
                 run_dir=None):
    """Train (or load from the cache) one method of the chapter on the scenes: the profile's ``model``,
    ``train`` and ``mixing`` settings, the step of :func:`make_step` (Mosaic reads ``data.train.boxes``
    through :class:`IndexedDataset`), no evaluation during training. ``tag`` tells apart runs of the same
    method on other data (its data settings enter the cache key too); ``run_dir`` overrides the cache
    folder of :func:`method_run_dir` (e.g. the one a pool worker wrote). Returns the engine's ``FitResult``."""
    from mlic_lib.engine import TrainConfig, fit
    from mlic_lib.experiments import build_scene_model

    opts, m = settings["mixing"], settings["model"]
    cfg = TrainConfig.from_dict({**settings["train"], "seed": seed})
    return fit(build_scene_model(m, data.num_classes, seed), IndexedDataset(data.train_ds), None, cfg,
               step=make_step(method, opts, boxes=data.train.boxes),
               run_dir=run_dir or method_run_dir(settings, method, seed, tag), progress=progress)


def _pool_task(settings, data, method: str, seed: int, tag: str) -> tuple[str, bool]:
    run = train_method(settings, data, method, seed, tag)
    return str(run.run_dir), run.cached


class MethodRuns(dict):
    """``{(method, seed): FitResult}`` as returned by :func:`train_methods`, plus how the runs missing from
    the cache were scheduled: ``mode`` (``'process'`` or ``'sequential'``, see
    :func:`mlic_lib.process_pool.resolve_parallel`) and ``workers`` (processes that trained at once: one per
    CPU in a pool, capped by the runs to train; 1 when sequential or when every run was cached)."""

    mode: str = "sequential"
    workers: int = 1


def train_methods(settings, data, methods: Sequence[str], seeds: Sequence[int], tag: str = "",
                  parallel: str | None = None, progress: bool = True) -> MethodRuns:
    """:func:`train_method` for every ``(method, seed)``; returns a :class:`MethodRuns`
    ``{(method, seed): FitResult}`` that also records how the runs were scheduled.

    ``parallel`` (default ``settings['parallel']`` or ``'auto'``, see
    :func:`mlic_lib.process_pool.resolve_parallel`): ``'process'`` trains the runs missing from the cache
    in single-thread worker processes, one per CPU (on 2 cores about 1.3x faster than one two-thread
    process for the chapter's small ResNet), then loads them; ``'sequential'`` trains them here.
    """
    from tqdm.auto import tqdm

    from mlic_lib.process_pool import pool_size, resolve_parallel, run_missing
    from mlic_lib.utils import bar_disabled

    jobs = [(m, int(s)) for m in methods for s in seeds]
    runs = MethodRuns()
    runs.mode = resolve_parallel(parallel or settings.get("parallel"), settings["train"].get("device"))
    pooled: dict = {}  # {job: (run folder, cached)} of the runs a worker trained or found
    if runs.mode == "process":
        pooled = run_missing(_pool_task, {(m, s): (settings, data, m, s, tag) for m, s in jobs},
                           lambda j: (method_run_dir(settings, j[0], j[1], tag) / "results.json").is_file(),
                           desc="SpliceMix runs (process pool)" if progress else None)
        runs.workers = pool_size(len(pooled))
    for m, s in tqdm(jobs, desc="SpliceMix runs", disable=bar_disabled(progress), leave=False):
        runs[m, s] = train_method(settings, data, m, s, tag, run_dir=pooled[(m, s)][0] if (m, s) in pooled else None)
    for key, (_, cached) in pooled.items():  # loaded here from a worker's folder: a cache hit only if it was one there
        runs[key].cached = cached
    return runs
