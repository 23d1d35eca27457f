"""INDeeD's simple CNN for ML-MNIST (``indeed.txt``, section "Evaluation on ML-MNIST"): three convolutional
layers and two fully connected layers.

The paper gives no widths; we use 32/64/64 channels with 3x3 convolutions, ReLU and 2x2 max
pooling (84 -> 42 -> 21 -> 10), then ``fc1`` (-> 128, ReLU) and ``fc2`` (-> classes).
``forward_features`` returns the 128-d embedding that INDeeD's identical/disparate blocks act on,
``classifier`` is the shared classifier (``fc2``), and ``cam_layer`` the last convolution's ReLU (its rectified
feature maps, the usual Grad-CAM target).
"""

from __future__ import annotations

import torch
from torch import nn


def check_input_side(model: nn.Module, x: torch.Tensor, side: int, stride: int) -> None:
    """Refuse an input whose feature grid (``H // stride`` x ``W // stride``) is not the ``side`` x ``side`` grid the
    model's first fc layer was built for (torch's own error, a matmul size mismatch, names neither)."""
    name = type(model).__name__
    if x.dim() != 4:
        raise ValueError(f"{name} takes a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h // stride != side or w // stride != side:
        rebuild = f"build it with input_size={h} or " if h // stride == w // stride else ""  # square grids only
        raise ValueError(f"{name} was built for {model.input_size}x{model.input_size} inputs (its fc layer expects a "
                         f"{side}x{side} grid after the /{stride} downsampling), got {h}x{w}: {rebuild}resize the "
                         f"images to {model.input_size}x{model.input_size}")


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, input_size: int = 84,
                 widths: tuple[int, int, int] = (32, 64, 64), hidden: int = 128):
        super().__init__()
        c1, c2, c3 = widths
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.downsample = nn.MaxPool2d(2)
        side = input_size // 8
        if side < 1:
            raise ValueError(f"SimpleCNN needs inputs of at least 8x8, got input_size={input_size}")
        self.input_size, self._side = input_size, side
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(c3 * side * side, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)
        self.num_features = hidden
        self.num_classes = num_classes

    @property
    def cam_layer(self) -> nn.Module:
        """The ReLU after the last convolution: Grad-CAM explains its rectified feature maps."""
        return self.conv[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``hidden``-d embedding before the classifier, shape (B, hidden)."""
        check_input_side(self, x, self._side, 8)
        return self.fc1(self.downsample(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
