"""Exceptions raised by the real-dataset loaders.

Both exceptions carry messages meant to be read by a person: they name the file or folder at
fault and the command that fixes it (``mlic data prepare NAME``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CorruptImageError", "DatasetNotFoundError", "missing_dataset"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder, label file or image is not where the loader expects it.

    Subclasses :class:`FileNotFoundError`, so ``except FileNotFoundError`` and
    ``except OSError`` still catch it.

    Parameters
    ----------
    message : str
        The full message; ``str(err)`` returns it unchanged (no ``[Errno ...]`` prefix).
    path : str or pathlib.Path, optional
        The missing path, stored as :attr:`path` and as ``filename`` (like other OSErrors).
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        if path is not None:
            self.filename = str(path)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptImageError(RuntimeError):
    """An image file exists but cannot be decoded (truncated download, wrong format, ...).

    Attributes
    ----------
    path : pathlib.Path or None
        The file that failed to decode.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


def repair_hint(key: str | None, damaged: bool | None = None, root: str | Path | None = None) -> str:
    """How to get dataset ``key``'s files (back): ``damaged`` when the dataset was prepared and a file of it is
    missing or corrupt (a plain ``prepare`` would skip it, ``--force`` unpacks again), else when it is absent;
    ``None`` decides from whether the dataset's marker file exists under ``root`` (default ``$MLIC_DATA``). Where
    ``mlic data fake`` wrote the dataset under ``root``, the fix is to write the synthetic files again."""
    from .paths import data_root
    from .registry import DATASETS

    entry = DATASETS.get(key) if key else None
    if entry is None:
        return "Put the file back (or rebuild the file list without it)."
    if not entry.files:  # user-supplied data (NUS-WIDE): nothing to fetch
        return entry.notes
    from .fake import fake_commands

    base = Path(root if root is not None else data_root())
    fake = fake_commands(base)
    if key in fake:  # a dry run's synthetic files: preparing the real dataset is not the fix
        return (f"These are synthetic files from `mlic data fake`: write them again with "
                f"`mlic data fake {fake[key] or key} --data-dir {base} --force`.")
    if damaged is None:
        damaged = (base / entry.marker).exists()
    if damaged:
        return (f"Unpack the dataset again with `mlic data prepare {key} --force` (a kept archive is checked against "
                "its sha256 and reused; a deleted one is downloaded again).")
    return f"Fetch it with `mlic data prepare {key}` (or set MLIC_DATA to where it lives)."


def missing_dataset(
    name: str, path: str | Path, what: str = "missing", *, key: str | None = None
) -> DatasetNotFoundError:
    """Build (not raise) a :class:`DatasetNotFoundError` with a fix-it message.

    Parameters
    ----------
    name : str
        Human-readable dataset name, e.g. ``"VOC2007"`` or ``"COCO2014"``.
    path : str or pathlib.Path
        The path that was expected and is absent.
    what : str, default "missing"
        Short description of the problem, shown in parentheses after the path
        (``"missing"``, ``"not a directory"``, ...).
    key : str, optional
        Dataset key for ``mlic data prepare``; defaults to ``name`` lower-cased without spaces
        (``"VOC2007"`` -> ``"voc2007"``). When the dataset's marker file exists (it was prepared, and part of
        it is gone) the message names ``--force`` (see :func:`repair_hint`). The marker is looked for under the
        data root that ``path`` lies in (the folder holding the marker's top folder, e.g. ``VOCdevkit``), else
        under ``$MLIC_DATA``.

    Returns
    -------
    DatasetNotFoundError
        With ``path``/``filename`` set to the expected path. The caller raises it.

    Examples
    --------
    >>> err = missing_dataset("VOC2007", "/data/VOCdevkit/VOC2007/Annotations")
    >>> print(err)  # doctest: +NORMALIZE_WHITESPACE
    VOC2007 not found: expected /data/VOCdevkit/VOC2007/Annotations (missing). Fetch it with
    `mlic data prepare voc2007` (or set MLIC_DATA to where it lives).
    """
    if key is None:
        key = "".join(name.lower().split())
    hint = repair_hint(key, root=_root_of(Path(path), key))
    return DatasetNotFoundError(f"{name} not found: expected {path} ({what}). {hint}", path=path)


def _root_of(path: Path, key: str) -> Path | None:
    """The data root that ``path`` lies in: the parent of its ancestor named like the top folder of ``key``'s
    marker (``<root>/VOCdevkit/...`` -> ``<root>``); None when it has none (a user-given folder)."""
    from .registry import DATASETS

    entry = DATASETS.get(key)
    if entry is None or not entry.files:
        return None
    top = Path(entry.marker).parts[0]
    return next((p.parent for p in path.expanduser().parents if p.name == top), None)
