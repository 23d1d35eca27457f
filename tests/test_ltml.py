"""LTML chapter: samplers, split files, two-branch net, losses (Eqs. 4, 6, 7), step, inference, profiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlic_lib import ltml
from mlic_lib.data import longtail, stats
from mlic_lib.data.paths import reference_data_dir
from mlic_lib.data.samplers import ClassAwareSampler, TwoStreamLoader, UniformSampler, sampling_probabilities
from mlic_lib.data.tensors import TensorImageDataset
from mlic_lib.models.ltml import LogitCompensation, TwoBranchNet, build_two_branch

SHARED = reference_data_dir()  # $MLIC_REFERENCE_DATA, else <repo>/../shared/data
WIDTHS = (4, 8, 8, 16)


def _longtail_targets(n=600, k=10, seed=0):
    rng = np.random.default_rng(seed)
    p = 0.5 * (np.arange(k) + 1.0) ** -1.5
    t = (rng.random((n, k)) < p).astype(np.float32)
    t[t.sum(1) == 0, 0] = 1
    return t


# ------------------------------------------------------------------------------------- samplers
def test_class_aware_sampler_balances_classes_over_an_epoch():
    t = _longtail_targets()
    counts = t.sum(0)
    assert counts.max() / counts.min() > 20
    s = ClassAwareSampler(t, num_samples=4000, seed=0)
    idx = s.indices(0)
    assert len(idx) == 4000 and idx.min() >= 0 and idx.max() < len(t)
    # each class is visited 1/K of the time, so every class gets >= num_samples / K draws
    assert (t[idx].sum(0) >= 4000 / t.shape[1] - 1).all()
    uni = t[UniformSampler(len(t), 4000, seed=0).indices(0)].sum(0)
    drawn = t[idx].sum(0)
    assert drawn.max() / drawn.min() < uni.max() / uni.min() / 5  # far flatter than uniform sampling


@pytest.mark.parametrize("per_class", [1, 3])  # 3: the full profile's ltml.samples_per_class
def test_class_aware_matches_paper_probabilities(per_class):
    t = _longtail_targets(n=200, k=5, seed=1)
    t = np.concatenate([t, np.zeros((len(t), 1), t.dtype)], 1)  # a class without images: not among the K'
    p = sampling_probabilities(t)
    n_k = t.sum(0)
    present = [k for k in range(t.shape[1]) if n_k[k] > 0]  # Sec. 3.1, written out per image
    ref = np.array([sum(t[i, k] / n_k[k] for k in present) / len(present) for i in range(len(t))])
    np.testing.assert_allclose(p, ref, rtol=1e-6)  # float32 targets
    assert np.isclose(p.sum(), 1.0) and len(present) == t.shape[1] - 1
    idx = ClassAwareSampler(t, num_samples=60000, seed=3, samples_per_class=per_class).indices(0)
    freq = np.bincount(idx, minlength=len(t)) / len(idx)
    assert np.abs(freq - p).max() < 0.004
    assert np.allclose(sampling_probabilities(t, "uniform"), 1 / len(t))


def test_class_aware_sampling_walks_each_class_list_as_a_permutation():
    """Within a class, images are taken in a reshuffled order, each once before any twice (the frequencies of the
    test above would not change if a list were reshuffled one image early)."""
    idx = ClassAwareSampler(np.ones((5, 1)), num_samples=50, seed=0).indices(0)
    assert all(sorted(block.tolist()) == [0, 1, 2, 3, 4] for block in idx.reshape(10, 5))


def test_class_aware_sampling_cycles_the_classes_in_a_fresh_shuffled_order():
    """Each visit cycle takes every class once, in a shuffled order that is reshuffled when the cycle runs out
    (DistributionBalancedLoss's ``RandomCycleIter`` over the classes)."""
    t = np.repeat(np.eye(6, dtype=np.float32), 3, axis=0)  # single-label: the index says the class visited
    visits = t[ClassAwareSampler(t, num_samples=6 * 40, seed=0).indices(0)].argmax(1).reshape(40, 6)
    assert all(sorted(cycle.tolist()) == list(range(6)) for cycle in visits)
    assert len({tuple(cycle) for cycle in visits}) > 20  # reshuffled per cycle, not one order repeated
    firsts = {tuple(t[ClassAwareSampler(t, num_samples=6, seed=s).indices(0)].argmax(1)) for s in range(10)}
    assert len(firsts) > 5  # the first cycle is shuffled too


def test_the_uniform_and_re_balanced_streams_draw_independently():
    """The two samplers of one (seed, epoch) use separate random streams: with one image per class, a shared
    stream would make the class cycle the very permutation the uniform sampler draws."""
    t = np.eye(20, dtype=np.float32)
    for epoch in range(3):
        u = UniformSampler(20, 20, seed=4).indices(epoch)
        r = ClassAwareSampler(t, seed=4).indices(epoch)
        assert sorted(r.tolist()) == list(range(20)) and not np.array_equal(u, r)


def test_samplers_deterministic_and_errors():
    t = _longtail_targets()
    a, b = ClassAwareSampler(t, seed=5), ClassAwareSampler(t, seed=5)
    assert np.array_equal(a.indices(2), b.indices(2)) and not np.array_equal(a.indices(0), a.indices(1))
    u = UniformSampler(10, seed=0).indices(0)
    assert sorted(u.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="no class has a positive"):
        ClassAwareSampler(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="2-D"):
        ClassAwareSampler(np.zeros(4))
    with pytest.raises(ValueError, match="samples_per_class"):
        ClassAwareSampler(t, samples_per_class=0)
    for n in (0, -3):  # 0 used to mean "the default length"
        with pytest.raises(ValueError, match=rf"num_samples must be positive \(indices per epoch\), got {n}"):
            UniformSampler(10, num_samples=n)
        with pytest.raises(ValueError, match=rf"num_samples must be positive \(indices per epoch\), got {n}"):
            ClassAwareSampler(t, num_samples=n)
    assert len(UniformSampler(10)) == 10 and len(ClassAwareSampler(t)) == len(t)  # None: one pass
    assert len(ClassAwareSampler(t, num_samples="db")) == int(t.sum(0).max() * t.shape[1] / 4)
    assert len(ClassAwareSampler(np.array([[1, 0, 0]]), num_samples="db")) == 1  # 1 * 3 / 4 rounds to 0: one at least


def test_two_stream_loader_yields_pairs_and_is_deterministic_per_epoch():
    t = _longtail_targets(n=64, k=4)
    imgs = np.random.default_rng(0).integers(0, 255, (64, 3, 8, 8), dtype=np.uint8)
    ds = TensorImageDataset(imgs, t)
    loader = TwoStreamLoader(ds, t, batch_size=16, seed=1)
    assert len(loader) == 4
    e0 = [b[1].clone() for b in loader]
    e1 = [b[1].clone() for b in loader]
    batch = next(iter(TwoStreamLoader(ds, t, batch_size=16, seed=1)))
    assert len(batch) == 4 and batch[0].shape == (16, 3, 8, 8) and batch[3].shape == (16, 4)
    loader.set_epoch(0)
    assert all(torch.equal(a, b[1]) for a, b in zip(e0, loader, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1, strict=True))
    with pytest.raises(ValueError, match="rows but the dataset"):
        TwoStreamLoader(ds, t[:10], batch_size=4)
    # DistributionBalancedLoss's epoch: max_k N_k * K / 4 class-aware draws per epoch, in whole batches
    db = TwoStreamLoader(ds, t, batch_size=8, seed=1, steps="db")
    assert db.steps == int(t.sum(0).max() * t.shape[1] / 4) // 8 and len(list(db)) == db.steps
    for bad in ("full", 0):
        with pytest.raises(ValueError, match="steps must be"):
            TwoStreamLoader(ds, t, batch_size=8, steps=bad)
    from mlic_lib.data.images import ImageListDataset

    masked = ImageListDataset([f"{i}.jpg" for i in range(64)], t, mask=np.ones_like(t, dtype=bool))
    with pytest.raises(ValueError, match="no label mask.*difficult_train: negative"):
        TwoStreamLoader(masked, t, batch_size=16)


# ------------------------------------------------------------------------------------- losses
def _reference_eq4(u, y, counts, n):
    rho = counts / n
    w = y * np.exp(1 - rho) + (1 - y) * np.exp(rho)
    s = 1 / (1 + np.exp(-u))
    return float(np.mean(-np.mean(w * (y * np.log(s) + (1 - y) * np.log(1 - s)), axis=1)))


def test_weighted_bce_matches_eq4_reference():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(6, 5))
    y = (rng.random((6, 5)) < 0.4).astype(np.float64)
    counts, n = np.array([50, 20, 5, 1, 0]), 60
    pw, nw = ltml.ltml_class_weights(counts, n)
    got = ltml.weighted_bce_eq4(torch.tensor(u, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), pw, nw)
    assert got.item() == pytest.approx(_reference_eq4(u, y, counts, n), rel=1e-5)
    with pytest.raises(ValueError, match="class counts must lie"):
        ltml.ltml_class_weights([5, 70], 60)


