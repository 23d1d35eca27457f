"""Backbones and heads: shapes, gradients, pooling, weights loading, bad names."""

from __future__ import annotations

import pytest
import torch

from mlic_lib.models import GlobalPool, SimpleCNN, build_model


@pytest.mark.parametrize(
    ("name", "size"), [("small_resnet", 64), ("resnet18", 64), ("efficientnet_lite0", 64), ("timm/resnet10t", 64)]
)
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_backbone_shapes_and_gradients(name, size, pool):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, pool=pool)
    x = torch.randn(2, 3, size, size)
    fmap = model.forward_features(x)
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, model.num_features)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    first = next(model.features.parameters())
    assert first.grad is not None and torch.isfinite(first.grad).all()


def test_global_pool_definitions():
    x = torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(GlobalPool("max")(x), x.flatten(2).max(-1).values)
    torch.testing.assert_close(GlobalPool("avg")(x), x.flatten(2).mean(-1))
    with pytest.raises(ValueError, match="pool"):
        GlobalPool("sum")


def test_small_resnet_map_size_and_cam_layer():
    model = build_model("small_resnet", 20)
    assert model.forward_features(torch.zeros(1, 3, 64, 64)).shape[-2:] == (8, 8)
    assert isinstance(model.cam_layer, torch.nn.Module)
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_simple_cnn_shapes_and_gradients():
    net = SimpleCNN(num_classes=10)
    x = torch.randn(4, 1, 84, 84)
    assert net.forward_features(x).shape == (4, 128)
    out = net(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_efficientnet_lite0_real_weights_are_loaded():
    from mlic_lib.models import efficientnet_lite0_weights

    weights = efficientnet_lite0_weights()
    model = build_model("efficientnet_lite0", 3, weights="imagenet")
    stem = model.features.net.conv_stem.weight
    torch.testing.assert_close(stem, weights["conv_stem.weight"])
    random_init = build_model("efficientnet_lite0", 3)
    assert not torch.equal(random_init.features.net.conv_stem.weight, stem)


def test_local_weights_file(tmp_path):
    src = build_model("resnet18", 5)
    import torchvision

    full = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    model = build_model("resnet18", 5, weights=path)
    torch.testing.assert_close(model.features[0].weight, full.conv1.weight)
    assert src is not None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("resnet18", 5, weights=tmp_path / "missing.pth")


def test_bad_model_requests():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("resnet7", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_resnet", 0)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("small_resnet", 3, weights="imagenet")
