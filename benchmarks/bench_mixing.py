"""Time one training iteration of each mix-style method relative to the baseline (Table II of SpliceMix).

Every method runs the same model on the same in-memory regular batch; the timed iteration is the full step
(mixing + forward + loss + backward + optimiser step). Methods are interleaved round by round so that a
change of machine load hits them all alike, and the *median* over rounds is reported.

Usage::

    python benchmarks/bench_mixing.py                       # small_resnet, 64 px, batch 32, CPU
    python benchmarks/bench_mixing.py --backbone resnet101 --size 448 --batch 32 --device cuda  # paper setting

The paper's numbers (COCO, batch 32, RTX 3090) include image loading from disk: at the same *final* batch
size SpliceMix reads 28 images and mixes 4 of them, while Mosaic reads 4x more images. This benchmark keeps
the *regular* batch fixed and has no I/O (data in memory), so it measures compute only: SpliceMix and
SpliceMix-CL pay for their 25 % larger batch, Batch Augmentation for its doubled one.
This is a script, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from mlic_lib.mixing import pad_boxes
from mlic_lib.models import build_model
from mlic_lib.splicemix_cl import make_step, time_steps

METHODS = ("baseline", "mixup", "cutmix", "mosaic", "batch_aug", "splicemix", "splicemix_cl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="small_resnet")
    parser.add_argument("--widths", default="8,16,32,64", help="small_resnet widths")
    parser.add_argument("--size", type=int, default=64, help="image side (px)")
    parser.add_argument("--batch", type=int, default=32, help="regular batch size")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    widths = tuple(int(w) for w in args.widths.split(",")) if args.backbone == "small_resnet" else None
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = (torch.rand(args.batch, args.classes, device=device) < 0.15).float()
    s = args.size
    boxes = [torch.tensor([[i % args.classes, s // 8, s // 8, s // 2, s // 2]]).numpy() for i in range(args.batch)]
    idx = torch.arange(args.batch, device=device)
    methods = [m for m in args.methods.split(",") if m]
    models, steps = {}, {}
    for m in methods:
        torch.manual_seed(0)
        models[m] = build_model(args.backbone, args.classes, widths=widths).to(device)
        steps[m] = make_step(m, {}, boxes=pad_boxes(boxes))
    times = time_steps(models, steps, [x, y, idx], device, rounds=args.rounds)
    base = statistics.median(times["baseline"]) if "baseline" in times else None
    print(f"{args.backbone} {args.size}px batch {args.batch} on {device} ({args.threads} threads), "
          f"median of {args.rounds} rounds")
    print(f"{'method':>14} {'ms/iter':>9} {'relative':>9}")
    for m in methods:
        med = statistics.median(times[m])
        rel = f"{med / base:9.2f}" if base else "        -"
        print(f"{m:>14} {1000 * med:9.1f} {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
