"""Engine: determinism, interrupted-and-resumed == uninterrupted, cache, atomic files, bad inputs."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mlic_lib.data import TensorImageDataset
from mlic_lib.engine import TrainConfig, evaluate, fit, run_dir_for
from mlic_lib.models import build_model
from mlic_lib.utils import seed_everything

CFG = {"epochs": 3, "batch_size": 32, "lr": 3e-3, "optimizer": "adam", "scheduler": "onecycle", "seed": 0}


def _data(small_scenes):
    train, test = small_scenes
    return TensorImageDataset(train.images, train.targets), TensorImageDataset(test.images, test.targets)


def _model(seed=0):
    seed_everything(seed)
    return build_model("small_resnet", 20, widths=(8, 16, 16, 32))


def _run(small_scenes, run_dir=None, **kw):
    tr, te = _data(small_scenes)
    return fit(_model(), tr, te, TrainConfig.from_dict({**CFG, **kw}), run_dir=run_dir, progress=False)


def test_fit_is_deterministic(small_scenes):
    a, b = _run(small_scenes), _run(small_scenes)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.final["mAP"] == b.final["mAP"]
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_fit_learns_something(small_scenes):
    res = _run(small_scenes, epochs=4)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert len(res.history) == 4 and {"mAP", "CF1", "OF1", "loss"} <= set(res.history[-1])


def test_eval_every_skips_evaluations_but_not_the_last_and_leaves_training_unchanged(small_scenes):
    every = _run(small_scenes)
    sparse = _run(small_scenes, eval_every=2)
    last_only = _run(small_scenes, eval_every=0)
    assert ["mAP" in h for h in every.history] == [True, True, True]
    assert ["mAP" in h for h in sparse.history] == [False, True, True]
    assert ["mAP" in h for h in last_only.history] == [False, False, True]
    for res in (sparse, last_only):
        assert [h["loss"] for h in res.history] == [h["loss"] for h in every.history]
        assert res.final["mAP"] == every.final["mAP"] == res.history[-1]["mAP"]
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=-1)


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9}], ids=["plain", "ema"])
def test_resume_after_interruption_matches_uninterrupted(small_scenes, tmp_path, extra):
    """With EMA the checkpoint also carries the averaged weights, which the final metrics come from."""
    full = _run(small_scenes, run_dir=tmp_path / "full", **extra)

    def interrupt(epoch, logs):
        if epoch == 1:
            raise KeyboardInterrupt

    tr, te = _data(small_scenes)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), tr, te, TrainConfig.from_dict({**CFG, **extra}), run_dir=tmp_path / "cut", progress=False,
            on_epoch_end=interrupt)
    assert (tmp_path / "cut" / "last.pt").is_file() and not (tmp_path / "cut" / "results.json").exists()
    resumed = fit(_model(seed=123), tr, te, TrainConfig.from_dict({**CFG, **extra}), run_dir=tmp_path / "cut",
                  progress=False)
    assert not resumed.cached and resumed.resumed_epochs == 2 and full.resumed_epochs == 0  # epochs 0 and 1 were done
    assert fit(_model(), tr, te, TrainConfig.from_dict({**CFG, **extra}), run_dir=tmp_path / "cut",
               progress=False).resumed_epochs == 0  # loaded: nothing resumed
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.final["mAP"] == full.final["mAP"]
    for (ka, a), (kb, b) in zip(resumed.model.state_dict().items(), full.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b), ka  # the buffers too (BatchNorm's statistics, averaged by the EMA)
    assert not (tmp_path / "cut" / "last.pt").exists(), "last.pt should be removed once final.pt is written"


class _LoudBCE:
    """BCE times 10: under fp16 its gradients overflow at the scaler's first scales (2^16, 2^15), not at 2^14."""

    def __call__(self, model, batch, device):
        x, y = (t.to(device) for t in batch)
        return 10 * torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y), {}


def test_an_fp16_resume_goes_on_with_the_gradient_scalers_scale(small_scenes, tmp_path):
    """A step whose gradients overflow is skipped and halves the scale: a resume that started again from the
    initial scale would skip steps the uninterrupted run took."""
    tr, te = _data(small_scenes)
    cfg = TrainConfig.from_dict({**CFG, "amp": "fp16", "epochs": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not torch's about the order of the steps when the scaler skipped the first
        full = fit(_model(), tr, te, cfg, step=_LoudBCE(), run_dir=tmp_path / "full", progress=False)

    def interrupt(epoch, logs):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), tr, te, cfg, step=_LoudBCE(), run_dir=tmp_path / "cut", progress=False, on_epoch_end=interrupt)
    scale = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["scaler"]["scale"]
    assert scale < 2.0**16  # overflowing steps halved it in epoch 0: the case this test is about
    resumed = fit(_model(seed=123), tr, te, cfg, step=_LoudBCE(), run_dir=tmp_path / "cut", progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_run_stopped_after_its_last_checkpoint_resumes_with_its_final_metrics(small_scenes, tmp_path):
    """Stopped after the last epoch's last.pt but before final.pt / results.json: the resume has no epoch left
    to train, and used to cache an empty ``final``."""
    full = _run(small_scenes, run_dir=tmp_path / "full")

    def interrupt(epoch, logs):
        if epoch == CFG["epochs"] - 1:
            raise KeyboardInterrupt

    tr, te = _data(small_scenes)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), tr, te, TrainConfig.from_dict(CFG), run_dir=tmp_path / "cut", progress=False,
            on_epoch_end=interrupt)
    resumed = fit(_model(seed=123), tr, te, TrainConfig.from_dict(CFG), run_dir=tmp_path / "cut", progress=False)
    assert resumed.final["mAP"] == full.final["mAP"] and resumed.final["OF1"] == full.final["OF1"]
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["final"]["mAP"] == full.final["mAP"]


def test_cache_reuses_finished_run(small_scenes, tmp_path):
    first = _run(small_scenes, run_dir=tmp_path / "run", epochs=1, device="cpu")  # called on a CPU batch below
    again = _run(small_scenes, run_dir=tmp_path / "run", epochs=1, device="cpu")
    assert again.cached and again.final["mAP"] == first.final["mAP"]
    x = torch.from_numpy(small_scenes[1].images[:4]).float() / 127.5 - 1
    torch.testing.assert_close(again.model.eval()(x), first.model.eval()(x))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["epochs"] == 1 and len(saved["history"]) == 1


_LOCKED_FIT = """
import sys, time
from pathlib import Path
import numpy as np
from mlic_lib.data import TensorImageDataset
from mlic_lib.engine import TrainConfig, fit
from mlic_lib.models import build_model
from mlic_lib.utils import seed_everything

def go(run_dir, pause=0.0, started=None):
    rng = np.random.default_rng(0)
    ds = TensorImageDataset(rng.integers(0, 255, (24, 3, 16, 16), dtype=np.uint8), rng.random((24, 4)) < 0.5)
    seed_everything(0)
    model = build_model("small_resnet", 4, widths=(4, 4, 4, 4))

    def slow(epoch, logs):
        if started:
            Path(started).touch()
        time.sleep(pause)

    cfg = TrainConfig.from_dict({"epochs": 2, "batch_size": 8, "lr": 1e-3, "optimizer": "adam", "seed": 0})
    return fit(model, ds, ds, cfg, run_dir=run_dir, progress=False, on_epoch_end=slow)

if __name__ == "__main__":
    go(sys.argv[1], float(sys.argv[2]), sys.argv[3])
"""


def test_a_second_process_waits_for_the_run_another_is_training_then_loads_it(tmp_path, capfd, monkeypatch):
    """Two kernels asking for one run (the book beside `make lab`) used to train it twice, side by side."""
    import subprocess
    import sys

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the waiting notice is shown outside the book's build

    script, run_dir, started = tmp_path / "locked_fit.py", tmp_path / "run", tmp_path / "started"
    script.write_text(_LOCKED_FIT)
    other = subprocess.Popen([sys.executable, str(script), str(run_dir), "1.5", str(started)])
    try:
        deadline = time.monotonic() + 120
        while not started.exists():  # the other process holds the lock and is training
            assert other.poll() is None and time.monotonic() < deadline, "the training process did not start"
            time.sleep(0.05)
        namespace: dict = {}
        exec(compile(_LOCKED_FIT, str(script), "exec"), namespace)
        result = namespace["go"](run_dir)
    finally:
        assert other.wait(timeout=120) == 0
    assert result.cached  # loaded what the other process trained, not trained again
    err = capfd.readouterr().err
    assert re.search(r"run: process \d+ on .* holds this run \(training or loading it\); waiting for it, then "
                     r"loading the run it finished \(or resuming it, if it stopped first\)", err)
    assert "process" in (run_dir / ".lock").read_text()


def test_the_run_lock_is_released_when_its_holder_fails(tmp_path):
    from mlic_lib.engine import run_lock

    with pytest.raises(RuntimeError, match="boom"), run_lock(tmp_path / "run"):
        raise RuntimeError("boom")
    with run_lock(tmp_path / "run"):  # would block forever if the lock were still held
        pass



