"""INDeeD (indeed.txt): pairs (Eqs. 1-2), identical map (Eqs. 3-4), blocks and labels (Eqs. 5, 11),
loss (Eqs. 6-10), data builders, models, analysis, and the chapter's smoke run."""

from __future__ import annotations

import gzip
import itertools
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlic_lib import indeed
from mlic_lib.data import make_ml_mnist
from mlic_lib.data.digits import digit_pool
from mlic_lib.models import SimpleCNN


def _multihot(sets, c=6):
    y = torch.zeros(len(sets), c)
    for i, s in enumerate(sets):
        y[i, list(s)] = 1
    return y


# ------------------------------------------------------------------------------------ pairs
SETS = [{0, 1}, {0, 2}, {3}, {3}, {0, 1}, {4, 5}]


def test_partial_coco_mask_matches_set_definition():
    y = _multihot(SETS)
    mask = indeed.partial_coco_mask(y)
    for a, b in itertools.product(range(len(SETS)), repeat=2):
        sa, sb = SETS[a], SETS[b]
        expect = bool(sa & sb) and bool((sa - sb) | (sb - sa))  # Eq. 1 and Eq. 2
        assert bool(mask[a, b]) == expect, (a, b)
    # hand-checked: {0,1} pairs with {0,2}; identical sets {3},{3} and {0,1},{0,1} do not pair
    assert mask[0, 1] and not mask[2, 3] and not mask[0, 4] and not mask[5].any()


@pytest.mark.parametrize("pairing", indeed.PAIRINGS)
def test_pairs_obey_eqs_1_2_or_fall_back_to_self(pairing):
    y = _multihot(SETS)
    valid = indeed.partial_coco_mask(y)
    for seed in range(20):
        a, b = indeed.partial_coco_pairs(y, pairing, generator=torch.Generator().manual_seed(seed))
        pairs = list(zip(a.tolist(), b.tolist(), strict=True))
        for p, (i, j) in enumerate(pairs):
            if i == j:  # default pair (a, a): only when no valid partner was available
                if pairing == "disjoint":  # pairs are listed in visiting order: every valid partner of i
                    taken = {k for q in pairs[:p] for k in q}  # is in a pair formed before i's turn
                    assert all(k in taken for k in range(len(SETS)) if valid[i, k]), (seed, i)
                else:
                    assert not valid[i].any()
            else:
                assert valid[i, j]
        if pairing == "disjoint":
            flat = [k for i, j in zip(a.tolist(), b.tolist(), strict=True) for k in ({i, j})]
            assert sorted(flat) == list(range(len(SETS))), "every sample in exactly one pair"
        else:
            assert a.tolist() == list(range(len(SETS)))


def test_pairs_default_pair_when_none_exists():
    y = _multihot([{0}, {1}, {2}, {2}])  # no shared label except identical sets -> no partial-coco pair
    for pairing in indeed.PAIRINGS:
        a, b = indeed.partial_coco_pairs(y, pairing)
        assert torch.equal(a, b) and sorted(a.tolist()) == [0, 1, 2, 3]


def test_pairs_are_random_and_reproducible():
    y = _multihot([{0, 1}, {0, 2}, {0, 3}, {0, 4}, {0, 5}, {0, 1, 2}])
    draw = [indeed.partial_coco_pairs(y, "each", torch.Generator().manual_seed(s))[1].tolist() for s in range(10)]
    assert len({tuple(d) for d in draw}) > 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert all(torch.equal(u, v) for u, v in zip(indeed.partial_coco_pairs(y, "disjoint", g1),
                                                 indeed.partial_coco_pairs(y, "disjoint", g2), strict=True))


# ---------------------------------------------------------------------------- map and blocks
def test_identical_map_reference_formulas_and_range():
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.relu(torch.randn(5, 16, generator=g)), torch.relu(torch.randn(5, 16, generator=g))
    p = (fa * fb).numpy()
    l2 = indeed.identical_map(fa, fb, "l2").numpy()
    mm = indeed.identical_map(fa, fb, "minmax").numpy()
    for i in range(5):  # direct per-row formulas of Eq. 3 and Eq. 4
        np.testing.assert_allclose(l2[i], p[i] / np.sqrt((p[i] ** 2).sum()), rtol=1e-5)
        np.testing.assert_allclose(mm[i], (p[i] - p[i].min()) / (p[i].max() - p[i].min()), rtol=1e-5)
    for m in (l2, mm):
        assert m.min() >= 0 and m.max() <= 1 + 1e-6
    assert np.allclose(mm.max(1), 1) and np.allclose(mm.min(1), 0)


def test_identical_map_degenerate_rows_are_finite():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # fp16 rounds the 1e-12 guard to 0
        z = torch.zeros(2, 8, dtype=dtype)
        for norm in indeed.NORMS:
            m = indeed.identical_map(z, z, norm)
            assert m.dtype == dtype and torch.isfinite(m).all() and (m == 0).all(), (dtype, norm)
    big = torch.full((1, 4), 300.0, dtype=torch.float16)  # 300 * 300 overflows fp16's 65504
    big[0, 0] = 100.0
    m = indeed.identical_map(big, big, "l2")
    assert torch.isfinite(m).all() and m[0, 1] > m[0, 0] > 0


