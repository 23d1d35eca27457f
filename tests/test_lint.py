"""The whole repository (library, tests, benchmarks, scripts and the chapter notebooks) passes ruff with
the project's configuration (pyproject.toml), as `make lint` checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra: pip install -e .[test])")
    r = subprocess.run([ruff, "check", "--output-format", "concise", str(REPO)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_public_module_is_reachable_from_a_bare_import():
    """The package docstring promises lazy submodules: ``mlic_lib.psd`` after ``import mlic_lib`` failed for every
    module missing from ``_SUBMODULES``."""
    import pkgutil

    import mlic_lib

    public = {m.name for m in pkgutil.iter_modules(mlic_lib.__path__) if not m.name.startswith("_")}
    assert public == mlic_lib._SUBMODULES
    assert all(getattr(mlic_lib, name).__name__ == f"mlic_lib.{name}" for name in sorted(public))
