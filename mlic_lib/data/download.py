"""Resumable, sha256-verified downloads of the real datasets into ``$MLIC_DATA``.

``prepare("voc2007")`` downloads every file of the registry entry into ``$MLIC_DATA/downloads/voc2007``
(one folder per dataset, since VOC-LT and COCO-LT both have a ``class_freq.pkl``), continuing a partial
``.part`` file with an HTTP ``Range`` request (within the run too: a connection that drops after bringing bytes is
resumed up to :data:`RESUMES` times); it checks each file's size and sha256, and unpacks it. One ``prepare`` runs on
a data folder at a time (a lock in ``downloads/``). A checksum mismatch is an error: the bad file is moved aside to
``*.bad`` and never extracted (and removed once a later download is verified). Extraction goes to a temporary
folder first and is moved into place at the end, so an interrupted run never leaves a half-unpacked dataset looking
complete; a ``.prepared`` stamp per file makes a rerun skip finished work, and ``check()`` reports a dataset as
present only when every one of its files was prepared.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from mlic_lib.data.paths import data_root
from mlic_lib.data.registry import DATASETS, DatasetEntry, RemoteFile, get
from mlic_lib.file_lock import exclusive

CHUNK = 1 << 20


RESUMES = 10  # automatic resumes of one URL, each after a connection that closed early having brought bytes
RESUME_WAIT = 2.0  # seconds before each automatic resume


class ChecksumError(RuntimeError):
    """A downloaded file does not have the registry's sha256 (or size)."""


class LocalWriteError(RuntimeError):
    """A download could not be written on this machine (a full disk, a file-size limit, no permission): unlike a
    network error, another URL would not help, so :func:`download` stops at once."""


class _Cut(ConnectionError):
    """The connection closed (or failed) before the end of the answer, after ``received`` bytes of it were kept."""

    def __init__(self, message: str, received: int):
        super().__init__(message)
        self.received = received


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _content_range(header: str | None) -> tuple[int, int, int | None] | None:
    """``(start, end, total)`` of a ``Content-Range: bytes START-END/TOTAL`` header (``total`` is ``None`` for
    ``*``, an unknown length), or ``None`` when the header is missing or malformed."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header or "")
    if match is None:
        return None
    return int(match[1]), int(match[2]), None if match[3] == "*" else int(match[3])


#: the end of every :class:`LocalWriteError` message
_MORE_SPACE = "free some space, or set MLIC_DATA to a folder on a larger disk"


def _write_error(path: Path, err: OSError) -> str:
    """The message of a :class:`LocalWriteError`: what failed, the free space, and the fix."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**30:.1f} GiB free in {path.parent}"
    except OSError:
        free = f"{path.parent} cannot be read"
    return f"could not write {path}: {err.strerror or err} ({free}): {_MORE_SPACE}; a rerun resumes the partial file"


def _need_space(folder: Path, needed: int, what: str) -> None:
    """:class:`LocalWriteError` before ``what`` starts when ``folder``'s disk has fewer than ``needed`` bytes free
    (COCO's archives are 13-19 GB, and unpacking one needs about its size again), instead of failing part-way."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise LocalWriteError(f"{what} needs about {needed / 2**30:.1f} GiB in {folder}, which has "
                              f"{free / 2**30:.1f} GiB free: {_MORE_SPACE}")


def _copy(response, out, bar) -> int:
    """Copy ``response`` into ``out`` and return the bytes copied; a failed read raises :class:`_Cut` with them."""
    received = 0
    while True:
        try:
            block = response.read(CHUNK)
        except (OSError, http.client.HTTPException) as err:  # a reset, a timeout, a chunk cut short
            raise _Cut(repr(err), received) from err
        if not block:
            return received
        out.write(block)
        received += len(block)
        bar.update(len(block))


def _fetch(url: str, part: Path, expected_size: int | None, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming from its current length when the server allows it.

    A connection that closes early after bringing bytes is resumed automatically, up to :data:`RESUMES` times, after
    :data:`RESUME_WAIT` seconds; one that brings nothing raises ``ConnectionError`` and keeps ``part`` for a rerun
    (or the next URL) to resume. A server that sends the file in several partial answers is asked for the rest until
    it is whole.
    """
    resumes = 0
    while True:
        try:
            if _fetch_once(url, part, expected_size, progress):
                return
        except _Cut as err:
            if not err.received or resumes >= RESUMES:
                raise
            resumes += 1
            print(f"{part.name.removesuffix('.part')}: {err}; resuming in {RESUME_WAIT:g} s ({resumes} of "
                  f"{RESUMES})", file=sys.stderr)
            time.sleep(RESUME_WAIT)


