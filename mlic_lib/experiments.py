"""Glue shared by the chapters: build the embedded data, a model and a cached ``fit`` from a profile.

A chapter's notebook stays narrative + calls::

    settings = load_profile("primer", profile)
    data = scene_data(settings)
    run = train_scene_model(settings, data, seed=0)
"""

from __future__ import annotations

import functools
import json
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from mlic_lib.data.fingerprint import data_fingerprint
from mlic_lib.data.scenes import SceneSet, SceneSpec, make_scenes, make_world
from mlic_lib.data.section import data_key
from mlic_lib.data.tensors import TensorImageDataset
from mlic_lib.engine import (
    UNREADABLE,
    FitResult,
    TrainConfig,
    cache_root,
    fit,
    remove_stale_temp_files,
    run_dir_for,
    set_aside_damaged,
)
from mlic_lib.models import build_model
from mlic_lib.utils import atomic_open, config_hash, object_key, seed_everything


@dataclass
class SceneData:
    """Train and test scenes of one world, and their in-memory datasets."""

    train: SceneSet
    test: SceneSet
    train_ds: TensorImageDataset
    test_ds: TensorImageDataset

    @property
    def num_classes(self) -> int:
        return self.train.world.num_classes

    @property
    def train_targets(self) -> np.ndarray:
        """Training labels ``(N, C)`` (the interface shared with :class:`~mlic_lib.data.real.RealData`)."""
        return self.train.targets

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`~mlic_lib.data.fingerprint.data_fingerprint` of the training scenes (computed once): part of
        :func:`train_scene_model`'s key, so that scenes not drawn from the settings never load another's run."""
        return data_fingerprint(self.train_ds, self.train.targets)


#: The layout of :func:`cached_scenes`' files (their arrays and how the boxes are packed). It is part of their key,
#: so a change to what is stored (bump it) reads no file of the old layout; the generator is keyed by its source.
SCENES_FILE_FORMAT = 1


def cached_scenes(n_images: int, spec: SceneSpec, seed: int, split: str = "train", mode: str = "natural",
                  use_cache: bool = True) -> SceneSet:
    """:func:`make_scenes`, stored once as ``$MLIC_CACHE/data/scenes-<hash>.npz`` and loaded afterwards.

    The hash covers the arguments, the generator's source (a change to it regenerates) and
    :data:`SCENES_FILE_FORMAT`.
    """
    if not use_cache:
        return make_scenes(n_images, spec, seed=seed, split=split, mode=mode)
    key = config_hash({"n": n_images, "spec": spec.to_dict(), "seed": seed, "split": split, "mode": mode,
                       "format": SCENES_FILE_FORMAT},
                      code=("mlic_lib.data.scenes",))
    path = cache_root() / "data" / f"scenes-{key}.npz"
    remove_stale_temp_files(path.parent, names=_SCENES_TEMP_NAME)  # left by a writer killed mid-write
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                boxes = np.split(z["boxes"], z["box_offsets"][1:-1])
                return SceneSet(z["images"], z["targets"], boxes, make_world(spec), mode,
                                {"seed": seed, "split": split, "cache": str(path)})
        except (zipfile.BadZipFile, *UNREADABLE) as e:  # damage is set aside; a failed read (EIO, EACCES) raised
            set_aside_damaged(path, e, rank=0, then="generating the scenes again")
    scenes = make_scenes(n_images, spec, seed=seed, split=split, mode=mode)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in scenes.boxes])])
    try:
        with atomic_open(path, "wb") as fh:
            np.savez(fh, images=scenes.images, targets=scenes.targets, boxes=np.concatenate(scenes.boxes),
                     box_offsets=offsets)
    except OSError as e:  # a read-only or full cache: the scenes are drawn all the same, only not stored
        warnings.warn(f"could not store the scenes in {path} ({e}); using them without caching", RuntimeWarning,
                      stacklevel=2)
    return scenes


#: The temporary files of :func:`cached_scenes`' atomic writes (``.scenes-<hash>.npz.XXXXXXXX.tmp``).
_SCENES_TEMP_NAME = re.compile(r"\.scenes-[0-9a-f]+\.npz\.[a-z0-9_]{8}\.tmp")


def scene_data(settings: Mapping[str, Any], use_cache: bool = True) -> SceneData:
    """Draw ``data.n_train`` training and ``data.n_test`` test scenes (disjoint digit images).

    ``data.data_seed`` (default 0) picks another draw of the same world. It is a profile setting, not an argument,
    so that it is part of every cache key built from the profile's ``data`` section: a run trained on one draw is
    never loaded for another."""
    from mlic_lib.data.section import check_data_section

    d = settings["data"]
    check_data_section(d)  # the profile loader's check, for settings built by hand too
    if d.get("dataset") not in (None, "scenes"):  # as is_real: null is the scenes too
        raise ValueError(f"data.dataset is {d['dataset']!r}, not the embedded scenes: load it with "
                         "mlic_lib.data.real.real_data(settings['data'])")
    data_seed = d.get("data_seed", 0)
    spec = SceneSpec.from_dict(d.get("scenes", {}))
    train = cached_scenes(int(d["n_train"]), spec, 2 * data_seed + 1, "train", use_cache=use_cache)
    test = cached_scenes(int(d["n_test"]), spec, 2 * data_seed + 2, "test", use_cache=use_cache)
    return SceneData(train, test, TensorImageDataset(train.images, train.targets),
                     TensorImageDataset(test.images, test.targets))


def build_scene_model(model_settings: Mapping[str, Any], num_classes: int, seed: int) -> nn.Module:
    """The profile's ``model:`` section (backbone, pool, weights, widths) as a seeded :func:`build_model`."""
    seed_everything(seed)
    m = model_settings
    widths = tuple(m["widths"]) if m.get("widths") else None
    return build_model(m["backbone"], num_classes, pool=m.get("pool", "max"), weights=m.get("weights"), widths=widths)


