"""Host synchronisations per training step, for every chapter's step (forward and backward).

A step that waits for the GPU (``.item()``, a boolean index, a plain copy of host memory to the device, an SVD on
CUDA) stalls the host until every queued kernel has run, so the next batch cannot be queued behind it. The
engine's own loop reads the loss every ``log_every`` steps only; the steps themselves should not sync at all.

- On CUDA (the default where one is present) it counts the synchronising CUDA calls that PyTorch reports under
  ``torch.cuda.set_sync_debug_mode("warn")``, under bf16 autocast as the engine trains.
- On ``--device meta`` (the default on a machine without a GPU) it runs the steps on PyTorch's ``meta`` device,
  which stands in for a GPU: it counts the blocking host-to-device copies and the operators that sync on CUDA by
  design (an SVD, :data:`CUDA_SYNCING_OPS`), and a data-dependent operation (``.item()``, ``nonzero``) fails there
  and is reported as such.

Small models of the chapters' kinds: the number of syncs does not depend on the model's size.

    python benchmarks/host_syncs.py                 # CUDA if present, else meta
    python benchmarks/host_syncs.py --out syncs.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlic_lib import psd
from mlic_lib.assoc_losses import AssocFormerLoss
from mlic_lib.engine import SupervisedStep
from mlic_lib.indeed import INDeeDStep, build_indeed_model
from mlic_lib.ltml import LTMLStep, ltml_class_weights
from mlic_lib.mixing import pad_boxes
from mlic_lib.models import build_model
from mlic_lib.models.assocformer import AssocFormerStep, build_assocformer
from mlic_lib.models.ltml import build_two_branch
from mlic_lib.splicemix_cl import MosaicStep, make_step
from mlic_lib.utils import BlockingCopies, atomic_open

C, B, SIDE = 20, 8, 32
#: operators whose CUDA kernels wait for the host (PyTorch's documentation: "synchronizes that device with the CPU");
#: on meta they run without data, so they are counted by name
CUDA_SYNCING_OPS = frozenset({"_linalg_svd", "_linalg_eigh", "linalg_eig"})
WIDTHS = (4, 8, 8, 8)


def _net():
    return build_model("small_resnet", C, widths=WIDTHS)


def cases() -> dict:
    """``{name: (step, model, batch)}`` on the CPU: each chapter's training steps and their options."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, SIDE, SIDE, generator=g)
    y = (torch.rand(B, C, generator=g) < 0.2).float()
    y[:, 0] = 1  # every image has a label
    out = {"supervised": (SupervisedStep(), _net(), [x, y]),
           "supervised + label mask": (SupervisedStep(), _net(), [x, y, torch.rand(B, C, generator=g) < 0.9])}
    for method in ("mixup", "cutmix", "batch_aug", "splicemix", "splicemix_cl"):
        out[method] = (make_step(method), _net(), [x, y, torch.arange(B)])
    boxes = [np.array([[i % C, 2, 2, 20, 20]]) for i in range(B)]
    mosaic = MosaicStep(pad_boxes(boxes))
    out["mosaic"] = (mosaic, _net(), mosaic.host_batch([x, y, torch.arange(B)]))
    xi = torch.randn(B, 1, 42, 42, generator=g)
    yi = torch.zeros(B, 10)
    for i in range(B):
        yi[i, torch.randperm(10, generator=g)[:3]] = 1
    for name, options in (("indeed L2", {}), ("indeed min-max", {"norm": "minmax"}),
                          ("indeed each", {"pairing": "each"}),
                          ("indeed without default pairs", {"default_pairs_disparate": False})):
        step = INDeeDStep(**options)
        model = build_indeed_model({"name": "simple_cnn", "widths": [8, 16, 16], "hidden": 32}, 10, 1, 42)
        out[name] = (step, model, step.host_batch([xi, yi]))
    pos_weight, neg_weight = ltml_class_weights(list(range(1, C + 1)), 100)
    out["ltml"] = (LTMLStep(pos_weight, neg_weight), build_two_branch("small_resnet", C, widths=WIDTHS), [x, y, x, y])
    out["psd teacher (ASL)"] = (psd.ASLStep(), _net(), [x, y])
    teacher_logits, kd_mask = torch.randn(B, 2, C, generator=g), (torch.rand(B, 2, C, generator=g) < 0.5).float()
    out["psd student, precomputed teachers"] = (psd.DistillationStep(), _net(), [x, y, teacher_logits, kd_mask])
    subsets = [list(range(i, C, 5)) for i in range(5)]  # k = 5
    ensembles = [psd.TeacherEnsemble([build_model("small_resnet", len(s), widths=WIDTHS) for s in subsets],
                                     subsets, C).eval() for _ in range(2)]
    out["psd student, teachers on each batch (k=5)"] = (psd.DistillationStep(teachers=ensembles), _net(), [x, y])
    kw = {"img_size": SIDE, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
    for norm in ("l2", "nuclear"):
        out[f"assocformer {norm}"] = (AssocFormerStep(AssocFormerLoss(norm=norm)),
                                      build_assocformer(C, "vit_tiny_patch16_224", "equal", kw), [x, y])
    return out


class _SyncingOps(TorchDispatchMode):
    """Counts the operators of :data:`CUDA_SYNCING_OPS` run under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._overloadpacket.__name__ in CUDA_SYNCING_OPS
        return func(*args, **(kwargs or {}))


def _moved(step, model, batch, device):
    model = model.to(device)
    for t in getattr(step, "teachers", None) or []:
        t.to(device)
    return model, [b.to(device) if isinstance(b, torch.Tensor) else b for b in batch]


def count(name: str, step, model, batch, device: torch.device, steps: int) -> dict:
    """Syncs (CUDA) or blocking copies (meta) per step over ``steps`` steps, after one step that may move state."""
    model, batch = _moved(step, model, batch, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def one():
        with autocast:
            loss, _ = step(model, batch, device)
        loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        one()  # the first step may move state once (LTML's class weights)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(steps):
                        one()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            n = sum("synchroniz" in str(w.message) for w in caught)
        else:
            with BlockingCopies() as mode, _SyncingOps() as ops:
                for _ in range(steps):
                    one()
            n = mode.count + ops.count
    except (NotImplementedError, RuntimeError) as err:  # on meta: a data-dependent op (.item(), nonzero)
        return {"step": name, "per_step": None, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    return {"step": name, "per_step": n / steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else meta), cuda or meta")
    p.add_argument("--steps", type=int, default=3, help="steps counted per training step kind")
    p.add_argument("--only", nargs="*", help="names (or parts of names) of the steps to count")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("meta" if args.device == "auto" else args.device))
    if device.type not in ("cuda", "meta"):
        p.error("--device must be cuda or meta: a CPU step has no host sync to count")
    torch.manual_seed(0)
    what = "synchronising CUDA calls" if device.type == "cuda" else ("blocking host-to-device copies and "
                                                                 "operators that sync on CUDA (meta device)")
    rows = [count(name, *case, device, args.steps) for name, case in cases().items()
            if not args.only or any(o in name for o in args.only)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "meta (no data)"
    print(f"{what} per training step (forward + backward, mean of {args.steps}), {name}, torch {torch.__version__}")
    for r in rows:
        print(f"  {r['step']:45s} {r['per_step'] if r['per_step'] is not None else r['error']}")
    if args.out:
        with atomic_open(args.out, "w") as fh:
            json.dump({"device": name, "counted": what, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