def _fetch_once(url: str, part: Path, expected_size: int | None, progress: bool) -> bool:
    """One request of :func:`_fetch`; ``True`` once ``part`` holds the whole file (as far as sizes tell).

    A server that answers a resume request with the whole file (status 200: it ignores ``Range``) has it written to
    a side file, which replaces ``part`` only if it has the file's size: an error page served with status 200, with
    or without a length, never overwrites a partial download (COCO's single URLs would lose gigabytes). A partial
    answer (206) for another range than the rest of ``part``, or a 416 (the server cannot serve that range: its
    file is not longer than ``part``), discards ``part``; the caller then starts over.
    """
    from tqdm.auto import tqdm

    from mlic_lib.utils import bar_disabled

    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()  # longer than the file itself: it cannot be resumed (the server would answer 416)
        have = 0
    if expected_size is not None and have == expected_size:
        return True
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response_cm = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if have and err.code == 416:  # the server's file is not longer than the kept part: it cannot be resumed
            part.unlink()
            print(f"{part.name}: the server cannot resume from byte {have:,} (status 416); starting over",
                  file=sys.stderr)
            return False
        raise
    with response_cm as response:
        status = getattr(response, "status", 200)
        target, start, end = part, 0, response.length
        total = response.length if response.length is not None else expected_size
        if have and status == 206:
            answered = _content_range(response.headers.get("Content-Range"))
            if answered is None or answered[0] != have or answered[1] < have:
                # a 206 that does not continue the kept part (another range, or none named): appending it would
                # corrupt the file, so start over
                part.unlink()
                print(f"{part.name}: the server answered another range than bytes {have:,}- "
                      f"({response.headers.get('Content-Range')!r}); starting over", file=sys.stderr)
                return False
            start, end = have, answered[1] + 1
            total = answered[2] if answered[2] is not None else expected_size
        elif have:
            if expected_size is not None and response.length is not None and response.length != expected_size:
                raise ConnectionError(
                    f"asked for the rest of {part.name} ({have:,} bytes kept), the server answered status {status} "
                    f"with {response.length:,} bytes, not the {expected_size:,}-byte file; the partial file is kept")
            target = part.with_name(part.name + ".whole")  # the server ignored Range: the whole file, kept aside
        try:
            with open(target, "ab" if start else "wb") as out, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
                disable=bar_disabled(progress), leave=False,
            ) as bar:
                received = _copy(response, out, bar)
        except BaseException as err:  # a cut, a local write error, an interrupt
            if target != part and target.exists():  # (opening it may be what failed)
                _keep_longer(target, part)
            if isinstance(err, _Cut):
                raise _Cut(f"the connection failed after {start + err.received:,} bytes: {err}",
                           err.received) from err
            if isinstance(err, OSError):
                raise LocalWriteError(_write_error(target, err)) from err
            raise
    got = start + received
    if target != part:
        if end is not None and got < end:  # the whole file, cut short
            _keep_longer(target, part)
            raise _Cut(f"the connection closed after {got:,} of {end:,} bytes", received)
        if expected_size is not None and got != expected_size:
            target.unlink()
            raise ConnectionError(
                f"asked for the rest of {part.name} ({have:,} bytes kept), the server answered status {status} "
                f"with {got:,} bytes, not the {expected_size:,}-byte file; the partial file is kept")
        target.replace(part)
        return True
    expected = end if end is not None else total  # the end of this answer, or of the file when it gives none
    if expected is not None and got < expected:
        raise _Cut(f"the connection closed after {got:,} of {expected:,} bytes", received)
    return total is None or got >= total  # a partial answer short of the file's end: the caller asks for the rest


