"""Test-distribution protocols used by the chapters.

* :func:`lowres_predict` -- inference on inputs downsampled by a factor (SpliceMix Fig. 6);
* :func:`biased_pair_map` -- AP of a biased class on the "exclusive" and "co-occur" test distributions of
  Singh et al. 2020 (SpliceMix Table VIII).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from mlic_lib.engine import sigmoid_scores
from mlic_lib.metrics import average_precision

__all__ = ["biased_pair_map", "lowres_predict"]

def lowres_predict(factor: int) -> Callable[[nn.Module, Tensor], Tensor]:
    """A ``predict_fn`` for Fig. 6: downsample the input by ``factor`` (bilinear, antialiased) first."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")

    def predict(model: nn.Module, x: Tensor) -> Tensor:
        if factor > 1:
            x = F.interpolate(x, size=(x.shape[2] // factor, x.shape[3] // factor), mode="bilinear",
                              align_corners=False, antialias=True)
        return sigmoid_scores(model(x))

    return predict


def biased_pair_map(pairs: Sequence[tuple[int, int]], natural: tuple[np.ndarray, np.ndarray],
                    exclusive: tuple[np.ndarray, np.ndarray], cooccur: tuple[np.ndarray, np.ndarray]) -> dict:
    """Table VIII (Singh et al. 2020): AP of each biased class ``b`` on two test distributions.

    For a pair ``(b, c)``: *exclusive* = images with ``b`` but not ``c`` (from the exclusive-mode set)
    + *other* images without ``b`` (from the natural test set); *co-occur* = images with ``b`` and
    ``c`` (from the co-occur-mode set) + the same other images. Each argument after ``pairs`` is
    ``(scores (N, C), targets (N, C))``. Returns mean AP over pairs (in [0, 1]) and per pair.
    """
    out: dict = {"exclusive": [], "cooccur": []}
    ns, nt = (np.asarray(a) for a in natural)
    for b, c in pairs:
        other = nt[:, b] == 0
        for name, (s, t) in (("exclusive", exclusive), ("cooccur", cooccur)):
            s, t = np.asarray(s), np.asarray(t)
            sel = (t[:, b] == 1) & ((t[:, c] == 0) if name == "exclusive" else (t[:, c] == 1))
            if sel.sum() == 0 or other.sum() == 0:
                out[name].append(float("nan"))
                continue
            scores = np.concatenate([s[sel, b], ns[other, b]])[:, None]
            targets = np.concatenate([np.ones(sel.sum()), np.zeros(other.sum())])[:, None]
            out[name].append(float(average_precision(scores, targets)[0]))
    return {"exclusive_mAP": float(np.nanmean(out["exclusive"])), "cooccur_mAP": float(np.nanmean(out["cooccur"])),
            "per_pair": out}
