"""Profiles, the `mlic` CLI, the experiments glue and the small utilities."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlic_lib import cli
from mlic_lib.data import SceneSpec
from mlic_lib.engine import TrainConfig
from mlic_lib.models import build_model
from mlic_lib.profiles import PROFILES, chapters, load_profile, parse_overrides
from mlic_lib.utils import atomic_torch_save, atomic_write_json, config_hash, seed_everything


@pytest.mark.parametrize("chapter", chapters())
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_is_complete_and_valid(chapter, profile):
    s = load_profile(chapter, profile)
    assert s["profile"] == profile and s["chapter"] == chapter
    TrainConfig.from_dict(s["train"])  # raises on unknown or invalid options
    if "scenes" in s.get("data", {}):
        SceneSpec.from_dict(s["data"]["scenes"])
    assert s["seeds"], "a profile must name its seeds"


def test_smoke_is_smaller_than_default():
    smoke, default = load_profile("primer", "smoke"), load_profile("primer", "default")
    assert smoke["data"]["n_train"] * smoke["train"]["epochs"] < default["data"]["n_train"] * default["train"]["epochs"]


def test_overrides_and_errors():
    s = load_profile("primer", "smoke", {"train.epochs": 5, "data.scenes.n_groups": 4})
    assert s["train"]["epochs"] == 5 and s["data"]["scenes"]["n_groups"] == 4
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        load_profile("primer", "fast")
    with pytest.raises(ValueError, match="unknown profile 'smok'.*did you mean 'smoke'"):
        load_profile("primer", "smok")
    # a whole number for a decimal setting is that decimal (4 for 4.0: the same run, not another cache key)
    for over in (["psd.asl.gamma_neg=4"], {"psd.asl.gamma_neg": 4}):
        got = load_profile("psd", "smoke", over)["psd"]["asl"]["gamma_neg"]
        assert got == 4.0 and isinstance(got, float)
    assert isinstance(load_profile("primer", "smoke", ["train.epochs=3"])["train"]["epochs"], int)
    for over in (["mixing.mixed_size=4"], {"mixing.mixed_size": 4}):  # a count of mixed images, not 4x the batch
        got = load_profile("splicemix", "smoke", over)["mixing"]["mixed_size"]
        assert got == 4 and isinstance(got, int)
    with pytest.raises(ValueError, match="unknown parameter 'trian.epochs'"):
        load_profile("primer", "smoke", {"trian.epochs": 1})
    with pytest.raises(ValueError, match="no profiles for chapter"):
        load_profile("nochapter")
    # a key under a section that this profile turns off (null) switches the section on with that key
    s = load_profile("ltml", "full", {"budget_check.epochs": [16]})
    assert s["budget_check"] == {"epochs": [16]}


def test_ltml_model_options_absent_from_the_profiles_can_be_overridden():
    from mlic_lib.ltml import MODEL_KEYS

    s = load_profile("ltml", "smoke", {"model.shared_compensation": True, "model.classifier_init": "independent"})
    assert s["model"]["shared_compensation"] is True and s["model"]["classifier_init"] == "independent"
    with pytest.raises(ValueError, match="unknown parameter 'model.shared_compensaton'"):
        load_profile("ltml", "smoke", {"model.shared_compensaton": True})
    for profile in ("smoke", "default", "full"):  # every key the profiles use is one train_ltml reads
        assert set(load_profile("ltml", profile)["model"]) <= set(MODEL_KEYS)


def test_override_typos_and_wrong_types_are_caught_with_a_hint():
    with pytest.raises(ValueError, match="did you mean 'train.epochs'"):
        load_profile("primer", "smoke", {"train.epoch": 3})
    with pytest.raises(ValueError, match="did you mean 'model.backbone'"):
        load_profile("primer", "smoke", {"model.bakcbone": "resnet18"})
    with pytest.raises(ValueError, match="did you mean 'data.scenes.n_groups'"):
        load_profile("primer", "smoke", {"data.scenes.n_groupz": 3})
    # names a section's validator knows are fine even when no profile spells them out
    s = load_profile("primer", "smoke", {"train.grad_clip": 1.0, "data.scenes.n_groups": 3})
    assert s["train"]["grad_clip"] == 1.0
    load_profile("splicemix", "full", {"data.real.normalize": "none", "data.real.augment.fixed_offsets": False})
    load_profile("assocformer", "full", {"model.backbone_kwargs.drop_path_rate": 0.2})  # an open mapping
    # keys that take several types: a number or a mapping; a flag or a policy name
    assert load_profile("indeed", "full", {"indeed.lam": {"minmax": 1.0, "l2": 0.1}})["indeed"]["lam"]["l2"] == 0.1
    assert load_profile("indeed", "default", {"indeed.lam": "0.5"})["indeed"]["lam"] == 0.5
    assert load_profile("assocformer", "full", {"data.augment.randaugment": "uda"})["data"]["augment"]["randaugment"]
    with pytest.raises(ValueError, match="valid keys under 'cifar.data.augment': \\['cutout', 'randaugment'\\]"):
        load_profile("indeed", "full", {"cifar.data.augment.crop": "none"})
    # YAML 1.1 reads 1e-3 as text: it becomes the number the user meant
    assert load_profile("primer", "smoke", {"train.lr": "1e-3"})["train"]["lr"] == pytest.approx(1e-3)
    assert load_profile("primer", "smoke", {"train.epochs": "4"})["train"]["epochs"] == 4
    for key, value, match in [("train.epochs", "abc", "takes a number"), ("train.epochs", 3.5, "whole number"),
                              ("train.epochs", None, "needs a value"),
                              ("train.channels_last", "maybe", "true or false"),
                              ("train", 3, "is a section"), ("data.n_train", [1], "takes a number"),
                              ("train.milestones", [2, "x"], "takes a number")]:
        with pytest.raises(ValueError, match=match):
            load_profile("primer", "smoke", {key: value})


def test_train_config_checks_types():
    assert TrainConfig(lr="1e-3").lr == pytest.approx(1e-3) and TrainConfig(epochs=3.0).epochs == 3
    c = TrainConfig(epochs=np.int64(3), lr=np.float32(0.5), milestones=np.array([2, 3]), gamma=torch.tensor(0.5))
    assert (c.epochs, c.lr, c.milestones, c.gamma) == (3, 0.5, (2, 3), 0.5) and type(c.epochs) is int
    for kw, match in [({"lr": "fast"}, "'lr' takes a number"), ({"epochs": True}, "'epochs' takes a finite"),
                      ({"channels_last": "yes"}, "true or false"), ({"optimizer": 3}, "takes a name"),
                      ({"milestones": 40}, "list of epochs"), ({"lr": float("nan")}, "finite"),
                      ({"amp": False}, "quote the name")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw)


def test_cli_reproduce_names_one_chapter_and_checks_overrides_first(capsys):
    assert cli.main(["reproduce", "0", "--profile", "smoke"]) == 2
    assert "matches 6 chapters" in capsys.readouterr().err
    assert cli.main(["reproduce", "nope"]) == 2
    assert "name one of: primer" in capsys.readouterr().err
    assert cli.main(["reproduce", "primer", "--profile", "smoke", "-o", "train.epoch=3"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err
    assert cli.main(["reproduce", "primer", "-o", "train.epochs=[1"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["--root", "/nonexistent", "reproduce", "primer"]) == 2
    assert "run from the repository root" in capsys.readouterr().err
    assert cli.main(["--root", "/nonexistent", "book", "--skip-execute"]) == 2
    assert "no book in /nonexistent (no _config.yml): run from the repository root" in capsys.readouterr().err
    assert cli.main(["data", "check", "nope"]) == 2
    assert "known datasets: voc2007" in capsys.readouterr().err


def test_cli_reproduce_checks_the_folders_it_writes_before_a_kernel_starts(tmp_path, monkeypatch, capsys):
    """A results folder that is a file failed in the chapter's last cell, after all its training, with a bare
    FileExistsError; the message now names the variable. A read-only cache is only a note (its runs still load)."""
    import mlic_lib.book as book

    started = []
    monkeypatch.setattr(book, "execute_notebook", lambda *a, **k: started.append(a) or 0.0)
    (tmp_path / "afile").write_text("")
    for var in ("MLIC_RESULTS", "MLIC_CACHE"):
        monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "results"))
        monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv(var, str(tmp_path / "afile"))
        assert cli.main(["reproduce", "primer", "--profile", "smoke", "--out", str(tmp_path / "o" / "x.ipynb")]) == 2
        assert re.search(rf"{var}=.*afile .*(is a file|cannot be written)", capsys.readouterr().err)
    assert not started
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    assert cli.main(["reproduce", "primer", "--profile", "smoke", "--out", str(tmp_path / "o" / "x.ipynb")]) == 0
    assert len(started) == 1


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_cli_sigterm_unwinds_the_command_and_the_callers_handler_comes_back(monkeypatch, capsys, name, status):
    """SIGTERM (a scheduler, `kill`) or SIGHUP (a closed terminal: the kernel and its training pool were left running)
    during a command ends it like Ctrl-C (status 128 + the signal, one line); the handler is the caller's again after
    main returns (it stayed installed, so a later SIGTERM raised KeyboardInterrupt in the caller)."""
    import signal

    sig = getattr(signal, name, None)
    if sig is None:
        pytest.skip(f"no {name} here")

    def killed(args):
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not interrupt the command")

    def callers(signum, frame):  # the caller's own handler (not SIG_IGN: under nohup main leaves SIGHUP ignored)
        raise AssertionError("the caller's handler ran instead of main's")

    original = signal.signal(sig, callers)
    try:
        monkeypatch.setattr(cli, "_cmd_profile", killed)
        assert cli.main(["profile", "primer"]) == status
        err = capsys.readouterr().err
        assert err.startswith("mlic: terminated; a rerun loads") and "failed.ipynb" not in err
        assert signal.getsignal(sig) is callers
    finally:
        signal.signal(sig, original)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="no SIGHUP here")
def test_cli_keeps_an_ignored_sighup_ignored(monkeypatch, capsys):
    """`nohup mlic book ...` ignores SIGHUP so that the run survives its terminal closing: main must not install its
    handler over that."""
    import signal

    def hung_up(args):
        os.kill(os.getpid(), signal.SIGHUP)
        return 0

    monkeypatch.setattr(cli, "_cmd_profile", hung_up)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert cli.main(["profile", "primer"]) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_cli_profile_and_errors(capsys):
    assert cli.main(["profile", "primer", "--profile", "smoke", "-o", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2" in out and "profile: smoke" in out
    assert cli.main(["profile", "primer", "-o", "nope=1"]) == 2
    assert "unknown parameter" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["profile", "primer", "--profile", "huge"])
    assert exit_info.value.code == 2  # argparse's usage error, naming the choices
    err = capsys.readouterr().err
    assert "invalid choice" in err and "huge" in err and "smoke" in err and "full" in err


def test_cli_profile_takes_a_chapter_as_reproduce_does(capsys):
    """`mlic profile 02` used to be refused by argparse although `mlic reproduce 02` runs that chapter."""
    root = str(Path(__file__).resolve().parents[1])
    assert cli.main(["--root", root, "profile", "02", "--profile", "smoke"]) == 0
    assert "chapter: psd" in capsys.readouterr().out
    assert cli.main(["--root", root, "profile", "05_ltml", "--profile", "smoke"]) == 0
    assert "chapter: ltml" in capsys.readouterr().out
    assert cli.main(["--root", root, "profile", "0"]) == 2  # several notebooks: named, nothing printed
    captured = capsys.readouterr()
    assert "matches 6 chapters" in captured.err and captured.out == ""
    assert cli.main(["--root", root + "/tests", "profile", "primr"]) == 2  # no notebooks there: the chapters named
    assert "no chapter 'primr': name one of" in capsys.readouterr().err


def test_cli_data_check(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_DATA", str(tmp_path))
    (tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    assert cli.main(["data", "check"]) == 0  # the test tar's content alone: the trainval tar is missing
    assert "voc2007   incomplete (missing: VOCdevkit/VOC2007/ImageSets/Main/trainval.txt)" in capsys.readouterr().out
    (tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n")
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_val2014.json").write_text("{}")
    assert cli.main(["data", "check"]) == 0
    out = capsys.readouterr().out
    assert "voc2007   present" in out and "coco2017  missing" in out
    assert "coco2014  incomplete (missing: coco/train2014, coco/val2014)" in out  # annotations without images
    assert cli.main(["data", "prepare"]) == 2
    assert "name the dataset" in capsys.readouterr().err
    for action in ("check", "prepare"):  # the fake-only sizes were silently ignored here
        assert cli.main(["data", action, "voc2007", "--n-train", "100"]) == 2
        assert "--n-train only set the sizes of `mlic data fake`" in capsys.readouterr().err


def test_cli_data_dir_is_the_datasets_folder_for_every_action(capsys, tmp_path, monkeypatch):
    """`mlic data check --data-dir D` used to report $MLIC_DATA (and `prepare` to download there)."""
    monkeypatch.setenv("MLIC_DATA", str(tmp_path / "elsewhere"))
    fake = tmp_path / "fake"
    assert cli.main(["data", "fake", "voc2007", "--data-dir", str(fake), "--n-train", "10", "--n-test", "10"]) == 0
    capsys.readouterr()
    assert cli.main(["data", "check", "voc2007", "--data-dir", str(fake)]) == 0
    out = capsys.readouterr().out
    assert f"datasets under {fake}\n" in out and "voc2007   present (synthetic files" in out
    assert cli.main(["data", "check", "voc2007", "--root", str(fake)]) == 0  # the option's former name still works
    assert f"datasets under {fake}\n" in capsys.readouterr().out
    assert cli.main(["data", "check", "voc2007"]) == 1  # missing there
    out = capsys.readouterr().out
    assert f"datasets under {tmp_path / 'elsewhere'} ($MLIC_DATA)" in out and "voc2007   missing" in out


def test_cli_data_refuses_the_repository_root(capsys, tmp_path):
    """`mlic --root D data ...` names a repository: it used to be ignored silently (data read $MLIC_DATA)."""
    for action in (["check"], ["prepare", "voc2007"], ["fake", "voc2007", "--data-dir", str(tmp_path / "f")]):
        assert cli.main(["--root", str(tmp_path), "data", *action]) == 2
        err = capsys.readouterr().err
        assert "names a repository" in err and f"`mlic data {action[0]} ... --data-dir DIR`" in err
    assert not (tmp_path / "f").exists()  # nothing written


def test_atomic_writes_leave_no_partial_file(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json({"a": np.float32(1.5), "b": np.arange(3)}, target)
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [0, 1, 2]}

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    ckpt = tmp_path / "c.pt"
    atomic_torch_save({"ok": 1}, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(RuntimeError):
        atomic_torch_save({"bad": Boom()}, ckpt)
    assert ckpt.read_bytes() == before, "a failed save must leave the previous checkpoint intact"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # the permissions of a plain open() (under the umask of the tests' process), not mkstemp's owner-only 0600
    atomic_write_json({"a": 1}, tmp_path / "shared.json")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_write_survives_a_file_system_without_modes(tmp_path, monkeypatch):
    def refuse(*args):
        raise PermissionError("operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    atomic_write_json({"a": 1}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_empty_environment_paths_mean_unset(monkeypatch):
    from mlic_lib.engine import cache_root
    from mlic_lib.reporting import results_dir

    for name in ("MLIC_CACHE", "MLIC_RESULTS"):
        monkeypatch.setenv(name, "")
    assert cache_root() == Path("~/.cache/mlic/runs").expanduser()
    assert results_dir() == Path("~/.cache/mlic/results").expanduser()


def test_config_hash_stable_and_sensitive():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_scene_cache_roundtrip(tmp_path):
    from mlic_lib.experiments import cached_scenes

    spec = SceneSpec()
    a = cached_scenes(12, spec, seed=3)
    files = list((tmp_path / "cache" / "data").glob("scenes-*.npz"))
    assert len(files) == 1
    b = cached_scenes(12, spec, seed=3)
    assert "cache" in b.meta
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.targets, b.targets)
    for x, y in zip(a.boxes, b.boxes, strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_scene_run_is_keyed_by_its_training_scenes_and_a_fingerprint_by_images_labels_or_names(monkeypatch):
    """Scenes drawn otherwise than the settings say (another seed, by hand) train their own run instead of loading
    the one of the settings' scenes; the fingerprint follows pixels, labels or image names, never the container."""
    from mlic_lib import experiments
    from mlic_lib.data.fingerprint import data_fingerprint
    from mlic_lib.data.images import ImageListDataset
    from mlic_lib.data.tensors import TensorImageDataset
    from mlic_lib.engine import SupervisedStep

    seen = []
    monkeypatch.setattr(experiments, "fit", lambda model, tr, te, cfg, **kw: seen.append(kw["run_dir"]))
    settings = load_profile("primer", "smoke")
    data = experiments.scene_data(settings)
    spec = SceneSpec.from_dict(settings["data"].get("scenes", {}))
    other = experiments.cached_scenes(len(data.train.targets), spec, seed=99)
    redrawn = experiments.SceneData(other, data.test, TensorImageDataset(other.images, other.targets), data.test_ds)
    for d in (data, redrawn, experiments.scene_data(settings)):
        experiments.train_scene_model(settings, d, step=SupervisedStep())
    assert seen[0] != seen[1] and seen[2] == seen[0]
    img, t = np.zeros((4, 1, 2, 2), np.uint8), np.eye(4, 3, dtype=np.float32)
    base = data_fingerprint(TensorImageDataset(img, t))
    assert data_fingerprint(TensorImageDataset(torch.from_numpy(img), torch.from_numpy(t))) == base
    assert base != data_fingerprint(TensorImageDataset(img + 1, t))
    assert base != data_fingerprint(TensorImageDataset(img, t[::-1].copy()))
    paths = [f"/x/{i}.jpg" for i in range(4)]
    assert data_fingerprint(ImageListDataset(paths, t)) != data_fingerprint(ImageListDataset(paths[::-1], t))
    with pytest.raises(ValueError, match="no .targets: pass the training labels"):
        data_fingerprint([1, 2, 3])


