"""Tests for mlic_lib.analysis: figure style, class-activation maps, t-SNE helpers."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from torch import nn  # noqa: E402

from mlic_lib.analysis import (  # noqa: E402
    CAM_METHODS,
    OKABE_ITO,
    PROVENANCE_GID,
    annotate_provenance,
    cam_colorbar,
    cam_in_box,
    cam_in_boxes,
    cam_reading,
    class_activation_maps,
    class_bars,
    cluster_quality,
    group_order,
    heatmap,
    label_axes,
    overlay,
    paired_class_activation_maps,
    show_scene,
    tsne_embed,
    use_style,
)

# ----------------------------------------------------------------------------------------- style


@pytest.fixture
def styled():
    with matplotlib.rc_context():
        use_style()
        yield
    plt.close("all")


def test_use_style_light_backgrounds_and_settings(styled):
    fig, ax = plt.subplots()
    assert all(c >= 0.95 for c in to_rgba(fig.get_facecolor())[:3])
    assert to_rgba(ax.get_facecolor()) == to_rgba("white")
    assert not ax.spines["top"].get_visible() and not ax.spines["right"].get_visible()
    rc = matplotlib.rcParams
    assert rc["figure.dpi"] == 110 and rc["savefig.dpi"] == 150
    assert rc["figure.constrained_layout.use"] is True
    assert rc["image.cmap"] == "viridis"
    assert rc["savefig.transparent"] is False
    assert 10 <= rc["font.size"] <= 11
    assert to_rgba(rc["axes.prop_cycle"].by_key()["color"][0]) == to_rgba(OKABE_ITO[0])
    text_rgb = to_rgba(rc["text.color"])[:3]
    assert max(text_rgb) < 0.3  # dark text


def test_use_style_idempotent(styled):
    first = dict(matplotlib.rcParams)
    use_style()
    assert dict(matplotlib.rcParams) == first


def test_rendered_figure_is_opaque_white(styled):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    fig.canvas.draw()
    px = np.asarray(fig.canvas.buffer_rgba())
    assert tuple(px[0, 0]) == (255, 255, 255, 255)
    assert tuple(px[-1, -1]) == (255, 255, 255, 255)


def test_label_axes(styled):
    fig, ax = plt.subplots()
    assert label_axes(ax, "recall", "precision", title="PR") is ax
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("recall", "precision", "PR")
    label_axes(ax, "a", "b")
    assert ax.get_title() == "PR"


def test_annotate_provenance(styled):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlabel("x")
    text = "profile=default, seeds=0,1,2, data=embedded scenes"
    artist = annotate_provenance(fig, text)
    assert text in [t.get_text() for t in fig.texts]
    assert artist.get_gid() == PROVENANCE_GID
    x, y = artist.get_position()
    assert x < 0.1 and y < 0.1  # bottom-left
    artist = annotate_provenance(fig, "profile=smoke")  # replaces, does not stack
    texts = [t.get_text() for t in fig.texts if t.get_gid() == PROVENANCE_GID]
    assert texts == ["profile=smoke"]
    fig.canvas.draw()  # layout engine accepts the shrunk rectangle
    # the x label stays above the footnote
    renderer = fig.canvas.get_renderer()
    assert ax.xaxis.label.get_window_extent(renderer).y0 >= artist.get_window_extent(renderer).y1 - 1


# ------------------------------------------------------------------------------------------- CAM


class TinyCNN(nn.Module):
    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(8, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class PlantedCNN(nn.Module):
    """Class 0 = max of a 5x5 brightness filter, class 1 = max of a darkness filter, class 2 = mix."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 5, padding=2)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight[0].fill_(1.0 / 75)
            self.conv.weight[1].fill_(-1.0 / 75)
            self.conv.bias.copy_(torch.tensor([0.0, 1.0]))
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.act(self.conv(x))).flatten(1))


BOX = (8, 10, 20, 22)  # x0, y0, x1, y1 of the bright square


@pytest.fixture
def square_image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    img = 0.03 * torch.rand(3, 32, 32, generator=g)  # dark, slightly noisy background
    x0, y0, x1, y1 = BOX
    img[:, y0:y1, x0:x1] = 1.0
    return img


@pytest.fixture
def tiny() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_cam_shape_range_and_mode_restored(tiny, method):
    img = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(1))
    tiny.train()
    tiny.features[1].eval()  # mixed modes must come back exactly
    maps = class_activation_maps(tiny, tiny.features[3], img, [0, 1, 2], method=method)
    assert maps.shape == (3, 20, 24) and maps.dtype == np.float32
    assert np.all(np.isfinite(maps)) and maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    assert tiny.training and not tiny.features[1].training and tiny.features[0].training
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())
    assert all(p.grad is None for p in tiny.parameters())


