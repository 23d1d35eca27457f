"""Chapter results: the small JSON of headline numbers each chapter writes, and provenance strings.

The book's pages read these JSONs, so every number shown comes from the build that made the page.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mlic_lib import __version__
from mlic_lib.utils import atomic_write_json


def results_dir() -> Path:
    """``$MLIC_RESULTS`` (the book sets ``_build/results``), else ``~/.cache/mlic/results``."""
    return Path(os.environ.get("MLIC_RESULTS", "~/.cache/mlic/results")).expanduser()


def provenance(settings: Mapping[str, Any], data: str, seeds: Sequence[int] | None = None) -> str:
    """One line for a figure footnote: chapter, profile, seeds, data and device."""
    seeds = seeds if seeds is not None else settings.get("seeds", [])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"mlic_lib {__version__} | chapter={settings.get('chapter')} profile={settings.get('profile')} | "
            f"seeds={list(seeds)} | data={data} | device={device}")


def write_chapter_results(chapter: str, settings: Mapping[str, Any], numbers: Mapping[str, Any]) -> Path:
    """Write ``<results_dir>/<chapter>.json`` atomically and return its path."""
    payload = {
        "chapter": chapter,
        "profile": settings.get("profile"),
        "settings": dict(settings),
        "numbers": dict(numbers),
        "library_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return atomic_write_json(payload, results_dir() / f"{chapter}.json")