def test_compensation_identity_equals_weighted_bce_and_reference_eq6():
    torch.manual_seed(0)
    u, y = torch.randn(8, 6), (torch.rand(8, 6) < 0.3).float()
    pw, nw = ltml.ltml_class_weights(np.array([30, 10, 5, 3, 2, 1]), 40)
    comp = LogitCompensation(6)
    a = ltml.compensated_bce(u, y, pw, nw, comp.mu_pos, comp.sigma_pos, comp.mu_neg, comp.sigma_neg)
    assert a.item() == pytest.approx(ltml.weighted_bce_eq4(u, y, pw, nw).item(), rel=1e-6)
    mp, sp, mn, sn = torch.randn(6), torch.rand(6) + 0.5, torch.randn(6), torch.rand(6) + 0.5
    ref = -(pw * y * torch.log(torch.sigmoid(u * sp + mp))
            + nw * (1 - y) * torch.log(1 - torch.sigmoid(u * sn + mn))).mean()
    assert ltml.compensated_bce(u, y, pw, nw, mp, sp, mn, sn).item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="one value per class"):
        ltml.compensated_bce(u, y, pw, nw, torch.zeros(5), sp, mn, sn)
    for bad in (torch.ones(7), torch.ones(1)):  # weights of another class count; one weight (was broadcast)
        with pytest.raises(ValueError, match=r"pos_weight must have shape \(6,\).*ltml_class_weights"):
            ltml.compensated_bce(u, y, bad, nw, mp, sp, mn, sn)
        with pytest.raises(ValueError, match=r"neg_weight must have shape \(6,\)"):
            ltml.compensated_bce(u, y, pw, bad, mp, sp, mn, sn)
    y_bad = y.clone()
    y_bad[0, 0] = -1.0  # a VOC "difficult" label: Eq. 4 and Eq. 6 refuse it alike
    for loss in (lambda t: ltml.compensated_bce(u, t, pw, nw, mp, sp, mn, sn),
                 lambda t: ltml.weighted_bce_eq4(u, t, pw, nw)):
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
            loss(y_bad)
        with pytest.raises(ValueError, match="same shape"):
            loss(y[:, :5])


def test_gradients_reach_mu_and_sigma():
    comp = LogitCompensation(4)
    u, y = torch.randn(5, 4), (torch.rand(5, 4) < 0.5).float()
    y[0] = 1
    y[1] = 0
    loss = ltml.compensated_bce(u, y, torch.ones(4), torch.ones(4), comp.mu_pos, comp.sigma_pos, comp.mu_neg,
                                comp.sigma_neg)
    loss.backward()
    for p in comp.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_consistency_losses():
    a = torch.randn(4, 3, requires_grad=True)
    assert ltml.logit_consistency(a, a.detach().clone()).item() == 0.0
    assert ltml.probability_consistency(a, a.detach().clone()).item() == 0.0
    b = torch.randn(4, 3)
    assert ltml.logit_consistency(a, b).item() == pytest.approx(F.mse_loss(a, b).item())
    ltml.logit_consistency(a, b).backward()
    assert torch.allclose(a.grad, 2 * (a - b).detach() / a.numel())  # Eq. 9 (per image: 2/K (u - u^))
    big = torch.full((1, 2), 20.0, requires_grad=True)
    ltml.probability_consistency(big, torch.zeros(1, 2)).backward()
    assert big.grad.abs().max() < 1e-6  # Eq. 8: vanishing gradient on confident probabilities
    with pytest.raises(ValueError, match="same shape"):
        ltml.logit_consistency(a, torch.zeros(2, 3))


