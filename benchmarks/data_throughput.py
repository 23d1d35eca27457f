"""Input-pipeline throughput of the ``full`` profiles: JPEG decoding (PIL) + the paper's train preset
(:mod:`mlic_lib.data.presets`) through a ``DataLoader`` with 0..N workers, in images per second.

A GPU training step is only as fast as the loader that feeds it: compare the numbers printed here with
the images/s of ``benchmarks/train_throughput.py`` on the same machine to choose ``train.num_workers``.
The images are synthetic JPEGs of VOC's typical size (500 x 375) in the VOC layout
(:func:`mlic_lib.data.fake.write_fake`), so the run needs no download.

    python benchmarks/data_throughput.py                                 # 448 px, multi-scale crop
    python benchmarks/data_throughput.py --preset assocformer --size 384 --workers 0 2 8
    python benchmarks/data_throughput.py --preset indeed_cifar --batch 128   # ML-CIFAR-10-7 canvases, CellAugment

``indeed_cifar`` times INDeeD's ML-CIFAR-10 training canvases (96 px, 7 images each, in memory) with the full
profile's per-cell RandAugment + Cutout (:class:`mlic_lib.data.canvas_augment.CellAugment`) instead of JPEGs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from mlic_lib.data.fake import write_fake
from mlic_lib.data.real import real_data
from mlic_lib.profiles import load_profile
from mlic_lib.utils import atomic_open

PRESETS = ("splicemix", "psd", "assocformer", "ltml", "indeed_cifar")  # the full profiles' train pipelines


def preset(chapter: str) -> dict:
    """The ``augment`` section of ``chapter``'s full profile (SpliceMix: of its VOC2007 run)."""
    data = load_profile(chapter, "full")["data"]
    return dict((data.get("real") or data)["augment"])


def train_dataset(name: str, root: str, size: int, images: int):
    """The training dataset of ``name``'s full-profile pipeline on synthetic files written under ``root``."""
    if name == "indeed_cifar":
        from mlic_lib import indeed

        write_fake("cifar10", root, n_train=max(images, 50), n_test=20)
        pools = {("cifar10", s): indeed.load_cifar10(s, root) for s in ("train", "test")}
        data = {**load_profile("indeed", "full")["cifar"]["data"], "n_train": images, "n_test": 20}
        return indeed.indeed_data(data, 7, pools=pools).train_ds
    write_fake("voc2007", root, n_train=images, n_test=10, image_size=375)  # 375 high, ~470 wide
    return real_data({"dataset": "voc2007", "root": root, "image_size": size, "augment": preset(name)}).train_ds


def measure(ds, workers: int, batch: int, batches: int) -> float:
    """Images per second of a loader in steady state, timed over ``max(batches, 4 * workers)`` batches.

    Each worker keeps ``prefetch_factor`` (2) batches in flight, so by the time the first batch arrives the
    others have made up to ``2 * workers`` more. Those, and the first, are read before the clock starts: timing
    from the first batch alone counted them as made in no time, which overstated every row with workers (on
    the 16-core GPU machine, 12 timed batches with 16 workers read 3,128 images/s)."""
    warm = 1 + 2 * workers
    timed = max(batches, 4 * workers)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch * (warm + timed),
                                             generator=torch.Generator().manual_seed(0))
    it = iter(torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers))
    for _ in range(warm):  # worker start-up, the first batch and the ones prefetched meanwhile: not timed
        next(it)
    t0, n = time.perf_counter(), 0
    for x, *_ in it:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="splicemix",
                   help="whose full-profile train preset to run (read from its profile)")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=8, help="timed batches (at least 4 per worker)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--images", type=int, default=400, help="synthetic training images to write")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        ds = train_dataset(args.preset, root, args.size, args.images)
        rows = []
        what = (f"train preset {preset(args.preset)}, {args.size} px output" if args.preset != "indeed_cifar" else
                f"canvases with {getattr(ds, 'transform', None)}")
        print(f"{args.preset} {what}, batch {args.batch}, {os.cpu_count()} CPUs")
        print(f"{'workers':>7s} {'img/s':>8s}")
        for w in args.workers:
            rate = measure(ds, w, args.batch, args.batches)
            rows.append({"workers": w, "images_per_second": rate})
            print(f"{w:7d} {rate:8.1f}")
    if args.out:
        with atomic_open(args.out, "w") as fh:
            json.dump({"args": vars(args), "cpus": os.cpu_count(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
