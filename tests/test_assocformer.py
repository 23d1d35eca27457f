"""AssocFormer: association module shapes (Eqs. 4-6), fusion (Eq. 7), regularisers (Eq. 9), GCN head, cost."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from mlic_lib.assoc_losses import REGULARIZERS, AssocFormerLoss, association_regularizer
from mlic_lib.losses import asymmetric_loss
from mlic_lib.models.assocformer import (
    FUSIONS,
    AssocFormer,
    AssocFormerStep,
    AssociationModule,
    association_summary,
    build_assocformer,
    head_cost,
    mean_association,
    train_assocformer,
    transformer_backbone,
)
from mlic_lib.models.gcn_head import GCNHead, mlgcn_adjacency

torch.set_num_threads(2)


def _head(d: int, c: int, fusion: str = "equal") -> AssocFormer:
    return AssocFormer(nn.Identity(), d, c, fusion=fusion)


@pytest.mark.parametrize("c,d", [(1, 4), (5, 8), (20, 16), (80, 3)])
def test_association_module_shapes_symmetry_range(c, d):
    torch.manual_seed(0)
    am = AssociationModule(d, c, scale=0.05)
    L = torch.randn(3, d)
    n1, A = am(L)
    assert n1.shape == (3, c) and A.shape == (3, c, c)
    assert torch.allclose(A, A.transpose(1, 2))
    assert (A > 0).all() and (A < 1).all()


def test_association_module_matches_direct_formula():
    """Eq. 4: K[c, j] = w_c L_j + b_c; Eq. 5: A = sigmoid(K K^T); Eq. 6: N1 = u . (M^T A) + b."""
    torch.manual_seed(1)
    c, d = 6, 5
    am = AssociationModule(d, c)
    L = torch.randn(2, d)
    wk, bk = am.key.weight.view(c), am.key.bias
    wm, bm = am.value.weight.view(c), am.value.bias
    u, b0 = am.out.weight.view(d), am.out.bias
    for i in range(2):
        K = wk[:, None] * L[i][None, :] + bk[:, None]
        M = wm[:, None] * L[i][None, :] + bm[:, None]
        A = torch.sigmoid(K @ K.T)
        n1 = u @ (M.T @ A) + b0
        got_n1, got_a = am(L[i:i + 1])
        assert torch.allclose(got_a[0], A, atol=1e-6)
        assert torch.allclose(got_n1[0], n1, atol=1e-5)
    # the consequence the chapter states: K = w L^T + b 1^T, so K K^T (A before the sigmoid) has rank <= 2
    big = AssociationModule(64, 20, scale=0.25)
    L = torch.randn(8, 64)
    K = big.key(L.unsqueeze(1)).double()
    assert int(torch.linalg.matrix_rank(K @ K.transpose(1, 2), rtol=1e-9).max()) == 2
    logits = big.association_logits(L)  # what the chapter's rank check reads: Eq. 5 before the sigmoid, scaled
    assert torch.allclose(logits.double(), 0.25 * K @ K.transpose(1, 2), atol=1e-5)
    assert torch.allclose(torch.sigmoid(logits), big.association(L))


@pytest.mark.parametrize("k", [3, 5])
def test_association_kernel_option_matches_direct_formula_and_rank_bound(k):
    """Eq. 4 with an odd kernel k and 'same' zero padding: K[c, j] = sum_t w_ct L[j + t - k // 2] + b_c; then
    K is k shifted copies of L plus a bias column, so K K^T has rank k + 1 (the stated bound) for large C, d."""
    torch.manual_seed(2)
    c, d = 12, 16
    am = AssociationModule(d, c, kernel_size=k)
    L = torch.randn(3, d)
    r = k // 2
    Lp = torch.nn.functional.pad(L, (r, r))
    w, b = am.key.weight.view(c, k), am.key.bias
    K = torch.stack([sum(w[:, t, None] * Lp[:, None, t:t + d] for t in range(k)) + b[None, :, None]])[0]  # (B, C, d)
    assert torch.allclose(am.key(L.unsqueeze(1)), K, atol=1e-5)
    n1, A = am(L)
    assert n1.shape == (3, c) and A.shape == (3, c, c)
    assert torch.allclose(A, torch.sigmoid(K @ K.transpose(1, 2)), atol=1e-5)
    Kd = K.double()
    assert am.logit_rank_bound == k + 1 == int(torch.linalg.matrix_rank(Kd @ Kd.transpose(1, 2), rtol=1e-9).max())
    assert AssociationModule(d, c).logit_rank_bound == 2
    assert AssociationModule(d, 2, kernel_size=5).logit_rank_bound == 2  # at most C


@pytest.mark.parametrize("bad", [0, 2, -1, 1.0, True, "3"])
def test_association_kernel_size_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match=r"model\.kernel_size.*odd whole number.*use 1"):
        AssociationModule(8, 4, kernel_size=bad)


def test_kernel_size_override_is_checked_and_reaches_the_model():
    from mlic_lib.models.assocformer import initial_assocformer
    from mlic_lib.profiles import load_profile

    with pytest.raises(ValueError, match="kernel_size"):
        load_profile("assocformer", "smoke", {"model.kernel_size": 2})
    settings = load_profile("assocformer", "smoke", {"model.kernel_size": 3})
    assert load_profile("assocformer", "smoke")["model"]["kernel_size"] == 1  # the book's reading by default
    model = initial_assocformer(settings["model"], 5, seed=0)
    assert model.am.key.kernel_size == (3,) and model.am.logit_rank_bound == 4


def test_association_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = _head(8, 5)
    L = torch.randn(4, 8, requires_grad=True)
    O, A = m(L, return_assoc=True)
    (O.sum() + A.sum()).backward()
    assert L.grad is not None and torch.isfinite(L.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_fusion_modes():
    torch.manual_seed(0)
    L = torch.randn(3, 8)
    m = _head(8, 4, "equal")
    n1, _ = m.am(L)
    assert torch.allclose(m(L), 0.5 * n1 + 0.5 * m.fc(L), atol=1e-6)
    s = _head(8, 4, "single")
    assert s.fc is None and torch.allclose(s(L), s.am(L)[0])
    b = _head(8, 4, "backbone")
    O, A = b(L, return_assoc=True)
    assert b.am is None and A is None and torch.allclose(O, b.fc(L))
    lrn = _head(8, 4, "learnable")
    assert isinstance(lrn.alpha, nn.Parameter) and float(lrn.beta) == 1.0
    O = lrn(L)
    assert torch.allclose(O, lrn.alpha * lrn.am(L)[0] + lrn.fc(L), atol=1e-6)
    O.sum().backward()
    assert lrn.alpha.grad is not None
    assert set(FUSIONS) == {"equal", "single", "learnable", "backbone"}
    with pytest.raises(ValueError, match="fusion"):
        _head(8, 4, "average")


def _direct(A: torch.Tensor, norm: str) -> torch.Tensor:
    vals = []
    for a in A:
        s = torch.linalg.svd(a.double()).S
        l1, fro = a.abs().sum(), torch.sqrt((a ** 2).sum())
        vals.append({"none": torch.tensor(0.0), "l1": l1, "l2": fro, "l1+l2": l1 + fro, "nuclear": s.sum(),
                     "spectral": s.max()}[norm].double())
    return torch.stack(vals).mean()


@pytest.mark.parametrize("norm", REGULARIZERS)
def test_regularizer_value_and_gradient(norm):
    torch.manual_seed(0)
    A = torch.sigmoid(torch.randn(3, 6, 6, dtype=torch.float64))
    A = (A + A.transpose(1, 2)) / 2
    A1 = A.clone().float().requires_grad_(True)
    r = association_regularizer(A1, norm)
    assert torch.allclose(r.double(), _direct(A, norm), atol=1e-4)
    r.backward()
    # analytic gradients of the norms, per image, divided by the batch size
    g = []
    for a in A:
        U, S, Vh = torch.linalg.svd(a)
        fro = {"none": 0 * a, "l1": torch.sign(a), "l2": a / torch.sqrt((a ** 2).sum()),
               "nuclear": U @ Vh, "spectral": torch.outer(U[:, 0], Vh[0])}
        fro["l1+l2"] = fro["l1"] + fro["l2"]
        g.append(fro[norm] / A.shape[0])
    assert torch.allclose(A1.grad.double(), torch.stack(g), atol=1e-4)


def test_association_module_runs_in_float32_under_autocast():
    """Under bf16 autocast the AM still gives the float32 A (the one mean_association analyses)."""
    torch.manual_seed(0)
    am = AssociationModule(32, 5, scale=0.05)
    L = torch.randn(3, 32)
    N1_ref, A_ref = am(L)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        N1, A = am(L.bfloat16())
        assert am.key(L.unsqueeze(1)).dtype == torch.bfloat16  # autocast is really on around the module
    assert A.dtype == N1.dtype == torch.float32
    assert torch.allclose(A, am.association(L.bfloat16().float()), atol=1e-6)
    assert torch.allclose(A, A_ref, atol=1e-2) and torch.allclose(N1, N1_ref, atol=5e-2)


def test_association_module_in_float64_passes_gradcheck():
    """A float64 module computes in float64 (it was cast to float32, which clashed with its float64 weights)."""
    torch.manual_seed(0)
    am = AssociationModule(8, 4, scale=0.5).double()
    L = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    N1, A = am(L)
    assert N1.dtype == A.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: am(x)[0], (L,))
    model = AssocFormer(nn.Flatten(), 8, 4).double()  # and the mean A of a float64 model
    data = torch.utils.data.TensorDataset(torch.randn(5, 8, dtype=torch.float64), torch.zeros(5, 4))
    mean_A = mean_association(model, data, device="cpu")
    assert mean_A.shape == (4, 4) and np.isfinite(mean_A).all()


def test_regularizer_bad_inputs():
    with pytest.raises(ValueError, match="regularizer"):
        association_regularizer(torch.rand(2, 3, 3), "l3")
    with pytest.raises(ValueError, match=r"\(B, C, C\)"):
        association_regularizer(torch.rand(2, 3, 4), "l2")
    with pytest.raises(ValueError, match="theta"):
        AssocFormerLoss(theta=-1.0)
    with pytest.raises(ValueError, match="regularizer"):
        AssocFormerLoss(norm="l3")
    with pytest.raises(ValueError, match="reduction"):
        AssocFormerLoss(reduction="max")
    logits, y = torch.randn(4, 5), (torch.rand(4, 5) > 0.5).float()
    for A in (torch.rand(2, 7, 7), torch.rand(4, 7, 7), torch.rand(5, 5), torch.rand(4, 5, 4)):  # not (4, 5, 5)
        with pytest.raises(ValueError, match=r"shape \(B, C, C\) = \(4, 5, 5\) for logits \(4, 5\); got "
                                             + re.escape(str(tuple(A.shape)))):
            AssocFormerLoss()(logits, y, A)


def test_loss_is_asl_plus_theta_r():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 5), (torch.rand(4, 5) > 0.5).float()
    A = torch.rand(4, 5, 5)
    loss, logs = AssocFormerLoss("l2", theta=0.1)(logits, y, A)
    asl = asymmetric_loss(logits, y, gamma_pos=0.0, gamma_neg=2.0, clip=0.0, reduction="mean")
    # Eq. 8 directly: -(1/C) sum_k y log p + (1-y) p^2 log(1-p), averaged over images
    p = torch.sigmoid(logits)
    eq8 = -(y * torch.log(p) + (1 - y) * p ** 2 * torch.log(1 - p)).mean()
    assert torch.allclose(asl, eq8, atol=1e-6)
    fro = torch.stack([torch.linalg.norm(a) for a in A]).mean()
    assert torch.allclose(loss, eq8 + 0.1 * fro, atol=1e-5)
    assert torch.allclose(logs["reg"], fro)
    loss0, _ = AssocFormerLoss("l2")(logits, y, None)  # no AM: ASL only
    assert torch.allclose(loss0, eq8, atol=1e-6)
    # reduction='sum' (the ASL code): both terms summed over the batch (ASL also over the classes)
    loss_s, logs_s = AssocFormerLoss("l2", theta=0.1, reduction="sum")(logits, y, A)
    eq8_sum = -(y * torch.log(p) + (1 - y) * p ** 2 * torch.log(1 - p)).sum()
    fro_sum = torch.stack([torch.linalg.norm(a) for a in A]).sum()
    assert torch.allclose(loss_s, eq8_sum + 0.1 * fro_sum, atol=1e-4)
    assert torch.allclose(logs_s["reg"], fro_sum, atol=1e-5)


def test_gcn_head_shapes_and_adjacency():
    # P(j|i) asymmetric: 0 implies 1 and 2, 1 implies nothing, 2 implies 0
    cond = np.array([[1.0, 0.6, 0.5], [0.1, 1.0, 0.0], [0.45, 0.0, 1.0]])
    adj = mlgcn_adjacency(cond, tau=0.4, p=0.2)
    # ML-GCN Eq. 7 (A_ij = 1[P(j|i) >= tau]) and Eq. 8 (p spread over the neighbours, 1 - p kept) written out;
    # its rows sum to 1, so D^-1/2 A D^-1/2 leaves it as it is
    a = np.array([[0.8, 0.1, 0.1], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])
    assert np.allclose(adj, a, atol=1e-6) and not np.allclose(adj, adj.T)
    head = GCNHead(3, 8, adj, in_dim=10)
    L = torch.randn(5, 8, requires_grad=True)
    out = head(L)
    assert out.shape == (5, 3)
    out.sum().backward()
    assert head.gc1.weight.grad is not None and L.grad is not None
    with pytest.raises(ValueError, match="embeddings"):
        head(torch.randn(5, 7))
    with pytest.raises(ValueError, match="adjacency"):
        GCNHead(4, 8, adj)
    with pytest.raises(ValueError, match=r"word_embeddings must be \(3, 10\); got \(3, 300\)"):
        GCNHead(3, 8, adj, in_dim=10, word_embeddings=np.zeros((3, 300)))


def test_gcn_head_matches_the_mlgcn_formula():
    """logits = L W^T with W = A_hat LeakyReLU_0.2(A_hat X W1) W2, from the head's own parameters, in float64."""
    torch.manual_seed(0)
    c, d, e, hidden = 4, 6, 5, 7
    cond = np.array([[1.0, 0.6, 0.1, 0.5], [0.5, 1.0, 0.0, 0.2], [0.2, 0.0, 1.0, 0.9], [0.4, 0.3, 0.8, 1.0]])
    adj = mlgcn_adjacency(cond, tau=0.4, p=0.2)
    X = torch.randn(c, e).double()  # float32 values: the head stores its buffers in float32 before .double()
    head = GCNHead(c, d, adj, in_dim=e, hidden=hidden, word_embeddings=X).double()
    L = torch.randn(3, d, dtype=torch.float64)
    A_hat = torch.from_numpy(adj).double()
    W1, W2 = head.gc1.weight, head.gc2.weight  # (hidden, e), (d, hidden): nn.Linear computes x W^T
    assert W1.shape == (hidden, e) and W2.shape == (d, hidden)
    pre = A_hat @ X @ W1.T
    assert (pre < 0).any() and (pre > 0).any()  # both branches of the LeakyReLU are used
    H = torch.where(pre > 0, pre, 0.2 * pre)
    W = A_hat @ H @ W2.T
    torch.testing.assert_close(head.classifiers(), W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head(L), L @ W.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head(L)[1, 2], (L[1] * W[2]).sum(), rtol=1e-12, atol=1e-12)  # logit = <L_b, W_c>
    # without word_embeddings X is the documented seed-0 Gaussian buffer (the same for every head)
    default = GCNHead(c, d, in_dim=e)
    assert torch.equal(default.word_embeddings, torch.randn(c, e, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(default.adjacency, torch.eye(c))


def test_head_cost_counts_flops_and_params():
    c, d, b = 10, 16, 4
    cost = head_cost(_head(d, c), d, batch_size=b, repeats=2)
    # K, M convs (2 x B C d MACs), K K^T (B C C d), M^T A (B d C C), out conv (B d C), fc (B d C)
    macs = 2 * b * c * d + 2 * b * c * c * d + 2 * b * d * c
    assert cost["flops"] == 2 * macs
    assert cost["params"] == 4 * c + d + 1 + d * c + c + 0  # alpha/beta are buffers
    assert 0 < cost["ms_q1"] <= cost["ms"] <= cost["ms_q3"]  # the median between its quartiles
    g = head_cost(GCNHead(c, d, in_dim=12), d, batch_size=b, repeats=0)
    assert g["params"] == 12 * d + d * d and np.isnan(g["ms"]) and np.isnan(g["ms_q3"])


def test_association_summary():
    rng = np.random.default_rng(0)
    cond = rng.random((6, 6))
    s = association_summary(cond, cond, groups=np.array([0, 0, 1, 1, 2, 2]))
    assert s["pearson"] == pytest.approx(1.0) and s["spearman"] == pytest.approx(1.0)
    flat = association_summary(np.full((6, 6), 0.5), cond)
    assert flat["entropy"] == pytest.approx(1.0) and np.isnan(flat["pearson"])
    with np.errstate(all="raise"):  # two classes: one off-diagonal entry a row, no spread (was 0 / log 1)
        assert np.isnan(association_summary(np.full((2, 2), 0.5), np.eye(2))["entropy"])
    with pytest.raises(ValueError, match="same shape"):
        association_summary(np.ones((3, 3)), cond)


def test_association_summary_values_by_hand():
    """Groups {0, 1} and {2, 3}; the diagonal (100) is left out of every number."""
    A = np.array([[100.0, 8.0, 1.0, 2.0],
                  [6.0, 100.0, 3.0, 1.0],
                  [2.0, 1.0, 100.0, 7.0],
                  [1.0, 4.0, 5.0, 100.0]])
    s = association_summary(A, A.T, groups=np.array([0, 0, 1, 1]))
    within = (8 + 6 + 7 + 5) / 4  # (0, 1), (1, 0), (2, 3), (3, 2)
    across = (1 + 2 + 3 + 1 + 2 + 1 + 1 + 4) / 8
    assert s["within_minus_across"] == pytest.approx(within - across) == pytest.approx(4.625)
    assert s["mean_offdiag"] == pytest.approx((26 + 15) / 12)
    # normalised entropy of each row's off-diagonal entries, log base C - 1 = 3 (scipy normalises the row)
    from scipy.stats import entropy

    rows = [[8, 1, 2], [6, 3, 1], [2, 1, 7], [1, 4, 5]]
    assert s["entropy"] == pytest.approx(np.mean([entropy(r, base=3) for r in rows]))
    # groups given as labels, in another order: the same split
    by_name = association_summary(A, A.T, groups=np.array(["b", "b", "a", "a"]))
    assert by_name["within_minus_across"] == pytest.approx(4.625)
    assert "within_minus_across" not in association_summary(A, A.T)


def test_symmetric_pearson_ceiling_bounds_every_symmetric_matrix():
    """A symmetric A (Eq. 5) cannot correlate with an asymmetric P(j|i) beyond the ceiling, and the symmetrised
    truth reaches it; a symmetric truth has ceiling 1."""
    from mlic_lib.models.assocformer import symmetric_pearson_ceiling

    rng = np.random.default_rng(0)
    cond = rng.random((7, 7))
    ceil = symmetric_pearson_ceiling(cond)
    assert 0 < ceil < 1
    sym = (cond + cond.T) / 2
    assert association_summary(sym, cond)["pearson"] == pytest.approx(ceil)
    off = ~np.eye(7, dtype=bool)
    assert ceil == pytest.approx(sym[off].std() / cond[off].std())
    for _ in range(200):
        x = rng.normal(size=(7, 7)) + 3 * sym
        assert association_summary(x + x.T, cond)["pearson"] <= ceil + 1e-12
    assert symmetric_pearson_ceiling(sym) == pytest.approx(1.0)
    assert np.isnan(symmetric_pearson_ceiling(np.ones((3, 3))))
    with pytest.raises(ValueError, match="square"):
        symmetric_pearson_ceiling(np.ones((2, 3)))


def test_association_summary_correlations_match_scipy():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(3)
    c = 7
    off = ~np.eye(c, dtype=bool)
    cond = rng.random((c, c))
    A = 1 / (1 + np.exp(-(2 * cond + rng.normal(0, 0.4, (c, c)))))  # monotone in cond plus noise, no ties
    np.fill_diagonal(A, 1.0)
    s = association_summary(A, cond)
    rho, r = spearmanr(A[off], cond[off]).statistic, pearsonr(A[off], cond[off]).statistic
    assert 0.3 < rho < 0.95 and 0.3 < r < 0.95  # neither trivial (+-1) nor unrelated
    assert s["spearman"] == pytest.approx(rho, abs=1e-12) and s["pearson"] == pytest.approx(r, abs=1e-12)
    assert s["spearman"] != pytest.approx(s["pearson"], abs=1e-3)  # the rank version is not the plain one


def test_association_summary_spearman_with_ties():
    """Tied values (zeros in P(j|i), a saturated A) share their mean rank: the Spearman value equals scipy's and
    does not change when the classes are relabelled (ranking ties by position did both wrong)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    c = 10
    off = ~np.eye(c, dtype=bool)
    cond = np.where(rng.random((c, c)) < 0.7, 0.0, rng.random((c, c)))  # most pairs never co-occur
    A = rng.random((c, c))
    perm = rng.permutation(c)
    relabelled = association_summary(A[np.ix_(perm, perm)], cond[np.ix_(perm, perm)])["spearman"]
    assert association_summary(A, cond)["spearman"] == pytest.approx(relabelled, abs=1e-12)
    assert association_summary(A, cond)["spearman"] == pytest.approx(spearmanr(A[off], cond[off]).statistic)


def test_mean_association_is_the_dataset_mean_of_a():
    """The mean of model.am.association(L) over all images, in eval mode (dropout off), not a mean of batch means."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.5))
    model = AssocFormer(features, 8, 5, scale=0.1)
    x = torch.randn(7, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.TensorDataset(x, torch.zeros(7, 5))
    model.train()
    got = mean_association(model, data, batch_size=3)  # batches of 3, 3 and 1 images
    assert not model.training
    with torch.no_grad():
        per_image = model.am.association(model.forward_features(x)).double()
    expected = per_image.mean(0).numpy()
    assert got.shape == (5, 5) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)  # float32 A of other batch shapes
    by_hand = sum(per_image[i] for i in range(7)) / 7
    np.testing.assert_allclose(got[1, 3], float(by_hand[1, 3]), rtol=0, atol=1e-7)
    batch_means = (per_image[:3].mean(0) + per_image[3:6].mean(0) + per_image[6]) / 3
    assert not np.allclose(got, batch_means.numpy(), rtol=0, atol=1e-6)
    assert np.ptp(got[~np.eye(5, dtype=bool)]) > 0.05  # not saturated: the entries differ
    with pytest.raises(ValueError, match="no association module"):
        mean_association(_head(8, 5, "backbone"), data)
    with pytest.raises(ValueError, match="the dataset is empty"):
        mean_association(model, torch.utils.data.TensorDataset(x[:0], torch.zeros(0, 5)))


def test_timm_backbone_and_determinism():
    kw = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    m1 = build_assocformer(7, "vit_tiny_patch16_224", "equal", kw)
    torch.manual_seed(0)
    m2 = build_assocformer(7, "vit_tiny_patch16_224", "equal", kw)
    x = torch.randn(2, 3, 16, 16)
    O, A = m1.eval()(x, return_assoc=True)
    assert O.shape == (2, 7) and A.shape == (2, 7, 7)
    assert torch.equal(O, m2.eval()(x))
    with pytest.raises(ValueError, match="CvT is not in timm"):
        transformer_backbone("cvt_w24_384")


def test_backbone_weights_from_a_local_file(tmp_path):
    """A local state dict loads (also wrapped as a training checkpoint); weights of another net are refused."""
    kw = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
    torch.manual_seed(1)
    src, _ = transformer_backbone("vit_tiny_patch16_224", False, **kw)
    for i, payload in enumerate((src.state_dict(), {"model": src.state_dict()}, {"state_dict": src.state_dict()})):
        path = tmp_path / f"w{i}.pth"
        torch.save(payload, path)
        torch.manual_seed(2)
        net, _ = transformer_backbone("vit_tiny_patch16_224", str(path), **kw)
        for (k, a), b in zip(src.state_dict().items(), net.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="do not fit"):
        transformer_backbone("vit_tiny_patch16_224", str(tmp_path / "other.pth"), **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        transformer_backbone("vit_tiny_patch16_224", str(tmp_path / "missing.pth"), **kw)


def test_backbone_weights_in_timm_and_in_the_original_swin_layout(tmp_path):
    """A Swin backbone loads from a file in timm's own layout (headless, as this library saves it; or with the
    relative_position_index buffers older code persisted) and from one in the original layout (Microsoft's:
    {'model': ...}, downsampling at the end of a stage, a 'head' classifier), which goes through timm's
    checkpoint filter. Before the library decided the layout itself, timm < 1.0.31 took the headless
    timm-layout file for an original one and shifted its downsampling layers."""
    kw = {"img_size": 32, "patch_size": 4, "window_size": 2, "embed_dim": 16, "depths": (1, 1, 1),
          "num_heads": (1, 1, 1)}
    torch.manual_seed(3)
    src, d = transformer_backbone("swin_tiny_patch4_window7_224", False, **kw)
    timm_layout = dict(src.state_dict())
    assert "layers.1.downsample.reduction.weight" in timm_layout  # timm: stage i > 0 starts by downsampling
    with_buffers = {**timm_layout, "layers.0.blocks.0.attn.relative_position_index": torch.zeros(4, 4).long()}
    original = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
                for k, v in with_buffers.items()}
    original |= {"head.weight": torch.zeros(10, d), "head.bias": torch.zeros(10)}
    assert "layers.0.downsample.reduction.weight" in original and "layers.2.downsample.norm.weight" not in original
    for i, payload in enumerate((timm_layout, with_buffers, {"model": original})):
        torch.save(payload, tmp_path / f"swin{i}.pth")
        torch.manual_seed(4)
        net, _ = transformer_backbone("swin_tiny_patch4_window7_224", str(tmp_path / f"swin{i}.pth"), **kw)
        for (k, a), b in zip(src.state_dict().items(), net.state_dict().values(), strict=True):
            assert torch.equal(a, b), (i, k)


def test_step_and_smoke_training(tmp_path, monkeypatch):
    """A tiny end-to-end run through the engine (the chapter's train_assocformer) and mean A."""
    from mlic_lib.experiments import scene_data
    from mlic_lib.profiles import load_profile

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    settings = load_profile("assocformer", "smoke", {"data.n_train": 64, "data.n_test": 32,
                                                     "train.batch_size": 16, "train.device": "cpu"})
    data = scene_data(settings)
    run = train_assocformer(settings, data, seed=0, regularizer="nuclear", fusion="learnable")
    assert 0.0 <= run.final["mAP"] <= 1.0 and "reg" in run.history[0] and "alpha" in run.history[0]
    A = mean_association(run.model, data.test_ds)
    assert A.shape == (data.num_classes,) * 2 and np.allclose(A, A.T)
    again = train_assocformer(settings, data, seed=0, regularizer="nuclear", fusion="learnable")
    assert again.cached and again.final["mAP"] == run.final["mAP"]
    step = AssocFormerStep(AssocFormerLoss("l1"))
    loss, logs = step(run.model.train(), [data.train_ds[0][0][None], data.train_ds[0][1][None]], "cpu")
    assert loss.ndim == 0 and {"asl", "reg", "alpha"} <= set(logs)
    with pytest.raises(ValueError, match="regularizer"):
        train_assocformer(settings, data, regularizer="frobenius")


def test_initial_assocformer_is_the_seeded_build_that_training_starts_from():
    from mlic_lib.models.assocformer import build_assocformer, initial_assocformer
    from mlic_lib.utils import seed_everything

    m = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1,
                                                                 "embed_dim": 32, "num_heads": 2},
         "alpha_init": 0.3}
    a = initial_assocformer(m, 6, seed=2, fusion="learnable")
    seed_everything(2)
    ref = build_assocformer(6, m["backbone"], "learnable", m["backbone_kwargs"], False, 0.3, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), ref.state_dict().values(), strict=True))
    other = initial_assocformer(m, 6, seed=3, fusion="learnable")
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), other.state_dict().values(), strict=True))
    assert float(a.alpha.detach()) == pytest.approx(0.3)


