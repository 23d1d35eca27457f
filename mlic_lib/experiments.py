"""Glue shared by the chapters: build the embedded data, a model and a cached ``fit`` from a profile.

A chapter's notebook stays narrative + calls::

    settings = load_profile("primer", profile)
    data = scene_data(settings)
    run = train_scene_model(settings, data, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mlic_lib.data.scenes import SceneSet, SceneSpec, make_scenes
from mlic_lib.data.tensors import TensorImageDataset
from mlic_lib.engine import FitResult, TrainConfig, fit, run_dir_for
from mlic_lib.models import build_model
from mlic_lib.utils import seed_everything


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


def scene_data(settings: Mapping[str, Any], data_seed: int = 0) -> SceneData:
    """Draw ``data.n_train`` training and ``data.n_test`` test scenes (disjoint digit images)."""
    d = settings["data"]
    spec = SceneSpec.from_dict(d.get("scenes", {}))
    train = make_scenes(int(d["n_train"]), spec, seed=2 * data_seed + 1, split="train")
    test = make_scenes(int(d["n_test"]), spec, seed=2 * data_seed + 2, split="test")
    return SceneData(train, test, TensorImageDataset(train.images, train.targets),
                     TensorImageDataset(test.images, test.targets))


def train_scene_model(settings: Mapping[str, Any], data: SceneData, seed: int = 0, name: str = "baseline",
                      step: Callable | None = None, model=None, extra_key: Mapping[str, Any] | None = None,
                      progress: bool = True) -> FitResult:
    """Train (or load from the cache) a model on ``data`` with the profile's ``model``/``train`` settings.

    The cache key is the chapter, ``name``, the data/model/train settings, ``seed`` and ``extra_key``
    (e.g. a method's own options), plus the library version and source (see :func:`engine.run_dir_for`).
    """
    cfg = TrainConfig.from_dict({**settings["train"], "seed": seed})
    m = settings["model"]
    if model is None:
        seed_everything(seed)
        model = build_model(m["backbone"], data.num_classes, pool=m.get("pool", "max"),
                            weights=m.get("weights"))
    key = {"chapter": settings.get("chapter"), "name": name, "data": settings["data"], "model": m,
           "train": cfg.to_dict(), "extra": dict(extra_key or {})}
    run_dir = run_dir_for(f"{settings.get('chapter')}-{name}-s{seed}", key)
    return fit(model, data.train_ds, data.test_ds, cfg, step=step, run_dir=run_dir, progress=progress)