def test_identical_map_keeps_float64_and_passes_gradcheck():
    """fp64 features are not narrowed to fp32 (a float64 gradient check of the step would see fp32 rounding)."""
    g = torch.Generator().manual_seed(1)
    fa = torch.rand(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    fb = torch.rand(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    for norm in indeed.NORMS:
        m = indeed.identical_map(fa, fb, norm)
        p = (fa * fb).detach()
        ref = (p / p.norm(dim=1, keepdim=True) if norm == "l2" else
               (p - p.min(1, keepdim=True).values) / (p.max(1, keepdim=True).values - p.min(1, keepdim=True).values))
        assert m.dtype == torch.float64 and torch.allclose(m, ref, rtol=0, atol=1e-14), norm
        assert torch.autograd.gradcheck(lambda a, b, n=norm: indeed.identical_map(a, b, n), (fa, fb)), norm


def test_decompose_blocks_and_labels():
    fa, fb = torch.rand(3, 8), torch.rand(3, 8)
    out = indeed.decompose(fa, fb, "minmax")
    m = out["m"]
    torch.testing.assert_close(out["f_ab"], m * fa)
    torch.testing.assert_close(out["f_ba"], m * fb)
    torch.testing.assert_close(out["f_a_minus_b"], (1 - m) * fa)
    torch.testing.assert_close(out["f_b_minus_a"], (1 - m) * fb)
    torch.testing.assert_close(out["f_ab"] + out["f_a_minus_b"], fa)  # the blocks split f_a
    # detach_map: the same blocks, but no gradient reaches the features through m (only through the products)
    for detach in (False, True):
        a, b = fa.clone().requires_grad_(True), fb.clone().requires_grad_(True)
        blocks = indeed.decompose(a, b, "minmax", detach_map=detach)
        torch.testing.assert_close(blocks["f_ab"], out["f_ab"])
        blocks["f_ab"].sum().backward()
        through_product = blocks["m"].detach()  # d(m * f_a) / d f_a with m held constant
        assert torch.allclose(a.grad, through_product) == detach
        assert (b.grad is None or not b.grad.any()) == detach  # f_b enters f_ab only through m
    ya, yb = _multihot([{0, 1, 2}, {4}, {1}]), _multihot([{1, 2, 3}, {4}, {0, 5}])
    lab = indeed.decomposed_labels(ya, yb)
    assert torch.equal(lab["y_ab"], _multihot([{1, 2}, {4}, set()])) and torch.equal(lab["y_ba"], lab["y_ab"])
    assert torch.equal(lab["y_a_minus_b"], _multihot([{0}, set(), {1}]))
    assert torch.equal(lab["y_b_minus_a"], _multihot([{3}, set(), {0, 5}]))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="norm must be one of"):
        indeed.identical_map(torch.rand(2, 3), torch.rand(2, 3), "l1")
    with pytest.raises(ValueError, match="feature rows"):
        indeed.identical_map(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="multi-hot"):
        indeed.partial_coco_mask(torch.zeros(4))
    with pytest.raises(ValueError, match="pairing must be"):
        indeed.partial_coco_pairs(torch.zeros(2, 3), "random")
    with pytest.raises(ValueError, match="blocks must be"):
        indeed.INDeeDStep(blocks="neither")
    with pytest.raises(ValueError, match="lam"):
        indeed.INDeeDStep(lam=-1)
    with pytest.raises(ValueError, match="forward_features"):
        indeed.INDeeDStep()(torch.nn.Linear(3, 2), [torch.rand(2, 3), torch.zeros(2, 2)], torch.device("cpu"))
    with pytest.raises(ValueError, match="single-label"):
        indeed.confidence_map(np.random.rand(3, 4), np.ones((3, 4)))
    with pytest.raises(ValueError, match="model.name"):
        indeed.build_indeed_model({"name": "resnet"})
    with pytest.raises(ValueError, match="downsample factor"):
        indeed.downsample(np.zeros((1, 1, 84, 84), np.uint8), 5)
    with pytest.raises(ValueError, match="method kind"):
        indeed.method_step({"kind": "mixup"})


# ----------------------------------------------------------------------------------- the loss
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(8, 6)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.forward_features(x))


def _reference_loss(model, x, y, a, b, norm, lam, blocks):
    """Eqs. 3-11 written out pair by pair."""
    f = model.forward_features(x)
    total = 0.0
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        fa, fb, ya, yb = f[i], f[j], y[i], y[j]
        p = fa * fb
        m = p / p.norm() if norm == "l2" else (p - p.min()) / (p.max() - p.min())
        bce = lambda feat, lab: F.binary_cross_entropy_with_logits(model.classifier(feat), lab)  # noqa: E731
        lo = bce(fa, ya) + bce(fb, yb)
        li = bce(m * fa, ya * yb) + bce(m * fb, ya * yb)
        ls = bce((1 - m) * fa, ya * (1 - yb)) + bce((1 - m) * fb, yb * (1 - ya))
        li = li if blocks in ("both", "identical") else 0.0
        ls = ls if blocks in ("both", "disparate") else 0.0
        total = total + lo + lam * (li + ls)
    return total / len(a)


@pytest.mark.parametrize("norm,blocks,pairing", [("l2", "both", "disjoint"), ("minmax", "both", "each"),
                                                 ("l2", "identical", "disjoint"), ("minmax", "disparate", "each")])
def test_step_matches_reference_and_has_gradients(norm, blocks, pairing):
    model = _Tiny()
    x = torch.randn(8, 3, 4)
    y = _multihot([{0, 1}, {0, 2}, {1, 2}, {3}, {3, 4}, {4, 5}, {0, 5}, {2}])
    step = indeed.INDeeDStep(norm=norm, lam=0.7, blocks=blocks, pairing=pairing)
    torch.manual_seed(5)
    loss, logs = step(model, [x, y], torch.device("cpu"))
    torch.manual_seed(5)
    a, b = indeed.partial_coco_pairs(y, pairing)
    ref = _reference_loss(model, x, y, a, b, norm, 0.7, blocks)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert {"L_O", "L_I", "L_S", "partial_coco_fraction"} <= set(logs)
    if blocks == "identical":
        assert logs["L_S"] == 0
    if blocks == "disparate":
        assert logs["L_I"] == 0


@pytest.mark.parametrize("norm,blocks", [("l2", "both"), ("minmax", "both"), ("minmax", "identical"),
                                         ("l2", "disparate")])