def test_a_new_scene_file_format_reads_no_file_of_the_old_one(monkeypatch, tmp_path):
    """The file layout is part of the scene cache's key: after a bump, the old file is not read as the new layout."""
    from mlic_lib import experiments

    experiments.cached_scenes(4, SceneSpec(), seed=3)
    monkeypatch.setattr(experiments, "SCENES_FILE_FORMAT", experiments.SCENES_FILE_FORMAT + 1)
    assert "cache" not in experiments.cached_scenes(4, SceneSpec(), seed=3).meta  # drawn, not loaded
    assert len(list((tmp_path / "cache" / "data").glob("scenes-*.npz"))) == 2


def test_another_draw_of_the_scenes_is_part_of_the_runs_cache_key():
    """``scene_data`` took the draw as an argument, which no cache key saw: a run trained on draw 1 was stored
    under (and loaded for) draw 0's key. The draw is now the profile's ``data.data_seed``, inside every key."""
    from mlic_lib.experiments import scene_data, train_scene_model

    base = load_profile("primer", "smoke", {"data.n_train": 16, "data.n_test": 8, "train.epochs": 1})
    other = {**base, "data": {**base["data"], "data_seed": 1}}
    d0, d1 = scene_data(base), scene_data(other)
    assert not np.array_equal(d0.train.images, d1.train.images)
    r0, r1 = train_scene_model(base, d0, progress=False), train_scene_model(other, d1, progress=False)
    assert r0.run_dir != r1.run_dir and not r1.cached
    with pytest.raises(ValueError, match="data.data_seed must be a whole number"):
        scene_data({**base, "data": {**base["data"], "data_seed": -1}})


def test_library_digest_does_not_follow_the_imported_modules():
    """No digest depends on the process's import history (a default that did gave runs process-dependent keys):
    importing another module changes neither the digest without roots nor a config hash."""
    import subprocess
    import sys

    code = ("import mlic_lib.utils as u; a, h = u.library_digest(), u.config_hash({'x': 1}); import mlic_lib.metrics; "
            "print(a == u.library_digest(), h == u.config_hash({'x': 1}), a != u.library_digest(['mlic_lib.metrics']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True"]


def test_library_digest_of_named_modules_ignores_the_import_history():
    """With ``roots`` the digest covers the static import closure, so two processes that imported different
    modules (``mlic teachers`` and a chapter's kernel) agree on a teacher's cache key."""
    import subprocess
    import sys

    from mlic_lib.utils import _PACKAGE_DIR, library_digest, static_import_closure

    closure = {str(f.relative_to(_PACKAGE_DIR)) for f in static_import_closure(["mlic_lib.data.real"])}
    assert {"data/real.py", "data/coco.py", "data/longtail.py", "data/presets.py", "__init__.py"} <= closure  # relative
    assert "book.py" not in closure and "cli.py" not in closure
    psd_closure = {str(f.relative_to(_PACKAGE_DIR)) for f in static_import_closure(["mlic_lib.psd"])}
    assert {"psd.py", "engine.py", "losses.py", "partition.py", "models/backbones.py"} <= psd_closure
    code = "import {mods}; import mlic_lib.utils as u; print(u.library_digest(['mlic_lib.psd']))"
    outs = {subprocess.run([sys.executable, "-c", code.format(mods=m)], capture_output=True, text=True,
                           check=True).stdout.strip() for m in ("mlic_lib.cli, mlic_lib.book", "mlic_lib.analysis")}
    assert outs == {library_digest(["mlic_lib.psd"])}