def test_cam_batched_equals_single_and_accepts_4d(tiny):
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    layer = tiny.features[3]
    maps = class_activation_maps(tiny, layer, img, [2, 0])
    single = class_activation_maps(tiny, layer, img[0], 0, device="cpu")
    np.testing.assert_array_equal(class_activation_maps(tiny, layer, img, np.array([2.0, 0.0])), maps)  # float boxes
    assert single.shape == (1, 16, 16)
    np.testing.assert_allclose(maps[1], single[0], atol=1e-5)
    chunked = class_activation_maps(tiny, layer, img, [2, 0, 1], batch_size=2)
    np.testing.assert_allclose(chunked[:2], maps, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        class_activation_maps(tiny, layer, img, [0], batch_size=0)


def test_paired_cams_are_the_single_image_maps_of_each_pair(tiny):
    """Map i explains class i on image i, whatever the chunking, and equals the single-image call."""
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    classes = [2, 0, 1, 1, 0]
    layer = tiny.features[3]
    tiny.train()
    paired = paired_class_activation_maps(tiny, layer, images, classes, batch_size=2)
    assert paired.shape == (5, 16, 16) and paired.dtype == np.float32 and tiny.training
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules()) and all(p.grad is None for p in tiny.parameters())
    for i, c in enumerate(classes):
        np.testing.assert_allclose(paired[i], class_activation_maps(tiny, layer, images[i], [c])[0], atol=1e-5)
    np.testing.assert_allclose(paired_class_activation_maps(tiny, layer, images, classes, batch_size=None), paired,
                               atol=1e-5)
    with pytest.raises(ValueError, match="one class per image: got 2 class indices for 5 images"):
        paired_class_activation_maps(tiny, layer, images, [0, 1])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        paired_class_activation_maps(tiny, layer, images[0], [0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        paired_class_activation_maps(tiny, layer, images, [0, 1, 2, 3, 0])
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())


def test_cam_errors_release_hooks(tiny):
    img = torch.rand(3, 16, 16)
    layer = tiny.features[3]
    with pytest.raises(ValueError, match="gradcam"):
        class_activation_maps(tiny, layer, img, [0], method="scorecam-typo")
    with pytest.raises(ValueError, match="out of range"):
        class_activation_maps(tiny, layer, img, [0, 3])
    with pytest.raises(ValueError, match="out of range"):
        class_activation_maps(tiny, layer, img, [5], method="eigencam")
    with pytest.raises(ValueError, match="class_indices is empty"):
        class_activation_maps(tiny, layer, img, [])
    with pytest.raises(ValueError, match="whole numbers, got 1.5"):  # was truncated to class 1
        class_activation_maps(tiny, layer, img, [0, 1.5])
    with pytest.raises(ValueError, match="one image"):
        class_activation_maps(tiny, layer, torch.rand(2, 3, 16, 16), [0])
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())


def test_cam_under_no_grad_and_frozen_model(square_image):
    """A frozen model under torch.no_grad() gives the very maps of the same model with gradients on."""
    model = PlantedCNN().requires_grad_(False)
    with torch.no_grad():
        maps = class_activation_maps(model, model.act, square_image, [0, 1])
    assert maps.shape == (2, 32, 32)
    assert not any(p.requires_grad for p in model.parameters())  # left frozen
    model.requires_grad_(True)  # the same model, unfrozen, outside no_grad
    reference = class_activation_maps(model, model.act, square_image, [0, 1])
    np.testing.assert_allclose(maps, reference, rtol=0, atol=1e-6)
    assert cam_in_box(maps[0], BOX) > 0.5 and cam_in_box(maps[1], BOX) < 0.1


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_planted_square(square_image, method):
    model = PlantedCNN()
    maps = class_activation_maps(model, model.act, square_image, [0, 1], method=method)
    bright, dark = maps
    assert cam_in_box(bright, BOX) > 0.5
    assert cam_in_box(bright, (20, 0, 32, 10)) < 0.1  # a same-size-ish box away from the square
    assert cam_in_box(dark, BOX) < 0.1  # the "darkness" class looks elsewhere
    # the peak of the class-0 map lies inside the square
    y, x = np.unravel_index(np.argmax(bright), bright.shape)
    assert BOX[0] <= x < BOX[2] and BOX[1] <= y < BOX[3]


class InplaceCNN(nn.Module):
    """conv -> ReLU(inplace=True) -> global average pool -> linear: the conv's output is overwritten in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def _reference_gradcam(model: InplaceCNN, img: torch.Tensor, cls: int) -> np.ndarray:
    """Grad-CAM written out (Selvaraju et al. 2017, Eq. 1-2) for the conv's own output A: the weights are the
    spatial means of d logit / dA, the map ReLU(sum_k w_k A_k), min-max normalised (pytorch-grad-cam's way)."""
    a = model.conv(img[None]).detach().requires_grad_(True)
    logit = model.head(torch.relu(a).mean((2, 3)))[0, cls]
    (grad,) = torch.autograd.grad(logit, a)
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * a).sum(1))[0].detach().numpy()
    cam = cam - cam.min()
    return cam / (cam.max() + 1e-7)