def model_key(model_settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` section as :func:`build_scene_model` reads it, for a run's cache key: ``pool`` (default
    ``max``), ``weights`` (default ``null``) and ``widths`` (``null`` or empty: the backbone's own) written out, so a
    profile that spells out a default (``-o model.weights=null``) shares the runs of one that leaves it out."""
    m = dict(model_settings)
    return {**m, "pool": m.get("pool", "max"), "weights": m.get("weights"),
            "widths": list(m["widths"]) if m.get("widths") else None}


def pretraining_note(model_settings: Mapping[str, Any]) -> str:
    """A warning for real-data runs whose torchvision ResNet has no ``weights`` (trained from scratch, unlike the
    papers, which fine-tune ImageNet weights); an empty string otherwise."""
    if model_settings.get("weights") is None and str(model_settings.get("backbone", "")).startswith("resnet"):
        return ("Note: model.weights is null, so the ResNet is trained from scratch; the paper fine-tunes ImageNet "
                "weights, and its numbers are not comparable to these (set model.weights: imagenet for torchvision's "
                "weights, or the path of a local .pth).")
    return ""


def train_scene_model(settings: Mapping[str, Any], data: SceneData, seed: int = 0, name: str = "baseline",
                      step: Callable | None = None, model=None, extra_key: Mapping[str, Any] | None = None,
                      progress: bool = True) -> FitResult:
    """Train (or load from the cache) a model on ``data`` with the profile's ``model``/``train`` settings.

    The cache key is the chapter, ``name``, the data/model/train settings, the training scenes
    (:attr:`SceneData.fingerprint`), ``seed``, ``step`` (its class and
    options, :func:`mlic_lib.utils.object_key`), a caller's ``model`` (its modules' options and initial weights, by
    the same function) and ``extra_key`` (anything else the run depends on), plus the
    library version and source (see :func:`engine.run_dir_for`).
    """
    cfg = TrainConfig.from_dict({**settings["train"], "seed": seed})
    m = settings["model"]
    own_model = model is not None
    if model is None:
        model = build_scene_model(m, data.num_classes, seed)
    key = {"chapter": settings.get("chapter"), "name": name, "data": data_key(settings["data"]), "model": model_key(m),
           "train": cfg.key_dict(), "step": object_key(step), "extra": dict(extra_key or {}),
           "train_data": data.fingerprint}  # scenes drawn otherwise than the settings say never load this run
    if own_model:  # a caller's model is not described by the profile's model section: key it by what it is
        key["own_model"] = object_key(model)  # its modules' classes and options, and its initial weights
    # a caller's step (a class or a function), what it holds (a library mixer or loss inside a user's step) and the
    # model (its parts may come from several modules)
    code = _modules_of(step, key["step"]) if step is not None else set()
    code |= {type(part).__module__ for part in model.modules()}
    run_dir = run_dir_for(f"{settings.get('chapter')}-{name}-s{seed}", key, code=code)
    return fit(model, data.train_ds, data.test_ds, cfg, step=step, run_dir=run_dir, progress=progress)


def _modules_of(step: Any, step_key: Any = None) -> set[str]:
    """The modules whose code ``step`` computes with, for its run's key: the step's own and every ``mlic_lib`` module
    that :func:`object_key` finds in it (the classes, functions and modules it holds, in attributes, slots, items,
    partials, closures and the globals a user's function reads), so that an edit of a library object held by a user's
    step (a ``Mixup``, a loss) re-keys its runs (``library_digest`` ignores names outside ``mlic_lib``). ``step_key``:
    ``object_key(step)`` when the caller has it already."""
    import sys

    out = {getattr(step, "__module__", None) or type(step).__module__}
    for name in set(re.findall(r"mlic_lib(?:\.\w+)*", json.dumps(object_key(step) if step_key is None else step_key))):
        while name not in sys.modules and "." in name:  # mlic_lib.mixing.Mixup -> mlic_lib.mixing
            name = name.rsplit(".", 1)[0]
        out.add(name)
    return out
