"""Reusable figure pieces for the chapters: scenes with boxes, co-occurrence heat maps, class counts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlic_lib.analysis.style import CMAP_SEQ, OKABE_ITO


def show_scene(ax, image_u8: np.ndarray, boxes: np.ndarray | None = None,
               class_names: Sequence[str] | None = None, title: str | None = None) -> None:
    """Draw a ``uint8 (3, H, W)`` canvas (or a ``(1, H, W)`` / ``(H, W)`` grey one) with its object boxes
    ``(class, x0, y0, x1, y1)`` (int or float) and labels."""
    from matplotlib.patches import Rectangle

    img = np.asarray(image_u8)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    ax.grid(False)
    ax.set_xticks([])
    ax.set_yticks([])
    if boxes is not None:
        for cls, x0, y0, x1, y1 in boxes:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.0, ec="white"))
            if class_names is not None:
                ax.text(x0, y0 - 1, class_names[int(cls)], color="white", fontsize=6, va="bottom",
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 0.5, "lw": 0})
    if title:
        ax.set_title(title, fontsize=8)


def group_order(groups: np.ndarray) -> np.ndarray:
    """Class indices sorted by super-category (stable within a group)."""
    return np.argsort(np.asarray(groups), kind="stable")


def heatmap(ax, matrix: np.ndarray, labels: Sequence[str], order: np.ndarray | None = None,
            cbar_label: str = "", vmin: float | None = 0.0, vmax: float | None = None, cmap: str = CMAP_SEQ,
            groups: np.ndarray | None = None, tick_labels: bool = True, colorbar: bool = True,
            fontsize: float = 8):
    """A labelled C x C heat map, optionally reordered and with lines between super-categories.

    ``tick_labels=False`` leaves the class names off (panels beside one that has them); ``colorbar=False`` leaves
    the colour bar off, for a figure whose panels share one (pass the returned image to ``fig.colorbar``; give
    the panels the same ``vmin`` / ``vmax``)."""
    full = np.asarray(matrix)
    if full.ndim != 2 or full.shape != (len(labels), len(labels)):
        raise ValueError(f"heatmap needs a C x C matrix with C = {len(labels)} labels, got shape {full.shape}")
    order = np.arange(len(labels)) if order is None else np.asarray(order)
    if sorted(order.tolist()) != list(range(len(labels))):
        raise ValueError(f"heatmap: order must be a permutation of the {len(labels)} classes, got {order.tolist()}")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"heatmap: groups has {len(groups)} entries for {len(labels)} classes; pass one "
                         "super-category per class")
    m = full[np.ix_(order, order)]
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.grid(False)
    names = [labels[i] for i in order]
    if tick_labels:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(len(names)), names, fontsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if groups is not None:
        g = np.asarray(groups)[order]
        for edge in np.flatnonzero(np.diff(g)) + 0.5:
            ax.axhline(edge, color="white", lw=1.0)
            ax.axvline(edge, color="white", lw=1.0)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.set_label(cbar_label)
    return im


def class_bars(ax, values: np.ndarray, labels: Sequence[str], groups: np.ndarray | None = None,
               ylabel: str = "", sort: bool = True, legend: bool = True) -> np.ndarray:
    """Bar chart of one value per class (sorted descending), coloured by super-category.

    With ``groups`` and ``legend`` the axes get a legend, right of the bars, naming each colour
    ``super-category g`` (the group index, as the chapters' t-SNE figures name them). Returns the class order used."""
    from matplotlib.patches import Patch

    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) != len(labels):
        raise ValueError(f"class_bars needs one value per label: got values of shape {values.shape} for "
                         f"{len(labels)} labels")
    if groups is not None and len(groups) != len(values):
        raise ValueError(f"class_bars: groups has {len(groups)} entries for {len(values)} classes; pass one "
                         "super-category per class")
    order = np.argsort(-values, kind="stable") if sort else np.arange(len(values))

    def colour(g) -> str:
        return OKABE_ITO[int(g) % len(OKABE_ITO)]

    ax.bar(range(len(order)), values[order], color=None if groups is None else [colour(groups[i]) for i in order])
    ax.set_xticks(range(len(order)), [labels[i] for i in order], rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("class (sorted by value, highest first)" if sort else "class")
    ax.set_xlim(-0.6, len(order) - 0.4)
    if groups is not None and legend:
        present = sorted({int(g) for g in groups})
        ax.legend(handles=[Patch(color=colour(g), label=f"super-category {g}") for g in present],
                  fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # outside: never on a bar
    return order