def test_cam_warns_when_the_target_layer_has_a_1x1_grid():
    """A 1x1 grid gives constant maps, which min-max normalisation turns into all-zero ("no evidence") maps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4, 2))
    x = torch.rand(3, 16, 16)
    with pytest.warns(UserWarning, match="1x1 grid"):
        maps = class_activation_maps(model, model[2], x, [0, 1])
    assert maps.shape == (2, 16, 16) and not maps.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layer with a grid: no warning
        class_activation_maps(model, model[0], x, [0])


def test_cam_of_a_layer_followed_by_an_inplace_op_matches_the_formula():
    """On the CPU pytorch-grad-cam kept the conv's output without a copy, so the in-place ReLU after it rewrote
    the kept activations: the map mixed rectified activations with the gradients of the unrectified ones (and
    differed from the same call on a GPU, where the copy is made first)."""
    model = InplaceCNN()
    img = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(4))
    maps = class_activation_maps(model, model.conv, img, [0, 1, 2])
    for k in range(3):
        np.testing.assert_allclose(maps[k], _reference_gradcam(model, img, k), atol=2e-4)  # eps 1e-7 / small max
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_the_indeed_models_cam_layers_are_the_rectified_last_conv_and_ignore_inplace_ops():
    """The simple CNN (ML-MNIST) and VGG-16 (ML-CIFAR-10) explain the ReLU after their last convolution, and a
    copy of the model whose ReLUs are not in place gives the same maps."""
    import copy

    from mlic_lib.indeed import VGG16Net
    from mlic_lib.models import SimpleCNN

    torch.manual_seed(0)
    for model, chans, size in ((SimpleCNN(3, in_chans=1, widths=(4, 6, 8), hidden=16, input_size=40), 1, 40),
                               (VGG16Net(3, in_chans=3, width=1 / 16, hidden=16, input_size=32), 3, 32)):
        model.eval()
        convs = [i for i, m in enumerate(model.modules()) if isinstance(m, nn.Conv2d)]
        mods = list(model.modules())
        layer_at = mods.index(model.cam_layer)
        assert isinstance(model.cam_layer, nn.ReLU) and layer_at > convs[-1]
        assert not any(isinstance(m, nn.Conv2d) for m in mods[convs[-1] + 1:layer_at]), type(model).__name__
        plain = copy.deepcopy(model)
        for m in plain.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        img = torch.rand(chans, size, size, generator=torch.Generator().manual_seed(5))
        got = class_activation_maps(model, model.cam_layer, img, [0, 2])
        want = class_activation_maps(plain, plain.cam_layer, img, [0, 2])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_cam_in_own_boxes_scores_every_object_against_a_loop(square_image):
    """One row per labelled object: its class map's CAM-in-box in its own box (as a loop of class_activation_maps
    and cam_in_box computes it), the uniform map's share, the model's probability; blank maps are NaN."""
    from mlic_lib.analysis import cam_in_own_boxes

    model = PlantedCNN().train()
    images = [square_image, torch.flip(square_image, dims=[2])]
    boxes = [np.array([[0, *BOX], [1, 0, 0, 8, 8]]), np.array([[0, 32 - BOX[2], BOX[1], 32 - BOX[0], BOX[3]]]),
             np.zeros((0, 5))]
    dataset = [(x, None) for x in images] + [(images[0], None)]
    got = cam_in_own_boxes(model, model.act, dataset, boxes)
    assert model.training  # restored
    assert got.image.tolist() == [0, 0, 1] and got.cls.tolist() == [0, 1, 0]
    for k, (j, row) in enumerate([(0, boxes[0][0]), (0, boxes[0][1]), (1, boxes[1][0])]):
        cam = class_activation_maps(model.eval(), model.act, images[j], [int(row[0])])[0]
        assert got.inside[k] == pytest.approx(cam_in_box(cam, row[1:]))
        assert got.uniform[k] == pytest.approx((row[3] - row[1]) * (row[4] - row[2]) / 32 ** 2)
        with torch.no_grad():
            assert got.prob[k] == pytest.approx(float(torch.sigmoid(model(images[j][None]))[0, int(row[0])]))
    assert got.inside[0] > 0.5 and got.inside[2] > 0.5  # the bright square, also mirrored
    assert len(cam_in_own_boxes(model, model.act, dataset, boxes, n=1).image) == 2
    one_by_one = cam_in_own_boxes(model, model.act, dataset, boxes, chunk=1)  # a pass per image: the same rows
    for a, b in zip(one_by_one, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        cam_in_own_boxes(model, model.act, dataset, boxes, chunk=0)
    with torch.no_grad():
        model.head.weight.zero_()  # every logit constant: no gradient, all-zero maps
    assert np.isnan(cam_in_own_boxes(model, model.act, dataset, boxes, n=1).inside).all()
    with pytest.raises(ValueError, match="no image to score"):
        cam_in_own_boxes(model, model.act, dataset, boxes, n=0)


# ------------------------------------------------------------------------------------ cam_in_box


def test_cam_in_box_uniform_map_gives_area_fraction():
    cam = np.ones((10, 20))
    assert cam_in_box(cam, (0, 0, 10, 5)) == pytest.approx(50 / 200)
    assert cam_in_box(cam, (0, 0, 20, 10)) == pytest.approx(1.0)
    assert cam_in_box(cam, (-5, -5, 5, 5)) == pytest.approx(25 / 200)  # clipped to the map
    assert cam_in_box(cam, (15, 8, 100, 100)) == pytest.approx(10 / 200)


def test_cam_in_box_half_open_point_mass():
    cam = np.zeros((6, 9))
    cam[3, 7] = 2.0  # row y=3, column x=7
    assert cam_in_box(cam, (7, 3, 8, 4)) == pytest.approx(1.0)
    assert cam_in_box(cam, (0, 0, 7, 3)) == 0.0
    assert cam_in_box(cam, (0, 0, 8, 3)) == 0.0
    assert cam_in_box(torch.from_numpy(cam), (6.6, 2.6, 7.9, 3.8)) == pytest.approx(1.0)  # rounded edges


def test_cam_in_box_outside_zero_map_and_errors():
    assert cam_in_box(np.ones((5, 5)), (10, 10, 20, 20)) == 0.0
    assert cam_in_box(np.ones((5, 5)), (-9, 0, -1, 5)) == 0.0
    assert np.isnan(cam_in_box(np.zeros((5, 5)), (0, 0, 3, 3)))  # no mass: undefined, not "all outside"
    assert np.isnan(cam_in_boxes(np.zeros((5, 5)), [(0, 0, 3, 3), (1, 1, 2, 2)])).all()
    for bad in [(3, 0, 3, 5), (0, 4, 5, 2), (4, 0, 1, 5)]:
        with pytest.raises(ValueError, match="x1 <= x0 or y1 <= y0"):
            cam_in_box(np.ones((5, 5)), bad)
    with pytest.raises(ValueError, match="negative values"):
        cam_in_box(-np.ones((5, 5)), (0, 0, 2, 2))
    with pytest.raises(ValueError, match="2-D map"):
        cam_in_box(np.ones((2, 5, 5)), (0, 0, 2, 2))


def test_cam_in_box_rounds_half_pixel_edges_up_so_a_shifted_box_keeps_its_width():
    """Boxes rescaled onto a map land on half pixels: half-to-even rounding made a 1-px box alternately empty and
    2 px wide as it moved by whole pixels."""
    u = np.ones((8, 8))
    for w in (1, 2):
        assert np.allclose([cam_in_box(u, (x0, 0, x0 + w, 8)) for x0 in (0.5, 1.5, 2.5, 3.5)], w / 8)
    cam = np.zeros((8, 8))
    cam[:, 2] = 1.0
    r = cam_reading(cam, np.array([[0, 1.5, 0, 2.5, 8]]), 0)  # the same edges: columns 2 .. 2
    assert r.peak_in == [0] and r.mass[0] == pytest.approx(1.0)


def test_cam_in_boxes_matches_loop():
    rng = np.random.default_rng(0)
    cam = rng.random((17, 23))
    x0 = rng.integers(-5, 20, size=50)
    y0 = rng.integers(-5, 15, size=50)
    boxes = np.stack([x0, y0, x0 + rng.integers(1, 12, 50), y0 + rng.integers(1, 12, 50)], axis=1)
    got = cam_in_boxes(cam, boxes)
    assert got.shape == (50,)
    for b, v in zip(boxes, got, strict=True):
        xa, ya, xb, yb = np.clip(b, 0, None)
        expected = cam[ya:yb, xa:xb].sum() / cam.sum()
        assert v == pytest.approx(expected)
    assert cam_in_boxes(cam, boxes[0]).shape == (1,)


# --------------------------------------------------------------------------------------- overlay


def test_overlay_tensor_and_uint8():
    img = torch.rand(3, 12, 16)
    cam = np.zeros((12, 16))
    cam[2:5, 3:9] = 1.0
    out = overlay(img, cam, alpha=0.4)
    assert out.shape == (12, 16, 3) and out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(overlay(img, cam, alpha=0.0), img.permute(1, 2, 0).numpy(), atol=1e-6)
    u8 = (np.random.default_rng(0).random((12, 16, 3)) * 255).astype(np.uint8)
    out_u8 = overlay(u8, cam[::2, ::2])  # smaller map is resized to the image
    assert out_u8.shape == (12, 16, 3) and out_u8.dtype == np.float64
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        overlay(img, cam, alpha=1.5)



def test_overlay_colours_the_map_as_it_is_and_resizes_it_bilinearly():
    """The map is coloured on its own [0, 1] scale (a uniform 0.5 map is cmap(0.5), not renormalised to its max),
    and a smaller map is resized bilinearly (half-pixel centres) before colouring."""
    from matplotlib import colormaps

    from mlic_lib.analysis import CMAP_HEAT

    heat = colormaps[CMAP_HEAT]
    flat = overlay(np.zeros((4, 4, 3)), np.full((4, 4), 0.5), alpha=1.0)
    np.testing.assert_allclose(flat, np.broadcast_to(heat(0.5)[:3], (4, 4, 3)))
    ramp = overlay(np.zeros((4, 4, 3)), np.array([[0.0, 1.0], [0.0, 1.0]]), alpha=1.0)
    np.testing.assert_allclose(ramp[0], heat(np.array([0.0, 0.25, 0.75, 1.0]))[:, :3], atol=1e-6)


def test_overlay_reads_a_uint8_tensor_as_0_to_255_like_a_uint8_array():
    """torchvision.io.read_image and torch.from_numpy of the scenes' canvases give uint8 (3, H, W) tensors."""
    arr = (np.random.default_rng(0).random((6, 9, 3)) * 255).astype(np.uint8)
    cam = np.random.default_rng(1).random((3, 3))
    from_tensor = overlay(torch.from_numpy(arr).permute(2, 0, 1), cam, alpha=0.3)
    np.testing.assert_allclose(from_tensor, overlay(arr, cam, alpha=0.3))
    np.testing.assert_allclose(overlay(torch.from_numpy(arr).permute(2, 0, 1), cam, alpha=0.0), arr / 255.0)