# ------------------------------------------------------------------------------------- model
def test_two_branch_net_shapes_paths_and_copies():
    torch.manual_seed(0)
    net = build_two_branch("small_resnet", 5, widths=WIDTHS)
    assert isinstance(net, TwoBranchNet)
    assert net.branch_u.stage is not net.branch_r.stage
    for pu, pr in zip(net.branch_u.parameters(), net.branch_r.parameters(), strict=True):
        assert torch.equal(pu, pr)  # identical copies at start (Sec. 3.1)
    net.eval()
    xu, xr = torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out = net.forward_pair(xu, xr)
    assert out["u"].shape == (3, 5) and out["r"].shape == (2, 5) and out["u_hat"].shape == (3, 5)
    fmap = net.features(xu)
    assert torch.allclose(out["u"], net.branch_u(fmap), atol=1e-5)  # Eq. 1
    assert torch.allclose(out["u_hat"], net.branch_r(fmap), atol=1e-5)  # Eq. 2
    assert torch.allclose(out["r_hat"], net.branch_u(net.features(xr)), atol=1e-5)
    u, r = net(xu)
    assert u.shape == r.shape == (3, 5)
    # the copied branches are equal, so the checks above cannot tell them apart: again with branches that differ
    apart = build_two_branch("small_resnet", 5, widths=WIDTHS, classifier_init="independent").eval()
    out, fu, fr = apart.forward_pair(xu, xr), apart.features(xu), apart.features(xr)
    assert not torch.allclose(apart.branch_u(fu), apart.branch_r(fu), atol=1e-3)
    for key, want in (("u", apart.branch_u(fu)), ("u_hat", apart.branch_r(fu)), ("r", apart.branch_r(fr)),
                      ("r_hat", apart.branch_u(fr))):  # Eqs. 1-2: u = f(x_u), u^ = g(x_u), r = g(x_r), r^ = f(x_r)
        assert torch.allclose(out[key], want, atol=1e-5), key
    u, r = apart(xu)
    assert torch.allclose(u, apart.branch_u(fu), atol=1e-5) and torch.allclose(r, apart.branch_r(fu), atol=1e-5)
    with pytest.raises(ValueError, match="splits a ResNet.s stage list"):
        build_two_branch("efficientnet_lite0", 5)


def test_shared_compensation_is_one_set_of_eq6_parameters_trained_by_both_branches():
    torch.manual_seed(0)
    own = build_two_branch("small_resnet", 4, widths=WIDTHS)
    torch.manual_seed(0)
    shared = build_two_branch("small_resnet", 4, widths=WIDTHS, shared_compensation=True)
    assert own.comp_r is not own.comp_u and shared.comp_r is shared.comp_u
    n_own, n_shared = (sum(p.numel() for p in net.parameters()) for net in (own, shared))
    assert n_own - n_shared == 4 * 4  # mu/sigma for positives and negatives, per class, once instead of twice
    g = torch.Generator().manual_seed(1)
    batch = [torch.randn(3, 3, 32, 32, generator=g), (torch.rand(3, 4, generator=g) < 0.5).float(),
             torch.randn(2, 3, 32, 32, generator=g), (torch.rand(2, 4, generator=g) < 0.5).float()]
    pw, nw = ltml.ltml_class_weights([10, 5, 2, 1], 20)
    loss, _ = ltml.LTMLStep(pw, nw, lam=0.1)(shared, batch, torch.device("cpu"))
    o = shared.forward_pair(batch[0], batch[2])
    ref = _eq6_reference(o["u"], batch[1], pw, nw, shared.comp_u) + _eq6_reference(o["r"], batch[3], pw, nw,
                                                                                  shared.comp_u)
    ref = ref + 0.1 * (((o["u"] - o["u_hat"]) ** 2).mean() + ((o["r"] - o["r_hat"]) ** 2).mean())
    assert torch.allclose(loss, ref, atol=1e-6)
    # the shared parameters get the gradient of both branches' Eq. 6 terms
    grad_u = torch.autograd.grad(_eq6_reference(o["u"], batch[1], pw, nw, shared.comp_u), shared.comp_u.mu_pos,
                                 retain_graph=True)[0]
    grad_r = torch.autograd.grad(_eq6_reference(o["r"], batch[3], pw, nw, shared.comp_u), shared.comp_u.mu_pos,
                                 retain_graph=True)[0]
    (got,) = torch.autograd.grad(loss, shared.comp_u.mu_pos)
    torch.testing.assert_close(got, grad_u + grad_r)
    assert grad_u.abs().sum() > 0 and grad_r.abs().sum() > 0


