"""Class-activation maps (CAMs) for multi-label classifiers, one target class at a time.

A multi-label model answers several independent yes/no questions about the same image, so the
natural question for a saliency map is "where does the model look *for class c*?". The
function :func:`class_activation_maps` therefore takes **one image and a list of classes** and
returns one map per class, computed with `pytorch-grad-cam
<https://github.com/jacobgil/pytorch-grad-cam>`_ and a
:class:`~pytorch_grad_cam.utils.model_targets.ClassifierOutputTarget` per class (the target is
the class *logit*, i.e. the sigmoid's input).

:func:`cam_in_box` / :func:`cam_in_boxes` turn a map into a number (how much of the map's mass
falls inside an object's bounding box) and :func:`overlay` blends a map onto the image for
display.

Choosing ``target_layer``
-------------------------
Use the last layer that still has a spatial grid, typically the last convolutional block:

* torchvision ResNet: ``model.layer4[-1]`` (or ``model.backbone.layer4[-1]`` when wrapped);
* timm ConvNets / EfficientNet: the last block of ``model.blocks`` or the final ``conv_head``;
* vision transformers: a late block's norm layer, *plus* a ``reshape_transform`` that turns the
  ``(B, tokens, C)`` output into ``(B, C, h, w)`` (drop the class token first).

Deeper layers give coarser but more class-specific maps; earlier layers give sharper but less
semantic ones.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from mlic_lib.utils import model_device

__all__ = ["CAM_METHODS", "CamReading", "ObjectCams", "cam_in_box", "cam_in_boxes", "cam_in_own_boxes", "cam_reading",
           "class_activation_maps", "overlay", "paired_class_activation_maps"]

#: Method names accepted by :func:`class_activation_maps` and the pytorch-grad-cam class used.
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "eigencam": "EigenCAM",
}


def _cam_class(method: str) -> type:
    key = method.lower() if isinstance(method, str) else method
    if key not in CAM_METHODS:
        valid = ", ".join(repr(m) for m in CAM_METHODS)
        raise ValueError(f"unknown CAM method {method!r}; valid methods: {valid}")
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, CAM_METHODS[key])


_CHECKED_TARGET: type | None = None


def _checked_target_class() -> type:
    """``ClassifierOutputTarget`` that raises ``ValueError`` (not ``IndexError``) on a bad class."""
    global _CHECKED_TARGET
    if _CHECKED_TARGET is None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        class _CheckedClassifierOutputTarget(ClassifierOutputTarget):
            def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
                n_out = model_output.shape[-1]
                if self.category >= n_out:
                    raise ValueError(
                        f"class index {self.category} out of range for a model with {n_out} outputs"
                    )
                return super().__call__(model_output)

        _CHECKED_TARGET = _CheckedClassifierOutputTarget
    return _CHECKED_TARGET


def _copy_output(module: nn.Module, args, output):
    """Forward hook: hand the rest of the model a copy of a tensor output (see :func:`class_activation_maps`)."""
    return output.clone() if isinstance(output, torch.Tensor) else None


def class_activation_maps(
    model: nn.Module,
    target_layer: nn.Module | Sequence[nn.Module],
    images: torch.Tensor,
    class_indices: int | Sequence[int],
    method: str = "gradcam",
    device: str | torch.device | None = None,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """One class-activation map per requested class, for a single image.

    The image is repeated once per class and the batch goes through a single forward/backward
    pass; copy ``k`` is scored with ``ClassifierOutputTarget(class_indices[k])``. Because the
    model runs in eval mode, the copies do not interact (no batch statistics), so map ``k`` is
    exactly the map that a single-image call for class ``class_indices[k]`` would give.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits of shape ``(B, n_classes)`` (a plain tensor).
    target_layer : torch.nn.Module or sequence of torch.nn.Module
        Layer(s) whose activations are explained (see the module docstring for how to pick
        one). With several layers pytorch-grad-cam averages their normalised maps.
    images : torch.Tensor
        **One** image, ``(3, H, W)`` or ``(1, 3, H, W)``, already normalised the way the model
        expects. (The argument name is plural only because a batch dimension of 1 is accepted.)
    class_indices : int or sequence of int
        Classes to explain, in the order of the returned maps. Duplicates are allowed.
        Negative or out-of-range indices raise ``ValueError``.
    method : {"gradcam", "gradcam++", "eigencam"}, default "gradcam"
        CAM algorithm (case-insensitive). ``"eigencam"`` is class-agnostic (first principal
        component of the activations): it returns the same map for every class and is
        included as a baseline.
    device : str or torch.device, optional
        Where to compute. ``None`` uses the device of the model's parameters. Otherwise the
        model is moved there for the call and moved back to its original device afterwards.
    reshape_transform : callable, optional
        Passed to pytorch-grad-cam; needed for transformer layers whose output is
        ``(B, tokens, C)``.
    batch_size : int, optional
        At most this many copies of the image per forward/backward pass (bounds memory when
        explaining many classes with a large model). ``None``: all classes in one pass.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(len(class_indices), H, W)``, each map min-max normalised to
        ``[0, 1]`` by pytorch-grad-cam (an all-zero map stays zero: the class gets no positive
        evidence at that layer; so does any spatially constant map, the only kind a target layer with a 1x1
        grid gives: a :class:`UserWarning` says so).

    Raises
    ------
    ValueError
        Unknown ``method``, wrong image shape, empty or invalid ``class_indices``, or
        ``batch_size < 1``.

    Notes
    -----
    * Gradients are enabled inside the call, so it also works under ``torch.no_grad()``; the
      input gets ``requires_grad`` so that frozen (``requires_grad=False``) backbones work too.
    * The activations explained are the target layer's own output, also when the model changes it in place
      afterwards (e.g. a ``ReLU(inplace=True)`` after a convolution), on every device.
    * Side effects are undone: the ``training`` flag of every submodule is restored, the hooks
      are removed (also when an exception is raised) and the parameters' ``.grad`` are reset to
      ``None`` (any gradients accumulated before the call are discarded).
    """
    cam_cls = _cam_class(method)

    x = images
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(
                f"class_activation_maps explains one image at a time; got a batch of {x.shape[0]}. "
                "Loop over the images (each call can explain many classes), or pair each image with one class "
                "in paired_class_activation_maps."
            )
        x = x[0]
    if x.dim() != 3:
        raise ValueError(f"images must have shape (C, H, W) or (1, C, H, W), got {tuple(images.shape)}")
    classes = _class_list(class_indices)
    return _maps(model, target_layer, x.unsqueeze(0), classes, cam_cls, device, reshape_transform, batch_size)


def paired_class_activation_maps(
    model: nn.Module,
    target_layer: nn.Module | Sequence[nn.Module],
    images: torch.Tensor,
    class_indices: Sequence[int],
    method: str = "gradcam",
    device: str | torch.device | None = None,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = 64,
) -> np.ndarray:
    """One class-activation map per ``(image, class)`` pair: map ``i`` explains class ``class_indices[i]`` on
    ``images[i]``. ``images`` is a ``(B, C, H, W)`` batch, normalised as the model expects.

    Images go through the model ``batch_size`` at a time (``None``: all at once), so scoring hundreds of test images
    costs a few passes instead of one call each. The model runs in eval mode, so the images do not interact: map
    ``i`` is the map :func:`class_activation_maps` gives for ``images[i]`` and that class alone (up to the rounding
    of batched convolutions). Arguments, side effects and errors are those of :func:`class_activation_maps`; returns
    a ``float32`` array ``(B, H, W)``."""
    cam_cls = _cam_class(method)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) torch.Tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    classes = _class_list(class_indices)
    if len(classes) != len(images):
        raise ValueError(f"one class per image: got {len(classes)} class indices for {len(images)} images")
    return _maps(model, target_layer, images, classes, cam_cls, device, reshape_transform, batch_size)


def _class_index(c) -> int:
    """``c`` as an int: an integer, or a whole float (a class column of float boxes); 2.7 is refused, not truncated."""
    try:
        return operator.index(c)
    except TypeError:
        value = float(c)
    if not value.is_integer():
        raise ValueError(f"class indices must be whole numbers, got {c!r}")
    return int(value)


def _class_list(class_indices: int | Sequence[int]) -> list[int]:
    single = isinstance(class_indices, (int, float, np.number)) or (torch.is_tensor(class_indices)
                                                                   and class_indices.dim() == 0)
    classes = [_class_index(c) for c in ([class_indices] if single else class_indices)]
    if not classes:
        raise ValueError("class_indices is empty")
    if min(classes) < 0:
        raise ValueError(f"class indices must be non-negative, got {classes}")
    return classes


def _maps(model: nn.Module, target_layer, images: torch.Tensor, classes: list[int], cam_cls: type, device,
          reshape_transform, batch_size: int | None) -> np.ndarray:
    """The maps of ``classes[i]`` on ``images[i]`` (``images`` of one image: that image for every class)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = len(classes) if batch_size is None else int(batch_size)

    layers = [target_layer] if isinstance(target_layer, nn.Module) else list(target_layer)
    if not layers:
        raise ValueError("target_layer is empty")

    modes = {m: m.training for m in model.modules()}
    original_device = model_device(model)
    run_device = torch.device(device) if device is not None else original_device
    moved = run_device != original_device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    target_cls = _checked_target_class()
    cam = None
    copies: list = []
    maps: list[np.ndarray] = []
    try:
        if moved:
            model.to(run_device)
        cam = cam_cls(model=model, target_layers=layers, reshape_transform=reshape_transform)
        # registered after pytorch-grad-cam's hooks, which keep the layer's own output: the rest of the model runs
        # on a copy, so an in-place op after the layer (``ReLU(inplace=True)``) cannot overwrite the kept
        # activations (on the CPU pytorch-grad-cam's ``.cpu()`` does not copy: the map would mix the activations
        # after that op with the gradients before it, and differ from the same call on a GPU)
        copies = [layer.register_forward_hook(_copy_output) for layer in layers]
        for start in range(0, len(classes), step):
            chunk = classes[start : start + step]
            part = images[start : start + step] if len(images) > 1 else images.expand(len(chunk), -1, -1, -1)
            batch = part.detach().to(run_device, dtype=dtype).clone().requires_grad_(True)
            with torch.enable_grad():
                maps.append(cam(input_tensor=batch, targets=[target_cls(c) for c in chunk]))
            grids = [tuple(a.shape[2:]) for a in cam.activations_and_grads.activations]
            if start == 0 and grids and all(math.prod(g) == 1 for g in grids):
                warnings.warn(f"the target layer's output has a 1x1 grid {grids[0]}: each map is constant, and "
                              "min-max normalisation makes it all zero whatever the class's evidence; pick an "
                              "earlier layer or a larger image", UserWarning, stacklevel=3)
            n_out = int(cam.outputs.shape[-1])  # class-agnostic methods never call the targets
            if max(chunk) >= n_out:
                raise ValueError(f"class index {max(chunk)} out of range for a model with {n_out} outputs")
    finally:
        for handle in copies:
            handle.remove()
        if cam is not None:
            cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
        if moved:
            model.to(original_device)
        for m, was_training in modes.items():
            m.training = was_training

    return np.concatenate(maps, axis=0).astype(np.float32, copy=False)