def test_the_run_lock_names_only_its_current_holder(tmp_path):
    """A longer name left by an earlier holder is replaced, not overwritten in part (the waiting notice reads it)."""
    import socket

    from mlic_lib.engine import run_lock

    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text("process 4194304 on a-much-longer-host-name-of-an-earlier-holder.example.org")
    with run_lock(tmp_path / "run"):
        assert lock.read_text() == f"process {os.getpid()} on {socket.gethostname()}"


class _Stop(Exception):
    pass


def _interrupted(small_scenes, run_dir, cfg: TrainConfig, after_epoch: int = 0) -> None:
    """An interrupted run of ``cfg`` in ``run_dir``: stopped after epoch ``after_epoch``'s ``last.pt``."""
    def stop(epoch, logs):
        if epoch == after_epoch:
            raise _Stop

    tr, te = _data(small_scenes)
    with pytest.raises(_Stop):
        fit(_model(), tr, te, cfg, run_dir=run_dir, progress=False, on_epoch_end=stop)
    assert (run_dir / "last.pt").is_file()


def _damage(path, how: str) -> bytes:
    """Damage a run file as a full disk, a killed copy or an old writer would; returns the damaged bytes."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how in ("pickle", "bit"):  # inside an intact zip archive (zipfile.is_zipfile still says yes)
        import struct
        import zipfile

        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as z:
            if how == "pickle":  # the pickle's first byte (its protocol opcode)
                info, offset, flip = next(i for i in z.infolist() if i.filename.endswith("data.pkl")), 0, 0xFF
            else:  # one bit in the middle of the largest tensor's data: the pickle and every other record are intact
                info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
                offset, flip = info.file_size // 2, 0x01
        name_len, extra_len = struct.unpack("<HH", bytes(data[info.header_offset + 26:info.header_offset + 30]))
        data[info.header_offset + 30 + name_len + extra_len + offset] ^= flip
        path.write_bytes(bytes(data))
        assert zipfile.is_zipfile(path)
    elif how == "no config entry":  # a file fit never writes: every version stored the config
        if path.suffix == ".json":
            saved = json.loads(path.read_text())
            del saved["config"]
            path.write_text(json.dumps(saved))
        else:
            state = torch.load(path, weights_only=True)
            del state["config"]
            torch.save(state, path)
    return path.read_bytes()


@pytest.mark.parametrize(("name", "how"), [("final.pt", "truncated"), ("final.pt", "empty"), ("final.pt", "bit"),
                                           ("results.json", "truncated"), ("results.json", "empty"),
                                           ("results.json", "no config entry")])
def test_a_damaged_file_of_a_finished_run_is_moved_aside_and_the_run_trained_again(small_scenes, tmp_path, name,
                                                                                  how):
    """A damaged ``final.pt`` / ``results.json`` used to stop every later ``fit`` there with OSError, EOFError or
    JSONDecodeError. Now it means "not cached": a warning names it, it goes to ``<name>.corrupt`` (replacing an
    older one) and the run is trained again, after which the folder loads from the cache."""
    run = tmp_path / "run"
    first = _run(small_scenes, run_dir=run, epochs=1)
    (run / f"{name}.corrupt").write_bytes(b"an older damaged copy")
    bad = _damage(run / name, how)
    expected = rf"{re.escape(str(run / name))} is damaged or unreadable .*moved it to {re.escape(name)}\.corrupt"
    with pytest.warns(RuntimeWarning, match=expected):
        again = _run(small_scenes, run_dir=run, epochs=1)
    assert not again.cached and again.final["mAP"] == first.final["mAP"]
    assert (run / f"{name}.corrupt").read_bytes() == bad
    assert _run(small_scenes, run_dir=run, epochs=1).cached


@pytest.mark.parametrize("name", ["final.pt", "last.pt"])
def test_a_run_file_that_vanishes_after_it_was_seen_counts_as_absent(small_scenes, tmp_path, monkeypatch, name):
    """Under torchrun rank 0 may set a damaged file aside between another rank's ``is_file()`` and its read: that
    rank got FileNotFoundError and failed alone while rank 0 trained. Now the vanished file is absent there too."""
    import mlic_lib.engine as engine

    run = tmp_path / "run"
    if name == "final.pt":
        first = _run(small_scenes, run_dir=run, epochs=1)
    else:
        class Stop(Exception):
            pass

        def stop(epoch, logs):
            raise Stop

        tr, te = _data(small_scenes)
        with pytest.raises(Stop):
            fit(_model(), tr, te, TrainConfig.from_dict({**CFG, "epochs": 2}), run_dir=run, progress=False,
                on_epoch_end=stop)
        assert (run / "last.pt").is_file()
    real = engine.load_checkpoint

    def vanish(path, *a, **k):  # what rank 0's rename does to this rank's read
        if Path(path).name == name:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(engine, "load_checkpoint", vanish)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # absent, not damaged: no warning, nothing moved
        again = _run(small_scenes, run_dir=run, epochs=1 if name == "final.pt" else 2)
    assert not again.cached and not list(run.glob("*.corrupt"))
    if name == "final.pt":
        assert again.final["mAP"] == first.final["mAP"]


@pytest.mark.parametrize("how", ["truncated", "empty", "bit", "no config entry"])
def test_a_damaged_last_checkpoint_is_moved_aside_and_training_starts_from_scratch(small_scenes, tmp_path, how):
    """A damaged ``last.pt`` used to make every resume fail (or, without its config, resume unchecked); now it
    goes to ``last.pt.corrupt`` with a warning and every epoch is trained again."""
    cfg = TrainConfig.from_dict({**CFG, "epochs": 2})
    run = tmp_path / "cut"
    _interrupted(small_scenes, run, cfg)
    bad = _damage(run / "last.pt", how)
    tr, te = _data(small_scenes)
    trained = []
    with pytest.warns(RuntimeWarning, match=r"last\.pt is damaged or unreadable .*training starts from scratch"):
        restarted = fit(_model(), tr, te, cfg, run_dir=run, progress=False, on_epoch_end=lambda e, _: trained.append(e))
    assert trained == [0, 1] and len(restarted.history) == 2
    assert (run / "last.pt.corrupt").read_bytes() == bad and not (run / "last.pt").exists()


def test_a_finished_run_loaded_into_another_model_is_an_error_not_a_damaged_file(small_scenes, tmp_path,
                                                                                 monkeypatch):
    """Only a file that cannot be read counts as damaged: a readable checkpoint that does not fit the model is the
    caller's error, and so are a full GPU and a file one may not read; the file stays where it is."""
    from mlic_lib import engine

    run = tmp_path / "run"
    _run(small_scenes, run_dir=run, epochs=1)
    tr, te = _data(small_scenes)
    cfg = TrainConfig.from_dict({**CFG, "epochs": 1})
    with pytest.raises(RuntimeError, match="state_dict"):
        fit(build_model("small_resnet", 20, widths=(8, 8, 16, 16)), tr, te, cfg, run_dir=run, progress=False)
    for error in (torch.OutOfMemoryError("CUDA out of memory"), PermissionError(13, "Permission denied"),
                  OSError(5, "Input/output error"), OSError(116, "Stale file handle"),
                  RuntimeError("CUDA error: an illegal memory access was encountered")):  # transient, not the file
        def load(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(engine, "load_checkpoint", load)
        with pytest.raises(type(error)):
            fit(_model(), tr, te, cfg, run_dir=run, progress=False)
    assert (run / "final.pt").is_file() and not list(run.glob("*.corrupt"))


def test_a_damaged_file_that_cannot_be_moved_aside_is_a_warning_and_the_run_trained_again(small_scenes, tmp_path,
                                                                                           monkeypatch):
    """An error on rank 0 alone would leave DDP's other ranks waiting forever: a rename that fails (a read-only
    file in a shared cache) is a warning, the run is trained again and its new file replaces the damaged one."""
    from mlic_lib import engine

    run = tmp_path / "run"
    first = _run(small_scenes, run_dir=run, epochs=1)
    _damage(run / "results.json", "truncated")
    real_replace = engine.os.replace

    def refuse(src, dst):
        if str(dst).endswith(".corrupt"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(engine.os, "replace", refuse)
    with pytest.warns(RuntimeWarning, match=r"results\.json is damaged .*could not be moved aside .*Permission "
                                            r"denied.*trained again .*the new file will replace it"):
        again = _run(small_scenes, run_dir=run, epochs=1)
    assert not again.cached and again.final["mAP"] == first.final["mAP"]
    assert _run(small_scenes, run_dir=run, epochs=1).cached  # the new results.json replaced the damaged one


@pytest.mark.parametrize("how", ["truncated", "empty", "pickle", "bit"])
def test_is_finished_says_whether_fit_will_load_the_folder(small_scenes, tmp_path, how):
    """CPSD prepares its teachers' logits only for a student that will train: a damaged final.pt must count as
    not finished (fit trains it again), not as cached (the student would then train without its teachers)."""
    from mlic_lib.engine import is_finished

    run = tmp_path / "run"
    assert not is_finished(run)
    _run(small_scenes, run_dir=run, epochs=1)
    assert is_finished(run)
    _damage(run / "final.pt", how)
    assert not is_finished(run)
    with pytest.warns(RuntimeWarning, match="final.pt is damaged"):
        assert not _run(small_scenes, run_dir=run, epochs=1).cached  # as fit decides
    if how in ("pickle", "bit"):
        return  # results.json is no zip archive
    _run(small_scenes, run_dir=tmp_path / "other", epochs=1)
    _damage(tmp_path / "other" / "results.json", how)
    assert not is_finished(tmp_path / "other")


def test_stale_temp_file_clean_up_never_stops_a_run(tmp_path, monkeypatch):
    """A temp file one may not delete (another user's, in a shared cache) is left alone, without an error."""
    import os
    import time

    from mlic_lib import engine

    old = tmp_path / ".last.pt.abcd1234.tmp"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(engine.Path, "unlink", refuse)
    assert engine.remove_stale_temp_files(tmp_path) == [] and old.exists()
    monkeypatch.undo()
    assert engine.remove_stale_temp_files(tmp_path) == [old] and not old.exists()


def test_resuming_with_another_config_is_an_error_naming_the_fields_and_the_fix(small_scenes, tmp_path):
    """An interrupted run resumed with more epochs and another lr used to crash late in one-cycle's ``Tried to
    step`` (or train a mix of two recipes); now it stops before training, with the fields and the way out."""
    run = tmp_path / "cut"
    _interrupted(small_scenes, run, TrainConfig.from_dict({**CFG, "epochs": 2}))
    tr, te = _data(small_scenes)
    expected = (r"last\.pt is the checkpoint of an interrupted run with another training config "
                r"\(epochs: 2 -> 3; lr: 0\.003 -> 0\.01\)\. Pass another run_dir .*delete .* restore the old settings")
    with pytest.raises(ValueError, match=expected):
        fit(_model(), tr, te, TrainConfig.from_dict({**CFG, "epochs": 3, "lr": 1e-2}), run_dir=run, progress=False)
    assert (run / "last.pt").is_file() and not (run / "results.json").exists()


def test_a_finished_run_is_not_returned_for_another_config(small_scenes, tmp_path):
    """A finished folder used to come back as the cached result of any config passed with it."""
    run = tmp_path / "run"
    _run(small_scenes, run_dir=run, epochs=1)
    expected = (r"results\.json is a finished run with another training config \(lr: 0\.003 -> 0\.01; "
                r"milestones: \[\] -> \[1\]; scheduler: 'onecycle' -> 'step'\)")
    with pytest.raises(ValueError, match=expected):
        _run(small_scenes, run_dir=run, epochs=1, lr=1e-2, scheduler="step", milestones=[1])


def test_fields_that_do_not_change_a_run_may_differ_and_run_cache_folders_resume(small_scenes, tmp_path):
    """The fields of ``RUN_CONFIG_IGNORED`` (where and how fast it runs, what it evaluates on the way) may change
    between the ``fit`` that wrote a folder and the one that resumes or loads it, e.g. a GPU run loaded on a
    laptop; a ``run_dir_for`` folder (its key covers the whole config) resumes and loads as before."""
    from mlic_lib.engine import RUN_CONFIG_IGNORED

    assert set(RUN_CONFIG_IGNORED) < {f for f in TrainConfig().to_dict()}
    cfg = TrainConfig.from_dict({**CFG, "epochs": 2})
    run = run_dir_for("resume", cfg.to_dict())
    _interrupted(small_scenes, run, cfg)
    tr, te = _data(small_scenes)
    elsewhere = TrainConfig.from_dict({**CFG, "epochs": 2, "device": "cpu", "channels_last": False, "log_every": 1,
                                       "eval_batch_size": 7, "eval_every": 0})
    resumed = fit(_model(seed=5), tr, te, elsewhere, run_dir=run, progress=False)
    assert not resumed.cached and [h["epoch"] for h in resumed.history] == [0, 1]
    assert fit(_model(), tr, te, cfg, run_dir=run, progress=False).cached
    assert fit(_model(), tr, te, TrainConfig.from_dict({**CFG, "epochs": 2, "num_workers": 2}), run_dir=run,
               progress=False).cached


def test_config_changes_count_a_field_an_older_run_lacks_as_its_default():
    """A config saved before a field existed compares as that field's default; an option that no longer exists
    is a difference; lists and tuples (``results.json`` has no tuples) compare alike."""
    from mlic_lib.engine import _config_changes

    cfg = TrainConfig(lr=0.1, milestones=(2, 3))
    saved = cfg.to_dict()
    assert _config_changes({**saved, "milestones": [2, 3], "device": "cuda:1", "num_workers": 8}, cfg) == []
    del saved["warmup_start"]
    assert _config_changes(saved, cfg) == []
    assert _config_changes({**saved, "old_option": 1}, cfg) == ["old_option: 1 -> '<no such option>'"]
    assert _config_changes(saved, TrainConfig(lr=0.1, milestones=(2, 3), warmup_start=0.5)) == [
        "warmup_start: 0.0 -> 0.5"]


def test_a_run_folder_records_its_world_size_and_refuses_another(small_scenes, tmp_path):
    """``batch_size`` is per process, so a checkpoint's LR schedule belongs to its number of processes: resuming
    (or loading) under another ``world_size`` is refused with the fix, not run with a schedule of the wrong
    length. A folder written before the field existed counts as one process."""
    from mlic_lib.engine import _config_changes

    def interrupt(epoch, logs):
        raise KeyboardInterrupt

    tr, te = _data(small_scenes)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), tr, te, TrainConfig.from_dict(CFG), run_dir=tmp_path / "cut", progress=False,
            on_epoch_end=interrupt)
    last = tmp_path / "cut" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["config"]["world_size"] == 1
    ckpt["config"]["world_size"] = 2  # as torchrun --nproc_per_node=2 would have written it
    torch.save(ckpt, last)
    with pytest.raises(ValueError, match=r"world_size: 2 -> 1.*number of torchrun processes"):
        fit(_model(), tr, te, TrainConfig.from_dict(CFG), run_dir=tmp_path / "cut", progress=False)
    assert last.is_file(), "a refused checkpoint must stay for the run it belongs to"
    done = _run(small_scenes, run_dir=tmp_path / "done", epochs=1)
    results = tmp_path / "done" / "results.json"
    saved = json.loads(results.read_text())
    assert saved["config"]["world_size"] == 1
    results.write_text(json.dumps({**saved, "config": {**saved["config"], "world_size": 4}}))
    with pytest.raises(ValueError, match="world_size: 4 -> 1"):
        _run(small_scenes, run_dir=tmp_path / "done", epochs=1)
    cfg = TrainConfig()
    assert _config_changes(cfg.to_dict(), cfg, 1) == []  # an older folder: one process
    assert _config_changes(cfg.to_dict(), cfg, 2) == ["world_size: 1 -> 2"]
    assert done.final


