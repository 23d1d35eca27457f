"""The roofline floor of one training step: how fast could the step of ``train_throughput.py`` be at best?

Every operator of one training step's forward and backward pass is recorded on the ``meta`` device (no
arithmetic, so this runs on a laptop in seconds) with the FLOPs that ``torch.utils.flop_counter`` assigns it
and the fewest bytes it must move through device memory: each tensor it reads once and each tensor it
writes once, activations in bf16 (as under bf16 autocast), views free; the casts and the SGD update of the
fp32 weights are added from the parameter count. An operator takes at least
``max(FLOPs / matrix rate, bytes / memory bandwidth)``; the sum over operators is the floor of the step
run op by op (eager PyTorch). A second floor assumes perfect fusion: only the operators with FLOPs
(convolutions, matrix products, attention) move bytes, every normalisation, activation and addition folded
into them. That is an idealised bound: in training, batch normalisation needs the batch statistics before it
can normalise (and its backward needs reductions first), so no compiler reaches it; ``torch.compile`` fuses
part of the way.

Dividing the step's FLOPs by a floor gives the highest model FLOP utilisation (MFU) that way of running
could reach. The rates default to measurements on an H100 80GB HBM3 of the kind this project was lent (an
8192^3 bf16 matrix product at 798 TFLOP/s, a device-to-device copy at 3.0 TB/s counting bytes read and
written; taken by the lending workplace, not by this script); pass your own with ``--tflops`` / ``--tbps``.
MFU is quoted against the 989 TFLOP/s of the data sheet, as in ``train_throughput.py``.

    python benchmarks/roofline.py                        # ResNet-101, 448 px, batch 32, the baseline step
    python benchmarks/roofline.py --method splicemix --batch 64
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from mlic_lib.engine import SupervisedStep
from mlic_lib.mixing import SpliceMix
from mlic_lib.models import build_model
from mlic_lib.splicemix_cl import SpliceMixStep
from mlic_lib.utils import atomic_open

UPDATE_BYTES_PER_PARAM = 6 + 6 + 20  # bf16 cast of the weight, fp32 cast of its gradient, SGD with momentum

def _moves_no_data(func) -> bool:
    """A view (its output aliases an input and writes nothing) or a metadata-only op."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class OpCosts(TorchDispatchMode):
    """Records ``(op name, flops, bytes)`` for every ATen operator run under it."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        nbytes = 0
        if not _moves_no_data(func):
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.rows.append((packet.__name__, int(flops), int(nbytes)))
        return out


def step_costs(arch: str, size: int, batch: int, classes: int, method: str) -> tuple[OpCosts, int]:
    """The operators of the forward and backward pass of one bf16 training step on the meta device, and the
    model's parameter count."""
    torch.manual_seed(0)
    model = build_model(arch, classes, pool="max").to(device="meta", dtype=torch.bfloat16)
    step = SupervisedStep() if method == "baseline" else SpliceMixStep(SpliceMix(grids={"2x2": 1.0}, p_drop=0.0))
    x = torch.randn(batch, 3, size, size, device="meta", dtype=torch.bfloat16)
    y = torch.zeros(batch, classes, device="meta", dtype=torch.bfloat16)
    costs = OpCosts()
    with costs:  # the optimiser update is counted in floors(), for fp32 weights
        loss, _ = step(model, [x, y], torch.device("meta"))
        loss.backward()
    return costs, sum(p.numel() for p in model.parameters())


def floors(costs: OpCosts, n_params: int, tflops: float, tbps: float) -> dict:
    """Step floors in seconds (op by op, and perfectly fused) plus totals per kind of operator."""
    rate, bw = tflops * 1e12, tbps * 1e12
    # under autocast the weights stay fp32: the forward casts each weight to bf16 (read 4 B, write 2 B), the
    # backward casts its bf16 gradient into the fp32 .grad (2 + 4 B), and SGD with momentum reads w, g, m and
    # writes w, m (20 B)
    update_bytes = n_params * UPDATE_BYTES_PER_PARAM
    update = update_bytes / bw
    flops = sum(f for _, f, _ in costs.rows)
    eager = sum(max(f / rate, b / bw) for _, f, b in costs.rows) + update
    fused = sum(max(f / rate, b / bw) for _, f, b in costs.rows if f > 0) + update
    by_kind = defaultdict(lambda: [0, 0, 0.0])
    for _, f, b in costs.rows:
        k = by_kind["with FLOPs (conv, matrix product)" if f > 0 else "other (norm, activation, add, pool)"]
        k[0] += f
        k[1] += b
        k[2] += max(f / rate, b / bw)
    by_kind["fp32 weights: casts and SGD update"] = [0, update_bytes, update]
    return {"flops": flops, "eager_floor_s": eager, "fused_floor_s": fused,
            "by_kind": {k: {"tflops": v[0] / 1e12, "gbytes": v[1] / 1e9, "floor_ms": v[2] * 1e3}
                        for k, v in by_kind.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet101")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--method", choices=["baseline", "splicemix"], default="baseline")
    p.add_argument("--tflops", type=float, default=798.0, help="measured bf16 matrix rate, TFLOP/s")
    p.add_argument("--tbps", type=float, default=3.0, help="measured memory bandwidth, TB/s (read + write)")
    p.add_argument("--peak", type=float, default=989.0, help="data-sheet bf16 peak for the MFU, TFLOP/s")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    costs, n_params = step_costs(args.arch, args.size, args.batch, args.classes, args.method)
    r = floors(costs, n_params, args.tflops, args.tbps)
    print(f"{args.arch} {args.size}x{args.size}, batch {args.batch}, {args.method} step: "
          f"{r['flops'] / 1e12:.2f} TFLOP, {len(costs.rows)} operators, {n_params / 1e6:.1f} M parameters")
    print(f"rates: {args.tflops:g} TFLOP/s (matrix), {args.tbps:g} TB/s (memory); MFU against {args.peak:g} TFLOP/s")
    for kind, v in r["by_kind"].items():
        print(f"  {kind:42s} {v['tflops']:7.2f} TFLOP {v['gbytes']:8.1f} GB  floor {v['floor_ms']:7.1f} ms")
    for name, key in (("op by op (eager)", "eager_floor_s"), ("perfectly fused", "fused_floor_s")):
        s = r[key]
        print(f"floor {name:18s} {s * 1e3:7.1f} ms/step  {args.batch / s:7.0f} img/s  "
              f"MFU at most {r['flops'] / s / (args.peak * 1e12):.1%}")
    if args.out:
        with atomic_open(args.out, "w") as fh:
            json.dump({"args": vars(args), **r, "n_params": n_params}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