def test_a_key_is_refused_when_the_code_this_process_runs_changed_on_disk(tmp_path):
    """An edit (or a ``git pull``) under an open kernel used to key the kernel's old code by the new files, so its
    results were cached, and later loaded, as the new code's. Run on a copy of the package, edited in place."""
    import shutil
    import subprocess
    import sys

    from mlic_lib.utils import _PACKAGE_DIR

    shutil.copytree(_PACKAGE_DIR, tmp_path / "mlic_lib", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import pathlib, mlic_lib.metrics as m, mlic_lib.utils as u\n"
            "def edit(name, text='X = 1'):\n"
            "    f = pathlib.Path(u._PACKAGE_DIR, name); f.write_text(f.read_text() + '\\n' + text + '\\n')\n"
            "u.library_digest(['mlic_lib.metrics'])\n"
            "edit('metrics.py', '# a comment'); u.library_digest(['mlic_lib.metrics'])\n"
            "print('a comment changes no code')\n"
            "edit('indeed.py'); u.library_digest(['mlic_lib.indeed']); print('a module not imported may change')\n"
            "edit('metrics.py'); u.library_digest(['mlic_lib.data.scenes']); print('keys without it stand')\n"
            "u.library_digest(['mlic_lib.metrics'])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode == 1, run.stderr
    assert run.stdout.split("\n")[:3] == ["a comment changes no code", "a module not imported may change",
                                          "keys without it stand"]
    assert "RuntimeError: mlic_lib/metrics.py changed on disk after this process imported mlic_lib" in run.stderr
    assert "Restart the kernel" in run.stderr


def test_run_keys_are_the_same_in_every_process():
    """Every training entry point names its code, so a chapter's kernel (which imports the figures and the
    reporting too), a pool worker and a bare script agree on a run's cache folder, and the key covers the
    method's and the data's code but not unrelated modules."""
    import subprocess
    import sys

    from mlic_lib.engine import DATA_CODE
    from mlic_lib.utils import _PACKAGE_DIR, static_import_closure

    code = ("import {mods}; from mlic_lib.profiles import load_profile; from mlic_lib.splicemix_cl import "
            "method_run_dir; print(method_run_dir(load_profile('splicemix', 'smoke', {{}}), 'splicemix', 1).name)")
    outs = {subprocess.run([sys.executable, "-c", code.format(mods=m)], capture_output=True, text=True,
                           check=True).stdout.strip() for m in ("mlic_lib", "mlic_lib.analysis, mlic_lib.reporting")}
    assert len(outs) == 1 and outs.pop().startswith("splicemix-splicemix-s1-")
    covered = {str(f.relative_to(_PACKAGE_DIR)) for f in static_import_closure(("mlic_lib.splicemix_cl", *DATA_CODE))}
    assert {"splicemix_cl.py", "mixing.py", "engine.py", "data/scenes.py", "data/tensors.py", "data/voc.py"} <= covered
    assert not {"reporting.py", "analysis/plots.py", "ltml.py", "psd.py", "book.py"} & covered


@pytest.mark.parametrize("chapter", ["splicemix", "psd"])
def test_run_keys_leave_out_where_and_how_fast_a_run_is_computed(chapter):
    """More data workers, another device or memory layout, or another evaluation cadence find the same trained run
    (RUN_CONFIG_IGNORED); a recipe change (lr) is another run. PSD's teachers, trained by `mlic teachers` with
    its own workers, must be found by the chapter."""
    from mlic_lib import psd
    from mlic_lib.engine import RUN_KEY_IGNORED
    from mlic_lib.splicemix_cl import method_run_dir

    def run_dir(over):
        settings = load_profile(chapter, "smoke", over)
        if chapter == "psd":
            return psd._teacher_spec(settings, [0, 1], seed=0).run_dir()
        return method_run_dir(settings, "splicemix", 0)

    same = {"train.num_workers": 7, "train.device": "cpu", "train.channels_last": True, "train.log_every": 5,
            "train.eval_batch_size": 17}
    assert set(k.split(".")[1] for k in same) == set(RUN_KEY_IGNORED)
    assert run_dir(same) == run_dir({})
    assert run_dir({"train.lr": 0.123}) != run_dir({})
    assert run_dir({"train.eval_every": 3}) != run_dir({})  # another cadence: another history (the curves)


def test_static_closure_names_outside_the_package_root_and_misspelt_modules():
    from mlic_lib.utils import _PACKAGE_DIR, static_import_closure

    assert static_import_closure(["torch.nn", "data", "__main__"]) == {_PACKAGE_DIR / "__init__.py"}
    assert static_import_closure(["mlic_lib"]) == static_import_closure([])
    with pytest.raises(ValueError, match="no mlic_lib module 'mlic_lib.splicemix'"):
        static_import_closure(["mlic_lib.splicemix"])  # misspelt: its code would silently leave the key


def test_cli_teachers_trains_once_then_finds_them_cached(capsys, tmp_path):
    assert cli.main(["--root", str(tmp_path), "teachers", "--profile", "smoke"]) == 0
    first = capsys.readouterr().out
    assert "rank 0 of 1: trained" in first and "trained 0 teacher" not in first
    assert cli.main(["--root", str(tmp_path), "teachers", "--profile", "smoke"]) == 0
    again = capsys.readouterr().out
    assert "trained 0 teacher(s)" in again and "teachers cached under" in again and "set MLIC_CACHE=" in again


@pytest.mark.parametrize("override, message", [
    ("psd.kd_images=bogus", r"psd.kd_images must be one of \('subtask', 'all'\)"),
    ("psd.cpsd_k=2.5", "psd.cpsd_k must be a whole number"),
    ("psd.cpsd_k=3", r"psd.cpsd_k \(3\) must be one of psd.ks"),
    ("psd.ks=[1]", r"psd.cpsd_k \(2\) must be one of psd.ks"),
    ("psd.parallel=gpu", "psd.parallel must be one of"),
    ("psd.ks=[1, 0]", "psd.ks must be a non-empty list"),
    ("psd.tau=0", r"psd.tau must be a number > 0"),
])
def test_psd_option_values_are_checked_before_anything_trains(override, message, capsys, tmp_path):
    """These used to pass the profile check: `mlic teachers` then trained every teacher before the chapter failed
    (kd_images), or the chapter looked up a key that int() had rounded (cpsd_k=2.5)."""
    with pytest.raises(ValueError, match=message):
        load_profile("psd", "smoke", parse_overrides([override]))
    assert cli.main(["--root", str(tmp_path), "teachers", "--profile", "smoke", "-o", override]) == 2
    out = capsys.readouterr()
    assert "mlic: error: psd." in out.err and "trained" not in out.out


def test_cli_book_only_builds_a_partial_book_without_strict(monkeypatch, capsys):
    import mlic_lib.book

    calls = []
    monkeypatch.setattr(mlic_lib.book, "build_book", lambda *a, **kw: calls.append((a, kw)))
    assert cli.main(["book", "--profile", "smoke", "--only", "primer"]) == 0
    assert calls[-1][1]["strict"] is False and "partial book" in capsys.readouterr().out
    assert cli.main(["book", "--profile", "smoke"]) == 0
    assert calls[-1][1]["strict"] is True


def test_library_digest_ignores_docstrings_comments_and_layout(tmp_path, monkeypatch):
    """A cache key follows what the code does: a docstring, comment or layout edit keeps it (no retraining), any
    change to a statement, a constant or a string that is not a docstring changes it."""
    import os

    import mlic_lib.utils as u

    (tmp_path / "__init__.py").write_text('"""Package."""\nfrom mlic_lib import method\n')
    method = tmp_path / "method.py"
    monkeypatch.setattr(u, "_PACKAGE_DIR", tmp_path)

    def digest(src: str) -> str:
        method.write_text(src)
        st = method.stat()
        os.utime(method, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new version for the file cache
        return u.library_digest(["mlic_lib.method"])

    base = digest('"""Module."""\n\n\nclass A:\n    """A."""\n\n    def f(self, x):\n        """Eq. 1."""\n'
                  '        return x + 1  # plus one\n')
    same = ['"""Module, reworded."""\nclass A:\n    """Another text."""\n    def f(self, x):\n'
            '        """Eq. 2, really."""\n        # a comment\n        return (x +\n                1)\n',
            'class A:\n    def f(self, x):\n        return x + 1\n']
    changed = ['"""Module."""\nclass A:\n    def f(self, x):\n        return x + 2\n',
               '"""Module."""\nclass A:\n    def f(self, y):\n        return y + 1\n',
               '"""Module."""\nclass A:\n    def f(self, x):\n        "Eq. 1."\n        x = "text"\n        return x\n',
               '"""Module."""\nclass A:\n    def f(self, x):\n        return x + 1\nB = "doc-like string"\n']
    assert [digest(s) for s in same] == [base, base]
    assert len({base, *[digest(s) for s in changed]}) == 1 + len(changed)


def test_a_mapping_override_is_merged_into_its_section_key_by_key():
    """``{"train": {"epochs": 3}}`` used to replace the whole section: the run silently lost its lr, batch size and
    scheduler and trained with TrainConfig's defaults."""
    base = load_profile("primer", "smoke")
    merged = load_profile("primer", "smoke", {"train": {"epochs": 3}})
    assert merged["train"] == {**base["train"], "epochs": 3}
    assert load_profile("primer", "smoke", ["train={epochs: 3}"])["train"] == merged["train"]  # the CLI's form
    nested = load_profile("primer", "smoke", {"data": {"n_train": 100, "scenes": {"max_objects": 3}}})
    assert nested["data"] == {**base["data"], "n_train": 100, "scenes": {**base["data"]["scenes"], "max_objects": 3}}
    with pytest.raises(ValueError, match=r"unknown parameter 'train.epoch' .*did you mean 'train.epochs'"):
        load_profile("primer", "smoke", {"train": {"epoch": 3}})  # each key is checked
    # {} replaces a section (its code's defaults): CPSD's teachers with the students' recipe
    assert load_profile("psd", "smoke", {"teacher_train": {}})["teacher_train"] == {}
    # a value table is given whole, not merged: grids={2x2: 1} is only 2x2 grids
    assert load_profile("splicemix", "smoke", ["mixing.grids={2x2: 1.0}"])["mixing"]["grids"] == {"2x2": 1.0}
    assert load_profile("splicemix", "smoke", {"mixing": {"grids": ["2x2"]}})["mixing"]["grids"] == ["2x2"]
    # a section a profile turns off (null) is turned on with the given keys; a value of mixed type is replaced
    sweep = {"lams": [0.1], "n_labels": [2], "seeds": [0], "data_seed": 1}
    assert load_profile("indeed", "default", {"lambda_sweep": sweep})["lambda_sweep"] == sweep
    assert load_profile("indeed", "full", {"indeed.lam": {"minmax": 0.2, "l2": 1.0}})["indeed"]["lam"] == {
        "minmax": 0.2, "l2": 1.0}


@pytest.mark.parametrize("overrides", [["train.epochs=3", "seeds=[0, 1]"], "train.epochs=3"])
def test_overrides_in_the_cli_form_are_accepted(overrides):
    s = load_profile("primer", "smoke", overrides)
    assert s["train"]["epochs"] == 3 and (s["seeds"] == [0, 1] or isinstance(overrides, str))


@pytest.mark.parametrize("chapter, overrides, message", [
    ("primer", 5, r"overrides must be a mapping like \{'train.epochs': 3\}.*got int"),
    ("primer", ["train.epochs"], r"'train.epochs' must look like key=value"),
    ("primer", {"seeds": 3}, r"'seeds' takes a list \(like \[0\]\), got 3; .* -o seeds=\[3\]"),
    ("primer", {"data.n_train": None}, r"'data.n_train' cannot be null"),
    ("primer", {"train.epochs": 0}, r"^train: epochs and batch_size must be positive"),
    ("primer", {"train.optimizer": "adamw2"}, r"^train: optimizer must be one of"),
    ("primer", {"train.ema_decay": 2}, r"^train: ema_decay must be in"),
    ("primer", {"train.lr": -1}, r"^train: lr must be a finite number > 0 and weight_decay >= 0, got -1.0 and"),
    ("primer", {"train.weight_decay": -0.1}, r"^train: lr must be .* got 0.003 and -0.1"),
    ("psd", {"teacher_train.epochs": -1}, r"^teacher_train: epochs and batch_size must be positive"),
    ("indeed", {"indeed.pairing": "foo"}, r"indeed.pairing must be one of \('disjoint', 'each'\), got 'foo'"),
    ("indeed", {"indeed.parallel": "threads"}, r"indeed.parallel must be one of"),
    ("indeed", {"indeed.lam": -0.5}, r"indeed.lam must be a number >= 0"),
    ("indeed", {"indeed.lam": {"minmax": 0.1, "l1": 1.0}}, r"a value for each normalisation .* got \{'minmax'"),
    ("indeed", {"indeed": {"lam": {"minmax": 0.2}}}, r"a value for each normalisation the chapter trains"),
    ("splicemix", {"methods": ["baseline", "foo"]}, r"methods: unknown method\(s\) \['foo'\]"),
    ("splicemix", {"methods": ["baseline", "baseline"]}, r"methods names a method twice"),
    ("splicemix", {"regime_check.methods": ["baseline"]}, r"must include baseline and splicemix"),
    ("splicemix", {"regime_check.epochs": 0}, r"regime_check.epochs must be a whole number >= 1"),
    ("splicemix", {"methods": ["baseline", "mixup"]}, r"regime_check.methods \['splicemix'\] are not in methods"),
    ("splicemix", {"mixing.cl_form": 123}, r"^mixing: cl_form must be one of \('bce', 'kl'\), got 123"),
    ("splicemix", {"mixing.p_drop": 7}, r"^mixing: p_drop must be a probability in \[0, 1\], got 7"),
    ("splicemix", {"mixing.alpha": 0}, r"^mixing: alpha must be positive, got 0"),
    ("splicemix", {"mixing.cl_weight": -1}, r"^mixing: cl_weight must be >= 0, got -1"),
    ("splicemix", {"parallel": "threads"}, r"^parallel must be one of \('auto', 'sequential', 'process'\)"),
    ("primer", {"model.backbone": "resnet152"}, r"unknown backbone 'resnet152'; choose small_resnet, resnet18"),
    ("splicemix", {"model": {"backbone": "timm/no_such_net"}}, r"timm has no model 'no_such_net'"),
    ("psd", {"model.backbone": "small_resnt"}, r"unknown backbone 'small_resnt'"),
    ("ltml", {"model.backbone": "efficientnet_lite0"}, r"backbone must be small_resnet or one of resnet18"),
    ("assocformer", {"model.backbone": "cvt_13"}, r"timm has no model 'cvt_13' \(CvT is not in timm"),
    ("indeed", {"model.name": "vgg19"}, r"model.name must be 'simple_cnn' \(ML-MNIST\) or 'vgg16'"),
    ("psd", {"data": None}, r"'data' is a section that no profile turns off: null is not accepted; .* -o data\."),
    ("splicemix", {"train": None}, r"'train' is a section that no profile turns off"),
    ("ltml", {"data.head_min": "abc"}, r"'data.head_min' takes a number \(like 100\), got 'abc'"),
    ("indeed", {"lambda_sweep": "abc"}, r"'lambda_sweep' is a section, not a value"),
    ("psd", {"data.n_train": -5}, r"data.n_train must be a whole number of images >= 1, got -5"),
    ("ltml", {"data.n_test": 0}, r"data.n_test must be a whole number of images >= 1, got 0"),
    ("assocformer", {"data.n_test": 2.5}, r"data.n_test must be a whole number of images >= 1, got 2.5"),
    ("splicemix", {"data.n_bias_test": 0}, r"data.n_bias_test must be a whole number of images >= 1"),
    ("primer", {"data.scenes": None}, r"'data.scenes' is a section that no profile turns off"),
    ("splicemix", {"data.scenes": 5}, r"data.scenes must be a mapping \(\{\} for the defaults\)"),
    ("psd", {"data.scenes.canvas": -3}, r"^data.scenes: scale_range .* fit the -3px canvas"),
    ("psd", {"data.data_seed": -1}, r"data.data_seed must be a whole number >= 0, got -1"),
    ("psd", {"data.dta_seed": 1}, r"unknown parameter 'data.dta_seed' .*did you mean 'data.data_seed'"),
    ("indeed", {"data.downsample": 0}, r"data.downsample must be a whole number >= 1"),
    ("ltml", {"model.shared_compensation": "maybe"}, r"model.shared_compensation takes true or false, got 'maybe'"),
    ("ltml", {"model.shared_compensation": "false"}, r"model.shared_compensation takes true or false"),
    ("ltml", {"model.classifier_init": "foo"}, r"model.classifier_init must be one of \('copy', 'independent'\)"),
    ("ltml", {"model.pool": "sum"}, r"model.pool must be one of \('max', 'avg'\)"),
    ("ltml", {"model.frozen_stages": -1}, r"model.frozen_stages must be a whole number >= 0"),
    ("ltml", {"ltml.samples_per_class": 0}, r"ltml.samples_per_class must be a whole number >= 1, got 0"),
    ("ltml", {"ltml.lam": -0.1}, r"ltml.lam must be a number >= 0"),
    ("ltml", {"ltml.lambda_sweep": [0.1, -1]}, r"ltml.lambda_sweep must be a non-empty list of numbers >= 0"),
    # the Fig. 6 cell iterates the sweep and takes its best value: null or [] failed after Table 2 had trained
    ("ltml", {"ltml.lambda_sweep": None}, r"ltml.lambda_sweep must be a non-empty list .*got None"),
    ("ltml", {"ltml.lambda_sweep": []}, r"ltml.lambda_sweep must be a non-empty list .*got \[\]"),
    ("ltml", {"ltml.epoch_length": 2.5}, r"ltml.epoch_length must be null .*'db' .*whole number of steps >= 1"),
    ("ltml", {"ltml.epoch_length": "dbb"}, r"ltml.epoch_length must be null"),
    ("ltml", {"ltml.epoch_length": 0}, r"ltml.epoch_length must be null"),
    # Fig. 3's verdicts read ks from the smallest k to the largest ([1, 8, 5] divided by zero after the training)
    ("psd", {"psd.ks": [1, 8, 5]}, r"psd.ks must be in ascending order without repeats.*e\.g\. \[1, 5, 8\]"),
    ("psd", {"psd.ks": [1, 2, 2, 5]}, r"psd.ks must be in ascending order without repeats"),
    # Eq. 4's ASL options failed only when the first teacher started (in a pool worker or a torchrun rank)
    ("psd", {"psd.asl.clip": 2.0}, r"^psd.asl: clip"),
    ("psd", {"psd.asl.gamma_neg": -1.0}, r"^psd.asl: "),
    # the notebooks read these sections key by key: {} failed with a KeyError after the training
    ("psd", {"analysis": {}}, r"analysis=\{\} would drop every setting of the section.*-o analysis\.cam_images="),
    ("psd", {"psd": {}}, r"psd=\{\} would drop every setting"),
    ("ltml", {"train": {}}, r"train=\{\} would drop every setting"),
    ("primer", {"model.pool": "foo"}, r"model.pool must be one of \('max', 'avg'\) .*got 'foo'"),
    ("splicemix", {"model.pool": "foo"}, r"model.pool must be one of"),
    ("indeed", {"n_labels": [10]}, r"n_labels must be a non-empty list of label counts N from 1 to 9"),
    ("indeed", {"ablation_n_labels": [0]}, r"ablation_n_labels must be a non-empty list of label counts"),
    ("assocformer", {"analysis.regularizers": ["l2", "foo"]}, r"analysis.regularizers must be a non-empty list of "
                                                             r"distinct names from"),
    # the chapter compares with none and builds on l2: without them it used to fail after every run had trained
    ("assocformer", {"analysis.regularizers": ["none", "l1"]},
     r"must include \['l2'\] .* e\.g\. \['l2', 'none', 'l1'\]"),
    ("assocformer", {"analysis.regularizers": ["l2"]}, r"must include \['none'\]"),
    ("psd", {"psd.complement": "identity"}, r"psd.complement: 'identity' is Eq. 1 as printed"),
    # a repeated seed loaded one run twice: a spread of 0, and verdicts "beyond the seed spread" from one run
    ("assocformer", {"seeds": [0, 0]}, r"'seeds' repeats a seed \(\[0, 0\]\).*give distinct seeds"),
    ("psd", {"psd.random_seeds": [1, 1]}, r"'psd.random_seeds' repeats a seed"),
    ("indeed", {"lambda_sweep.seeds": [0, 0]}, r"'lambda_sweep.seeds' repeats a seed"),
    ("primer", {"seeds": []}, r"'seeds' must be a non-empty list of seeds, e\.g\. -o seeds=\[0,1\]"),
    ("ltml", {"seeds": None}, r"'seeds' must be a non-empty list of seeds"),
    ("splicemix", {"analysis.ratio_seeds": [0.5]}, r"'analysis.ratio_seeds' takes whole numbers"),
    # failed only after training (no image to score: n=-3)
    ("splicemix", {"analysis.cam_images": -3}, r"'analysis.cam_images' is a count: give a whole number >= 1 .*got -3"),
    ("primer", {"analysis.cam_images": 0}, r"'analysis.cam_images' is a count"),
    ("ltml", {"seeds": [-1]}, r"'seeds' takes whole numbers >= 0"),
])
def test_override_values_are_checked_before_a_kernel_starts(chapter, overrides, message):
    """These passed `mlic profile` and `mlic reproduce`'s check, and failed cells later (after the data was built,
    or 30 s into a run), with messages that did not name the key."""
    with pytest.raises(ValueError, match=message):
        load_profile(chapter, "smoke", overrides)


@pytest.mark.parametrize("chapter, profile, overrides, message", [
    # every chapter trains {**train, "seed": s} for each s of its seed list: train.seed=5 trained seed 0 again
    ("primer", "smoke", {"train.seed": 5}, r"'train.seed' is not read: .* e\.g\. -o seeds=\[5\]"),
    ("psd", "smoke", {"teacher_train.seed": 3}, r"'teacher_train.seed' is not read"),
    # full's lambda_sweep is null: a partial section failed with a KeyError after the chapter's training
    ("indeed", "full", {"lambda_sweep.lams": [0.1, 0.3]}, r"lambda_sweep must be null or a mapping .*missing "
                                                         r"\['data_seed', 'n_labels', 'seeds'\]"),
    ("indeed", "smoke", {"lambda_sweep.lams": [-1]}, r"lambda_sweep.lams must be a non-empty list of numbers >= 0"),
    ("indeed", "smoke", {"lambda_sweep.data_seed": 0.5}, r"lambda_sweep.data_seed must be a whole number >= 0"),
    ("indeed", "smoke", {"lambda_sweep.n_labels": [12]}, r"lambda_sweep.n_labels must be a non-empty list"),
    ("indeed", "smoke", {"data.source": "mnsit"}, r"data.source must be one of .*did you mean 'mnist'"),
    ("indeed", "smoke", {"data.downsample": 3}, r"data.downsample=3 does not divide the 28-pixel cells .*\[1, 2, 4, "
                                                r"7, 14, 28\]"),
    ("indeed", "full", {"data.downsample": 3}, r"does not divide the 28-pixel cells of the mnist canvases"),
    ("indeed", "full", {"cifar.data.downsample": 3}, r"cifar.data.downsample=3 does not divide the 32-pixel cells"),
    ("indeed", "full", {"cifar.data.source": "cifar100"}, r"cifar.data.source must be one of .*did you mean 'cifar10'"),
    ("indeed", "smoke", {"n_labels": [2, 2]}, r"n_labels repeats a label count \(\[2, 2\]\).*\[2\]"),
    # model.weights failed at the first model build, after the data had loaded (on full, COCO/VOC)
    ("primer", "full", {"model.weights": "imagnet"}, r"model.weights must be null .*did you mean 'imagenet'"),
    ("splicemix", "full", {"model.weights": "none"}, r"model.weights must be null .*-o model.weights=null"),
    ("psd", "full", {"model.backbone": "small_resnet"}, r"small_resnet has no pretrained weights"),
    # with data.n_train null the chapter takes the split file's groups, and printed these thresholds over them
    ("ltml", "full", {"data.head_min": 50}, r"data.head_min=50: on the whole voc_lt training set .*data.n_train"),
    ("ltml", "full", {"data.tail_max": 10}, r"data.tail_max=10: on the whole"),
    # scene options no profile sets had no reference type: raw strings and fractions reached SceneSpec
    ("primer", "smoke", {"data.scenes.world_seed": "abc"}, r"'data.scenes.world_seed' takes a number"),
    ("primer", "smoke", {"data.scenes.world_seed": -1}, r"'data.scenes.world_seed' takes a whole number >= 0"),
    ("primer", "smoke", {"data.scenes.n_digits": 5.5}, r"'data.scenes.n_digits' takes a whole number"),
    # lists of counts: 2.5 epochs trained 2, lowres 1.5 failed after section 3's training
    ("ltml", "smoke", {"budget_check.epochs": [2.5]}, r"'budget_check.epochs' is a list of counts: give whole"),
    ("ltml", "smoke", {"budget_check.epochs": [0]}, r"'budget_check.epochs' is a list of counts"),
    ("splicemix", "smoke", {"analysis.lowres": [1.5]}, r"'analysis.lowres' is a list of counts"),
    ("assocformer", "smoke", {"analysis.cost_classes": [0]}, r"'analysis.cost_classes' is a list of counts"),
    ("assocformer", "smoke", {"analysis.cost_dim": 0}, r"'analysis.cost_dim' is a count"),
    # a real dataset asked of a scenes profile blamed data.scenes, which the user did not give
    ("ltml", "default", {"data.dataset": "coco_lt"}, r"profile 'default' runs on the embedded scenes.*use --profile "
                                                      r"full -o data.dataset=coco_lt"),
    # a real dataset's option on a scenes profile was never read, yet its runs' keys changed: all retrained
    ("psd", "default", {"data.image_size": 224}, r"'data.image_size' is not read with profile 'default' of chapter "
                                                 r"'psd'.*a setting of profile full"),
    ("assocformer", "smoke", {"data.augment.cutout": 0.3}, r"'data.augment.cutout' is not read with profile 'smoke'"),
    ("ltml", "default", {"data.split_dir": "/x"}, r"'data.split_dir' is not read"),
    # cifar.* on a profile without ML-CIFAR-10 made a partial section: Table 2's cell failed after all other runs
    ("indeed", "default", {"cifar.train.epochs": 5}, r"cifar .* needs its data, model and train sections \(missing "
                                                     r"\['data', 'model'\]\).*--profile full"),
    # NaN passed the methods' own checks (alpha <= 0, cl_weight < 0): NaN losses, or a failed t-SNE after training
    ("splicemix", "smoke", ["mixing.alpha=nan"], r"mixing.alpha must be a finite number > 0 .*got nan"),
    ("splicemix", "smoke", ["mixing.cl_weight=nan"], r"mixing.cl_weight must be a finite number >= 0 .*got nan"),
    ("splicemix", "smoke", ["mixing.fill=nan"], r"mixing.fill must be a finite number \(the pixel value"),
    ("splicemix", "smoke", ["analysis.tsne_perplexity=-1"], r"analysis.tsne_perplexity must be a finite number > 0 "
                                                            r".*got -1"),
    ("splicemix", "smoke", ["analysis.tsne_perplexity=nan"], r"analysis.tsne_perplexity must be a finite number > 0"),
    ("splicemix", "smoke", ["analysis.ratio_min_frac=nan"], r"ratio_min_frac must be a finite number >= 0 and <= 1"),
    ("splicemix", "smoke", ["analysis.ratio_min_frac=1.5"], r"ratio_min_frac must be a finite number >= 0 and <= 1"),
    # channels and hidden units failed only when the model was built
    ("splicemix", "smoke", ["model.widths=[8,16.5,32,64]"], r"'model.widths' is a list of counts: give whole numbers "
                                                            r">= 1.*got \[8, 16.5, 32, 64\]"),
    ("psd", "smoke", ["model.widths=[8,0,32,64]"], r"'model.widths' is a list of counts"),
    ("indeed", "smoke", ["model.widths=[8,16.5,16]"], r"'model.widths' is a list of counts"),
    ("indeed", "smoke", ["model.hidden=2.5"], r"'model.hidden' is a count: give a whole number >= 1 .*got 2.5"),
    ("indeed", "full", ["cifar.model.hidden=0"], r"'cifar.model.hidden' is a count"),
    # AssocFormer's loss (Eqs. 8-9) checked its clip and reduction when the first run started
    ("assocformer", "smoke", ["loss.clip=5"], r"^loss: clip \(probability margin m\) must be in \[0, 1\).*got 5"),
    ("assocformer", "smoke", ["loss.reduction=no"], r"^loss: reduction must be 'mean' \(Eq. 8\) or 'sum'.*got False"),
    ("assocformer", "smoke", ["loss.reduction=none"], r"^loss: reduction must be 'mean'"),
    ("assocformer", "smoke", ["loss.gamma_neg=-1"], r"^loss: gamma_neg must be a finite number >= 0"),
    ("assocformer", "smoke", ["loss.theta=nan"], r"^loss: theta \(regulariser weight\) must be a finite number"),
])
def test_overrides_that_were_ignored_or_failed_after_training_are_refused(chapter, profile, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_profile(chapter, profile, overrides)


def test_the_new_checks_leave_legitimate_values_alone(tmp_path):
    assert load_profile("primer", "smoke", {"train.seed": 0})["train"]["seed"] == 0  # restating it is harmless
    assert load_profile("primer", "smoke", {"data.scenes.world_seed": 7.0})["data"]["scenes"]["world_seed"] == 7
    assert load_profile("primer", "smoke", {"data.scenes.p_bias": "1e-1"})["data"]["scenes"]["p_bias"] == 0.1
    sweep = {"lams": [0.1, 1], "n_labels": [2, 7], "seeds": [0], "data_seed": 1}
    assert load_profile("indeed", "full", {"lambda_sweep": sweep})["lambda_sweep"] == sweep
    assert load_profile("indeed", "smoke", {"lambda_sweep": None})["lambda_sweep"] is None
    assert load_profile("indeed", "smoke", {"data.downsample": 4})["data"]["downsample"] == 4
    assert load_profile("indeed", "full", {"cifar.train.epochs": 5})["cifar"]["train"]["epochs"] == 5
    assert load_profile("indeed", "full", {"cifar": None})["cifar"] is None
    assert load_profile("ltml", "smoke", {"data.head_min": 30})["data"]["head_min"] == 30  # read on the scenes too
    assert load_profile("splicemix", "full", {"data.real.n_train": 50})["data"]["real"]["n_train"] == 50
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    for w in ("imagenet", None, str(weights)):
        assert load_profile("primer", "full", {"model.weights": w})["model"]["weights"] == w
    # a whole number written 2.0 is the int the profile has: the chapters name runs after it ("cgpd-2", not
    # "cgpd-2.0", which missed psd.run_study's students after the training)
    epochs = load_profile("ltml", "smoke", {"budget_check.epochs": [2.0, 3]})["budget_check"]["epochs"]
    assert epochs == [2, 3] and all(type(e) is int for e in epochs)
    psd = load_profile("psd", "smoke", ["psd.cpsd_k=2.0", "psd.ks=[1,2.0]", "seeds=[0.0]"])
    assert [type(v) for v in (psd["psd"]["cpsd_k"], *psd["psd"]["ks"], *psd["seeds"])] == [int] * 4
    assert type(load_profile("ltml", "smoke", {"ltml.samples_per_class": 2.0})["ltml"]["samples_per_class"]) is int
    assert load_profile("psd", "smoke", {"psd.tau": 2})["psd"]["tau"] == 2.0  # a float setting stays a float
    assert load_profile("psd", "smoke", {"teacher_train": {}})["teacher_train"] == {}  # every key has a default
    # a relative weights file is read by the kernel in notebooks/, not where `mlic reproduce` checks: not refused
    assert load_profile("primer", "full", {"model.weights": "r50.pth"})["model"]["weights"] == "r50.pth"
    # the full profile's ML-CIFAR-10 section given to a CPU profile restates its seed: not a seed override
    import copy

    from mlic_lib.profiles import _read

    cifar = copy.deepcopy(_read("indeed")["full"]["cifar"])
    assert load_profile("indeed", "default", {"cifar": cifar})["cifar"]["train"]["seed"] == cifar["train"]["seed"]
    mixing = load_profile("splicemix", "smoke", ["mixing.alpha=1e-1", "mixing.cl_weight=0", "mixing.fill=0"])["mixing"]
    assert (mixing["alpha"], mixing["cl_weight"], mixing["fill"]) == (0.1, 0.0, 0.0)
    assert load_profile("splicemix", "smoke", ["analysis.tsne_perplexity=30"])["analysis"]["tsne_perplexity"] == 30.0
    assert load_profile("psd", "smoke", ["model.widths=null"])["model"]["widths"] is None  # build_model's default
    assert load_profile("indeed", "smoke", ["model.widths=[8,16,16.0]", "model.hidden=64"])["model"] == {
        "name": "simple_cnn", "widths": [8, 16, 16], "hidden": 64}
    loss = load_profile("assocformer", "smoke", ["loss.clip=0.05", "loss.reduction=sum", "loss.gamma_neg=4"])["loss"]
    assert (loss["clip"], loss["reduction"], loss["gamma_neg"]) == (0.05, "sum", 4.0)


def test_numbers_written_as_text_inside_lists_and_mappings_are_numbers():
    """YAML 1.1 reads 1e-1 as text: a value given alone became a number, but one inside a list or mapping stayed a
    string, which the sections' checks refused (or a mapping like mixing.grids kept). Other text stays text."""
    assert load_profile("ltml", "smoke", ["ltml.lambda_sweep=[1e-1,1]"])["ltml"]["lambda_sweep"] == [0.1, 1]
    ks = load_profile("psd", "smoke", ["psd.ks=[1,2e0,5]"])["psd"]["ks"]
    assert ks == [1, 2, 5] and all(type(k) is int for k in ks)  # whole numbers stay whole (run names)
    assert load_profile("indeed", "smoke", ["indeed.lam={minmax: 3e-1, l2: 1}"])["indeed"]["lam"] == {
        "minmax": 0.3, "l2": 1}
    sweep = load_profile("indeed", "smoke", ["lambda_sweep={lams: [1e-1, 1], n_labels: [2], seeds: [0], "
                                             "data_seed: 1}"])["lambda_sweep"]
    assert sweep["lams"] == [0.1, 1]
    assert load_profile("splicemix", "smoke", ["mixing.grids={1x2: 5e-1, 2x2: 5e-1}"])["mixing"]["grids"] == {
        "1x2": 0.5, "2x2": 0.5}
    assert load_profile("splicemix", "smoke", ["methods=[baseline, splicemix]"])["methods"] == ["baseline",
                                                                                                "splicemix"]



def test_sections_with_defaults_may_be_emptied_and_a_subset_may_set_its_own_groups():
    """{} keeps the code's defaults of a section whose every key has one (ASL's parameters); LTML's head/tail
    thresholds are refused on the whole real set only, not on a subset (data.n_train)."""
    assert load_profile("psd", "smoke", {"psd.asl": {}})["psd"]["asl"] == {}
    subset = load_profile("ltml", "full", {"data.n_train": 500, "data.head_min": 50, "data.tail_max": 10})["data"]
    assert (subset["n_train"], subset["head_min"], subset["tail_max"]) == (500, 50, 10)


def test_a_mistyped_chapter_gets_a_close_match(capsys):
    assert cli.main(["reproduce", "psdd"]) == 2
    assert "'psdd' matches no chapter (did you mean 'psd'?)" in capsys.readouterr().err


def test_an_unknown_key_lists_the_keys_the_sections_validators_accept():
    """The list left out keys a section's validator accepts though no profile gives them (data.scenes.p_bias)."""
    with pytest.raises(ValueError, match=r"did you mean 'data\.scenes\.p_bias'") as err:
        load_profile("primer", "smoke", {"data.scens.p_bias": 0.5})
    assert all(f"'{k}'" in str(err.value) for k in ("data.scenes.p_bias", "data.data_seed", "train.ema_decay"))


def test_the_shared_checks_leave_legitimate_values_alone():
    """Negative numbers that are not counts, numpy seeds, an empty student_seeds (the study's seed only) and a
    count turned off with null pass."""
    assert load_profile("ltml", "smoke", {"data.scenes.long_tail_exponent": -0.5})["data"]["scenes"][
        "long_tail_exponent"] == -0.5
    assert load_profile("assocformer", "smoke", {"model.alpha_init": -0.5})["model"]["alpha_init"] == -0.5
    assert load_profile("splicemix", "smoke", {"mixing.fill": -1.0})["mixing"]["fill"] == -1.0
    assert load_profile("primer", "smoke", {"seeds": list(np.arange(2))})["seeds"] == [0, 1]
    assert load_profile("psd", "smoke", {"student_seeds": []})["student_seeds"] == []
    assert load_profile("splicemix", "smoke", {"analysis.cam_images": None})["analysis"]["cam_images"] is None


def test_a_timm_backbone_may_carry_a_weights_tag_but_not_a_wildcard():
    assert load_profile("splicemix", "smoke", {"model.backbone": "timm/resnet18.a1_in1k"})["model"]["backbone"]
    assert load_profile("assocformer", "smoke", {"model.backbone": "vit_tiny_patch16_224.augreg_in21k"})
    with pytest.raises(ValueError, match="timm has no model 'resnet\\*'"):
        load_profile("splicemix", "smoke", {"model.backbone": "timm/resnet*"})


def test_null_is_accepted_where_a_profile_turns_a_part_off_and_for_names():
    assert load_profile("splicemix", "default", {"regime_check": None})["regime_check"] is None
    assert load_profile("indeed", "smoke", {"lambda_sweep": None})["lambda_sweep"] is None
    assert load_profile("splicemix", "full", {"model.weights": None})["model"]["weights"] is None  # from scratch
    assert load_profile("splicemix", "full", {"model.widths": None})["model"]["widths"] is None  # the default widths
    assert load_profile("splicemix", "full", {"data.scenes": {}})["data"]["scenes"] == {}  # the generator's defaults


def test_data_overrides_that_are_valid_pass_the_data_check():
    assert load_profile("psd", "smoke", {"data.data_seed": 1})["data"]["data_seed"] == 1  # another draw of the scenes
    assert load_profile("ltml", "smoke", {"data.data_seed": 2})["data"]["data_seed"] == 2
    assert load_profile("primer", "smoke", {"data.scenes": {}})["data"]["scenes"] == {}  # {} = SceneSpec defaults
    for chapter in ("psd", "ltml", "assocformer"):  # a real dataset: null = all its images
        assert load_profile(chapter, "full", {"data.n_train": None})["data"]["n_train"] is None
        assert load_profile(chapter, "full", {"data.subset_seed": 3})["data"]["subset_seed"] == 3


@pytest.mark.parametrize("chapter, overrides, message", [
    ("ltml", {"data.dataset": "coco2099"}, r"^data: unknown real dataset 'coco2099'; choose one of"),
    ("splicemix", {"data.real.dataset": "vocXXXX"}, r"^data.real: unknown real dataset 'vocXXXX'"),
    ("splicemix", {"data.real.difficult_train": "maybe"}, r"^data.real: difficult_train must be one of"),
    ("psd", {"data.image_size": 0}, r"^data: image_size must be a whole number of pixels >= 1, got 0"),
    ("psd", {"data.normalize": "bgr"}, r"^data: normalize must be one of \('imagenet', 'none'\)"),
    # null used to pass this check and fail in the kernel
    ("psd", {"data.normalize": None}, r"normalize must be one of .* got None \(leave the key out for its default\)"),
    ("psd", {"data.resize": None}, r"^data: resize must be one of"),
    ("splicemix", {"data.real.difficult_eval": None}, r"^data.real: difficult_eval must be one of"),
    # valid VOC, but the mixing steps have no label mask: they would train the difficult labels as negatives
    ("splicemix", {"data.real.difficult_train": "ignore"}, r"^data.real: the SpliceMix chapter's steps .* no label "
                                                           r"mask.*use difficult_train: negative"),
    # the augmentation's values: cutout true passed (a Cutout hiding half the image), min_crop 0 failed in the kernel
    ("ltml", {"data.augment.cutout": True}, r"^data: augment.cutout must be a fraction .* got True"),
    ("ltml", {"data.augment.min_crop": 0}, r"^data: augment: min_crop must lie in \(0, 1\], got 0"),
    ("splicemix", {"data.real.augment.photometric": "no"}, r"^data.real: augment.photometric must be true or "
                                                              r"false"),
])
def test_real_data_options_are_checked_before_a_kernel_starts(chapter, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_profile(chapter, "full", overrides)


def test_null_turns_off_an_optional_section_only():
    assert load_profile("splicemix", "full", {"data.real": None})["data"]["real"] is None  # scenes only
    assert load_profile("indeed", "smoke", {"lambda_sweep": None})["lambda_sweep"] is None


@pytest.mark.parametrize("profile", ["smoke", "default", "full"])
def test_every_profile_passes_the_checks_an_override_runs(profile):
    """Each value check (VALUE_CHECKS) accepts the shipped profiles' own values: an override that restates one must
    load, so the checks cannot be stricter than the recipes they guard."""
    from mlic_lib.profiles import VALUE_CHECKS, _lookup

    ran = 0
    for chapter, checks in VALUE_CHECKS.items():
        settings = load_profile(chapter, profile)
        for key in checks:
            found, value = _lookup(settings, key)
            if found and value is not None:
                load_profile(chapter, profile, {key: value})
                ran += 1
    assert ran >= 20


def test_cli_passes_its_flags_through(tmp_path, monkeypatch):
    """Flags a command accepts reach the code that acts on them (a mutation review found each could be dropped
    with every test green): reproduce's -o and --no-progress and its default out path, prepare's
    --allow-unverified / --delete-archives / --force, fake's --force, book's --skip-execute."""
    import mlic_lib.book
    from mlic_lib.data import download, fake

    root = Path(__file__).resolve().parents[1]
    seen = {}

    def execute(nb, out, profile, params, progress=True, log_output=False):
        seen["reproduce"] = (Path(out), profile, params, progress)
        return 0.0

    monkeypatch.setattr(mlic_lib.book, "execute_notebook", execute)
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    assert cli.main(["--root", str(root), "reproduce", "primer", "--profile", "smoke", "-o", "train.epochs=2",
                     "--no-progress"]) == 0
    out, profile, params, progress = seen["reproduce"]
    assert out == root / "_build" / "executed" / "smoke" / "00_multilabel_primer.ipynb" and profile == "smoke"
    assert params == {"overrides": {"train.epochs": 2}} and progress is False

    monkeypatch.setattr(download, "prepare", lambda name, root_, **kw: seen.update(prepare=(name, kw)) or root_)
    assert cli.main(["data", "prepare", "voc2007", "--data-dir", str(tmp_path), "--allow-unverified",
                     "--delete-archives", "--force"]) == 0
    assert seen["prepare"] == ("voc2007", {"allow_unverified": True, "keep_archives": False, "force": True})
    monkeypatch.setattr(fake, "write_fake", lambda name, root_, force=False, **kw: seen.update(fake=force) or root_)
    assert cli.main(["data", "fake", "voc2007", "--data-dir", str(tmp_path), "--force"]) == 0 and seen["fake"] is True
    monkeypatch.setattr(mlic_lib.book, "build_book", lambda *a, **kw: seen.update(book=kw))
    assert cli.main(["--root", str(root), "book", "--skip-execute"]) == 0
    assert seen["book"]["skip_execute"] is True


def test_train_scene_model_trains_what_its_arguments_say(monkeypatch, tmp_path):
    """The seed argument sets the training seed and the initial weights (profiles pin train.seed: 0), the
    profile's model.pool is built, and a method's extra_key enters the run's key."""
    from mlic_lib import experiments

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(experiments, "fit", lambda model, tr, te, cfg, **kw: calls.append((model, cfg, kw["run_dir"])))
    settings = load_profile("primer", "smoke", {"model.pool": "avg"})
    data = experiments.scene_data(settings)
    for seed, extra in ((0, None), (1, None), (1, {"a": 1}), (1, {"a": 2})):
        experiments.train_scene_model(settings, data, seed=seed, extra_key=extra)
    (m0, c0, d0), (m1, c1, d1), (_, _, d2), (_, _, d3) = calls
    assert (c0.seed, c1.seed) == (0, 1)
    assert not all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters(), strict=True))
    assert len({d0, d1, d2, d3}) == 4  # seed and extra_key each change the run folder
    assert m0.pool.kind == "avg"


def test_a_callers_own_model_enters_the_scene_runs_key(monkeypatch, tmp_path):
    """A model passed to ``train_scene_model`` is not described by the profile's model settings: two models of the
    same parameter shapes (max- and average-pooled) must not share a cached run."""
    from mlic_lib import experiments

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(experiments, "fit", lambda model, tr, te, cfg, **kw: seen.append(kw["run_dir"]))
    settings = load_profile("primer", "smoke")
    data = experiments.scene_data(settings)
    for pool in ("max", "avg", "avg"):
        seed_everything(0)
        experiments.train_scene_model(settings, data, model=build_model("small_resnet", data.num_classes, pool=pool))
    assert seen[0] != seen[1] and seen[1] == seen[2]


def test_a_killed_writers_scene_file_is_removed_and_a_damaged_one_regenerated(tmp_path):
    """``cached_scenes`` tidies the temporary files of a writer killed mid-write once they are stale, and a
    damaged cache file is moved aside with a warning and drawn again, not a bare zip error."""
    from mlic_lib.experiments import cached_scenes

    spec = SceneSpec()
    first = cached_scenes(12, spec, seed=3)
    folder = tmp_path / "cache" / "data"
    (npz,) = folder.glob("scenes-*.npz")
    stale, fresh = folder / f".{npz.name}.abcd1234.tmp", folder / f".{npz.name}.efgh5678.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600,) * 2)
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match="damaged or unreadable.*generating the scenes again"):
        again = cached_scenes(12, spec, seed=3)
    np.testing.assert_array_equal(again.images, first.images)
    assert not stale.exists() and fresh.exists()  # a temporary file being written now is left alone
    assert (folder / (npz.name + ".corrupt")).is_file()
    np.testing.assert_array_equal(cached_scenes(12, spec, seed=3).images, first.images)  # the new file loads


def test_the_scene_cache_keeps_each_mode_apart(tmp_path):
    """The scenes' cache key holds the mode: a cached natural draw is never returned for the exclusive or
    co-occurring test sets of the same seed (the robustness figures read those)."""
    from mlic_lib.data.scenes import make_scenes
    from mlic_lib.experiments import cached_scenes

    spec = SceneSpec()
    cached_scenes(12, spec, seed=3, split="test", mode="natural")
    for mode in ("exclusive", "cooccur"):
        got = cached_scenes(12, spec, seed=3, split="test", mode=mode)
        np.testing.assert_array_equal(got.targets, make_scenes(12, spec, seed=3, split="test", mode=mode).targets)
    assert len(list((tmp_path / "cache" / "data").glob("scenes-*.npz"))) == 3


def test_a_scene_runs_key_holds_the_normalised_settings_and_the_code_of_its_step_and_model(monkeypatch, tmp_path):
    """``train_scene_model`` keys a run by the *normalised* train settings (``lr: 1`` is ``lr: 1.0``; data
    workers change nothing) and by the source of the step's and the model's modules."""
    from mlic_lib import experiments
    from mlic_lib.engine import SupervisedStep

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(experiments, "fit", lambda model, tr, te, cfg, **kw: seen.append(kw["run_dir"]))
    real_run_dir_for, codes = experiments.run_dir_for, []
    monkeypatch.setattr(experiments, "run_dir_for",
                        lambda name, key, code=(): codes.append(set(code)) or real_run_dir_for(name, key, code))
    settings = load_profile("primer", "smoke", {"train.lr": 1})
    data = experiments.scene_data(settings)
    experiments.train_scene_model(settings, data, step=SupervisedStep())
    for train in ({"lr": 1.0}, {"lr": 1.0, "num_workers": 3}):
        experiments.train_scene_model({**settings, "train": {**settings["train"], **train}}, data,
                                      step=SupervisedStep())
    assert len(set(seen)) == 1
    assert {"mlic_lib.engine", "mlic_lib.models.backbones"} <= codes[0]


def test_a_scene_runs_key_writes_out_the_scene_defaults(monkeypatch, tmp_path):
    """A data section that writes out a scene default (``data_seed: 0``, ``scenes: {canvas: 64}``, ``dataset:
    scenes``) keys the same run as one that leaves it out, and so does a model section (``weights: null``); another
    scene or model option keys another run."""
    from mlic_lib import experiments, splicemix_cl
    from mlic_lib.data.scenes import SceneSpec
    from mlic_lib.engine import SupervisedStep

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(experiments, "fit", lambda model, tr, te, cfg, **kw: seen.append(kw["run_dir"]))
    settings = load_profile("primer", "smoke")
    data = experiments.scene_data(settings)
    assert "data_seed" not in settings["data"] and SceneSpec.from_dict(settings["data"].get("scenes", {})).canvas == 64
    spelled = {**settings["data"], "data_seed": 0, "dataset": "scenes",
               "scenes": {**settings["data"].get("scenes", {}), "canvas": 64.0}}
    other = {**settings["data"], "scenes": {**settings["data"].get("scenes", {}), "p_bias": 0.5}}
    for d in (settings["data"], spelled, other):
        experiments.train_scene_model({**settings, "data": d}, data, step=SupervisedStep())
    assert seen[0] == seen[1] != seen[2]
    for over in ({"model.weights": None}, {"model.pool": settings["model"].get("pool", "max")}, {"model.pool": "avg"}):
        experiments.train_scene_model(load_profile("primer", "smoke", over), data, step=SupervisedStep())
    assert seen[3] == seen[4] == seen[0] != seen[5]  # a model default written out is the same model
    spl = load_profile("splicemix", "smoke")
    dirs = [splicemix_cl.method_run_dir({**spl, "data": d}, "splicemix") for d in
            (spl["data"], {**spl["data"], "data_seed": 0}, {**spl["data"], "data_seed": 1})]
    assert dirs[0] == dirs[1] != dirs[2]


class _UsersMixStep:  # a notebook's own step built on library objects (a mixer, and a loss in a partial)
    def __init__(self):
        import functools

        from mlic_lib.assoc_losses import association_regularizer
        from mlic_lib.mixing import Mixup

        self.mix, self.loss = Mixup(alpha=0.4), functools.partial(association_regularizer, norm="l1")

    def __call__(self, model, batch, device):
        raise AssertionError("not trained here")


def test_a_scene_runs_key_holds_the_code_of_library_objects_inside_a_users_step(monkeypatch, tmp_path):
    """A user's step was keyed by its own module only: an edit of the library's Mixup (or of a loss it calls) kept
    the run's folder, and the run trained with the old code was loaded."""
    from mlic_lib import experiments

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    monkeypatch.setattr(experiments, "fit", lambda model, tr, te, cfg, **kw: None)
    codes = []
    monkeypatch.setattr(experiments, "run_dir_for", lambda name, key, code=(): codes.append(set(code)) or tmp_path)
    settings = load_profile("primer", "smoke")
    experiments.train_scene_model(settings, experiments.scene_data(settings), step=_UsersMixStep())
    assert {"mlic_lib.mixing", "mlic_lib.assoc_losses", __name__, "mlic_lib.models.backbones"} <= codes[0]


@dataclasses.dataclass(slots=True)
class _SlotsMixStep:  # a user's step without a __dict__
    mixer: object

    def __call__(self, model, batch, device):
        raise AssertionError("not trained here")


_GLOBAL_MIXER = None  # set by the test below: a library object a user's function step reads as a global


def _global_mix_step(model, batch, device):
    return _GLOBAL_MIXER(*batch)


def test_the_modules_of_a_step_follow_slots_closures_and_globals(monkeypatch):
    """A step made with slots, or a function whose closure or globals hold a Mixup, left mlic_lib.mixing out of the
    run's key (only __dict__ was read)."""
    from mlic_lib.experiments import _modules_of
    from mlic_lib.mixing import Mixup

    def closure_step(mixer):
        def step(model, batch, device):
            return mixer(*batch)
        return step

    monkeypatch.setitem(globals(), "_GLOBAL_MIXER", Mixup(alpha=0.2))
    for step in (_SlotsMixStep(Mixup(alpha=0.2)), closure_step(Mixup(alpha=0.2)), _global_mix_step):
        assert "mlic_lib.mixing" in _modules_of(step), step


def test_scene_data_refuses_a_real_dataset_and_an_unstorable_cache_only_warns(monkeypatch, tmp_path):
    """``scene_data`` of a real-data profile returned digit scenes (or failed with int(None)); a cache that cannot
    be written (read-only, full) failed a draw that needs no cache."""
    from mlic_lib import experiments

    with pytest.raises(ValueError, match=r"data.dataset is 'coco2014', not the embedded scenes: load it with "
                                         r"mlic_lib.data.real.real_data"):
        experiments.scene_data(load_profile("psd", "full", {"data.n_train": 8, "data.n_test": 4}))
    scenes = load_profile("assocformer", "smoke", {"data.dataset": None})  # null is the scenes, as is_real reads it
    assert experiments.scene_data(scenes).num_classes == 20

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr(experiments, "atomic_open", refused)
    with pytest.warns(RuntimeWarning, match="could not store the scenes in .*Permission denied.*without caching"):
        scenes = experiments.cached_scenes(4, SceneSpec(), seed=1)
    np.testing.assert_array_equal(scenes.images, experiments.make_scenes(4, SceneSpec(), seed=1).images)


def test_a_scene_runs_key_holds_its_steps_options(monkeypatch, tmp_path):
    """Two steps of one class with other options train two runs (Mixup's alpha 0.2 and 4.0 loaded one run); the
    same options, built again, load the same run."""
    from mlic_lib import experiments
    from mlic_lib.splicemix_cl import make_step

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(experiments, "fit", lambda model, tr, te, cfg, **kw: seen.append(kw["run_dir"]))
    settings = load_profile("primer", "smoke")
    data = experiments.scene_data(settings)
    for alpha in (0.2, 4.0, 0.2):
        experiments.train_scene_model(settings, data, name="mix", step=make_step("mixup", {"alpha": alpha}))
    assert seen[0] != seen[1] and seen[0] == seen[2]


def test_object_key_describes_what_an_object_computes_with():
    import functools

    from mlic_lib.utils import object_key

    class Step:
        def __init__(self, w, alpha):
            self.weights, self.alpha, self._cache = w, alpha, {"cpu": w}

    a, b = object_key(Step(torch.ones(3), 0.5)), object_key(Step(torch.ones(3), 0.5))
    assert a == b and "_cache" not in a and a["alpha"] == 0.5 and a["class"].endswith("Step")
    assert object_key(Step(torch.tensor([1.0, 1.0, 2.0]), 0.5)) != a  # a tensor's values count
    assert object_key(Step(torch.ones(3), 0.6)) != a
    assert object_key(np.arange(3)) != object_key(np.arange(3.0))  # the same values in another dtype
    bf = torch.ones(2, dtype=torch.bfloat16)
    assert object_key(bf)["dtype"] == "torch.bfloat16" and object_key(bf) != object_key(bf.float())
    lin = torch.nn.Linear(2, 2)
    k = object_key(lin)
    with torch.no_grad():
        lin.weight.add_(1)
    assert object_key(lin) != k and k["module"].endswith("Linear")
    assert object_key(len) == "builtins.len" and object_key(None) is None
    assert object_key(functools.partial(max, 1)) != object_key(functools.partial(max, 2))
    # a module's options (a loss's focusing parameter), a closure's values, a lambda's code, a bound method's
    # object and a slotted object's fields all count (each gave one key for two trainings)
    from mlic_lib.losses import AsymmetricLoss
    from mlic_lib.psd import ASLStep

    assert object_key(ASLStep({"gamma_neg": 4.0})) != object_key(ASLStep({"gamma_neg": 1.0}))
    assert object_key(AsymmetricLoss(gamma_neg=4.0)) != object_key(AsymmetricLoss(gamma_neg=1.0))

    def scaled(w):
        def loss(x):
            return w * x
        return loss

    assert object_key(scaled(1.0)) != object_key(scaled(9.0)) and object_key(scaled(2.0)) == object_key(scaled(2.0))
    assert object_key(lambda x: x + 1) != object_key(lambda x: x + 2)
    assert object_key(Step(torch.ones(1), 1).__init__) != object_key(Step(torch.ones(1), 2).__init__)

    class Slotted:
        __slots__ = ("weight",)

        def __init__(self, weight):
            self.weight = weight

    assert object_key(Slotted(1.0)) != object_key(Slotted(10.0))
    assert object_key(torch.float16) != object_key(torch.float32)
    with pytest.raises(TypeError, match="extra_key"):
        object_key(np.random.default_rng(0))  # nothing to look into: refused, not keyed by its class name
    assert object_key({"a": (1, 2), "b": {3, 1}}) == {"a": [1, 2], "b": [1, 3]}
    assert json.dumps(object_key(Step(np.ones(2), {"x": Path("/p")})))  # JSON-able


def test_object_key_follows_a_users_globals_class_code_and_buffers():
    """An edited notebook retrains: the globals a user's function reads, the code of a user's step or model class
    and non-persistent buffers count (each loaded the run trained before the edit)."""
    from mlic_lib.utils import object_key

    def notebook(source):  # a notebook's cell: module __main__
        ns = {"__name__": "__main__", "torch": torch}
        exec(source, ns)
        return ns

    step = "def step(model, batch, device):\n    return SCALE * model(batch[0]).sum(), {}\n"
    assert object_key(notebook("SCALE = 1.0\n" + step)["step"]) != object_key(notebook("SCALE = 0.0\n" + step)["step"])
    assert object_key(notebook("SCALE = 1.0\n" + step)["step"]) == object_key(notebook("SCALE = 1.0\n" + step)["step"])
    cls = ("class MyStep:\n    def __call__(self, model, batch, device):\n"
           "        return {} * model(batch[0]).sum(), {{}}\n")
    assert object_key(notebook(cls.format(1.0))["MyStep"]()) != object_key(notebook(cls.format(0.0))["MyStep"]())
    net = ("class Net(torch.nn.Linear):\n    def forward(self, x):\n        return {} * super().forward(x)\n")
    torch.manual_seed(0)
    a = object_key(notebook(net.format(1.0))["Net"](2, 2))
    torch.manual_seed(0)
    assert object_key(notebook(net.format(2.0))["Net"](2, 2)) != a

    class WeightedBCE(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.register_buffer("w", torch.tensor(w), persistent=False)

    assert object_key(WeightedBCE(1.0)) != object_key(WeightedBCE(5.0))
    import pandas as pd  # an installed package's code is not followed (a DataFrame's took minutes): its version is

    from mlic_lib.utils import _class_code

    assert _class_code(pd.DataFrame, 0) == {} and _class_code(WeightedBCE, 0) != {}
    table = notebook("import pandas as pd\nTABLE = pd.DataFrame({'w': [1.0, 2.0]})\n"
                     "def step(model, batch, device):\n    return float(TABLE.w.sum()) * model(batch[0]).sum(), {}\n")
    assert "pandas" in json.dumps(object_key(table["step"]))
    from mlic_lib.losses import AsymmetricLoss  # the library's own classes are keyed by its source, not here
    from mlic_lib.psd import ASLStep

    assert object_key(ASLStep({"gamma_neg": 4.0}))["_code"] == {} and object_key(AsymmetricLoss())["code"] == {}



def test_object_key_follows_nested_code_base_classes_properties_and_classes_given_as_values():
    """Each of these edits of a notebook changes what a step computes, and so the run's key: a global read in an inner
    function, in a base class's method, in a property or in a method; a class passed as a value; a module imported
    under another name."""
    from mlic_lib.utils import object_key

    def notebook(source):  # a notebook's cell: module __main__
        ns = {"__name__": "__main__", "torch": torch}
        exec(source, ns)
        return ns

    def differ(source, name, make=lambda v: v):
        a, b = (object_key(make(notebook(source.replace("VALUE", v))[name])) for v in ("1.0", "2.0"))
        return a != b

    inner = ("SCALE = VALUE\ndef step(model, batch, device):\n    f = lambda z: SCALE * z\n"
             "    return f(model(batch[0])), {}\n")
    assert differ(inner, "step")
    base = ("class Base:\n    def loss(self, x):\n        return VALUE * x\n"
            "class MyStep(Base):\n    def __call__(self, model, batch, device):\n"
            "        return self.loss(batch[0]), {}\n")
    assert differ(base, "MyStep", lambda cls: cls())
    prop = ("class MyStep:\n    @property\n    def weight(self):\n        return VALUE\n"
            "    def __call__(self, model, batch, device):\n        return self.weight * batch[0], {}\n")
    assert differ(prop, "MyStep", lambda cls: cls())
    method = ("SCALE = VALUE\nclass MyStep:\n    def __call__(self, model, batch, device):\n"
              "        return SCALE * batch[0], {}\n")
    assert differ(method, "MyStep", lambda cls: cls())
    assert differ("class Loss:\n    def __call__(self, x):\n        return VALUE * x\n", "Loss",
                  lambda cls: {"loss_class": cls})  # the class itself, e.g. a step's option
    imported = "import {} as m\ndef step(model, batch, device):\n    return m.sum(batch[0]), {{}}\n"
    keys = [object_key(notebook(imported.format(module))["step"]) for module in ("torch", "numpy")]
    assert keys[0] != keys[1]


def test_a_full_disk_names_the_file_and_still_loads_a_finished_run(tmp_path, monkeypatch):
    import errno

    from mlic_lib.engine import run_lock
    from mlic_lib.utils import atomic_write_json

    target = tmp_path / "results.json"
    atomic_write_json({"a": 1}, target)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"No space left on device: could not write {target} .nothing was changed") as err:
        atomic_write_json({"a": 2}, target)
    assert err.value.errno == errno.ENOSPC  # still the disk's error, for a caller that tells them apart
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    monkeypatch.setattr(os, "pwrite", lambda *a: full(None))  # the lock's holder name cannot be written
    with run_lock(tmp_path / "run"):
        pass


def test_cli_teachers_trains_with_the_chapters_seed(monkeypatch, tmp_path):
    """`mlic teachers` trains the teachers of the chapter's seed, the first of ``seeds``: others would be
    cached under keys the chapter never reads."""
    from mlic_lib import psd

    monkeypatch.setenv("MLIC_CACHE", str(tmp_path))
    seen = {}
    monkeypatch.setattr(psd, "study_inputs", lambda settings: (None, None))
    monkeypatch.setattr(psd, "pretrain_teachers", lambda settings, data, S, seed: seen.setdefault("seed", seed) and 0)
    assert cli.main(["teachers", "--profile", "smoke", "-o", "seeds=[5, 6]"]) == 0
    assert seen["seed"] == 5


def test_cli_turns_an_os_error_into_a_message_and_exit_status_2(monkeypatch, capsys):
    from mlic_lib.data import download

    def full_disk(root):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(download, "check", full_disk)
    assert cli.main(["data", "check"]) == 2
    assert capsys.readouterr().err == "mlic: error: [Errno 28] No space left on device\n"


def test_cli_data_check_of_one_dataset_reports_only_that_one(capsys, tmp_path):
    assert cli.main(["data", "check", "coco2014", "--data-dir", str(tmp_path)]) == 1  # missing: status 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["  coco2014  missing"]


def test_a_flag_takes_only_true_or_false():
    """A text or number for a true/false setting is refused (the string 'false' would be truthy in the chapter)."""
    for chapter, key, value in (("splicemix", "analysis.voc_ratios", "false"), ("indeed", "lambda_swap", 0),
                                ("psd", "psd.matched_steps_check", "no thanks")):
        with pytest.raises(ValueError, match=rf"parameter '{key}' takes true or false"):
            load_profile(chapter, "smoke", {key: value})
    assert load_profile("splicemix", "smoke", {"analysis.voc_ratios": True})["analysis"]["voc_ratios"] is True


def test_the_checks_bounds_are_exact():
    """The edges of the shared checks: t-SNE's perplexity must be > 0 (0 refused), an ML-CIFAR-10 cutout as wide as
    a 32-pixel cell is refused but one pixel less passes, a lambda sweep may include lambda 0 (the baseline), a
    relative .pt weights file is taken like a .pth, and an empty list of seeds or counts is refused."""
    with pytest.raises(ValueError, match=r"analysis.tsne_perplexity must be a finite number > 0"):
        load_profile("splicemix", "smoke", {"analysis.tsne_perplexity": 0})
    assert load_profile("splicemix", "smoke", {"analysis.tsne_perplexity": 0.5})["analysis"]["tsne_perplexity"] == 0.5
    with pytest.raises(ValueError, match=r"cifar.data.augment.cutout=32 px can hide a whole 32-pixel cell"):
        load_profile("indeed", "full", {"cifar.data.augment.cutout": 32})
    assert load_profile("indeed", "full", {"cifar.data.augment.cutout": 31})["cifar"]["data"]["augment"]["cutout"] == 31
    assert load_profile("indeed", "smoke", {"lambda_sweep.lams": [0.0, 0.3]})["lambda_sweep"]["lams"] == [0.0, 0.3]
    assert load_profile("primer", "full", {"model.weights": "r50.pt"})["model"]["weights"] == "r50.pt"
    with pytest.raises(ValueError, match=r"psd.random_seeds must be a non-empty list"):
        load_profile("psd", "smoke", {"psd.random_seeds": []})
    from mlic_lib.checks import number, whole_list

    assert not whole_list([], 0) and whole_list([0, 2.0], 0) and not whole_list([0], 1)
    assert number(True) is None and number(float("nan")) is None and number(2.5, whole=True) is None


def test_seed_everything_returns_a_generator_seeded_with_the_seed():
    """The returned generator is seeded with ``seed`` (callers draw shuffles and masks from it)."""
    g = seed_everything(5)
    assert g.initial_seed() == 5
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(5)))


