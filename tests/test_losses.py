"""Tests for :mod:`mlic_lib.losses` against naive elementwise formulas (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlic_lib.losses import (
    AsymmetricLoss,
    BCEWithLogits,
    WeightedBCE,
    asymmetric_loss,
    bce_with_logits,
    weighted_bce,
)

ATOL = 1e-6


def _data(seed: int = 0, n: int = 16, c: int = 7, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    targets = (torch.rand(n, c, generator=g) < 0.4).to(torch.float64)
    mask = torch.rand(n, c, generator=g) < 0.75
    return logits, targets, mask


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _naive_bce(logits, targets):
    out = torch.empty_like(logits)
    for idx in range(logits.numel()):
        z, y = logits.flatten()[idx].item(), targets.flatten()[idx].item()
        p = _sig(z)
        out.view(-1)[idx] = -(y * math.log(p) + (1 - y) * math.log(1 - p))
    return out


def _naive_asl(logits, targets, gamma_pos, gamma_neg, clip, eps=1e-8):
    out = torch.empty_like(logits)
    for idx in range(logits.numel()):
        z, y = logits.flatten()[idx].item(), targets.flatten()[idx].item()
        p = _sig(z)
        p_m = max(p - (clip or 0.0), 0.0)
        l_pos = (1 - p) ** gamma_pos * math.log(max(p, eps))
        l_neg = p_m**gamma_neg * math.log(max(1 - p_m, eps))
        out.view(-1)[idx] = -(y * l_pos + (1 - y) * l_neg)
    return out


def _naive_wbce(logits, targets, w_pos, w_neg):
    w_pos = torch.broadcast_to(torch.as_tensor(w_pos, dtype=torch.float64), logits.shape)
    w_neg = torch.broadcast_to(torch.as_tensor(w_neg, dtype=torch.float64), logits.shape)
    out = torch.empty_like(logits)
    for idx in range(logits.numel()):
        z, y = logits.flatten()[idx].item(), targets.flatten()[idx].item()
        p = _sig(z)
        wp, wn = w_pos.flatten()[idx].item(), w_neg.flatten()[idx].item()
        out.view(-1)[idx] = -(wp * y * math.log(p) + wn * (1 - y) * math.log(1 - p))
    return out


def _reduce(elementwise, mask, reduction):
    if mask is not None:
        elementwise = elementwise * mask
    if reduction == "none":
        return elementwise
    if reduction == "sum":
        return elementwise.sum()
    return elementwise.sum() / (elementwise.numel() if mask is None else mask.sum())


# --------------------------------------------------------------------------------------------
# BCE
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_bce_matches_naive(reduction, use_mask):
    logits, targets, mask = _data(1)
    mask = mask if use_mask else None
    got = bce_with_logits(logits, targets, mask=mask, reduction=reduction)
    expected = _reduce(_naive_bce(logits, targets), mask, reduction)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    module = BCEWithLogits(reduction=reduction)
    torch.testing.assert_close(module(logits, targets, mask), got)


def test_bce_mask_mean_divides_by_unmasked_count_and_blocks_gradient():
    logits, targets, mask = _data(2)
    logits.requires_grad_(True)
    loss = bce_with_logits(logits, targets, mask=mask)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], targets[mask])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (logits.grad[~mask] == 0).all()
    assert (logits.grad[mask] != 0).all()


def test_bce_accepts_bool_targets():
    logits, targets, _ = _data(3)
    torch.testing.assert_close(bce_with_logits(logits, targets.bool()), bce_with_logits(logits, targets))


# --------------------------------------------------------------------------------------------
# Asymmetric loss
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gamma_pos", "gamma_neg", "clip"),
    [(0.0, 4.0, 0.05), (1.0, 4.0, 0.05), (0.0, 2.0, 0.0), (2.0, 1.5, 0.2), (0.0, 4.0, None), (0.0, 0.0, 0.1)],
)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_asl_matches_naive(gamma_pos, gamma_neg, clip, reduction):
    logits, targets, _ = _data(4)
    got = asymmetric_loss(logits, targets, gamma_pos, gamma_neg, clip, reduction=reduction)
    expected = _reduce(_naive_asl(logits, targets, gamma_pos, gamma_neg, clip), None, reduction)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    module = AsymmetricLoss(gamma_pos, gamma_neg, clip, reduction=reduction)
    torch.testing.assert_close(module(logits, targets), got)


def test_asl_eps_clamp_on_extreme_logits():
    logits = torch.tensor([[-40.0, 40.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    got = asymmetric_loss(logits, targets, 0.0, 0.0, 0.0, reduction="none")
    expected = _naive_asl(logits, targets, 0.0, 0.0, 0.0)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert got[0, 0].item() == pytest.approx(-math.log(1e-8))


def test_asl_default_is_sum_reduction():
    logits, targets, _ = _data(5)
    loss = AsymmetricLoss()(logits, targets)
    elementwise = asymmetric_loss(logits, targets, reduction="none")
    torch.testing.assert_close(loss, elementwise.sum())


def test_asl_without_focusing_and_clip_equals_bce_sum():
    logits, targets, mask = _data(6)
    asl = AsymmetricLoss(gamma_pos=0, gamma_neg=0, clip=0)
    torch.testing.assert_close(asl(logits, targets), bce_with_logits(logits, targets, reduction="sum"))
    torch.testing.assert_close(
        asl(logits, targets, mask), bce_with_logits(logits, targets, mask=mask, reduction="sum")
    )


def test_asl_mask():
    logits, targets, mask = _data(7)
    got = asymmetric_loss(logits, targets, 1.0, 4.0, 0.05, mask=mask, reduction="mean")
    expected = _reduce(_naive_asl(logits, targets, 1.0, 4.0, 0.05), mask, "mean")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_asl_easy_negatives_below_margin_have_no_loss_nor_gradient():
    logits = torch.tensor([[-5.0, -4.0, 2.0]], dtype=torch.float64, requires_grad=True)  # p < 0.05 twice
    targets = torch.zeros(1, 3, dtype=torch.float64)
    loss = asymmetric_loss(logits, targets, clip=0.05, reduction="none")
    loss.sum().backward()
    assert loss[0, :2].abs().max().item() == 0.0
    assert logits.grad[0, :2].abs().max().item() == 0.0
    assert logits.grad[0, 2].item() > 0


def test_asl_gradcheck():
    logits, targets, mask = _data(8, n=3, c=4, scale=1.5)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: asymmetric_loss(z, targets, 1.0, 4.0, 0.05, mask=mask, reduction="mean"), (logits,)
    )


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_asl_fractional_gammas_keep_a_finite_gradient_on_saturated_logits(clip):
    """0 < γ < 1 has an infinite slope at 0: the focusing weights of saturated logits (float32 sigmoid exactly 0
    or 1 from |z| ≈ 17) must still give a finite gradient, equal to the float64 one where float64 resolves it."""
    z64 = torch.tensor([[30.0, -30.0, 120.0, -120.0, 3.0, -3.0]] * 2, dtype=torch.float64)
    targets = torch.tensor([[1.0] * 6, [0.0] * 6], dtype=torch.float64)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        z = z64.to(dtype).requires_grad_(True)
        loss = asymmetric_loss(z, targets.to(dtype), gamma_pos=0.5, gamma_neg=0.5, clip=clip)
        (grads[dtype],) = torch.autograd.grad(loss, z)
        assert torch.isfinite(grads[dtype]).all(), (dtype, grads[dtype])
    resolved = torch.tensor([[True, True, False, False, True, True]] * 2)  # float64: 1 - σ(120) == 0 too
    torch.testing.assert_close(grads[torch.float32].double()[resolved], grads[torch.float64][resolved],
                               rtol=1e-4, atol=1e-10)
    reference = _naive_asl(z64, targets, 0.5, 0.5, clip)
    torch.testing.assert_close(asymmetric_loss(z64, targets, 0.5, 0.5, clip, reduction="none"), reference,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("detach", [False, True])
def test_asl_gradients_finite_and_nonzero(detach):
    logits, targets, _ = _data(8, scale=4.0)
    logits.requires_grad_(True)
    loss = asymmetric_loss(logits, targets, 1.0, 4.0, 0.05, detach_focal_weight=detach)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()
    assert (grad[targets == 1] != 0).all()  # positives always get a gradient (gamma_pos = 1, p < 1)


def test_asl_detached_focal_weight_gradient():
    # With the weight treated as a constant, the gradient of a positive is -(1-p)^γ+ * (1-p).
    logits = torch.tensor([[0.3, -1.2]], dtype=torch.float64, requires_grad=True)
    targets = torch.ones(1, 2, dtype=torch.float64)
    loss = asymmetric_loss(logits, targets, gamma_pos=2.0, detach_focal_weight=True)
    (grad,) = torch.autograd.grad(loss, logits)
    p = torch.sigmoid(logits.detach())
    torch.testing.assert_close(grad, -((1 - p) ** 2) * (1 - p))
    # Same value as with the weight's gradient kept.
    loss_full = asymmetric_loss(logits, targets, gamma_pos=2.0)
    torch.testing.assert_close(loss, loss_full)
    (grad_full,) = torch.autograd.grad(loss_full, logits)
    assert not torch.allclose(grad, grad_full)
    # A negative: loss -p_m^γ- log(1 - p_m), p_m = p - m (p > m); with the weight a constant the gradient is
    # p_m^γ- * dp/dz / (1 - p_m), dp/dz = p (1 - p).
    neg_logits = torch.tensor([[0.3, -1.2]], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    loss = asymmetric_loss(neg_logits, zeros, gamma_neg=4.0, clip=0.05, detach_focal_weight=True)
    (grad,) = torch.autograd.grad(loss, neg_logits)
    p = torch.sigmoid(neg_logits.detach())
    pm = p - 0.05
    torch.testing.assert_close(grad, pm ** 4 * p * (1 - p) / (1 - pm))
    (grad_full,) = torch.autograd.grad(asymmetric_loss(neg_logits, zeros, gamma_neg=4.0, clip=0.05), neg_logits)
    assert not torch.allclose(grad, grad_full)


# --------------------------------------------------------------------------------------------
# Weighted BCE
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_kind", ["scalar", "per_class", "per_entry"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_weighted_bce_matches_naive(weight_kind, reduction, use_mask):
    logits, targets, mask = _data(9)
    mask = mask if use_mask else None
    g = torch.Generator().manual_seed(1)
    shape = {"scalar": (), "per_class": (logits.shape[1],), "per_entry": logits.shape}[weight_kind]
    w_pos = torch.rand(shape, generator=g, dtype=torch.float64) * 3
    w_neg = torch.rand(shape, generator=g, dtype=torch.float64) * 3
    got = weighted_bce(logits, targets, w_pos, w_neg, mask=mask, reduction=reduction)
    expected = _reduce(_naive_wbce(logits, targets, w_pos, w_neg), mask, reduction)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    module = WeightedBCE(w_pos, w_neg, reduction=reduction)
    torch.testing.assert_close(module(logits, targets, mask), got)


def test_weighted_bce_unit_weights_equal_bce():
    logits, targets, mask = _data(10)
    c = logits.shape[1]
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(
            weighted_bce(logits, targets, torch.ones(c), torch.ones(c), mask=mask, reduction=reduction),
            bce_with_logits(logits, targets, mask=mask, reduction=reduction),
        )
    torch.testing.assert_close(weighted_bce(logits, targets), bce_with_logits(logits, targets))
    torch.testing.assert_close(WeightedBCE()(logits, targets), bce_with_logits(logits, targets))


def test_weighted_bce_stable_for_large_logits():
    logits = torch.tensor([[200.0, -200.0]], dtype=torch.float64)
    targets = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    loss = weighted_bce(logits, targets, 2.0, 3.0, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([[600.0, 400.0]], dtype=torch.float64))


def test_weighted_bce_gradcheck():
    logits, targets, mask = _data(11, n=3, c=4, scale=1.5)
    logits.requires_grad_(True)
    w_pos = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    w_neg = torch.tensor([0.5, 1.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: weighted_bce(z, targets, w_pos, w_neg, mask=mask, reduction="sum"), (logits,)
    )
    (grad,) = torch.autograd.grad(weighted_bce(logits, targets, w_pos, w_neg), logits)
    assert torch.isfinite(grad).all() and (grad != 0).all()


def test_weighted_bce_module_buffers_follow_dtype_and_state_dict():
    module = WeightedBCE([1.0, 2.0], [0.5, 0.5])
    assert set(module.state_dict()) == {"pos_weight", "neg_weight"}
    logits = torch.zeros(3, 2, dtype=torch.float64)
    assert module(logits, torch.ones(3, 2)).dtype == torch.float64


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss_fn",
    [bce_with_logits, asymmetric_loss, weighted_bce, BCEWithLogits(), AsymmetricLoss(), WeightedBCE()],
)
def test_shape_mismatch_names_both_shapes(loss_fn):
    with pytest.raises(ValueError, match=r"same shape.*logits \(4, 3\) and targets \(4, 5\)"):
        loss_fn(torch.zeros(4, 3), torch.zeros(4, 5))


@pytest.mark.parametrize("loss_fn", [bce_with_logits, asymmetric_loss, weighted_bce])
def test_unknown_reduction_lists_valid_ones(loss_fn):
    with pytest.raises(ValueError, match="unknown reduction 'avg'; valid values are 'none', 'mean', 'sum'"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg")


@pytest.mark.parametrize("cls", [BCEWithLogits, AsymmetricLoss, WeightedBCE])
def test_module_unknown_reduction(cls):
    with pytest.raises(ValueError, match="unknown reduction"):
        cls(reduction="batchmean")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma_pos": -1.0}, "gamma_pos must be a finite number >= 0"),
        ({"gamma_neg": -0.5}, "gamma_neg must be a finite number >= 0"),
        ({"clip": 1.0}, r"clip .* must be in \[0, 1\)"),
        ({"clip": -0.1}, r"clip .* must be in \[0, 1\)"),
        ({"eps": 0.0}, r"eps .* must be in \(0, 1\)"),
    ],
)
def test_asl_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AsymmetricLoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        asymmetric_loss(torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)


def test_bad_mask_and_weight_shapes():
    logits, targets, _ = _data(12, n=4, c=3)
    with pytest.raises(ValueError, match=r"mask must have the same shape"):
        bce_with_logits(logits, targets, mask=torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pos_weight must be a scalar, a per-class vector of shape \(3,\)"):
        weighted_bce(logits, targets, pos_weight=torch.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        WeightedBCE(pos_weight=[1.0, -1.0, 1.0])


@pytest.mark.parametrize("loss_fn", [bce_with_logits, asymmetric_loss, weighted_bce])
def test_non_tensor_or_integer_logits_name_the_fix(loss_fn):
    with pytest.raises(ValueError, match=r"torch.Tensors; got ndarray and Tensor \(convert with torch.as_tensor\)"):
        loss_fn(np.zeros((2, 3), np.float32), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logits must be a floating-point tensor; got dtype torch.int64"):
        loss_fn(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


@pytest.mark.parametrize("loss_fn", [bce_with_logits, asymmetric_loss, weighted_bce])
@pytest.mark.parametrize("bad, shown", [(-1.0, "-1.0"), (2.0, "2.0"), (float("nan"), "nan")])
def test_targets_outside_0_1_are_an_error_on_a_cpu(loss_fn, bad, shown):
    """{-1, 1} or VOC {1, 0, -1} labels gave a finite, wrong loss (0.69 for BCE) where the metrics refuse them."""
    logits, targets, _ = _data(13, n=4, c=3)
    targets[1, 2] = bad
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, 1\].*got {shown} among 1 bad entries.*"
                                         "voc_targets"):
        loss_fn(logits, targets)
    loss_fn(logits, torch.full((4, 3), 0.3))  # soft labels are fine
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 2] = False
    loss_fn(logits, targets, mask=mask)  # a masked entry may hold a placeholder: it counts for nothing


def test_weighted_bce_refuses_negative_or_non_finite_weights_in_the_function_too():
    logits, targets, _ = _data(14, n=4, c=3)
    with pytest.raises(ValueError, match=r"pos_weight must be finite and >= 0 .*got -1.0"):
        weighted_bce(logits, targets, pos_weight=-torch.ones(3))
    with pytest.raises(ValueError, match=r"neg_weight must be finite and >= 0"):
        weighted_bce(logits, targets, neg_weight=-0.5)
    for bad in (float("inf"), float("nan")):  # an inf weight gave an inf loss; WeightedBCE refused it already
        with pytest.raises(ValueError, match=rf"neg_weight must be finite and >= 0 .*got {bad}"):
            weighted_bce(logits, targets, neg_weight=torch.tensor([1.0, bad, 1.0]))


@pytest.mark.parametrize("loss_fn", [bce_with_logits, asymmetric_loss, weighted_bce])
def test_an_empty_batch_or_a_non_binary_mask_is_an_error_and_an_all_masked_batch_is_zero(loss_fn):
    with pytest.raises(ValueError, match=r"shape \(0, 3\) hold no entry.*empty batch"):
        loss_fn(torch.zeros(0, 3), torch.zeros(0, 3), reduction="mean")
    assert loss_fn(torch.zeros(0, 3), torch.zeros(0, 3), reduction="sum").item() == 0.0
    empty_mask = torch.zeros(0, 3, dtype=torch.bool)  # with a mask nothing counts, as in an all-masked batch: 0
    assert loss_fn(torch.zeros(0, 3), torch.zeros(0, 3), mask=empty_mask, reduction="mean").item() == 0.0
    logits, targets, _ = _data(15, n=4, c=3)
    with pytest.raises(ValueError, match=r"mask must be bool \(or 0/1\).*values such as 2.0"):
        loss_fn(logits, targets, mask=torch.full((4, 3), 2.0))
    ones = loss_fn(logits, targets, mask=torch.ones(4, 3))  # a 0/1 float mask means what the bool one does
    assert torch.equal(ones, loss_fn(logits, targets, mask=torch.ones(4, 3, dtype=torch.bool)))
    none = loss_fn(logits, targets, mask=torch.zeros(4, 3, dtype=torch.bool))
    assert none.item() == 0.0  # nothing counts: 0, not NaN


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_fn", [bce_with_logits, asymmetric_loss, weighted_bce])
def test_masked_entries_cannot_leak_a_non_finite_value(loss_fn, reduction):
    """A masked entry counts for nothing even when its logit or its target placeholder is NaN or inf (a product with
    the mask would give NaN, and a torch.where on the loss alone a NaN gradient): the loss equals the call with those
    entries zeroed, is finite, and the gradient is finite everywhere and exactly 0 there."""
    logits, targets, mask = _data(seed=3)
    dirty = logits.clone()
    dirty[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dirty.dtype).repeat(
        int((~mask).sum()) // 3 + 1)[: int((~mask).sum())]
    clean = torch.where(mask, logits, torch.zeros_like(logits))
    placeholders = torch.where(mask, targets, torch.full_like(targets, float("nan")))  # e.g. VOC's difficult entries
    dirty.requires_grad_(True)
    got = loss_fn(dirty, placeholders, mask=mask, reduction=reduction)
    want = loss_fn(clean, targets, mask=mask, reduction=reduction)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_losses_reduce_in_float32(dtype):
    """A float16 sum of 4096 x 80 entries of ln 2 passes 65504: the reductions sum in float32 (and return it)."""
    logits, targets = torch.zeros(4096, 80, dtype=dtype), torch.zeros(4096, 80, dtype=dtype)
    for fn in (bce_with_logits, lambda z, y, **kw: asymmetric_loss(z, y, 0.0, 0.0, 0.0, **kw), weighted_bce):
        for reduction, expected in (("mean", math.log(2)), ("sum", 4096 * 80 * math.log(2))):
            got = fn(logits, targets, reduction=reduction)
            assert got.dtype == torch.float32 and torch.isfinite(got)
            assert got.item() == pytest.approx(expected, rel=1e-2)


def test_asl_without_clip_keeps_the_negative_log_accurate_in_float32():
    """With ``clip = 0`` (no probability shift) ``log(1 - p)`` is ``logsigmoid(-z)``: in float32 ``1 - sigmoid(z)``
    keeps only a few digits for z around 10-16, so the negative term is checked against float64 BCE."""
    z = torch.linspace(8.0, 16.0, 17, dtype=torch.float32)[None]
    y = torch.zeros_like(z)
    got = asymmetric_loss(z, y, gamma_pos=0.0, gamma_neg=0.0, clip=0.0, reduction="none")
    ref = -torch.nn.functional.logsigmoid(-z.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0.0)
    got = asymmetric_loss(z, y, gamma_pos=0.0, gamma_neg=2.0, clip=None, reduction="none")
    torch.testing.assert_close(got.double(), torch.sigmoid(z.double()) ** 2 * ref, rtol=1e-5, atol=0.0)


def test_asl_gradient_is_finite_where_the_clip_shifts_p_to_exactly_zero():
    """In float32 sigmoid(logit(0.05)) == 0.05, so p_m = p - clip is exactly 0; with 0 < gamma_neg < 1 pow's slope
    there is infinite, and clamp's backward (which keeps x == min) passed the NaN on to the logits."""
    z = torch.logit(torch.tensor([[0.05]])).float()
    assert float(torch.sigmoid(z) - 0.05) == 0.0
    z = torch.cat([z, torch.tensor([[3.0]])], 1).requires_grad_(True)
    loss = asymmetric_loss(z, torch.zeros(1, 2), gamma_neg=0.5, clip=0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), z.grad
    assert z.grad[0, 1] > 0  # the ordinary entry still gets its gradient
    ref = -(torch.sigmoid(torch.tensor(3.0)) - 0.05) ** 0.5 * torch.log(1 - (torch.sigmoid(torch.tensor(3.0)) - 0.05))
    torch.testing.assert_close(loss, ref)  # the p_m == 0 entry adds nothing (its weight and log term are 0)