def test_step_gradients_are_the_reference_losss_gradients(norm, blocks):
    """Every parameter's gradient equals that of Eqs. 3-11 written out: L_O trains the features and the shared
    classifier, L_I / L_S train both too, and the gradient flows through the identical map m (a detached map or
    feature, or a classifier frozen for one term, gives the same loss value but another gradient)."""
    model = _Tiny()
    x = torch.randn(8, 3, 4)
    y = _multihot([{0, 1}, {0, 2}, {1, 2}, {3}, {3, 4}, {4, 5}, {0, 5}, {2}])
    step = indeed.method_step({"kind": "indeed", "norm": norm, "blocks": blocks}, lam=0.7)
    assert step.detach_map is False  # the paper's Eqs.: m is part of the graph
    torch.manual_seed(5)
    loss, _ = step(model, [x, y], torch.device("cpu"))
    got = torch.autograd.grad(loss, list(model.parameters()))
    torch.manual_seed(5)
    a, b = indeed.partial_coco_pairs(y, "disjoint")
    want = torch.autograd.grad(_reference_loss(model, x, y, a, b, norm, 0.7, blocks), list(model.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pairing", ["disjoint", "each"])
def test_pairs_drawn_on_the_host_give_the_same_draws_and_loss_as_pairs_drawn_in_the_step(pairing):
    model = _Tiny()
    x = torch.randn(8, 3, 4)
    y = _multihot([{0, 1}, {0, 2}, {1, 2}, {3}, {3, 4}, {4, 5}, {0, 5}, {2}])
    step = indeed.INDeeDStep(lam=0.7, pairing=pairing)
    torch.manual_seed(3)
    loss, logs = step(model, [x, y], torch.device("cpu"))
    after_step = torch.rand(1)  # the global RNG must have advanced by the same draws
    torch.manual_seed(3)
    batch = step.host_batch([x, y])
    torch.testing.assert_close(torch.rand(1), after_step)
    assert len(batch) == 3 and batch[2].ndim == 2 and batch[2].shape[0] == 2
    loss_host, logs_host = step(model, batch, torch.device("cpu"))
    torch.testing.assert_close(loss_host, loss)
    assert logs_host["partial_coco_fraction"] == logs["partial_coco_fraction"]


def test_bad_pairs_and_batches_name_the_problem():
    model, x, y = _Tiny(), torch.randn(4, 3, 4), _multihot([{0, 1}, {0}, {1}, {2}])
    step = indeed.INDeeDStep()
    with pytest.raises(ValueError, match=r"\(2, P\) index tensor"):
        step(model, [x, y, torch.zeros(4, dtype=torch.long)], torch.device("cpu"))
    with pytest.raises(ValueError, match="no label mask"):
        step(model, [x, y, torch.zeros(2, 4, dtype=torch.long), torch.ones(4)], torch.device("cpu"))


def test_default_pairs_can_be_left_out_of_the_disparate_loss():
    """``default_pairs_disparate=False``: L_S averages over the partial-coco pairs only (written out pair by pair);
    L_O and L_I still count every pair; a batch of default pairs only has no L_S."""
    model = _Tiny()
    x = torch.randn(6, 3, 4)
    y = _multihot([{0, 1}, {0, 2}, {3}, {4}, {5}, {1, 2}])  # {3}, {4}, {5} share a class with nothing: default pairs
    pairs = torch.tensor([[0, 2, 3, 4, 5], [1, 2, 3, 4, 5]])  # (0, 1) is partial-coco; the others are (a, a)
    full = indeed.INDeeDStep(lam=1.0).losses(model, x, y, pairs)
    kept = indeed.INDeeDStep(lam=1.0, default_pairs_disparate=False).losses(model, x, y, pairs)
    f = model.forward_features(x)
    m = indeed.identical_map(f[:1], f[1:2], "l2")[0]
    ref = (F.binary_cross_entropy_with_logits(model.classifier((1 - m) * f[0]), y[0] * (1 - y[1]))
           + F.binary_cross_entropy_with_logits(model.classifier((1 - m) * f[1]), y[1] * (1 - y[0])))
    torch.testing.assert_close(kept["L_S"], ref)
    assert not torch.allclose(full["L_S"], ref)
    torch.testing.assert_close(kept["L_O"], full["L_O"])
    torch.testing.assert_close(kept["L_I"], full["L_I"])
    only_default = indeed.INDeeDStep(default_pairs_disparate=False).losses(model, x, y, torch.tensor([[2, 3], [2, 3]]))
    assert only_default["L_S"] == 0
    step = indeed.method_step({"kind": "indeed", "default_pairs_disparate": False})
    assert step.default_pairs_disparate is False and indeed.method_step({"kind": "indeed"}).default_pairs_disparate


def test_lambda_zero_is_the_pairwise_baseline():
    model = _Tiny()
    x, y = torch.randn(6, 3, 4), _multihot([{0, 1}, {0, 2}, {1}, {3}, {3, 4}, {5}])
    torch.manual_seed(0)
    loss, _ = indeed.INDeeDStep(lam=0.0, pairing="each")(model, [x, y], torch.device("cpu"))
    logits = model(x)
    torch.manual_seed(0)
    a, b = indeed.partial_coco_pairs(y, "each")
    ref = F.binary_cross_entropy_with_logits(logits[a], y[a]) + F.binary_cross_entropy_with_logits(logits[b], y[b])
    torch.testing.assert_close(loss, ref)


def test_a_multilabelnets_features_go_through_its_dropout_as_its_own_head_does():
    """INDeeD's logits are the model's (Eq. 7): on a MultiLabelNet with dropout they skipped the dropout, so at
    lambda 0 INDeeD trained another network than the baseline it is compared with."""
    from mlic_lib.models.backbones import MultiLabelNet

    torch.manual_seed(0)
    model = MultiLabelNet(torch.nn.Conv2d(3, 8, 3), 8, 5, dropout=0.5).train()
    x = torch.randn(4, 3, 6, 6)
    torch.manual_seed(1)
    ours = model.classifier(indeed._flat_features(model, x))
    torch.manual_seed(1)
    torch.testing.assert_close(ours, model(x))
    assert not torch.allclose(ours, model.eval()(x))  # the dropout was on


def test_step_with_simple_cnn_and_engine_is_deterministic(tmp_path, monkeypatch):
    from mlic_lib.profiles import load_profile

    s = load_profile("indeed", "smoke", {"data.n_train": 32, "data.n_test": 20})
    data = indeed.indeed_data(s["data"], 3)
    a = indeed.train_indeed_model(s, data, indeed.MAIN_METHODS["INDeeD-min-max"], seed=0)
    s2 = load_profile("indeed", "smoke", {"data.n_train": 32, "data.n_test": 20, "train.log_every": 7})
    with monkeypatch.context() as m:  # log_every is not part of the key: train b in another cache
        m.setenv("MLIC_CACHE", str(tmp_path / "other-cache"))
        b = indeed.train_indeed_model(s2, indeed.indeed_data(s2["data"], 3), indeed.MAIN_METHODS["INDeeD-min-max"], 0)
    assert not a.cached and not b.cached
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    again = indeed.train_indeed_model(s, data, indeed.MAIN_METHODS["INDeeD-min-max"], seed=0)
    # cached unless another process edited the library in between (the cache key covers its source)
    assert again.final["mAP"] == a.final["mAP"]
    assert 0 < a.history[0]["partial_coco_fraction"] <= 1


def test_a_runs_setup_follows_the_profiles_lambda_pairing_and_the_seed(tmp_path, monkeypatch):
    """``_run_setup``: the step takes the profile's lambda and pairing, the training config the run's seed (the
    loader order and the pair draws, not only the initial weights), and the cache folder changes with lambda
    (else the lambda swap and sweep would load the runs they compare against)."""
    from mlic_lib.profiles import load_profile

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    spec = indeed.MAIN_METHODS["INDeeD-min-max"]
    dirs = set()
    for lam, pairing, seed in ((0.3, "disjoint", 0), (0.7, "disjoint", 0), (0.3, "each", 0), (0.3, "disjoint", 4)):
        s = load_profile("indeed", "smoke", {"data.n_train": 16, "data.n_test": 8, "indeed.lam": lam,
                                             "indeed.pairing": pairing})
        step, cfg, run_dir = indeed._run_setup(s, indeed.indeed_data(s["data"], 2), spec, seed)
        assert (step.lam, step.pairing, cfg.seed) == (lam, pairing, seed)
        dirs.add(run_dir)
    assert len(dirs) == 4
    # the key holds what the run's step reads: the other variant's lambda and the pool mode leave a run alone, and the
    # baseline (no step) is the same run under any lambda or pairing
    data = indeed.indeed_data(s["data"], 2)
    runs = {}
    for name, over in (("a", {"indeed.lam": {"minmax": 0.3, "l2": 1.0}}),
                       ("b", {"indeed.lam": {"minmax": 0.3, "l2": 0.1}}),
                       ("c", {"indeed.lam": 0.7, "indeed.pairing": "each", "indeed.parallel": "sequential"})):
        s = load_profile("indeed", "smoke", {"data.n_train": 16, "data.n_test": 8, **over})
        runs[name] = {m: indeed._run_setup(s, data, indeed.MAIN_METHODS[m], 0)[2] for m in indeed.MAIN_METHODS}
    assert runs["a"]["INDeeD-min-max"] == runs["b"]["INDeeD-min-max"] != runs["c"]["INDeeD-min-max"]
    assert runs["a"]["INDeeD-L2"] != runs["b"]["INDeeD-L2"]
    assert runs["a"]["Baseline"] == runs["b"]["Baseline"] == runs["c"]["Baseline"]


def test_cache_key_tells_data_draws_apart():
    from mlic_lib.profiles import load_profile

    s = load_profile("indeed", "smoke", {"data.n_train": 32, "data.n_test": 20})
    d0, d1 = indeed.indeed_data(s["data"], 3), indeed.indeed_data(s["data"], 3, data_seed=1)
    assert d0.fingerprint() == indeed.indeed_data(s["data"], 3).fingerprint() != d1.fingerprint()
    spec = indeed.MAIN_METHODS["Baseline"]
    a = indeed.train_indeed_model(s, d0, spec, seed=0)
    b = indeed.train_indeed_model(s, d1, spec, seed=0)
    assert not b.cached and a.run_dir != b.run_dir


@pytest.mark.slow
def test_process_pool_runs_equal_sequential_runs(tmp_path, monkeypatch):
    from mlic_lib.profiles import load_profile

    s = load_profile("indeed", "smoke", {"data.n_train": 32, "data.n_test": 20})
    methods = {k: indeed.MAIN_METHODS[k] for k in ("Baseline", "INDeeD-min-max")}
    seq = indeed.run_methods(s, methods, [2], [0, 1], parallel="sequential", progress=False)
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "pool-cache"))
    par = indeed.run_methods({**s, "indeed": {**s["indeed"], "parallel": "process"}}, methods, [2], [0, 1],
                             progress=False)
    assert not any(r["cached"] for r in par)  # trained by the workers in this call, loaded from their folders
    assert not any(r["cached"] for r in seq)
    again = indeed.run_methods({**s, "indeed": {**s["indeed"], "parallel": "process"}}, methods, [2], [0, 1],
                               progress=False)
    assert all(r["cached"] for r in again)  # the second call finds every run in the cache
    # a pool task reports what its own fit found: trained the first time, cached the second
    data2 = indeed.indeed_data(s["data"], 2)
    first, second = (indeed._pool_task(s, data2, methods["Baseline"], 5) for _ in range(2))
    assert first[0] == second[0] and (first[1], second[1]) == (False, True)
    for a, b in zip(seq, par, strict=True):
        assert (a["method"], a["N"], a["seed"]) == (b["method"], b["N"], b["seed"])
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)  # 1 vs 2 threads: float order only
        assert len(b["history"]) == s["train"]["epochs"]  # the per-epoch logs come back with the pooled runs
        np.testing.assert_allclose([h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]], atol=1e-4)