def test_overlay_clips_negative_values_and_shows_nan_as_zero_as_documented():
    from matplotlib import colormaps

    from mlic_lib.analysis import CMAP_HEAT

    heat = colormaps[CMAP_HEAT]
    signed = np.array([[-0.5, 0.25], [1.5, np.nan]])  # a difference of two maps, with a NaN
    out = overlay(np.zeros((2, 2, 3)), signed, alpha=1.0)
    np.testing.assert_allclose(out.reshape(4, 3), heat(np.array([0.0, 0.25, 1.0, 0.0]))[:, :3])
    resized = overlay(np.zeros((4, 4, 3)), np.array([[np.nan, 1.0], [1.0, 1.0]]), alpha=1.0)  # NaN does not spread
    assert np.all(np.isfinite(resized)) and np.allclose(resized[3, 3], heat(1.0)[:3])


def test_cam_colorbar_spans_unit_range_in_heat_map(styled):
    from mlic_lib.analysis import CMAP_HEAT

    fig, axes = plt.subplots(2, 3)
    cb = cam_colorbar(fig, axes[:, 1:], shrink=0.8)  # an array of panels is accepted
    assert (cb.norm.vmin, cb.norm.vmax) == (0.0, 1.0)
    assert cb.cmap.name == CMAP_HEAT
    assert "Grad-CAM" in cb.ax.get_ylabel()
    assert cam_colorbar(fig, axes[0, 0], label="x", cmap="viridis").cmap.name == "viridis"


