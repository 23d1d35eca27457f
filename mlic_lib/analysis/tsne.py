"""2-D t-SNE embeddings of image features and a number for how well they cluster.

Used in the book to look at whether a model's penultimate-layer features (or its label
embeddings) group images / labels by super-category: :func:`tsne_embed` gives the 2-D points to
scatter, :func:`cluster_quality` a silhouette score to quote next to the picture.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["cluster_quality", "tsne_embed"]


def _to_numpy(x: np.ndarray | torch.Tensor | Sequence[Sequence[float]]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def tsne_embed(
    x: np.ndarray | torch.Tensor,
    seed: int = 0,
    perplexity: float = 30.0,
    n_threads: int | None = 1,
) -> np.ndarray:
    """Embed ``N`` feature vectors in 2-D with t-SNE.

    Wraps :class:`sklearn.manifold.TSNE` with ``n_components=2``, ``init="pca"`` and
    ``random_state=seed``, so the same input and seed give the same output.

    Parameters
    ----------
    x : array-like or torch.Tensor, shape (N, D)
        Feature vectors, ``N >= 4`` and ``D >= 2``.
    seed : int, default 0
        Random state of t-SNE. With the PCA initialisation the optimisation itself is deterministic, and the
        PCA's randomised solver finds the same components whatever the seed on narrow features: there every seed
        gives the same map. The seed changes it on wide features (hundreds of dimensions, e.g. a backbone's).
    perplexity : float, default 30.0
        Effective number of neighbours. If it is larger than ``(N - 1) / 3`` it is lowered to that
        value with a :class:`UserWarning` (t-SNE needs roughly ``3 * perplexity`` neighbours per
        point; scikit-learn itself rejects ``perplexity >= N``).
    n_threads : int or None, default 1
        OpenMP threads for scikit-learn's Barnes-Hut gradient (set with ``threadpoolctl`` for the
        duration of the call). The default of 1 is deliberate: (a) the multi-threaded kernel can
        be orders of magnitude slower when the cores are oversubscribed, e.g. next to PyTorch's
        own thread pool (40 points: 25 s instead of 0.2 s on a busy 2-core machine), and (b) the
        thread count changes the order of floating-point reductions, which t-SNE amplifies, so a
        fixed count keeps the embedding reproducible across machines. ``None`` keeps the
        library's default; larger values only pay off for many thousands of points.

    Returns
    -------
    numpy.ndarray
        ``float64`` array of shape ``(N, 2)``. Only distances *within* a cluster are meaningful;
        sizes of and distances between clusters in a t-SNE plot are not.

    Raises
    ------
    ValueError
        Fewer than 4 points, not 2-D input, ``D < 2``, non-finite values, all points identical or
        ``perplexity <= 0``.
    """
    from sklearn.manifold import TSNE

    a = _to_numpy(x).astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"x must have shape (N, D), got {a.shape}")
    n, d = a.shape
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    if d < 2:
        raise ValueError(f"t-SNE with PCA initialisation needs at least 2 features, got {d}")
    if not np.all(np.isfinite(a)):
        raise ValueError("x contains NaN or inf")
    if np.all(a == a[0]):  # scikit-learn's PCA initialisation divides by a zero spread: its Barnes-Hut step segfaults
        raise ValueError(f"all {n} points are identical (e.g. all-zero features): t-SNE has no distances to embed")
    if not perplexity > 0:
        raise ValueError(f"perplexity must be > 0, got {perplexity}")
    max_perplexity = (n - 1) / 3.0
    if perplexity > max_perplexity:
        warnings.warn(
            f"perplexity={perplexity} is too large for {n} points; using (N - 1) / 3 = {max_perplexity:.3g}",
            UserWarning,
            stacklevel=2,
        )
        perplexity = max_perplexity
    tsne = TSNE(n_components=2, perplexity=float(perplexity), init="pca", random_state=seed)
    if n_threads is None:
        emb = tsne.fit_transform(a)
    else:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=int(n_threads), user_api="openmp"):
            emb = tsne.fit_transform(a)
    return np.asarray(emb, dtype=np.float64)


def cluster_quality(emb: np.ndarray | torch.Tensor, labels: np.ndarray | Sequence) -> float:
    """Silhouette score of ``emb`` grouped by ``labels`` (e.g. the super-category of each point).

    For each point, the silhouette is ``(b - a) / max(a, b)`` where ``a`` is its mean Euclidean
    distance to the other points of its own group and ``b`` the mean distance to the points of
    the nearest other group; the score is the mean over points
    (:func:`sklearn.metrics.silhouette_score`).

    Parameters
    ----------
    emb : array-like, shape (N, k)
        Points, typically the output of :func:`tsne_embed` (any dimension works).
    labels : array-like, shape (N,)
        Group of each point (ints or strings); needs ``2 <= n_groups <= N - 1``.

    Returns
    -------
    float
        In ``[-1, 1]``. Higher means the groups (super-categories) form tighter, better separated
        clusters: near 1 = compact, well separated groups; near 0 = overlapping groups (what
        random labels give); negative = points are closer to another group than to their own.
        On a t-SNE embedding it measures the *picture*; computing it on the original features as
        well guards against reading too much into t-SNE.

    Raises
    ------
    ValueError
        Mismatched lengths or a number of groups outside ``[2, N - 1]``.
    """
    from sklearn.metrics import silhouette_score

    e = _to_numpy(emb).astype(np.float64)
    lab = _to_numpy(labels)
    if e.ndim != 2:
        raise ValueError(f"emb must have shape (N, k), got {e.shape}")
    if lab.ndim != 1 or len(lab) != len(e):
        raise ValueError(f"labels must have shape ({len(e)},), got {lab.shape}")
    n_groups = len(np.unique(lab))
    if not 2 <= n_groups <= len(e) - 1:
        raise ValueError(
            f"the silhouette score needs 2 <= n_groups <= N - 1, got {n_groups} groups for N={len(e)} points"
        )
    return float(silhouette_score(e, lab, metric="euclidean"))
