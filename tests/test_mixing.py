"""SpliceMix (Eqs. 2-3), SpliceMix-CL (Eqs. 5-7), Mix-style baselines and r_in / r_out (Eqs. 8-10)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlic_lib.analysis.robustness import biased_pair_map, lowres_predict
from mlic_lib.data.paths import reference_data_dir
from mlic_lib.mixing import (
    BatchAugmentation,
    CutMix,
    GridLayout,
    Mixup,
    Mosaic,
    SpliceMix,
    cell_bounds,
    cooccurrence_mask,
    noisy_correlation_indicators,
    noisy_correlation_over_seeds,
    noisy_correlation_ratios,
    pad_boxes,
    parse_grid,
)
from mlic_lib.models import build_model
from mlic_lib.splicemix_cl import (
    CL_NORMS,
    IndexedDataset,
    MixStep,
    MosaicStep,
    SpliceMixStep,
    cell_logits,
    consistency_loss,
    make_step,
    time_steps,
)

REPO = Path(__file__).resolve().parents[1]
VOC_TRAINVAL = reference_data_dir() / "voc2007" / "classification_trainval.csv"


def _batch(b=16, c=20, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    y = (torch.rand(b, c, generator=g) < 0.2).float()
    return x, y


# ------------------------------------------------------------------------------- SpliceMix
@pytest.mark.parametrize("grid", ["1x2", "2x1", "2x2", "2x3", "3x2"])
def test_splicemix_shapes_per_grid(grid):
    x, y = _batch(16)
    sm = SpliceMix({grid: 1.0}, p_drop=0.0, p_transpose=0.0)
    res = sm(x, y)
    r, c = parse_grid(grid)
    assert res.x.shape == (16 + 4, 3, 24, 24) and res.y.shape == (20, 20)
    assert (res.layout.rows, res.layout.cols) == (r, c) and res.layout.sources.shape == (4, r * c)
    assert torch.equal(res.x[:16], x) and torch.equal(res.y[:16], y)  # regular batch kept first


@pytest.mark.parametrize("size,expected", [(0.25, 4), (0.5, 8), (3, 3), (0, 0)])
def test_mixed_set_size(size, expected):
    x, y = _batch(17)
    res = SpliceMix(mixed_size=size)(x, y)
    assert res.layout.n_mixed == expected == len(res.x) - 17


def test_mixed_label_is_union_of_kept_sources_and_images_match_reference():
    x, y = _batch(16, size=12)
    torch.manual_seed(3)
    for _ in range(20):
        res = SpliceMix(p_drop=0.5)(x, y)
        lay = res.layout
        h, w = 12 // lay.rows, 12 // lay.cols
        for m in range(lay.n_mixed):
            kept = [int(s) for s, k in zip(lay.sources[m], lay.keep[m], strict=True) if k]
            union = torch.zeros(20)
            for s in kept:
                union = torch.maximum(union, y[s])
            assert torch.equal(res.y[16 + m], union)
            for k, (rs, cs) in enumerate(lay.cell_slices(12, 12)):
                cell = res.x[16 + m, :, rs, cs]
                if lay.keep[m, k]:
                    ref = F.interpolate(x[lay.sources[m, k]][None], size=(h, w), mode="bilinear", align_corners=True)[0]
                    torch.testing.assert_close(cell, ref)
                else:  # a dropped cell is blank
                    assert torch.all(cell == 0.0)


def test_dropout_counts_transpose_and_grid_frequencies():
    g = torch.Generator().manual_seed(0)
    sm = SpliceMix()
    counts = {}
    n_drop = 0
    for _ in range(3000):
        lay = sm.sample_layout(32, g)
        key = tuple(sorted((lay.rows, lay.cols)))
        counts[key] = counts.get(key, 0) + 1
        dropped = (~lay.keep).sum(1)
        assert len(set(dropped.tolist())) == 1  # one dropout count per batch
        if dropped[0] > 0:
            n_drop += 1
            assert 1 <= int(dropped[0]) <= lay.n_cells - 1
        uses = torch.bincount(lay.sources.flatten(), minlength=32)
        assert uses.max() <= -(-lay.sources.numel() // 32)  # repeated permutations: as even as possible
    assert abs(counts[(1, 2)] / 3000 - 0.3) < 0.04 and abs(counts[(2, 2)] / 3000 - 0.4) < 0.04
    assert abs(n_drop / 3000 - 0.3) < 0.04
    sm_t = SpliceMix({"2x3": 1.0}, p_transpose=1.0)
    assert (sm_t.sample_layout(8, g).rows, sm_t.sample_layout(8, g).cols) == (3, 2)


def test_sources_repeat_only_when_the_batch_is_too_small():
    lay = SpliceMix({"2x3": 1.0}, p_transpose=0.0, mixed_size=4).sample_layout(16)  # 24 cells > 16 images
    counts = torch.bincount(lay.sources.flatten(), minlength=16)
    assert counts.max() <= 2 and counts.min() >= 1


def test_determinism_with_seed_and_generator():
    x, y = _batch(16)
    a = SpliceMix()(x, y, torch.Generator().manual_seed(5))
    b = SpliceMix()(x, y, torch.Generator().manual_seed(5))
    assert torch.equal(a.x, b.x) and torch.equal(a.layout.sources, b.layout.sources)
    for mixer in (Mixup(), CutMix(), SpliceMix(), BatchAugmentation()):
        torch.manual_seed(7)
        r1 = mixer(x, y)
        torch.manual_seed(7)
        r2 = mixer(x, y)
        assert torch.equal(r1.x, r2.x) and torch.equal(r1.y, r2.y)
    boxes = pad_boxes([np.array([[i % 4, 2, 2, 12, 12]]) for i in range(16)])
    for mixer in (Mixup(), CutMix(), SpliceMix(), BatchAugmentation(), Mosaic()):
        call = (lambda g, m=mixer: m(x, y, boxes, generator=g)) if isinstance(mixer, Mosaic) else (
            lambda g, m=mixer: m(x, y, generator=g))
        state = torch.get_rng_state()
        r5 = call(torch.Generator().manual_seed(5))
        assert torch.equal(state, torch.get_rng_state()), f"{mixer!r} drew from the global RNG despite a generator"
        assert torch.equal(r5.x, call(torch.Generator().manual_seed(5)).x)
        assert not torch.equal(r5.x, call(torch.Generator().manual_seed(6)).x), f"{mixer!r} ignores its generator"


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="RxC"):
        SpliceMix({"2by3": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        SpliceMix({"2x2": -1.0})
    with pytest.raises(ValueError, match="p_drop"):
        SpliceMix(p_drop=1.5)
    with pytest.raises(ValueError, match="image batch"):
        SpliceMix()(torch.zeros(3, 8, 8), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="num_classes"):
        Mixup()(torch.zeros(3, 3, 8, 8), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="non-empty"):
        cell_bounds(2, 3)
    with pytest.raises(ValueError, match="at least 2x3"):
        SpliceMix({"2x3": 1.0}, p_transpose=0)(torch.zeros(4, 3, 1, 8), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="pad_boxes"):
        Mosaic()(torch.zeros(4, 3, 8, 8), torch.zeros(4, 2), None)
    with pytest.raises(ValueError, match="alpha"):
        Mixup(alpha=0)


# ----------------------------------------------------------------------------- SpliceMix-CL
def test_cell_bounds_proportional_on_an_uneven_map():
    assert cell_bounds(8, 3) == [0, 3, 5, 8]
    assert cell_bounds(8, 2) == [0, 4, 8]
    assert cell_bounds(14, 3) == [0, 5, 9, 14]


def test_cell_logits_match_manual_pooling():
    model = build_model("small_resnet", 5, widths=(4, 8, 8, 8)).eval()
    lay = GridLayout(2, 3, torch.arange(6).view(1, 6), torch.ones(1, 6, dtype=torch.bool), 6)
    fmap = torch.randn(1, 8, 8, 8)
    out = cell_logits(model, fmap, lay)
    assert out.shape == (1, 6, 5)
    cols = [0, 3, 5, 8]
    ref = model.classifier(fmap[:, :, 4:8, cols[1]:cols[2]].amax(dim=(2, 3)))
    torch.testing.assert_close(out[:, 4], ref)


def _layout(m=3, n=4, b=12, drop=None):
    keep = torch.ones(m, n, dtype=torch.bool)
    if drop is not None:
        keep[drop] = False
    return GridLayout(2, 2, torch.randperm(b)[: m * n].view(m, n), keep, b)


def test_cl_loss_zero_when_cells_agree_and_reference_formula():
    torch.manual_seed(0)
    lay = _layout()
    reg = torch.randn(12, 7)
    cells = reg[lay.sources].clone().requires_grad_(True)
    kl = consistency_loss(cells, reg, lay, form="kl")
    assert abs(float(kl.detach())) < 1e-6
    bce = consistency_loss(cells, reg, lay, form="bce")
    p = torch.sigmoid(reg[lay.sources])
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    torch.testing.assert_close(bce, entropy)  # Eq. 6 at agreement = entropy of the target
    bce.backward()
    assert cells.grad.abs().max() < 1e-7  # ... and it is its minimum
    # away from agreement, with a dropped cell: Eq. 6 and its KL form written out per entry, and the normaliser
    lay = _layout(drop=(0, 1))
    cells = torch.randn(3, 4, 7)
    p, q, keep = torch.sigmoid(reg[lay.sources]), torch.sigmoid(cells), lay.keep[..., None].expand(3, 4, 7)
    bce_ref = -(p * q.log() + (1 - p) * (1 - q).log())[keep].mean()
    kl_ref = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log())[keep].mean()
    torch.testing.assert_close(consistency_loss(cells, reg, lay, form="bce"), bce_ref)
    torch.testing.assert_close(consistency_loss(cells, reg, lay, form="kl"), kl_ref)
    assert kl_ref > 0.05
    torch.testing.assert_close(consistency_loss(cells, reg, lay, normaliser=10.0), bce_ref * keep.sum() / 10.0)


def test_cl_loss_gradients_with_and_without_detach_and_dropped_cells_masked():
    torch.manual_seed(1)
    lay = _layout(drop=(0, 1))
    for detach in (True, False):
        reg = torch.randn(12, 7, requires_grad=True)
        cells = torch.randn(3, 4, 7, requires_grad=True)
        loss = consistency_loss(cells, reg, lay, detach=detach)
        loss.backward()
        assert cells.grad.abs().sum() > 0
        assert cells.grad[0, 1].abs().sum() == 0  # dropped cell: no gradient
        if detach:
            assert reg.grad is None or reg.grad.abs().sum() == 0
        else:
            assert reg.grad.abs().sum() > 0
        # value unaffected by what a dropped cell predicts
        cells2 = cells.detach().clone()
        cells2[0, 1] += 5.0
        torch.testing.assert_close(consistency_loss(cells2, reg.detach(), lay), loss.detach())
    # reference: masked mean of elementwise BCE
    reg, cells = torch.randn(12, 7), torch.randn(3, 4, 7)
    ref = F.binary_cross_entropy_with_logits(cells, torch.sigmoid(reg[lay.sources]), reduction="none")
    ref = ref[lay.keep].mean()
    torch.testing.assert_close(consistency_loss(cells, reg, lay), ref)


@pytest.mark.parametrize("step", [MixStep(), MixStep(Mixup()), MixStep(CutMix()), MixStep(BatchAugmentation()),
                                  SpliceMixStep(), SpliceMixStep(cl_weight=1.0),
                                  SpliceMixStep(cl_weight=1.0, detach=False, cl_form="kl")],
                         ids=["baseline", "mixup", "cutmix", "ba", "splicemix", "cl", "cl-nodetach-kl"])
def test_steps_train_with_finite_gradients(step, small_scenes):
    train, _ = small_scenes
    torch.manual_seed(0)
    model = build_model("small_resnet", train.world.num_classes, widths=(4, 8, 8, 8))
    x = torch.as_tensor(train.images[:16]).float() / 127.5 - 1
    y = torch.as_tensor(train.targets[:16])
    loss, logs = step(model, [x, y, torch.arange(16)], torch.device("cpu"))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    if isinstance(step, SpliceMixStep):
        assert {"loss_regular", "loss_mixed"} <= set(logs) and (("loss_cl" in logs) == (step.cl_weight > 0))


def _splicemix_cl_reference(model, x, y, lay, detach: bool, cl_norm: str):
    """Eqs. 5-7 written out, cell by cell: the sum of the BCE over the spliced batch plus the sum over the kept cells
    of the BCE between each cell's prediction and its regular image's, over |B_hat| C ('paper') or each term its
    own mean, the cells' over every cell of the grids ('authors')."""
    B, C = lay.n_regular, y.shape[1]
    fmap = model.features(x)
    logits = model.classifier(fmap.amax(dim=(2, 3)))
    l_bce = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum")
    h, w = fmap.shape[2:]
    l_cl = logits.new_zeros(())
    for m in range(lay.n_mixed):
        for k in range(lay.rows * lay.cols):
            if not lay.keep[m, k]:
                continue
            i, j = divmod(k, lay.cols)
            r0, r1 = (int(np.floor(t * h / lay.rows + 0.5)) for t in (i, i + 1))
            c0, c1 = (int(np.floor(t * w / lay.cols + 0.5)) for t in (j, j + 1))
            cell = model.classifier(fmap[B + m, :, r0:r1, c0:c1].amax(dim=(1, 2)))
            target = logits[int(lay.sources[m, k])]
            target = torch.sigmoid(target.detach() if detach else target)
            l_cl = l_cl + F.binary_cross_entropy_with_logits(cell, target, reduction="sum")
    n_hat = len(x)
    if cl_norm == "paper":
        return (l_bce + l_cl) / (n_hat * C)
    return l_bce / (n_hat * C) + l_cl / (lay.n_mixed * lay.rows * lay.cols * C)


