"""CPSD's independent runs one after another and in a process pool: seconds for the chapter's teachers (and, with
``--study``, for the whole study: teachers, baseline and students), from an empty run cache each time.

The CPSD chapter trains 47 small teachers (`default` profile: every decomposition of Fig. 3 plus section 3b's) and
a dozen students. ``psd.parallel: process`` trains all the teachers in one spawned pool of single-thread workers
(:func:`mlic_lib.psd.pretrain_teachers`) and the students in another (:func:`mlic_lib.psd.train_runs`). On a GPU
the workers share the device, one CUDA context each; there ``auto`` still trains one run after another, and this
script measures whether a pool would pay.

    python benchmarks/psd_pool.py                                  # default profile, teachers, both modes
    python benchmarks/psd_pool.py --study --max-workers 8          # the whole study, at most 8 workers
    python benchmarks/psd_pool.py --profile smoke --modes process  # a quick check

Each mode trains into its own temporary cache, so both start cold; the two modes' numbers differ slightly (a run
depends on its thread count), not their amount of work.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from unittest import mock

import torch

from mlic_lib import psd
from mlic_lib.process_pool import available_cpus, pool_size
from mlic_lib.profiles import load_profile, parse_overrides
from mlic_lib.utils import atomic_open


def run_mode(settings: dict, mode: str, study: bool, max_workers: int | None) -> dict:
    """Seconds to train the chapter's teachers (and the study) with ``mode`` into a fresh cache."""
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, MLIC_CACHE=cache):  # workers inherit it
        data, S = psd.study_inputs(settings)
        seed = settings["seeds"][0]
        t0 = time.perf_counter()
        n = psd.pretrain_teachers(settings, data, S, seed=seed, progress=False, parallel=mode, max_workers=max_workers)
        t_teachers = time.perf_counter() - t0
        t_study = None
        if study:
            psd.run_study(settings, data, S, seed=seed, parallel=mode, max_workers=max_workers)
            t_study = time.perf_counter() - t0
    return {"mode": mode, "teachers": n, "teachers_s": round(t_teachers, 2),
            "workers": pool_size(n, max_workers) if mode == "process" else 1,
            "study_s": None if t_study is None else round(t_study, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="default")
    p.add_argument("--modes", nargs="+", default=["sequential", "process"], choices=["sequential", "process"])
    p.add_argument("--study", action="store_true", help="also train the baseline and the students (run_study)")
    p.add_argument("--max-workers", type=int, default=None, help="pool workers (default: one per CPU)")
    p.add_argument("-o", "--override", action="append", default=[], help="profile overrides, as `mlic reproduce`")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    settings = load_profile("psd", args.profile, parse_overrides(args.override))
    device = "cuda" if torch.cuda.is_available() and settings["train"].get("device", "auto") != "cpu" else "cpu"
    print(f"CPSD {args.profile} profile on {device}, {available_cpus()} CPUs")
    rows = []
    for mode in args.modes:
        row = run_mode(settings, mode, args.study, args.max_workers)
        rows.append(row)
        study = f", study {row['study_s']:.1f} s" if row["study_s"] is not None else ""
        print(f"  {mode:10s} ({row['workers']} worker(s)): {row['teachers']} teachers in {row['teachers_s']:.1f} s"
              f"{study}", flush=True)
    if args.out:
        with atomic_open(args.out, "w") as f:
            json.dump({"profile": args.profile, "device": device, "cpus": available_cpus(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