# ------------------------------------------------------------------------------------ class bars


def test_class_bars_sorts_colours_and_labels_groups(styled):
    fig, ax = plt.subplots()
    values, groups = np.array([1.0, 3.0, 2.0, 3.0]), np.array([0, 1, 1, 2])
    order = class_bars(ax, values, list("abcd"), groups, ylabel="AP (%)")
    np.testing.assert_array_equal(order, [1, 3, 2, 0])  # descending, ties stable
    bars = ax.patches
    assert [b.get_height() for b in bars] == [3.0, 3.0, 2.0, 1.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["b", "d", "c", "a"]
    assert ax.get_xlabel() == "class (sorted by value, highest first)"
    assert bars[0].get_facecolor() == to_rgba(OKABE_ITO[1]) and bars[1].get_facecolor() == to_rgba(OKABE_ITO[2])
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["super-category 0", "super-category 1", "super-category 2"]
    assert [h.get_facecolor() for h in legend.legend_handles] == [to_rgba(c) for c in OKABE_ITO[:3]]
    _, ax2 = plt.subplots()
    class_bars(ax2, values, list("abcd"), groups, legend=False)
    assert ax2.get_legend() is None
    _, ax3 = plt.subplots()
    class_bars(ax3, values, list("abcd"))  # no groups: no colours to explain
    assert ax3.get_legend() is None


def test_class_bars_bad_input(styled):
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="one value per label"):
        class_bars(ax, np.ones(3), list("abcd"))
    with pytest.raises(ValueError, match="one super-category per class"):
        class_bars(ax, np.ones(4), list("abcd"), np.array([0, 1]))


# ------------------------------------------------------------------------------------- heat maps


def test_heatmap_refuses_a_matrix_that_does_not_match_its_labels(styled):
    fig, ax = plt.subplots()
    for bad in (np.zeros((4, 4)), np.zeros((3, 4)), np.zeros(9)):  # a class would be left out or misread
        with pytest.raises(ValueError, match="C x C matrix with C = 3 labels"):
            heatmap(ax, bad, ["a", "b", "c"])
    plt.close(fig)


def test_heatmap_refuses_an_order_or_groups_that_do_not_cover_the_classes(styled):
    """An order that drops or repeats a class would draw another matrix; groups of another length, wrong lines."""
    fig, ax = plt.subplots()
    for order in ([0, 1], [0, 0, 1], [0, 1, 3]):
        with pytest.raises(ValueError, match="order must be a permutation of the 3 classes"):
            heatmap(ax, np.zeros((3, 3)), ["a", "b", "c"], order=np.array(order))
    with pytest.raises(ValueError, match="groups has 4 entries for 3 classes"):
        heatmap(ax, np.zeros((3, 3)), ["a", "b", "c"], groups=np.array([0, 0, 1, 1]))
    plt.close(fig)