@pytest.mark.parametrize("cl_norm", ["paper", "authors"])
def test_splicemix_cl_step_is_eqs_5_to_7_written_out(cl_norm, small_scenes):
    """The step's loss and its gradients (with and without the detached target) equal Eqs. 5-7 computed cell by
    cell, and detaching changes the gradient (a step that ignored cl_detach would not)."""
    train, _ = small_scenes
    x = torch.as_tensor(train.images[:24]).float() / 127.5 - 1
    y = torch.as_tensor(train.targets[:24])
    grads = {}
    for detach in (True, False):
        torch.manual_seed(0)
        model = build_model("small_resnet", train.world.num_classes, widths=(4, 8, 8, 8)).eval()
        mixer = SpliceMix({"2x3": 1.0}, p_drop=1.0)  # 6 cells a mixed image, some dropped, 1.5 B cells in all
        step = SpliceMixStep(mixer, cl_weight=1.0, detach=detach, cl_norm=cl_norm)
        torch.manual_seed(1)
        loss, logs = step(model, [x, y], torch.device("cpu"))
        torch.manual_seed(1)
        res = mixer(x, y)  # the same draw
        ref = _splicemix_cl_reference(model, res.x, res.y, res.layout, detach, cl_norm)
        assert res.layout.n_mixed == 6 and not res.layout.keep.all()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        g = torch.autograd.grad(loss, list(model.parameters()))
        g_ref = torch.autograd.grad(ref, list(model.parameters()))
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        grads[detach] = torch.cat([t.flatten() for t in g])
    assert not torch.allclose(grads[True], grads[False])


