"""The two-branch network of LTML (Guo & Wang, CVPR 2021, Sec. 3.1, Fig. 2, Eqs. 1-2).

A shared trunk ``phi`` (a ResNet without its last stage) feeds two branches with the same architecture
and separate parameters: Subnet-U (``f1`` = a copy of the last stage, global average pooling, ``f2`` = a
linear classifier) for the uniform sampling and Subnet-R (``g1``, ``g2``) for the re-balanced sampling.

* Eq. 1: ``u_i = f2(f1(phi(x_i^u)))``, ``r_j = g2(g1(phi(x_j^r)))`` (the classification paths);
* Eq. 2: ``u^_i = g2(g1(phi(x_i^u)))``, ``r^_j = f2(f1(phi(x_j^r)))`` (the crossed paths, used only by
  the consistency loss).

:meth:`TwoBranchNet.forward_pair` computes all four with one trunk pass over the concatenated batches and
one pass of each branch; ``forward(x)`` returns both branches' logits for the same input (inference, Sec.
3.5). The learnable logit compensation of Eq. 6 (``mu``/``sigma`` per class for positive and negative
logits) lives in the model as ``comp_u`` / ``comp_r`` so that the optimiser sees it; it is used only by
the loss (:mod:`mlic_lib.ltml`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mlic_lib.models.backbones import TORCHVISION_RESNETS, GlobalPool, build_model

__all__ = ["CLASSIFIER_INIT", "Branch", "LogitCompensation", "TwoBranchNet", "build_two_branch"]

#: How the two branches' linear classifiers start (:func:`build_two_branch`).
CLASSIFIER_INIT = ("copy", "independent")


class LogitCompensation(nn.Module):
    """Per-class learnable ``mu_p, sigma_p, mu_n, sigma_n`` of Eq. 6, initialised to ``mu = 0, sigma = 1``
    (Sec. 4.1): positives use ``u * sigma_p + mu_p``, negatives ``u * sigma_n + mu_n``."""

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.mu_pos = nn.Parameter(torch.zeros(num_classes))
        self.sigma_pos = nn.Parameter(torch.ones(num_classes))
        self.mu_neg = nn.Parameter(torch.zeros(num_classes))
        self.sigma_neg = nn.Parameter(torch.ones(num_classes))

    def forward(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(positive-compensated, negative-compensated)`` logits, each the shape of ``logits``."""
        return logits * self.sigma_pos + self.mu_pos, logits * self.sigma_neg + self.mu_neg

    def as_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).detach().cpu().tolist() for k in ("mu_pos", "sigma_pos", "mu_neg", "sigma_neg")}


class Branch(nn.Module):
    """One subnet: last stage (``f1``/``g1``) -> global pooling -> linear classifier (``f2``/``g2``)."""

    def __init__(self, stage: nn.Module, num_features: int, num_classes: int, pool: str = "avg"):
        super().__init__()
        self.stage = stage
        self.pool = GlobalPool(pool)
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, fmap: Tensor) -> Tensor:
        return self.classifier(self.pool(self.stage(fmap)))


class TwoBranchNet(nn.Module):
    """Shared trunk (``features``, so ``TrainConfig.backbone_lr_mult`` applies to it) + Subnet-U + Subnet-R.

    ``forward(x)`` returns ``(u, r)``: both branches' logits on the same input ``x``;
    ``forward(x, branch="u")`` (or ``"r"``) only that branch's logits (the single-branch baselines);
    ``forward(x_u, x_r)`` is :meth:`forward_pair`. Every training path goes through
    ``forward`` so that a DDP wrapper syncs the gradients.
    """

    def __init__(self, trunk: nn.Module, branch_u: Branch, branch_r: Branch, num_classes: int,
                 frozen: nn.Module | None = None, norm_eval: bool = False, shared_compensation: bool = False):
        super().__init__()
        self.features = trunk
        self.branch_u = branch_u
        self.branch_r = branch_r
        self.comp_u = LogitCompensation(num_classes)
        # shared_compensation: one set of Eq. 6 parameters for both branches (the same module under two names)
        self.comp_r = self.comp_u if shared_compensation else LogitCompensation(num_classes)
        self.num_classes = num_classes
        self._frozen = [frozen] if frozen is not None else []  # a view into the trunk, not a second registration
        self.norm_eval = bool(norm_eval)
        for p in (frozen.parameters() if frozen is not None else ()):
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> TwoBranchNet:
        """As ``nn.Module.train``, but the frozen stages stay in eval mode, and with ``norm_eval`` every batch
        norm does (its running statistics are not updated; its affine weights still train), as in the
        mmdetection ResNet of DistributionBalancedLoss."""
        super().train(mode)
        if mode:
            for part in self._frozen:
                part.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: Tensor, x_r: Tensor | None = None, branch: str | None = None):
        if x_r is not None:
            return self.forward_pair(x, x_r)
        if branch is not None:
            if branch not in ("u", "r"):
                raise ValueError(f"branch must be 'u' or 'r', got {branch!r}")
            return (self.branch_u if branch == "u" else self.branch_r)(self.features(x))
        fmap = self.features(x)
        return self.branch_u(fmap), self.branch_r(fmap)

    def forward_pair(self, x_u: Tensor, x_r: Tensor) -> dict[str, Tensor]:
        """Eqs. 1-2 for a uniform batch ``x_u`` and a re-balanced batch ``x_r``.

        Returns ``u``, ``r``, ``u_hat`` (``x_u`` through Subnet-R) and ``r_hat`` (``x_r`` through
        Subnet-U). The trunk and each branch see both batches in one pass, so their batch-norm statistics
        pool the two samplings, whatever loss terms :class:`~mlic_lib.ltml.LTMLStep` uses.
        """
        if x_u.shape[1:] != x_r.shape[1:]:
            raise ValueError(f"x_u {tuple(x_u.shape)} and x_r {tuple(x_r.shape)} must have the same image shape")
        b = x_u.shape[0]
        fmap = self.features(torch.cat([x_u, x_r]))
        out_f = self.branch_u(fmap)  # [u ; r_hat]
        out_g = self.branch_r(fmap)  # [u_hat ; r]
        return {"u": out_f[:b], "r_hat": out_f[b:], "u_hat": out_g[:b], "r": out_g[b:]}


