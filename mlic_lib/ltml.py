"""LTML: collaborative training on uniform and re-balanced samplings (Guo & Wang, CVPR 2021).

The losses, the training step and the inference of the paper; the network is
:class:`mlic_lib.models.ltml.TwoBranchNet` and the samplers are in :mod:`mlic_lib.data.samplers`.

* Eq. 4, weighted BCE: ``L = -(1/K) sum_k w_k (y log s(u) + (1-y) log(1-s(u)))`` with
  ``w_k = y e^(1-rho_k) + (1-y) e^(rho_k)``, ``rho_k = N_k / N`` (:func:`ltml_class_weights`,
  :func:`weighted_bce_eq4`);
* Eq. 6, logit compensation: positives use ``s(u sigma_p + mu_p)``, negatives ``s(u sigma_n + mu_n)``
  with learnable per-class ``mu``/``sigma`` (:func:`compensated_bce`);
* Eq. 7, logit consistency: ``(1/K) sum_k (u_k - u^_k)^2`` (:func:`logit_consistency`); the probability
  variant of Table 4 / Eq. 8 uses sigmoids (:func:`probability_consistency`);
* Eq. 3, the total: ``L_cls(u, y^u) + L_cls(r, y^r) + lambda (L_con(u, u^) + L_con(r, r^))``, lambda = 0.1
  (:class:`LTMLStep`);
* Sec. 3.5, inference: the average of the two branches' sigmoid outputs, optionally also over the
  horizontally flipped image (the "aug-test" row of Table 2) (:func:`predict_fn`).

Readings where the paper is vague (stated here and in the chapter):

* ``rho_k`` is the class frequency in the *original* training set for both branches (the
  DistributionBalancedLoss statistics ``class_freq / N``);
* each branch has its own compensation parameters (``model.comp_u``, ``model.comp_r``); the paper's Fig. 4
  shows one set per dataset, which one set shared by both branches fits as well (``model.shared_compensation:
  true`` in a profile, :func:`~mlic_lib.models.ltml.build_two_branch`);
* the consistency loss back-propagates into both branches (no stop-gradient); ``detach_cross=True``
  treats the crossed prediction as a fixed target instead;
* the compensation is a training-time device: inference averages the sigmoids of the raw logits;
* both branches always see both streams (Fig. 2's crossed paths, so their batch-norm statistics pool the
  two samplings) even when ``lambda = 0``: the variants of Table 2 / Fig. 6 then differ only in their
  loss terms, not in the batch statistics the branches normalise with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlic_lib.engine import sigmoid_scores
from mlic_lib.losses import _prepare, weighted_bce
from mlic_lib.utils import host_to_device, model_device, pick_device

__all__ = [
    "CONSISTENCY",
    "INFERENCE_ROWS",
    "LTMLStep",
    "compensated_bce",
    "compensation_parameters",
    "evaluate_rows",
    "inference_rows",
    "logit_consistency",
    "ltml_class_weights",
    "predict_fn",
    "probability_consistency",
    "retrain_at_budgets",
    "stream_coverage",
    "train_ltml",
    "two_stream_loader",
    "variant_options",
    "weighted_bce_eq4",
]

CONSISTENCY = ("logit", "probability", "none")
BRANCHES = ("both", "u", "r")
#: the profile's ``model`` keys :func:`train_ltml` reads (passed to :func:`~mlic_lib.models.ltml.build_two_branch`);
#: an override may set any of them (e.g. ``-o model.shared_compensation=true``)
MODEL_KEYS = ("backbone", "pool", "weights", "widths", "classifier_init", "frozen_stages", "norm_eval",
              "shared_compensation")


def check_model_options(m: Any) -> None:
    """Check a profile's ``model`` section for :func:`~mlic_lib.models.ltml.build_two_branch` before anything trains
    (a flag given as text, ``shared_compensation: 'false'``, would otherwise count as true); raises ``ValueError``
    naming the key."""
    from mlic_lib.checks import number
    from mlic_lib.models.backbones import check_pool
    from mlic_lib.models.ltml import CLASSIFIER_INIT, check_two_branch_backbone

    if not isinstance(m, Mapping):
        raise ValueError(f"model must be a mapping of build_two_branch's options {MODEL_KEYS}, got {m!r}")
    if "backbone" in m:
        check_two_branch_backbone(m["backbone"])
    if "pool" in m:
        check_pool(m["pool"])
    if "classifier_init" in m and m["classifier_init"] not in CLASSIFIER_INIT:
        raise ValueError(f"model.classifier_init must be one of {CLASSIFIER_INIT}, got {m['classifier_init']!r}")
    for key in ("norm_eval", "shared_compensation"):
        if key in m and not isinstance(m[key], bool):
            raise ValueError(f"model.{key} takes true or false, got {m[key]!r}")
    f = number(m.get("frozen_stages", 0), whole=True)
    if f is None or f < 0:
        raise ValueError(f"model.frozen_stages must be a whole number >= 0, got {m['frozen_stages']!r}")
    w = m.get("widths")
    if w is not None and (not isinstance(w, (list, tuple)) or not w
                          or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in w)):
        raise ValueError(f"model.widths must be null or a list of whole numbers >= 1, got {w!r}")


def check_options(lt: Any) -> None:
    """Check a profile's ``ltml`` section (``lam``, ``samples_per_class``, ``lambda_sweep``) before anything trains;
    raises ``ValueError`` naming the key."""
    from mlic_lib.checks import number

    if not isinstance(lt, Mapping):
        raise ValueError(f"the ltml section must be a mapping (lam, samples_per_class, ...), got {lt!r}")

    def at_least_0(v: Any) -> bool:
        return (x := number(v)) is not None and x >= 0

    if "lam" in lt and not at_least_0(lt["lam"]):
        raise ValueError(f"ltml.lam must be a number >= 0 (lambda of Eq. 3), got {lt['lam']!r}")
    spc = number(lt.get("samples_per_class", 1), whole=True)
    if spc is None or spc < 1:
        raise ValueError(f"ltml.samples_per_class must be a whole number >= 1, got {lt['samples_per_class']!r}")
    sweep = lt.get("lambda_sweep")  # the chapter's Fig. 6 cell iterates it and takes the best of its values
    if not isinstance(sweep, (list, tuple)) or not sweep or not all(at_least_0(v) for v in sweep):
        raise ValueError(f"ltml.lambda_sweep must be a non-empty list of numbers >= 0 (the chapter's lambda sweep, "
                         f"e.g. -o ltml.lambda_sweep=[0.1]), got {sweep!r}")
    steps = lt.get("epoch_length")  # TwoStreamLoader's steps: null (N // batch), 'db' or a whole number >= 1
    if steps is not None and steps != "db" and ((x := number(steps, whole=True)) is None or x < 1):
        raise ValueError(f"ltml.epoch_length must be null (N // batch_size steps), 'db' (DistributionBalancedLoss's "
                         f"class-aware epoch) or a whole number of steps >= 1, got {steps!r}")


def ltml_class_weights(class_counts, n_images: int) -> tuple[Tensor, Tensor]:
    """Eq. 4's weights: ``(e^(1 - rho), e^rho)`` for positives and negatives, ``rho_k = N_k / N``."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float32)
    if counts.ndim != 1:
        raise ValueError(f"class_counts must be a (K,) vector of positives per class, got shape {tuple(counts.shape)}")
    if n_images < 1 or (counts < 0).any() or (counts > n_images).any():
        raise ValueError(f"class counts must lie in [0, n_images={n_images}]; pass the training-set counts and size")
    rho = counts / n_images
    return torch.exp(1.0 - rho), torch.exp(rho)