def test_config_hash_covers_the_named_code():
    """``code`` enters the hash (cached_scenes names the generator's module: an edit of it must regenerate)."""
    assert config_hash({"a": 1}, code=("mlic_lib.metrics",)) != config_hash({"a": 1})
    assert config_hash({"a": 1}, code=("mlic_lib.metrics",)) == config_hash({"a": 1}, code=("mlic_lib.metrics",))


def test_object_key_ignores_train_or_eval_mode_and_the_order_of_a_set():
    """A caller's model in eval mode is the same model (the same run), and a set keys the same whatever order it
    was built in (1 and 9 collide in a small set's table, so their iteration order follows insertion)."""
    import copy

    from mlic_lib.utils import object_key

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    assert object_key(model) == object_key(copy.deepcopy(model).eval())
    assert list(set([1, 9])) != list(set([9, 1]))  # the premise: two iteration orders
    assert object_key(set([1, 9])) == object_key(set([9, 1])) == object_key(frozenset([9, 1]))


def test_the_scene_cache_keeps_each_split_apart_and_test_scenes_are_another_draw(tmp_path):
    """The scenes' cache key holds the split (a cached training draw is never returned for the test split of the
    same seed), and scene_data's test scenes are not the training scenes' layouts."""
    from mlic_lib.data.scenes import make_scenes
    from mlic_lib.experiments import cached_scenes, scene_data

    spec = SceneSpec()
    cached_scenes(8, spec, seed=3, split="train")
    got = cached_scenes(8, spec, seed=3, split="test")
    np.testing.assert_array_equal(got.images, make_scenes(8, spec, seed=3, split="test").images)
    assert len(list((tmp_path / "cache" / "data").glob("scenes-*.npz"))) == 2
    d = scene_data(load_profile("primer", "smoke", {"data.n_train": 16, "data.n_test": 16}))
    assert not np.array_equal(d.train.targets, d.test.targets)