def _as_boxes(boxes: np.ndarray | Sequence[Sequence[float]] | torch.Tensor) -> np.ndarray:
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim == 1:
        b = b[None, :]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (4,) or (K, 4), got {np.shape(boxes)}")
    if not np.all(np.isfinite(b)):
        raise ValueError("box coordinates must be finite")
    bad = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if np.any(bad):
        raise ValueError(f"invalid box(es) with x1 <= x0 or y1 <= y0: {b[bad].tolist()}")
    return b


def _as_map(cam: np.ndarray | torch.Tensor, strict: bool = True) -> np.ndarray:
    """The map as a float64 ``(H, W)`` array; ``strict``: also reject non-finite and negative values."""
    if isinstance(cam, torch.Tensor):
        cam = cam.detach().cpu().numpy()
    c = np.asarray(cam, dtype=np.float64)
    if c.ndim == 3 and c.shape[0] == 1:
        c = c[0]
    if c.ndim != 2:
        raise ValueError(f"cam must be a 2-D map (H, W), got shape {np.shape(cam)}")
    if not strict:
        return c
    if not np.all(np.isfinite(c)):
        raise ValueError("cam contains NaN or inf")
    if np.any(c < 0):
        raise ValueError("cam has negative values; the mass fraction needs a non-negative map")
    return c