def test_classifier_init_independent_redraws_only_subnet_r_classifier():
    torch.manual_seed(0)
    copied = build_two_branch("small_resnet", 5, widths=WIDTHS)
    torch.manual_seed(0)
    indep = build_two_branch("small_resnet", 5, widths=WIDTHS, classifier_init="independent")
    torch.manual_seed(0)
    again = build_two_branch("small_resnet", 5, widths=WIDTHS, classifier_init="independent")
    for a, b in zip(indep.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded: repeatable
    for (name, pc), pi in zip(copied.named_parameters(), indep.parameters(), strict=True):
        same = torch.equal(pc, pi)
        assert same != name.startswith("branch_r.classifier."), name  # only g2 differs from the copy
    assert not torch.equal(indep.branch_u.classifier.weight, indep.branch_r.classifier.weight)
    with pytest.raises(ValueError, match="classifier_init must be one of"):
        build_two_branch("small_resnet", 5, widths=WIDTHS, classifier_init="random")


def test_inference_averages_branches_and_flip():
    torch.manual_seed(0)
    net = build_two_branch("small_resnet", 4, widths=WIDTHS).eval()
    x = torch.randn(2, 3, 32, 32)
    sig = lambda t: torch.sigmoid(t.double())  # noqa: E731  (the scores are float64 sigmoids: engine.sigmoid_scores)
    with torch.no_grad():
        u, r = net(x)
        uf, rf = net(torch.flip(x, dims=[-1]))
        both = ltml.predict_fn("both")(net, x)
        assert torch.allclose(both, (sig(u) + sig(r)) / 2)
        assert torch.allclose(ltml.predict_fn("u")(net, x), sig(u))
        apart = build_two_branch("small_resnet", 4, widths=WIDTHS, classifier_init="independent").eval()
        u2, r2 = apart(x)  # the copied branches start equal: these are not, so "u" and "r" are told apart
        assert not torch.allclose(u2, r2)
        assert torch.allclose(ltml.predict_fn("r")(apart, x), sig(r2))
        assert torch.allclose(ltml.predict_fn("u")(apart, x), sig(u2))
        flip = ltml.predict_fn("both", flip=True)(net, x)
        ref = (sig(u) + sig(r) + sig(uf) + sig(rf)) / 4
        assert torch.allclose(flip, ref, atol=1e-6)
        u2f, r2f = apart(torch.flip(x, dims=[-1]))  # the averages again with branches that differ
        assert torch.allclose(ltml.predict_fn("both")(apart, x), (sig(u2) + sig(r2)) / 2)
        ref2 = (sig(u2) + sig(r2) + sig(u2f) + sig(r2f)) / 4
        assert torch.allclose(ltml.predict_fn("both", flip=True)(apart, x), ref2, atol=1e-6)
    with pytest.raises(ValueError, match="branch must be"):
        ltml.predict_fn("x")


def test_step_gradients_and_options():
    torch.manual_seed(0)
    net = build_two_branch("small_resnet", 4, widths=WIDTHS)
    batch = [torch.randn(4, 3, 32, 32), (torch.rand(4, 4) < 0.5).float(),
             torch.randn(4, 3, 32, 32), (torch.rand(4, 4) < 0.5).float()]
    pw, nw = ltml.ltml_class_weights([10, 5, 2, 1], 20)
    loss, logs = ltml.LTMLStep(pw, nw, lam=0.1)(net, batch, torch.device("cpu"))
    loss.backward()
    assert {"cls_u", "cls_r", "con"} <= set(logs)
    for name, p in net.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
    step0 = ltml.LTMLStep(pw, nw, lam=0.0, compensation=False)
    loss0, logs0 = step0(net, batch, torch.device("cpu"))
    assert "con" not in logs0 and step0.find_unused_parameters
    # lambda = 0 drops only the loss term: the branches still see both streams (same batch statistics)
    crossed = net.forward_pair(batch[0], batch[2])
    ref = ltml.weighted_bce_eq4(crossed["u"], batch[1], pw, nw) + ltml.weighted_bce_eq4(crossed["r"], batch[3], pw, nw)
    assert torch.allclose(loss0, ref, atol=1e-6)
    loss_u, logs_u = ltml.LTMLStep(pw, nw, branches="u")(net, batch, torch.device("cpu"))
    assert set(logs_u) == {"cls_u"}
    assert torch.allclose(net(batch[0], branch="u"), net(batch[0])[0], atol=1e-5)
    with pytest.raises(ValueError, match="branch must be"):
        net(batch[0], branch="x")
    for kw, msg in (({"consistency": "kl"}, "consistency must be"), ({"lam": -1}, "lam"),
                    ({"branches": "x"}, "branches must be")):
        with pytest.raises(ValueError, match=msg):
            ltml.LTMLStep(**kw)
    with pytest.raises(ValueError, match="TwoStreamLoader"):
        ltml.LTMLStep()(net, batch[:2], torch.device("cpu"))


def _eq6_reference(logits, y, w_pos, w_neg, comp):
    """Eq. 6 written out with explicit logs of sigmoids (no library helper)."""
    sp = torch.sigmoid(logits * comp.sigma_pos + comp.mu_pos)
    sn = torch.sigmoid(logits * comp.sigma_neg + comp.mu_neg)
    per = -(w_pos * y * torch.log(sp) + w_neg * (1 - y) * torch.log(1 - sn))
    return per.mean()  # (1/K) sum over classes, mean over the batch


def _randomise_compensation(net, seed=0):
    """Random mu/sigma, and branch R moved away from branch U: the branches start as identical copies, which
    makes u = u^ and the consistency term (and its gradient) exactly 0, so a test at init would check nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in net.branch_r.parameters():
            prm.add_(0.2 * torch.randn(prm.shape, generator=g))
        for comp in (net.comp_u, net.comp_r):
            for name in ("mu_pos", "mu_neg"):
                getattr(comp, name).copy_(0.5 * torch.randn(getattr(comp, name).shape, generator=g))
            for name in ("sigma_pos", "sigma_neg"):
                getattr(comp, name).copy_(0.5 + torch.rand(getattr(comp, name).shape, generator=g))


def test_step_value_is_eq3_with_eq6_and_eq7_written_out():
    """The whole Eq. 3 loss against a direct sum: each branch's Eq. 6 term uses its own compensation, and the
    consistency pairs u with u^ and r with r^, both weighted by lambda."""
    torch.manual_seed(0)
    # eval: batch statistics are fixed; independent classifiers: a u/r mix-up changes the value
    net = build_two_branch("small_resnet", 4, widths=WIDTHS, classifier_init="independent").eval()
    _randomise_compensation(net)
    g = torch.Generator().manual_seed(1)
    # different batch sizes would hide a u/r mix-up in shapes; equal ones must still give the exact value
    batch = [torch.randn(3, 3, 32, 32, generator=g), (torch.rand(3, 4, generator=g) < 0.5).float(),
             torch.randn(3, 3, 32, 32, generator=g), (torch.rand(3, 4, generator=g) < 0.5).float()]
    pw, nw = ltml.ltml_class_weights([10, 5, 2, 1], 20)
    lam = 0.3
    loss, _ = ltml.LTMLStep(pw, nw, lam=lam)(net, batch, torch.device("cpu"))
    fu, fr = net.features(batch[0]), net.features(batch[2])  # Eqs. 1-2 from the branches, not from forward_pair
    o = {"u": net.branch_u(fu), "u_hat": net.branch_r(fu), "r": net.branch_r(fr), "r_hat": net.branch_u(fr)}
    assert ((o["u"] - o["u_hat"]) ** 2).mean() > 1e-3  # the consistency term is not trivially 0
    ref = (_eq6_reference(o["u"], batch[1], pw, nw, net.comp_u) + _eq6_reference(o["r"], batch[3], pw, nw, net.comp_r)
           + lam * (((o["u"] - o["u_hat"]) ** 2).mean() + ((o["r"] - o["r_hat"]) ** 2).mean()))
    assert torch.allclose(loss, ref, atol=1e-6)
    prob, _ = ltml.LTMLStep(pw, nw, lam=lam, consistency="probability")(net, batch, torch.device("cpu"))
    s = torch.sigmoid
    ref_p = (ref - lam * (((o["u"] - o["u_hat"]) ** 2).mean() + ((o["r"] - o["r_hat"]) ** 2).mean())
             + lam * (((s(o["u"]) - s(o["u_hat"])) ** 2).mean() + ((s(o["r"]) - s(o["r_hat"])) ** 2).mean()))
    assert torch.allclose(prob, ref_p, atol=1e-6)


def test_detach_cross_stops_the_gradient_through_the_crossed_prediction():
    """With ``detach_cross`` the consistency term sends no gradient through u^ = g(f1(x_u)) / r^ = f(g1(x_r))."""
    torch.manual_seed(0)
    net = build_two_branch("small_resnet", 4, widths=WIDTHS)
    _randomise_compensation(net)
    batch = [torch.randn(4, 3, 32, 32), (torch.rand(4, 4) < 0.5).float(),
             torch.randn(4, 3, 32, 32), (torch.rand(4, 4) < 0.5).float()]

    def consistency_grad(detach):
        net.zero_grad()
        step = ltml.LTMLStep(None, None, lam=1.0, compensation=False, detach_cross=detach)
        o = net.forward_pair(batch[0], batch[2])
        u_hat, r_hat = (o["u_hat"].detach(), o["r_hat"].detach()) if detach else (o["u_hat"], o["r_hat"])
        (ltml.logit_consistency(o["u"], u_hat) + ltml.logit_consistency(o["r"], r_hat)).backward()
        ref = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad()
        loss, _ = step(net, batch, torch.device("cpu"))
        loss0, _ = ltml.LTMLStep(None, None, lam=0.0, compensation=False)(net, batch, torch.device("cpu"))
        (loss - loss0).backward()  # the consistency term alone
        got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        return ref, got

    for detach in (False, True):
        ref, got = consistency_grad(detach)
        for n, gref in ref.items():
            assert torch.allclose(got[n], gref, atol=1e-5), n
    ref_free, _ = consistency_grad(False)
    ref_det, _ = consistency_grad(True)
    assert any(not torch.allclose(ref_free[n], ref_det[n]) for n in ref_det)  # the option changes something


def test_single_branch_baselines_train_with_eq4():
    """The paper's baselines (Sec. 4.2) use one branch and Eq. 4: compensation defaults to off for them."""
    torch.manual_seed(0)
    net = build_two_branch("small_resnet", 4, widths=WIDTHS).eval()
    _randomise_compensation(net)
    x, y = torch.randn(3, 3, 32, 32), (torch.rand(3, 4) < 0.5).float()
    pw, nw = ltml.ltml_class_weights([10, 5, 2, 1], 20)
    x2, y2 = torch.randn(3, 3, 32, 32), 1 - y  # the re-balanced stream differs from the uniform one
    batch = [x, y, x2, y2]
    for branch, comp, xb, yb in (("u", net.comp_u, x, y), ("r", net.comp_r, x2, y2)):
        step = ltml.LTMLStep(pw, nw, branches=branch)
        assert not step.compensation and step.find_unused_parameters
        loss, _ = step(net, batch, torch.device("cpu"))
        assert torch.allclose(loss, ltml.weighted_bce_eq4(net(xb, branch=branch), yb, pw, nw), atol=1e-6)
        with_comp, _ = ltml.LTMLStep(pw, nw, branches=branch, compensation=True)(net, batch, torch.device("cpu"))
        assert torch.allclose(with_comp, _eq6_reference(net(xb, branch=branch), yb, pw, nw, comp), atol=1e-6)
    assert ltml.LTMLStep(pw, nw).compensation  # the two-branch method uses Eq. 6
    assert ltml.variant_options({}, "baseline_r")["branches"] == "r"


def test_variant_options_take_lambda_from_the_profile():
    settings = {"ltml": {"lam": 0.2}}
    assert ltml.variant_options(settings, "full")["lam"] == 0.2  # the profile's lambda, not the table's 0.1
    assert ltml.variant_options(settings, "ensemble")["lam"] == 0.0  # lambda = 0 is what defines this variant
    assert ltml.variant_options({}, "consistency") == ltml.VARIANTS["consistency"]
    assert ltml.variant_options(settings, "full", lam=1.0)["lam"] == 1.0
    with pytest.raises(ValueError, match="unknown variant"):
        ltml.variant_options(settings, "nope")


#: Table 2's rows that train a model of their own: (branches trained, consistency, compensation) — the two
#: baselines are Table 1's; aug-test is an inference row.
TABLE2 = {"baseline_u": ("u", "none", False), "baseline_r": ("r", "none", False),
          "ensemble": ("both", "none", False), "consistency": ("both", "logit", False),
          "full": ("both", "logit", True)}


def test_a_runs_key_leaves_out_the_test_set_settings(monkeypatch, tmp_path):
    """A run trains without test data: the test set's size and the head/tail thresholds load the same run, the
    training set's size does not."""
    import mlic_lib.engine
    from mlic_lib.profiles import load_profile

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    dirs = []
    monkeypatch.setattr(mlic_lib.engine, "fit",
                        lambda model, loader, val, cfg, step, run_dir, **kw: dirs.append(run_dir))
    t = _longtail_targets(n=64, k=4)
    ds = TensorImageDataset(np.zeros((64, 3, 16, 16), np.uint8), t)
    for over in ({}, {"data.n_test": 50, "data.head_min": 30, "data.tail_max": 5}, {"data.n_train": 100}):
        ltml.train_ltml(load_profile("ltml", "smoke", over), ds, t, ds, 4)
    assert dirs[0] == dirs[1] != dirs[2]
    settings = load_profile("ltml", "smoke")  # the same settings with other training labels or images: other runs
    other_images = TensorImageDataset(np.ones((64, 3, 16, 16), np.uint8), t)
    for data, labels in ((ds, np.roll(t, 1, axis=0)), (other_images, t), (ds, t)):
        ltml.train_ltml(settings, data, labels, ds, 4)
    assert len({*dirs[3:5], dirs[0]}) == 3 and dirs[5] == dirs[0]


def test_train_ltml_trains_each_table_2_row_with_its_components_the_eq4_weights_and_the_profiles_model(
        monkeypatch, tmp_path):
    """What ``train_ltml`` hands the engine: the step of each Table 2 row (its branches, consistency and
    compensation, lambda from the profile), Eq. 4's class weights of the training labels, and the profile's
    model options (a mutation review found each could be dropped with every other test green)."""
    import mlic_lib.engine
    from mlic_lib.profiles import load_profile

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    seen = {}
    monkeypatch.setattr(mlic_lib.engine, "fit", lambda model, loader, val, cfg, step, **kw: seen.update(
        model=model, step=step, loader=loader))
    t = _longtail_targets(n=64, k=4)
    ds = TensorImageDataset(np.zeros((64, 3, 16, 16), np.uint8), t)
    settings = load_profile("ltml", "smoke", {"ltml.lam": 0.3})
    pw, nw = ltml.ltml_class_weights(stats.class_counts(t), len(t))
    for name, (branches, consistency, compensation) in TABLE2.items():
        ltml.train_ltml(settings, ds, t, ds, 4, name=name)
        step = seen["step"]
        assert (step.branches, step.consistency, step.compensation) == (branches, consistency, compensation), name
        assert step.lam == (0.3 if consistency != "none" else 0.0), name
        torch.testing.assert_close(step.pos_weight, pw)
        torch.testing.assert_close(step.neg_weight, nw)
    assert seen["loader"].batch_size == settings["train"]["batch_size"]
    options = {"model.backbone": "resnet18", "model.frozen_stages": 1, "model.norm_eval": True}
    for shared, init in ((False, "copy"), (True, "independent")):
        s = load_profile("ltml", "smoke", {**options, "model.shared_compensation": shared,
                                           "model.classifier_init": init})
        ltml.train_ltml(s, ds, t, ds, 4)
        net = seen["model"].train()
        assert not any(p.requires_grad for p in net.features[:5].parameters())  # frozen_stages 1: stem + layer1
        assert not any(m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))  # norm_eval
        assert (net.comp_u is net.comp_r) is shared
        same = torch.equal(net.branch_u.classifier.weight, net.branch_r.classifier.weight)
        assert same is (init == "copy")