def test_lambda_per_normalisation():
    lam = {"minmax": 0.1, "l2": 1.0}
    assert indeed.lambda_for(lam, indeed.MAIN_METHODS["INDeeD-min-max"]) == 0.1
    assert indeed.lambda_for(lam, indeed.ABLATION_METHODS["Disparate, L2"]) == 1.0
    assert indeed.lambda_for(0.3, indeed.MAIN_METHODS["INDeeD-L2"]) == 0.3
    assert indeed.lambda_for({"minmax": 0.1}, indeed.MAIN_METHODS["Baseline"]) == 0.0
    with pytest.raises(ValueError, match="no value for norm 'l2'"):
        indeed.lambda_for({"minmax": 0.1}, indeed.MAIN_METHODS["INDeeD-L2"])
    step = indeed.method_step(indeed.MAIN_METHODS["INDeeD-min-max"], lam=indeed.lambda_for(lam, {"norm": "minmax"}))
    assert step.lam == 0.1


def test_bad_parallel_mode():
    from mlic_lib.profiles import load_profile

    s = load_profile("indeed", "smoke", {})
    with pytest.raises(ValueError, match="indeed.parallel must be one of"):
        indeed.run_methods(s, indeed.MAIN_METHODS, [2], [0], parallel="gpu")


# --------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_ml_mnist_canvas_has_n_distinct_digits_in_distinct_cells(n):
    cs = make_ml_mnist(40, n, seed=n)
    assert cs.images.shape == (40, 1, 84, 84) and cs.images.dtype == np.uint8
    for img, t, cells in zip(cs.images, cs.targets, cs.cells, strict=True):
        occupied = cells[cells >= 0]
        assert len(occupied) == n == len(set(occupied.tolist())) == int(t.sum())
        assert set(np.flatnonzero(t)) == set(occupied.tolist())
        for k in range(9):  # pixels only in occupied cells
            r, q = divmod(k, 3)
            block = img[0, 28 * r:28 * r + 28, 28 * q:28 * q + 28]
            assert (block.any()) == (cells[k] >= 0)
            if cells[k] >= 0:  # the cell shows a training digit of the class its label says (the CAM's box)
                assert any(np.array_equal(block, POOL[0][i]) for i in np.flatnonzero(POOL[1] == cells[k]))


