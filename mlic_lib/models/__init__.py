"""Models: backbones with multi-label heads, and the chapters' method-specific networks."""

from mlic_lib.models.backbones import GlobalPool, MultiLabelNet, build_model, efficientnet_lite0_weights
from mlic_lib.models.simple_cnn import SimpleCNN

__all__ = ["GlobalPool", "MultiLabelNet", "SimpleCNN", "build_model", "efficientnet_lite0_weights"]
