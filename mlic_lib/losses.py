"""Multi-label classification losses: masked BCE, Asymmetric Loss (ASL) and weighted BCE.

Every loss comes as a function (``bce_with_logits``, ``asymmetric_loss``, ``weighted_bce``)
and as a timm-style :class:`torch.nn.Module` (``BCEWithLogits``, ``AsymmetricLoss``,
``WeightedBCE``) whose ``forward(logits, targets, mask=None)`` calls the function.

Conventions shared by all losses
--------------------------------
* ``logits`` are the raw ``(N, C)`` model outputs (no sigmoid applied); ``p = sigmoid(logits)``.
* ``targets`` has the shape of ``logits`` with values in ``[0, 1]`` (binary, or soft labels). The values
  are checked on a CPU where the mask keeps them (a ``ValueError``: convert VOC labels ``{1, 0, -1}`` with
  :func:`mlic_lib.metrics.voc_targets` first), not on an accelerator, where the check would make the host
  wait for the device at every step, nor inside ``torch.compile``.
* ``mask`` (optional, bool, same shape) marks the entries to keep: ``False`` entries (e.g. VOC
  *difficult*) contribute nothing to the loss nor to its gradient.
* ``reduction`` is ``'none'`` (elementwise loss, masked entries set to 0), ``'sum'`` or
  ``'mean'`` (the sum divided by the number of unmasked entries, ``N * C`` without a mask).

The loss of an entry is written ``-(y * L+ + (1 - y) * L-)`` with ``L+`` the log-likelihood
term of a positive and ``L-`` that of a negative.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AsymmetricLoss",
    "BCEWithLogits",
    "WeightedBCE",
    "asymmetric_loss",
    "bce_with_logits",
    "weighted_bce",
]

REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"unknown reduction {reduction!r}; valid values are {', '.join(map(repr, REDUCTIONS))}"
        )


def _prepare(
    logits: Tensor, targets: Tensor, mask: Tensor | None, reduction: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check shapes and ``reduction``; return ``(logits, targets, mask)``: ``targets`` in the dtype of ``logits``, a
    bool mask, and both with their masked entries set to 0 (a placeholder there, -1 or NaN, then cannot reach the
    loss or the gradient: ``torch.where`` on the loss alone still gives ``0 * NaN`` in the backward pass)."""
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise ValueError(
            f"logits and targets must be torch.Tensors; got {type(logits).__name__} and "
            f"{type(targets).__name__} (convert with torch.as_tensor)"
        )
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape; got logits {tuple(logits.shape)} and targets "
            f"{tuple(targets.shape)}. Check the number of classes of the model head and of the labels."
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor; got dtype {logits.dtype}")
    _check_reduction(reduction)
    if reduction == "mean" and logits.numel() == 0 and mask is None:  # with a mask: nothing counts, the mean is 0
        raise ValueError(f"logits of shape {tuple(logits.shape)} hold no entry: the mean over an empty batch is "
                         "undefined (NaN). Skip empty batches, or use reduction='sum'")
    targets = targets.to(dtype=logits.dtype)
    if mask is not None:
        if not isinstance(mask, Tensor):
            mask = torch.as_tensor(mask)
        if mask.shape != logits.shape:
            raise ValueError(
                f"mask must have the same shape as logits; got mask {tuple(mask.shape)} and logits "
                f"{tuple(logits.shape)} (one bool per entry, False = ignore)"
            )
        if mask.dtype != torch.bool and mask.device.type == "cpu" and not torch.compiler.is_compiling():
            wrong = (mask != 0) & (mask != 1)
            if bool(wrong.any()):
                raise ValueError(f"mask must be bool (or 0/1): True = the entry counts, False = ignore it; got dtype "
                                 f"{mask.dtype} with values such as {mask[wrong][0].item()!r}. A weight per entry is "
                                 "weighted_bce's pos_weight/neg_weight, not a mask")
        mask = mask.to(device=logits.device, dtype=torch.bool)
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = ~((targets >= 0) & (targets <= 1))  # NaN too
        if mask is not None:
            bad &= mask  # a masked entry may hold a placeholder (-1, NaN): it counts for nothing
        if bool(bad.any()):
            raise ValueError(
                f"targets must lie in [0, 1] (1 = positive, 0 = negative, or a soft label) where the mask keeps "
                f"them; got {targets[bad][0].item()!r} among {int(bad.sum())} bad entries. VOC labels {{1, 0, -1}}: "
                "convert with mlic_lib.metrics.voc_targets (and pass its mask); {-1, 1} labels: use (y + 1) / 2"
            )
    if mask is not None:
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        logits, targets = torch.where(mask, logits, zero), torch.where(mask, targets, zero)
    return logits, targets, mask