def test_evaluate_computes_on_the_models_device_by_default(small_scenes, monkeypatch):
    """A model kept on the CPU (``train.device=cpu`` on a GPU machine) is evaluated there: the default device is
    the model's, not the first GPU's."""
    import mlic_lib.engine as E

    seen = []
    monkeypatch.setattr(E, "predict", lambda model, loader, device, *a: (seen.append(device),
                                                                         (np.zeros((2, 3)), np.ones((2, 3)), None))[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what pick_device(None) would pick
    E.evaluate(nn.Linear(4, 3), [(torch.zeros(2, 4), torch.ones(2, 3))])
    assert seen == [torch.device("cpu")]


def test_fit_removes_the_stale_temporary_files_a_killed_writer_left(small_scenes, tmp_path, monkeypatch):
    """A writer killed inside ``atomic_open`` leaves ``.last.pt.XXXXXXXX.tmp`` behind (a checkpoint-sized file,
    forever). ``fit`` removes those of its own files older than ``STALE_TEMP_SECONDS``; a young one (a live
    writer's) and files of any other name stay."""
    import tempfile

    from mlic_lib import utils
    from mlic_lib.engine import STALE_TEMP_SECONDS

    run = tmp_path / "run"
    made, mkstemp = [], tempfile.mkstemp

    def recording_mkstemp(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        made.append(os.path.basename(name))
        return fd, name

    monkeypatch.setattr(utils.tempfile, "mkstemp", recording_mkstemp)
    for name in ("last.pt", "results.json", "final.pt"):  # the names atomic_open gives its temporary files
        utils.atomic_write_text("x", run / name)
        (run / name).unlink()
    monkeypatch.undo()
    old = time.time() - STALE_TEMP_SECONDS - 60
    stale, young = made[:2], made[2]
    others = [".notes.txt.abcd1234.tmp", ".last.pt.abc.tmp", "last.pt.tmp", ".last.pt.abcd1234.tmp.keep"]
    for name in [*made, *others]:
        (run / name).write_bytes(b"partial checkpoint")
        if name != young:
            os.utime(run / name, (old, old))
    _run(small_scenes, run_dir=run, epochs=1)
    left = {f.name for f in run.iterdir()}
    assert not left & set(stale), left
    assert {young, *others} <= left


def test_checkpoints_load_with_weights_only(small_scenes, tmp_path):
    _run(small_scenes, run_dir=tmp_path / "r", epochs=1)
    state = torch.load(tmp_path / "r" / "final.pt", weights_only=True)
    assert "model" in state


def test_load_checkpoint_checks_the_archive_crcs(tmp_path):
    """torch.load does not notice a flipped bit in the tensor data (checked here, so that the test fails should it
    start to): load_checkpoint compares every record with the CRC-32 the zip archive stores, and names the record.
    Files it cannot check (no zip archive, CRC-32s not written) are left to torch.load."""
    from mlic_lib.utils import CorruptCheckpointError, load_checkpoint, verify_checkpoint

    path = tmp_path / "c.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    verify_checkpoint(path)
    _damage(path, "bit")
    assert torch.load(path, weights_only=True)["w"][500] != 500  # read without a word
    with pytest.raises(CorruptCheckpointError, match=r"c\.pt's record .*/data/0 fails its CRC-32"):
        load_checkpoint(path)
    assert load_checkpoint(path, verify=False)["w"][500] != 500
    legacy = tmp_path / "legacy.pt"  # torch's legacy format, with a zip end-of-directory signature in its data
    w = torch.full((64,), 7, dtype=torch.uint8)
    w[20:24] = torch.tensor(list(b"PK\x05\x06"), dtype=torch.uint8)
    torch.save({"w": w}, legacy, _use_new_zipfile_serialization=False)
    verify_checkpoint(legacy)
    assert torch.equal(load_checkpoint(legacy)["w"], w)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "c.pt").read_bytes()[:200])
    with pytest.raises(CorruptCheckpointError, match="zip structure is damaged"):
        verify_checkpoint(truncated)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.ones(3)}, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    verify_checkpoint(tmp_path / "nocrc.pt")


