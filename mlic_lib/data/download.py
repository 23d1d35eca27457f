"""Resumable, sha256-verified downloads of the real datasets into ``$MLIC_DATA``.

``prepare("voc2007")`` downloads every file of the registry entry into ``$MLIC_DATA/downloads/voc2007``
(one folder per dataset, since VOC-LT and COCO-LT both have a ``class_freq.pkl``), continuing a partial
``.part`` file with an HTTP ``Range`` request; it checks each file's size and sha256,
and unpacks it. A checksum mismatch is an error: the bad file is moved aside to ``*.bad`` and never
extracted. Extraction goes to a temporary folder first and is moved into place at the end, so an
interrupted run never leaves a half-unpacked dataset looking complete; a ``.prepared`` stamp per
file makes a rerun skip finished work. ``check()`` reports what is present.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from mlic_lib.data.paths import data_root
from mlic_lib.data.registry import DATASETS, DatasetEntry, RemoteFile, get

CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A downloaded file does not have the registry's sha256 (or size)."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, part: Path, expected_size: int | None, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming from its current length when the server allows it."""
    from tqdm.auto import tqdm

    from mlic_lib.utils import bar_disabled

    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have == expected_size:
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        resumed = have > 0 and getattr(response, "status", 200) == 206
        if have and not resumed:
            have = 0  # the server ignored Range: start over
        total = response.length + have if response.length is not None else expected_size
        with open(part, "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
            disable=bar_disabled(progress), leave=False,
        ) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))


def download(file: RemoteFile, folder: Path, progress: bool = True, allow_unverified: bool = False) -> Path:
    """Download ``file`` into ``folder`` (resuming), verify it, and return the verified path."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / file.name
    if final.is_file():
        return final  # verified when it was renamed into place
    if file.sha256 is None and not allow_unverified:
        raise ChecksumError(
            f"{file.name} has no recorded sha256 in mlic_lib/data/registry.py; rerun with --allow-unverified "
            "to download it anyway (the computed digest is printed so it can be recorded)."
        )
    part = folder / (file.name + ".part")
    errors = []
    for url in file.urls:
        try:
            _fetch(url, part, file.size, progress)
            break
        except (urllib.error.URLError, OSError) as err:
            errors.append(f"{url}: {err}")
    else:
        raise ConnectionError(
            f"could not download {file.name} (the partial file {part} is kept; rerun to resume):\n  "
            + "\n  ".join(errors)
        )
    size = part.stat().st_size
    digest = sha256_of(part)
    if (file.size is not None and size != file.size) or (file.sha256 is not None and digest != file.sha256):
        bad = part.with_suffix(".bad")
        part.replace(bad)
        raise ChecksumError(
            f"{file.name}: expected {file.size} bytes with sha256 {file.sha256}, got {size} bytes with sha256 "
            f"{digest}. The file was moved to {bad} and not used; delete it and rerun to download again."
        )
    if file.sha256 is None:
        print(f"{file.name}: sha256 {digest} (not verified: record it in the registry)", file=sys.stderr)
    part.replace(final)
    return final


def _safe_members(names: list[str]) -> None:
    for name in names:
        p = Path(name)
        if p.is_absolute() or ".." in p.parts:
            raise RuntimeError(f"refusing to extract {name!r}: it would leave the target folder")


def unpack(archive: Path, dest: Path) -> None:
    """Extract a tar/tar.gz/zip archive into ``dest`` via a temporary folder (no partial results)."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members(z.namelist())
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                _safe_members(t.getnames())
                t.extractall(tmp, filter="data")
        for item in tmp.iterdir():  # merge top-level entries (VOC tars share VOCdevkit/)
            target = dest / item.name
            if target.is_dir() and item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                if target.exists():
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                item.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(key: str, root: Path | None = None, progress: bool = True, allow_unverified: bool = False,
            keep_archives: bool = True) -> Path:
    """Download, verify and unpack dataset ``key`` under ``root`` (default ``$MLIC_DATA``)."""
    entry = get(key)
    root = Path(root) if root is not None else data_root()
    if not entry.files:
        raise RuntimeError(f"{entry.title}: nothing to download. {entry.notes}")
    downloads = root / "downloads" / entry.key
    for file in entry.files:
        stamp = downloads / f"{file.name}.prepared"
        if stamp.is_file():
            continue
        path = download(file, downloads, progress, allow_unverified)
        dest = root / file.dest
        if file.action == "extract":
            unpack(path, dest)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            tmp = dest / f".{file.saved_name}.tmp"
            shutil.copy2(path, tmp)
            tmp.replace(dest / file.saved_name)
        stamp.write_text(file.sha256 or "unverified")
        if not keep_archives and file.action == "extract":
            path.unlink()
    missing = [n for n in entry.needs if not (root / get(n).marker).exists()]
    if missing:
        print(f"{entry.title} also needs: {', '.join(missing)} (run `mlic data prepare NAME` for each)",
              file=sys.stderr)
    return root / entry.marker


def status(entry: DatasetEntry, root: Path) -> str:
    if (root / entry.marker).exists():
        return "present"
    partial = [f.name for f in entry.files if (root / "downloads" / entry.key / (f.name + ".part")).exists()]
    return f"partial download ({', '.join(partial)})" if partial else "missing"


def check(root: Path | None = None) -> dict[str, str]:
    """``{dataset: 'present' | 'missing' | 'partial download (...)'}`` for every registry entry."""
    root = Path(root) if root is not None else data_root()
    return {key: status(entry, root) for key, entry in DATASETS.items()}


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for k, v in check().items():
        print(f"{k:9s} {v}")