def weighted_bce_eq4(logits: Tensor, targets: Tensor, pos_weight: Tensor, neg_weight: Tensor) -> Tensor:
    """Eq. 4 averaged over the batch: ``mean_i -(1/K) sum_k w_k (y log s(u) + (1-y) log(1-s(u)))``."""
    return weighted_bce(logits, targets, pos_weight, neg_weight, reduction="mean")


def compensated_bce(logits: Tensor, targets: Tensor, pos_weight: Tensor, neg_weight: Tensor,
                    mu_pos: Tensor, sigma_pos: Tensor, mu_neg: Tensor, sigma_neg: Tensor) -> Tensor:
    """Eq. 6 averaged over the batch:
    ``-(1/K) sum_k w_k (y log s(u sigma_p + mu_p) + (1-y) log(1 - s(u sigma_n + mu_n)))``.
    With ``mu = 0`` and ``sigma = 1`` it equals :func:`weighted_bce_eq4`."""
    _, y, _ = _prepare(logits, targets, None, "mean")  # as weighted_bce_eq4: shapes, targets in [0, 1]
    k = logits.shape[-1]
    for name, p in (("pos_weight", pos_weight), ("neg_weight", neg_weight), ("mu_pos", mu_pos),
                    ("sigma_pos", sigma_pos), ("mu_neg", mu_neg), ("sigma_neg", sigma_neg)):
        if tuple(p.shape) != (k,):
            raise ValueError(f"{name} must have shape ({k},) (one value per class), got {tuple(p.shape)}: pass "
                             "ltml_class_weights of the training set's class counts and one compensation per class")
    pos = F.logsigmoid(logits * sigma_pos + mu_pos)
    neg = F.logsigmoid(-(logits * sigma_neg + mu_neg))
    return -(pos_weight * y * pos + neg_weight * (1 - y) * neg).mean()