def cam_in_boxes(
    cam: np.ndarray | torch.Tensor, boxes: np.ndarray | Sequence[Sequence[float]] | torch.Tensor
) -> np.ndarray:
    """Fraction of a CAM's mass inside each of several boxes (vectorised :func:`cam_in_box`).

    Parameters
    ----------
    cam : array-like, shape (H, W)
        Non-negative activation map (a leading axis of size 1 is squeezed).
    boxes : array-like, shape (K, 4) or (4,)
        Boxes ``(x0, y0, x1, y1)`` in pixel coordinates *of the map*; see :func:`cam_in_box`.

    Returns
    -------
    numpy.ndarray
        ``float64`` array of shape ``(K,)`` with values in ``[0, 1]``; all NaN for an all-zero map (see
        :func:`cam_in_box`).
    """
    c = _as_map(cam)
    b = _as_boxes(boxes)
    h, w = c.shape
    total = c.sum()
    if total <= 0.0:  # 0 / 0: no evidence anywhere is not evidence outside the box
        return np.full(len(b), np.nan)
    # summed-area table with a zero row/column in front: S[y, x] = sum(c[:y, :x])
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = c.cumsum(axis=0).cumsum(axis=1)
    edges = np.floor(b + 0.5).astype(np.int64)  # halves up (not np.rint's half to even): a shift keeps the width
    x0 = np.clip(edges[:, 0], 0, w)
    x1 = np.clip(edges[:, 2], 0, w)
    y0 = np.clip(edges[:, 1], 0, h)
    y1 = np.clip(edges[:, 3], 0, h)
    x1 = np.maximum(x1, x0)
    y1 = np.maximum(y1, y0)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return np.clip(inside / total, 0.0, 1.0)


