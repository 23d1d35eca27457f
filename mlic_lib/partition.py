"""Complementary task decomposition of CPSD (Xu et al., IJCAI 2022, Sec. 3.2): CGP and DGP label partitions.

The label set is split into ``k`` disjoint category subsets by spectral clustering of a category graph:

* the similarity ``S_ij = e_ij / n_i`` (``e_ij`` = images with both ``c_i`` and ``c_j``, ``n_i`` = images
  with ``c_i``), i.e. the conditional probability ``P(c_j | c_i)``;
* smoothed by the ``tau``-th root (Eq. 1: ``S^(1/tau)``, the paper's ``\\sqrt[tau]{S}``; the paper sets
  ``tau = 3``; the authors' partition script uses the square root, ``tau = 2``, which reproduces their
  published CGP partitions (see below); their published DGP partitions fit ``tau = 3`` better than ``tau = 2``
  but are reproduced only at ``k = 2``: best ARI over seeds 0.65-0.75 at ``k = 3, 5, 8``, 0.36 at ``k = 13``)
  and symmetrised,
  ``R = (S^(1/tau) + S^(1/tau)^T) / 2``;
* the **co-occurrence graph** (CGP) has affinity ``P+ = R``; the **dis-occurrence graph** (DGP) has
  ``P- = I - R`` in the paper's Eq. 1 and ``P- = 1 - R`` (all-ones matrix) in the authors' code
  (option ``complement``, see :func:`affinity`);
* Eq. 2: normalised spectral clustering of the affinity (eigenvectors of the normalised Laplacian
  ``D^-1/2 (D - P) D^-1/2`` for the ``k`` smallest eigenvalues, then k-means) gives the ``k`` category
  subsets. The printed Eq. 2's degree ``D_ii = sum_j P_ij`` includes ``P_ii = R_ii``; the authors' code
  calls scikit-learn's ``SpectralClustering(affinity='precomputed')``, which drops the diagonal of ``P``
  (no self-loops) and scales the eigenvectors by ``D^-1/2`` before k-means. On COCO the two give different
  CGP partitions (for ``k >= 3``). The default is the paper's (``laplacian='eq2'``); ``laplacian='code'``
  is the authors': with ``tau = 2`` and seed 0 it reproduces their published CGP partitions of ML-GCN's COCO
  counts at ``k = 2, 5, 8`` (ARI 1) and nearly at ``k = 3`` (ARI 0.96), not at ``k = 13`` (0.57), while the
  printed form matches at ``k = 2`` only (:func:`spectral_partition`).

CGP puts co-occurring classes together (teachers learn joint patterns); DGP puts classes that rarely
co-occur together (teachers learn category-specific patterns). :func:`random_partition` is the paper's
random baseline of Fig. 3.

Counts can be given as a multi-hot label matrix or in the ML-GCN ``adj``/``nums`` format (off-diagonal
co-occurrence counts and per-class image counts). ML-GCN's ``adj`` stores 0 on its diagonal; by definition
``e_ii = n_i`` (the images that contain ``c_i`` contain it), so :func:`similarity_matrix` puts ``n_i`` there and
``S_ii = 1`` for every class with an image, from either format. (scikit-learn's Laplacian ignores the diagonal;
the printed Eq. 2's degrees include it, so with ``laplacian='eq2'`` a zero diagonal would change the partition.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mlic_lib.data import stats

__all__ = [
    "COMPLEMENTS",
    "LAPLACIANS",
    "STRATEGIES",
    "affinity",
    "assignment_from_subsets",
    "check_partition",
    "cohesion",
    "load_authors_partition",
    "partition_agreement",
    "partition_labels",
    "random_partition",
    "RANDOM_SIZES",
    "root_similarity",
    "similarity_matrix",
    "spectral_partition",
    "subsets_from_assignment",
]

STRATEGIES = ("cgp", "dgp", "random")
COMPLEMENTS = ("identity", "ones")
#: Laplacian of Eq. 2: 'code' = scikit-learn's (self-loops dropped, as the authors' code), 'eq2' = as printed.
LAPLACIANS = ("code", "eq2")


def similarity_matrix(counts=None, nums=None, *, targets=None, clip: bool = False) -> np.ndarray:
    """``S_ij = e_ij / n_i`` (CPSD Sec. 3.2), shape ``(C, C)``; rows of classes with no image are 0.

    Parameters
    ----------
    counts : ``(C, C)`` co-occurrence counts ``e_ij`` (ML-GCN ``adj``; its diagonal may be 0), or ``None``.
    nums : ``(C,)`` images per class ``n_i`` (ML-GCN ``nums``); default the diagonal of ``counts``. When given,
        it is also the diagonal of the counts (``e_ii = n_i`` by definition; ML-GCN's ``adj`` stores 0 there).
    targets : ``(N, C)`` multi-hot label matrix, instead of ``counts``/``nums``.
    clip : cap ``e_ij`` at ``n_i`` (so ``S_ij <= 1``). Counts of one label set never exceed it, and by default a
        count that does is an error; ML-GCN's NUS-WIDE ``adj`` has such counts (``S_ij`` up to 1.95), which
        the authors' code takes the root of as they are.
    """
    if (counts is None) == (targets is None):
        raise ValueError("give either counts (with nums) or targets=label matrix, not both / neither")
    if targets is not None:
        t = np.asarray(targets)
        return stats.conditional_probability(stats.cooccurrence(t), stats.class_counts(t))
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be a square (C, C) co-occurrence matrix, got shape {counts.shape}; "
                         "pass a label matrix as targets=...")
    if nums is None and not np.any(np.diag(counts)):
        raise ValueError("counts has a zero diagonal (ML-GCN 'adj' format): pass nums= the per-class image counts")
    if (counts < 0).any() or (nums is not None and (np.asarray(nums) < 0).any()):
        raise ValueError("co-occurrence counts must be non-negative")
    n_i = np.diag(counts) if nums is None else np.asarray(nums, dtype=np.float64)
    over = counts > n_i[:, None]
    np.fill_diagonal(over, False)
    if clip:
        counts = np.where(over, n_i[:, None], counts)
    elif over.any():  # e.g. ML-GCN's NUS-WIDE adj: S_ij would exceed 1, and Eq. 1's root has no meaning there
        i, j = np.unravel_index(int(np.argmax(np.where(over, counts / np.maximum(n_i[:, None], 1), 0))), counts.shape)
        raise ValueError(f"{int(over.sum())} co-occurrence counts exceed their class's image count (e.g. e[{i},{j}] = "
                         f"{counts[i, j]:g} > n[{i}] = {n_i[i]:g}): the counts and nums come from different label "
                         "sets; recount both from one label matrix (similarity_matrix(targets=...)), or pass clip=True "
                         "to cap each count at its class's")
    S = stats.conditional_probability(counts, nums)
    np.fill_diagonal(S, n_i > 0)  # e_ii = n_i, so S_ii = 1 (the printed Eq. 2's degrees include it)
    return S


def root_similarity(S: np.ndarray, tau: float = 3.0) -> np.ndarray:
    """The ``tau``-th root ``S^(1/tau)`` of Eq. 1 (elementwise). ``tau = 1`` leaves ``S`` unchanged;
    larger ``tau`` lifts small (tail) probabilities more than large ones."""
    if not np.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a positive number (paper: 3, authors' code: 2), got {tau!r}")
    S = np.asarray(S, dtype=np.float64)
    if (S < 0).any() or (S > 1 + 1e-9).any():
        raise ValueError("S must hold probabilities in [0, 1] (S_ij = e_ij / n_i); see similarity_matrix")
    return np.clip(S, 0.0, 1.0) ** (1.0 / tau)


def affinity(S: np.ndarray, graph: str = "cgp", tau: float = 3.0, complement: str = "ones") -> np.ndarray:
    """Affinity of the co-occurrence (``'cgp'``, ``P+``) or dis-occurrence (``'dgp'``, ``P-``) graph, Eq. 1.

    ``R = (S^(1/tau) + (S^(1/tau))^T) / 2``; ``P+ = R``; ``P- = I - R`` (``complement='identity'``, Eq. 1 as
    printed) or ``P- = 1 - R`` (``complement='ones'``, the authors' code). Off the diagonal the printed
    ``I - R`` is ``-R <= 0``: a graph with negative edge weights has no normalised cut (the degrees in Eq. 2
    can be negative), so :func:`spectral_partition` rejects it. ``'ones'`` is the evident intent
    ("dis-occurrence" = one minus co-occurrence) and is the default; the literal form is exposed so the
    difference can be shown.
    """
    if graph not in ("cgp", "dgp"):
        raise ValueError(f"graph must be 'cgp' (co-occurrence) or 'dgp' (dis-occurrence), got {graph!r}")
    if complement not in COMPLEMENTS:
        raise ValueError(f"complement must be one of {COMPLEMENTS} (paper prints I - R, authors use 1 - R), "
                         f"got {complement!r}")
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be square (C, C), got shape {S.shape}")
    R = root_similarity(S, tau)
    R = 0.5 * (R + R.T)
    if graph == "cgp":
        return R
    base = np.eye(len(R)) if complement == "identity" else np.ones_like(R)
    return base - R


def spectral_partition(P: np.ndarray, k: int, seed: int = 0, n_init: int = 20, laplacian: str = "eq2") -> np.ndarray:
    """Eq. 2: normalised spectral clustering of a precomputed affinity into ``k`` clusters.

    ``laplacian='eq2'`` (default): Eq. 2 as printed, ``D_ii = sum_j P_ij`` *with* ``P_ii``, ``F`` = the
    eigenvectors of ``D^-1/2 (D - P) D^-1/2`` for the ``k`` smallest eigenvalues, then k-means on the rows
    of ``F`` (``n_init`` restarts, ``seed``). ``laplacian='code'``: scikit-learn's
    ``SpectralClustering(affinity='precomputed')``, as the authors' code; it drops the diagonal of ``P`` and
    runs k-means on the ``k`` eigenvectors scaled by ``D^-1/2`` (with ``tau = 2`` it reproduces most of the
    authors' published CGP partitions, see the module docstring).

    Returns the cluster of each class, shape ``(C,)``, relabelled so that cluster ids appear in order of
    their smallest class index (deterministic for a ``seed``). ``k = 1`` returns all zeros.
    """
    if laplacian not in LAPLACIANS:
        raise ValueError(f"laplacian must be one of {LAPLACIANS} ('code' = scikit-learn, no self-loops, as the "
                         f"authors' code; 'eq2' = Eq. 2 as printed), got {laplacian!r}")
    P = np.asarray(P, dtype=np.float64)
    C = len(P)
    if P.ndim != 2 or P.shape != (C, C):
        raise ValueError(f"affinity must be square (C, C), got shape {P.shape}")
    if not 1 <= int(k) <= C:
        raise ValueError(f"k must be between 1 and the number of classes ({C}), got {k}")
    if not np.isfinite(P).all():
        raise ValueError("affinity contains NaN or inf")
    off = P[~np.eye(C, dtype=bool)]
    if (off < -1e-12).any():
        raise ValueError("affinity has negative off-diagonal weights (the printed DGP form I - R): a normalised "
                         "graph cut is undefined; use affinity(..., complement='ones') as the authors' code does")
    if not np.allclose(P, P.T):
        raise ValueError("affinity must be symmetric: symmetrise it, (P + P.T) / 2 (Eq. 1)")
    if k == 1:
        return np.zeros(C, dtype=np.int64)
    if laplacian == "eq2":
        return _canonical(_eq2_partition(P, int(k), seed, n_init))
    import warnings

    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(n_clusters=int(k), affinity="precomputed", n_init=n_init,
                                    random_state=seed, assign_labels="kmeans").fit_predict(np.clip(P, 0, None))
    return _canonical(labels)


def _eq2_partition(P: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """Eq. 2 as printed: the normalised Laplacian with the degrees of ``P`` including its diagonal.

    A class with no edge at all (zero degree, e.g. a class without training images in the CGP graph) would make
    ``D^-1/2`` undefined; it is given a self-loop instead, which makes it a component of its own (as
    scikit-learn treats an isolated node), with a warning."""
    import warnings

    from sklearn.cluster import KMeans

    d = P.sum(1)
    isolated = d <= 1e-12
    if isolated.any():
        warnings.warn(f"classes {np.flatnonzero(isolated).tolist()} have no edge in the graph (e.g. no training "
                      "image): each is made a component of its own", stacklevel=3)
        P = P.copy()
        P[isolated, isolated] = 1.0  # the diagonal entries of those classes
        d = P.sum(1)
    r = 1.0 / np.sqrt(d)
    L = np.eye(len(P)) - r[:, None] * P * r[None, :]
    _, vecs = np.linalg.eigh(L)  # ascending eigenvalues
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(vecs[:, :k])


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters by first appearance (so equal partitions give equal arrays)."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    order = np.asarray(labels)[np.sort(first)]
    remap = {int(c): i for i, c in enumerate(order)}
    return np.array([remap[int(c)] for c in labels], dtype=np.int64)


RANDOM_SIZES = ("equal", "random")


def random_partition(num_classes: int, k: int, seed: int = 0, sizes: str = "equal") -> np.ndarray:
    """The random decomposition baseline (Fig. 3): a random permutation cut into ``k`` subsets.

    The paper does not say how. ``sizes='equal'`` cuts it into near-equal subsets; ``'random'`` cuts it at
    ``k - 1`` distinct points drawn uniformly, as the authors' ``generate_rand_partirion.py`` does (their cut
    may fall at 0 and leave a subset empty; here the points are drawn from ``1 .. C-1``, so none is)."""
    if not 1 <= int(k) <= num_classes:
        raise ValueError(f"k must be between 1 and num_classes ({num_classes}), got {k}")
    if sizes not in RANDOM_SIZES:
        raise ValueError(f"sizes must be one of {RANDOM_SIZES} ('equal' or the authors' random cuts), got {sizes!r}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_classes)
    if sizes == "equal":
        parts = np.array_split(perm, int(k))
    else:
        cuts = np.sort(rng.choice(np.arange(1, num_classes), size=int(k) - 1, replace=False))
        parts = np.split(perm, cuts)
    labels = np.empty(num_classes, dtype=np.int64)
    for t, part in enumerate(parts):
        labels[part] = t
    return _canonical(labels)


def subsets_from_assignment(labels: Sequence[int]) -> list[np.ndarray]:
    """Cluster ids ``(C,)`` -> list of ``k`` sorted index arrays ``C_t`` (ordered by cluster id)."""
    labels = np.asarray(labels, dtype=np.int64)
    return [np.flatnonzero(labels == t) for t in np.unique(labels)]


def assignment_from_subsets(subsets: Sequence[Sequence[int]], num_classes: int | None = None) -> np.ndarray:
    """Inverse of :func:`subsets_from_assignment`; checks that the subsets partition the classes."""
    subsets = [np.asarray(s, dtype=np.int64) for s in subsets]
    C = num_classes if num_classes is not None else int(sum(len(s) for s in subsets))
    check_partition(subsets, C)
    labels = np.empty(C, dtype=np.int64)
    for t, s in enumerate(subsets):
        labels[s] = t
    return labels


def check_partition(subsets: Sequence[Sequence[int]], num_classes: int) -> None:
    """Raise ``ValueError`` unless the subsets are non-empty, disjoint and cover ``0..num_classes-1``
    (``U C_t = C`` and ``C_t n C_s = {}`` in Sec. 3.2)."""
    allidx = np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in subsets]) if len(subsets) else np.array([])
    if any(len(s) == 0 for s in subsets):
        raise ValueError("a category subset is empty: every sub-task needs at least one class (lower k)")
    if allidx.size and (allidx.min() < 0 or allidx.max() >= num_classes):
        bad = sorted({int(i) for i in allidx if not 0 <= i < num_classes})
        raise ValueError(f"class indices must be in 0..{num_classes - 1}; got {bad}")
    counts = np.bincount(allidx.astype(np.int64), minlength=num_classes) if allidx.size else np.zeros(num_classes)
    if (counts != 1).any():
        missing = np.flatnonzero(counts == 0).tolist()
        dup = np.flatnonzero(counts > 1).tolist()
        raise ValueError(f"subsets must cover every class exactly once; missing {missing}, repeated {dup}")


def partition_labels(strategy: str, k: int, *, S: np.ndarray | None = None, num_classes: int | None = None,
                     tau: float = 3.0, complement: str = "ones", seed: int = 0, n_init: int = 20,
                     laplacian: str = "eq2", random_sizes: str = "equal") -> list[np.ndarray]:
    """The task decomposition ``Psi``: ``k`` disjoint category subsets by ``'cgp'``, ``'dgp'`` or ``'random'``.

    ``S`` (from :func:`similarity_matrix`) is needed for CGP/DGP; ``random`` needs only ``num_classes``.
    ``laplacian``: see :func:`spectral_partition`; ``random_sizes``: see :func:`random_partition`.
    Returns a list of sorted index arrays, ordered by their smallest class.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "random":
        C = num_classes if num_classes is not None else (len(S) if S is not None else None)
        if C is None:
            raise ValueError("random partition needs num_classes (or S)")
        return subsets_from_assignment(random_partition(C, k, seed, random_sizes))
    if S is None:
        raise ValueError(f"strategy {strategy!r} needs the similarity matrix S (see similarity_matrix)")
    P = affinity(S, strategy, tau=tau, complement=complement)
    return subsets_from_assignment(spectral_partition(P, k, seed=seed, n_init=n_init, laplacian=laplacian))


def partition_agreement(a, b) -> float:
    """Adjusted Rand index between two partitions, each given as cluster ids ``(C,)`` or a list of subsets."""
    from sklearn.metrics import adjusted_rand_score

    def ids(p):
        if len(p) and not np.isscalar(p[0]) and np.ndim(p[0]) > 0:
            return assignment_from_subsets(p)
        return np.asarray(p, dtype=np.int64)

    a, b = ids(a), ids(b)
    if a.shape != b.shape:
        raise ValueError(f"partitions cover different numbers of classes: {a.shape[0]} and {b.shape[0]}")
    return float(adjusted_rand_score(a, b))


def load_authors_partition(path: str | Path) -> list[np.ndarray]:
    """Read a CPSD authors' partition file: a JSON list of ``{global_index: local_index}`` dicts, one per
    sub-task (``idx_coocurrence{k}_0.json`` = CGP, ``idx_cluster{k}_0.json`` = DGP). Each subset is returned
    in its local order (``subset[local] = global``), which is exactly the order its teacher's logits use."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not all(isinstance(d, Mapping) for d in data):
        raise ValueError(f"{path}: expected a list of {{global_index: local_index}} objects")
    out = []
    for d in data:
        pairs = sorted(((int(v), int(g)) for g, v in d.items()))
        out.append(np.array([g for _, g in pairs], dtype=np.int64))
    return out


def cohesion(S: np.ndarray, subsets: Sequence[Sequence[int]], tau: float = 1.0) -> float:
    """Mean symmetrised (rooted) co-occurrence ``R_ij`` over pairs of classes in the same subset: high for
    CGP (co-occurring classes together), low for DGP. Subsets of one class have no pairs and are skipped."""
    R = affinity(S, "cgp", tau=tau)
    vals = [R[np.ix_(s, s)][~np.eye(len(s), dtype=bool)] for s in (np.asarray(x) for x in subsets) if len(s) > 1]
    if not vals:
        return float("nan")
    return float(np.concatenate(vals).mean())