POOL = digit_pool("train")


def test_held_out_digit_canvases_draw_the_test_digits_of_the_profiles_source():
    """Fig. 5's co-occurred canvas: digits of the chapter's test pool (never the training digits), pooled like
    the chapter's canvases."""
    cs = indeed.held_out_digit_canvases({"source": "embedded", "downsample": 2}, 3, 3, seed=7)
    assert cs.images.shape == (3, 1, 42, 42) and (cs.targets.sum(1) == 3).all()
    full = indeed.held_out_digit_canvases({"source": "embedded"}, 3, 3, seed=7)
    test_pool = digit_pool("test")
    for img, cells in zip(full.images, full.cells, strict=True):
        for k in np.flatnonzero(cells >= 0):
            r, q = divmod(int(k), 3)
            block = img[0, 28 * r:28 * r + 28, 28 * q:28 * q + 28]
            assert any(np.array_equal(block, test_pool[0][i]) for i in np.flatnonzero(test_pool[1] == cells[k]))
    np.testing.assert_array_equal(cs.images, indeed.downsample(full.images, 2))
    with pytest.raises(ValueError, match="MNIST digits"):
        indeed.held_out_digit_canvases({"source": "cifar10"}, 1, 2)


def test_compose_canvases_cifar_shape_and_cells():
    rng = np.random.default_rng(0)
    pool = rng.integers(1, 255, (50, 3, 32, 32), dtype=np.uint8), np.arange(50) % 10
    cs = indeed.make_ml_cifar10(12, 5, seed=1, pool=pool)
    assert cs.images.shape == (12, 3, 96, 96)
    for img, cells in zip(cs.images, cs.cells, strict=True):
        assert (cells >= 0).sum() == 5 and len(set(cells[cells >= 0].tolist())) == 5
        for k in range(9):
            r, q = divmod(k, 3)
            assert img[:, 32 * r:32 * r + 32, 32 * q:32 * q + 32].any() == (cells[k] >= 0)
            if cells[k] >= 0:  # the pasted image is one of the pool's images of that class
                patch = img[:, 32 * r:32 * r + 32, 32 * q:32 * q + 32]
                assert any(np.array_equal(patch, pool[0][i]) for i in np.flatnonzero(pool[1] == cells[k]))
    a, b = indeed.make_ml_cifar10(4, 2, seed=3, pool=pool), indeed.make_ml_cifar10(4, 2, seed=3, pool=pool)
    assert np.array_equal(a.images, b.images)


