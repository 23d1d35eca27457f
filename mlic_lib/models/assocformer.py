"""AssocFormer (Xing et al., BMVC 2022): a transformer backbone + an association module (AM).

No code is public. The paper's Sec. 3.4 is ambiguous about shapes. The reading here fits all of
Eqs. 4-7 (``L in R^d``, ``{K, M} in R^{C x d}``, ``A in R^{C x C}``, ``N1 in R^C``):

* Eq. 4: ``K = Conv1d(1 -> C, kernel 1)(L.unsqueeze(1))`` and likewise ``M`` (separate weights):
  ``(B, d) -> (B, 1, d) -> (B, C, d)``, i.e. ``K[b, c, j] = w_c * L[b, j] + b_c``. Eq. 4 gives no kernel size:
  any odd kernel ``k`` with 'same' zero padding fits the shapes too (the option ``kernel_size``; 1 by default);
* Eq. 5: ``A = sigmoid(K K^T)``: ``(B, C, C)``, one symmetric matrix per image with entries in (0, 1);
* Eq. 6: ``N1 = Conv1d(d -> 1, kernel 1)(M^T A)``: ``M^T A`` is ``(B, d, C)``, so ``N1`` is ``(B, C)``;
* Eq. 7: ``O = alpha * N1 + beta * N2`` with ``N2 = fc(L)`` (``nn.Linear(d, C)``) and the paper's three
  fusion settings: ``'equal'`` (0.5 / 0.5, the paper's default), ``'single'`` (1 / 0, N1 only) and
  ``'learnable'`` (alpha a learnable scalar, beta = 1). ``'backbone'`` (alpha = 0, beta = 1, no AM
  at all) is the "backbone without AM" comparison of Table 1 (COCO) and the text of Sec. 4.2.2 (VOC).

A consequence of the kernel-1 reading, shown in the chapter: ``K K^T[c, c'] = w_c w_c' |L|^2 + (w_c b_c' + b_c
w_c') sum(L) + d b_c b_c'``: ``K = w L^T + b 1^T`` has rank <= 2, so the per-image ``K K^T`` (``A`` before the
sigmoid) has rank <= 2 and depends on the image only through ``|L|^2`` and ``sum(L)``. With a kernel of size ``k``
each row of ``K`` combines ``k`` shifted copies of ``L`` and the bias, so the rank bound is ``k + 1``
(:attr:`AssociationModule.logit_rank_bound`). There is no authors' code, so there is no code variant; the optional
``scale`` multiplies ``K K^T`` (e.g. ``1 / d`` against sigmoid saturation) and is off (1.0) by default, as in the
paper.

The loss (Eqs. 8-9) is in :mod:`mlic_lib.assoc_losses`; :class:`AssocFormerStep` plugs it into
:func:`mlic_lib.engine.fit`. The backbone is any timm transformer used as a pooled-embedding extractor
(``timm.create_model(name, num_classes=0)`` -> ``(B, d)``): a small ViT or Swin from scratch on the
embedded data, ``swin_large_patch4_window12_384`` for the paper's recipe. CvT (the paper's best
backbone) is not in timm 1.0.31; it is not provided here.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlic_lib.assoc_losses import REGULARIZERS, AssocFormerLoss
from mlic_lib.models.backbones import load_weights_file, load_without_classifier
from mlic_lib.utils import model_device

__all__ = [
    "FUSIONS",
    "AssocFormer",
    "AssocFormerStep",
    "AssociationModule",
    "association_summary",
    "build_assocformer",
    "head_cost",
    "initial_assocformer",
    "mean_association",
    "symmetric_pearson_ceiling",
    "transformer_backbone",
    "train_assocformer",
]

FUSIONS: tuple[str, ...] = ("equal", "single", "learnable", "backbone")


def check_kernel_size(kernel_size: object) -> None:
    """Raise ``ValueError`` unless ``kernel_size`` (Eq. 4's convolution, the chapter's ``model.kernel_size``) is an
    odd whole number >= 1, the sizes for which 'same' padding keeps the ``d`` columns of ``K``."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size (the chapter's model.kernel_size) must be an odd whole number >= 1 (so that K "
                         f"keeps d columns with 'same' padding); got {kernel_size!r}: use 1 for the book's reading "
                         "of Eq. 4, or 3, 5, ...")


