"""Where the real datasets and the reference label files live on disk."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_DATA_ROOT", "data_root", "reference_data_dir"]

#: Used when the ``MLIC_DATA`` environment variable is not set.
DEFAULT_DATA_ROOT = "~/.cache/mlic/data"


def data_root() -> Path:
    """Return the root folder of the real datasets.

    Returns
    -------
    pathlib.Path
        ``$MLIC_DATA`` if set and not empty, else ``~/.cache/mlic/data``, with ``~`` expanded. The folder is
        not created and may not exist. Loaders expect ``<root>/VOCdevkit/VOC2007``,
        ``<root>/coco/annotations``, ... below it.

    Raises
    ------
    ValueError
        When the path is an existing file (else every dataset would read as missing, and preparing one would
        fail with a bare "Not a directory").
    """
    from mlic_lib.utils import env_path

    root = env_path("MLIC_DATA", DEFAULT_DATA_ROOT)
    if root.exists() and not root.is_dir():
        name = "MLIC_DATA" if os.environ.get("MLIC_DATA") else "the default data root"
        raise ValueError(f"{name} {root} is a file, not a folder: set MLIC_DATA to the folder that holds (or will "
                         "hold) the datasets")
    return root


def reference_data_dir() -> Path:
    """The folder of the small reference files some chapters compare with when present (VOC/COCO label
    files, the LT split files, the CPSD authors' partitions): ``$MLIC_REFERENCE_DATA`` if set, else
    ``shared/data`` next to the repository (``<repo>/../shared/data``, found from this package's location,
    not from the working directory). It may not exist; the chapters then skip those comparisons and say so."""
    env = os.environ.get("MLIC_REFERENCE_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"
