"""An exponential moving average of a model's weights that never waits for the GPU.

``e <- decay * e + (1 - decay) * w`` over every parameter *and* buffer (BatchNorm statistics too), starting from a
copy of the model at the first update: what ``torch.optim.swa_utils.AveragedModel(model,
multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)`` computes, with the same ``state_dict`` keys
(``module.*`` and ``n_averaged``), so checkpoints written with either load into the other.

Why not ``AveragedModel`` itself: its update reads its step counter, a tensor, on every step (``n_averaged == 0``
and ``n_averaged.to(device)``), and with the counter on the CPU and the weights on a GPU that copy makes the host
wait for the GPU at every training step. Here the counter is a Python int; the tensor ``n_averaged`` is only
written (for the ``state_dict``) and read once, when a checkpoint is loaded.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA(nn.Module):
    """EMA of ``model``'s parameters and buffers with decay ``decay`` in (0, 1); the average is :attr:`module`.

    Call :meth:`update_parameters` after every optimiser step. The first call copies the model (the EMA starts
    at the first trained weights, as ``AveragedModel``'s); later ones lerp the floating-point tensors towards the
    model's in one ``torch._foreach_lerp_`` per device and dtype, and set an integer buffer (BatchNorm's
    ``num_batches_tracked``) to ``decay * e + (1 - decay) * w`` cast back to its type, as torch's EMA does.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model)
        self.decay = float(decay)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))  # for the state_dict only
        self._updates = 0

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Move the average one step towards ``model`` (no host sync: nothing here reads a tensor's value)."""
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(ours) != len(theirs):
            raise ValueError(f"the model has {len(theirs)} parameters and buffers, its average {len(ours)}: "
                             "update the average with the model it was made from")
        if self._updates == 0:
            torch._foreach_copy_(ours, [t.detach().to(e.device) for e, t in zip(ours, theirs, strict=True)])
        else:
            groups: dict[tuple[Any, Any], tuple[list, list]] = defaultdict(lambda: ([], []))
            for e, t in zip(ours, theirs, strict=True):
                if e.is_floating_point() or e.is_complex():
                    g = groups[e.device, e.dtype]
                    g[0].append(e)
                    g[1].append(t.detach().to(e.device))
                else:  # integer buffers: torch's EMA does the same, truncating towards zero on the copy
                    e.copy_(e * self.decay + t.detach().to(e.device) * (1.0 - self.decay))
            for es, ts in groups.values():
                torch._foreach_lerp_(es, ts, 1.0 - self.decay)
        self._updates += 1
        self.n_averaged.fill_(self._updates)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args, **kwargs) -> None:
        # here rather than in load_state_dict, which a parent module's load_state_dict (a training script that
        # saves its model and this average in one module) never calls: the counter must follow n_averaged then too
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._updates = int(self.n_averaged)  # once, when a checkpoint is loaded
