"""CellAugment: RandAugment + Cutout on every non-empty cell of composite canvases (INDeeD's ML-CIFAR-10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlic_lib import indeed
from mlic_lib.data import TensorImageDataset
from mlic_lib.data.canvas_augment import CellAugment


def _canvases(n: int = 6, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    pool = rng.integers(1, 255, (40, 3, 32, 32), dtype=np.uint8), np.arange(40) % 10
    return indeed.make_ml_cifar10(n, k, seed=seed, pool=pool)


def _cells(x: torch.Tensor, g: int = 3) -> torch.Tensor:
    n, c, height, width = x.shape
    return x.reshape(n, c, g, height // g, g, width // g).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c, -1)


def test_cutout_makes_one_clipped_hole_per_occupied_cell_and_leaves_empty_cells_empty():
    cs = _canvases()
    x = torch.from_numpy(cs.images)
    before = x.clone()
    torch.manual_seed(0)
    out = CellAugment(randaugment=False, cutout=16, fill=(10, 20, 30))(x)
    assert torch.equal(x, before)  # the input is not modified
    assert out.shape == x.shape and out.dtype == torch.uint8
    fill = torch.tensor([10, 20, 30]).view(3, 1)
    for cell_in, cell_out, cls in zip(_cells(x).flatten(0, 1), _cells(out).flatten(0, 1), cs.cells.ravel(),
                                      strict=True):
        changed = (cell_in != cell_out).any(0)
        if cls < 0:
            assert not cell_out.any()
            continue
        where = (cell_out == fill).all(0)
        assert changed.sum() > 0 and bool((~changed | where).all())  # every changed pixel has the fill colour
        ys, xs = torch.nonzero(where.view(32, 32), as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert 1 <= h <= 16 and 1 <= w <= 16 and int(where.sum()) == h * w  # one axis-aligned square, clipped
        assert (h == 16 or ys.min() == 0 or ys.max() == 31) and (w == 16 or xs.min() == 0 or xs.max() == 31)


def test_randaugment_changes_occupied_cells_only_and_is_seeded():
    cs = _canvases(n=8)
    x = torch.from_numpy(cs.images)
    aug = CellAugment(randaugment=True, cutout=0)
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    assert torch.equal(a, b)
    cells_in, cells_out = _cells(x).flatten(0, 1), _cells(a).flatten(0, 1)
    occupied = torch.from_numpy(cs.cells.ravel() >= 0)
    assert not cells_out[~occupied].any()
    assert (cells_in[occupied] != cells_out[occupied]).flatten(1).any(1).float().mean() > 0.5


def test_default_fill_is_the_normalisation_mean_so_the_hole_is_zero_after_normalising():
    cs = _canvases(n=2)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ds = TensorImageDataset(cs.images, cs.targets, mean, std, transform=CellAugment(randaugment=False, mean=mean))
    torch.manual_seed(0)
    x, _ = ds[0]
    plain, _ = TensorImageDataset(cs.images, cs.targets, mean, std)[0]
    diff = (x != plain).any(0)
    assert diff.any() and x[:, diff].abs().max() < 0.01
    batch = ds.__getitems__([0, 1])
    assert len(batch) == 2 and batch[0][0].shape == (3, 96, 96)


def test_indeed_data_augments_training_canvases_only():
    rng = np.random.default_rng(0)
    pools = {("cifar10", s): (rng.integers(1, 255, (40, 3, 32, 32), dtype=np.uint8), np.arange(40) % 10)
             for s in ("train", "test")}
    d = indeed.indeed_data({"source": "cifar10", "n_train": 8, "n_test": 6, "augment": {"randaugment": True,
                                                                                      "cutout": 16}}, 3, pools=pools)
    assert isinstance(d.train_ds.transform, CellAugment) and d.test_ds.transform is None
    assert d.train_ds.transform.fill == (125, 123, 114)
    with pytest.raises(ValueError, match="data.augment"):
        indeed.indeed_data({"source": "cifar10", "n_train": 8, "n_test": 6, "augment": {"mixup": True}}, 3,
                           pools=pools)


def test_bad_inputs():
    with pytest.raises(ValueError, match="cutout"):
        CellAugment(cutout=-1)
    with pytest.raises(ValueError, match="fill"):
        CellAugment(fill=(300, 0, 0))
    with pytest.raises(ValueError, match="uint8"):
        CellAugment()(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match="grid"):
        CellAugment()(torch.zeros(1, 3, 95, 96, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channel"):
        CellAugment(fill=(1, 2, 3))(torch.zeros(1, 1, 96, 96, dtype=torch.uint8))
    # a hole as large as a cell can erase the cell's labelled object (14-px cells of 2x downsampled ML-MNIST)
    with pytest.raises(ValueError, match="cutout=14 px can hide a whole 14x14 cell"):
        CellAugment(cutout=14)(torch.zeros(1, 1, 42, 42, dtype=torch.uint8))


def test_the_indeed_profile_refuses_a_cutout_as_large_as_a_cell():
    """-o data.augment={cutout: 16} on the default profile (28-px cells downsampled by 2) erased 30 % of the labelled
    digits: refused when the profile loads, before any canvas is drawn."""
    from mlic_lib.profiles import load_profile

    with pytest.raises(ValueError, match=r"data.augment.cutout=16 px can hide a whole 14-pixel cell"):
        load_profile("indeed", "default", {"data.augment": {"randaugment": False, "cutout": 16}})
    load_profile("indeed", "default", {"data.augment": {"randaugment": False, "cutout": 8}})


@pytest.mark.parametrize("name", ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                                  "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
                                  "Equalize"])
def test_batched_randaugment_ops_equal_torchvisions_image_by_image(name):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import RandAugment, _apply_op

    from mlic_lib.data.canvas_augment import RANDAUGMENT_OPS, _magnitude, randaugment_op

    assert name in RANDAUGMENT_OPS
    space = RandAugment()._augmentation_space(31, (32, 30))
    mags, signed = space[name]
    want_mag = float(mags[9]) if mags.ndim > 0 else 0.0
    assert _magnitude(name, 32, 30) == pytest.approx(want_mag)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 3, 32, 30), dtype=np.uint8))
    for sign in (1.0, -1.0) if signed else (1.0,):
        got = randaugment_op(x, name, sign * want_mag)
        want = torch.stack([_apply_op(im, name, sign * want_mag, InterpolationMode.NEAREST, None) for im in x])
        assert torch.equal(got, want), (name, sign)


def test_randaugment_draws_every_op_with_both_signs(monkeypatch):
    from mlic_lib.data import canvas_augment

    seen = []

    def record(images, name, magnitude):
        seen.extend([(name, magnitude >= 0)] * len(images))
        return images

    monkeypatch.setattr(canvas_augment, "randaugment_op", record)
    torch.manual_seed(0)
    CellAugment(randaugment=True, cutout=0)(torch.from_numpy(_canvases(n=200, k=7).images))
    assert len(seen) == 2 * 200 * 7  # two operations per occupied cell
    names = [s[0] for s in seen]
    counts = np.array([names.count(op) for op in canvas_augment.RANDAUGMENT_OPS]) / len(names)
    assert np.abs(counts - 1 / 14).max() < 0.02
    assert 0.4 < np.mean([pos for name, pos in seen if name == "Rotate"]) < 0.6


def test_cutout_holes_are_centred_on_a_uniform_pixel_of_the_cell():
    """A 16 px hole centred at a uniform pixel of a 32 px cell reaches each border of the cell about 8 or 9 times in
    32; a hole whose corner were drawn instead would almost never touch the top or the left border."""
    cs = _canvases(n=60, k=7)
    torch.manual_seed(1)
    out = CellAugment(randaugment=False, cutout=16, fill=(10, 20, 30))(torch.from_numpy(cs.images))
    fill = torch.tensor([10, 20, 30]).view(3, 1)
    hole = (_cells(out).flatten(0, 1) == fill).all(1).view(-1, 32, 32)[torch.from_numpy(cs.cells.ravel() >= 0)]
    touches = torch.stack([hole[:, 0].any(1), hole[:, -1].any(1), hole[:, :, 0].any(1), hole[:, :, -1].any(1)])
    frac = touches.float().mean(1)  # top, bottom, left, right
    assert ((frac > 0.18) & (frac < 0.4)).all(), frac


def test_a_cell_with_black_pixels_is_occupied():
    """Only an all-zero cell is empty: an image with some black pixels (CIFAR has them) is augmented too."""
    cs = _canvases(n=4)
    x = torch.from_numpy(cs.images).clone()
    for n, k in zip(*np.nonzero(cs.cells >= 0), strict=True):
        r, c = divmod(int(k), 3)
        x[n, :, 32 * r, 32 * c] = 0  # one black pixel in every occupied cell
    torch.manual_seed(0)
    out = CellAugment(randaugment=False, cutout=16, fill=(10, 20, 30))(x)
    changed = (_cells(x) != _cells(out)).flatten(2).any(2).flatten()
    np.testing.assert_array_equal(changed.numpy(), cs.cells.ravel() >= 0)