def test_show_scene_labels_float_boxes_and_draws_grey_images_in_grey(styled):
    img = (np.random.default_rng(0).random((3, 20, 30)) * 255).astype(np.uint8)
    fig, ax = plt.subplots()
    show_scene(ax, img, np.array([[1, 2, 3, 10, 12]]) * 1.5, ["cat", "dog"])  # rescaled boxes are float64
    assert [t.get_text() for t in ax.texts] == ["dog"] and len(ax.patches) == 1
    for grey in (img[0], img[:1], img[0][..., None]):
        fig, ax = plt.subplots()
        show_scene(ax, grey)
        assert ax.images[0].get_cmap().name == "gray" and ax.images[0].get_array().ndim == 2
    plt.close("all")


def test_group_order_sorts_by_super_category_stably():
    groups = np.array([2, 0, 1, 0, 2, 1])
    np.testing.assert_array_equal(group_order(groups), [1, 3, 2, 5, 0, 4])
    np.testing.assert_array_equal(group_order([1, 1, 1]), [0, 1, 2])  # one group: the original order


def test_heatmap_draws_the_reordered_matrix_with_group_lines(styled):
    S = np.arange(36.0).reshape(6, 6)  # every entry distinct and S != S.T: a wrong permutation shows
    groups = np.array([2, 0, 1, 0, 2, 1])
    order = group_order(groups)  # [1, 3, 2, 5, 0, 4]
    fig, ax = plt.subplots()
    im = heatmap(ax, S, list("abcdef"), order=order, cbar_label="P(j|i)", vmax=40.0, groups=groups)
    drawn = np.asarray(im.get_array())
    np.testing.assert_array_equal(drawn, S[order][:, order])
    assert drawn[0, 4] == S[1, 0] and drawn[4, 0] == S[0, 1] and drawn[2, 3] == S[2, 5]  # row i, column j
    names = ["b", "d", "c", "f", "a", "e"]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert im.get_clim() == (0.0, 40.0) and im.colorbar.ax.get_ylabel() == "P(j|i)"
    # reordered groups [0, 0, 1, 1, 2, 2]: one horizontal and one vertical line at each of the 2 boundaries
    horizontal = [line.get_ydata()[0] for line in ax.lines if line.get_ydata()[0] == line.get_ydata()[1]]
    vertical = [line.get_xdata()[0] for line in ax.lines if line.get_xdata()[0] == line.get_xdata()[1]]
    assert len(ax.lines) == 4 and sorted(horizontal) == sorted(vertical) == [1.5, 3.5]
    _, ax2 = plt.subplots()
    plain = heatmap(ax2, S, list("abcdef"))  # no order: the matrix as given, no lines
    np.testing.assert_array_equal(np.asarray(plain.get_array()), S)
    assert len(ax2.lines) == 0 and [t.get_text() for t in ax2.get_xticklabels()] == list("abcdef")
    fig3, ax3 = plt.subplots()
    bare = heatmap(ax3, S, list("abcdef"), tick_labels=False, colorbar=False)  # a panel beside a labelled one
    np.testing.assert_array_equal(np.asarray(bare.get_array()), S)
    assert bare.colorbar is None and len(fig3.axes) == 1  # no colour bar axes added
    assert not ax3.get_xticks().size and not ax3.get_yticks().size
    plt.close("all")


# ------------------------------------------------------------------------------------------ t-SNE


def _blobs(n_per: int = 20, dim: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0.0, 1.0, (n_per, dim)), rng.normal(12.0, 1.0, (n_per, dim))])
    y = np.repeat([0, 1], n_per)
    return x, y


@pytest.fixture(scope="module")
def blob_embedding() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = _blobs()
    return x, y, tsne_embed(x, seed=0, perplexity=10.0)


def test_tsne_shape_and_determinism(blob_embedding):
    x, _, emb = blob_embedding
    assert emb.shape == (40, 2) and np.all(np.isfinite(emb))
    np.testing.assert_allclose(tsne_embed(x, seed=0, perplexity=10.0), emb, rtol=1e-6, atol=1e-6)
    from_tensor = tsne_embed(torch.from_numpy(x), seed=0, perplexity=10.0)  # float64 tensor: same data
    np.testing.assert_allclose(from_tensor, emb, rtol=1e-6, atol=1e-6)


def test_tsne_perplexity_clamped_and_small_n():
    x = np.random.default_rng(1).normal(size=(10, 5))
    with pytest.warns(UserWarning, match="perplexity"):
        emb = tsne_embed(x, perplexity=30.0)
    assert emb.shape == (10, 2)
    with pytest.raises(ValueError, match="at least 4 points, got 3"):
        tsne_embed(x[:3])
    with pytest.raises(ValueError, match="perplexity must be > 0"):
        tsne_embed(x, perplexity=0.0)
    with pytest.raises(ValueError, match="needs at least 2 features, got 1"):
        tsne_embed(x[:, :1])
    for same in (np.zeros((10, 64)), np.ones((6, 3))):  # e.g. all-zero features: scikit-learn's Barnes-Hut segfaults
        with pytest.raises(ValueError, match=f"all {len(same)} points are identical"):
            tsne_embed(same)