def test_train_and_evaluate_rows_deterministic(tmp_path):
    from mlic_lib.profiles import load_profile

    settings = load_profile("ltml", "smoke", {"train.epochs": 1, "train.batch_size": 16, "train.device": "cpu"})
    settings["model"]["widths"] = list(WIDTHS)
    t = _longtail_targets(n=64, k=4)
    imgs = np.random.default_rng(0).integers(0, 255, (64, 3, 16, 16), dtype=np.uint8)
    ds = TensorImageDataset(imgs, t)
    groups = {"head": [0], "medium": [1], "tail": [2, 3]}
    runs = [ltml.train_ltml(settings, ds, t, ds, 4, seed=0, name="full") for _ in range(2)]
    assert runs[1].cached
    rows = ltml.evaluate_rows(runs[0].model, ds, groups)
    assert set(rows) == set(ltml.INFERENCE_ROWS) and "mAP_tail" in rows["aug-test"]
    # each row against scores computed by hand from the two branches (and the flipped image)
    from mlic_lib.metrics import multilabel_report
    net = runs[0].model.eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        pu, pr = (torch.sigmoid(v).numpy() for v in net(x))
        puf, prf = (torch.sigmoid(v).numpy() for v in net(torch.flip(x, dims=[-1])))
    by_hand = {"uniform branch": pu, "re-balanced branch": pr, "branch ensemble": (pu + pr) / 2,
               "aug-test": (pu + pr + puf + prf) / 4}
    for row, scores in by_hand.items():
        assert rows[row]["mAP"] == pytest.approx(multilabel_report(scores, t, groups=groups)["mAP"], abs=1e-6), row
    settings["train"]["seed"] = 0
    fresh = ltml.train_ltml({**settings, "chapter": "ltml-fresh"}, ds, t, ds, 4, seed=0, name="full")
    for a, b in zip(runs[0].model.state_dict().values(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # same seed, same weights
    assert ltml.compensation_parameters(runs[0].model)["mu_pos"].shape == (4,)
    with pytest.raises(ValueError, match="unknown variant"):
        ltml.train_ltml(settings, ds, t, ds, 4, name="nope")
    with pytest.raises(ValueError, match="unknown inference row"):
        ltml.evaluate_rows(runs[0].model, ds, groups, rows=["nope"])


# ------------------------------------------------------------------------------------- long-tailed data
@pytest.mark.parametrize(("name", "sizes", "n_images", "n_classes"),
                         [("voc_lt", (6, 6, 8), 1142, 20), ("coco_lt", (22, 33, 25), 1909, 80)])
def test_split_files_parse_into_groups(name, sizes, n_images, n_classes):
    folder = SHARED / name
    if not (folder / "class_split.pkl").is_file():
        pytest.skip(f"{folder} not present")
    split = longtail.read_lt_split(folder)
    assert len(split) == n_images and split.num_classes == n_classes
    assert tuple(len(split.groups[g]) for g in longtail.GROUP_NAMES) == sizes
    # the split files follow head >= 100, tail < 20 training images (the paper writes "more than 100")
    ours = stats.head_medium_tail(split.class_freq, 100, 19)
    assert all(np.array_equal(ours[g], split.groups[g]) for g in longtail.GROUP_NAMES)
    assert np.array_equal(split.class_freq + split.neg_class_freq, np.full(n_classes, n_images))
    assert longtail.check_labels(split, split.gt_labels) == 1.0


def test_split_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="img_id.txt"):
        longtail.read_lt_split(tmp_path)
    with pytest.raises(ValueError, match="dataset must be"):
        longtail.lt_datasets("nus_lt")
    with pytest.raises(FileNotFoundError, match="VOC-LT"):
        longtail.lt_datasets("voc_lt", root=tmp_path)


def test_longtail_scenes_groups():
    from mlic_lib.data.scenes import make_scenes

    spec = longtail.longtail_scene_spec(2.0, canvas=40, scale_range=(0.5, 1.0), max_objects=3)
    scenes = make_scenes(300, spec, seed=1)
    groups = longtail.scene_groups(scenes.targets)
    assert all(len(groups[g]) for g in longtail.GROUP_NAMES)
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(spec.num_classes))
    assert longtail.scaled_thresholds(1142) == (100, 19)
    order = longtail.head_to_tail_order([3, 9, 9, 1])
    assert order.tolist() == [1, 2, 0, 3]
    with pytest.raises(ValueError, match="exponent must be positive"):
        longtail.longtail_scene_spec(0.0)
    with pytest.raises(ValueError, match=r"\['head'\] are empty"):  # a head threshold above every class
        longtail.scene_groups(scenes.targets, head_min=10_000)
    with pytest.raises(ValueError, match=r"\['tail'\] are empty"):  # tail_max=0 is a threshold, not "unset"
        longtail.scene_groups(scenes.targets, tail_max=0)


