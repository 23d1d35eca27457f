"""Matplotlib house style for the book's figures.

Every figure in the book is produced after :func:`use_style` and carries a provenance footnote
from :func:`annotate_provenance`. The style is deliberately *light*: figure and axes backgrounds
are opaque white and text is dark, so figures stay readable when the rendered book is viewed
with a dark-mode browser theme (a transparent PNG with dark text would vanish on a dark page).

Colour choices
--------------
* Categorical data (lines, bars, scatter groups) use the Okabe-Ito palette
  (:data:`OKABE_ITO`), which stays distinguishable under the common forms of colour-vision
  deficiency. Its yellow (``#F0E442``) is moved to the end of the cycle because it has low
  contrast on white.
* Sequential data use perceptually uniform colour maps that read well on white:
  :data:`CMAP_SEQ` (``"viridis"``, also the default ``image.cmap``) for general matrices and
  :data:`CMAP_HEAT` (``"magma"``) for class-activation maps and other "intensity" heat maps.
  Both are monotone in lightness, so they also survive greyscale printing.
* Signed data centred on zero (differences between methods, correlations) use the diverging
  :data:`CMAP_DIV` (``"RdBu_r"``); pass ``vmin=-v, vmax=v`` so that zero sits on the white midpoint.
"""

from __future__ import annotations

from typing import Any

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure
from matplotlib.text import Text

__all__ = [
    "CMAP_DIV",
    "CMAP_HEAT",
    "CMAP_SEQ",
    "OKABE_ITO",
    "PROVENANCE_GID",
    "STYLE",
    "annotate_provenance",
    "label_axes",
    "use_style",
]

#: Okabe-Ito colour-blind-safe palette (black left out; low-contrast yellow placed last).
OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
)

#: Sequential colour map for general matrices / images (also the default ``image.cmap``).
CMAP_SEQ: str = "viridis"
#: Sequential colour map for activation maps and intensity heat maps (dark = low, light = high).
CMAP_HEAT: str = "magma"
#: Diverging colour map for signed quantities centred on zero.
CMAP_DIV: str = "RdBu_r"

#: ``gid`` given to the footnote created by :func:`annotate_provenance`.
PROVENANCE_GID: str = "mlic-provenance"

_TEXT = "#222222"
_EDGE = "#444444"
_GRID = "#dddddd"

#: The rcParams applied by :func:`use_style`.
STYLE: dict[str, Any] = {
    # backgrounds: opaque white everywhere (dark-mode browsers)
    "figure.facecolor": "white",
    "figure.edgecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "savefig.edgecolor": "white",
    "savefig.transparent": False,
    "legend.facecolor": "white",
    "legend.edgecolor": "#cccccc",
    "legend.framealpha": 0.9,
    # text
    "text.color": _TEXT,
    "axes.labelcolor": _TEXT,
    "axes.titlecolor": _TEXT,
    "xtick.color": _TEXT,
    "ytick.color": _TEXT,
    "xtick.labelcolor": _TEXT,
    "ytick.labelcolor": _TEXT,
    "font.size": 10.0,
    "axes.titlesize": 11.0,
    "axes.labelsize": 10.0,
    "xtick.labelsize": 9.0,
    "ytick.labelsize": 9.0,
    "legend.fontsize": 9.0,
    "figure.titlesize": 11.0,
    # resolution
    "figure.dpi": 110,
    "savefig.dpi": 150,
    # axes, spines and grid
    "axes.edgecolor": _EDGE,
    "axes.linewidth": 0.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": _GRID,
    "grid.linewidth": 0.6,
    "grid.linestyle": "-",
    "axes.prop_cycle": mpl.cycler(color=list(OKABE_ITO)),
    # layout and images
    "figure.constrained_layout.use": True,
    "image.cmap": CMAP_SEQ,
    "lines.linewidth": 1.6,
    "lines.markersize": 5.0,
}


def use_style() -> None:
    """Apply the book's matplotlib style (:data:`STYLE`) to the global ``rcParams``.

    Idempotent: calling it again sets the same values. It only changes the keys in
    :data:`STYLE`, so options set by the caller on other keys survive. Figures created *after*
    the call pick the style up.

    Notes
    -----
    ``axes.grid`` is on (light grey, drawn below the data). For image panels (activation maps,
    confusion-style matrices) turn it off with ``ax.grid(False)``.
    """
    mpl.rcParams.update(STYLE)


def label_axes(ax: Axes, xlabel: str, ylabel: str, title: str | None = None) -> Axes:
    """Set the x/y labels (and optionally the title) of ``ax``.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Axes to label.
    xlabel, ylabel : str
        Axis labels; include units or the metric's direction where useful, e.g. ``"mAP (%) ↑"``.
    title : str, optional
        Axes title; left unchanged when ``None``.

    Returns
    -------
    matplotlib.axes.Axes
        ``ax``, for chaining.
    """
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    return ax


def annotate_provenance(fig: Figure | SubFigure, text: str, fontsize: float = 7.0) -> Text:
    """Add a small grey footnote (where the numbers come from) at the bottom-left of ``fig``.

    Typical text: ``"profile=default, seeds=0,1,2, data=embedded scenes"``. Calling it again on
    the same figure replaces the previous footnote instead of stacking a second one.

    When the figure uses the constrained (or tight) layout engine, the engine's layout rectangle
    is shrunk from the bottom by the footnote's height so that the footnote does not overlap
    x-axis labels.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        Figure to annotate.
    text : str
        Provenance text (one line recommended).
    fontsize : float, default 7.0
        Font size in points.

    Returns
    -------
    matplotlib.text.Text
        The footnote artist (``gid`` = :data:`PROVENANCE_GID`); it is also in ``fig.texts``.
    """
    for old in [t for t in fig.texts if t.get_gid() == PROVENANCE_GID]:
        old.remove()

    n_lines = text.count("\n") + 1
    fig_h_in = fig.get_figheight() if isinstance(fig, Figure) else fig.figure.get_figheight()
    # footnote height as a fraction of the figure height (1.4 line spacing, 4 pt margin)
    frac = min(0.25, (n_lines * 1.4 * fontsize + 4.0) / 72.0 / max(fig_h_in, 1e-6))

    artist = fig.text(
        0.005,
        0.005,
        text,
        ha="left",
        va="bottom",
        fontsize=fontsize,
        color="#777777",
        gid=PROVENANCE_GID,
    )

    engine = fig.get_layout_engine() if isinstance(fig, Figure) else None
    if engine is not None:
        try:
            if type(engine).__name__ == "ConstrainedLayoutEngine":
                engine.set(rect=(0.0, frac, 1.0, 1.0 - frac))
            elif type(engine).__name__ == "TightLayoutEngine":
                engine.set(rect=(0.0, frac, 1.0, 1.0))
        except (TypeError, ValueError):  # older/foreign engines: footnote is still placed
            pass
    return artist
