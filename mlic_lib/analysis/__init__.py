"""Analysis helpers for the book: figure style, class-activation maps and t-SNE.

* :mod:`~mlic_lib.analysis.style` -- :func:`use_style`, :func:`label_axes`,
  :func:`annotate_provenance` and the colour constants.
* :mod:`~mlic_lib.analysis.cam` -- per-class CAMs via pytorch-grad-cam
  (:func:`class_activation_maps`; :func:`paired_class_activation_maps` for many images), box-mass scores
  (:func:`cam_in_box`, :func:`cam_in_boxes`, :func:`cam_reading`,
  :func:`cam_in_own_boxes`),
  :func:`overlay` and its scale, :func:`cam_colorbar`.
* :mod:`~mlic_lib.analysis.plots` -- scenes with boxes, heat maps, per-class bars.
* :mod:`~mlic_lib.analysis.tsne` -- :func:`tsne_embed` and :func:`cluster_quality`.
* :mod:`~mlic_lib.analysis.robustness` -- low-resolution inference and the biased-pair protocol.

pytorch-grad-cam and scikit-learn are imported only when a function that needs them is called.
"""

from __future__ import annotations

from .cam import (
    CAM_METHODS,
    CamReading,
    ObjectCams,
    cam_colorbar,
    cam_in_box,
    cam_in_boxes,
    cam_in_own_boxes,
    cam_reading,
    class_activation_maps,
    overlay,
    paired_class_activation_maps,
)
from .plots import class_bars, group_order, heatmap, show_scene
from .style import (
    CMAP_DIV,
    CMAP_HEAT,
    CMAP_SEQ,
    OKABE_ITO,
    PROVENANCE_GID,
    STYLE,
    annotate_provenance,
    label_axes,
    use_style,
)
from .tsne import cluster_quality, tsne_embed

__all__ = [
    "CAM_METHODS",
    "CMAP_DIV",
    "CMAP_HEAT",
    "CMAP_SEQ",
    "CamReading",
    "OKABE_ITO",
    "ObjectCams",
    "PROVENANCE_GID",
    "STYLE",
    "annotate_provenance",
    "cam_colorbar",
    "cam_in_box",
    "cam_in_boxes",
    "cam_in_own_boxes",
    "cam_reading",
    "class_activation_maps",
    "paired_class_activation_maps",
    "class_bars",
    "group_order",
    "heatmap",
    "show_scene",
    "cluster_quality",
    "label_axes",
    "overlay",
    "tsne_embed",
    "use_style",
]