def test_splicemix_cl_norms_weigh_eq6_by_the_cells():
    """cl_norm='authors' weighs the cell term by |B_hat| / (M r c) relative to the paper's single normaliser."""
    torch.manual_seed(0)
    model = build_model("small_resnet", 5, widths=(4, 8, 8, 8)).eval()
    x, y = torch.randn(16, 3, 32, 32), (torch.rand(16, 5) > 0.5).float()
    logs = {}
    for norm in CL_NORMS:
        torch.manual_seed(3)
        logs[norm] = SpliceMixStep(SpliceMix({"2x2": 1.0}, p_drop=0.0), cl_weight=1.0, cl_norm=norm)(
            model, [x, y], torch.device("cpu"))[1]
    torch.testing.assert_close(logs["authors"]["loss_cl"], logs["paper"]["loss_cl"] * (16 + 4) / (4 * 4))
    with pytest.raises(ValueError, match="cl_norm must be one of"):
        SpliceMixStep(cl_norm="mean")
    assert make_step("splicemix_cl", {"cl_norm": "authors"}).cl_norm == "authors"


def test_mosaic_step_needs_indices(small_scenes):
    train, _ = small_scenes
    model = build_model("small_resnet", train.world.num_classes, widths=(4, 8, 8, 8))
    x = torch.as_tensor(train.images[:8]).float() / 127.5 - 1
    y = torch.as_tensor(train.targets[:8])
    step = MosaicStep(train.boxes)
    torch.manual_seed(0)
    loss, _ = step(model, [x, y, torch.arange(8)], torch.device("cpu"))
    loss.backward()
    torch.manual_seed(0)  # boxes looked up on the host (the engine's hook) give the same loss
    batch = step.host_batch([x, y, torch.arange(8)])
    assert len(batch) == 4 and batch[3].shape[:1] == (8,)
    torch.testing.assert_close(step(model, batch, torch.device("cpu"))[0], loss)
    for call in (lambda: step(model, [x, y], torch.device("cpu")), lambda: step.host_batch([x, y])):
        with pytest.raises(ValueError, match="IndexedDataset"):
            call()
    with pytest.raises(ValueError, match="SpliceMixStep"):
        MixStep(SpliceMix())


def test_make_step_from_profile_options():
    from mlic_lib.profiles import load_profile

    opts = load_profile("splicemix", "default")["mixing"]
    cl = make_step("splicemix_cl", opts)
    assert isinstance(cl, SpliceMixStep) and cl.cl_weight == 1.0 and cl.detach is True
    assert cl.splicemix.p_drop == 0.3 and [tuple(g) for g in cl.splicemix.grids] == [(1, 2), (2, 2), (2, 3)]
    assert make_step("splicemix_cl", {**opts, "cl_detach": False}).detach is False  # authors' VOC code
    assert cl.splicemix.fill == -1.0  # the scenes' blank (black, normalised to [-1, 1])
    assert make_step("splicemix", {k: v for k, v in opts.items() if k != "fill"}).splicemix.fill == 0.0  # authors
    assert isinstance(make_step("mixup", opts).mixer, Mixup)
    with pytest.raises(ValueError, match="boxes"):
        make_step("mosaic", opts)
    with pytest.raises(ValueError, match="unknown method"):
        make_step("fmix", opts)


def test_every_mixing_option_reaches_the_step_and_the_mixer():
    """A profile's (or an override's) mixing options, each set away from its default, arrive where they act: a
    dropped one used to pass every test, and Table II's timing row builds its step with ``mixed_size``."""
    opts = {"grids": {"2x3": 1.0}, "p_drop": 0.7, "p_transpose": 0.1, "mixed_size": 0.5, "fill": 0.25, "alpha": 0.8,
            "cl_weight": 0.3, "cl_detach": False, "cl_form": "kl", "cl_norm": "authors"}
    cl = make_step("splicemix_cl", opts)
    sm = cl.splicemix
    assert (sm.p_drop, sm.p_transpose, sm.mixed_size, sm.fill) == (0.7, 0.1, 0.5, 0.25)
    assert [tuple(g) for g in sm.grids] == [(2, 3)]
    assert (cl.cl_weight, cl.detach, cl.cl_form, cl.cl_norm) == (0.3, False, "kl", "authors")
    assert make_step("mixup", opts).mixer.alpha == 0.8 and make_step("cutmix", opts).mixer.alpha == 0.8
    assert make_step("splicemix", opts).splicemix.mixed_size == 0.5


def test_the_dropped_cells_are_drawn_for_each_mixed_image():
    """One number of dropped cells per batch, but which cells for each mixed image (Sec. III-B; the authors'
    ``random.sample`` per image)."""
    sm = SpliceMix({"2x3": 1.0}, p_drop=1.0, p_transpose=0.0, mixed_size=8)
    g = torch.Generator().manual_seed(0)
    layouts = [sm.sample_layout(16, g) for _ in range(5)]
    for lay in layouts:
        assert len(set((~lay.keep).sum(1).tolist())) == 1  # the same count in every mixed image
    assert any(len({tuple(row) for row in lay.keep.tolist()}) > 1 for lay in layouts)


def test_the_run_key_holds_the_mixing_options_of_a_mixing_method():
    from mlic_lib.profiles import load_profile
    from mlic_lib.splicemix_cl import method_run_dir

    s = load_profile("splicemix", "smoke")
    other = {**s, "mixing": {**s["mixing"], "p_drop": 0.5}}
    assert method_run_dir(s, "splicemix") != method_run_dir(other, "splicemix")
    assert method_run_dir(s, "baseline") == method_run_dir(other, "baseline")  # no mixing: the same run
    # each method is keyed on the options its step reads: SpliceMix's p_drop leaves Mixup, CutMix and Mosaic alone
    for method in ("mixup", "cutmix", "mosaic"):
        assert method_run_dir(s, method) == method_run_dir(other, method), method
    alpha = {**s, "mixing": {**s["mixing"], "alpha": 1.0}}
    assert method_run_dir(s, "mixup") != method_run_dir(alpha, "mixup")
    assert method_run_dir(s, "splicemix") == method_run_dir(alpha, "splicemix")
    for key, value in (("cl_weight", 0.5), ("cl_norm", "authors"), ("cl_detach", False), ("fill", 0.0)):
        changed = {**s, "mixing": {**s["mixing"], key: value}}
        assert method_run_dir(s, "splicemix_cl") != method_run_dir(changed, "splicemix_cl"), key
        assert (method_run_dir(s, "splicemix") != method_run_dir(changed, "splicemix")) == (key == "fill"), key


def test_indexed_dataset_yields_index(small_scenes):
    from mlic_lib.data.tensors import TensorImageDataset

    train, _ = small_scenes
    ds = IndexedDataset(TensorImageDataset(train.images, train.targets))
    x, y, i = ds[5]
    assert int(i) == 5 and x.shape == (3, 64, 64)
    assert [int(t[2]) for t in ds.__getitems__([3, 1])] == [3, 1]