def _reduce(loss: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Zero the masked entries of an elementwise loss and apply ``reduction``. With a mask, ``'mean'`` divides by
    the number of kept entries (every known label weighs the same), not the mean over images of each image's mean
    over its kept classes; without one the two are the same."""
    if mask is not None:
        # the masked inputs were set to 0 by _prepare (so nothing non-finite is left there), but their loss is not 0
        loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction == "none":
        return loss
    # half-precision losses are summed (and returned) in float32: a float16 sum passes 65504 at a batch of
    # 4096 x 80 entries of ln 2, where torch's own mean stays finite
    total = loss.sum(dtype=torch.float32 if loss.dtype in (torch.float16, torch.bfloat16) else None)
    if reduction == "sum":
        return total
    count = loss.numel() if mask is None else mask.sum().clamp(min=1)
    return total / count


# --------------------------------------------------------------------------------------------
# Binary cross-entropy
# --------------------------------------------------------------------------------------------
def bce_with_logits(
    logits: Tensor, targets: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Binary cross-entropy on logits, with an optional mask of ignored entries.

    .. math:: \\ell = -\\big(y \\log \\sigma(z) + (1 - y) \\log(1 - \\sigma(z))\\big)

    computed stably by :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C)`` raw scores ``z``.
    targets : torch.Tensor
        Same shape, values in ``[0, 1]`` (bool accepted).
    mask : torch.Tensor, optional
        Same shape, bool; ``False`` entries contribute nothing.
    reduction : {'mean', 'sum', 'none'}, default 'mean'
        ``'mean'`` divides the sum by the number of unmasked entries.

    Returns
    -------
    torch.Tensor
        Scalar, or the elementwise loss for ``reduction='none'`` (0 at masked entries).

    Raises
    ------
    ValueError
        On mismatched shapes or an unknown reduction.
    """
    logits, targets, mask = _prepare(logits, targets, mask, reduction)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return _reduce(loss, mask, reduction)


class BCEWithLogits(nn.Module):
    """Module form of :func:`bce_with_logits` (masked binary cross-entropy on logits).

    Parameters
    ----------
    reduction : {'mean', 'sum', 'none'}, default 'mean'
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        return bce_with_logits(logits, targets, mask=mask, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


# --------------------------------------------------------------------------------------------
# Asymmetric loss
# --------------------------------------------------------------------------------------------
def _check_asl_args(gamma_pos: float, gamma_neg: float, clip: float | None, eps: float) -> None:
    for name, value in (("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0 (a focusing exponent); got {value!r}")
    if clip is not None and not (0 <= clip < 1):
        raise ValueError(
            f"clip (probability margin m) must be in [0, 1), or None/0 to disable it; got {clip!r}"
        )
    if not (0 < eps < 1):
        raise ValueError(f"eps (log clamp) must be in (0, 1); got {eps!r}")


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float | None = 0.05,
    eps: float = 1e-8,
    mask: Tensor | None = None,
    reduction: str = "sum",
    detach_focal_weight: bool = False,
) -> Tensor:
    """Asymmetric Loss (ASL) of Ridnik et al., ICCV 2021, "Asymmetric Loss For Multi-Label Classification".

    With ``p = sigmoid(logits)`` and the shifted probability ``p_m = max(p - m, 0)`` (``m`` =
    ``clip``), the paper's Eqs. for the positive and negative parts read

    .. math::

        L_+ = (1 - p)^{\\gamma_+} \\log(p), \\qquad
        L_- = p_m^{\\gamma_-} \\log(1 - p_m), \\qquad p_m = \\max(p - m, 0),

    and the loss of an entry is ``-(y L+ + (1 - y) L-)``. As in the official implementation,
    the logarithms are clamped, ``log(max(p, eps))`` and ``log(max(1 - p_m, eps))`` (the first is
    evaluated as ``max(logsigmoid(z), log eps)``, the same value computed without underflow).
    The probability shift hard-thresholds very easy negatives (``p <= m``: zero loss, zero
    gradient) and, with ``gamma_neg > gamma_pos``, down-weights easy negatives more than
    positives. With ``gamma_pos = gamma_neg = 0`` and ``clip = 0`` ASL is plain BCE.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C)`` raw scores.
    targets : torch.Tensor
        Same shape, values in ``[0, 1]``.
    gamma_pos, gamma_neg : float, default 0 and 4
        Focusing exponents ``γ+`` and ``γ-`` (>= 0).
    clip : float or None, default 0.05
        Probability margin ``m`` in ``[0, 1)``; ``0`` or ``None`` disables the shift.
    eps : float, default 1e-8
        Lower clamp inside the logarithms.
    mask : torch.Tensor, optional
        Same shape, bool; ``False`` entries contribute nothing.
    reduction : {'sum', 'mean', 'none'}, default 'sum'
        The official ASL code returns the negative **sum** over batch and classes, hence the
        default; note the loss scale (and so a good learning rate) grows with ``N * C``.
    detach_focal_weight : bool, default False
        Compute the focusing weights ``(1 - p)^γ+`` and ``p_m^γ-`` without gradient (the
        official ``disable_torch_grad_focal_loss`` option): the weights then act as constants.

    Returns
    -------
    torch.Tensor
        Scalar, or the elementwise loss for ``reduction='none'``.

    Raises
    ------
    ValueError
        On mismatched shapes, an unknown reduction, a negative gamma, ``clip`` outside
        ``[0, 1)`` or ``eps`` outside ``(0, 1)``.
    """
    _check_asl_args(gamma_pos, gamma_neg, clip, eps)
    logits, targets, mask = _prepare(logits, targets, mask, reduction)
    log_eps = math.log(eps)
    prob = torch.sigmoid(logits)

    # Positive part: log(max(p, eps)) and the focusing weight (1 - p)^γ+.
    log_pos = F.logsigmoid(logits).clamp(min=log_eps)
    # Negative part: p_m = max(p - m, 0), log(max(1 - p_m, eps)) and the weight p_m^γ-.
    if clip:
        prob_m = (prob - clip).clamp(min=0)
        log_neg = torch.log((1 - prob_m).clamp(min=eps))
    else:
        prob_m = prob
        log_neg = F.logsigmoid(-logits).clamp(min=log_eps)  # log(1 - p), without cancellation

    if gamma_pos or gamma_neg:
        # The weights from log-probabilities, (1 - p)^γ = exp(γ log σ(-z)): a 0 < γ < 1 has an infinite slope at
        # 0, so pow(1 - p, γ) on a saturated sigmoid (1 - p == 0 in float32 from z ≈ 17) gave a NaN gradient.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_focal_weight):
            w_pos = torch.exp(gamma_pos * F.logsigmoid(-logits)) if gamma_pos else None
            if not gamma_neg:
                w_neg = None
            elif clip:
                # p_m^γ- only where p_m > 0: at p_m == 0 (p exactly m, which a float32 sigmoid can give) pow's slope
                # is infinite for γ- < 1, and clamp's backward passes the resulting NaN on (it keeps x == min)
                shifted = prob_m > 0
                w_neg = torch.where(shifted, torch.pow(torch.where(shifted, prob_m, 1.0), gamma_neg), 0.0)
            else:
                w_neg = torch.exp(gamma_neg * F.logsigmoid(logits))
        if w_pos is not None:
            log_pos = w_pos * log_pos
        if w_neg is not None:
            log_neg = w_neg * log_neg

    loss = -(targets * log_pos + (1 - targets) * log_neg)
    return _reduce(loss, mask, reduction)


class AsymmetricLoss(nn.Module):
    """Asymmetric Loss (Ridnik et al., ICCV 2021); module form of :func:`asymmetric_loss`.

    ``L+ = (1-p)^γ+ log(p)``, ``L- = p_m^γ- log(1-p_m)``, ``p_m = max(p - m, 0)``; the loss is
    ``-(y L+ + (1-y) L-)`` reduced by **sum** by default, like the official implementation.

    Parameters
    ----------
    gamma_pos : float, default 0
    gamma_neg : float, default 4
    clip : float or None, default 0.05
        Probability margin ``m``; 0 or None disables the shift.
    eps : float, default 1e-8
    reduction : {'sum', 'mean', 'none'}, default 'sum'
    detach_focal_weight : bool, default False
        Compute the focusing weights without gradient.
    """

    def __init__(
        self,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float | None = 0.05,
        eps: float = 1e-8,
        reduction: str = "sum",
        detach_focal_weight: bool = False,
    ) -> None:
        super().__init__()
        _check_asl_args(gamma_pos, gamma_neg, clip, eps)
        _check_reduction(reduction)
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.clip = clip
        self.eps = eps
        self.reduction = reduction
        self.detach_focal_weight = detach_focal_weight

    def forward(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        return asymmetric_loss(
            logits,
            targets,
            gamma_pos=self.gamma_pos,
            gamma_neg=self.gamma_neg,
            clip=self.clip,
            eps=self.eps,
            mask=mask,
            reduction=self.reduction,
            detach_focal_weight=self.detach_focal_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, eps={self.eps}, "
            f"reduction={self.reduction!r}, detach_focal_weight={self.detach_focal_weight}"
        )


# --------------------------------------------------------------------------------------------
# Weighted BCE
# --------------------------------------------------------------------------------------------
def _as_weight(weight: Tensor | float | None, name: str, logits: Tensor) -> Tensor | None:
    """Return ``weight`` as a tensor broadcastable to ``logits`` (``None`` = weight 1)."""
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=logits.dtype, device=logits.device)
    n_classes = logits.shape[-1] if logits.ndim else 1
    if w.ndim == 0 or w.shape == logits.shape or (w.ndim == 1 and w.shape[0] == n_classes):
        if w.device.type == "cpu" and not torch.compiler.is_compiling():
            wrong = ~((w >= 0) & w.isfinite())  # NaN too
            if bool(wrong.any()):
                raise ValueError(f"{name} must be finite and >= 0 (a weight of a loss term); got "
                                 f"{w[wrong].flatten()[0].item()!r}")
        return w
    raise ValueError(
        f"{name} must be a scalar, a per-class vector of shape ({n_classes},) or a per-entry tensor of "
        f"shape {tuple(logits.shape)}; got shape {tuple(w.shape)}"
    )


def weighted_bce(
    logits: Tensor,
    targets: Tensor,
    pos_weight: Tensor | float | None = None,
    neg_weight: Tensor | float | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Binary cross-entropy with separate weights for the positive and the negative terms.

    .. math:: \\ell = -\\big(w_+ \\, y \\log \\sigma(z) + w_- \\, (1 - y) \\log(1 - \\sigma(z))\\big)

    with ``log σ(z) = logsigmoid(z)`` and ``log(1 - σ(z)) = logsigmoid(-z)`` (stable for any
    ``z``). Unlike ``pos_weight`` of :class:`torch.nn.BCEWithLogitsLoss` the negative term can be
    weighted too, e.g. per-class ``w+ = N / (2 n_c)``, ``w- = N / (2 (N - n_c))`` for class
    balancing.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C)`` raw scores ``z``.
    targets : torch.Tensor
        Same shape, values in ``[0, 1]``.
    pos_weight, neg_weight : torch.Tensor, float or None
        ``w+`` and ``w-``: a scalar, a per-class ``(C,)`` vector or a per-entry ``(N, C)`` tensor;
        ``None`` means 1. Must be finite and ``>= 0`` (checked when on the CPU).
    mask : torch.Tensor, optional
        Same shape, bool; ``False`` entries contribute nothing.
    reduction : {'mean', 'sum', 'none'}, default 'mean'
        ``'mean'`` divides the (weighted) sum by the number of unmasked entries, not by the sum
        of the weights.

    Returns
    -------
    torch.Tensor
        Scalar, or the elementwise loss for ``reduction='none'``.

    Raises
    ------
    ValueError
        On mismatched shapes, a weight of the wrong shape, or an unknown reduction.
    """
    logits, targets, mask = _prepare(logits, targets, mask, reduction)
    w_pos = _as_weight(pos_weight, "pos_weight", logits)
    w_neg = _as_weight(neg_weight, "neg_weight", logits)
    term_pos = targets * F.logsigmoid(logits)
    term_neg = (1 - targets) * F.logsigmoid(-logits)
    if w_pos is not None:
        term_pos = w_pos * term_pos
    if w_neg is not None:
        term_neg = w_neg * term_neg
    return _reduce(-(term_pos + term_neg), mask, reduction)


