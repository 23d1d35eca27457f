"""An ML-GCN-style graph-convolution classifier head (Chen et al., CVPR 2019), the reference point
for AssocFormer's cost claim ("the GCN performs multi-matrix multiplication", AssocFormer Sec. 1, 3.4).

ML-GCN learns one classifier vector per class with a 2-layer GCN over label embeddings:

.. math::

    H^{(1)} = \\mathrm{LeakyReLU}(\\hat A\\, X\\, W_1), \\qquad W = \\hat A\\, H^{(1)} W_2 \\in R^{C \\times d},
    \\qquad \\text{logits} = L\\, W^\\top,

where ``X`` (C, e) are label word embeddings (GloVe, e = 300, in ML-GCN) and ``A_hat`` is the
re-weighted, binarised conditional co-occurrence matrix of the training labels (ML-GCN Eqs. 7-8:
``A_ij = 1[P(j|i) >= tau]``, then ``p * A_ij / sum_{j != i} A_ij`` off the diagonal and ``1 - p`` on it),
normalised symmetrically ``D^-1/2 A D^-1/2``. Offline there are no GloVe vectors: ``X`` is a fixed
random Gaussian buffer (seeded) unless ``word_embeddings`` is given. The head has the width of the
backbone embedding (hidden size = ``d``), as the issue asks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["GCNHead", "mlgcn_adjacency"]


def mlgcn_adjacency(cond: np.ndarray, tau: float = 0.4, p: float = 0.2) -> np.ndarray:
    """ML-GCN's correlation matrix from conditional probabilities ``cond[i, j] = P(j | i)``.

    Binarise at ``tau``, re-weight so a node keeps ``1 - p`` of itself and spreads ``p`` over its
    neighbours, then normalise ``D^-1/2 A D^-1/2`` (``D`` = row sums). Returns a float32 (C, C) array.
    Row ``i`` holds the classes ``j`` with ``P(j|i) >= tau``, so the GCN's ``A_hat X`` gathers into class ``i``
    from the classes it implies (not symmetric in general). Every row of Eq. 8's matrix sums to 1 (a class with no
    neighbour keeps 1 on its diagonal), so the symmetric normalisation of the GCN layer changes nothing here; it is
    applied as the GCN's ``A_hat`` is defined.
    """
    cond = np.asarray(cond, dtype=np.float64)
    if cond.ndim != 2 or cond.shape[0] != cond.shape[1]:
        raise ValueError(f"cond must be a square (C, C) matrix of P(j|i); got shape {cond.shape}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (neighbour weight) must be in [0, 1]; got {p}")
    c = cond.shape[0]
    a = (cond >= tau).astype(np.float64)
    np.fill_diagonal(a, 0.0)
    deg = a.sum(1, keepdims=True)
    a = np.where(deg > 0, p * a / np.maximum(deg, 1e-12), 0.0)
    a += np.diag(np.where(deg[:, 0] > 0, 1.0 - p, 1.0))
    d = a.sum(1)
    dinv = 1.0 / np.sqrt(np.maximum(d, 1e-12))
    return (dinv[:, None] * a * dinv[None, :]).astype(np.float32).reshape(c, c)


class GCNHead(nn.Module):
    """``L (B, d) -> logits (B, C)`` through GCN-generated classifiers (see the module docstring).

    Parameters
    ----------
    num_classes : C.
    embed_dim : d, the backbone embedding size (the GCN's output width).
    adjacency : (C, C) normalised correlation matrix (:func:`mlgcn_adjacency`); identity if omitted.
    in_dim : label-embedding size e (300 = GloVe in ML-GCN).
    hidden : GCN hidden width; default ``embed_dim`` ("same width").
    word_embeddings : optional (C, e) label embeddings; default a fixed random buffer (seed 0).
    """

    def __init__(self, num_classes: int, embed_dim: int, adjacency: np.ndarray | Tensor | None = None,
                 in_dim: int = 300, hidden: int | None = None, word_embeddings: np.ndarray | Tensor | None = None):
        super().__init__()
        if num_classes < 1 or embed_dim < 1 or in_dim < 1:
            raise ValueError(f"num_classes, embed_dim and in_dim must be positive; got {num_classes}, "
                             f"{embed_dim}, {in_dim}")
        hidden = hidden or embed_dim
        adj = (torch.eye(num_classes) if adjacency is None
               else torch.as_tensor(np.asarray(adjacency), dtype=torch.float32))
        if adj.shape != (num_classes, num_classes):
            raise ValueError(f"adjacency must be ({num_classes}, {num_classes}); got {tuple(adj.shape)}")
        if word_embeddings is None:
            g = torch.Generator().manual_seed(0)
            emb = torch.randn(num_classes, in_dim, generator=g)
        else:
            emb = torch.as_tensor(np.asarray(word_embeddings), dtype=torch.float32)
            if emb.shape != (num_classes, in_dim):
                raise ValueError(f"word_embeddings must be ({num_classes}, {in_dim}); got {tuple(emb.shape)}")
        self.register_buffer("adjacency", adj)
        self.register_buffer("word_embeddings", emb)
        self.gc1 = nn.Linear(in_dim, hidden, bias=False)
        self.gc2 = nn.Linear(hidden, embed_dim, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.num_classes, self.embed_dim = num_classes, embed_dim

    def classifiers(self) -> Tensor:
        """The (C, d) per-class classifier vectors ``W`` produced by the two graph convolutions."""
        h = self.act(self.adjacency @ self.gc1(self.word_embeddings))
        return self.adjacency @ self.gc2(h)

    def forward(self, L: Tensor) -> Tensor:
        if L.ndim != 2 or L.shape[1] != self.embed_dim:
            raise ValueError(f"GCNHead expects embeddings (B, {self.embed_dim}); got {tuple(L.shape)}")
        return L @ self.classifiers().t()