def test_a_label_mask_is_refused_not_dropped(small_scenes):
    """The mixing steps train on (x, y): a label mask (VOC's difficult labels, ignored) would be dropped and its
    entries trained as negatives, so the dataset wrapper and every step refuse it, naming the fix."""
    from mlic_lib.data.tensors import TensorImageDataset

    train, _ = small_scenes
    masked = TensorImageDataset(train.images[:4], train.targets[:4])
    masked.mask = torch.ones(masked.targets.shape, dtype=torch.bool)  # what ImageListDataset carries under ignore
    with pytest.raises(ValueError, match="no label mask.*difficult_train: negative"):
        IndexedDataset(masked)
    x, y = _batch(4)
    model = build_model("small_resnet", y.shape[1], widths=(4, 8, 8, 8))
    batch = [x, y, torch.ones(y.shape, dtype=torch.bool)]
    for step in (MixStep(), MixStep(Mixup()), SpliceMixStep(), MosaicStep(torch.zeros(4, 1, 5))):
        with pytest.raises(ValueError, match="no label mask"):
            step(model, batch, torch.device("cpu"))
    loss, _ = MixStep()(model, [x, y, torch.arange(4)], torch.device("cpu"))  # an index is no mask
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------- Mixup / CutMix / ...
def test_mixup_label_semantics():
    x, y = _batch(8)
    torch.manual_seed(0)
    res = Mixup(alpha=0.5)(x, y)
    lam, perm = res.info["lam"], res.info["perm"]
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(res.x, lam * x + (1 - lam) * x[perm])
    torch.testing.assert_close(res.y, lam * y + (1 - lam) * y[perm])
    assert ((res.y > 0) == ((y + y[perm]) > 0) | ((lam in (0.0, 1.0)) & (res.y > 0))).all()


def test_cutmix_label_semantics():
    x, y = _batch(8, size=32)
    torch.manual_seed(4)
    for _ in range(10):
        res = CutMix()(x, y)
        x0, y0, x1, y1 = res.info["box"]
        perm, lam = res.info["perm"], res.info["lam"]
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(res.x[:, :, inside], x[perm][:, :, inside])
        assert torch.equal(res.x[:, :, ~inside], x[:, :, ~inside])
        assert lam == pytest.approx(1 - inside.float().mean().item())
        torch.testing.assert_close(res.y, lam * y + (1 - lam) * y[perm])


def test_mosaic_labels_from_boxes():
    B, C, H = 6, 12, 8
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 1, H, H).clone()
    y = torch.zeros(B, C)
    boxes = []
    for i in range(B):  # class i in the bottom-right quarter, class 6+i in the top-left quarter
        boxes.append(np.array([[i, 4, 4, 8, 8], [6 + i, 0, 0, 4, 4]]))
        y[i, [i, 6 + i]] = 1
    torch.manual_seed(0)
    res = Mosaic(center_range=(0.5, 0.5))(x, y, pad_boxes(boxes))
    srcs = res.info["sources"]
    for j in range(B):
        expect = torch.zeros(C)
        expect[[j, 6 + int(srcs[3, j])]] = 1  # TL shows source j's bottom-right, BR shows srcs[3]'s top-left
        assert torch.equal(res.y[j], expect)
        assert res.x[j, 0, 0, 0] == j and res.x[j, 0, 7, 7] == srcs[3, j] and res.x[j, 0, 0, 7] == srcs[1, j]
    for bad in (C, -2, 1.5):  # torch's one_hot said "Class values must be smaller than num_classes"
        wrong = pad_boxes(boxes).double()
        wrong[2, 0, 0] = bad
        with pytest.raises(ValueError, match=rf"box classes must be whole numbers in 0\.\.{C - 1}.*got {bad}"):
            Mosaic()(x, y, wrong)
    torch.manual_seed(0)  # float boxes of whole numbers are fine: the same labels as the long ones
    assert torch.equal(Mosaic(center_range=(0.5, 0.5))(x, y, pad_boxes(boxes).float()).y, res.y)


def test_batch_augmentation_shapes():
    x, y = _batch(5)
    res = BatchAugmentation(m=2)(x, y)
    assert res.x.shape == (10, 3, 24, 24) and torch.equal(res.y, y.repeat(2, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.uint8])
def test_batch_augmentation_of_half_precision_and_uint8_images_matches_float32(dtype):
    """torch's CPU grid_sample with a float16/bfloat16 grid reads outside the image: such batches came back with
    NaN and ~1e38 pixels, silently; uint8 batches (which the mixing transforms accept) failed. The warp is now
    computed in float32 and cast back."""
    x = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    y = torch.ones(4, 2)
    ref = BatchAugmentation()(x, y, generator=torch.Generator().manual_seed(1)).x
    scale = 255 if dtype == torch.uint8 else 1
    xin = (x * 255).round().to(dtype) if dtype == torch.uint8 else x.to(dtype)
    out = BatchAugmentation()(xin, y, generator=torch.Generator().manual_seed(1)).x
    assert out.dtype == dtype
    out = out.float() / scale
    assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    assert float((out - ref).abs().max()) < 0.02


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_batch_augmentation_keeps_large_integer_values(dtype):
    """A float32 warp rounded values above 2**24 and took int32's 2**31 - 1 to 2**31, which wrapped to -2**31."""
    top = torch.iinfo(torch.int32).max
    x = torch.full((2, 1, 16, 16), top, dtype=dtype)
    out = BatchAugmentation()(x, torch.ones(2, 1), generator=torch.Generator().manual_seed(0)).x
    assert out.dtype == dtype and (out == top).all()


def test_batch_augmentation_window_stays_inside_the_image():
    """Every copy is a crop (no replicated border): on a horizontal ramp the sampled values stay strictly
    increasing along each row, which a window reaching past the border would break."""
    ramp = torch.linspace(0, 1, 64).expand(8, 3, 64, 64).contiguous()
    res = BatchAugmentation(m=4, max_shift=0.25, scale=(0.6, 1.0))(ramp, torch.zeros(8, 2),
                                                                  generator=torch.Generator().manual_seed(0))
    assert (res.x[..., 1:] - res.x[..., :-1] > 0).all()


# ------------------------------------------------------------------------------ r_in / r_out
def test_noisy_indicators_hand_made():
    train = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    A = cooccurrence_mask(train)
    assert A.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert cooccurrence_mask(torch.cat([train, train[:1]]), min_count=2).tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    mixed = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0.3, 0.7, 0, 0]])
    i_in, i_out = noisy_correlation_indicators(mixed, A)
    torch.testing.assert_close(i_in, torch.tensor([4 / 9, 0, 0, 0.5, 0]))
    assert i_out.tolist() == [1, 0, 0, 1, 0]


def test_noisy_indicators_match_a_loop_reference():
    rng = np.random.default_rng(0)
    train = (rng.random((50, 9)) < 0.2).astype(float)
    mixed = (rng.random((40, 9)) < 0.3).astype(float)
    A = cooccurrence_mask(train).numpy()
    i_in, i_out = noisy_correlation_indicators(mixed, A)
    for k, yv in enumerate(mixed):
        pos = np.flatnonzero(yv)
        bad = sum(1 - A[i, j] for i, j in itertools.product(pos, pos))
        assert i_in[k] == pytest.approx(bad / len(pos) ** 2 if len(pos) else 0.0)
        assert i_out[k] == float(bad > 0)


def test_noisy_ratios_known_answers():
    labels = torch.eye(8)  # no two classes ever co-occur
    assert noisy_correlation_ratios(labels, None, 8) == {"r_in": 0.0, "r_out": 0.0, "n_samples": 8}
    assert noisy_correlation_ratios(labels, BatchAugmentation(), 8)["r_out"] == 0.0
    r = noisy_correlation_ratios(labels, SpliceMix({"2x2": 1.0}, p_drop=0.0), batch_size=8, epochs=3)
    # per batch: 8 regular (0) + 2 mixed with 4 distinct classes (I_in = 12/16, I_out = 1)
    assert r["n_samples"] == 30 and r["r_in"] == pytest.approx(2 * 0.75 / 10) and r["r_out"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="mix_labels"):
        noisy_correlation_ratios(labels, Mosaic(), 8)