def cam_in_box(cam: np.ndarray | torch.Tensor, box: Sequence[float] | np.ndarray) -> float:
    """Fraction of a CAM's mass that falls inside a box: ``sum(cam[box]) / sum(cam)``.

    Parameters
    ----------
    cam : array-like, shape (H, W)
        Non-negative activation map, e.g. one slice of :func:`class_activation_maps`.
    box : sequence of 4 numbers
        ``(x0, y0, x1, y1)`` in pixel coordinates of the map (x = column, y = row). The box is
        half-open, covering columns ``x0 .. x1-1`` and rows ``y0 .. y1-1``, and is clipped to the
        map. Non-integer coordinates are rounded to the nearest pixel edge, halves up (so a box moved by whole
        pixels keeps its width). Boxes given in the
        coordinates of an image of another size must be rescaled first.

    Returns
    -------
    float
        In ``[0, 1]``: 1 means all of the map's mass is inside the box. For a uniform map it
        equals the box's share of the map's area. A box entirely outside the map gives 0.0. An
        all-zero map (Grad-CAM's ReLU left no positive evidence at that layer) has no mass to share
        out and gives NaN: no evidence anywhere is not evidence outside the box, so averages should
        leave such maps out (``np.nanmean``; pandas does by default) and say how many there were.

    Raises
    ------
    ValueError
        ``x1 <= x0`` or ``y1 <= y0``, a map that is not 2-D, or negative / non-finite values.
    """
    return float(cam_in_boxes(cam, np.asarray(box, dtype=np.float64).reshape(1, 4))[0])


class CamReading(NamedTuple):
    """Where one class's map puts its evidence among a scene's boxes (:func:`cam_reading`)."""

    all_zero: bool
    peak: tuple[int, int] | None
    peak_in: list[int]
    mass: np.ndarray
    heavier: list[int]
    uniform: np.ndarray  # what a uniform map puts in each box (the box's share of the image): mass's reference


