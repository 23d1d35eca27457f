"""Where the real datasets live on disk."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_DATA_ROOT", "data_root"]

#: Used when the ``MLIC_DATA`` environment variable is not set.
DEFAULT_DATA_ROOT = "~/.cache/mlic/data"


def data_root() -> Path:
    """Return the root folder of the real datasets.

    Returns
    -------
    pathlib.Path
        ``$MLIC_DATA`` if set, else ``~/.cache/mlic/data``, with ``~`` expanded. The folder is
        not created and may not exist. Loaders expect ``<root>/VOCdevkit/VOC2007``,
        ``<root>/coco/annotations``, ... below it.
    """
    return Path(os.environ.get("MLIC_DATA", DEFAULT_DATA_ROOT)).expanduser()
