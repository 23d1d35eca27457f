"""Training-step throughput: baseline vs SpliceMix (the SpliceMix/PSD recipe: ResNet-101, 448x448, GMP).

Measures, on synthetic data of the real shapes, the time of one optimiser step (forward, backward,
SGD update) for the plain multi-label step and for the SpliceMix step, the images per second, and the
achieved model FLOP/s (FLOPs of one step counted with ``torch.utils.flop_counter``). On CUDA it uses
bf16 autocast and channels_last, and reports the fraction of the GPU's dense bf16 peak (model FLOP
utilisation, MFU) when the device's peak is known.

Targets (issue "Real data and GPU"): the SpliceMix step within 5% of the baseline step; on an H100
at least 35% of the bf16 peak.

    python benchmarks/train_throughput.py                          # GPU defaults: 448 px, batch 32
    python benchmarks/train_throughput.py --compile --batch 64     # torch.compile, a larger batch
    python benchmarks/train_throughput.py --size 224 --batch 4 --steps 3 --warmup 1   # a CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import time

import torch

from mlic_lib.engine import SupervisedStep
from mlic_lib.mixing import SpliceMix
from mlic_lib.models import build_model
from mlic_lib.splicemix_cl import SpliceMixStep
from mlic_lib.utils import atomic_open

# dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets), matched against the device name in this order: the
# PCIe and NVL parts before the SXM parts, whose names (e.g. "NVIDIA H100 80GB HBM3") carry no form factor
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "GH200": 989.0, "A100": 312.0}


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name`` (``torch.cuda.get_device_name``), or ``None`` (unknown). A MIG
    slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb") has a fraction of the SMs, so the whole GPU's peak does not apply:
    ``None``. A model matches as a whole word ("RTX A1000" is no A100)."""
    if "MIG" in name.split():
        return None
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if re.search(rf"(?<![A-Za-z0-9]){k}(?![0-9])", name)), None)


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(args.arch, args.classes, pool="max").to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = SupervisedStep() if method == "baseline" else SpliceMixStep(SpliceMix(grids={"2x2": 1.0}, p_drop=0.0))
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(args.batch, args.classes, device=device) < 0.05).float()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def one_step():
        with autocast:
            loss, _ = step(model, [x, y], device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        one_step()
    flops = counter.get_total_flops()
    if args.compile:  # the backbone, which every step calls (SpliceMixStep calls model.forward_features,
        # so compiling the whole module would leave its step eager); dynamic=False: no dynamic-shape kernels
        model.features = torch.compile(model.features, dynamic=False)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # with --compile the first call compiles
        one_step()
    _sync(device)
    warmup_seconds = time.perf_counter() - t0
    windows = []  # seconds per step in each timing window; the median is reported, the range shows the noise
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            one_step()
        _sync(device)
        windows.append((time.perf_counter() - t0) / args.steps)
    seconds = statistics.median(windows)
    images = args.batch + (args.batch // 4 if method == "splicemix" else 0)
    out = {"method": method, "step_seconds": seconds, "images_per_second": args.batch / seconds,
           "images_through_network": images, "tflops_per_step": flops / 1e12,
           "achieved_tflops": flops / seconds / 1e12, "warmup_seconds": warmup_seconds,
           "window_step_seconds": windows, "window_range": (max(windows) - min(windows)) / seconds}
    peak = _peak(device)
    if peak:
        out["mfu"] = out["achieved_tflops"] / peak
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet101")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--steps", type=int, default=20, help="steps per timing window")
    p.add_argument("--repeats", type=int, default=3, help="timing windows; the median window is reported")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="compile the backbone (model.features) with torch.compile")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = [measure(m, args, device) for m in ("baseline", "splicemix")]
    overhead = rows[1]["step_seconds"] / rows[0]["step_seconds"] - 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.arch} {args.size}x{args.size}, batch {args.batch}, {name}, "
          f"{'bf16 autocast + channels_last' if device.type == 'cuda' else 'fp32'}"
          f"{', torch.compile' if args.compile else ''}, torch {torch.__version__}")
    print(f"{'method':10s} {'s/step':>8s} {'range':>6s} {'img/s':>8s} {'TFLOP/step':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        print(f"{r['method']:10s} {r['step_seconds']:8.3f} {r['window_range']:6.1%} {r['images_per_second']:8.1f} "
              f"{r['tflops_per_step']:10.3g} {r['achieved_tflops']:8.3g} {mfu:>6s}")
    print(f"s/step: median of {args.repeats} windows of {args.steps} steps; range: (max - min) / median")
    base, sm = rows[0], rows[1]
    per_image = ((sm["step_seconds"] / sm["images_through_network"])
                 / (base["step_seconds"] / base["images_through_network"]) - 1)
    print(f"SpliceMix step time vs baseline: {overhead:+.1%} (target: within +5%; it also trains "
          f"{args.batch // 4} extra mixed images per step); per image through the network: {per_image:+.1%}")
    if args.out:  # written whole, then renamed into place: an interrupted write leaves no truncated file
        cuda = device.type == "cuda"
        with atomic_open(args.out, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "precision": "bf16 autocast" if cuda else "fp32",
                       "channels_last": cuda, "peak_tflops": _peak(device), "args": vars(args), "rows": rows,
                       "splicemix_overhead": overhead, "splicemix_overhead_per_image": per_image}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