def test_run_dir_hash_depends_on_config():
    a = run_dir_for("x", {"lr": 1e-3})
    assert a == run_dir_for("x", {"lr": 1e-3})
    assert a != run_dir_for("x", {"lr": 2e-3})


def _lr_trace(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The lr of every optimiser step of a run of ``cfg`` (SGD on a tiny model)."""
    from mlic_lib.engine import build_scheduler

    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_stays_at_zero_past_the_end_of_the_run():
    """``'cosine'`` anneals to 0 at the last step and stays there if more steps come than the schedule was built
    for (an iterable yielding more batches than its ``steps_per_epoch``), instead of climbing back up the cosine."""
    from mlic_lib.engine import build_scheduler

    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.2)
    sched = build_scheduler(opt, TrainConfig(epochs=2, lr=0.2, optimizer="sgd", scheduler="cosine"), 4)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:8] == pytest.approx([0.1 * (1 + math.cos(math.pi * s / 8)) for s in range(8)])
    assert lrs[8:] == pytest.approx([0.0] * 8, abs=1e-12)


def test_cosine_restarts_is_sgdr():
    """``cosine_restarts``: cosine cycles of T_0, T_0 * T_mult, ... epochs, each back at the full lr (SGDR's Eq. 5)."""
    cfg = TrainConfig(epochs=7, lr=0.2, optimizer="sgd", scheduler="cosine_restarts", restart_epochs=1, restart_mult=2)
    lrs = _lr_trace(cfg, steps_per_epoch=4)
    # cycles of 1, 2 and 4 epochs = 4, 8 and 16 steps
    want = [0.1 * (1 + math.cos(math.pi * i / n)) for n in (4, 8, 16) for i in range(n)]
    assert lrs == pytest.approx(want)
    for bad in ({"restart_epochs": 0}, {"restart_mult": 0}, {"restart_mult": 1.5}):
        with pytest.raises(ValueError, match="restart"):
            TrainConfig(**bad)


def test_linear_warmup_in_steps_from_a_start_factor():
    """``warmup_steps`` / ``warmup_start``: mmcv's linear warm-up (DistributionBalancedLoss: 500 steps from lr/3)
    followed by the step decay at the milestones."""
    cfg = TrainConfig(epochs=4, lr=0.3, optimizer="sgd", scheduler="step", milestones=(2,), gamma=0.1,
                      warmup_steps=4, warmup_start=1 / 3, warmup_epochs=3.0)  # steps win over epochs
    lrs = _lr_trace(cfg, steps_per_epoch=5)
    want = [0.3 * (1 / 3 + (2 / 3) * (s + 1) / 4) for s in range(4)] + [0.3] * 6 + [0.03] * 10
    assert lrs == pytest.approx(want)
    for bad in ({"warmup_steps": -1}, {"warmup_start": 1.0}, {"warmup_epochs": -0.5}):
        with pytest.raises(ValueError, match="warmup"):
            TrainConfig(**bad)


def test_other_schedules_and_cpu_bf16_run(small_scenes):
    for kw in ({"scheduler": "step", "milestones": [1], "optimizer": "sgd", "lr": 0.01},
               {"scheduler": "cosine", "warmup_epochs": 1, "optimizer": "adamw"}, {"amp": "bf16"}):
        res = _run(small_scenes, epochs=2, **kw)
        assert np.isfinite(res.final["mAP"]) and res.history[-1]["loss"] < res.history[0]["loss"] * 1.5


def test_amp_bf16_runs_the_step_in_bf16_on_the_cpu_and_fp32_without_it(small_scenes):
    """``amp: bf16`` trains under bf16 autocast on any device (the step's logits are bf16), ``off`` and ``auto``
    on a CPU in fp32; evaluation is fp32 either way (its scores are float32)."""
    from mlic_lib.engine import SupervisedStep

    class Spy(SupervisedStep):
        dtypes: list = []

        def __call__(self, model, batch, device):
            self.dtypes.append(model(batch[0]).dtype)
            return super().__call__(model, batch, device)

    tr, te = _data(small_scenes)
    for amp, want in (("bf16", torch.bfloat16), ("off", torch.float32), ("auto", torch.float32)):
        Spy.dtypes = []
        cfg = TrainConfig.from_dict({**CFG, "epochs": 1, "amp": amp, "device": "cpu"})  # 'auto' is bf16 on CUDA
        res = fit(_model(), tr, te, cfg, step=Spy(), progress=False)
        assert set(Spy.dtypes) == {want}, amp
        assert np.isfinite(res.final["mAP"])


def test_fit_returns_and_evaluates_the_ema_weights(small_scenes):
    """``ema_decay``: the returned model (and the metrics) are the moving average ``e <- d e + (1 - d) w``, which
    starts from the weights after the first step. With ``d`` near 1 it stays there; with EMA off the returned
    weights are the trained ones."""
    init = [p.detach().clone() for p in _model().parameters()]
    slow = _run(small_scenes, epochs=2, ema_decay=1 - 1e-6, device="cpu")  # compared with `init`, on the CPU
    plain = _run(small_scenes, epochs=2, device="cpu")
    moved = max((p - q).abs().max().item() for p, q in zip(plain.model.parameters(), init, strict=True))
    stayed = max((p - q).abs().max().item() for p, q in zip(slow.model.parameters(), init, strict=True))
    assert moved > 1e-3 and stayed < 0.1 * moved, (moved, stayed)
    assert slow.final["mAP"] != plain.final["mAP"]


def test_cosine_schedule_with_linear_warmup():
    """``cosine``: linear warm-up over ``warmup_epochs`` times a cosine from the lr to 0 over the whole run."""
    cfg = TrainConfig(epochs=3, lr=0.2, optimizer="sgd", scheduler="cosine", warmup_epochs=1.0)
    lrs = _lr_trace(cfg, steps_per_epoch=4)
    want = [0.2 * min(1.0, (s + 1) / 4) * 0.5 * (1 + math.cos(math.pi * s / 12)) for s in range(12)]
    assert lrs == pytest.approx(want)
    assert _lr_trace(TrainConfig(epochs=2, lr=0.2, scheduler="none"), 3) == pytest.approx([0.2] * 6)


def test_backbone_lr_multiplier():
    from mlic_lib.engine import build_optimizer

    model = _model()
    opt = build_optimizer(model, TrainConfig(lr=1.0, backbone_lr_mult=0.1))
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([0.1, 1.0])
    n_backbone = sum(p.numel() for p in model.features.parameters())
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == n_backbone


def test_bad_configs_and_inputs(small_scenes):
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    tr, te = _data(small_scenes)
    empty = TensorImageDataset(small_scenes[0].images[:0], small_scenes[0].targets[:0])
    with pytest.raises(ValueError, match="empty"):
        evaluate(_model(), empty, "cpu")
    with pytest.raises(FloatingPointError, match="learning rate"):
        fit(_model(), tr, None, TrainConfig.from_dict({**CFG, "lr": 1e30, "optimizer": "sgd", "epochs": 1,
                                                         "log_every": 1}), progress=False)


@pytest.mark.parametrize(("option", "value", "match"), [
    ("grad_clip", -1.0, "grad_clip must be > 0"), ("grad_clip", 0, "grad_clip must be > 0"),
    ("log_every", 0, "log_every must be >= 1"), ("eval_batch_size", 0, "eval_batch_size"),
    ("num_workers", -1, "num_workers >= 0"), ("gamma", -0.1, "gamma must be a finite number > 0"),
    ("gamma", 0.0, "gamma must be"), ("backbone_lr_mult", -1.0, "backbone_lr_mult must be a finite number >= 0"),
    ("seed", -1, "seed must be >= 0")])
def test_options_that_would_fail_mid_run_or_train_backwards_are_refused_up_front(option, value, match):
    """A negative ``grad_clip`` used to flip every gradient (clip_grad_norm_ scales by max_norm / norm), so the
    loss rose, as a negative ``gamma`` or ``backbone_lr_mult`` did through a negative lr; ``log_every=0`` failed at
    the first step, ``eval_batch_size=0`` after the first epoch, and ``seed=-1`` inside ``fit`` (under torchrun on
    rank 0 alone: the other ranks' seeds are larger)."""
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({**CFG, option: value})
    from mlic_lib.engine import train_one_epoch

    if option in ("grad_clip", "log_every"):
        with pytest.raises(ValueError, match=match.split()[0]):
            train_one_epoch(_model(), [], torch.optim.SGD(_model().parameters(), lr=0.1), lambda *a: None, "cpu",
                            **{option: value})


def test_a_whole_number_for_a_float_option_is_the_same_run():
    """``weight_decay: 0`` and ``0.0`` are one setting: they used to give two cache keys (a needless retrain)."""
    a, b = TrainConfig.from_dict({**CFG, "weight_decay": 0}), TrainConfig.from_dict({**CFG, "weight_decay": 0.0})
    assert type(a.weight_decay) is float and a.key_dict() == b.key_dict()
    assert run_dir_for("x", a.key_dict()) == run_dir_for("x", b.key_dict())


def test_a_checkpoint_is_read_onto_the_cpu_whatever_the_training_device(small_scenes, tmp_path):
    """On a GPU, ``last.pt`` used to be read with ``map_location=<the GPU>``, which moved its saved random-number
    states there too; ``torch.set_rng_state`` refuses those, so every resume of an interrupted GPU run failed.
    Here a non-CPU device (``meta``) stands in for the GPU this machine lacks."""
    from mlic_lib.engine import _read_last, _set_rng_state

    cfg = TrainConfig.from_dict({**CFG, "epochs": 2})
    _interrupted(small_scenes, tmp_path / "cut", cfg)
    assert torch.load(tmp_path / "cut" / "last.pt", map_location="meta", weights_only=True)["rng_ranks"][0][
        "torch"].device.type == "meta"  # what reading it onto the training device did
    ckpt = _read_last(tmp_path / "cut", cfg, 0)
    state = ckpt["rng_ranks"][0]
    assert state["torch"].device.type == "cpu" and state["numpy"]["keys"].device.type == "cpu"
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    _set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), state["torch"])