def cam_reading(cam: np.ndarray | torch.Tensor, boxes, cls: int) -> CamReading:
    """Read the map of class ``cls`` against the labelled boxes of its scene.

    ``boxes`` is ``(K, 5)``: ``(class, x0, y0, x1, y1)`` per object in the map's pixel coordinates (the embedded
    scenes' format). Returns a :class:`CamReading`:

    * ``all_zero``: the map has no positive value (no evidence at that layer; the other fields are then empty
      and ``mass`` NaN);
    * ``peak``: ``(row, column)`` of the map's maximum (the first one in row-major order on a tie);
    * ``peak_in``: the classes of the boxes that contain the peak (half-open boxes with their coordinates rounded
      to pixel edges, as :func:`cam_in_box`);
    * ``mass``: :func:`cam_in_boxes` per box (``(K,)``);
    * ``heavier``: the other classes with a box holding more of the map's mass than any box of ``cls``
      (all of them with mass > 0 when ``cls`` has no box): the map leans on another object;
    * ``uniform``: ``mass`` of a uniform map, the box's share of the image (``(K,)``): a box holding
      more than this draws the map's mass, whatever its size.
    """
    b = np.asarray(boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 5:
        raise ValueError(f"boxes must be (K, 5) rows of (class, x0, y0, x1, y1), got shape {b.shape}")
    c = _as_map(cam)
    mass = cam_in_boxes(c, b[:, 1:]) if len(b) else np.zeros(0)
    uniform = cam_in_boxes(np.ones_like(c), b[:, 1:]) if len(b) else np.zeros(0)
    if c.max(initial=0.0) <= 0:
        return CamReading(True, None, [], mass, [], uniform)
    r, col = (int(v) for v in np.unravel_index(int(np.argmax(c)), c.shape))
    classes = b[:, 0].astype(int)
    e = np.floor(b[:, 1:] + 0.5)  # the pixel edges cam_in_boxes uses, so a box that holds the peak also holds its mass
    inside = (e[:, 0] <= col) & (col < e[:, 2]) & (e[:, 1] <= r) & (r < e[:, 3])
    own = mass[classes == cls].max(initial=0.0)
    heavier = sorted({int(k) for k, m in zip(classes, mass, strict=True) if k != cls and m > own})
    return CamReading(False, (r, col), [int(k) for k in classes[inside]], mass, heavier, uniform)


class ObjectCams(NamedTuple):
    """One row per labelled object of the images scored by :func:`cam_in_own_boxes` (arrays of equal length)."""

    image: np.ndarray  # index of the object's image in the dataset
    cls: np.ndarray  # the object's class
    prob: np.ndarray  # the model's probability for that class on that image
    inside: np.ndarray  # CAM-in-box of that class's map in the object's own box; NaN for an all-zero map
    uniform: np.ndarray  # the same for a uniform map: the box's share of the image (the chance reference)


def cam_in_own_boxes(model: nn.Module, target_layer: nn.Module, dataset, boxes, n: int | None = None,
                     method: str = "gradcam", chunk: int = 16) -> ObjectCams:
    """How much of each labelled object's class map falls in the object's own box, over the first ``n`` images.

    ``dataset[j]`` is ``(image tensor, targets)`` as the model takes it and ``boxes[j]`` the ``(K, 5)`` rows
    ``(class, x0, y0, x1, y1)`` of image ``j`` in the map's pixel coordinates (the embedded scenes' format). The
    objects of ``chunk`` images at a time go through one :func:`paired_class_activation_maps` call (one map per
    object: its class on its image); every object is scored, whatever the model's probability for it (``prob`` lets
    a caller keep the recognised ones). An all-zero map scores NaN (:func:`cam_in_box`): leave those out of means
    and count them."""
    from mlic_lib.engine import probabilities

    n = len(boxes) if n is None else min(int(n), len(boxes))
    if n < 1:
        raise ValueError(f"no image to score: n={n} with {len(boxes)} boxed images")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 (images per batched pass), got {chunk}")
    rows: dict[str, list] = {k: [] for k in ObjectCams._fields}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        boxed = [(j, np.asarray(boxes[j], dtype=np.float64)) for j in range(n)]
        boxed = [(j, b) for j, b in boxed if len(b)]
        for start in range(0, len(boxed), chunk):
            part = boxed[start : start + chunk]
            images = torch.stack([dataset[j][0] for j, _ in part])
            per_object = torch.repeat_interleave(images, torch.tensor([len(b) for _, b in part]), dim=0)
            b_all = np.concatenate([b for _, b in part])
            classes = [int(c) for c in b_all[:, 0]]
            maps = paired_class_activation_maps(model, target_layer, per_object, classes, method=method,
                                                batch_size=None)
            with torch.no_grad():
                p = probabilities(model, images)
            rows["image"] += [j for j, b in part for _ in b]
            rows["cls"] += classes
            rows["prob"] += [float(p[i, int(c)]) for i, (_, b) in enumerate(part) for c in b[:, 0]]
            rows["inside"] += [cam_in_box(cam, row[1:]) for cam, row in zip(maps, b_all, strict=True)]
            rows["uniform"] += cam_in_boxes(np.ones(maps.shape[1:]), b_all[:, 1:]).tolist()
    finally:
        for m, was_training in modes.items():
            m.training = was_training
    return ObjectCams(*(np.asarray(rows[k]) for k in ObjectCams._fields))


def _image_to_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Return a float64 ``(H, W, 3)`` array in ``[0, 1]``.

    Tensors are read as ``(C, H, W)`` / ``(1, C, H, W)`` / ``(H, W)``, arrays as ``(H, W, C)`` / ``(H, W)``; both
    ``uint8`` in ``[0, 255]`` or floats in ``[0, 1]``; ``C`` is 1 or 3.
    """
    shape = tuple(image.shape)
    if isinstance(image, torch.Tensor):
        img = image.detach().cpu().double().numpy()
        if not (image.is_floating_point() or image.dtype == torch.bool):  # uint8 (torchvision.io.read_image)
            img = img / 255.0
        if img.ndim == 4 and img.shape[0] == 1:
            img = img[0]
        if img.ndim == 3:
            img = np.transpose(img, (1, 2, 0))
    else:
        img = np.asarray(image)
        if np.issubdtype(img.dtype, np.integer):
            img = img.astype(np.float64) / 255.0
        img = img.astype(np.float64)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(
            "image must be a (C, H, W) tensor or an (H, W, C) / (H, W) array with C in {1, 3}, "
            f"got shape {shape}"
        )
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.clip(img, 0.0, 1.0)


def overlay(
    image: np.ndarray | torch.Tensor,
    cam: np.ndarray | torch.Tensor,
    alpha: float = 0.5,
    cmap: str | None = None,
) -> np.ndarray:
    """Blend a CAM onto an image for display with ``plt.imshow``.

    Parameters
    ----------
    image : torch.Tensor or numpy.ndarray
        A ``(3, H, W)`` (or ``(1, 3, H, W)``) tensor or an ``(H, W, 3)`` / ``(H, W)`` array:
        ``uint8`` in ``[0, 255]`` or float in ``[0, 1]``. Un-normalise images
        that went through mean/std normalisation first; values are clipped to ``[0, 1]``.
    cam : array-like, shape (H', W')
        Map in ``[0, 1]`` (values are clipped, not re-normalised; NaN shows as 0). It is resized bilinearly to
        the image size when the sizes differ.
    alpha : float, default 0.5
        Weight of the heat map: ``out = (1 - alpha) * image + alpha * colormap(cam)``.
    cmap : str, optional
        Matplotlib colour map name; defaults to :data:`mlic_lib.analysis.style.CMAP_HEAT`.

    Returns
    -------
    numpy.ndarray
        ``float64`` RGB array of shape ``(H, W, 3)`` in ``[0, 1]``.
    """
    import matplotlib

    from .style import CMAP_HEAT

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _image_to_hwc(image)
    c = np.nan_to_num(_as_map(cam, strict=False), nan=0.0)  # before resizing, where a NaN would spread
    h, w = img.shape[:2]
    if c.shape != (h, w):
        t = torch.from_numpy(c)[None, None]
        c = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        c = c.numpy()
    c = np.clip(c, 0.0, 1.0)
    heat = matplotlib.colormaps[cmap or CMAP_HEAT](c)[..., :3]
    return np.clip((1.0 - alpha) * img + alpha * heat, 0.0, 1.0)


def cam_colorbar(fig, axes, label: str = "Grad-CAM (min-max per map)", cmap: str | None = None, **kwargs):
    """One colour bar for a figure of :func:`overlay` panels: the heat colour map over ``[0, 1]``, the range
    :func:`class_activation_maps` scales each map to. ``axes`` are the panels it serves (an ``Axes`` or a list /
    array of them); ``kwargs`` go to ``fig.colorbar`` (e.g. ``fraction``, ``pad``, ``shrink``). Returns the colour
    bar. The panels blend the map over the image (``overlay(alpha=...)``), so their colours are lighter or darker
    than the bar's; the bar gives the scale, not the exact pixel colour."""
    import matplotlib.pyplot as plt

    from .style import CMAP_HEAT

    kwargs.setdefault("fraction", 0.03)
    kwargs.setdefault("pad", 0.02)
    mappable = plt.cm.ScalarMappable(norm=plt.Normalize(0.0, 1.0), cmap=cmap or CMAP_HEAT)
    return fig.colorbar(mappable, ax=axes, label=label, **kwargs)