def test_noisy_ratios_over_seeds_are_the_single_runs_stacked():
    labels = torch.eye(6)[torch.arange(40) % 6]  # one class per image: any mixed pair is a noisy correlation
    mixers = {"Mixup": Mixup(), "SpliceMix": SpliceMix()}
    out = noisy_correlation_over_seeds(labels, mixers, seeds=[0, 5], batch_size=8, epochs=2, image_size=(32, 32))
    assert set(out) == set(mixers) and all(v.shape == (2, 2) for v in out.values())
    for name, mixer in mixers.items():
        for row, s in zip(out[name], [0, 5], strict=True):
            r = noisy_correlation_ratios(labels, mixer, 8, 2, seed=s, image_size=(32, 32))
            assert row.tolist() == [r["r_in"], r["r_out"]]
    assert not np.array_equal(out["Mixup"][0], out["Mixup"][1])  # the seeds are different simulations
    with pytest.raises(ValueError, match="at least one seed"):
        noisy_correlation_over_seeds(labels, mixers, seeds=[])


@pytest.mark.skipif(not VOC_TRAINVAL.is_file(), reason="VOC2007 trainval labels not present")
def test_noisy_ratios_on_voc2007_order_like_table_vii():
    from mlic_lib.data.voc import read_voc_csv

    _, labels = read_voc_csv(VOC_TRAINVAL)
    y = (labels == 1).astype(np.float32)
    mix = noisy_correlation_ratios(y, Mixup(), 16)
    cut = noisy_correlation_ratios(y, CutMix(), 16)
    spl = noisy_correlation_ratios(y, SpliceMix(), 16)
    assert spl["r_in"] < mix["r_in"] and spl["r_out"] < mix["r_out"] and spl["r_in"] < cut["r_in"]
    assert 0.05 < mix["r_in"] < 0.25 and 0.15 < mix["r_out"] < 0.5  # paper: 12.8 % / 31.0 %


# ---------------------------------------------------------------------------- evaluation bits
def test_biased_pair_map_perfect_and_chance():
    nat_t = np.array([[0, 0, 1], [0, 0, 1], [0, 1, 0]])
    exc_t = np.array([[1, 0, 0], [1, 0, 1]])
    co_t = np.array([[1, 1, 0]])
    perfect = biased_pair_map([(0, 1)], (nat_t.astype(float), nat_t), (exc_t.astype(float), exc_t),
                              (co_t.astype(float), co_t))
    assert perfect["exclusive_mAP"] == 1.0 and perfect["cooccur_mAP"] == 1.0


def test_biased_pair_map_matches_hand_computed_ap():
    """Pair (b, c) = (0, 1). Exclusive: b without c from the exclusive set (a row with c is left out) against
    the natural images without b (a natural row with b is left out); co-occur likewise with b and c."""
    nat_t = np.array([[0, 0, 1], [0, 0, 1], [0, 1, 0], [1, 1, 0]])  # the last row has b: not a negative
    nat_s = np.zeros((4, 3))
    nat_s[:, 0] = [0.9, 0.2, 0.6, 0.99]
    exc_t, exc_s = np.array([[1, 0, 0], [1, 0, 1], [1, 1, 0]]), np.zeros((3, 3))  # the last row has c
    exc_s[:, 0] = [0.8, 0.3, 0.85]
    co_t, co_s = np.array([[1, 1, 0], [1, 0, 0]]), np.zeros((2, 3))  # the last row lacks c
    co_s[:, 0] = [0.95, 0.1]
    got = biased_pair_map([(0, 1)], (nat_s, nat_t), (exc_s, exc_t), (co_s, co_t))
    # exclusive ranking 0.9 (neg) 0.8 (pos) 0.6 (neg) 0.3 (pos) 0.2 (neg): AP = (1/2 + 2/4) / 2
    assert got["exclusive_mAP"] == pytest.approx(0.5)
    assert got["cooccur_mAP"] == pytest.approx(1.0)  # 0.95 (pos) above every negative
    assert got["per_pair"] == {"exclusive": [pytest.approx(0.5)], "cooccur": [pytest.approx(1.0)]}


def test_lowres_predict_downsamples_the_input_by_the_factor():
    model = build_model("small_resnet", 4, widths=(4, 8, 8, 8)).eval()
    sizes = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(tuple(args[0].shape[2:])))
    x = torch.rand(2, 3, 64, 64)
    for f in (1, 2, 4, 8):
        out = lowres_predict(f)(model, x)
        assert out.shape == (2, 4) and ((out >= 0) & (out <= 1)).all()
    assert sizes == [(64, 64), (32, 32), (16, 16), (8, 8)]
    with torch.no_grad():  # f = 1 is the plain (float64) sigmoid of the model
        torch.testing.assert_close(lowres_predict(1)(model, x), torch.sigmoid(model(x).double()))
    with pytest.raises(ValueError, match="factor must be >= 1"):
        lowres_predict(0)