def _keep_longer(whole: Path, part: Path) -> None:
    """After a whole-file answer was cut: keep the longer of the two starts of the file as ``part``."""
    if whole.stat().st_size > part.stat().st_size:
        whole.replace(part)
    else:
        whole.unlink()


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
    that fails is moved aside and downloaded anew. A file that cannot be written here (a full disk) raises
    :class:`LocalWriteError` at once, without trying the other URLs, and so does a disk without room for the rest of
    the file before the download starts.
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
    if file.size is not None:
        _need_space(folder, file.size - (part.stat().st_size if part.exists() else 0), f"downloading {file.name}")
    errors, bad, codes = [], None, []
    for url in file.urls:
        try:
            _fetch(url, part, file.size, progress)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # IncompleteRead is neither
            codes.append(err.code if isinstance(err, urllib.error.HTTPError) else None)  # the server's error status
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
        earlier = folder / (file.name + ".bad")  # a wrong download of an earlier attempt, no longer needed
        if earlier.is_file():
            earlier.unlink()
            print(f"{file.name} is verified: removed {earlier}, the wrong download of an earlier attempt",
                  file=sys.stderr)
        return final
    if bad is not None:
        raise ChecksumError(
            f"{file.name}: no URL gave the expected file. The last wrong download was moved to {bad} and not used "
            "(a rerun tries again; the .bad file is removed once a download is verified).\n  " + "\n  ".join(errors)
        )
    if part.exists() and part.stat().st_size:
        kept = f"the partial file {part} is kept; rerun to resume"
    elif codes and all(c in (404, 410) for c in codes):
        kept = ("every server answered that it has no such file: it may have moved; its URLs are in "
                "mlic_lib/data/registry.py")
    elif codes and all(c is not None for c in codes):
        kept = ("every server answered with an error status: if it is 429 or 5xx the server is busy or failing, "
                "retry later")
    else:
        kept = "nothing was downloaded: check the network, or use `mlic data fake` for an offline dry run"
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
    """Move ``src`` to ``dst`` by renames: a folder both have is merged entry by entry, anything else replaced.

    A ``dst`` that is a link to a folder (``VOCdevkit`` linked to a larger disk, say) is merged into and kept; a move
    into it from another file system is a copy (``shutil.move``) into a hidden sibling (``.<name>.moving``) that a
    rename then puts in place, so an interrupted copy never leaves a half-filled ``dst``."""
    if src.is_dir() and not src.is_symlink() and dst.is_dir():
        for item in src.iterdir():
            _merge(item, dst / item.name)
        src.rmdir()
        return
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        src.replace(dst)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        # a copy across file systems takes long: copy next to dst first, then rename it into place, so that an
        # interrupted copy never leaves a half-filled dst (whose marker would make the dataset look present)
        moving = dst.with_name(f".{dst.name}.moving")
        if moving.is_dir() and not moving.is_symlink():
            shutil.rmtree(moving)  # what an interrupted copy left
        elif moving.exists() or moving.is_symlink():
            moving.unlink()
        shutil.move(src, moving)
        os.replace(moving, dst)  # within one folder of the other file system: a plain rename


def unpack(archive: Path, dest: Path) -> Path | None:
    """Extract a tar/tar.gz/zip archive into ``dest`` via a temporary folder (no partial results).

    A disk without about the archive's size free is a :class:`LocalWriteError` before anything is written.
    The temporary folder is ``dest/.extract-<archive name>``, emptied first (a killed extraction's leftovers) and
    removed afterwards. The extracted entries are then moved into ``dest`` by renames, merged with what is there
    (the VOC tars share ``VOCdevkit/``), so a second archive costs no copy of the first. Returns the path of the
    archive's first regular file under ``dest`` (``None`` for an archive of folders only): :func:`prepare`'s sign
    that the archive's content is still there.
    """
    dest.mkdir(parents=True, exist_ok=True)
    _need_space(dest, archive.stat().st_size, f"unpacking {archive.name}")  # about the archive's size again
    # one fixed folder per archive: what a killed extraction (SIGTERM/SIGKILL skip the cleanup below) left there
    # is removed by the next attempt, not left behind under a new random name each time (GBs for COCO)
    tmp = dest / f".extract-{archive.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members(z.namelist())
                z.extractall(tmp)
                first = next((n for n in z.namelist() if not n.endswith("/")), None)
        else:
            with tarfile.open(archive) as t:
                members = t.getmembers()
                _safe_members([m.name for m in members], {m.name: m.linkname for m in members if m.issym()} | {
                    m.name: m.linkname for m in members if m.islnk()})
                # the "data" filter (Python >= 3.10.12 / 3.11.4) also refuses links that leave the folder
                t.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                first = next((m.name for m in members if m.isfile()), None)
        for item in tmp.iterdir():
            _merge(item, dest / item.name)
        return dest / first if first is not None else None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:  # zlib: a damaged deflate stream
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
    """The file written once ``file`` of ``entry`` is downloaded, verified and unpacked (or copied): JSON with its
    ``sha256`` and ``produced``, one file it wrote (relative to the data root)."""
    return _downloads(root, entry) / f"{file.name}.prepared"


