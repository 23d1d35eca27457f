"""The benchmark scripts' own arithmetic: the roofline's per-operator FLOPs and bytes against direct counts."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roofline_counts_bytes_of_reads_and_writes_and_nothing_for_views():
    roofline = _script("roofline")
    x = torch.randn(4, 8, 16, 16, device="meta", dtype=torch.bfloat16)
    w = torch.randn(6, 8, 3, 3, device="meta", dtype=torch.bfloat16)
    costs = roofline.OpCosts()
    with costs:
        y = torch.relu(x)  # reads x, writes y: 2 x 2048 bf16 values
        y.view(4, -1)  # a view moves nothing
        z = torch.nn.functional.conv2d(x, w, padding=1)
        y.relu_()  # in place: reads y and writes it back
    (name_r, f_r, b_r), (name_v, _, b_v), (name_c, f_c, b_c), (name_i, _, b_i) = costs.rows
    assert (name_r, f_r, b_r) == ("relu", 0, 2 * x.numel() * 2)
    assert (name_i, b_i) == ("relu_", 2 * y.numel() * 2)
    assert (name_v, b_v) == ("view", 0)
    assert name_c == "convolution" and f_c == 2 * z.numel() * 8 * 3 * 3  # 2 FLOPs per multiply-add
    assert b_c == 2 * (x.numel() + w.numel() + z.numel())


def test_roofline_of_a_step_agrees_with_the_flop_counter_and_orders_its_floors():
    roofline = _script("roofline")
    costs, n_params = roofline.step_costs("small_resnet", 32, 4, 20, "baseline")
    from mlic_lib.models import build_model

    model = build_model("small_resnet", 20, pool="max")
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(4, 3, 32, 32)).sum().backward()
    r = roofline.floors(costs, n_params, tflops=100.0, tbps=1.0)
    assert r["flops"] == counter.get_total_flops()
    assert n_params == sum(p.numel() for p in model.parameters())
    assert 0 < r["fused_floor_s"] < r["eager_floor_s"]
    total_bytes = sum(b for _, _, b in costs.rows) + n_params * roofline.UPDATE_BYTES_PER_PARAM
    assert r["eager_floor_s"] >= total_bytes / 1e12 - 1e-12  # at 1 TB/s no op beats its bytes


def test_full_recipe_smoke_overrides_are_valid_and_cover_every_paper_chapter():
    """The GPU smoke script's cuts must stay valid profile keys as the chapters change (it runs only on a GPU)."""
    from mlic_lib.profiles import load_profile

    smoke = _script("full_recipe_smoke")
    chapters = {p.stem for p in (REPO / "notebooks").glob("0[1-9]_*.ipynb")}
    assert set(smoke.SHORT) == chapters
    for chapter, (datasets, overrides) in smoke.SHORT.items():
        settings = load_profile(chapter.split("_", 1)[1], "full", overrides)
        assert settings["profile"] == "full" and datasets
        # the papers' models stay: no override touches a model section except to skip downloading weights
        assert {k for k in overrides if "model." in k or "image_size" in k} <= {"model.pretrained", "model.weights"}
        assert overrides.get("model.weights", None) is None and overrides.get("model.pretrained", False) is False


def test_full_recipe_smoke_gives_the_kernels_an_absolute_results_folder(tmp_path, monkeypatch):
    """The kernels run in notebooks/: with a relative --out, MLIC_RESULTS pointed into notebooks/ while smoke.json
    went to ./DIR and said "ok"."""
    smoke = _script("full_recipe_smoke")
    seen = []
    monkeypatch.setattr(smoke, "write_fake", lambda *a, **k: None)
    monkeypatch.setattr(smoke, "execute_notebook", lambda *a, **k: seen.append(os.environ["MLIC_RESULTS"]))
    for key in ("MLIC_DATA", "MLIC_CACHE", "MLIC_RESULTS", "TQDM_DISABLE"):  # main() sets them for its kernels
        monkeypatch.setenv(key, "")
    monkeypatch.chdir(tmp_path)
    assert smoke.main(["--chapters", "05_ltml", "--out", "smoke"]) == 0
    assert seen == [str(tmp_path / "smoke" / "results")]
    assert json.loads((tmp_path / "smoke" / "smoke.json").read_text())["chapters"][0]["status"] == "ok"