def test_lowres_predict_keeps_the_aspect_and_antialiases():
    """Fig. 6's protocol on a non-square input: each side divided by the factor, bilinear with antialiasing (a
    square input and a shape check alone passed a width taken from the height, and no antialiasing)."""
    seen = []

    class Record(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.mean((2, 3))

    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    lowres_predict(4)(Record(), x)
    want = F.interpolate(x, size=(8, 12), mode="bilinear", align_corners=False, antialias=True)
    assert seen[0].shape[2:] == (8, 12)
    torch.testing.assert_close(seen[0], want)


@pytest.mark.slow
def test_train_methods_process_pool_equals_sequential(tmp_path, monkeypatch):
    """The pool trains the same runs as a sequential loop. Both use the pool workers' thread count: a run's
    floating-point reductions depend on it (in channels_last more than 1e-4 apart)."""
    from mlic_lib.experiments import scene_data
    from mlic_lib.process_pool import available_cpus
    from mlic_lib.profiles import load_profile
    from mlic_lib.splicemix_cl import train_methods

    s = load_profile("splicemix", "smoke", {"data.n_train": 48, "data.n_test": 16, "train.device": "cpu"})
    data = scene_data(s, use_cache=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, available_cpus() // min(2, available_cpus())))  # as map_in_processes, 2 tasks
    try:
        seq = train_methods(s, data, ["baseline", "splicemix"], [0], parallel="sequential", progress=False)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "pool-cache"))
    par = train_methods({**s, "parallel": "process"}, data, ["baseline", "splicemix"], [0], progress=False)
    assert list(par) == [("baseline", 0), ("splicemix", 0)] == list(seq)
    assert (seq.mode, seq.workers) == ("sequential", 1)
    assert (par.mode, par.workers) == ("process", min(2, available_cpus()))
    assert not any(r.cached for r in par.values()) and not any(r.cached for r in seq.values())
    again = train_methods({**s, "parallel": "process"}, data, ["baseline", "splicemix"], [0], progress=False)
    assert all(r.cached for r in again.values())  # the second call finds every run in the cache
    assert (again.mode, again.workers) == ("process", 1)  # nothing left to train: no worker ran
    x = data.test_ds[0][0][None]
    for k in seq:
        with torch.no_grad():
            torch.testing.assert_close(seq[k].model.eval()(x), par[k].model.eval()(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="parallel must be one of"):
        train_methods(s, data, ["baseline"], [0], parallel="threads")


# ----------------------------------------------------------------------------------- chapter
@pytest.mark.notebook
def test_chapter_smoke_run(tmp_path):
    """The chapter end to end with profile=smoke (tests/test_notebooks.py runs it too)."""
    from mlic_lib.book import execute_notebook

    nb = REPO / "notebooks" / "01_splicemix.ipynb"
    os.environ.pop("MPLBACKEND", None)
    out = tmp_path / nb.name
    execute_notebook(nb, out, "smoke", timeout=600)
    cells = json.loads(out.read_text())["cells"]
    assert not [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert (tmp_path / "results" / "splicemix.json").is_file()


def test_mosaic_label_loss_counts_labels_the_area_rule_drops_against_a_hand_count():
    """One 8x8 image, centre fixed at (4, 4): each quadrant of the mosaic shows one quarter of the image (B = 1, so
    every source is image 0). Class 0's box straddles the centre: a quarter of it in each crop (visible, lost).
    Class 1's box (0, 0, 3, 3) lies in one quarter (kept). Class 2's box (3, 0, 6, 2) is split 1/3 : 2/3 between
    two quarters (kept by the 2/3 part). Class 3 is labelled but has no box area (never visible)."""
    from mlic_lib.mixing import mosaic_label_loss

    x, y = torch.zeros(1, 1, 8, 8), torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    boxes = torch.tensor([[[0, 2, 2, 6, 6], [1, 0, 0, 3, 3], [2, 3, 0, 6, 2], [3, 5, 5, 5, 5]]])
    counts = mosaic_label_loss(x, y, boxes, Mosaic(center_range=(0.5, 0.5)), generator=torch.Generator())
    assert counts == {"visible": 3, "lost": 1, "labels_in": 4, "labels_out": 2}
    res = Mosaic(center_range=(0.5, 0.5))(x, y, boxes, generator=torch.Generator())
    assert res.y.tolist() == [[0.0, 1.0, 1.0, 0.0]] and res.info["visible_labels"].tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_time_steps_times_every_method_for_each_round_and_trains_its_own_model():
    x, y = torch.randn(8, 3, 32, 32), (torch.rand(8, 5) < 0.3).float()
    batch, dev = [x, y, torch.arange(8)], torch.device("cpu")
    models = {m: build_model("small_resnet", 5, widths=(4, 8, 8, 8)) for m in ("baseline", "splicemix")}
    before = {m: [p.detach().clone() for p in mod.parameters()] for m, mod in models.items()}
    steps = {m: make_step(m, {"mixed_size": 2}) for m in models}
    times = time_steps(models, steps, batch, dev, rounds=3, warmup=1)
    assert set(times) == {"baseline", "splicemix"} and all(len(v) == 3 and min(v) > 0 for v in times.values())
    for m, mod in models.items():  # each iteration updates the method's own model
        assert any(not torch.equal(a, b) for a, b in zip(before[m], mod.parameters(), strict=True))
    calls = {m: 0 for m in models}

    def counted(m):
        def step(*args):
            calls[m] += 1
            return steps[m](*args)
        return step

    times = time_steps(models, {m: counted(m) for m in models}, batch, dev, rounds=2, warmup=3)
    assert calls == {"baseline": 5, "splicemix": 5} and all(len(v) == 2 for v in times.values())  # warm-up untimed
    with pytest.raises(ValueError, match="same methods"):
        time_steps(models, {"baseline": steps["baseline"]}, batch, dev)
    with pytest.raises(ValueError, match="rounds"):
        time_steps(models, steps, batch, dev, rounds=0)
    seen = {}

    def sized(m):  # records the batch each method's step received
        def step(model, b, device):
            seen[m] = len(b[0])
            return steps[m](model, b, device)
        return step

    own = {"baseline": batch, "splicemix": [t[:6] for t in batch]}  # Table II: 6 read + 2 mixed = the baseline's 8
    time_steps(models, {m: sized(m) for m in models}, own, dev, rounds=1, warmup=0)
    assert seen == {"baseline": 8, "splicemix": 6}
    with pytest.raises(ValueError, match="a batch per method must name the methods"):
        time_steps(models, steps, {"baseline": batch}, dev)


@pytest.mark.parametrize("align_corners", [True, False])
def test_spliced_image_resized_back_matches_a_direct_construction(align_corners):
    """A 13-px image does not divide into a 2x3 grid: the cells are 6x4, tiled to 12x12, then resized back to
    13x13 with the same bilinear mode; dropped cells hold ``fill`` (the scenes profile's -1), not 0."""
    x, y = _batch(8, size=13)
    sm = SpliceMix({"2x3": 1.0}, p_drop=1.0, p_transpose=0.0, fill=-1.0, align_corners=align_corners)
    lay = sm.sample_layout(8, torch.Generator().manual_seed(2))
    got = sm.mix_images(x, lay)
    for m in range(lay.n_mixed):
        cells = []
        for k, s in enumerate(lay.sources[m].tolist()):
            cell = F.interpolate(x[s][None], size=(6, 4), mode="bilinear", align_corners=align_corners)[0]
            cells.append(cell if lay.keep[m, k] else torch.full_like(cell, -1.0))
        tiled = torch.cat([torch.cat(cells[r * 3:(r + 1) * 3], dim=2) for r in range(2)], dim=1)  # (3, 12, 12)
        ref = F.interpolate(tiled[None], size=(13, 13), mode="bilinear", align_corners=align_corners)[0]
        torch.testing.assert_close(got[m], ref)
    assert (~lay.keep).any(), "p_drop=1 drops cells in every mixed image"
    other = SpliceMix({"2x3": 1.0}, p_drop=1.0, p_transpose=0.0, fill=-1.0, align_corners=not align_corners)
    assert not torch.allclose(other.mix_images(x, lay), got)


def test_asymmetric_grids_are_transposed_with_probability_p_transpose():
    g = torch.Generator().manual_seed(0)
    for p, lo, hi in ((0.5, 0.45, 0.55), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)):
        sm = SpliceMix({"2x3": 1.0}, p_transpose=p)
        shapes = [(lay.rows, lay.cols) for lay in (sm.sample_layout(8, g) for _ in range(2000))]
        assert set(shapes) <= {(2, 3), (3, 2)}
        share = shapes.count((3, 2)) / len(shapes)
        assert lo <= share <= hi, (p, share)


def test_mixup_draws_lambda_from_beta_alpha_alpha():
    """Mixup's lam ~ Beta(0.5, 0.5) (the paper's alpha): a Kolmogorov-Smirnov test accepts it and rejects the
    uniform Beta(1, 1), which has the same mean."""
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    lams = [Mixup(0.5).sample(4, generator=g)["lam"] for _ in range(3000)]
    assert stats.kstest(lams, stats.beta(0.5, 0.5).cdf).pvalue > 0.01
    assert stats.kstest(lams, stats.uniform().cdf).pvalue < 1e-6


def test_cutmix_box_side_is_sqrt_one_minus_lambda0(monkeypatch):
    """With lam0 fixed at 0.75 the box side is sqrt(1 - 0.75) = half the image: every box away from the borders
    is 100 x 100 on a 200-px image (clipped ones are smaller), and lam is the kept area fraction."""
    import mlic_lib.mixing as mixing

    monkeypatch.setattr(mixing, "_beta", lambda alpha, generator: 0.75)
    g = torch.Generator().manual_seed(0)
    inside = 0
    for _ in range(200):
        p = CutMix(0.5).sample(4, 200, 200, generator=g)
        x0, y0, x1, y1 = p["box"]
        assert x1 - x0 <= 100 and y1 - y0 <= 100
        assert p["lam"] == pytest.approx(1 - (x1 - x0) * (y1 - y0) / 200 ** 2)
        if 0 < x0 and x1 < 200 and 0 < y0 and y1 < 200:
            inside += 1
            assert (x1 - x0, y1 - y0) == (100, 100)
    assert inside > 20


def test_mosaic_centre_of_a_wide_batch_follows_the_width():
    """The centre's column is drawn along W and clamped to W - 1 (not H - 1): on a 16x64 batch with the centre at
    75% of the sides, the top-left quadrant is 48 columns wide and shows the last 48 columns of image 0."""
    x = torch.arange(2 * 1 * 16 * 64, dtype=torch.float32).reshape(2, 1, 16, 64)
    y = torch.eye(2)
    boxes = pad_boxes([torch.tensor([[0, 0, 0, 64, 16]]), torch.tensor([[1, 0, 0, 64, 16]])])
    res = Mosaic(center_range=(0.75, 0.75))(x, y, boxes, generator=torch.Generator().manual_seed(0))
    cx, cy = res.info["center"]
    assert (cx, cy) == (48, 12)
    torch.testing.assert_close(res.x[0, :, :12, :48], x[0, :, 16 - 12:, 64 - 48:])


def test_mosaic_keeps_a_box_with_exactly_half_its_area_in_the_crop():
    """Sec. IV-C-1: a class stays when *at least* half of its box area survives; a box cut exactly in half by
    the centre is kept (and one with less than half is dropped)."""
    H = 8
    x = torch.zeros(1, 1, H, H)
    y = torch.zeros(1, 3)
    y[0] = 1
    # centre (4, 4); the TL quadrant shows source rows/cols 4..8, TR rows 4..8 / cols 0..4, BL rows 0..4 / cols 4..8,
    # BR rows 0..4 / cols 0..4. Class 0: x 2..6, y 4..8 (area 16), 8 in TL and 8 in TR: exactly half in each.
    # Class 1: x 1..8, y 0..8 (area 56), at most 16 of it in any crop (< 28) -> dropped.
    # Class 2: x 4..8, y 4..8, entirely in TL's crop -> kept.
    boxes = pad_boxes([np.array([[0, 2, 4, 6, 8], [1, 1, 0, 8, 8], [2, 4, 4, 8, 8]])])
    res = Mosaic(center_range=(0.5, 0.5))(x, y, boxes, generator=torch.Generator().manual_seed(0))
    assert res.info["center"] == (4, 4)
    assert res.y[0].tolist() == [1.0, 0.0, 1.0]
    lo = Mosaic(min_area_ratio=0.51, center_range=(0.5, 0.5))(x, y, boxes, generator=torch.Generator().manual_seed(0))
    assert lo.y[0].tolist() == [0.0, 0.0, 1.0]


def test_batch_augmentation_shift_reaches_max_shift_of_the_side():
    """The shift of each copy's window is uniform up to ``max_shift`` of the side, i.e. ``2 * max_shift`` in the
    normalised [-1, 1] coordinates of ``affine_grid`` (capped at ``1 - scale`` so the window stays inside). On a
    linear ramp in normalised x the mean of a sampled row is the window's centre, i.e. the shift itself."""
    W = 64
    coords = (torch.arange(W, dtype=torch.float64) * 2 + 1) / W - 1  # pixel centres, align_corners=False
    ramp = coords.expand(200, 1, 8, W).contiguous()
    aug = BatchAugmentation(m=1, max_shift=0.125, scale=(0.5, 0.5))
    res = aug(ramp, torch.zeros(200, 2, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    shift = res.x.mean(dim=(1, 2, 3))  # = t_x, uniform on [-room, room], room = min(1 - s, 2 max_shift) = 0.25
    assert shift.abs().max() <= 0.25 + 1e-9
    assert shift.abs().max() > 0.2  # 200 uniform draws on [-0.25, 0.25]: the largest |t| is above 0.2
    assert 0.25 / 2 - 0.03 < shift.abs().mean() < 0.25 / 2 + 0.03  # E|t| = room / 2


def test_mixup_and_cutmix_default_to_the_papers_alpha():
    """alpha = 0.5 is the paper's grid-searched value (Sec. IV-C-1), the default of both transforms (used as they
    are by e.g. noisy_correlation_ratios); the default Mixup draws lam from Beta(0.5, 0.5), not the uniform."""
    from scipy import stats

    assert Mixup().alpha == CutMix().alpha == 0.5
    assert repr(Mixup()) == "Mixup(alpha=0.5)" and repr(CutMix()) == "CutMix(alpha=0.5)"
    g = torch.Generator().manual_seed(0)
    lams = [Mixup().sample(2, generator=g)["lam"] for _ in range(1000)]
    assert stats.kstest(lams, stats.uniform().cdf).pvalue < 1e-3


def test_one_grid_may_be_given_as_a_string():
    """``grids="2x2"`` (and ``-o mixing.grids=2x2``) was split into the one-character grids '2', 'x', '2'."""
    from mlic_lib.profiles import load_profile
    from mlic_lib.splicemix_cl import make_step

    assert SpliceMix(grids="2x2").grids == SpliceMix(grids=["2x2"]).grids == SpliceMix(grids={"2x2": 1.0}).grids
    mixing = load_profile("splicemix", "smoke", ["mixing.grids=2x2"])["mixing"]
    assert make_step("splicemix", mixing).splicemix.grids == [(2, 2)]


def test_biased_pair_map_averages_over_the_pairs_it_can_score():
    """A pair without any exclusive image has no exclusive AP (NaN); the mean is over the other pairs."""
    nat_t = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]])
    exc_t = np.array([[1, 0, 0, 0], [0, 0, 1, 1]])  # pair (2, 3): its only row with 2 also has 3
    co_t = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
    got = biased_pair_map([(0, 1), (2, 3)], (nat_t.astype(float), nat_t), (exc_t.astype(float), exc_t),
                          (co_t.astype(float), co_t))
    assert np.isnan(got["per_pair"]["exclusive"][1]) and got["exclusive_mAP"] == 1.0
    assert got["cooccur_mAP"] == 1.0


