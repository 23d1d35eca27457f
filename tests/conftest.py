"""Shared fixtures. Tests never touch the user's caches: MLIC_CACHE / MLIC_RESULTS point to tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlic_lib.data.paths import reference_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = reference_data_dir()  # $MLIC_REFERENCE_DATA, else <repo>/../shared/data


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "results"))
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def small_scenes():
    from mlic_lib.data import SceneSpec, make_scenes

    spec = SceneSpec()
    return make_scenes(160, spec, seed=1), make_scenes(80, spec, seed=2, split="test")