def test_a_scene_runs_model_key_writes_out_the_pool_and_widths_defaults():
    """A model section without ``pool`` is the max-pooled model build_scene_model builds, and empty ``widths`` are
    the backbone's own (null): both share the runs of a section that spells them out."""
    from mlic_lib.experiments import model_key

    bare = {"backbone": "small_resnet"}
    assert model_key(bare) == model_key({**bare, "pool": "max", "weights": None, "widths": None})
    assert model_key({**bare, "widths": []}) == model_key(bare) != model_key({**bare, "pool": "avg"})
    assert model_key({**bare, "widths": (8, 16)}) == model_key({**bare, "widths": [8, 16]})


def test_the_data_checks_cover_null_counts_on_the_scenes_and_splicemixs_real_section():
    """Null (all images) is a real dataset's only: a hand-built scenes section with n_train null is refused by
    name; SpliceMix's data.real counts and seeds are checked as the main data section's are."""
    from mlic_lib.data.section import check_data_section

    with pytest.raises(ValueError, match=r"data.n_train must be a whole number of images >= 1, got None"):
        check_data_section({"n_train": None, "n_test": 8})
    for key, value in (("n_train", 0), ("subset_seed", -1), ("n_train", True)):
        with pytest.raises(ValueError, match=rf"data.real.{key} must be a whole number"):
            load_profile("splicemix", "full", {f"data.real.{key}": value})