def test_a_nan_loss_between_logged_steps_stops_the_epoch_and_writes_no_checkpoint(small_scenes, tmp_path):
    """A NaN at a step the ``log_every`` check skips is caught by the epoch's mean: no history, no checkpoint."""
    train = small_scenes[0]
    x, y = torch.as_tensor(train.images[:16]).float() / 255, torch.as_tensor(train.targets[:16]).float()
    # a loader in a fixed order; a NaN batch at step 1, which log_every 20 does not check (it checks step 0)
    batches = [(x[:8], y[:8]), (torch.full_like(x[8:], float("nan")), y[8:]), (x[:8], y[:8])]
    with pytest.raises(FloatingPointError, match="not finite at some step of this epoch"):
        fit(_model(), batches, None, TrainConfig.from_dict({**CFG, "epochs": 1, "log_every": 20}),
            run_dir=tmp_path / "run", progress=False)
    assert not any((tmp_path / "run").glob("*.pt"))


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 7])
def test_onecycle_survives_tiny_runs(total_steps):
    from mlic_lib.engine import build_scheduler

    model = _model()
    cfg = TrainConfig(epochs=1, scheduler="onecycle")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, cfg, total_steps)
    for _ in range(total_steps):
        opt.step()
        sched.step()
    assert all(np.isfinite(g["lr"]) for g in opt.param_groups)


@pytest.mark.parametrize("pct", [0.1, 0.2, 0.3, 0.7])  # 0.7: it used to be capped at 0.5
def test_onecycle_peaks_after_its_warm_up_share(pct):
    from mlic_lib.engine import build_scheduler

    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    sched = build_scheduler(opt, TrainConfig(epochs=10, scheduler="onecycle", onecycle_pct_start=pct), 100)
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert int(np.argmax(lrs)) == round(pct * 1000) - 1  # torch's one-cycle peaks at step pct * total - 1
    with pytest.raises(ValueError, match="onecycle_pct_start"):
        TrainConfig(onecycle_pct_start=1.0)


def test_onecycle_warms_up_over_a_fifth_of_the_steps_unless_told_otherwise():
    """Every profile but CPSD's full one leaves ``onecycle_pct_start`` at its default, ASL's 20% warm-up: a
    changed default would move every chapter's numbers."""
    lrs = _lr_trace(TrainConfig(epochs=10, scheduler="onecycle", lr=0.1), steps_per_epoch=100)
    assert int(np.argmax(lrs)) == 199


def test_progress_bars_honour_tqdm_disable(monkeypatch):
    """The book sets TQDM_DISABLE=1: bars asked for by a chapter stay off there (no frozen bars in the HTML)."""
    from mlic_lib.utils import bar_disabled

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not bar_disabled(True) and bar_disabled(False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bar_disabled(True)
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not bar_disabled(True)


def test_decay_norm_and_bias_false_exempts_1d_params_and_listed_names():
    """AdamW with zero gradients changes a parameter only by its decoupled decay: ``p *= 1 - lr * wd``
    (Loshchilov & Hutter). With ``decay_norm_and_bias=False`` biases, norm weights and the names a submodule
    lists in ``no_weight_decay()`` (timm's convention) stay put; every other weight decays exactly."""
    from mlic_lib.engine import build_optimizer, no_decay_names

    class Table(nn.Module):  # a 2-d parameter that a timm-style hook exempts (like Swin's bias tables)
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.ones(3, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"table"}

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Table())
    assert no_decay_names(model) == {"0.bias", "1.weight", "1.bias", "2.table", "2.proj.bias"}
    lr, wd = 0.5, 0.1
    for flag, exempt in ((True, set()), (False, no_decay_names(model))):
        net = copy.deepcopy(model)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = build_optimizer(net, TrainConfig(optimizer="adamw", lr=lr, weight_decay=wd, decay_norm_and_bias=flag))
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in net.named_parameters():
            factor = 1.0 if n in exempt else 1 - lr * wd
            torch.testing.assert_close(p.detach(), before[n] * factor, msg=f"{n} (decay_norm_and_bias={flag})")


def test_decay_groups_keep_the_backbone_lr_and_onecycle_peaks():
    """With a ``features`` backbone and ``backbone_lr_mult``, the exempt parameters split each lr group in two:
    four groups, every parameter in exactly one, each with its lr, and OneCycle peaks at each group's lr."""
    from mlic_lib.engine import build_optimizer, build_scheduler, no_decay_names

    model = _model()
    cfg = TrainConfig(optimizer="adamw", lr=1.0, backbone_lr_mult=0.1, weight_decay=0.01, decay_norm_and_bias=False)
    opt = build_optimizer(model, cfg)
    exempt = no_decay_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    body = {id(p) for p in model.features.parameters()}
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names) and len(opt.param_groups) == 4
    for g in opt.param_groups:
        in_body = {id(p) in body for p in g["params"]}
        no_decay = {names[id(p)] in exempt for p in g["params"]}
        assert len(in_body) == len(no_decay) == 1  # a group never mixes
        assert g["lr"] == pytest.approx(0.1 if in_body.pop() else 1.0)
        assert g["weight_decay"] == (0.0 if no_decay.pop() else 0.01)
    build_scheduler(opt, cfg, steps_per_epoch=10)  # sets each group's max_lr / initial_lr
    assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([g["initial_lr"] * 25 for g in opt.param_groups])
    assert sorted({round(g["max_lr"], 6) for g in opt.param_groups}) == [0.1, 1.0]


def test_every_floating_point_image_batch_goes_channels_last():
    """With channels_last, LTML's second view went to the model in NCHW (only the first batch item was converted),
    so the two-branch model's concatenated batch was NCHW; integer and lower-rank items are left as they are."""
    from mlic_lib.engine import _to_device

    batch = [torch.randn(2, 3, 4, 4), torch.ones(2, 5), torch.randn(2, 3, 4, 4),
             torch.zeros(2, 1, 5, 5, dtype=torch.long)]
    out = _to_device(batch, torch.device("cpu"), channels_last=True)
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    assert out[2].is_contiguous(memory_format=torch.channels_last) and torch.equal(out[2], batch[2])
    assert out[3] is batch[3] and out[1] is batch[1]
    assert all(t is b for t, b in zip(_to_device(batch, torch.device("cpu"), channels_last=False), batch, strict=True))


