"""INDeeD's training step on the chapter's `default` setting: seconds per step and where the host time goes.

The `default` INDeeD chapter trains 24 small runs (a 3-conv CNN on 42x42 canvases, batch 32, 940 steps
each). Such a step is far too small to keep a GPU busy, so its time is the host's: Python, operator
dispatch, kernel launches, and any point where the host waits for the device. This script trains one run
of each method through the library's own path (``indeed.train_indeed_model`` -> ``engine.fit``) into a
temporary folder and reports the training seconds per step; ``--profile`` then lists, for one epoch of
each method, the operators with the most host time, the host-device syncs per step and the device's busy time
per step (of the training loop alone, ``engine.train_one_epoch``).

A sync is an event where the host waits for the device (``cudaStreamSynchronize`` and kin; a ``.item()`` on a
CUDA tensor is one of them). ``aten::_local_scalar_dense`` (any ``.item()``, ``int(t)``, ``bool(t)``) is counted
apart: on a CPU tensor it waits for nothing. On the H100 they came to about 20 per step while the streams
synchronised 0.11 times per step, so nearly all of them read CPU tensors.

    python benchmarks/indeed_step.py                         # GPU if there is one, else CPU
    python benchmarks/indeed_step.py --profile --epochs 2    # + torch.profiler tables
    python benchmarks/indeed_step.py --device cpu --n-train 96 --epochs 1   # a quick CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import torch

from mlic_lib import indeed
from mlic_lib.profiles import load_profile

#: host-side events that make the host wait for the device (their count per step is reported)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
#: reads of one tensor element into Python: a sync on a CUDA tensor (which then also shows a SYNC_EVENTS entry),
#: none on a CPU tensor
SCALAR_READ = "aten::_local_scalar_dense"


def _settings(args) -> dict:
    over = {"train.epochs": args.epochs, "train.device": args.device, "indeed.parallel": "sequential"}
    if args.n_train:
        over["data.n_train"] = args.n_train
    return load_profile("indeed", "default", over)


def time_method(name: str, settings: dict, data) -> dict:
    """Train one run of ``name`` from scratch (a fresh temporary run folder) and return its step time."""
    spec = indeed.MAIN_METHODS[name]
    with tempfile.TemporaryDirectory() as tmp:
        run = indeed.train_indeed_model(settings, data, spec, seed=0, run_dir=tmp)
    steps_per_epoch = -(-len(data.train_ds) // settings["train"]["batch_size"])
    # the first epoch holds the one-off costs (cuDNN autotuning, allocator warm-up): report the later ones
    epochs = run.history[1:] or run.history
    seconds = sum(h["train_seconds"] for h in epochs)
    return {"method": name, "epochs_timed": len(epochs), "steps": steps_per_epoch * len(epochs),
            "step_ms": 1e3 * seconds / (steps_per_epoch * len(epochs)),
            "first_epoch_s": run.history[0]["train_seconds"]}


def profile_method(name: str, settings: dict, data, rows: int) -> dict:
    """Two epochs of ``name``'s step through ``engine.train_one_epoch`` (the loop ``fit`` runs), the second under
    torch.profiler: the top operators by host time and the host-device syncs per step."""
    from torch.profiler import ProfilerActivity, profile

    from mlic_lib.engine import SupervisedStep, _autocast, build_optimizer, make_loader, train_one_epoch
    from mlic_lib.utils import pick_device, seed_everything

    step, cfg, _ = indeed._run_setup(settings, data, indeed.MAIN_METHODS[name], seed=0)  # what fit() gets
    step = step or SupervisedStep()  # None = the engine's plain BCE step (the baseline)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    img = data.train.images
    model = indeed.build_indeed_model(settings["model"], len(data.class_names), img.shape[1], img.shape[-1])
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    opt = build_optimizer(model, cfg)
    autocast, scaler = _autocast(device, cfg.amp)  # as fit(): bf16 on CUDA, off on a CPU
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for epoch in range(2):
        loader = make_loader(data.train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                             num_workers=cfg.num_workers, device=device)
        with profile(activities=activities) if epoch else contextlib.nullcontext() as prof:
            train_one_epoch(model, loader, opt, step, device, scaler=scaler, autocast=autocast,
                            channels_last=channels_last)
    steps = len(loader)
    events = prof.key_averages()
    print(f"\n{name}: one epoch of {steps} steps on {device.type}, top {rows} operators by host time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))
    counts = {e.key: e.count for e in events}
    device_us = device_time_us(events)
    return {"method": name, "syncs_per_step": {k: counts.get(k, 0) / steps for k in SYNC_EVENTS},
            "scalar_reads_per_step": counts.get(SCALAR_READ, 0) / steps,
            "device_ms_per_step": device_us / 1e3 / steps,
            "aten_ops_per_step": sum(c for k, c in counts.items() if k.startswith("aten::")) / steps,
            "launches_per_step": sum(c for k, c in counts.items() if "LaunchKernel" in k) / steps,
            "host_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1e3 / steps}


def device_time_us(events) -> float:
    """The device's busy time in ``events`` (``prof.key_averages()``): the kernels' own rows. The row of the
    operator that launched a kernel carries the kernel's time too, so summing every row counts it twice; this
    sums the device rows only, as the total under torch's profiler table does."""
    from torch.autograd import DeviceType

    return float(sum(e.self_device_time_total for e in events
                     if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-labels", type=int, default=7, help="N of ML-MNIST-N (the chapter's largest is 7)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed")
    p.add_argument("--n-train", type=int, default=0, help="training canvases (0 = the profile's 1,500)")
    p.add_argument("--methods", nargs="+", default=list(indeed.MAIN_METHODS), choices=list(indeed.MAIN_METHODS))
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true", help="also profile one epoch of each method")
    p.add_argument("--rows", type=int, default=15, help="operators listed per profile")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    settings = _settings(args)
    data = indeed.indeed_data(settings["data"], args.n_labels)
    rows = [time_method(m, settings, data) for m in args.methods]
    device = torch.cuda.get_device_name() if (args.device != "cpu" and torch.cuda.is_available()) else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"INDeeD default setting, ML-MNIST-{args.n_labels}, {len(data.train_ds)} canvases, batch "
          f"{settings['train']['batch_size']}, {device}, torch {torch.__version__}")
    print(f"{'method':16s} {'ms/step':>8s} {'steps':>6s} {'1st epoch s':>11s}")
    for r in rows:
        print(f"{r['method']:16s} {r['step_ms']:8.2f} {r['steps']:6d} {r['first_epoch_s']:11.2f}")
    profiles = [profile_method(m, settings, data, args.rows) for m in args.methods] if args.profile else []
    for r in profiles:
        syncs = ", ".join(f"{k} {v:.2f}" for k, v in r["syncs_per_step"].items() if v)
        print(f"{r['method']}: {r['aten_ops_per_step']:.0f} aten ops and {r['launches_per_step']:.0f} kernel "
              f"launches per step, {r['host_ms_per_step']:.2f} ms of profiled host time, "
              f"{r['device_ms_per_step']:.2f} ms of device time; syncs per step: {syncs or 'none'}; scalar reads "
              f"(.item() and kin, host or device tensors) per step: {r['scalar_reads_per_step']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows,
                                              "profiles": profiles}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