def test_a_fingerprint_follows_the_labels_values_not_their_dtype():
    """The same labels stored as uint8 or bool (a cache) or float32 (freshly drawn) are the same training set."""
    from mlic_lib.data.fingerprint import data_fingerprint
    from mlic_lib.data.tensors import TensorImageDataset

    img, t = np.zeros((4, 1, 2, 2), np.uint8), np.eye(4, 3, dtype=np.float32)
    ds = TensorImageDataset(img, t)
    assert data_fingerprint(ds, t.astype(np.uint8)) == data_fingerprint(ds, t.astype(bool)) == data_fingerprint(ds, t)


def test_cli_reproduce_refuses_an_out_path_that_is_no_notebook(tmp_path, monkeypatch, capsys):
    """``--out`` must name a .ipynb file outside notebooks/: a .txt (or a folder's name) is refused, and so is a path
    in notebooks/ (it would overwrite a chapter), before a kernel starts."""
    import mlic_lib.book as book

    root = Path(__file__).resolve().parents[1]
    started = []
    monkeypatch.setattr(book, "execute_notebook", lambda *a, **k: started.append(a) or 0.0)
    for out in (tmp_path / "x.txt", tmp_path / "x", root / "notebooks" / "00_multilabel_primer.ipynb"):
        assert cli.main(["--root", str(root), "reproduce", "primer", "--profile", "smoke", "--out", str(out)]) == 2
        assert "give a .ipynb path outside notebooks/" in capsys.readouterr().err
    assert not started