class WeightedBCE(nn.Module):
    """Module form of :func:`weighted_bce`; the weights are stored as (non-trainable) buffers.

    Parameters
    ----------
    pos_weight, neg_weight : torch.Tensor, float, sequence or None
        Weights ``w+`` and ``w-`` (scalar, ``(C,)`` or ``(N, C)``); ``None`` means 1. Moved with
        the module by ``.to(device)`` and saved in its ``state_dict``.
    reduction : {'mean', 'sum', 'none'}, default 'mean'
    """

    pos_weight: Tensor | None
    neg_weight: Tensor | None

    def __init__(
        self,
        pos_weight: Tensor | float | None = None,
        neg_weight: Tensor | float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        for name, value in (("pos_weight", pos_weight), ("neg_weight", neg_weight)):
            if value is None:
                self.register_buffer(name, None)
                continue
            w = torch.as_tensor(value, dtype=torch.get_default_dtype()).detach().clone()
            if w.ndim > 2:
                raise ValueError(
                    f"{name} must be a scalar, (C,) or (N, C) tensor; got shape {tuple(w.shape)}"
                )
            if not torch.isfinite(w).all() or (w < 0).any():
                raise ValueError(
                    f"{name} must hold finite, non-negative weights; got {w.flatten()[:8].tolist()}"
                )
            self.register_buffer(name, w)

    def forward(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        return weighted_bce(
            logits,
            targets,
            pos_weight=self.pos_weight,
            neg_weight=self.neg_weight,
            mask=mask,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