def test_inference_rows_of_each_variant():
    assert ltml.inference_rows("full") == list(ltml.INFERENCE_ROWS)
    assert ltml.inference_rows("baseline_u") == ["uniform branch"]
    assert ltml.inference_rows("baseline_r") == ["re-balanced branch"]
    with pytest.raises(ValueError, match="unknown variant 'nope'; choose one of"):
        ltml.inference_rows("nope")


def test_stream_coverage_against_the_index_sequences():
    targets = np.zeros((40, 3), dtype=np.float32)
    targets[:, 0] = 1
    targets[:4, 1] = 1
    ds = TensorImageDataset(np.zeros((40, 3, 8, 8), dtype=np.uint8), targets)
    settings = {"train": {"batch_size": 8}, "ltml": {"samples_per_class": 2, "epoch_length": 3}}
    loader = ltml.two_stream_loader(settings, ds, targets, seed=1)
    marked = targets[:, 1] > 0
    cov = ltml.stream_coverage(loader, 2, marked)
    for k, stream in enumerate(("uniform", "re-balanced")):
        idx = [loader.epoch_indices(e)[k] for e in range(2)]
        c = cov[stream]
        assert c["draws per epoch"] == 24
        assert c["distinct images per epoch (mean)"] == pytest.approx(np.mean([len(set(i)) for i in idx]))
        assert c["distinct images over all epochs"] == len(set(np.concatenate(idx)))
        assert c["share of draws on a marked image (%)"] == pytest.approx(100 * np.mean([np.isin(i, [0, 1, 2, 3]).mean()
                                                                                          for i in idx]))
    assert ltml.stream_coverage(loader, 2, np.flatnonzero(marked)) == cov  # a mask or the indices
    share = "share of draws on a marked image (%)"
    assert cov["re-balanced"][share] > cov["uniform"][share]
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        ltml.stream_coverage(loader, 0, marked)
    for bad in (targets[:, 1], marked[:10], [0, 0, 1], [-1], [40]):  # a 0/1 mask was read as the indices {0, 1}
        with pytest.raises(ValueError, match="marked"):
            ltml.stream_coverage(loader, 2, np.asarray(bad))
    draws = ltml.positive_draws(loader, 2, targets)
    for k, stream in enumerate(("uniform", "re-balanced")):  # a label count over the drawn images, written out
        want = [sum(int(targets[i, c]) for e in range(2) for i in loader.epoch_indices(e)[k]) for c in range(3)]
        assert draws[stream].tolist() == want
    assert draws["uniform"][0] == 48 and draws["re-balanced"][1] > draws["uniform"][1]  # class 0 is on every image
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        ltml.positive_draws(loader, 0, targets)


