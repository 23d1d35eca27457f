"""Resumable, sha256-verified downloads of the real datasets into ``$MLIC_DATA``.

``prepare("voc2007")`` downloads every file of the registry entry into ``$MLIC_DATA/downloads/voc2007``
(one folder per dataset, since VOC-LT and COCO-LT both have a ``class_freq.pkl``), continuing a partial
``.part`` file with an HTTP ``Range`` request; it checks each file's size and sha256,
and unpacks it. A checksum mismatch is an error: the bad file is moved aside to ``*.bad`` and never
extracted. Extraction goes to a temporary folder first and is moved into place at the end, so an
interrupted run never leaves a half-unpacked dataset looking complete; a ``.prepared`` stamp per
file makes a rerun skip finished work, and ``check()`` reports a dataset as present only when every
one of its files was prepared.
"""

from __future__ import annotations

import hashlib
import http.client
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
    """Download ``url`` into ``part``, resuming from its current length when the server allows it.

    A connection that closes before the announced length raises ``ConnectionError`` and keeps ``part``
    (``http.client`` returns a short read there instead of raising), so a rerun resumes it. A server that answers
    a resume request with something else than the rest of the file (status 200 with an error page, say) leaves
    ``part`` untouched too: it starts over only when the answer has the file's full size (it ignored ``Range``).
    """
    from tqdm.auto import tqdm

    from mlic_lib.utils import bar_disabled

    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()  # longer than the file itself: it cannot be resumed (the server would answer 416)
        have = 0
    if expected_size is not None and have == expected_size:
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        status = getattr(response, "status", 200)
        resumed = have > 0 and status == 206
        if have and not resumed:
            if expected_size is not None and response.length != expected_size:
                raise ConnectionError(
                    f"asked for the rest of {part.name} ({have:,} bytes kept), the server answered status {status} "
                    f"with {response.length if response.length is not None else 'an unknown number of'} bytes, "
                    f"not the {expected_size:,}-byte file; the partial file is kept (delete it to start over)")
            have = 0  # the server ignored Range and sends the whole file: start over
        total = response.length + have if response.length is not None else expected_size
        with open(part, "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
            disable=bar_disabled(progress), leave=False,
        ) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))
    got = part.stat().st_size
    if total is not None and got < total:
        raise ConnectionError(f"the connection closed after {got:,} of {total:,} bytes")


def _matches(file: RemoteFile, path: Path) -> tuple[bool, int, str]:
    """``(size and sha256 agree with the registry, size, sha256)`` of the local copy ``path`` of ``file``."""
    size, digest = path.stat().st_size, sha256_of(path)
    ok = (file.size is None or size == file.size) and (file.sha256 is None or digest == file.sha256)
    return ok, size, digest


def download(file: RemoteFile, folder: Path, progress: bool = True, allow_unverified: bool = False,
             reverify: bool = False) -> Path:
    """Download ``file`` into ``folder`` (resuming), verify it, and return the verified path.

    The URLs are tried in order: a connection error or a file of the wrong size or sha256 (an error page
    served with status 200, say) moves on to the next one. A wrong file is moved aside to ``*.bad`` and
    never used; an interrupted one stays as ``*.part`` for the next run to resume. A file already downloaded
    is returned after a size check (its sha256 was verified when it was renamed into place; a file copied
    there by hand and cut short is caught by its size), or, with ``reverify``, after a sha256 check too; one
    that fails is moved aside and downloaded anew.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / file.name
    if final.is_file():
        size_ok = file.size is None or final.stat().st_size == file.size
        if size_ok and (not reverify or _matches(file, final)[0]):
            return final
        bad = final.with_name(final.name + ".bad")
        final.replace(bad)
        what = "its size" if not size_ok else "its sha256"
        print(f"{final} no longer matches {what}: moved to {bad}, downloading again", file=sys.stderr)
    if file.sha256 is None and not allow_unverified:
        raise ChecksumError(
            f"{file.name} has no recorded sha256 in mlic_lib/data/registry.py; rerun with --allow-unverified "
            "to download it anyway (the computed digest is printed so it can be recorded)."
        )
    part = folder / (file.name + ".part")
    errors, bad = [], None
    for url in file.urls:
        try:
            _fetch(url, part, file.size, progress)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # IncompleteRead is neither
            errors.append(f"{url}: {err!r}" if isinstance(err, http.client.HTTPException) else f"{url}: {err}")
            continue
        ok, size, digest = _matches(file, part)
        if not ok:
            bad = part.with_suffix(".bad")
            part.replace(bad)
            errors.append(f"{url}: expected {file.size} bytes with sha256 {file.sha256}, got {size} bytes with "
                          f"sha256 {digest}")
            continue
        if file.sha256 is None:
            print(f"{file.name}: sha256 {digest} (not verified: record it in the registry)", file=sys.stderr)
        part.replace(final)
        return final
    if bad is not None:
        raise ChecksumError(
            f"{file.name}: no URL gave the expected file. The last wrong download was moved to {bad} and not "
            "used; delete it and rerun to download again.\n  " + "\n  ".join(errors)
        )
    kept = (f"the partial file {part} is kept; rerun to resume" if part.exists() and part.stat().st_size else
            "nothing was downloaded: check the network, or use `mlic data fake` for an offline dry run")
    raise ConnectionError(f"could not download {file.name} ({kept}):\n  " + "\n  ".join(errors))


def _leaves(name: str) -> bool:
    p = Path(name)
    return p.is_absolute() or ".." in p.parts


def _safe_members(names: list[str], links: dict[str, str] | None = None) -> None:
    """Refuse an archive with a member path, or a link target (``links``: member -> target), that would leave the
    target folder (absolute, or with ``..``); the check does not rely on tarfile's ``data`` filter, which Python
    before 3.10.12 / 3.11.4 lacks. No dataset archive has a link; a relative one without ``..`` is allowed."""
    for name in names:
        if _leaves(name):
            raise RuntimeError(f"refusing to extract {name!r}: it would leave the target folder")
    for name, target in (links or {}).items():
        if _leaves(target):
            raise RuntimeError(f"refusing to extract the link {name!r} -> {target!r}: it points outside the target "
                               "folder")


def _merge(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` by renames: a folder both have is merged entry by entry, anything else replaced."""
    if src.is_dir() and not src.is_symlink() and dst.is_dir() and not dst.is_symlink():
        for item in src.iterdir():
            _merge(item, dst / item.name)
        src.rmdir()
        return
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    src.replace(dst)