def test_cluster_quality(blob_embedding):
    x, y, emb = blob_embedding
    assert cluster_quality(emb, y) > 0.7
    assert cluster_quality(x, y) > 0.7  # any dimension works
    random_labels = np.random.default_rng(3).integers(0, 2, size=len(y))
    assert abs(cluster_quality(emb, random_labels)) < 0.3
    assert -1.0 <= cluster_quality(emb, random_labels) <= 1.0
    with pytest.raises(ValueError, match="2 <= n_groups <= N - 1, got 1 groups for N=40"):
        cluster_quality(emb, np.zeros(len(y)))
    with pytest.raises(ValueError, match=r"labels must have shape \(40,\)"):
        cluster_quality(emb, y[:-1])


def test_cam_reading_peak_mass_and_leaning():
    cam = np.zeros((10, 10))
    cam[1:3, 1:3] = 1.0  # some mass on class 4's box
    cam[6:9, 6:9] = 2.0  # more, and the peak, on class 7's box
    cam[7, 7] = 5.0
    boxes = np.array([[4, 0, 0, 4, 4], [7, 5, 5, 10, 10], [2, 5, 5, 8, 8]])  # class 2's box holds the peak too
    rd = cam_reading(cam, boxes, 4)
    assert not rd.all_zero and rd.peak == (7, 7)
    assert rd.peak_in == [7, 2]
    np.testing.assert_allclose(rd.mass, cam_in_boxes(cam, boxes[:, 1:]))
    assert rd.heavier == [2, 7]  # both hold more of the map than class 4's own box
    np.testing.assert_allclose(rd.uniform, [16 / 100, 25 / 100, 9 / 100])  # each box's share of the 10x10 map
    assert cam_reading(cam, boxes, 7).heavier == []  # its own box has the most mass
    assert cam_reading(cam, boxes, 9).heavier == [2, 4, 7]  # no box of its own: every box with mass
    # a class with two boxes is judged by its heavier one
    two = np.vstack([boxes, [4, 5, 5, 10, 10]])
    assert cam_reading(cam, two, 4).heavier == []
    zero = cam_reading(np.zeros((10, 10)), boxes, 4)
    assert zero.all_zero and zero.peak is None and zero.peak_in == [] and zero.heavier == []
    assert np.isnan(zero.mass).all()
    np.testing.assert_allclose(zero.uniform, rd.uniform)  # a property of the boxes, defined for a blank map too
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        cam_reading(cam, boxes[:, 1:], 4)



def test_cam_reading_on_a_wide_map_with_half_open_and_fractional_boxes():
    """(row, column) on a non-square map; a box's right edge is outside it; a fractional box holds the peak exactly
    when it holds its mass (both round to pixel edges, as cam_in_box)."""
    cam = np.zeros((4, 9))
    cam[1, 7] = 1.0
    rd = cam_reading(cam, np.array([[1, 3, 0, 7, 4], [2, 7, 0, 9, 4]]), 2)
    assert rd.peak == (1, 7) and rd.peak_in == [2]
    square = np.zeros((5, 5))
    square[2, 2] = 1.0
    rd = cam_reading(square, np.array([[1, 2.4, 0, 5, 5]]), 1)  # x0 = 2.4 rounds to column 2: the peak's
    assert rd.mass.tolist() == [1.0] and rd.peak_in == [1]


def test_cam_in_own_boxes_gives_each_object_its_own_images_probability(square_image):
    from mlic_lib.analysis import cam_in_own_boxes

    model = PlantedCNN().eval()
    images = [square_image, 0.3 * square_image]  # different probabilities (a mirror image has the same)
    boxes = [np.array([[0, *BOX]]), np.array([[0, *BOX], [2, *BOX]])]
    got = cam_in_own_boxes(model, model.act, [(x, None) for x in images], boxes)
    with torch.no_grad():
        p = [torch.sigmoid(model(x[None]))[0] for x in images]
    want = [float(p[0][0]), float(p[1][0]), float(p[1][2])]
    assert want[0] != pytest.approx(want[1])
    np.testing.assert_allclose(got.prob, want, rtol=1e-5)


def test_tsne_perplexity_is_clamped_at_a_third_of_the_other_points():
    x = np.random.default_rng(1).normal(size=(10, 5))
    with pytest.warns(UserWarning, match=r"using \(N - 1\) / 3 = 3$"):
        tsne_embed(x, perplexity=3.2)  # 10 points: at most 9 / 3 = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tsne_embed(x, perplexity=3.0)