def test_retrain_at_budgets_trains_each_baseline_per_budget_and_seed():
    from mlic_lib.profiles import load_profile

    settings = load_profile("ltml", "smoke", {"train.epochs": 1, "train.batch_size": 16})
    settings["model"]["widths"] = list(WIDTHS)
    t = _longtail_targets(n=48, k=4)
    ds = TensorImageDataset(np.random.default_rng(0).integers(0, 255, (48, 3, 16, 16), dtype=np.uint8), t)
    groups = {"head": [0], "medium": [1], "tail": [2, 3]}
    out, seconds = ltml.retrain_at_budgets(settings, ds, t, ds, 4, groups, [2], seeds=[0, 1],
                                           metrics=("mAP", "mAP_tail"))
    assert set(out) == {2} and set(out[2]) == {"baseline_u", "baseline_r"} and seconds > 0
    assert out[2]["baseline_r"].shape == (2, 2)
    # the same numbers as training that run directly (a cache hit) and evaluating its own branch's row
    s2 = {**settings, "train": {**settings["train"], "epochs": 2}}
    run = ltml.train_ltml(s2, ds, t, ds, 4, seed=1, name="baseline_r")
    assert run.cached and len(run.history) == 2
    r = ltml.evaluate_rows(run.model, ds, groups, rows=["re-balanced branch"])["re-balanced branch"]
    np.testing.assert_allclose(out[2]["baseline_r"][1], [100 * r["mAP"], 100 * r["mAP_tail"]])
    for kwargs, match in [({"epochs": [0]}, "budget must be >= 1"), ({"seeds": []}, "seeds is empty"),
                          ({"variants": ("full",)}, "two branches")]:
        args = {"epochs": [2], "seeds": [0], **kwargs}
        with pytest.raises(ValueError, match=match):
            ltml.retrain_at_budgets(settings, ds, t, ds, 4, groups, args.pop("epochs"), args.pop("seeds"), **args)


def test_two_stream_loader_follows_the_profile():
    targets = np.zeros((40, 3), dtype=np.float32)
    targets[:, 0] = 1
    targets[:4, 1] = 1
    targets[:2, 2] = 1
    ds = TensorImageDataset(np.zeros((40, 3, 8, 8), dtype=np.uint8), targets)
    settings = {"train": {"batch_size": 8}, "ltml": {"samples_per_class": 2, "epoch_length": 3}}
    loader = ltml.two_stream_loader(settings, ds, targets, seed=5)
    assert loader.steps == 3 and loader.batch_size == 8 and loader.rebalanced.samples_per_class == 2
    iu, ir = loader.epoch_indices(0)
    assert len(iu) == len(ir) == 24
    rare = [0, 1, 2, 3]  # the images of classes 1 and 2: 10% of the data, 2 of the 3 classes
    assert np.isin(ir, rare).mean() > 0.4 > np.isin(iu, rare).mean()  # class-aware vs uniform
    iu2, ir2 = ltml.two_stream_loader(settings, ds, targets, seed=5).epoch_indices(0)
    assert np.array_equal(iu, iu2) and np.array_equal(ir, ir2)


def test_frozen_stages_and_norm_eval_follow_the_mmdetection_resnet():
    """DistributionBalancedLoss's ResNet-50: stem + layer1 frozen (no gradient, eval mode), every BN in eval mode."""
    net = build_two_branch("resnet18", 4, frozen_stages=1, norm_eval=True)
    frozen = list(net.features[:5].parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in net.features[5:].parameters())
    net.train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert net.branch_u.classifier.training and net.features[5][0].conv1.training
    before = net.features[5][0].bn1.running_mean.clone()
    x = torch.randn(4, 3, 32, 32)
    loss = sum(o.sum() for o in net(x))
    loss.backward()
    torch.testing.assert_close(net.features[5][0].bn1.running_mean, before)  # statistics not updated
    assert net.features[0].weight.grad is None and net.features[5][0].conv1.weight.grad is not None
    assert net.features[5][0].bn1.weight.grad is not None  # the BN's affine weights still train
    plain = build_two_branch("resnet18", 4)
    plain.train()
    assert all(m.training for m in plain.modules()) and all(p.requires_grad for p in plain.parameters())
    with pytest.raises(ValueError, match="frozen_stages"):
        build_two_branch("small_resnet", 4, widths=WIDTHS, frozen_stages=1)


def test_probability_consistency_gradient_reaches_both_branches():
    """mean (s(a) - s(b))^2: d/db = -2 (s(a) - s(b)) s(b) (1 - s(b)) / n, the mirror of d/da."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=g, requires_grad=True)
    b = torch.randn(4, 3, generator=g, requires_grad=True)
    ltml.probability_consistency(a, b).backward()
    sa, sb = torch.sigmoid(a.detach()), torch.sigmoid(b.detach())
    torch.testing.assert_close(a.grad, 2 * (sa - sb) * sa * (1 - sa) / a.numel())
    torch.testing.assert_close(b.grad, -2 * (sa - sb) * sb * (1 - sb) / b.numel())


def test_a_single_branch_with_compensation_declares_its_unused_parameters():
    """The other branch gets no gradient: DDP must be told (the engine reads find_unused_parameters)."""
    assert ltml.LTMLStep(branches="u", compensation=True).find_unused_parameters is True


# ------------------------------------------------------------------------------------- mutation follow-ups
def test_uniform_sampler_cycles_fresh_permutations_for_a_longer_epoch():
    """``num_samples`` beyond ``n``: whole permutations back to back, then the start of one more (rounding the
    length down to whole permutations lost the last, partial one)."""
    idx = UniformSampler(10, 25, seed=2).indices(0)
    assert len(idx) == 25
    assert sorted(idx[:10].tolist()) == sorted(idx[10:20].tolist()) == list(range(10))
    assert len(set(idx[20:].tolist())) == 5


def test_class_aware_sampler_cuts_the_last_class_visit_at_num_samples():
    """Several images per class visit: consecutive runs of one class, the last run cut where the epoch ends."""
    t = np.repeat(np.eye(4, dtype=np.float32), 5, axis=0)  # single-label: the index says the class
    for n in (1, 10, 11, 13):
        idx = ClassAwareSampler(t, num_samples=n, samples_per_class=3, seed=1).indices(0)
        visits = t[idx].argmax(1)
        assert len(idx) == n
        assert all(len(set(visits[v:v + 3].tolist())) == 1 for v in range(0, n, 3))


def test_db_epoch_length_counts_every_class_of_the_label_matrix():
    """``max_k N_k * K / reduce`` with ``K`` the label matrix's classes, an empty one included (as the docstring and
    DistributionBalancedLoss's sampler count them), not only the classes in the visit cycle."""
    t = _longtail_targets(n=200, k=5, seed=1)
    t = np.concatenate([t, np.zeros((len(t), 1), t.dtype)], 1)
    assert len(ClassAwareSampler(t, num_samples="db")) == int(t.sum(0).max() * 6 / 4)
    assert len(ClassAwareSampler(t, num_samples="db", reduce=2)) == int(t.sum(0).max() * 6 / 2)