def test_channels_last_on_cpu_warns_only_about_torch_strided_1x1_convolutions(monkeypatch):
    """A CPU channels_last run warns when the model has nn.Conv2d 1x1 stride-2 layers (torchvision ResNet shortcuts),
    not for small_resnet, whose shortcut is a StridedPointwiseConv."""
    import warnings

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.randn(4, 3, 32, 32)
    data = TensorImageDataset((x.clamp(-1, 1) * 127 + 128).to(torch.uint8).numpy(), np.eye(4, 5, dtype=np.float32))
    cfg = TrainConfig.from_dict({**CFG, "epochs": 1, "batch_size": 4, "channels_last": True, "device": "cpu"})
    expected = r"strided 1x1 convolutions \(features\.5\.0\.downsample\.0.*Set channels_last: false"
    with pytest.warns(RuntimeWarning, match=expected):
        fit(build_model("resnet18", 5), data, None, cfg, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit(build_model("small_resnet", 5, widths=(8, 16, 16, 32)), data, None, cfg, progress=False)


def test_probabilities_of_one_image_and_a_batch_match_the_sigmoid_of_the_logits():
    """``probabilities`` is what the chapters call on single test images: it must equal sigmoid(model(x)),
    come back on the CPU as float32, and name the shape it wants."""
    from mlic_lib.engine import probabilities

    model = _model().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = torch.sigmoid(model(x))
    batch, one = probabilities(model, x), probabilities(model, x[1])
    assert batch.shape == (3, 20) and one.shape == (20,)
    assert batch.device.type == "cpu" and batch.dtype == torch.float32 and not batch.requires_grad
    torch.testing.assert_close(batch, ref)
    torch.testing.assert_close(one, ref[1])
    with pytest.raises(ValueError, match=r"one image \(C, H, W\) or a batch"):
        probabilities(model, x[0, 0])


def test_probabilities_sends_the_image_to_the_models_device_and_returns_cpu_float32():
    """The same contract without a GPU: a model whose weights live on the ``meta`` device sees its input there,
    and the (bf16) scores come back on the CPU as float32."""
    from mlic_lib.engine import probabilities

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(1, device="meta"))
            self.seen = None

        def forward(self, x):
            self.seen = x.device
            return torch.zeros(len(x), 4, dtype=torch.bfloat16)

    model = Recorder()
    got = probabilities(model, torch.randn(2, 3, 8, 8))
    assert model.seen.type == "meta" and got.device.type == "cpu" and got.dtype == torch.float32
    assert got.shape == (2, 4) and torch.equal(got, torch.full((2, 4), 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probabilities_moves_a_cpu_image_to_a_gpu_model():
    """The reason ``probabilities`` exists: a model trained on the GPU scored on a CPU test image."""
    from mlic_lib.engine import probabilities

    model = _model().eval()
    x = torch.randn(3, 32, 32)
    with torch.no_grad():
        ref = torch.sigmoid(model(x[None]))[0]
    got = probabilities(model.to("cuda"), x)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_model_device_reads_parameters_then_buffers_then_defaults_to_cpu():
    from mlic_lib.utils import model_device

    assert model_device(_model()) == torch.device("cpu")
    assert model_device(nn.BatchNorm1d(3, affine=False).to("meta")) == torch.device("meta")  # buffers only
    assert model_device(nn.ReLU()) == torch.device("cpu")  # nothing to read
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")


def test_a_steps_host_batch_hook_sees_the_cpu_batch_before_the_device_copy(small_scenes):
    """``step.host_batch`` runs on the loader's CPU batch, and what it returns is what the step receives."""
    from mlic_lib.engine import SupervisedStep, train_one_epoch

    seen = []

    class Step(SupervisedStep):
        def host_batch(self, batch):
            seen.append(("host", batch[0].device.type, len(batch)))
            return [*batch, torch.ones(len(batch[1]))]

        def __call__(self, model, batch, device):
            seen.append(("step", len(batch), float(batch[-1].sum())))
            return super().__call__(model, batch[:2], device)

    model = _model()
    loader = torch.utils.data.DataLoader(_data(small_scenes)[0], batch_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_one_epoch(model, loader, opt, Step(), torch.device("cpu"))
    assert seen[0] == ("host", "cpu", 2) and seen[1][:2] == ("step", 3) and len(seen) == 2 * len(loader)


def test_a_key_logged_on_some_steps_is_averaged_over_those_steps():
    """SpliceMix logs ``loss_mixed`` only when a batch has a mixed image: its epoch mean must be over the steps that
    logged it (it was divided by every step), while the loss's is over all."""
    from mlic_lib.engine import train_one_epoch

    model = nn.Linear(3, 1)
    calls = []

    def step(m, batch, device):
        i = len(calls)
        calls.append(i)
        loss = m(batch[0]).pow(2).mean() * 0 + float(i)  # the loss of step i is i
        return loss, ({"every": float(10 * i)} | ({"odd": float(i)} if i % 2 else {}))

    batches = [(torch.randn(2, 3), torch.zeros(2, 1)) for _ in range(4)]
    out = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), step, torch.device("cpu"))
    assert out == pytest.approx({"loss": 1.5, "every": 15.0, "odd": 2.0})


# ---------------------------------------------- behaviour a mutation review found untested: generators, modes, clip
class _RandomBCE:
    """BCE plus draws from torch's, NumPy's and Python's global generators (what dropout and augmentations use),
    logged so that a history shows which numbers a run drew."""

    def __call__(self, model, batch, device):
        import random

        x, y = (t.to(device) for t in batch)
        draws = {"torch": torch.rand(()), "numpy": float(np.random.rand()), "python": random.random()}
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y) + 0.0 * draws["torch"]
        return loss, draws


def test_a_resumed_run_goes_on_with_every_global_generators_stream(small_scenes, tmp_path):
    tr, te = _data(small_scenes)
    cfg = TrainConfig.from_dict({**CFG, "epochs": 2})
    full = fit(_model(), tr, te, cfg, step=_RandomBCE(), run_dir=tmp_path / "full", progress=False)

    def interrupt(epoch, logs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), tr, te, cfg, step=_RandomBCE(), run_dir=tmp_path / "cut", progress=False, on_epoch_end=interrupt)
    torch.manual_seed(99)  # the caller's generators moved on: the checkpoint's streams must win
    np.random.seed(99)
    resumed = fit(_model(), tr, te, cfg, step=_RandomBCE(), run_dir=tmp_path / "cut", progress=False)
    keys = ("loss", "torch", "numpy", "python")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in full.history]
    # and fit seeds the generators itself: the caller's state before a fresh run does not matter
    model = _model()
    torch.manual_seed(7)
    again = fit(model, tr, te, cfg, step=_RandomBCE(), run_dir=None, progress=False)
    assert [h["torch"] for h in again.history] == [h["torch"] for h in full.history]


def _tiny_loader_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 8, generator=g), (torch.rand(n, 5, generator=g) > .5).float())


def _linear():
    seed_everything(0)
    return nn.Linear(8, 5)


def test_a_resumed_run_goes_on_with_the_order_of_a_callers_seeded_data_loader(tmp_path):
    """A ``DataLoader`` with its own seeded generator (the usual reproducible loader) draws its order from that
    generator, which ``last.pt`` keeps: without it a resumed run replayed the first epoch's order."""
    from torch.utils.data import DataLoader

    ds, cfg = _tiny_loader_data(), TrainConfig(epochs=3, batch_size=8, scheduler="none", device="cpu")

    def loader():
        return DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))

    def interrupt(epoch, logs):
        raise KeyboardInterrupt

    full = fit(_linear(), loader(), None, cfg, run_dir=tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(_linear(), loader(), None, cfg, run_dir=tmp_path / "cut", progress=False, on_epoch_end=interrupt)
    resumed = fit(_linear(), loader(), None, cfg, run_dir=tmp_path / "cut", progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                 resumed.model.state_dict().values(), strict=True))
    with pytest.raises(KeyboardInterrupt):
        fit(_linear(), loader(), None, cfg, run_dir=tmp_path / "cut2", progress=False, on_epoch_end=interrupt)
    with pytest.raises(ValueError, match="generator.*built as the interrupted run's"):  # the loader changed
        fit(_linear(), DataLoader(ds, batch_size=8, shuffle=True), None, cfg, run_dir=tmp_path / "cut2",
            progress=False)


def test_a_checkpoint_of_older_code_without_loader_states_resumes_with_a_warning(tmp_path):
    """``last.pt`` written before the loaders' generator states were kept has no ``loader`` entry: it resumes (the
    generator restarts from its seed, as it did then) with a warning, not an error about the loader."""
    from torch.utils.data import DataLoader

    from mlic_lib.utils import atomic_torch_save

    ds, cfg = _tiny_loader_data(), TrainConfig(epochs=3, batch_size=8, scheduler="none", device="cpu")

    def loader():
        return DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))

    def interrupt(epoch, logs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_linear(), loader(), None, cfg, run_dir=tmp_path, progress=False, on_epoch_end=interrupt)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    for state in ckpt["rng_ranks"]:
        del state["loader"]
    atomic_torch_save(ckpt, tmp_path / "last.pt")
    with pytest.warns(RuntimeWarning, match="predates the saving of the training loader's generator"):
        assert len(fit(_linear(), loader(), None, cfg, run_dir=tmp_path, progress=False).history) == 3