@pytest.mark.parametrize("use_mask", [False, True])
def test_soft_targets_follow_each_losss_formula_with_y_between_0_and_1(use_mask):
    """Soft labels (Mixup / CutMix targets) enter every loss as the y of its formula, not rounded to 0/1."""
    logits, _, mask = _data(seed=5)
    mask = mask if use_mask else None
    g = torch.Generator().manual_seed(5)
    soft = torch.rand(logits.shape, generator=g, dtype=torch.float64)
    w_pos = torch.rand(logits.shape[1], generator=g, dtype=torch.float64) * 3
    w_neg = torch.rand(logits.shape[1], generator=g, dtype=torch.float64) * 3
    cases = [
        (bce_with_logits(logits, soft, mask=mask, reduction="none"), _naive_bce(logits, soft)),
        (asymmetric_loss(logits, soft, gamma_pos=1.0, gamma_neg=4.0, clip=0.05, mask=mask, reduction="none"),
         _naive_asl(logits, soft, 1.0, 4.0, 0.05)),
        (weighted_bce(logits, soft, w_pos, w_neg, mask=mask, reduction="none"),
         _naive_wbce(logits, soft, w_pos, w_neg)),
    ]
    for got, naive in cases:
        torch.testing.assert_close(got, _reduce(naive, mask, "none"), atol=ATOL, rtol=0)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_asl_a_custom_eps_clamps_both_logarithms(clip):
    """eps is the clamp of both logs, log(max(p, eps)) and log(max(1 - p_m, eps)), not a fixed 1e-8."""
    logits = torch.linspace(-12.0, 12.0, 25, dtype=torch.float64).repeat(2, 1)
    targets = torch.stack([torch.ones(25), torch.zeros(25)]).to(torch.float64)
    got = asymmetric_loss(logits, targets, 1.0, 2.0, clip, eps=1e-3, reduction="none")
    torch.testing.assert_close(got, _naive_asl(logits, targets, 1.0, 2.0, clip, eps=1e-3), atol=ATOL, rtol=0)
    module = AsymmetricLoss(1.0, 2.0, clip, eps=1e-3, reduction="none")
    torch.testing.assert_close(module(logits, targets), got)