def test_two_stream_loader_drops_the_last_partial_batch():
    t = _longtail_targets(n=70, k=4)
    ds = TensorImageDataset(np.zeros((70, 3, 4, 4), dtype=np.uint8), t)
    loader = TwoStreamLoader(ds, t, batch_size=16, seed=0)
    assert loader.steps == len(loader) == 4 and len(list(loader)) == 4
    iu, ir = loader.epoch_indices(0)
    assert len(iu) == len(ir) == 64 and len(set(iu.tolist())) == 64  # one uniform pass: no image twice


def test_scaled_thresholds_round_voc_lts_to_the_nearest_image():
    # 600 of 1,142 images: 100 -> 52.5 -> 53 and 19 -> 9.98 -> 10 (truncating gives 52 and 9)
    assert longtail.scaled_thresholds(600) == (53, 10)
    assert longtail.scaled_thresholds(2284) == (200, 38)
    assert longtail.scaled_thresholds(40) == (4, 1)  # 3.5 -> 4, 0.67 -> 1
    assert longtail.scaled_thresholds(5) == (3, 1)  # floors: head >= 3 images, tail >= 1


# ------------------------------------------------------------------------------------- mutation follow-ups (round 2)
def test_uniform_sampler_draws_a_fresh_permutation_for_each_pass():
    """A longer uniform epoch concatenates independent permutations, not one permutation repeated."""
    idx = UniformSampler(10, 40, seed=2).indices(0)
    assert len({tuple(idx[i:i + 10].tolist()) for i in range(0, 40, 10)}) == 4


def test_class_aware_sampler_reshuffles_a_class_list_on_every_pass_the_first_included():
    """Each pass through a class's images takes them in a fresh random order, the first pass too."""
    t = np.ones((6, 1), dtype=np.float32)
    passes = ClassAwareSampler(t, num_samples=60, seed=0).indices(0).reshape(10, 6)
    assert len({tuple(p.tolist()) for p in passes}) > 5
    firsts = {tuple(ClassAwareSampler(t, num_samples=6, seed=s).indices(0).tolist()) for s in range(10)}
    assert len(firsts) > 5


def test_two_stream_loader_shares_uneven_steps_between_ranks(monkeypatch):
    """Under torchrun rank r takes steps // world of the epoch's batches r, r + world, ... (the rest is dropped)."""
    t = _longtail_targets(n=80, k=4)
    ds = TensorImageDataset(np.zeros((80, 3, 4, 4), dtype=np.uint8), t)
    iu, ir = TwoStreamLoader(ds, t, batch_size=8, seed=0, steps=5).epoch_indices(0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        loader = TwoStreamLoader(ds, t, batch_size=8, seed=0, steps=5)
        assert len(loader) == 2
        u, r = loader.epoch_indices(0)
        np.testing.assert_array_equal(u, iu.reshape(5, 8)[[rank, rank + 2]].reshape(-1))
        np.testing.assert_array_equal(r, ir.reshape(5, 8)[[rank, rank + 2]].reshape(-1))


def test_two_stream_loader_refuses_more_processes_than_steps(monkeypatch):
    """With more torchrun processes than steps per epoch some rank would get no batch at all: an error, even when
    there is only one process too many (as many processes as steps is fine: one step each)."""
    t = _longtail_targets(n=80, k=4)
    ds = TensorImageDataset(np.zeros((80, 3, 4, 4), dtype=np.uint8), t)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="3 processes but only 2 steps per epoch"):
        len(TwoStreamLoader(ds, t, batch_size=8, seed=0, steps=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert len(TwoStreamLoader(ds, t, batch_size=8, seed=0, steps=2)) == 1


def test_scaled_thresholds_keep_the_tail_below_the_head_for_any_reference():
    """tail_max stays below head_min (no class both head and tail) even for a reference whose thresholds meet."""
    ref = {"n_train": 100, "head_min": 10, "tail_max": 10}
    assert longtail.scaled_thresholds(100, ref) == (10, 9)
    assert longtail.scaled_thresholds(1000, ref) == (100, 99)


def test_head_to_tail_order_breaks_ties_by_class_index_on_long_inputs():
    """Classes by decreasing count, ties by increasing index, at any length (an unstable sort reorders ties)."""
    counts = np.random.default_rng(0).integers(0, 4, 80)
    assert longtail.head_to_tail_order(counts).tolist() == sorted(range(80), key=lambda c: (-counts[c], c))


_LT_LABELS = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=np.uint8)


def _write_lt_split(folder, class_freq=None, split=None):
    """A split folder of four images and three classes, without neg_class_freq / condition_prob."""
    import pickle

    folder.mkdir()
    (folder / "img_id.txt").write_text("".join(f"2008_{i:06d}\n" for i in range(len(_LT_LABELS))))
    freq = {"gt_labels": list(_LT_LABELS), "class_freq": _LT_LABELS.sum(0) if class_freq is None else class_freq}
    (folder / "class_freq.pkl").write_bytes(pickle.dumps(freq))
    (folder / "class_split.pkl").write_bytes(pickle.dumps(split or {"head": {0}, "middle": {1}, "tail": {2}}))
    return folder


def test_read_lt_split_fills_missing_negative_counts_with_n_minus_positives(tmp_path):
    """Without neg_class_freq in the file, the negatives per class are N - class_freq."""
    split = longtail.read_lt_split(_write_lt_split(tmp_path / "s"))
    assert split.neg_class_freq.tolist() == [1, 3, 3] and split.groups["medium"].tolist() == [1]


def test_read_lt_split_refuses_class_freq_that_disagrees_with_the_labels(tmp_path):
    """A class_freq that is not the column sums of gt_labels is an error."""
    with pytest.raises(ValueError, match="class_freq does not equal the column sums"):
        longtail.read_lt_split(_write_lt_split(tmp_path / "s", class_freq=np.array([3, 1, 2])))


def test_read_lt_split_refuses_overlapping_groups(tmp_path):
    """head / middle / tail must partition the classes: a class in two groups is an error."""
    with pytest.raises(ValueError, match="do not partition"):
        longtail.read_lt_split(_write_lt_split(tmp_path / "s", split={"head": {0, 1}, "middle": {1}, "tail": {2}}))


def test_check_labels_is_the_fraction_of_agreeing_entries(tmp_path):
    """check_labels gives the share of label entries equal to gt_labels (one of 12 differing -> 11/12)."""
    split = longtail.read_lt_split(_write_lt_split(tmp_path / "s"))
    other = _LT_LABELS.copy()
    other[0, 0] = 0
    assert longtail.check_labels(split, other) == pytest.approx(11 / 12)