def test_a_one_shot_iterator_or_an_unsized_loader_is_refused_with_the_fix():
    """A generator of batches is used up by the first epoch: it used to train epoch 0 and then fail with 'is the
    training set empty?'. An iterable without ``len()`` names ``steps_per_epoch``."""
    ds = _tiny_loader_data()

    def batches():
        yield from ((ds.tensors[0][i:i + 8], ds.tensors[1][i:i + 8]) for i in range(0, 48, 8))

    class Unsized:
        def __iter__(self):
            return batches()

    cfg = TrainConfig(epochs=2, batch_size=8, scheduler="none", device="cpu")
    trained = []
    with pytest.raises(ValueError, match="one-shot iterator.*Pass a Dataset, a DataLoader"):
        fit(_linear(), batches(), None, cfg, progress=False, steps_per_epoch=6,
            on_epoch_end=lambda e, _: trained.append(e))
    assert trained == []
    with pytest.raises(TypeError, match=r"has no len\(\).*steps_per_epoch="):
        fit(_linear(), Unsized(), None, cfg, progress=False)
    assert len(fit(_linear(), Unsized(), None, cfg, progress=False, steps_per_epoch=6).history) == 2
    one = TrainConfig(epochs=1, batch_size=8, scheduler="none", device="cpu")
    assert len(fit(_linear(), batches(), None, one, progress=False, steps_per_epoch=6).history) == 1


class _NoisyEval(torch.utils.data.Dataset):
    """Test-time noise from torch's global generator, as a random test-time augmentation draws it."""

    def __init__(self, n):
        self.x, self.y = _tiny_loader_data(n, seed=n).tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.5 * torch.randn(8), self.y[i]


def test_a_run_stopped_after_its_last_checkpoint_keeps_the_final_metrics_it_computed(tmp_path):
    """With a stochastic evaluation, evaluating again on resume (with the random state of after the evaluation)
    gave other final metrics than the uninterrupted run's and than its own last history entry."""
    cfg = TrainConfig(epochs=2, batch_size=8, scheduler="none", device="cpu")

    def interrupt(epoch, logs):
        if epoch == cfg.epochs - 1:
            raise KeyboardInterrupt

    tr = _tiny_loader_data()
    full = fit(_linear(), tr, _NoisyEval(32), cfg, run_dir=tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(_linear(), tr, _NoisyEval(32), cfg, run_dir=tmp_path / "cut", progress=False, on_epoch_end=interrupt)
    resumed = fit(_linear(), tr, _NoisyEval(32), cfg, run_dir=tmp_path / "cut", progress=False)
    assert resumed.final["mAP"] == full.final["mAP"] == resumed.history[-1]["mAP"]


def test_a_last_epoch_checkpoint_without_final_metrics_is_evaluated_on_resume(tmp_path):
    """A ``last.pt`` of the last epoch written before checkpoints kept ``final`` (older code): the resume has no
    epoch left to train and evaluates the model, rather than caching an empty ``final``."""
    from mlic_lib.utils import atomic_torch_save

    cfg = TrainConfig(epochs=2, batch_size=8, scheduler="none", device="cpu")

    def interrupt(epoch, logs):
        if epoch == cfg.epochs - 1:
            raise KeyboardInterrupt

    tr = _tiny_loader_data()
    full = fit(_linear(), tr, tr, cfg, run_dir=tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(_linear(), tr, tr, cfg, run_dir=tmp_path / "cut", progress=False, on_epoch_end=interrupt)
    ckpt = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    del ckpt["final"]
    atomic_torch_save(ckpt, tmp_path / "cut" / "last.pt")
    resumed = fit(_linear(), tr, tr, cfg, run_dir=tmp_path / "cut", progress=False)
    assert resumed.final["mAP"] == full.final["mAP"]
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["final"]["mAP"] == full.final["mAP"]


def test_evaluate_scores_in_eval_mode_and_restores_the_models_mode(small_scenes):
    _, te = _data(small_scenes)
    model = _model().train()
    buffers = [b.clone() for b in model.buffers()]
    small = evaluate(model, te, batch_size=7).scores
    assert model.training  # the mode it had
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))  # BatchNorm untouched
    model.eval()
    np.testing.assert_allclose(evaluate(model, te, batch_size=64).scores, small, atol=1e-5)  # batch-independent
    assert not model.training


def test_grad_clip_bounds_the_step_and_the_ema_averages_the_stepped_weights():
    from mlic_lib.ema import WeightEMA
    from mlic_lib.engine import train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4) * 100, torch.ones(8, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ema = WeightEMA(model, 0.5)

    def step(m, batch, device):
        return torch.nn.functional.binary_cross_entropy_with_logits(m(batch[0]), batch[1]), {}

    train_one_epoch(model, [(x, y)], opt, step, torch.device("cpu"), grad_clip=1e-3, ema=ema)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert 0 < float(moved) <= 1e-3 + 1e-7  # SGD at lr 1 moves by the clipped gradient's norm
    for e, p in zip(ema.module.parameters(), model.parameters(), strict=True):
        assert torch.equal(e, p)  # its first update copies the weights *after* the step


def test_loader_order_changes_with_the_epoch_and_sgd_keeps_its_momentum():
    from mlic_lib.engine import build_optimizer, make_loader

    images = np.arange(32, dtype=np.uint8).reshape(32, 1, 1, 1).repeat(3, 1)  # each image's pixels are its index
    ds = TensorImageDataset(images, np.zeros((32, 1)))

    def order(epoch):
        batches = make_loader(ds, 8, True, 0, epoch)
        return [round(float(v)) for b in batches for v in ds.unnormalise(b[0])[:, 0, 0, 0] * 255]

    assert sorted(order(0)) == list(range(32)) and order(0) == order(0) != order(1)
    opt = build_optimizer(_model(), TrainConfig(optimizer="sgd", momentum=0.5))
    assert opt.param_groups[0]["momentum"] == 0.5


def test_a_fractional_warm_up_and_a_zero_ema_decay():
    trace = _lr_trace(TrainConfig(epochs=2, lr=1.0, scheduler="cosine", warmup_epochs=0.5, warmup_start=0.0), 4)
    # 2 warm-up steps (half an epoch of 4), times the cosine over the 8 steps
    assert trace[0] == pytest.approx(0.5) and trace[1] == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=0.0)


def test_a_writer_killed_while_saving_a_checkpoint_leaves_the_previous_one_whole(small_scenes, tmp_path, monkeypatch):
    """Every epoch's ``last.pt`` is written to a temporary file and renamed: a process killed half-way through
    the next save leaves the previous checkpoint readable, not a truncated file (a plain ``torch.save`` to the
    path passed every other test)."""
    real_save, calls = torch.save, []

    def dies_half_way(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # epoch 1's checkpoint: some bytes reach the file, then the process "dies"
            fh = open(f, "wb") if isinstance(f, str | os.PathLike) else f  # noqa: SIM115
            fh.write(b"PK\x03\x04 half a zip")
            fh.flush()
            raise _Stop
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dies_half_way)
    tr, te = _data(small_scenes)
    with pytest.raises(_Stop):
        fit(_model(), tr, te, TrainConfig.from_dict(CFG), run_dir=tmp_path, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name != "last.pt" and not p.name.startswith(".lock")] == []


def test_a_resumed_runs_seconds_add_the_epochs_trained_before_the_interruption(small_scenes, tmp_path):
    """``FitResult.seconds`` (and results.json's) is the whole run's time: the resumed process's own time plus
    the ``train_seconds`` of the epochs its checkpoint holds."""
    cfg = TrainConfig.from_dict(CFG)
    _interrupted(small_scenes, tmp_path, cfg)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["history"][0]["train_seconds"] = 1000.0  # as if epoch 0 had taken 1000 s
    torch.save(ckpt, tmp_path / "last.pt")
    tr, te = _data(small_scenes)
    t0 = time.perf_counter()
    res = fit(_model(), tr, te, cfg, run_dir=tmp_path, progress=False)
    wall = time.perf_counter() - t0
    assert 1000.0 + sum(h["train_seconds"] for h in res.history[1:]) <= res.seconds <= 1000.0 + wall
    assert json.loads((tmp_path / "results.json").read_text())["seconds"] == pytest.approx(res.seconds)