def logit_consistency(a: Tensor, b: Tensor) -> Tensor:
    """Eq. 7 averaged over the batch: ``mean_i (1/K) sum_k (a_ik - b_ik)^2``."""
    if a.shape != b.shape:
        raise ValueError(f"the two branches' logits must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return (a - b).pow(2).mean()


def probability_consistency(a: Tensor, b: Tensor) -> Tensor:
    """The probability variant of Table 4 (gradient of Eq. 8): ``mean (s(a) - s(b))^2``."""
    if a.shape != b.shape:
        raise ValueError(f"the two branches' logits must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return (torch.sigmoid(a) - torch.sigmoid(b)).pow(2).mean()


class LTMLStep:
    """The training step of Eq. 3 for ``engine.fit``; batches are ``(x_u, y_u, x_r, y_r)``.

    Parameters
    ----------
    pos_weight, neg_weight : Eq. 4 weights ``(K,)`` (:func:`ltml_class_weights`); ``None`` = unweighted BCE.
    lam : lambda of Eq. 3 (paper: 0.1).
    consistency : ``"logit"`` (Eq. 7, the paper), ``"probability"`` (Table 4) or ``"none"``.
    compensation : use Eq. 6 (learnable ``mu``/``sigma``) instead of Eq. 4; ``None`` (default) = on for
        ``branches="both"``, off for one branch (the paper's baselines train with Eq. 4, Sec. 4.2).
    branches : ``"both"`` (the method); ``"u"`` or ``"r"`` trains one branch only (the paper's
        baseline-uniform / baseline-re-balanced, Table 1).
    detach_cross : stop the gradient through the crossed prediction (``u^``, ``r^``) of the consistency.

    The branches always run the crossed forward (Eq. 2), also when the consistency term is off, so that
    every variant normalises with the same batch statistics. ``find_unused_parameters`` tells the engine's
    DDP wrapper that some parameters get no gradient (the compensation without Eq. 6, the other branch
    of a single-branch baseline). One combination cannot run under DDP: a single branch *with* the
    compensation (its ``mu``/``sigma`` live outside the forward pass, which ``find_unused_parameters`` would
    mark ready twice); the step refuses it with a clear error.
    """

    def __init__(self, pos_weight: Tensor | None = None, neg_weight: Tensor | None = None, lam: float = 0.1,
                 consistency: str = "logit", compensation: bool | None = None, branches: str = "both",
                 detach_cross: bool = False):
        if consistency not in CONSISTENCY:
            raise ValueError(f"consistency must be one of {CONSISTENCY}, got {consistency!r}")
        if branches not in BRANCHES:
            raise ValueError(f"branches must be one of {BRANCHES}, got {branches!r}")
        if lam < 0:
            raise ValueError(f"lam (lambda of Eq. 3) must be >= 0, got {lam}")
        self.pos_weight, self.neg_weight = pos_weight, neg_weight
        self._moved: tuple | None = None  # (device, w+, w-) once the first step has run (see _weights)
        self.lam = float(lam)
        self.consistency = consistency if lam > 0 and branches == "both" else "none"
        self.compensation = (branches == "both") if compensation is None else bool(compensation)
        self.branches = branches
        self.detach_cross = detach_cross
        self.find_unused_parameters = not self.compensation or branches != "both"

    def _weights(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(w+, w-)`` on the logits' device, moved there once (a copy per step would be a host sync per step)."""
        if self._moved is None or self._moved[0] != logits.device:
            ones = logits.new_ones(logits.shape[-1])
            self._moved = (logits.device, *(ones if w is None else host_to_device(w, logits.device)
                                             for w in (self.pos_weight, self.neg_weight)))
        return self._moved[1], self._moved[2]

    def classification(self, logits: Tensor, targets: Tensor, comp: nn.Module) -> Tensor:
        pw, nw = self._weights(logits)
        if self.compensation:
            return compensated_bce(logits, targets, pw, nw, comp.mu_pos, comp.sigma_pos, comp.mu_neg, comp.sigma_neg)
        return weighted_bce_eq4(logits, targets, pw, nw)

    def __call__(self, model: nn.Module, batch, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        if len(batch) != 4:
            raise ValueError("LTMLStep expects batches (x_u, y_u, x_r, y_r): train with a TwoStreamLoader")
        x_u, y_u, x_r, y_r = batch
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        net = model.module if ddp else model
        if ddp and self.compensation and self.branches != "both":
            raise RuntimeError("a single-branch LTMLStep with compensation=True cannot train under DDP (the Eq. 6 "
                               "parameters are outside the forward pass); use compensation=False (the paper's "
                               "baselines, Eq. 4) or one process")
        if self.branches != "both":
            x, y, comp = (x_u, y_u, net.comp_u) if self.branches == "u" else (x_r, y_r, net.comp_r)
            loss = self.classification(model(x, branch=self.branches).float(), y, comp)
            return loss, {f"cls_{self.branches}": loss.detach()}
        use_cross = self.consistency != "none"
        out = model(x_u, x_r)  # TwoBranchNet.forward_pair (Eqs. 1-2), through any DDP wrapper
        out = {k: v.float() for k, v in out.items()}
        cls_u = self.classification(out["u"], y_u, net.comp_u)
        cls_r = self.classification(out["r"], y_r, net.comp_r)
        loss = cls_u + cls_r
        logs = {"cls_u": cls_u.detach(), "cls_r": cls_r.detach()}
        if use_cross:
            con = logit_consistency if self.consistency == "logit" else probability_consistency
            u_hat, r_hat = out["u_hat"], out["r_hat"]
            if self.detach_cross:
                u_hat, r_hat = u_hat.detach(), r_hat.detach()
            l_con = con(out["u"], u_hat) + con(out["r"], r_hat)
            loss = loss + self.lam * l_con
            logs["con"] = l_con.detach()
        return loss, logs


def predict_fn(branch: str = "both", flip: bool = False) -> Callable[[nn.Module, Tensor], Tensor]:
    """Scores for ``engine.evaluate``: ``"both"`` averages the two branches' sigmoids (Sec. 3.5), ``"u"`` /
    ``"r"`` use one branch; ``flip`` also averages over the horizontally flipped image (aug-test)."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")

    def _scores(model: nn.Module, x: Tensor) -> Tensor:
        u, r = model(x)
        pu, pr = sigmoid_scores(u), sigmoid_scores(r)
        return {"both": 0.5 * (pu + pr), "u": pu, "r": pr}[branch]

    def fn(model: nn.Module, x: Tensor) -> Tensor:
        s = _scores(model, x)
        return 0.5 * (s + _scores(model, torch.flip(x, dims=[-1]))) if flip else s

    return fn


def compensation_parameters(model: nn.Module, branch: str = "u") -> dict[str, np.ndarray]:
    """The learned ``mu_pos, sigma_pos, mu_neg, sigma_neg`` (Fig. 4) of one branch as NumPy arrays."""
    if branch not in ("u", "r"):
        raise ValueError(f"branch must be 'u' or 'r', got {branch!r}")
    comp = model.comp_u if branch == "u" else model.comp_r
    return {k: np.asarray(v) for k, v in comp.as_dict().items()}


# ------------------------------------------------------------------------------ experiment glue
VARIANTS: dict[str, dict] = {
    # name: training options (Table 2 rows that need their own training; the others differ at inference)
    "ensemble": {"lam": 0.0, "consistency": "none", "compensation": False},
    "consistency": {"lam": 0.1, "consistency": "logit", "compensation": False},
    "full": {"lam": 0.1, "consistency": "logit", "compensation": True},
    "prob_consistency": {"lam": 0.1, "consistency": "probability", "compensation": True},
    # the paper's single-branch baselines (Table 1, Sec. 4.2): one branch, Eq. 4 loss; evaluate the row of its branch
    "baseline_u": {"lam": 0.0, "consistency": "none", "compensation": False, "branches": "u"},
    "baseline_r": {"lam": 0.0, "consistency": "none", "compensation": False, "branches": "r"},
}


def variant_options(settings, name: str = "full", lam: float | None = None, consistency: str | None = None,
                    compensation: bool | None = None) -> dict:
    """The :class:`LTMLStep` options ``{lam, consistency, compensation[, branches]}`` of a variant: :data:`VARIANTS`
    ``[name]``, with the profile's ``ltml.lam`` as lambda where the variant's is positive (``ensemble``
    keeps 0), then the explicit arguments that are not ``None``."""
    if name not in VARIANTS and None in (lam, consistency, compensation):
        raise ValueError(f"unknown variant {name!r}: choose one of {sorted(VARIANTS)} or give lam, "
                         "consistency and compensation explicitly")
    opts = dict(VARIANTS.get(name, {}))
    profile_lam = settings.get("ltml", {}).get("lam")
    if opts.get("lam", 0) > 0 and profile_lam is not None:
        opts["lam"] = float(profile_lam)
    opts.update({k: v for k, v in (("lam", lam), ("consistency", consistency), ("compensation", compensation))
                 if v is not None})
    return opts


def two_stream_loader(settings, train_ds, train_targets, seed: int = 0):
    """The :class:`~mlic_lib.data.samplers.TwoStreamLoader` :func:`train_ltml` trains with: the profile's
    ``train.batch_size`` / ``num_workers``, ``ltml.samples_per_class`` and ``ltml.epoch_length``; epoch ``e`` of a
    run with ``seed`` draws the index sequences ``two_stream_loader(...).epoch_indices(e)``."""
    from mlic_lib.data.samplers import TwoStreamLoader
    from mlic_lib.engine import TrainConfig

    lt, cfg = settings.get("ltml", {}), TrainConfig.from_dict(settings["train"])
    return TwoStreamLoader(train_ds, np.asarray(train_targets), cfg.batch_size, seed=seed,
                           samples_per_class=int(lt.get("samples_per_class", 1)), num_workers=cfg.num_workers,
                           steps=lt.get("epoch_length"), pin_memory=pick_device(cfg.device).type == "cuda")


def train_ltml(settings, train_ds, train_targets, test_ds, num_classes: int, seed: int = 0, name: str = "full",
               lam: float | None = None, consistency: str | None = None, compensation: bool | None = None,
               progress: bool = False):
    """Train (or load from the cache) the two-branch net with one LTML variant on in-memory data.

    The step's options come from :func:`variant_options` (``name`` in :data:`VARIANTS`, the profile's ``ltml.lam``, and
    ``lam`` / ``consistency`` / ``compensation`` when given). The profile's ``model`` section goes to
    :func:`~mlic_lib.models.ltml.build_two_branch`, ``train`` to ``TrainConfig`` and ``ltml.samples_per_class`` to
    the class-aware sampler, ``ltml.epoch_length`` (``null`` = ``N // batch`` steps, ``"db"`` =
    DistributionBalancedLoss's class-aware epoch) to the :class:`~mlic_lib.data.samplers.TwoStreamLoader`. No
    evaluation runs during training (``val_data=None``); evaluate the returned model with :func:`evaluate_rows`.
    """
    from mlic_lib.data.fingerprint import data_fingerprint
    from mlic_lib.data.stats import class_counts
    from mlic_lib.engine import TrainConfig, fit, run_dir_for
    from mlic_lib.models.ltml import build_two_branch
    from mlic_lib.utils import seed_everything

    opts = variant_options(settings, name, lam=lam, consistency=consistency, compensation=compensation)
    lt = settings.get("ltml", {})
    cfg = TrainConfig.from_dict({**settings["train"], "seed": seed})
    m = settings["model"]
    targets = np.asarray(train_targets)
    seed_everything(seed)
    model = build_two_branch(m["backbone"], num_classes, pool=m.get("pool", "avg"), weights=m.get("weights"),
                             widths=tuple(m["widths"]) if m.get("widths") else None,
                             classifier_init=m.get("classifier_init", "copy"),
                             frozen_stages=int(m.get("frozen_stages", 0)), norm_eval=bool(m.get("norm_eval", False)),
                             shared_compensation=bool(m.get("shared_compensation", False)))
    pw, nw = ltml_class_weights(class_counts(targets), len(targets))
    step = LTMLStep(pw, nw, **opts)
    loader = two_stream_loader(settings, train_ds, targets, seed=seed)
    data_key = {k: v for k, v in settings["data"].items() if k not in EVAL_ONLY_DATA}  # trained without test data
    key = {"chapter": settings.get("chapter"), "data": data_key, "model": m, "train": cfg.key_dict(),
           "ltml": {**opts, "samples_per_class": lt.get("samples_per_class", 1), "epoch_length": loader.steps},
           "train_data": data_fingerprint(train_ds, targets)}  # other images or labels never load this run
    run_dir = run_dir_for(f"{settings.get('chapter')}-{name}-lam{opts['lam']}-s{seed}", key, code=(__name__,))
    return fit(model, loader, None, cfg, step=step, run_dir=run_dir, progress=progress,
               steps_per_epoch=len(loader))


#: ``data`` settings that only concern the test set (its size, the head/tail thresholds, VOC-LT's difficult test
#: labels): a run trains without test data, so they stay out of its cache key (changing them retrained every run).
EVAL_ONLY_DATA = ("n_test", "head_min", "tail_max", "difficult_eval")


#: Rows of Table 2 obtained from one trained model by changing only the inference.
INFERENCE_ROWS = {"uniform branch": ("u", False), "re-balanced branch": ("r", False),
                  "branch ensemble": ("both", False), "aug-test": ("both", True)}


def _all_scores(model: nn.Module, x: Tensor) -> Tensor:
    """``[s(u), s(r), s(u_flip), s(r_flip)]`` concatenated along the class axis (one pass for every row)."""
    u, r = model(x)
    uf, rf = model(torch.flip(x, dims=[-1]))
    return sigmoid_scores(torch.cat([u, r, uf, rf], dim=1))


def inference_rows(variant: str) -> list[str]:
    """The rows of :data:`INFERENCE_ROWS` a trained :data:`VARIANTS` entry is evaluated on: every row for a
    two-branch model, only its own branch's row for a single-branch baseline (``baseline_u`` / ``baseline_r``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    branch = VARIANTS[variant].get("branches", "both")
    return list(INFERENCE_ROWS) if branch == "both" else [r for r, (b, aug) in INFERENCE_ROWS.items()
                                                           if b == branch and not aug]


def evaluate_rows(model: nn.Module, test_ds, groups, rows=tuple(INFERENCE_ROWS), batch_size: int = 256
                  ) -> dict[str, dict]:
    """Metrics (``multilabel_report``) of ``model`` on ``test_ds`` for each inference row of
    :data:`INFERENCE_ROWS`, from one pass over the test set (original + flipped images).

    Row ``"branch ensemble"`` is Sec. 3.5's average; ``"aug-test"`` also averages the flipped image."""
    from mlic_lib.engine import make_loader, predict
    from mlic_lib.metrics import multilabel_report

    bad = [r for r in rows if r not in INFERENCE_ROWS]
    if bad:
        raise ValueError(f"unknown inference row(s) {bad}; choose from {list(INFERENCE_ROWS)}")
    device = model_device(model)
    scores, targets, mask = predict(model, make_loader(test_ds, batch_size, shuffle=False), device, _all_scores)
    pu, pr, puf, prf = np.split(scores, 4, axis=1)
    table = {("u", False): pu, ("r", False): pr, ("both", False): 0.5 * (pu + pr),
             ("both", True): 0.25 * (pu + pr + puf + prf)}
    return {row: multilabel_report(table[INFERENCE_ROWS[row]], targets, mask=mask, groups=groups) for row in rows}


def stream_coverage(loader, epochs: int, marked) -> dict[str, dict[str, float]]:
    """What each stream of a :class:`~mlic_lib.data.samplers.TwoStreamLoader` (e.g. :func:`two_stream_loader`)
    draws over its first ``epochs`` epochs, from the index sequences alone (no image is loaded).

    ``marked`` is a boolean mask over the training images (e.g. the images with a tail class) or their indices.
    Per stream (``"uniform"``, ``"re-balanced"``): ``draws per epoch``, ``distinct images per epoch (mean)``,
    ``distinct images over all epochs`` and ``share of draws on a marked image (%)`` (the mean over epochs).
    Class-aware sampling repeats the few images of rare classes: fewer distinct images, more draws on them."""
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    marked = np.asarray(marked)
    n = getattr(getattr(loader, "uniform", None), "n", None)  # the training images (a TwoStreamLoader)
    if marked.dtype == bool:
        if n is not None and marked.shape != (n,):
            raise ValueError(f"marked as a boolean mask must have one entry per training image ({n}), got shape "
                             f"{marked.shape}")
        marked_idx = np.flatnonzero(marked)
    else:
        marked_idx = marked.astype(np.int64).ravel()
        if len(np.unique(marked_idx)) != len(marked_idx) or (marked_idx < 0).any() or (
                n is not None and (marked_idx >= n).any()):
            raise ValueError("marked must be a boolean mask over the training images or their distinct indices in "
                             "[0, n); got repeated or out-of-range indices (a 0/1 mask? pass it as marked > 0)")
    seen: dict[str, list[np.ndarray]] = {"uniform": [], "re-balanced": []}
    for e in range(int(epochs)):
        for stream, idx in zip(seen, loader.epoch_indices(e), strict=True):
            seen[stream].append(np.asarray(idx))
    return {stream: {"draws per epoch": float(len(idx[0])),
                     "distinct images per epoch (mean)": float(np.mean([len(np.unique(i)) for i in idx])),
                     "distinct images over all epochs": float(len(np.unique(np.concatenate(idx)))),
                     "share of draws on a marked image (%)": float(100 * np.mean([np.isin(i, marked_idx).mean()
                                                                                 for i in idx]))}
            for stream, idx in seen.items()}


def positive_draws(loader, epochs: int, targets) -> dict[str, np.ndarray]:
    """How often each class is drawn as a positive by each stream of a two-stream loader over its first ``epochs``
    epochs: ``{"uniform": (C,), "re-balanced": (C,)}`` counts, from the index sequences alone (no image loaded).

    Eq. 6's gradient moves a branch's positive compensation mean at every positive label the branch sees, always
    the same way, so how far ``mu_pos`` gets grows with these counts (Fig. 4's reading needs them): the uniform
    stream draws a class about in proportion to its frequency; the re-balanced one evens the draws out only in part
    (an image drawn for a rare class brings its frequent companions along)."""
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    y = np.asarray(targets) > 0.5
    out = {"uniform": np.zeros(y.shape[1], dtype=np.int64), "re-balanced": np.zeros(y.shape[1], dtype=np.int64)}
    for e in range(int(epochs)):
        for stream, idx in zip(out, loader.epoch_indices(e), strict=True):
            out[stream] += y[np.asarray(idx)].sum(0)
    return out


def retrain_at_budgets(settings, train_ds, train_targets, test_ds, num_classes: int, groups, epochs, seeds,
                       variants=("baseline_u", "baseline_r"), metrics=("mAP", "mAP_head", "mAP_medium", "mAP_tail"),
                       progress: bool = False) -> tuple[dict[int, dict[str, np.ndarray]], float]:
    """Train (or load from the cache) single-branch ``variants`` with other numbers of epochs, for the check
    whether a gap between them is a matter of training budget.

    For each budget in ``epochs`` the profile's ``train.epochs`` is replaced by it and each variant is trained
    with :func:`train_ltml` for every seed, then evaluated on its own branch's row (:func:`inference_rows`,
    :func:`evaluate_rows`). Returns ``({budget: {variant: array seeds x metrics (in %)}}, training seconds)``;
    the seconds are those of the runs trained now (a cached run adds its recorded time)."""
    budgets = [int(e) for e in epochs]
    if any(e < 1 for e in budgets):
        raise ValueError(f"every budget must be >= 1 epoch, got {list(epochs)}")
    if not len(seeds):
        raise ValueError("seeds is empty: give at least one seed")
    for v in variants:
        if len(inference_rows(v)) != 1:
            raise ValueError(f"variant {v!r} has two branches; retrain_at_budgets compares single-branch baselines "
                             "(baseline_u, baseline_r)")
    out: dict[int, dict[str, np.ndarray]] = {}
    seconds = 0.0
    for ep in budgets:
        s_ep = {**settings, "train": {**settings["train"], "epochs": ep}}
        out[ep] = {}
        for v in variants:
            (row,) = inference_rows(v)
            res = []
            for s in seeds:
                run = train_ltml(s_ep, train_ds, train_targets, test_ds, num_classes, seed=s, name=v,
                                 progress=progress)
                seconds += run.seconds
                r = evaluate_rows(run.model, test_ds, groups, rows=[row])[row]
                res.append([100 * r[k] for k in metrics])
            out[ep][v] = np.array(res)
    return out, seconds