def _has_stamps(root: Path, entry: DatasetEntry) -> bool:
    """``mlic data prepare`` worked on ``entry`` under ``root`` (some file has a stamp); hand-placed data has none."""
    return any(_stamp(root, entry, f).is_file() for f in entry.files)


def _lacking(root: Path, entry: DatasetEntry) -> list[str]:
    """The ``also`` paths of ``entry`` missing under ``root`` (the first alternative of each)."""
    return [alts[0] for alts in entry.also if not any((root / a).exists() for a in alts)]


def _done(root: Path, entry: DatasetEntry, file: RemoteFile) -> bool:
    """``file`` has a stamp and the file it produced is still there (a stamp of an older release, the bare sha256,
    is taken at its word)."""
    stamp = _stamp(root, entry, file)
    if not stamp.is_file():
        return False
    try:
        produced = json.loads(stamp.read_text()).get("produced")
    except (ValueError, AttributeError):
        return True
    return produced is None or (root / produced).exists()


def prepare(key: str, root: Path | None = None, progress: bool = True, allow_unverified: bool = False,
            keep_archives: bool = True, force: bool = False) -> Path:
    """Download, verify and unpack dataset ``key`` under ``root`` (default ``$MLIC_DATA``).

    A file whose ``.prepared`` stamp exists, and the file it unpacked too, is skipped, so an interrupted run goes on
    with the files it had not finished, and a file whose content was deleted since (the dataset's folder removed by
    hand) is unpacked (or downloaded) again. A dataset whose marker and ``also`` paths exist but that has no stamps
    (placed by hand, or its ``downloads/`` folder was deleted to free space) is taken as present, as
    ``mlic data check`` reports it.
    If the marker is still missing after that, every file is redone. ``force`` redoes every file whatever the stamps
    and the marker say, to repair a dataset with a deleted or damaged file: each kept archive is checked against its
    sha256 again (and downloaded anew if it no longer matches), then unpacked over the dataset's folder; a file's
    stamp is replaced only once it is redone, so an interrupted ``force`` leaves the status as it was.
    """
    entry = get(key)
    root = Path(root) if root is not None else data_root()
    if not entry.files:
        raise RuntimeError(f"{entry.title}: nothing to download. {entry.notes}")
    from .fake import fake_names, forget_fake

    marker = root / entry.marker
    lacking = _lacking(root, entry)
    # synthetic files from `mlic data fake` are not a present dataset: the real one replaces them; nor is a
    # marker without the entry's other paths (COCO's annotations placed by hand without the images)
    if (not force and marker.exists() and not lacking and not _has_stamps(root, entry)
            and key not in fake_names(root)):
        print(f"{entry.title} is already present under {root} ({entry.marker}); use --force to download and unpack "
              "it again", file=sys.stderr)
        return marker
    # two runs on one data folder would append to one .part file (damaging an archive the other had verified) or
    # remove each other's extraction; the VOC datasets share VOCdevkit/, so the lock is the whole folder's
    busy = (f"another `mlic data prepare` is running on {root}: wait for it to finish, then rerun `mlic data prepare "
            f"{key}` (datasets in one data folder are prepared one at a time)")
    if force or not marker.exists() or not all(_done(root, entry, f) for f in entry.files):  # else nothing to write:
        with exclusive(root / "downloads" / ".lock", busy):  # a prepared, read-only data folder needs no lock
            _prepare_files(root, entry, progress, allow_unverified, keep_archives, force)
            if not marker.exists() and not force:  # the marker alone was deleted by hand: redo every file
                _prepare_files(root, entry, progress, allow_unverified, keep_archives, True)
    if not marker.exists():
        raise RuntimeError(f"{entry.title}: every file was downloaded, verified and unpacked, but {marker} is "
                           "missing: the archives do not hold what mlic_lib/data/registry.py expects")
    forget_fake(root, key)  # real files now, where `mlic data fake --force` had written synthetic ones
    missing = [n for n in entry.needs if status(get(n), root) != "present"]
    if missing:
        print(f"{entry.title} also needs: {', '.join(missing)} (run `mlic data prepare NAME` for each)",
              file=sys.stderr)
    return marker