def test_load_mnist_and_cifar_from_files(tmp_path):
    imgs = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    (tmp_path / "mnist").mkdir()
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / "mnist" / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">HBBIII", 0, 8, 3, 3, 28, 28) + imgs.tobytes())
        with open(tmp_path / "mnist" / f"{prefix}-labels-idx1-ubyte", "wb") as fh:
            fh.write(struct.pack(">HBBI", 0, 8, 1, 3) + bytes([7, 1, 2]))
    x, y = indeed.load_mnist("test", root=tmp_path)
    assert np.array_equal(x, imgs) and y.tolist() == [7, 1, 2]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.random.default_rng(0).integers(0, 255, (4, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": data, b"labels": [0, 1, 2, 3]}, fh)
    cx, cy = indeed.load_cifar10("test", root=tmp_path)
    assert cx.shape == (4, 3, 32, 32) and np.array_equal(cx.reshape(4, -1), data) and cy.tolist() == [0, 1, 2, 3]
    from mlic_lib.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="mlic data prepare cifar10"):
        indeed.load_cifar10("train", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="MNIST"):
        indeed.load_mnist("train", root=tmp_path / "nowhere")


def test_indeed_data_single_label_test_and_downsample():
    d = indeed.indeed_data({"n_train": 20, "n_test": 10, "downsample": 2}, 5)
    assert d.train.images.shape == (20, 1, 42, 42) and (d.train.targets.sum(1) == 5).all()
    assert (d.test.targets.sum(1) == 1).all() and d.name == "ML-MNIST-5"
    x = np.zeros((1, 1, 4, 4), np.uint8)
    x[0, 0, :2, :2] = 200
    np.testing.assert_array_equal(indeed.downsample(x, 2)[0, 0], [[200, 0], [0, 0]])


def _as_set(images) -> set[bytes]:
    """A stack of images as a set of their bytes (to compare pools image by image)."""
    return {x.tobytes() for x in images}


def _cell_digits(canvases) -> set[bytes]:
    """The 28x28 digit images in the occupied cells of ML-MNIST canvases, as bytes."""
    blocks = canvases.images[:, 0].reshape(len(canvases), 3, 28, 3, 28).transpose(0, 1, 3, 2, 4).reshape(-1, 9, 28, 28)
    return {blocks[i, j].tobytes() for i, j in zip(*np.nonzero(canvases.cells >= 0), strict=True)}


def test_validation_data_holds_out_training_digits_and_never_draws_a_test_digit():
    from mlic_lib.data.digits import digit_pool

    (fit, fit_y), (val, val_y) = indeed.validation_pools()
    train, test = digit_pool("train"), digit_pool("test")
    assert len(fit) + len(val) == len(train[0]) and not _as_set(fit) & _as_set(val)
    assert _as_set(val) <= _as_set(train[0]) and not _as_set(val) & _as_set(test[0])
    assert np.bincount(val_y, minlength=10).min() > 0
    assert abs(len(val) / len(train[0]) - indeed.VALIDATION_FRACTION) < 0.01
    d = indeed.indeed_data({"n_train": 40, "n_test": 30}, 3, validation=True)
    assert _cell_digits(d.test) <= _as_set(val) and _cell_digits(d.train) <= _as_set(fit)
    assert (d.test.targets.sum(1) == 1).all()
    plain = indeed.indeed_data({"n_train": 40, "n_test": 30}, 3)
    assert _cell_digits(plain.test) <= _as_set(test[0]) and plain.fingerprint() != d.fingerprint()


def test_lambda_sweep_trains_and_scores_on_the_validation_data(monkeypatch):
    seen = []

    def fake_run_methods(settings, methods, n_labels, seeds, datasets, **kw):
        seen.append(datasets)
        return [{"method": m, "N": n, "seed": s, "mAP": 0.5} for m in methods for n in n_labels for s in seeds]

    monkeypatch.setattr(indeed, "run_methods", fake_run_methods)
    settings = {"data": {"n_train": 30, "n_test": 20}, "indeed": {}}
    recs = indeed.lambda_sweep(settings, [0.1, 1.0], [2], [0])
    assert sorted({r["lam"] for r in recs if r["lam"] is not None}) == [0.1, 1.0] and len(seen) == 3
    (fit, _), (val, _) = indeed.validation_pools()
    for datasets in seen:
        assert _cell_digits(datasets[2].test) <= _as_set(val) and _cell_digits(datasets[2].train) <= _as_set(fit)



def test_choose_lambda_takes_the_best_mean_over_n_and_seeds_and_counts_the_seeds_it_wins():
    recs = [{"method": "Baseline", "lam": None, "N": n, "seed": s, "mAP": 0.5} for n in (2, 7) for s in (0, 1)]
    # lam 1.0: 0.80 and 0.60 per seed (mean 0.70); lam 0.1: 0.66 and 0.66 (mean 0.66); one N carries the gap
    vals = {(1.0, 0): (0.8, 0.8), (1.0, 1): (0.9, 0.3), (0.1, 0): (0.66, 0.66), (0.1, 1): (0.66, 0.66)}
    recs += [{"method": "INDeeD-L2", "lam": lam, "N": n, "seed": s, "mAP": v[i]}
             for (lam, s), v in vals.items() for i, n in enumerate((2, 7))]
    table = indeed.lambda_sweep_table(recs)
    assert table.loc[("INDeeD-L2", 1.0), 7] == pytest.approx(55.0) and table.loc[("Baseline", "-"), 2] == 50.0
    assert table.loc[("INDeeD-L2", 1.0), "mean over N"] == pytest.approx(70.0)
    assert table.loc[("INDeeD-L2", 1.0), "std over seeds"] == pytest.approx(np.std([80.0, 60.0], ddof=1))
    row = indeed.choose_lambda(recs).loc["INDeeD-L2"]
    assert row["lambda"] == 1.0 and row["runner-up"] == 0.1 and row["seeds won"] == "1 of 2"
    assert row["margin (points)"] == pytest.approx(4.0) and row["smallest seed margin"] == pytest.approx(-6.0)
    with pytest.raises(ValueError, match="one lambda"):
        indeed.choose_lambda([r for r in recs if r["lam"] != 0.1])


def test_the_profiles_lambdas_are_the_committed_sweeps_choice():
    """The default (and smoke) profile's indeed.lam is what choose_lambda gives on the committed record of the
    sweep that set it (mlic_lib/profiles/records): a new sweep without a profile change, or the reverse, fails."""
    from mlic_lib.profiles import load_profile

    rec = indeed.load_lambda_sweep_record()
    assert rec["call"]["profile"] == "indeed/default" and len(rec["call"]["seeds"]) >= 2
    n_runs = len(rec["call"]["n_labels"]) * len(rec["call"]["seeds"])
    assert len(rec["records"]) == n_runs * (1 + 2 * len(rec["call"]["lams"]))  # baseline once, two variants per lam
    chosen = indeed.choose_lambda(rec["records"])["lambda"]
    for profile in ("default", "smoke"):
        lam = load_profile("indeed", profile, {})["indeed"]["lam"]
        assert {indeed.MAIN_METHODS[m]["norm"]: v for m, v in chosen.items()} == lam, profile


def test_the_committed_budget_trace_is_the_default_recipe_and_its_table_is_the_mean_curve():
    """The budget check the chapter's introduction reports: the default profile's recipe on validation data, with
    the profile's lambdas; the table's columns are the mean curve over N and seeds read at those epochs."""
    from mlic_lib.profiles import load_profile

    rec = indeed.load_budget_trace_record()
    call, records = rec["call"], rec["records"]
    assert call["profile"] == "indeed/default" and call["epochs"] > load_profile("indeed", "default")["train"]["epochs"]
    assert len(records) == len(call["n_labels"]) * len(call["seeds"]) * len(indeed.MAIN_METHODS)
    assert {len(r["val_mAP"]) for r in records} == {call["epochs"]}
    lam = load_profile("indeed", "default")["indeed"]["lam"]
    for r in records:
        spec = indeed.MAIN_METHODS[r["method"]]
        assert r["lam"] == (None if spec["kind"] == "baseline" else lam[spec["norm"]])
    table = indeed.budget_trace_table(records, at=[1, call["epochs"]])
    curves = indeed.budget_trace_curves(records)
    for method, row in table.iterrows():
        curve = 100 * np.mean([r["val_mAP"] for r in records if r["method"] == method], axis=0)
        np.testing.assert_allclose(curves[method], curve)
        assert row["epoch 1"] == pytest.approx(curve[0]) and row["best"] == pytest.approx(curve.max())
        first = int(row["first within 1 point of its best"])
        assert curve[first - 1] >= curve.max() - 1 > curve[: first - 1].max(initial=-np.inf)


def test_budget_trace_table_bad_input():
    recs = [{"method": "a", "val_mAP": [0.1, 0.2]}, {"method": "b", "val_mAP": [0.1]}]
    with pytest.raises(ValueError, match="same number of epochs"):
        indeed.budget_trace_table(recs)
    with pytest.raises(ValueError, match=r"in 1\.\.2"):
        indeed.budget_trace_table(recs[:1], at=[3])
    with pytest.raises(ValueError, match="no budget-trace records"):
        indeed.budget_trace_table([])
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        indeed.budget_trace({"train": {}, "data": {}}, 0, [2], [0])


def test_a_lambda_sweep_record_without_its_parts_is_a_clear_error(tmp_path):
    bad = tmp_path / "sweep.json"
    bad.write_text('{"records": []}')
    with pytest.raises(ValueError, match=r"not a lambda-sweep record: it lacks \['call', 'ran'\]"):
        indeed.load_lambda_sweep_record(bad)


# ------------------------------------------------------------------------------------- models
def test_models_features_classifier_cam_layer():
    specs = [({"name": "simple_cnn", "widths": [4, 8, 8], "hidden": 16}, 1, 42),
             ({"name": "vgg16", "width": 0.0625, "hidden": 32}, 3, 96)]
    for spec, chans, side in specs:
        model = indeed.build_indeed_model(spec, 10, chans, side)
        assert isinstance(model, SimpleCNN if chans == 1 else indeed.VGG16Net)
        x = torch.randn(2, chans, side, side)
        f = model.forward_features(x)
        assert f.shape == (2, model.num_features) and (f >= 0).all()
        assert model(x).shape == (2, 10)
        layers = list(model.conv if chans == 1 else model.features)
        last_conv = max(k for k, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d))
        # the ReLU right after the last convolution: Grad-CAM weighs its rectified maps
        assert model.cam_layer is layers[last_conv + 1] and isinstance(model.cam_layer, torch.nn.ReLU)
    cnn = SimpleCNN(10)  # the paper's simple CNN: 3 convolutional and 2 fully connected layers
    assert sum(isinstance(m, torch.nn.Conv2d) for m in cnn.modules()) == 3
    assert sum(isinstance(m, torch.nn.Linear) for m in cnn.modules()) == 2
    vgg = indeed.VGG16Net(width=0.0625)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in vgg.modules()) == 13
    assert sum(isinstance(m, torch.nn.Linear) for m in vgg.modules()) == 3
    for bn in (False, True):  # every parameter learns; batch_norm adds one BatchNorm2d per convolution
        torch.manual_seed(0)
        net = indeed.VGG16Net(num_classes=10, width=0.0625, hidden=32, batch_norm=bn)
        net(torch.randn(4, 3, 96, 96)).pow(2).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == (13 if bn else 0)