def _conv1d(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """``conv(x)`` computed in ``x``'s dtype: a module cast to bf16/fp16 (``model.half()``) still runs the AM in
    float32, as under autocast, instead of failing on float32 inputs against half-precision weights."""
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    return F.conv1d(x, conv.weight.to(x.dtype), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class AssociationModule(nn.Module):
    """Eqs. 4-6: ``L (B, d) -> (N1 (B, C), A (B, C, C))``.

    Parameters
    ----------
    embed_dim : d.
    num_classes : C.
    scale : multiplies ``K K^T`` before the sigmoid (1.0 = the paper's Eq. 5).
    kernel_size : of Eq. 4's two convolutions over the ``d`` positions of ``L``, odd, with 'same' zero padding
        (1 = the book's reading; the paper gives no size).
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 1.0, kernel_size: int = 1):
        super().__init__()
        if embed_dim < 1 or num_classes < 1:
            raise ValueError(f"embed_dim and num_classes must be positive; got {embed_dim}, {num_classes}")
        check_kernel_size(kernel_size)
        pad = kernel_size // 2
        self.key = nn.Conv1d(1, num_classes, kernel_size=kernel_size, padding=pad)  # Eq. 4, K
        self.value = nn.Conv1d(1, num_classes, kernel_size=kernel_size, padding=pad)  # Eq. 4, M
        self.out = nn.Conv1d(embed_dim, 1, kernel_size=1)  # Eq. 6
        self.embed_dim, self.num_classes, self.scale = embed_dim, num_classes, float(scale)
        self.kernel_size = kernel_size

    @property
    def logit_rank_bound(self) -> int:
        """The largest rank ``K K^T`` (Eq. 5 before the sigmoid) can have: ``K`` is a combination of
        ``kernel_size`` shifted copies of ``L`` plus a bias column, so ``min(kernel_size + 1, C, d)``."""
        return min(self.kernel_size + 1, self.num_classes, self.embed_dim)

    def association_logits(self, L: Tensor) -> Tensor:
        """Eq. 5 before the sigmoid: ``scale * K K^T``, shape ``(B, C, C)``, with ``K`` of Eq. 4 (rank at most
        :attr:`logit_rank_bound`: 2 with kernel 1, where ``K = w L^T + b 1^T``; see the module docstring)."""
        K = _conv1d(self.key, L.unsqueeze(1))  # (B, C, d)
        return self.scale * (K @ K.transpose(1, 2))

    def association(self, L: Tensor) -> Tensor:
        """Eq. 5: ``A = sigmoid(K K^T)``, shape ``(B, C, C)``."""
        return torch.sigmoid(self.association_logits(L))

    def forward(self, L: Tensor) -> tuple[Tensor, Tensor]:
        """``(N1, A)``, in float32 (float64 for a float64 module): under bf16 autocast ``K K^T`` would be rounded
        before the sigmoid (which saturates for large ``d``), so the ``A`` trained with would differ from the ``A``
        analysed (:func:`mean_association`). The head is a small share of the model's FLOPs."""
        if L.ndim != 2 or L.shape[1] != self.embed_dim:
            raise ValueError(f"AssociationModule expects embeddings (B, {self.embed_dim}); got {tuple(L.shape)}")
        no_autocast = (torch.autocast(L.device.type, enabled=False) if torch.amp.is_autocast_available(L.device.type)
                       else contextlib.nullcontext())  # a device without autocast (meta) has nothing to turn off
        with no_autocast:
            L = L.to(torch.promote_types(self.key.weight.dtype, torch.float32))
            A = self.association(L)
            M = _conv1d(self.value, L.unsqueeze(1))  # (B, C, d)
            N1 = _conv1d(self.out, M.transpose(1, 2) @ A).squeeze(1)  # Eq. 6: (B, d, C) -> (B, C)
        return N1, A


class AssocFormer(nn.Module):
    """Backbone -> ``L`` -> AM (``N1``) and ``fc`` (``N2``) -> ``O = alpha N1 + beta N2`` (Eq. 7).

    ``forward(x)`` returns the logits ``O`` (B, C); ``forward(x, return_assoc=True)`` returns
    ``(O, A)`` (``A`` is ``None`` for ``fusion='backbone'``). The backbone is ``self.features`` (so the
    engine's ``backbone_lr_mult`` applies to it); ``self.last_association`` keeps the last ``A`` (detached).
    """

    def __init__(self, features: nn.Module, embed_dim: int, num_classes: int, fusion: str = "equal",
                 alpha_init: float = 0.5, scale: float = 1.0, kernel_size: int = 1):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.features = features
        self.fusion = fusion
        self.am = AssociationModule(embed_dim, num_classes, scale, kernel_size) if fusion != "backbone" else None
        self.fc = nn.Linear(embed_dim, num_classes) if fusion != "single" else None
        if fusion == "learnable":
            self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        else:
            self.register_buffer("alpha", torch.tensor({"equal": 0.5, "single": 1.0, "backbone": 0.0}[fusion]))
        self.register_buffer("beta", torch.tensor({"equal": 0.5, "single": 0.0}.get(fusion, 1.0)))
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.last_association: Tensor | None = None

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled backbone embedding ``L`` (B, d)."""
        L = self.features(x)
        if L.ndim != 2:
            raise ValueError(f"the backbone must return pooled embeddings (B, d); got {tuple(L.shape)} "
                             "(create the timm model with num_classes=0 and a global pool)")
        return L

    def forward_head(self, L: Tensor) -> tuple[Tensor, Tensor | None]:
        """Eq. 7 from the embedding: ``(O, A)``."""
        A = None
        out = 0.0
        if self.am is not None:
            N1, A = self.am(L)
            out = self.alpha * N1
        if self.fc is not None:
            out = out + self.beta * self.fc(L)
        return out, A

    def forward(self, x: Tensor, return_assoc: bool = False):
        O, A = self.forward_head(self.forward_features(x))
        self.last_association = None if A is None else A.detach()
        return (O, A) if return_assoc else O


def check_regularizers(names: object) -> None:
    """Raise ``ValueError`` unless ``names`` (the chapter's ``analysis.regularizers``, Table 3's rows) is a list of
    distinct regularisers of Eq. 9 that holds ``none`` and ``l2`` (the chapter compares every row with no
    regulariser and builds its fusion and scale runs on L2), so a typo or a short list is refused before anything
    trains, not after hours of it."""
    from mlic_lib.assoc_losses import REGULARIZERS

    if (not isinstance(names, (list, tuple)) or not names or any(n not in REGULARIZERS for n in names)
            or len(set(names)) < len(names)):
        raise ValueError(f"analysis.regularizers must be a non-empty list of distinct names from {REGULARIZERS}, "
                         f"got {names!r}")
    missing = [n for n in ("none", "l2") if n not in names]
    if missing:
        raise ValueError(f"analysis.regularizers must include {missing} (the chapter compares every regulariser "
                         f"with none and builds on l2), got {names!r}; e.g. {[*missing, *names]}")


def check_transformer_name(name: object) -> None:
    """Raise ``ValueError`` unless ``name`` is one of timm's models (the chapter's ``model.backbone``)."""
    import timm

    if not isinstance(name, str) or not timm.is_model(name):  # a name, with or without a weights tag; no wildcards
        hint = " (CvT is not in timm; use a Swin or ViT)" if "cvt" in str(name).lower() else ""
        raise ValueError(f"timm has no model {name!r}{hint}; see timm.list_models('*swin*') / ('vit_*')")


def _in_own_layout(state: Mapping[str, Any], net: nn.Module) -> dict | None:
    """``state`` without its classifier (``head.*``) and the buffers ``net`` keeps but does not save (Swin's
    ``relative_position_index``, ``attn_mask``), if what remains has exactly ``net``'s keys and shapes; else
    ``None``."""
    saved = net.state_dict()
    transient = {name for name, _ in net.named_buffers()} - set(saved)
    kept = {k: v for k, v in state.items() if not k.startswith("head.") and k not in transient}
    own = {k: tuple(v.shape) for k, v in saved.items() if not k.startswith("head.")}
    return kept if own == {k: tuple(getattr(v, "shape", ())) for k, v in kept.items()} else None


def transformer_backbone(name: str = "vit_tiny_patch16_224", pretrained: bool | str = False,
                         **kwargs: Any) -> tuple[nn.Module, int]:
    """A timm transformer as a pooled-embedding extractor: ``(module, d)``.

    ``kwargs`` go to ``timm.create_model`` (e.g. ``img_size=48, patch_size=8, embed_dim=64, depth=3,
    num_heads=2`` for the CPU ViT). ``pretrained`` is ``False``, ``True`` (timm hub weights; needs
    the network) or a path to a local state dict.
    """
    import timm

    check_transformer_name(name)
    net = timm.create_model(name, pretrained=pretrained is True, num_classes=0, **kwargs)
    if isinstance(pretrained, str):
        state = load_weights_file(pretrained)
        # A file in timm's own layout (e.g. this function's module, saved) loads as it is. Any other goes
        # through timm's conversion of the original checkpoints, as timm applies it to hub weights (e.g.
        # Microsoft's Swin: downsampling at the end of a stage instead of the start of the next, buffers such
        # as relative_position_index that timm does not persist). Deciding here, not in timm, keeps a headless
        # timm-layout Swin file from being "converted" by timm < 1.0.31, which took any file without
        # head.fc.weight for an original one.
        convert = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
        own = _in_own_layout(state, net)
        if own is not None:
            state = own
        elif convert is not None:
            state = convert(state, net)
        load_without_classifier(net, state, pretrained, name, ("head.",))
    return net, int(net.num_features)


def build_assocformer(num_classes: int, backbone: str = "vit_tiny_patch16_224", fusion: str = "equal",
                      backbone_kwargs: Mapping[str, Any] | None = None, pretrained: bool | str = False,
                      alpha_init: float = 0.5, scale: float = 1.0, kernel_size: int = 1) -> AssocFormer:
    """:class:`AssocFormer` on the timm transformer ``backbone`` (see :func:`transformer_backbone`)."""
    features, d = transformer_backbone(backbone, pretrained, **dict(backbone_kwargs or {}))
    return AssocFormer(features, d, num_classes, fusion=fusion, alpha_init=alpha_init, scale=scale,
                       kernel_size=kernel_size)


class AssocFormerStep:
    """Engine step: ``loss = ASL(O, y) + theta R(A)`` (Eq. 9); logs ``asl``, ``reg`` and ``alpha``."""

    def __init__(self, loss: AssocFormerLoss | None = None):
        self.loss = loss or AssocFormerLoss()

    def __call__(self, model: nn.Module, batch, device):
        x, y = batch[0], batch[1]
        O, A = model(x, return_assoc=True)
        loss, logs = self.loss(O.float(), y, A, batch[2] if len(batch) > 2 else None)
        base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        logs["alpha"] = base.alpha.detach()
        return loss, logs


# ----------------------------------------------------------------------------------- analysis
@torch.no_grad()
def mean_association(model: AssocFormer, data, batch_size: int = 64, device: str | torch.device | None = None,
                     num_workers: int = 0) -> np.ndarray:
    """Mean of ``A`` (Eq. 5) over a dataset (items ``(x, y, ...)``): a (C, C) array (Fig. 4).

    Runs without gradients on ``device`` (default: where the model's parameters are); on CUDA the backbone
    runs under bf16 autocast, ``A`` itself is computed in float32 and summed in float64.
    """
    if model.am is None:
        raise ValueError("this model has no association module (fusion='backbone'): there is no A to average")
    device = torch.device(device) if device is not None else model_device(model)
    model.eval().to(device)
    total, n = None, 0
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    with torch.no_grad():
        for batch in loader:
            x = batch[0].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                L = model.forward_features(x)
            A = model.am.association(L.to(torch.promote_types(model.am.key.weight.dtype, torch.float32))).double()
            total = A.sum(0) if total is None else total + A.sum(0)
            n += A.shape[0]
    if n == 0:
        raise ValueError("the dataset is empty")
    return (total / n).cpu().numpy()


def association_summary(A: np.ndarray, cond: np.ndarray, groups: np.ndarray | None = None) -> dict[str, float]:
    """Numbers for one Fig. 4 panel: how much a (mean) association matrix looks like the truth.

    * ``pearson``: correlation with ``cond`` (``P(j|i)`` of the training labels) over off-diagonal entries;
    * ``spearman``: the rank version (average ranks for ties, as ``scipy.stats.spearmanr``);
    * ``mean_offdiag``: mean off-diagonal value (how far the regulariser pushed A down);
    * ``entropy``: mean over rows of the normalised entropy of the row's off-diagonal entries taken as a
      distribution (1 = flat, 0 = all mass on one class); ``1 - entropy`` is a sparsity number; NaN for
      fewer than 3 classes (a row then has one off-diagonal entry: no spread to measure);
    * ``within_minus_across`` (with ``groups``): mean A within a super-category minus across.
    """
    from scipy.stats import rankdata

    A = np.asarray(A, dtype=np.float64)
    cond = np.asarray(cond, dtype=np.float64)
    if A.shape != cond.shape or A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A and cond must be square and of the same shape; got {A.shape} and {cond.shape}")
    c = A.shape[0]
    off = ~np.eye(c, dtype=bool)
    a, t = A[off], cond[off]
    pearson = float(np.corrcoef(a, t)[0, 1]) if a.std() > 0 and t.std() > 0 else float("nan")
    ra, rt = rankdata(a), rankdata(t)  # tied values (pairs that never co-occur, a saturated A) share their mean rank
    spearman = float(np.corrcoef(ra, rt)[0, 1]) if a.std() > 0 and t.std() > 0 else float("nan")
    rows = np.where(off, A, 0.0)
    p = rows / np.maximum(rows.sum(1, keepdims=True), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(1) / np.log(c - 1) if c > 2 else np.full(c, np.nan)
    out = {"pearson": pearson, "spearman": spearman, "mean_offdiag": float(a.mean()), "entropy": float(ent.mean())}
    if groups is not None:
        g = np.asarray(groups)
        same = (g[:, None] == g[None, :]) & off
        out["within_minus_across"] = float(A[same].mean() - A[~same & off].mean())
    return out


def symmetric_pearson_ceiling(cond: np.ndarray) -> float:
    """The largest off-diagonal Pearson r with ``cond`` that a *symmetric* matrix can reach, as Eq. 5's
    ``A = sigmoid(K K^T)`` is, while ``P(j|i)`` is not: ``r((cond + cond^T) / 2, cond)``, which equals
    ``sd(sym) / sd(cond)`` over the off-diagonal entries.

    Why: ``cond = sym + anti`` with ``anti`` antisymmetric; a symmetric ``A`` takes one value on the two entries
    ``(i, j)``, ``(j, i)``, where ``anti`` sums to 0, so ``cov(A, anti) = 0`` and ``r(A, cond) = r(A, sym) sd(sym) /
    sd(cond) <= sd(sym) / sd(cond)``, reached by ``A = sym``. Read :func:`association_summary`'s ``pearson``
    against it, not against 1. NaN when the off-diagonal entries of ``cond`` are constant."""
    cond = np.asarray(cond, dtype=np.float64)
    if cond.ndim != 2 or cond.shape[0] != cond.shape[1]:
        raise ValueError(f"cond must be a square matrix, got shape {cond.shape}")
    off = ~np.eye(cond.shape[0], dtype=bool)
    t, sym = cond[off], ((cond + cond.T) / 2)[off]
    return float(np.corrcoef(sym, t)[0, 1]) if t.std() > 0 and sym.std() > 0 else float("nan")


def head_cost(head: nn.Module, embed_dim: int, batch_size: int = 16, repeats: int = 20) -> dict[str, float]:
    """Parameters, FLOPs and measured milliseconds of one forward of a head on ``L`` (batch_size, embed_dim).

    FLOPs come from ``torch.utils.flop_counter`` (matmuls and convolutions, 1 multiply-add = 2 FLOPs;
    element-wise ops such as the sigmoid are not counted); time is the median of ``repeats`` forwards, with
    their first and third quartiles as ``ms_q1`` / ``ms_q3`` (sub-millisecond CPU timings are noisy: compare two
    heads only where these ranges do not overlap). All three are NaN when ``repeats`` is 0.

    ``head`` maps ``L`` to logits (a :class:`~mlic_lib.models.gcn_head.GCNHead`, an ``AssocFormer``'s
    ``forward_head`` wrapped by the caller, or an :class:`AssociationModule`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    L = torch.randn(batch_size, embed_dim)
    head = head.eval()
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            head(L)
        flops = counter.get_total_flops()
        for _ in range(3 if repeats else 0):
            head(L)
        times = [float("nan")]
        for _ in range(repeats):
            t = time.perf_counter()
            head(L)
            times.append(time.perf_counter() - t)
    params = sum(p.numel() for p in head.parameters())
    q1, ms, q3 = (1000 * float(v) for v in np.percentile(times[-repeats:] if repeats else times, (25, 50, 75)))
    return {"params": float(params), "flops": float(flops), "ms": ms, "ms_q1": q1, "ms_q3": q3}


# -------------------------------------------------------------------------------- experiments
def initial_assocformer(model: Mapping[str, Any], num_classes: int, seed: int = 0, fusion: str = "equal") -> nn.Module:
    """The untrained AssocFormer that :func:`train_assocformer` starts from with this ``seed``: the profile's
    ``model`` section (``backbone``, ``backbone_kwargs``, ``pretrained``, ``alpha_init``, ``scale``,
    ``kernel_size``) built right
    after ``seed_everything(seed)``, which reseeds the global Python, NumPy and torch generators. A chapter compares
    a trained model with it to see what training changed."""
    from mlic_lib.utils import seed_everything

    seed_everything(seed)
    return build_assocformer(num_classes, model.get("backbone", "vit_tiny_patch16_224"), fusion,
                             model.get("backbone_kwargs"), model.get("pretrained", False),
                             float(model.get("alpha_init", 0.5)), float(model.get("scale", 1.0)),
                             model.get("kernel_size", 1))


def train_assocformer(settings: Mapping[str, Any], data, seed: int = 0, regularizer: str = "l2",
                      fusion: str = "equal", theta: float | None = None, progress: bool = False):
    """Train (or load from the cache) one AssocFormer on ``data`` (a :class:`~mlic_lib.experiments.SceneData`
    or anything with ``train_ds``, ``test_ds``, ``num_classes``) with the profile's settings.

    ``settings['model']``: ``backbone`` (timm name), ``backbone_kwargs``, ``pretrained``, ``scale``,
    ``kernel_size``, ``alpha_init``; ``settings['loss']``: ``theta``, ``gamma_pos``, ``gamma_neg``, ``clip``,
    ``reduction``; ``settings['train']``: :class:`~mlic_lib.engine.TrainConfig` fields. Returns the engine's
    ``FitResult``.
    """
    from mlic_lib.engine import TrainConfig, fit, run_dir_for

    if regularizer not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {regularizer!r}; choose one of {REGULARIZERS}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
    m = dict(settings["model"])
    lo = dict(settings.get("loss", {}))
    if theta is not None:
        lo["theta"] = theta
    cfg = TrainConfig.from_dict({**settings["train"], "seed": seed})
    model = initial_assocformer(m, data.num_classes, seed, fusion)
    loss = AssocFormerLoss(norm=regularizer, **lo)
    key = {"chapter": settings.get("chapter"), "data": settings["data"], "model": m, "loss": lo,
           "train": cfg.key_dict(), "regularizer": regularizer, "fusion": fusion}
    name = f"{settings.get('chapter')}-{fusion}-{regularizer.replace('+', 'p')}-s{seed}"
    return fit(model, data.train_ds, data.test_ds, cfg, step=AssocFormerStep(loss),
               run_dir=run_dir_for(name, key, code=(__name__,)),
               progress=progress)