def test_train_throughput_runs_on_cpu_and_reports_the_median_window(tmp_path):
    bench = _script("train_throughput")
    out = tmp_path / "tp.json"
    assert bench.main(["--arch", "small_resnet", "--size", "32", "--batch", "4", "--classes", "20", "--steps", "1",
                       "--repeats", "3", "--warmup", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["baseline", "splicemix"]
    for r in rows:
        assert len(r["window_step_seconds"]) == 3 and r["step_seconds"] == sorted(r["window_step_seconds"])[1]
        assert r["images_per_second"] == 4 / r["step_seconds"] and "mfu" not in r  # no peak known on a CPU
    assert rows[1]["tflops_per_step"] > rows[0]["tflops_per_step"]  # the B/4 mixed images cost FLOPs
    report = json.loads(out.read_text())  # what it ran under, for the book's table
    assert report["torch"] == torch.__version__ and report["precision"] == "fp32" and report["peak_tflops"] is None
    assert report["channels_last"] is False and not list(tmp_path.glob("*.tmp"))


def test_train_throughput_peak_tells_the_h100_parts_apart():
    """The PCIe and NVL parts have lower bf16 peaks than the SXM part, whose name carries no form factor."""
    peak = _script("train_throughput").peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989.0 and peak("NVIDIA H200") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0 and peak("NVIDIA H100 NVL") == 835.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0 and peak("NVIDIA GeForce RTX 4090") is None
    assert peak("NVIDIA GH200 480GB") == 989.0 and peak("NVIDIA RTX A1000") is None  # whole model names only
    assert peak("NVIDIA H100 80GB HBM3 MIG 1g.10gb") is None  # a slice has a fraction of the SMs: no MFU


def test_indeed_step_times_each_method_and_counts_ops_per_step(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    bench = _script("indeed_step")
    out = tmp_path / "indeed.json"
    assert bench.main(["--device", "cpu", "--n-train", "64", "--epochs", "2", "--methods", "Baseline", "INDeeD-L2",
                       "--profile", "--rows", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["method"] for r in res["rows"]] == ["Baseline", "INDeeD-L2"]
    for r in res["rows"]:
        assert r["epochs_timed"] == 1 and r["steps"] == 2 and r["step_ms"] > 0  # 64 canvases, batch 32
    base, ind = res["profiles"]
    assert set(base["syncs_per_step"]) == set(bench.SYNC_EVENTS)
    assert all(v == 0 for v in base["syncs_per_step"].values())  # no CUDA on the CPU
    assert base["scalar_reads_per_step"] > 0 and base["device_ms_per_step"] == 0  # reads of CPU tensors, no device
    assert ind["aten_ops_per_step"] > base["aten_ops_per_step"] > 0  # the pairs and the two extra classifier calls
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("results.json"))


def test_indeed_step_counts_a_kernels_time_once():
    """An operator's row carries the time of the kernels it launched, which also have rows of their own: the
    device's busy time sums the device rows only (summing all rows doubled it)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    bench = _script("indeed_step")
    op = SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=100.0, is_user_annotation=False)
    kernel = SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=100.0, is_user_annotation=False)
    mark = SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=100.0, is_user_annotation=True)
    assert bench.device_time_us([op, kernel, mark]) == 100.0


def test_data_throughput_builds_indeed_cifar_canvases_with_the_full_profiles_augmentation(tmp_path):
    from mlic_lib.data.canvas_augment import CellAugment

    bench = _script("data_throughput")
    ds = bench.train_dataset("indeed_cifar", str(tmp_path), 448, 30)
    assert isinstance(ds.transform, CellAugment) and ds.transform.randaugment and ds.transform.cutout == 16
    assert bench.measure(ds, workers=0, batch=8, batches=2) > 0
    x, y = ds[0]
    assert x.shape == (3, 96, 96) and int(y.sum()) == 7


def test_data_throughput_times_only_batches_made_after_the_prefetched_ones(monkeypatch):
    """With workers, the batches prefetched while the first one was awaited are read before the clock starts
    (timing them overstated the rate), and the timed window has at least 4 batches per worker."""
    bench = _script("data_throughput")
    seen, reads = [], []
    ds = torch.utils.data.TensorDataset(torch.zeros(10, 1))

    class Loader:
        def __init__(self, dataset, batch_size, sampler, num_workers):
            seen.append((batch_size, len(sampler), num_workers))

        def __iter__(self):
            for i in range(seen[-1][1] // seen[-1][0]):
                seen.append(("batch", i))
                yield (torch.zeros(seen[0][0], 1),)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)

    def clock():
        reads.append(sum(1 for e in seen if e[0] == "batch"))
        return float(len(reads) - 1)

    monkeypatch.setattr(bench.time, "perf_counter", clock)
    rate = bench.measure(ds, workers=3, batch=4, batches=2)
    assert seen[0] == (4, 4 * (1 + 2 * 3 + 4 * 3), 3)  # 7 untimed batches, then max(2, 12) timed ones
    assert rate == 12 * 4 / 1.0  # one tick of the fake clock between the start and the end
    assert reads == [7, 19]  # the clock is read after the 7 untimed batches and after all 19


@pytest.mark.slow
def test_psd_pool_times_the_same_teachers_in_both_modes(tmp_path):
    """benchmarks/psd_pool.py: each mode trains the chapter's teachers from a cold cache of its own (the same count),
    and the caller's MLIC_CACHE is left as it was."""
    import os

    bench = _script("psd_pool")
    before = os.environ.get("MLIC_CACHE")
    out = tmp_path / "pool.json"
    assert bench.main(["--profile", "smoke", "--max-workers", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    seq, pool = res["rows"]
    assert (seq["mode"], pool["mode"]) == ("sequential", "process") and seq["workers"] == 1 and pool["workers"] == 2
    assert seq["teachers"] == pool["teachers"] > 1 and seq["teachers_s"] > 0 and pool["teachers_s"] > 0
    assert os.environ.get("MLIC_CACHE") == before and not any(Path(before).rglob("results.json"))


def test_host_syncs_counts_no_blocking_copy_in_any_chapters_step_on_meta(tmp_path):
    """The meta device stands in for a GPU: no step sends host memory to the device with a blocking copy, and none
    makes a data-dependent call (which fails there). On CUDA the script counts real synchronisations."""
    bench = _script("host_syncs")
    out = tmp_path / "syncs.json"
    assert bench.main(["--device", "meta", "--steps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(bench.cases()) >= 18
    # the nuclear norm's SVD syncs on CUDA by design (assoc_losses): on meta it is counted by name, not missed
    assert {r["step"]: r["per_step"] for r in rows} == {r["step"]: float(r["step"] == "assocformer nuclear")
                                                        for r in rows}