def _prepare_files(root: Path, entry: DatasetEntry, progress: bool, allow_unverified: bool, keep_archives: bool,
                   redo: bool) -> None:
    """Download, verify and unpack (or copy) each of ``entry``'s files without a stamp (every file with
    ``redo``), writing its stamp once it is done."""
    downloads = _downloads(root, entry)
    for file in entry.files:
        stamp = _stamp(root, entry, file)
        if not redo and _done(root, entry, file):
            continue
        path = download(file, downloads, progress, allow_unverified, reverify=redo)
        dest = root / file.dest
        if file.action == "extract":
            produced = unpack(path, dest)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            tmp = dest / f".{file.saved_name}.tmp"
            shutil.copy2(path, tmp)
            produced = tmp.replace(dest / file.saved_name)
        rel = os.path.relpath(produced, root) if produced is not None else None
        tmp_stamp = stamp.with_name(stamp.name + ".tmp")
        tmp_stamp.write_text(json.dumps({"sha256": file.sha256 or "unverified", "produced": rel}))
        tmp_stamp.replace(stamp)
        if not keep_archives and file.action == "extract":
            path.unlink()


def status(entry: DatasetEntry, root: Path) -> str:
    """``present``, ``missing``, ``partial download (...)`` or ``incomplete (...)`` for ``entry`` under ``root``.

    Present means the marker (and each of the entry's ``also`` paths) exists and, if ``mlic data prepare`` worked
    on the dataset (some file has a stamp), every file was prepared and what it unpacked is still there: a run
    interrupted after the first archive is not reported as present. Data placed by hand (no stamps) is judged by
    the paths alone. A present dataset that uses another one that is not (``needs``) says so:
    ``present (needs voc2012: missing)``.
    """
    has_stamps = _has_stamps(root, entry)
    stamped = [f.name for f in entry.files if _done(root, entry, f)]
    lacking = _lacking(root, entry)
    if (root / entry.marker).exists() and lacking:
        return f"incomplete (missing: {', '.join(lacking)})"
    if (root / entry.marker).exists() and (not has_stamps or len(stamped) == len(entry.files)):
        from .fake import fake_names

        needs = [f"needs {n}: {st}" for n in entry.needs if not (st := status(get(n), root)).startswith("present")]
        if entry.key in fake_names(root):
            needs.insert(0, "synthetic files from `mlic data fake`, not the real dataset")
        return "present" + (f" ({'; '.join(needs)})" if needs else "")
    if stamped and len(stamped) < len(entry.files):
        return (f"incomplete ({len(stamped)} of {len(entry.files)} files prepared; rerun "
                f"`mlic data prepare {entry.key}`)")
    partial = [f.name for f in entry.files if (_downloads(root, entry) / (f.name + ".part")).exists()]
    return f"partial download ({', '.join(partial)})" if partial else "missing"


def usable(state: str) -> bool:
    """Whether a :func:`status` says the dataset can be read: present, and so is every dataset it needs
    (``present (needs voc2012: missing)`` is not)."""
    return state.startswith("present") and "needs " not in state


def check(root: Path | None = None) -> dict[str, str]:
    """``{dataset: 'present' | 'missing' | 'partial download (...)' | 'incomplete (...)'}`` per registry entry."""
    root = Path(root) if root is not None else data_root()
    return {key: status(entry, root) for key, entry in DATASETS.items()}


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for k, v in check().items():
        print(f"{k:9s} {v}")
