"""A short ``full``-recipe smoke on a GPU: every chapter's ``full`` profile with the paper's models and input
sizes (ResNet-101 at 448 px, Swin-L at 384 px, ResNet-50 at 224 px, VGG-16 on CIFAR canvases, ...) on
synthetic files in the real datasets' layouts (:func:`mlic_lib.data.fake.write_fake`), cut to one or two
epochs, one seed and small sets (96 training images, 48 for VOC-LT, 3,000 MNIST and 600 CIFAR-10 images). The
fake COCO files have 12 classes, not 80.

It checks what the offline CPU test (``tests/test_real_pipeline.py``, shrunken models) cannot: that the real
models train under bf16 autocast and channels_last with multi-worker loading on the GPU, end to end through
each notebook, and how long a chapter's fixed costs (model builds, evaluation, analyses) take there. The
numbers it produces come from fake images and say nothing about the papers.

    python benchmarks/full_recipe_smoke.py --out /tmp/smoke             # every chapter
    python benchmarks/full_recipe_smoke.py --chapters 01_splicemix 05_ltml --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

from mlic_lib.book import execute_notebook
from mlic_lib.data.fake import write_fake
from mlic_lib.profiles import load_profile

REPO = Path(__file__).resolve().parents[1]

# What is cut: epochs, seeds, sweeps and image counts, and the ImageNet weights (random init: the GPU machine may
# have no network). What is kept: backbones, input sizes, batch sizes, optimisers, AMP/channels_last defaults and
# the loaders' worker counts.
SHORT = {
    "01_splicemix": (["voc2007"], {"model.weights": None, "data.n_train": 96, "data.n_test": 48, "data.n_bias_test": 48,
                                   "data.real.n_train": 96, "data.real.n_test": 48, "train.epochs": 1,
                                   "seeds": [0], "analysis.cam_images": 8, "analysis.ratio_epochs": 1}),
    "02_psd": (["coco2014"], {"model.weights": None, "train.epochs": 1, "teacher_train.epochs": 1, "psd.ks": [1, 2],
                              "psd.cpsd_k": 2, "psd.random_seeds": [0], "psd.n_init": 2, "psd.parallel": "auto",
                              "analysis.cam_images": 8}),
    "03_assocformer": (["voc2007"], {"model.pretrained": False, "train.epochs": 1, "seeds": [0],
                                     "analysis.regularizers": ["none", "l2"], "analysis.cost_repeats": 3}),
    "04_indeed": (["mnist", "cifar10"], {"data.n_train": 2000, "data.n_test": 500, "train.epochs": 2,
                                         "train.milestones": [1], "seeds": [0], "ablation_seeds": [0],
                                         "ablation_n_labels": [7], "analysis.cam_images": 16,
                                         "cifar.data.n_train": 500, "cifar.data.n_test": 200,
                                         "cifar.train.epochs": 1}),
    "05_ltml": (["voc_lt"], {"model.weights": None, "train.epochs": 1, "train.milestones": [1],
                             "train.warmup_steps": 0, "seeds": [0],
                             "ltml.samples_per_class": 1, "ltml.lambda_sweep": [0.1]}),
}
# (train, test) images; the others 96 / 48. VOC-LT keeps the offline test's size, which its head/tail cuts fit.
FAKE_SIZES = {"mnist": (3000, 600), "cifar10": (600, 300), "voc_lt": (48, 32)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chapters", nargs="+", default=sorted(SHORT), choices=sorted(SHORT))
    p.add_argument("--out", required=True, help="folder for the executed notebooks and smoke.json")
    p.add_argument("--image-size", type=int, default=448, help="side of the synthetic JPEGs (VOC is ~500x375)")
    p.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
    args = p.parse_args(argv)
    out = Path(args.out).expanduser().resolve()  # the kernels run in notebooks/: MLIC_RESULTS must be absolute
    out.mkdir(parents=True, exist_ok=True)
    for chapter in args.chapters:  # every override key is valid before anything runs
        load_profile(chapter.split("_", 1)[1], "full", SHORT[chapter][1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in sorted({d for c in args.chapters for d in SHORT[c][0]}):
            n_train, n_test = FAKE_SIZES.get(name, (96, 48))
            write_fake(name, tmp / "data", n_train=n_train, n_test=n_test, image_size=args.image_size)
        os.environ.update(MLIC_DATA=str(tmp / "data"), MLIC_CACHE=str(tmp / "cache"),
                          MLIC_RESULTS=str(out / "results"), TQDM_DISABLE="1")
        for chapter in args.chapters:
            t0 = time.perf_counter()
            try:
                execute_notebook(REPO / "notebooks" / f"{chapter}.ipynb", out / f"{chapter}.ipynb", "full",
                                 {"overrides": SHORT[chapter][1]}, timeout=args.timeout)
                status = "ok"
            except Exception as exc:  # noqa: BLE001 - record and go on with the next chapter
                last_line = (str(exc).strip().splitlines() or [""])[-1]
                status = f"error: {type(exc).__name__}: {last_line}"
                traceback.print_exc()
            rows.append({"chapter": chapter, "status": status, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{chapter:16s} {rows[-1]['seconds']:7.1f} s  {status}", flush=True)
    summary = {"device": device, "torch": torch.__version__, "image_size": args.image_size, "chapters": rows}
    (out / "smoke.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