def test_assocformer_loss_passes_its_mask_and_clip_to_asl():
    """The ASL term of Eq. 9 is asymmetric_loss with the loss's own clip and the caller's label mask."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 2
    y = (torch.rand(6, 5, generator=g) > 0.6).float()
    m = torch.rand(6, 5, generator=g) > 0.3
    for clip in (0.0, 0.05):
        loss = AssocFormerLoss(theta=0.0, clip=clip)
        _, logs = loss(logits, y, mask=m)
        want = asymmetric_loss(logits, y, gamma_pos=0.0, gamma_neg=2.0, clip=clip, mask=m, reduction="mean")
        torch.testing.assert_close(torch.as_tensor(logs["asl"]), want)
        moved = logits.clone()
        moved[~m] += 5.0  # what the mask ignores cannot change the loss
        torch.testing.assert_close(torch.as_tensor(loss(moved, y, mask=m)[1]["asl"]), want)
    assert not torch.allclose(asymmetric_loss(logits, y, gamma_neg=2.0, clip=0.05, mask=m),
                              asymmetric_loss(logits, y, gamma_neg=2.0, clip=0.0, mask=m))


def test_the_classification_loss_trains_the_keys_through_a():
    """Eq. 6 mixes the values with A, so a loss on O alone (no regulariser) must reach the keys of Eq. 4 through A."""
    torch.manual_seed(0)
    m = _head(8, 5)
    O = m(torch.randn(4, 8))
    O.sum().backward()
    assert m.am.key.weight.grad is not None and m.am.key.weight.grad.abs().sum() > 0


def test_step_is_the_loss_of_the_models_own_o_and_a_and_r_reaches_the_keys():
    """AssocFormerStep's loss is AssocFormerLoss(O, y, A) of the model's outputs (Eq. 9), and theta R(A) moves the
    keys of Eq. 4 (a step that detached A, or passed no A, would leave their gradient as ASL's alone)."""
    torch.manual_seed(0)
    model = _head(8, 5)
    x, y = torch.randn(6, 8), (torch.rand(6, 5) > 0.5).float()
    for norm in REGULARIZERS:
        loss_fn = AssocFormerLoss(norm=norm, theta=0.3)
        loss, logs = AssocFormerStep(loss_fn)(model, [x, y], "cpu")
        O, A = model(x, return_assoc=True)
        torch.testing.assert_close(loss, loss_fn(O, y, A)[0])
        assert (float(logs["reg"]) > 0) == (norm != "none")
        torch.testing.assert_close(torch.as_tensor(logs["reg"]), association_regularizer(A.detach(), norm))
    grads = []
    for theta in (0.0, 1.0):  # the regulariser's share of the keys' gradient: what theta R(A) adds
        model.zero_grad()
        AssocFormerStep(AssocFormerLoss(norm="l2", theta=theta))(model, [x, y], "cpu")[0].backward()
        grads.append(model.am.key.weight.grad.clone())
    assert (grads[1] - grads[0]).abs().sum() > 1e-6


def test_train_assocformer_passes_its_regulariser_theta_and_scale_on(monkeypatch):
    """Every Table 3 row trains with its own R (and theta when given), and the profile's scale reaches the AM (the
    chapter's K K^T / d run): what train_assocformer hands the engine."""
    import mlic_lib.engine as engine
    from mlic_lib.experiments import scene_data
    from mlic_lib.profiles import load_profile

    seen = {}

    def fake_fit(model, train, test, cfg, step, run_dir, progress):
        seen.update(model=model, step=step, run_dir=run_dir)
        return "ran"

    monkeypatch.setattr(engine, "fit", fake_fit)
    settings = load_profile("assocformer", "smoke", {"data.n_train": 16, "data.n_test": 8, "model.scale": 0.25})
    data = scene_data(settings)
    dirs = set()
    for norm in REGULARIZERS:
        for theta in (None, 0.7):
            assert train_assocformer(settings, data, regularizer=norm, theta=theta) == "ran"
            loss = seen["step"].loss
            assert loss.norm == norm
            assert loss.theta == (0.7 if theta is not None else float(settings["loss"]["theta"]))
            assert seen["model"].am.scale == 0.25
            dirs.add(seen["run_dir"])
    assert len(dirs) == 2 * len(REGULARIZERS)  # each its own cache folder


def test_train_assocformer_passes_the_loss_options_fusion_seed_and_pretrained_weights_on(monkeypatch):
    """The rest of what train_assocformer hands the engine (a mutation review found each could be dropped with
    every test green): the profile's ASL options, the fusion (Table 5's rows), the run's seed (data order, not only
    the initial weights), model.pretrained (full: Swin-L's ImageNet weights), and the model section in the key
    (the chapter's K K^T / d run has the L2 run's name)."""
    import mlic_lib.engine as engine
    import mlic_lib.models.assocformer as af
    from mlic_lib.experiments import scene_data
    from mlic_lib.profiles import load_profile

    seen = {}
    monkeypatch.setattr(engine, "fit", lambda model, train, test, cfg, step, run_dir, progress: seen.update(
        model=model, step=step, cfg=cfg, run_dir=run_dir))
    real_build = af.build_assocformer
    monkeypatch.setattr(af, "build_assocformer", lambda *a, **kw: seen.update(build=a) or real_build(*a[:3]))
    settings = load_profile("assocformer", "smoke", {
        "data.n_train": 16, "data.n_test": 8, "loss.gamma_pos": 1.0, "loss.gamma_neg": 3.0, "loss.clip": 0.05,
        "loss.reduction": "sum", "model.pretrained": True})
    data = scene_data(settings)
    for fusion in FUSIONS:
        train_assocformer(settings, data, seed=3, fusion=fusion)
        loss = seen["step"].loss
        assert (loss.gamma_pos, loss.gamma_neg, loss.clip, loss.reduction) == (1.0, 3.0, 0.05, "sum")
        assert seen["model"].fusion == fusion and seen["cfg"].seed == 3
        assert seen["build"][4] is True  # build_assocformer's pretrained argument
    train_assocformer(settings, data)
    plain = seen["run_dir"]
    train_assocformer({**settings, "model": {**settings["model"], "scale": 0.5}}, data)
    assert seen["run_dir"] != plain


def test_mlgcn_adjacency_binarises_at_p_greater_or_equal_tau_written_out():
    """ML-GCN Eq. 7 keeps a neighbour when ``P(j|i) >= tau``: an entry exactly at ``tau`` (2 of 5 images = 0.4) is
    an edge. Checked against a loop over the entries of a count-based ``cond``, boundary values included."""
    rng = np.random.default_rng(0)
    n = rng.integers(1, 6, size=6)  # images per class
    cond = np.array([[rng.integers(0, n[i] + 1) / n[i] for _ in range(6)] for i in range(6)])
    cond[0, 1], cond[2, 3], cond[4, 0] = 2 / 5, 2 / 5, 0.39
    np.fill_diagonal(cond, 1.0)
    tau, p = 0.4, 0.2
    ref = np.zeros((6, 6))
    for i in range(6):
        nb = [j for j in range(6) if j != i and cond[i, j] >= tau]
        ref[i, i] = 1.0 - p if nb else 1.0
        for j in nb:
            ref[i, j] = p / len(nb)
    d = ref.sum(1)
    ref = ref / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]
    adj = mlgcn_adjacency(cond, tau=tau, p=p)
    assert adj[0, 1] > 0 and adj[2, 3] > 0 and adj[4, 0] == 0
    np.testing.assert_allclose(adj, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_to_half_precision_runs_its_association_module_in_float32(dtype):
    """model.half() / model.to(torch.bfloat16) made the AM's Conv1d weights half precision while the module
    promotes L to float32 on purpose: the forward failed with "Input type (float) and bias type ... should be the
    same". It now runs the AM in float32 with the weights cast, as under autocast."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Flatten(), nn.Linear(12, 16))
    model = AssocFormer(features, embed_dim=16, num_classes=5).eval()
    x = torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        ref = model(x)
        out = model.to(dtype)(x.to(dtype))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------------- mutation follow-ups (round 2)
def test_l1_regularizers_sum_the_absolute_entries():
    """'l1' is sum_ij |A_ij| per image (negative entries count positively), averaged over the batch; 'l1+l2' adds
    the Frobenius norm."""
    A = torch.tensor([[[1.0, -2.0], [0.5, -0.5]], [[-1.0, 0.0], [0.0, 3.0]]])
    assert association_regularizer(A, "l1").item() == pytest.approx(4.0)
    fro = torch.linalg.matrix_norm(A).mean().item()
    assert association_regularizer(A, "l1+l2").item() == pytest.approx(4.0 + fro)


def test_loss_defaults_are_eq9_with_the_papers_values():
    """AssocFormerLoss() is Eq. 9 with the paper's values: Frobenius R, theta 0.1, gamma+ 0, gamma- 2, no clip."""
    torch.manual_seed(0)
    logits, y, A = torch.randn(3, 4), (torch.rand(3, 4) > 0.5).float(), torch.randn(3, 4, 4)
    loss, _ = AssocFormerLoss()(logits, y, A)
    p = torch.sigmoid(logits)
    eq8 = -(y * torch.log(p) + (1 - y) * p ** 2 * torch.log(1 - p)).mean()
    fro = torch.stack([torch.linalg.norm(a) for a in A]).mean()
    torch.testing.assert_close(loss, eq8 + 0.1 * fro, atol=1e-5, rtol=1e-5)


def test_step_passes_the_batchs_label_mask_to_the_loss():
    """A batch (x, y, mask) (VOC difficult labels with difficult_train: ignore) trains AssocFormerLoss(O, y, A, mask):
    the step's loss is unchanged by the labels the mask hides and differs from the unmasked loss."""
    torch.manual_seed(0)
    model = _head(8, 5)
    x, y = torch.randn(6, 8), (torch.rand(6, 5) > 0.5).float()
    mask = torch.rand(6, 5) > 0.3
    loss_fn = AssocFormerLoss(theta=0.1)
    loss, _ = AssocFormerStep(loss_fn)(model, [x, y, mask], "cpu")
    O, A = model(x, return_assoc=True)
    torch.testing.assert_close(loss, loss_fn(O, y, A, mask)[0])
    flipped = torch.where(mask, y, 1 - y)  # other labels where the mask hides them
    torch.testing.assert_close(AssocFormerStep(loss_fn)(model, [x, flipped, mask], "cpu")[0], loss)
    assert not torch.allclose(loss, AssocFormerStep(loss_fn)(model, [x, y], "cpu")[0])