# ----------------------------------------------------------------------------------- analysis
def test_confidence_map_and_diagonal_dominance():
    targets = np.eye(3)[[0, 0, 1, 2]]
    scores = np.array([[.8, .1, .1], [.6, .3, .1], [.2, .6, .2], [.1, .1, .8]])
    cm = indeed.confidence_map(scores, targets)
    np.testing.assert_allclose(cm[0], [.7, .2, .1])
    np.testing.assert_allclose(indeed.diagonal_dominance(cm), np.mean([.7, .6, .8]))
    assert indeed.diagonal_dominance(np.eye(4)) == 1.0
    assert indeed.diagonal_dominance(np.full((4, 4), .5)) == pytest.approx(0.25)
    assert indeed.cell_boxes([-1, 3, -1, -1, -1, -1, -1, -1, 7], cell=14) == {3: (14, 0, 28, 14), 7: (28, 28, 42, 42)}


def test_confidence_map_leaves_an_absent_class_out():
    """A class with no test instance has a NaN row (not zeros), and the diagonal dominance skips it."""
    t = np.eye(3)[[0, 0, 2]]
    s = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.1, 0.2, 0.7]])
    cm = indeed.confidence_map(s, t)
    assert np.isnan(cm[1]).all() and np.allclose(cm[0], [0.7, 0.15, 0.15]) and np.allclose(cm[2], s[2])
    assert indeed.diagonal_dominance(cm) == pytest.approx((0.7 / 1.0 + 0.7 / 1.0) / 2)


def test_plateau_exit_epoch():
    losses = [0.70, 0.66, 0.62, 0.50, 0.30]
    assert indeed.plateau_exit_epoch(losses, 0.7) == 3  # first loss below 0.9 * 0.7 = 0.63
    assert indeed.plateau_exit_epoch(np.array(losses), 0.7, frac=1.0) == 2  # 0.66 < 0.70
    assert indeed.plateau_exit_epoch(losses, 0.8) == 1  # below from the first epoch (0.70 < 0.72)
    assert indeed.plateau_exit_epoch([0.7, 0.69, float("nan")], 0.7) is None  # never
    assert indeed.plateau_exit_epoch([], 0.7) is None
    assert indeed.plateau_exit_epoch([0.63, 0.62], 0.7) == 2  # strictly below
    assert isinstance(indeed.plateau_exit_epoch(torch.tensor([0.9, 0.1]), 0.5), int)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="frac must be in"):
            indeed.plateau_exit_epoch(losses, 0.7, frac=bad)
    with pytest.raises(ValueError, match="1-D"):
        indeed.plateau_exit_epoch([[0.5, 0.4]], 0.7)
    with pytest.raises(ValueError, match="floor"):
        indeed.plateau_exit_epoch(losses, float("inf"))


def test_loss_on_originals_halves_l_o_of_indeed_runs_only():
    base = {"method": "Baseline", "history": [{"loss": 0.7, "lr": 1e-3}, {"loss": 0.5, "lr": 1e-3}]}
    ind = {"method": "INDeeD-L2", "history": [{"loss": 2.0, "L_O": 1.4, "L_I": 0.3, "L_S": 0.3},
                                             {"loss": 1.5, "L_O": 1.0, "L_I": 0.2, "L_S": 0.3}]}
    np.testing.assert_allclose(indeed.loss_on_originals(base), [0.7, 0.5])
    np.testing.assert_allclose(indeed.loss_on_originals(ind), [0.7, 0.5])  # Eq. 7 sums the pair's two BCEs
    with pytest.raises(ValueError, match="history is empty"):
        indeed.loss_on_originals({"history": []})


def test_l_o_over_two_is_the_per_canvas_bce_under_disjoint_pairs():
    """With every canvas in one pair, L_O / 2 (what loss_on_originals reads) is the baseline's per-canvas BCE."""
    model = _Tiny()
    x = torch.randn(6, 3, 4)
    y = _multihot(SETS)
    pairs = torch.tensor([[0, 2, 5], [1, 3, 4]])
    _, logs = indeed.INDeeDStep("l2")(model, [x, y, pairs], torch.device("cpu"))
    ref = F.binary_cross_entropy_with_logits(model(x), y).detach()
    assert float(logs["L_O"]) / 2 == pytest.approx(ref.item(), rel=1e-5)
    # default pairs (2, 2) and (3, 3): each of those canvases weighs twice as much as a paired one
    _, logs = indeed.INDeeDStep("l2")(model, [x, y, torch.tensor([[0, 5, 2, 3], [1, 4, 2, 3]])], torch.device("cpu"))
    per_canvas = F.binary_cross_entropy_with_logits(model(x), y, reduction="none").mean(1).detach()
    weights = torch.tensor([1.0, 1.0, 2.0, 2.0, 1.0, 1.0])
    assert float(logs["L_O"]) / 2 == pytest.approx(float((weights * per_canvas).sum() / weights.sum()), rel=1e-5)