# ------------------------------------------------------------------------------------- mutation follow-ups (round 2)
def _tiny_model_and_batch():
    torch.manual_seed(0)
    model = build_model("small_resnet", 5, widths=(4, 8, 8, 8)).eval()
    return model, torch.randn(16, 3, 32, 32), (torch.rand(16, 5) > 0.5).float()


def test_splicemix_cl_weight_scales_the_cell_term():
    """SpliceMixStep's loss is the plain SpliceMix BCE plus cl_weight times the logged cell term (Eq. 7, weighted)."""
    model, x, y = _tiny_model_and_batch()
    cpu = torch.device("cpu")
    torch.manual_seed(3)
    base, _ = SpliceMixStep(SpliceMix({"2x2": 1.0}, p_drop=0.0))(model, [x, y], cpu)
    for w in (0.5, 2.0):
        torch.manual_seed(3)
        loss, logs = SpliceMixStep(SpliceMix({"2x2": 1.0}, p_drop=0.0), cl_weight=w)(model, [x, y], cpu)
        torch.testing.assert_close(loss, base + w * logs["loss_cl"])


def test_mix_steps_are_the_mean_bce_and_splicemix_logs_each_part():
    """MixStep is the mean BCE over images and classes; SpliceMixStep logs the mean BCE of the regular and of the
    mixed images separately, and its loss is the mean over both."""
    model, x, y = _tiny_model_and_batch()
    cpu = torch.device("cpu")
    loss, _ = MixStep()(model, [x, y], cpu)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(model(x), y))
    mixer = SpliceMix({"2x2": 1.0}, p_drop=0.0)
    torch.manual_seed(3)
    loss, logs = SpliceMixStep(mixer)(model, [x, y], cpu)
    torch.manual_seed(3)
    res = mixer(x, y)  # the same draw
    parts = F.binary_cross_entropy_with_logits(model(res.x), res.y, reduction="none")
    torch.testing.assert_close(logs["loss_regular"], F.binary_cross_entropy_with_logits(model(x), y))
    torch.testing.assert_close(logs["loss_mixed"], parts[16:].mean())
    torch.testing.assert_close(loss, parts.mean())


def test_splicemix_cl_step_defaults_are_the_papers():
    """make_step without options is the paper's SpliceMix-CL: p_drop 0.3, |B'| = B // 4, cl_weight 1, detached p̄."""
    step = make_step("splicemix_cl", {})
    assert (step.cl_weight, step.detach, step.cl_form, step.cl_norm) == (1.0, True, "bce", "paper")
    assert step.splicemix.p_drop == 0.3
    assert step.splicemix(torch.zeros(16, 3, 8, 8), torch.zeros(16, 5)).layout.n_mixed == 4


