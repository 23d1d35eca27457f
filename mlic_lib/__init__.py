"""mlic_lib: the methods library behind the multi-label image classification (MLIC) companion book.

Submodules are imported lazily so that ``import mlic_lib`` stays cheap::

    from mlic_lib import metrics, losses
    from mlic_lib.data import scenes
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: every module and package of the library (``mlic_lib.psd`` etc. after a bare ``import mlic_lib``)
_SUBMODULES = {"analysis", "assoc_losses", "book", "checks", "cli", "data", "ema", "engine", "experiments",
               "file_lock", "indeed", "losses", "ltml", "metrics", "mixing", "models", "partition", "process_pool",
               "profiles", "psd", "reporting", "splicemix_cl", "utils"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mlic_lib' has no attribute {name!r}")


__all__ = sorted(_SUBMODULES | {"__version__"})