def check_two_branch_backbone(name: object) -> None:
    """Raise ``ValueError`` unless ``name`` is a backbone :func:`build_two_branch` can split into a shared trunk and
    a last stage: ``small_resnet`` or a torchvision ResNet (the profile's ``model.backbone``)."""
    if name not in ("small_resnet", *TORCHVISION_RESNETS):
        raise ValueError(f"the two-branch model splits a ResNet's stage list into trunk and last stage: backbone "
                         f"must be small_resnet or one of {', '.join(TORCHVISION_RESNETS)}, got {name!r}")


def build_two_branch(backbone: str, num_classes: int, pool: str = "avg", weights=None,
                     widths: tuple[int, ...] | None = None, classifier_init: str = "copy", frozen_stages: int = 0,
                     norm_eval: bool = False, shared_compensation: bool = False) -> TwoBranchNet:
    """Two-branch LTML net on a foundation backbone: trunk = ``features[:-1]``, each branch = an identical
    deep copy of ``features[-1]`` (ResNet ``layer4``; the last BasicBlock of ``small_resnet``) + pooling
    + a copy of the classifier. The paper uses ResNet-50 with global average pooling (``pool="avg"``).

    Only backbones whose ``features`` is an ``nn.Sequential`` of stages can be split (``small_resnet``,
    ``resnet18/34/50/101``); others raise ``ValueError``.

    ``classifier_init``: ``"copy"`` (default) starts both linear classifiers (``f2``, ``g2``) from the same
    draw, like the two copies of the last stage, so the branches are identical at the first step;
    ``"independent"`` re-draws Subnet-R's classifier, one reading of Sec. 3.1's "a linear classifier ...
    is added to each branch" (the paper does not say whether the two start equal).

    ``frozen_stages`` (torchvision ResNets): the stem and the first ``frozen_stages`` stages get no gradient and
    stay in eval mode; ``norm_eval``: every batch norm stays in eval mode. DistributionBalancedLoss, whose
    "configurations" LTML says it follows (Sec. 4.1), trains its ImageNet ResNet-50 with 1 and ``True``.

    ``shared_compensation``: ``False`` (default) gives each branch its own Eq. 6 parameters (``comp_u``,
    ``comp_r``); ``True`` one set for both, the other reading of Sec. 3.3's "upgraded with logit compensation
    in the same way" (Fig. 4 shows one set per dataset).
    """
    if classifier_init not in CLASSIFIER_INIT:
        raise ValueError(f"classifier_init must be one of {CLASSIFIER_INIT}, got {classifier_init!r}")
    check_two_branch_backbone(backbone)
    net = build_model(backbone, num_classes, pool=pool, weights=weights, widths=widths)
    feats = net.features
    trunk = feats[:-1]
    stage = feats[-1]
    frozen = None
    if frozen_stages:
        if backbone not in TORCHVISION_RESNETS or not 0 < frozen_stages < 4:
            raise ValueError(f"frozen_stages must be 0, or 1..3 with a torchvision ResNet (the stem, then layer1, "
                             f"...); got {frozen_stages} with {backbone!r}")
        frozen = trunk[: 4 + frozen_stages]  # conv1, bn1, relu, maxpool, then layer1 ...
    dim = net.num_features
    branch = Branch(stage, dim, num_classes, pool)
    branch.classifier = net.classifier
    branch_u, branch_r = copy.deepcopy(branch), copy.deepcopy(branch)
    if classifier_init == "independent":
        for layer in branch_r.classifier.modules():  # a fresh draw from the global RNG (seeded by the caller)
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    return TwoBranchNet(trunk, branch_u, branch_r, num_classes, frozen=frozen, norm_eval=norm_eval,
                        shared_compensation=shared_compensation)