def test_mixed_label_of_soft_labels_is_the_max_over_the_kept_cells():
    """Eq. 3's union of soft labels is their maximum over the kept cells (not a clipped sum)."""
    y = torch.tensor([[0.2, 0.9], [0.7, 0.4], [0.5, 0.5], [0.1, 0.0]])
    layout = GridLayout(1, 2, torch.tensor([[0, 1], [2, 3]]), torch.tensor([[True, True], [True, False]]), 4)
    torch.testing.assert_close(SpliceMix.mix_labels_for(y, layout), torch.tensor([[0.7, 0.9], [0.5, 0.5]]))


def test_cutmix_box_of_a_wide_image_scales_each_side_with_its_own_length(monkeypatch):
    """On a 100 x 400 (H x W) image with lam0 = 0.75 an unclipped box is 50 rows by 200 columns."""
    import mlic_lib.mixing as mixing

    monkeypatch.setattr(mixing, "_beta", lambda alpha, generator: 0.75)
    g = torch.Generator().manual_seed(0)
    inside = 0
    for _ in range(200):
        x0, y0, x1, y1 = CutMix(0.5).sample(4, 100, 400, generator=g)["box"]
        assert 0 <= y0 <= y1 <= 100 and 0 <= x0 <= x1 <= 400
        if 0 < x0 and x1 < 400 and 0 < y0 and y1 < 100:
            inside += 1
            assert (y1 - y0, x1 - x0) == (50, 200)
    assert inside > 20


@pytest.mark.parametrize("size,batch,expected", [(0.25, 7, 1), (0.25, 6, 1), (0.29, 100, 29), (0.5, 5, 2)])
def test_mixed_set_size_is_the_floor_of_the_fraction_of_the_batch(size, batch, expected):
    assert SpliceMix(mixed_size=size).n_mixed(batch) == expected


def test_noisy_ratios_drop_last_leaves_out_only_the_last_partial_batch():
    labels = (torch.rand(10, 4, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    assert noisy_correlation_ratios(labels, None, batch_size=4)["n_samples"] == 10
    assert noisy_correlation_ratios(labels, None, batch_size=4, drop_last=True)["n_samples"] == 8
    assert noisy_correlation_ratios(labels[:8], None, batch_size=4, drop_last=True)["n_samples"] == 8
    spliced = noisy_correlation_ratios(labels, SpliceMix({"2x2": 1.0}), batch_size=4, drop_last=True)
    assert spliced["n_samples"] == 8 + 2  # two full batches of 4, each with 4 // 4 = 1 mixed image


def test_noisy_ratios_pass_the_image_size_to_cutmix():
    """On a 1-pixel image every CutMix box is empty (lam = 1), so its labels are the batch's own and the ratios are
    the baseline's; on the default 448-px image the boxes mix single-label images into never-seen pairs."""
    labels = torch.eye(4).repeat(8, 1)  # single-label images: no pair of classes co-occurs
    base = noisy_correlation_ratios(labels, None, batch_size=8)
    assert base["r_in"] == base["r_out"] == 0.0
    tiny = noisy_correlation_ratios(labels, CutMix(), batch_size=8, image_size=(1, 1))
    assert (tiny["r_in"], tiny["r_out"]) == (0.0, 0.0)
    assert noisy_correlation_ratios(labels, CutMix(), batch_size=8)["r_out"] > 0


def test_cell_logits_split_a_non_square_map_by_its_rows_and_its_columns():
    """On a wide 6 x 14 feature map a 2x3 grid's cells are rows 0-3-6 by columns 0-5-9-14 (the map's height split
    into the grid's rows, its width into the columns): every cell written out."""
    torch.manual_seed(0)
    model = build_model("small_resnet", 5, widths=(4, 8, 8, 8)).eval()
    lay = GridLayout(2, 3, torch.arange(12).view(2, 6), torch.ones(2, 6, dtype=torch.bool), 12)
    fmap = torch.randn(2, 8, 6, 14)
    out = cell_logits(model, fmap, lay)
    rows, cols = [0, 3, 6], [0, 5, 9, 14]
    for k in range(6):
        i, j = divmod(k, 3)
        ref = model.classifier(fmap[:, :, rows[i]:rows[i + 1], cols[j]:cols[j + 1]].amax(dim=(2, 3)))
        torch.testing.assert_close(out[:, k], ref)


def test_cl_kl_form_without_detach_is_the_kl_divergence_in_both_arguments():
    """form='kl', detach=False: the loss is KL(p̄ || p') with p̄ trained too, so its gradient w.r.t. the regular
    logits is that of the KL written out (the entropy term included), not of the BCE alone."""
    torch.manual_seed(2)
    lay = _layout(drop=(1, 2))
    reg = torch.randn(12, 7, requires_grad=True)
    cells = torch.randn(3, 4, 7, requires_grad=True)
    consistency_loss(cells, reg, lay, detach=False, form="kl").backward()
    reg2, cells2 = reg.detach().clone().requires_grad_(True), cells.detach().clone().requires_grad_(True)
    p, q = torch.sigmoid(reg2[lay.sources]), torch.sigmoid(cells2)
    keep = lay.keep[..., None].expand(3, 4, 7)
    (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log())[keep].mean().backward()
    torch.testing.assert_close(reg.grad, reg2.grad)
    torch.testing.assert_close(cells.grad, cells2.grad)


def test_splicemix_cl_step_uses_its_cl_form():
    """SpliceMixStep(cl_form='kl') trains Eq. 6 minus the target's entropy: with the same draw its cell term is the
    BCE form's less the (positive) entropy of the regular predictions over the kept cells."""
    model, x, y = _tiny_model_and_batch()
    cpu = torch.device("cpu")
    mixer = SpliceMix({"2x2": 1.0}, p_drop=0.0)
    logs = {}
    for form in ("bce", "kl"):
        torch.manual_seed(3)
        logs[form] = SpliceMixStep(mixer, cl_weight=1.0, cl_form=form)(model, [x, y], cpu)[1]["loss_cl"]
    torch.manual_seed(3)
    res = mixer(x, y)  # the same draw
    with torch.no_grad():
        logits = model(res.x)
    p = torch.sigmoid(logits[:16][res.layout.sources])
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum() / logits.numel()  # all cells kept (p_drop 0)
    torch.testing.assert_close(logs["bce"] - logs["kl"], entropy, rtol=1e-4, atol=1e-6)


def test_splicemix_from_empty_options_is_the_papers_splicemix():
    """Without options the chapter's SpliceMix is the paper's / authors': p_drop 0.3, p_transpose 0.5, |B'| = B/4,
    fill 0 (the defaults of SpliceMix itself)."""
    from mlic_lib.splicemix_cl import splicemix_from_options

    sm, ref = splicemix_from_options({}), SpliceMix()
    assert (sm.p_drop, sm.p_transpose, sm.mixed_size, sm.fill) == (0.3, 0.5, 0.25, 0.0)
    assert (sm.p_drop, sm.p_transpose, sm.mixed_size, sm.fill, sm.grids) == (ref.p_drop, ref.p_transpose,
                                                                           ref.mixed_size, ref.fill, ref.grids)


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")  # every pair NaN: the means too

def test_biased_pair_map_has_no_ap_without_natural_images_lacking_the_biased_class():
    """With every natural image holding b there is no negative to rank against: NaN, not an AP of 1."""
    nat_t = np.array([[1, 0, 1], [1, 1, 0]])  # both natural images hold b = 0
    exc_t, co_t = np.array([[1, 0, 0]]), np.array([[1, 1, 0]])
    got = biased_pair_map([(0, 1)], (nat_t.astype(float), nat_t), (exc_t.astype(float), exc_t),
                          (co_t.astype(float), co_t))
    assert np.isnan(got["per_pair"]["exclusive"][0]) and np.isnan(got["per_pair"]["cooccur"][0])