def test_load_cifar10_binary_layout(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.array([3, 7], dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
    np.concatenate([labels[:, None], pixels], 1).tofile(folder / "test_batch.bin")
    x, y = indeed.load_cifar10("test", root=tmp_path)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 7]
    np.testing.assert_array_equal(x[1].reshape(-1), pixels[1])
    (folder / "data_batch_1.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a CIFAR-10 binary batch"):
        indeed.load_cifar10("train", root=tmp_path)


def _disjoint_pairs_reference(targets, generator):
    """The greedy disjoint pairing written directly with torch ops, one candidate scan per sample."""
    valid = indeed.partial_coco_mask(targets)
    n = valid.shape[0]
    order = torch.randperm(n, generator=generator).tolist()
    noise = torch.rand(n, n, generator=generator)
    free = torch.ones(n, dtype=torch.bool)
    a_idx, b_idx = [], []
    for a in order:
        if not free[a]:
            continue
        free[a] = False
        cand = valid[a] & free
        b = int(torch.where(cand, noise[a], torch.full_like(noise[a], -1.0)).argmax()) if cand.any() else a
        free[b] = False
        a_idx.append(a)
        b_idx.append(b)
    return torch.tensor(a_idx), torch.tensor(b_idx)


def test_disjoint_pairing_equals_the_direct_torch_reference_draw_for_draw():
    """Same generator, same pairs: the NumPy loop changes the speed of the pairing, not one draw of it."""
    for seed in range(60):
        g = torch.Generator().manual_seed(1000 + seed)
        b, c = int(torch.randint(1, 65, (1,), generator=g)), int(torch.randint(1, 11, (1,), generator=g))
        y = (torch.rand(b, c, generator=g) < float(torch.rand(1, generator=g))).float()
        got = indeed.partial_coco_pairs(y, "disjoint", torch.Generator().manual_seed(seed))
        want = _disjoint_pairs_reference(y, torch.Generator().manual_seed(seed))
        assert all(torch.equal(u, v) for u, v in zip(got, want, strict=True)), (seed, b, c)


def test_the_full_profile_is_the_papers_ml_mnist_recipe():
    """Evaluation on ML-MNIST: full MNIST at 84x84, the simple CNN, Adam at 1e-3 halved every epoch, 30 epochs;
    ML-CIFAR-10: VGG-16, Adam 1e-3 with SGDR for 300 epochs, RandAugment and Cutout."""
    from mlic_lib.engine import TrainConfig, build_optimizer, build_scheduler
    from mlic_lib.profiles import load_profile

    s = load_profile("indeed", "full")
    assert (s["data"]["source"], s["data"]["downsample"], s["model"]["name"]) == ("mnist", 1, "simple_cnn")
    cfg = TrainConfig.from_dict(s["train"])
    assert (cfg.epochs, cfg.lr, cfg.optimizer) == (30, 0.001, "adam")
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=3)
    lrs = []
    for _ in range(30 * 3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[::3] == pytest.approx([0.001 * 0.5 ** e for e in range(30)])  # halved at every epoch
    c = s["cifar"]
    assert (c["model"]["name"], c["train"]["epochs"], c["train"]["lr"], c["train"]["scheduler"]) == (
        "vgg16", 300, 0.001, "cosine_restarts")
    assert c["data"]["augment"] == {"randaugment": True, "cutout": 16}


# ------------------------------------------------------------------------------------- mutation follow-ups (round 2)
def test_compose_canvases_draws_from_every_image_of_a_class():
    """Each pasted image is drawn from all of its class's pool images, the last one of a class included."""
    imgs = np.repeat(np.arange(1, 21, dtype=np.uint8), 16).reshape(20, 4, 4)  # pool image i is the constant i + 1
    cs = indeed.compose_canvases(imgs, np.arange(20) % 10, 200, 3, seed=0)  # two pool images per class
    assert set(np.unique(cs.images).tolist()) - {0} == set(range(1, 21))


def test_downsample_rounds_each_block_mean_to_the_nearest_integer():
    """downsample is the mean of each factor x factor block rounded to the nearest integer (not truncated)."""
    x = np.random.default_rng(0).integers(0, 256, (3, 2, 6, 9), dtype=np.uint8)
    ref = np.rint(x.reshape(3, 2, 2, 3, 3, 3).astype(np.float64).mean((3, 5))).astype(np.uint8)
    np.testing.assert_array_equal(indeed.downsample(x, 3), ref)


def test_the_method_tables_name_the_norm_and_blocks_of_their_specs():
    """Table 1's and Table 4's row names match the specs they train (a swapped spec would mislabel a row)."""
    for name, spec in {**indeed.MAIN_METHODS, **indeed.ABLATION_METHODS}.items():
        if spec["kind"] == "baseline":
            assert name == "Baseline"
            continue
        assert ("min-max" in name) != ("L2" in name)
        assert spec["norm"] == ("minmax" if "min-max" in name else "l2")
        blocks = ("identical" if name.startswith("Identical") else "disparate" if name.startswith("Disparate")
                  else "both")
        assert spec["blocks"] == blocks
    assert {(s["norm"], s["blocks"]) for s in indeed.ABLATION_METHODS.values()} == set(
        itertools.product(("minmax", "l2"), ("identical", "disparate")))


def test_a_method_spec_may_set_the_steps_lambda_pairing_and_detach_map():
    step = indeed.method_step({"kind": "indeed", "lam": 0.3, "pairing": "each", "detach_map": True}, lam=0.7,
                              pairing="disjoint")
    assert (step.lam, step.pairing, step.detach_map) == (0.3, "each", True)
    step = indeed.method_step({"kind": "indeed"}, lam=0.7, pairing="each")
    assert (step.lam, step.pairing, step.detach_map) == (0.7, "each", False)
