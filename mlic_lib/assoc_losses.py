"""AssocFormer's training loss: ASL (Eq. 8) plus a norm of the association matrix (Eq. 9).

Xing et al., "AssocFormer: Association Transformer for Multi-label Classification", BMVC 2022:

.. math::

    \\mathrm{ASL} = -\\frac{1}{C}\\sum_{k=1}^{C} y_k (1-p_k)^{\\gamma_+}\\log p_k
                   + (1-y_k)\\, p_k^{\\gamma_-}\\log(1-p_k) \\qquad (8)

    \\mathrm{Loss} = \\mathrm{ASL} + \\theta\\, R(A) \\qquad (9)

with ``gamma+ = 0``, ``gamma- = 2`` and ``theta = 0.1``. Eq. 9 writes ``R(A) = ||A||_2``; Sec. 4.3
compares L1, L2, elastic net (L1 + L2) and the nuclear norm. Our reading (stated in the chapter):

* ``'l1'``: ``sum_ij |A_ij|`` (entry-wise L1);
* ``'l2'``: the Frobenius norm ``sqrt(sum_ij A_ij^2)`` (the paper's default; "L2 regularization");
* ``'l1+l2'``: the sum of both (the paper's "elastic net", unit weights);
* ``'nuclear'``: the sum of the singular values;
* ``'spectral'``: the largest singular value, an alternative reading of the ``||A||_2`` symbol of
  Eq. 9 (matrix 2-norm), offered as an option only;
* ``'none'``: no regulariser.

The two singular-value norms go through an SVD, which on CUDA waits for the host (PyTorch's ``svdvals``: it
"synchronizes that device with the CPU"): one host sync per step, the only one the book's training steps make.

``A`` has shape ``(B, C, C)`` (one matrix per image): the norm is taken per image and averaged over
the batch, so that both terms of Eq. 9 are per-image quantities (Eq. 8 is the mean over the C classes
of one image; we average it over the batch too, ``asymmetric_loss(reduction='mean')``). Eq. 8 has
no probability shift, so ``clip = 0`` by default (the ASL authors' code uses 0.05: pass ``clip``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mlic_lib.losses import asymmetric_loss

__all__ = ["REGULARIZERS", "AssocFormerLoss", "association_regularizer"]

REGULARIZERS: tuple[str, ...] = ("none", "l1", "l2", "l1+l2", "nuclear", "spectral")


def _check_norm(norm: str) -> None:
    if norm not in REGULARIZERS:
        raise ValueError(f"unknown association regularizer {norm!r}; choose one of {REGULARIZERS}")


def association_regularizer(A: Tensor, norm: str = "l2") -> Tensor:
    """``R(A)`` of Eq. 9 for a batch of association matrices, averaged over the batch.

    Parameters
    ----------
    A : torch.Tensor
        ``(B, C, C)`` (or a single ``(C, C)``) association matrices.
    norm : one of :data:`REGULARIZERS`.

    Returns
    -------
    torch.Tensor
        A scalar: ``mean_b R(A_b)`` (``0`` for ``'none'``, still attached to the graph).
    """
    _check_norm(norm)
    if not isinstance(A, Tensor):
        raise ValueError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim == 2:
        A = A.unsqueeze(0)
    if A.ndim != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape (B, C, C) or (C, C); got {tuple(A.shape)}")
    A = A.float()
    if norm == "none":
        return A.sum() * 0.0
    if norm == "l1":
        r = A.abs().sum(dim=(-2, -1))
    elif norm == "l2":
        r = torch.linalg.matrix_norm(A, ord="fro")
    elif norm == "l1+l2":
        r = A.abs().sum(dim=(-2, -1)) + torch.linalg.matrix_norm(A, ord="fro")
    elif norm == "nuclear":
        r = torch.linalg.matrix_norm(A, ord="nuc")
    else:  # spectral
        r = torch.linalg.matrix_norm(A, ord=2)
    return r.mean()


class AssocFormerLoss(nn.Module):
    """``ASL(logits, y) + theta * R(A)`` (Eqs. 8-9).

    Parameters
    ----------
    norm : the regulariser ``R`` (:data:`REGULARIZERS`), default ``'l2'`` (Frobenius).
    theta : its weight, default 0.1.
    gamma_pos, gamma_neg : ASL focusing exponents, default 0 and 2 (Sec. 3.6).
    clip : ASL probability margin; 0 (Eq. 8 has none). The ASL code's default is 0.05.
    reduction : ``'mean'`` (Eq. 8: mean over classes, then over the batch) or ``'sum'`` (the ASL
        authors' code: summed over batch and classes; the regulariser is then summed over the batch).

    ``forward(logits, targets, A=None, mask=None)`` returns ``(loss, logs)`` with ``logs`` holding the
    detached ``asl`` and ``reg`` terms. ``A=None`` (a model without the association module) skips ``R``.
    """

    def __init__(self, norm: str = "l2", theta: float = 0.1, gamma_pos: float = 0.0, gamma_neg: float = 2.0,
                 clip: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        _check_norm(norm)
        if not math.isfinite(theta) or theta < 0:
            raise ValueError(f"theta (regulariser weight) must be a finite number >= 0; got {theta!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' (Eq. 8) or 'sum' (ASL code); got {reduction!r}")
        self.norm, self.theta, self.reduction = norm, float(theta), reduction
        self.gamma_pos, self.gamma_neg, self.clip = float(gamma_pos), float(gamma_neg), float(clip)

    def forward(self, logits: Tensor, targets: Tensor, A: Tensor | None = None, mask: Tensor | None = None):
        asl = asymmetric_loss(logits.float(), targets, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg,
                              clip=self.clip, mask=mask, reduction=self.reduction)
        if A is not None and (not isinstance(A, Tensor) or A.shape != (logits.shape[0], *logits.shape[-1:] * 2)):
            b, c = logits.shape[0], logits.shape[-1]
            raise ValueError(f"A must hold one (C, C) association matrix per image, shape (B, C, C) = ({b}, {c}, {c}) "
                             f"for logits {tuple(logits.shape)}; got {tuple(getattr(A, 'shape', ()))} "
                             f"({type(A).__name__}). Pass the model's A of this batch, or A=None for no regulariser")
        if A is None or self.norm == "none" or self.theta == 0:
            reg = asl.new_zeros(())
        else:
            reg = association_regularizer(A, self.norm)
            if self.reduction == "sum":
                reg = reg * A.shape[0]
        loss = asl + self.theta * reg
        return loss, {"asl": asl.detach(), "reg": reg.detach()}

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, theta={self.theta}, gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}"