def test_tsne_is_sklearns_pca_initialised_tsne_with_the_seed():
    """On wide features (here 600) the PCA's randomised solver, hence the map, depends on the seed."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.random.default_rng(2).normal(size=(40, 600))
    with threadpool_limits(limits=1, user_api="openmp"):
        want = TSNE(n_components=2, perplexity=5.0, init="pca", random_state=3).fit_transform(x)
    got = tsne_embed(x, seed=3, perplexity=5.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(got - tsne_embed(x, seed=0, perplexity=5.0)).max() > 1.0


def test_cluster_quality_is_the_euclidean_silhouette_of_a_loop():
    rng = np.random.default_rng(4)
    e, lab = rng.normal(size=(15, 3)), np.repeat([0, 1, 2], 5)
    e[lab == 1] += 1.5
    d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
    s = []
    for i in range(len(e)):
        own = lab == lab[i]
        own[i] = False
        a = d[i, own].mean()
        b = min(d[i, lab == g].mean() for g in set(lab.tolist()) - {lab[i]})
        s.append((b - a) / max(a, b))
    assert cluster_quality(e, lab) == pytest.approx(np.mean(s))


# ------------------------------------------------------------------------------------- mutation follow-ups


def test_cam_refuses_a_negative_class_and_the_first_index_past_the_outputs(tiny):
    """Class -1 would silently explain the last logit, class n_classes nothing: both are errors for every method,
    eigencam (which never calls the targets) included."""
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(6))
    layer = tiny.features[3]
    with pytest.raises(ValueError, match="non-negative"):
        class_activation_maps(tiny, layer, img, [0, -1])
    with pytest.raises(ValueError, match="non-negative"):
        paired_class_activation_maps(tiny, layer, img[None], [-1])
    for method in sorted(CAM_METHODS):  # tiny has 3 outputs: class 3 is the first past them
        with pytest.raises(ValueError, match="class index 3 out of range for a model with 3 outputs"):
            class_activation_maps(tiny, layer, img, [3], method=method)
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())


def test_cam_in_box_refuses_a_map_with_nan_or_inf():
    """A NaN or infinite map is an error, not a NaN share that reads like an all-zero map's "no evidence"."""
    for bad in (np.nan, np.inf):
        cam = np.ones((5, 5))
        cam[2, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            cam_in_box(cam, (0, 0, 2, 2))
        with pytest.raises(ValueError, match="NaN or inf"):
            cam_reading(cam, np.array([[0, 0, 0, 2, 2]]), 0)


def test_cam_warns_about_a_1x1_grid_only_when_every_target_layer_has_one():
    """With a layer that has a grid beside a 1x1 one, the averaged maps are not constant: no warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = class_activation_maps(model, [model[1], model[2]], x, [0, 1])
    assert maps.shape == (2, 16, 16)
    with pytest.warns(UserWarning, match="1x1 grid"):
        class_activation_maps(model, [model[2]], x, [0])


def test_overlay_shows_a_grey_image_as_grey():
    """An (H, W) grey array or tensor is repeated into three equal channels, not tinted."""
    grey = np.random.default_rng(5).random((6, 7))
    cam = np.random.default_rng(6).random((6, 7))
    want = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_allclose(overlay(grey, cam, alpha=0.0), want)
    np.testing.assert_allclose(overlay(torch.from_numpy(grey), cam, alpha=0.0), want)
    u8 = (grey * 255).astype(np.uint8)
    np.testing.assert_allclose(overlay(u8[..., None], cam, alpha=0.0), np.repeat(u8[..., None], 3, -1) / 255.0)
    heat = overlay(np.zeros((6, 7, 3)), cam, alpha=1.0)
    np.testing.assert_allclose(overlay(grey, cam, alpha=0.25), 0.75 * want + 0.25 * heat)


def test_group_order_is_stable_on_many_classes():
    """Within a super-category the classes keep their index order also for 80 classes (COCO), where an unstable
    sort reshuffles them."""
    groups = np.random.default_rng(0).integers(0, 4, size=80)
    want = sorted(range(80), key=lambda i: (groups[i], i))
    np.testing.assert_array_equal(group_order(groups), want)


def test_show_scene_draws_each_box_on_the_edges_of_its_pixels(styled):
    """A half-open box (x0, y0, x1, y1) covers pixels x0 .. x1-1, whose centres imshow puts at integers: the
    rectangle runs from x0 - 0.5 to x1 - 0.5."""
    img = np.zeros((3, 20, 30), dtype=np.uint8)
    fig, ax = plt.subplots()
    show_scene(ax, img, np.array([[0, 2, 3, 10, 12], [1, 5.5, 1.5, 8.5, 4.5]]))
    got = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches]
    assert got == [(1.5, 2.5, 8, 9), (5.0, 1.0, 3.0, 3.0)]
    plt.close(fig)


def test_cam_in_own_boxes_uniform_reference_on_a_wide_image():
    """The chance reference is the box's share of the (H, W) image: on a non-square image a box near the right
    edge keeps its area (H and W are not swapped)."""
    from mlic_lib.analysis import cam_in_own_boxes

    model = PlantedCNN().eval()
    img = 0.03 * torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(8))
    img[:, 2:10, 30:38] = 1.0
    boxes = [np.array([[0, 30, 2, 38, 10], [1, 0, 0, 40, 6]])]
    got = cam_in_own_boxes(model, model.act, [(img, None)], boxes)
    np.testing.assert_allclose(got.uniform, [8 * 8 / (24 * 40), 40 * 6 / (24 * 40)])
    maps = class_activation_maps(model, model.act, img, [0, 1])
    np.testing.assert_allclose(got.inside, [cam_in_box(maps[0], (30, 2, 38, 10)), cam_in_box(maps[1], (0, 0, 40, 6))],
                               rtol=1e-5)