def unpack(archive: Path, dest: Path) -> None:
    """Extract a tar/tar.gz/zip archive into ``dest`` via a temporary folder (no partial results).

    The extracted entries are then moved into ``dest`` by renames, merged with what is there (the VOC tars
    share ``VOCdevkit/``), so a second archive costs no copy of the first.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members(z.namelist())
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                members = t.getmembers()
                _safe_members([m.name for m in members], {m.name: m.linkname for m in members if m.issym()} | {
                    m.name: m.linkname for m in members if m.islnk()})
                # the "data" filter (Python >= 3.10.12 / 3.11.4) also refuses links that leave the folder
                t.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        for item in tmp.iterdir():
            _merge(item, dest / item.name)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, getattr(tarfile, "FilterError", ())):  # the data filter refused a member: not a cut file
            raise RuntimeError(f"refusing to extract {archive}: {err}. Nothing was written to {dest}") from err
        raise RuntimeError(f"could not unpack {archive}: {err!r}. Nothing was written to {dest}; delete the archive "
                           "and rerun to download it again") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _downloads(root: Path, entry: DatasetEntry) -> Path:
    """Where ``entry``'s files are downloaded: one folder per dataset (VOC-LT and COCO-LT share file names)."""
    return root / "downloads" / entry.key


def _stamp(root: Path, entry: DatasetEntry, file: RemoteFile) -> Path:
    """The file written once ``file`` of ``entry`` is downloaded, verified and unpacked (or copied)."""
    return _downloads(root, entry) / f"{file.name}.prepared"


def prepare(key: str, root: Path | None = None, progress: bool = True, allow_unverified: bool = False,
            keep_archives: bool = True, force: bool = False) -> Path:
    """Download, verify and unpack dataset ``key`` under ``root`` (default ``$MLIC_DATA``).

    A file whose ``.prepared`` stamp exists is skipped; if the dataset's marker is gone even so (its folder
    was deleted by hand), the stamps are discarded and everything is unpacked (or downloaded) again.
    ``force`` does that whatever the marker says, to repair a dataset with a deleted or damaged file: each
    kept archive is checked against its sha256 again (and downloaded anew if it no longer matches), then
    unpacked over the dataset's folder.
    """
    entry = get(key)
    root = Path(root) if root is not None else data_root()
    if not entry.files:
        raise RuntimeError(f"{entry.title}: nothing to download. {entry.notes}")
    downloads = _downloads(root, entry)
    if force or not (root / entry.marker).exists():
        for file in entry.files:
            _stamp(root, entry, file).unlink(missing_ok=True)
    for file in entry.files:
        stamp = _stamp(root, entry, file)
        if stamp.is_file():
            continue
        path = download(file, downloads, progress, allow_unverified, reverify=force)
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
    from .fake import forget_fake

    forget_fake(root, key)  # real files now, where `mlic data fake --force` had written synthetic ones
    missing = [n for n in entry.needs if status(get(n), root) != "present"]
    if missing:
        print(f"{entry.title} also needs: {', '.join(missing)} (run `mlic data prepare NAME` for each)",
              file=sys.stderr)
    return root / entry.marker


def status(entry: DatasetEntry, root: Path) -> str:
    """``present``, ``missing``, ``partial download (...)`` or ``incomplete (...)`` for ``entry`` under ``root``.

    Present means the marker exists and, if ``mlic data prepare`` worked on the dataset (some file has a
    stamp), every file was prepared: a run interrupted after the first archive is not reported as present.
    Data placed by hand (no stamps) is judged by the marker alone.
    """
    stamped = [f.name for f in entry.files if _stamp(root, entry, f).is_file()]
    if (root / entry.marker).exists() and (not stamped or len(stamped) == len(entry.files)):
        from .fake import fake_names

        if entry.key in fake_names(root):
            return "present (synthetic files from `mlic data fake`, not the real dataset)"
        return "present"
    if stamped and len(stamped) < len(entry.files):
        return (f"incomplete ({len(stamped)} of {len(entry.files)} files prepared; rerun "
                f"`mlic data prepare {entry.key}`)")
    partial = [f.name for f in entry.files if (_downloads(root, entry) / (f.name + ".part")).exists()]
    return f"partial download ({', '.join(partial)})" if partial else "missing"


def check(root: Path | None = None) -> dict[str, str]:
    """``{dataset: 'present' | 'missing' | 'partial download (...)' | 'incomplete (...)'}`` per registry entry."""
    root = Path(root) if root is not None else data_root()
    return {key: status(entry, root) for key, entry in DATASETS.items()}


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for k, v in check().items():
        print(f"{k:9s} {v}")