def test_more_local_ranks_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun with two processes on a one-GPU machine: the second rank names the problem and the fix instead of
    CUDA's "invalid device ordinal" (seen on a lent H100), and nothing is initialised."""
    from mlic_lib.engine import _setup_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device called"))
    with pytest.raises(RuntimeError, match=r"process 1 on this node, but it has 1 CUDA device.*--nproc_per_node"):
        _setup_distributed(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # train.device: cuda on a machine without one
    with pytest.raises(RuntimeError, match=r"no CUDA device.*train.device: cpu"):
        _setup_distributed(torch.device("cuda"))


def test_evaluate_ranks_confident_scores_without_float32_ties():
    """A float32 sigmoid is exactly 1.0 from a logit of about 16.7: confident positives and hard negatives would
    tie there. evaluate's scores (float64 sigmoids) keep the logits' order, so mAP equals sklearn's AP of the
    logits, where the float32 sigmoids lose several points."""
    from sklearn.metrics import average_precision_score
    from torch.utils.data import TensorDataset

    from mlic_lib.analysis.robustness import lowres_predict

    g = torch.Generator().manual_seed(0)
    logits = torch.cat([20 + 3 * torch.randn(60, generator=g), -5 + torch.randn(1000, generator=g),
                        19 + 2 * torch.randn(15, generator=g)])[:, None]
    targets = torch.cat([torch.ones(60), torch.zeros(1015)])[:, None]
    expected = average_precision_score(targets[:, 0], logits[:, 0].double())
    tied = average_precision_score(targets[:, 0], torch.sigmoid(logits[:, 0]))  # float32: the ties at 1.0
    assert expected - tied > 0.03
    data = TensorDataset(logits[:, :, None, None], targets)  # "images" of shape (1, 1, 1)
    model = nn.Flatten()
    res = evaluate(model, data, "cpu")
    assert res.scores.dtype == np.float64
    assert res.metrics["mAP"] == pytest.approx(expected, abs=1e-12)
    assert evaluate(model, data, "cpu", predict_fn=lowres_predict(1)).metrics["mAP"] == pytest.approx(expected)


def test_supervised_step_passes_the_label_mask_to_its_loss():
    """A batch ``(x, y, mask)`` (VOC difficult labels, ``difficult_train: ignore``) trains on the kept entries only:
    the step's loss is the masked mean BCE written out, and a masked entry gets no gradient."""
    from mlic_lib.engine import SupervisedStep

    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 4).double()
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = (torch.rand(6, 4, generator=g) < 0.4).double()
    mask = torch.rand(6, 4, generator=g) < 0.7
    mask[0, 0] = False
    loss, _ = SupervisedStep()(model, (x, y, mask), torch.device("cpu"))
    z = model(x).float()
    p = torch.sigmoid(z.double())
    ref = sum(-(y[i, c] * torch.log(p[i, c]) + (1 - y[i, c]) * torch.log(1 - p[i, c]))
              for i in range(6) for c in range(4) if mask[i, c]) / int(mask.sum())
    assert torch.allclose(loss.double(), ref, atol=1e-5)
    logits = model(x).detach().requires_grad_(True)
    SupervisedStep()(lambda _: logits, (x, y, mask), torch.device("cpu"))[0].backward()
    assert logits.grad[0, 0] == 0 and (logits.grad[mask] != 0).all()


def test_onecycle_with_fewer_than_four_steps_keeps_the_lr():
    for steps in (1, 2, 3):
        assert _lr_trace(TrainConfig(epochs=1, lr=0.1, scheduler="onecycle"), steps) == pytest.approx([0.1] * steps)


def test_adam_is_adam_and_adamw_is_adamw():
    """``adam`` adds the weight decay to the gradient (L2), ``adamw`` decouples it: not the same optimiser."""
    from mlic_lib.engine import build_optimizer

    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        assert type(build_optimizer(_model(), TrainConfig(optimizer=name, weight_decay=0.01))) is cls, name


def test_adam_on_the_cpu_uses_the_foreach_kernels_with_the_same_numbers():
    from mlic_lib.engine import build_optimizer

    weights = {}
    for foreach in (True, False):
        model = _model()
        opt = build_optimizer(model, TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.05))
        assert all(g["foreach"] for g in opt.param_groups)
        for g in opt.param_groups:
            g["foreach"] = foreach  # the per-tensor loop torch picks on a CPU by itself
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        weights[foreach] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False], strict=True))


def test_loader_orders_of_different_seeds_and_epochs_do_not_coincide():
    """The order of ``(seed, epoch)`` must not be that of ``(seed + 1, epoch - 1)``: runs of neighbouring seeds
    would otherwise see the same batches one epoch apart."""
    from mlic_lib.engine import make_loader

    ds = TensorImageDataset(np.arange(32, dtype=np.uint8).reshape(32, 1, 1, 1).repeat(3, 1), np.zeros((32, 1)))

    def order(seed, epoch):
        batches = make_loader(ds, 8, True, seed, epoch)
        return [round(float(v)) for b in batches for v in ds.unnormalise(b[0])[:, 0, 0, 0] * 255]

    assert order(1, 0) != order(0, 1) and order(2, 0) != order(1, 1) != order(0, 2)
    assert order(1, 0) == order(1, 0)


def test_rank_seed_is_the_seed_itself_on_rank_zero():
    from mlic_lib.engine import rank_seed

    assert rank_seed(7, 0) == 7  # one process draws what a run without torchrun draws
    assert len({rank_seed(7, r) for r in range(4)} | {rank_seed(8, r) for r in range(4)}) == 8


def test_make_loader_sets_the_epoch_of_a_chapters_own_loader():
    from mlic_lib.engine import make_loader

    class Own:
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

    own = Own()
    assert make_loader(own, 8, True, seed=0, epoch=5) is own and own.epoch == 5


# ------------------------------------------------- a caller's loaders and callbacks (schedule length, RNG, EMA)
def _tiny_set(n: int, seed: int = 0):
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 4, 4, generator=g), (torch.rand(n, 5, generator=g) < 0.4).float())


def _tiny_net(dropout: float = 0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(48, 5))


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_a_steps_per_epoch_that_is_not_the_loaders_is_refused_after_the_first_epoch(scheduler):
    """A wrong ``steps_per_epoch`` built the schedule for another run length: cosine ended at lr 0 early, onecycle
    failed with torch's bare error in the last epoch, after every other epoch had been trained."""
    ds = _tiny_set(64)

    class Batches:  # a caller's loader without len(): 4 batches per pass
        def __iter__(self):
            return (ds[i:i + 16] for i in range(0, 64, 16))

    done = []
    cfg = TrainConfig(epochs=3, batch_size=16, scheduler=scheduler, device="cpu")
    with pytest.raises(ValueError, match="epoch 0 took 4 steps, but the LR schedule was built for 3 per epoch"):
        fit(_tiny_net(), Batches(), None, cfg, steps_per_epoch=3, progress=False,
            on_epoch_end=lambda e, logs: done.append(e))
    assert done == []
    assert len(fit(_tiny_net(), Batches(), None, cfg, steps_per_epoch=4, progress=False).history) == 3


def test_with_ema_the_model_passed_in_holds_the_same_weights_fresh_or_loaded(tmp_path):
    """A fresh run left the raw weights in the model passed to fit, a loaded run the averaged ones: a notebook that
    evaluated that model reported other numbers on a cached rebuild."""
    train, val = _tiny_set(64), _tiny_set(40, seed=1)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-2, ema_decay=0.5, device="cpu")
    first, again = _tiny_net(), _tiny_net()
    r1 = fit(first, train, val, cfg, run_dir=tmp_path, progress=False)
    r2 = fit(again, train, val, cfg, run_dir=tmp_path, progress=False)
    assert r2.cached and r1.model is first
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert evaluate(first, val).metrics["mAP"] == r1.final["mAP"]


def test_evaluating_with_a_callers_loader_or_a_callback_that_draws_leaves_the_training_as_it_is(tmp_path):
    """A caller's ``DataLoader`` (it seeds each pass from the global RNG) and an ``on_epoch_end`` that draws shifted
    the dropout of every later step: the training depended on ``eval_every``, and a resumed run differed from an
    uninterrupted one."""
    from torch.utils.data import DataLoader

    train, val_loader = _tiny_set(64), DataLoader(_tiny_set(40, seed=1), batch_size=16)

    def losses(every, **kw):
        cfg = TrainConfig(epochs=3, batch_size=16, eval_every=every, device="cpu")
        return [h["loss"] for h in fit(_tiny_net(0.5), train, val_loader, cfg, progress=False, **kw).history]

    plain = losses(0)
    assert losses(1) == plain
    assert losses(0, on_epoch_end=lambda e, logs: torch.rand(3)) == plain

    class Stop(Exception):
        pass

    class Step:  # stops in the middle of epoch 1, as a killed kernel would
        def __init__(self, stop_at=None):
            self.n, self.stop_at = 0, stop_at

        def __call__(self, model, batch, device):
            self.n += 1
            if self.n == self.stop_at:
                raise Stop
            return nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1]), {}

    cfg = TrainConfig(epochs=3, batch_size=16, device="cpu")
    draw = lambda e, logs: torch.randint(64, ())  # noqa: E731 - a callback that picks an image at random
    full = fit(_tiny_net(0.5), train, None, cfg, step=Step(), run_dir=tmp_path / "a", progress=False, on_epoch_end=draw)
    with pytest.raises(Stop):
        fit(_tiny_net(0.5), train, None, cfg, step=Step(stop_at=6), run_dir=tmp_path / "b", progress=False,
            on_epoch_end=draw)
    resumed = fit(_tiny_net(0.5), train, None, cfg, step=Step(), run_dir=tmp_path / "b", progress=False,
                  on_epoch_end=draw)
    assert resumed.resumed_epochs and [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
