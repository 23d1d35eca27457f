"""Dataset downloads, offline: a loopback HTTP server (with Range support) serves small fixture archives."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import re
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from mlic_lib import cli
from mlic_lib.data import download, registry
from mlic_lib.data.longtail import read_lt_split
from mlic_lib.data.paths import reference_data_dir
from mlic_lib.data.registry import DatasetEntry, RemoteFile


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    log: list[tuple[str, str | None]] = []
    cut: dict[str, int] = {}  # path -> bytes sent before the connection closes (Content-Length says more)
    no_range: set[str] = set()  # paths whose server ignores Range (answers 200 with the whole body)
    chunked_cut: dict[str, int] = {}  # path -> bytes sent in one chunk of a chunked answer that then closes
    wrong_start: set[str] = set()  # paths that answer a Range request with 206 from byte 0
    no_satisfy: set[str] = set()  # paths that answer a Range request with 416
    piece: dict[str, int] = {}  # path -> the most bytes one answer to a Range request holds (a legal short 206)
    chunked_whole: set[str] = set()  # paths answered with status 200 and the whole body chunked (no length)
    status: dict[str, int] = {}  # path -> the error status it answers with (503: busy)
    star_total: set[str] = set()  # paths whose 206 answers give the total length as * (unknown)

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path)
        self.log.append((self.path, self.headers.get("Range")))
        if self.path in self.status:
            self.send_error(self.status[self.path])
            return
        if body is None:
            self.send_error(404)
            return
        if self.path in self.chunked_whole:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
            return
        if self.path in self.chunked_cut:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            n = self.chunked_cut[self.path]
            self.wfile.write(f"{len(body):x}\r\n".encode() + body[:n])  # a chunk announced whole, cut short
            self.close_connection = True
            return
        rng = self.headers.get("Range")
        if rng and self.path in self.no_satisfy:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if rng and self.path not in self.no_range:
            start = 0 if self.path in self.wrong_start else int(re.match(r"bytes=(\d+)-", rng).group(1))
            end = min(len(body), start + self.piece.get(self.path, len(body)))
            self.send_response(206)
            total = "*" if self.path in self.star_total else len(body)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
            body = body[start:end]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: self.cut.get(self.path, len(body))])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.log, _Handler.cut, _Handler.no_range, _Handler.chunked_cut = {}, [], {}, set(), {}
    _Handler.wrong_start, _Handler.no_satisfy, _Handler.piece, _Handler.chunked_whole = set(), set(), {}, set()
    _Handler.status, _Handler.star_total = {}, set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_automatic_resumes(monkeypatch):
    """A connection cut early is not resumed within the run here (tests that check the resumes turn them on)."""
    monkeypatch.setattr(download, "RESUMES", 0)
    monkeypatch.setattr(download, "RESUME_WAIT", 0.0)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _entry(monkeypatch, url, body, name="fake.tar", sha=None, marker="VOCdevkit/VOC2007/ImageSets/Main/test.txt",
           action="extract", dest="."):
    sha = hashlib.sha256(body).hexdigest() if sha is None else sha
    entry = DatasetEntry("fake", "Fake VOC", (RemoteFile(name, (f"{url}/{name}",), len(body), sha or None, dest,
                                                         action),), marker)
    monkeypatch.setitem(registry.DATASETS, "fake", entry)
    return entry


VOC_TAR = _tar({"VOCdevkit/VOC2007/ImageSets/Main/test.txt": b"000001\n",
                "VOCdevkit/VOC2007/Annotations/000001.xml": b"<annotation/>"})


def test_prepare_downloads_verifies_unpacks_and_skips_on_rerun(server, tmp_path, monkeypatch):
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    _entry(monkeypatch, url, VOC_TAR)
    (tmp_path / "MLIC_FAKE_DATA.txt").write_text("fake\nmnist\n")  # as if `mlic data fake --force` had been here
    marker = tmp_path / "VOCdevkit/VOC2007/ImageSets/Main/test.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("synthetic\n")  # its marker, without stamps: not taken for the real dataset
    marker = download.prepare("fake", tmp_path, progress=False)
    assert marker.read_text() == "000001\n"
    assert (tmp_path / "VOCdevkit/VOC2007/Annotations/000001.xml").is_file()
    assert download.check(tmp_path)["fake"] == "present"  # real now: no longer reported as synthetic
    assert (tmp_path / "MLIC_FAKE_DATA.txt").read_text() == "mnist\n"
    hits = len(handler.log)
    download.prepare("fake", tmp_path, progress=False)
    assert len(handler.log) == hits, "a prepared dataset must not be downloaded again"
    assert not list(tmp_path.glob(".extract-*")), "temporary extraction folder left behind"


def test_a_marker_without_the_entrys_other_paths_is_not_taken_as_present(server, tmp_path, monkeypatch):
    """COCO's annotations placed by hand without the images: prepare used to say "already present" (its marker is
    an annotation file) and download nothing; it now fetches the dataset."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    entry = _entry(monkeypatch, url, VOC_TAR)
    entry = dataclasses.replace(entry, also=(("VOCdevkit/VOC2007/Annotations",),))
    monkeypatch.setitem(registry.DATASETS, "fake", entry)
    marker = tmp_path / entry.marker
    marker.parent.mkdir(parents=True)
    marker.write_text("000001\n")  # by hand, without the Annotations folder
    assert download.check(tmp_path)["fake"] == "incomplete (missing: VOCdevkit/VOC2007/Annotations)"
    download.prepare("fake", tmp_path, progress=False)
    assert len(handler.log) == 1 and download.check(tmp_path)["fake"] == "present"
    assert (tmp_path / "VOCdevkit/VOC2007/Annotations/000001.xml").is_file()


@pytest.mark.parametrize("kept, request_range", [(1000, "bytes=1000-"), (None, None)])
def test_a_partial_file_is_resumed_or_discarded(server, tmp_path, monkeypatch, kept, request_range):
    """A ``.part`` shorter than the file resumes with a Range request; one longer than it starts over."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    entry = _entry(monkeypatch, url, VOC_TAR)
    downloads = tmp_path / "downloads" / "fake"
    downloads.mkdir(parents=True)
    (downloads / "fake.tar.part").write_bytes(VOC_TAR[:kept] if kept else VOC_TAR + b"junk")
    assert download.check(tmp_path)["fake"].startswith("partial download")
    assert download.download(entry.files[0], downloads, progress=False).read_bytes() == VOC_TAR
    assert handler.log == [("/fake.tar", request_range)]


def test_a_connection_closed_early_keeps_the_partial_file_and_a_rerun_resumes(server, tmp_path, monkeypatch):
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    handler.cut["/fake.tar"] = 3000
    _entry(monkeypatch, url, VOC_TAR)
    with pytest.raises(ConnectionError, match="closed after 3,000 of"):
        download.prepare("fake", tmp_path, progress=False)
    part = tmp_path / "downloads" / "fake" / "fake.tar.part"
    assert part.stat().st_size == 3000 and not part.with_suffix(".bad").exists()
    assert download.check(tmp_path)["fake"] == "partial download (fake.tar)"
    handler.cut.clear()
    download.prepare("fake", tmp_path, progress=False)
    assert handler.log[-1] == ("/fake.tar", "bytes=3000-")
    assert download.check(tmp_path)["fake"] == "present"


def test_a_resumed_download_cut_short_again_keeps_what_it_has(server, tmp_path, monkeypatch):
    """A resume that is cut short too must count the bytes it already had (the expected total is the whole file):
    the longer partial file is kept for the next resume, not judged wrong and moved to .bad."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    handler.cut["/fake.tar"] = 2000  # of the 3,000 bytes the resume asks for
    entry = _entry(monkeypatch, url, VOC_TAR)
    part = tmp_path / "fake.tar.part"
    part.write_bytes(VOC_TAR[: len(VOC_TAR) - 3000])
    with pytest.raises(ConnectionError, match="closed after"):
        download.download(entry.files[0], tmp_path, progress=False)
    assert part.stat().st_size == len(VOC_TAR) - 1000 and not list(tmp_path.glob("*.bad"))


def test_a_connection_cut_early_is_resumed_within_the_run_while_bytes_arrive(server, tmp_path, monkeypatch, capsys):
    """One dropped connection used to end the run (COCO's files have one URL each: an overnight download stopped at
    the first network blip); each cut that brought bytes is now resumed, up to ``RESUMES`` times."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    handler.cut["/fake.tar"] = 3000  # every answer, the resumes' too, closes after 3,000 bytes
    entry = _entry(monkeypatch, url, VOC_TAR)
    monkeypatch.setattr(download, "RESUMES", 3)
    assert download.download(entry.files[0], tmp_path, progress=False).read_bytes() == VOC_TAR
    assert handler.log == [("/fake.tar", None), ("/fake.tar", "bytes=3000-"), ("/fake.tar", "bytes=6000-"),
                           ("/fake.tar", "bytes=9000-")]
    assert "closed after 3,000 of 10,240 bytes; resuming in 0 s (1 of 3)" in capsys.readouterr().err
    (tmp_path / "fake.tar").unlink()
    handler.log.clear()
    monkeypatch.setattr(download, "RESUMES", 1)  # too few: the partial file is kept for a rerun
    with pytest.raises(ConnectionError, match="closed after 6,000 of 10,240 bytes"):
        download.download(entry.files[0], tmp_path, progress=False)
    assert (tmp_path / "fake.tar.part").stat().st_size == 6000 and len(handler.log) == 2


def test_a_server_sending_the_file_in_short_partial_answers_is_asked_for_the_rest(server, tmp_path, monkeypatch):
    """A 206 for ``bytes 500-4499/10240`` is a legal answer to ``Range: bytes=500-``: it was taken for the whole
    rest (its length plus the kept bytes as the file's size), so a good partial file ended as a wrong one."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    handler.piece["/fake.tar"] = 4000
    entry = _entry(monkeypatch, url, VOC_TAR)
    (tmp_path / "fake.tar.part").write_bytes(VOC_TAR[:500])
    assert download.download(entry.files[0], tmp_path, progress=False).read_bytes() == VOC_TAR
    assert [r for _, r in handler.log] == ["bytes=500-", "bytes=4500-", "bytes=8500-"]
    assert not list(tmp_path.glob("*.bad"))


@pytest.mark.parametrize("body_ok", [True, False])
def test_a_whole_file_of_unknown_length_answering_a_resume_is_kept_aside_until_it_proves_whole(
        server, tmp_path, monkeypatch, body_ok):
    """A server that ignores Range and sends the file chunked (no length) left a kept partial file stuck: every rerun
    refused the answer ("rerun to resume" could never succeed). The answer now goes to a side file that replaces the
    partial file only if it has the file's size; an error page of unknown length leaves the partial file as it was."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR if body_ok else b"<html>busy</html>"
    handler.chunked_whole.add("/fake.tar")
    entry = _entry(monkeypatch, url, VOC_TAR)
    part = tmp_path / "fake.tar.part"
    part.write_bytes(VOC_TAR[:4000])
    if body_ok:
        assert download.download(entry.files[0], tmp_path, progress=False).read_bytes() == VOC_TAR
    else:
        with pytest.raises(ConnectionError, match="(?s)status 200 with 17 bytes.*partial file is kept"):
            download.download(entry.files[0], tmp_path, progress=False)
        assert part.read_bytes() == VOC_TAR[:4000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.tar" if body_ok else "fake.tar.part"]


def test_a_whole_file_answer_to_a_resume_that_is_cut_keeps_the_longer_start(server, tmp_path, monkeypatch):
    """A server that ignores Range and is cut after more bytes than the kept part: that start of the file becomes the
    part (and the run resumes it); it was called "not the file" and thrown away."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    handler.no_range.add("/fake.tar")
    handler.cut["/fake.tar"] = 6000
    entry = _entry(monkeypatch, url, VOC_TAR)
    part = tmp_path / "fake.tar.part"
    part.write_bytes(VOC_TAR[:4000])
    with pytest.raises(ConnectionError, match="closed after 6,000 of 10,240 bytes"):
        download.download(entry.files[0], tmp_path, progress=False)
    assert part.read_bytes() == VOC_TAR[:6000] and sorted(p.name for p in tmp_path.iterdir()) == ["fake.tar.part"]
    handler.cut["/fake.tar"] = 3000  # shorter than the part now: the part stays as it was
    with pytest.raises(ConnectionError, match="closed after 3,000 of 10,240 bytes"):
        download.download(entry.files[0], tmp_path, progress=False)
    assert part.read_bytes() == VOC_TAR[:6000] and sorted(p.name for p in tmp_path.iterdir()) == ["fake.tar.part"]


def test_a_local_write_error_stops_at_once_naming_the_folder_and_its_free_space(server, tmp_path, monkeypatch):
    """A full disk was reported as a failed URL, the mirror tried next (and failing the same way), and the message
    blamed the download."""
    import errno

    url, handler = server
    handler.files["/a/fake.tar"] = handler.files["/b/fake.tar"] = VOC_TAR
    f = RemoteFile("fake.tar", (f"{url}/a/fake.tar", f"{url}/b/fake.tar"), len(VOC_TAR),
                   hashlib.sha256(VOC_TAR).hexdigest())

    def full_disk(response, out, bar):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "_copy", full_disk)
    with pytest.raises(download.LocalWriteError, match=r"(?s)could not write .*fake.tar.part: No space left on "
                       r"device \(.* GiB free in .*\).*MLIC_DATA"):
        download.download(f, tmp_path, progress=False)
    assert len(handler.log) == 1  # the mirror was not tried


def test_a_write_error_opening_the_side_file_is_a_local_write_error(server, tmp_path, monkeypatch):
    """The side file of a whole-file answer could not be opened (a quota): the clean-up's FileNotFoundError hid the
    LocalWriteError and the mirror was tried."""
    import builtins
    import errno

    url, handler = server
    handler.files["/a/fake.tar"] = handler.files["/b/fake.tar"] = VOC_TAR
    handler.no_range.update({"/a/fake.tar", "/b/fake.tar"})
    f = RemoteFile("fake.tar", (f"{url}/a/fake.tar", f"{url}/b/fake.tar"), len(VOC_TAR),
                   hashlib.sha256(VOC_TAR).hexdigest())
    (tmp_path / "fake.tar.part").write_bytes(VOC_TAR[:1000])

    def quota(path, *args, **kwargs):
        if str(path).endswith(".whole"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(download, "open", quota, raising=False)  # the module's name lookup comes before builtins
    with pytest.raises(download.LocalWriteError, match="Disk quota exceeded"):
        download.download(f, tmp_path, progress=False)
    assert len(handler.log) == 1 and (tmp_path / "fake.tar.part").read_bytes() == VOC_TAR[:1000]


def test_a_disk_without_room_is_an_error_before_the_download_or_the_unpacking_starts(server, tmp_path, monkeypatch):
    """COCO's 19 GB train2017 archive on a disk with 10 GB free failed hours in; now before the first byte."""
    import collections

    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    _entry(monkeypatch, url, VOC_TAR)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(download.LocalWriteError, match=r"downloading fake.tar needs about 0.0 GiB in .*, which has "
                       r"0.0 GiB free: free some space, or set MLIC_DATA"):
        download.prepare("fake", tmp_path, progress=False)
    assert handler.log == []
    archive = tmp_path / "downloads" / "fake" / "fake.tar"  # a disk with room for one copy of it, a little more
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(
        10**9, 0, len(VOC_TAR) + 10 - (archive.stat().st_size if archive.exists() else 0)))
    with pytest.raises(download.LocalWriteError, match="unpacking fake.tar needs about"):
        download.prepare("fake", tmp_path, progress=False)  # downloaded; the unpacking would not fit beside it
    assert len(handler.log) == 1 and not (tmp_path / "VOCdevkit").exists()


def test_a_prepared_dataset_is_not_locked_again(server, tmp_path, monkeypatch):
    """A rerun of prepare on a prepared (possibly read-only, shared) data folder writes nothing, so it takes no lock:
    opening the lock file there failed with "Read-only file system"."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    _entry(monkeypatch, url, VOC_TAR)
    marker = download.prepare("fake", tmp_path, progress=False)

    def no_lock(*args, **kwargs):
        raise PermissionError("Read-only file system")

    monkeypatch.setattr(download, "exclusive", no_lock)
    assert download.prepare("fake", tmp_path, progress=False) == marker
    marker.unlink()  # something to redo: the lock is needed again
    with pytest.raises(PermissionError):
        download.prepare("fake", tmp_path, progress=False)


def test_a_second_prepare_on_the_same_data_folder_fails_at_once(server, tmp_path, monkeypatch):
    """Two runs at once used to append to one .part file (and damage an archive the first had verified)."""
    import fcntl

    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    _entry(monkeypatch, url, VOC_TAR)
    lock = tmp_path / "downloads" / ".lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process's prepare holds it
        with pytest.raises(RuntimeError, match="another `mlic data prepare` is running on .*: wait for it"):
            download.prepare("fake", tmp_path, progress=False)
        assert handler.log == []
    download.prepare("fake", tmp_path, progress=False)  # released: it runs
    assert download.check(tmp_path)["fake"] == "present"


@pytest.mark.parametrize("other_file_system", [False, True])
def test_a_linked_top_folder_is_merged_into_and_kept(tmp_path, monkeypatch, other_file_system):
    """``VOCdevkit`` linked to a larger disk: preparing VOC2012 replaced the link by a folder of its own, so VOC2007
    (behind the link) was no longer found."""
    import errno
    from pathlib import Path as P

    big = tmp_path / "big" / "VOCdevkit"
    (big / "VOC2007").mkdir(parents=True)
    (big / "VOC2007" / "a.txt").write_text("2007")
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "VOCdevkit").symlink_to(big)
    if other_file_system:  # a rename into the link's folder crosses file systems
        replace = P.replace

        def cross(self, target):
            if str(P(target).resolve()).startswith(str(big)):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return replace(self, target)

        monkeypatch.setattr(P, "replace", cross)
    archive = tmp_path / "b.tar"
    archive.write_bytes(_tar({"VOCdevkit/VOC2012/b.txt": b"2012"}))
    download.unpack(archive, dest)
    assert (dest / "VOCdevkit").is_symlink()
    assert (big / "VOC2007" / "a.txt").read_text() == "2007" and (big / "VOC2012" / "b.txt").read_text() == "2012"
    assert not list(dest.glob(".extract-*"))


def test_a_wrong_file_from_the_first_url_falls_back_to_the_mirror(server, tmp_path, monkeypatch):
    url, handler = server
    handler.files["/official/fake.tar"] = b"<html>moved</html>"  # an error page served with status 200
    handler.files["/mirror/fake.tar"] = VOC_TAR
    f = RemoteFile("fake.tar", (f"{url}/official/fake.tar", f"{url}/mirror/fake.tar"), len(VOC_TAR),
                   hashlib.sha256(VOC_TAR).hexdigest())
    monkeypatch.setitem(registry.DATASETS, "fake", DatasetEntry("fake", "Fake", (f,), "VOCdevkit/VOC2007"))
    download.prepare("fake", tmp_path, progress=False)
    assert (tmp_path / "downloads" / "fake" / "fake.tar").read_bytes() == VOC_TAR
    assert [p for p, _ in handler.log] == ["/official/fake.tar", "/mirror/fake.tar"]


def test_a_wrong_answer_to_a_resume_request_keeps_the_partial_file(server, tmp_path, monkeypatch):
    """An error page served with status 200 to a Range request must not overwrite a partial download (COCO has one
    URL: that would throw away gigabytes): the partial file is kept and the mirror resumes it."""
    url, handler = server
    handler.files["/official/fake.tar"] = b"<html>busy</html>"
    handler.no_range.add("/official/fake.tar")
    handler.files["/mirror/fake.tar"] = VOC_TAR
    f = RemoteFile("fake.tar", (f"{url}/official/fake.tar", f"{url}/mirror/fake.tar"), len(VOC_TAR),
                   hashlib.sha256(VOC_TAR).hexdigest())
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "fake.tar.part").write_bytes(VOC_TAR[:4000])
    assert download.download(f, downloads, progress=False).read_bytes() == VOC_TAR
    assert handler.log == [("/official/fake.tar", "bytes=4000-"), ("/mirror/fake.tar", "bytes=4000-")]
    assert not list(downloads.glob("*.bad"))
    # with no mirror: an error that says the partial file is kept, and the file is as it was
    (downloads / "fake.tar").unlink()
    (downloads / "fake.tar.part").write_bytes(VOC_TAR[:4000])
    one = dataclasses.replace(f, urls=f.urls[:1])
    with pytest.raises(ConnectionError, match="(?s)status 200 with 17 bytes.*partial file is kept"):
        download.download(one, downloads, progress=False)
    assert (downloads / "fake.tar.part").read_bytes() == VOC_TAR[:4000]


def test_a_server_that_ignores_range_sends_the_whole_file_and_the_download_starts_over(server, tmp_path, monkeypatch):
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    handler.no_range.add("/fake.tar")
    entry = _entry(monkeypatch, url, VOC_TAR)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "fake.tar.part").write_bytes(b"x" * 1000)  # a wrong prefix: resuming it would give a bad file
    assert download.download(entry.files[0], downloads, progress=False).read_bytes() == VOC_TAR
    assert handler.log == [("/fake.tar", "bytes=1000-")]


def test_a_chunked_answer_cut_short_is_a_connection_error_and_the_mirror_is_tried(server, tmp_path):
    """``http.client.IncompleteRead`` is not an ``OSError``: it must count as a failed URL like any other."""
    url, handler = server
    handler.files["/official/fake.tar"] = handler.files["/mirror/fake.tar"] = VOC_TAR
    handler.chunked_cut["/official/fake.tar"] = 2000
    f = RemoteFile("fake.tar", (f"{url}/official/fake.tar", f"{url}/mirror/fake.tar"), len(VOC_TAR),
                   hashlib.sha256(VOC_TAR).hexdigest())
    assert download.download(f, tmp_path, progress=False).read_bytes() == VOC_TAR
    assert [p for p, _ in handler.log] == ["/official/fake.tar", "/mirror/fake.tar"]
    (tmp_path / "fake.tar").unlink()
    with pytest.raises(ConnectionError, match="IncompleteRead"):
        download.download(dataclasses.replace(f, urls=f.urls[:1]), tmp_path, progress=False)


def test_an_archive_cut_short_in_the_downloads_folder_is_downloaded_again(server, tmp_path, monkeypatch, capsys):
    """An archive copied into the downloads folder by hand and cut short (an interrupted ``cp``) is caught by its
    size, moved aside, and downloaded again: it is never unpacked."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    _entry(monkeypatch, url, VOC_TAR)
    downloads = tmp_path / "downloads" / "fake"
    downloads.mkdir(parents=True)
    (downloads / "fake.tar").write_bytes(VOC_TAR[:1024])
    download.prepare("fake", tmp_path, progress=False)
    assert (downloads / "fake.tar").read_bytes() == VOC_TAR
    assert not (downloads / "fake.tar.bad").exists()  # moved aside, then removed once the new download verified
    err = capsys.readouterr().err
    assert "no longer matches its size" in err and "removed" in err
    assert len(handler.log) == 1


def test_a_dataset_is_present_only_when_every_file_was_prepared(server, tmp_path, monkeypatch):
    url, handler = server
    handler.files["/ann.tar"] = ann = _tar({"coco/annotations/instances_val2017.json": b"{}"})
    files = tuple(RemoteFile(n, (f"{url}/{n}",), len(b), hashlib.sha256(b).hexdigest())
                  for n, b in (("ann.tar", ann), ("train.tar", b"never served")))
    monkeypatch.setitem(registry.DATASETS, "fake",
                        DatasetEntry("fake", "Fake COCO", files, "coco/annotations/instances_val2017.json"))
    with pytest.raises(ConnectionError):
        download.prepare("fake", tmp_path, progress=False)
    assert (tmp_path / "coco/annotations/instances_val2017.json").is_file()  # the marker exists, the images not
    assert download.check(tmp_path)["fake"].startswith("incomplete (1 of 2 files prepared")


def test_prepare_unpacks_again_when_the_data_was_deleted(server, tmp_path, monkeypatch):
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    _entry(monkeypatch, url, VOC_TAR)
    download.prepare("fake", tmp_path, progress=False)
    shutil.rmtree(tmp_path / "VOCdevkit")
    assert download.check(tmp_path)["fake"] == "missing"
    hits = len(handler.log)
    assert download.prepare("fake", tmp_path, progress=False).is_file()  # from the kept archive
    assert len(handler.log) == hits


def test_prepare_force_repairs_a_deleted_file_and_reverifies_the_archive(server, tmp_path, monkeypatch, capsys):
    """A file deleted inside a prepared dataset: a plain rerun skips it (the stamp says done), ``--force`` unpacks
    again from the kept archive without a download, and an archive damaged on disk since is fetched anew."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    _entry(monkeypatch, url, VOC_TAR)
    monkeypatch.setenv("MLIC_DATA", str(tmp_path))
    download.prepare("fake", tmp_path, progress=False)
    ann = tmp_path / "VOCdevkit/VOC2007/Annotations/000001.xml"
    ann.unlink()
    download.prepare("fake", tmp_path, progress=False)
    assert not ann.exists()
    hits = len(handler.log)
    assert cli.main(["data", "prepare", "fake", "--force"]) == 0
    assert ann.read_bytes() == b"<annotation/>" and len(handler.log) == hits
    archive = tmp_path / "downloads" / "fake" / "fake.tar"
    archive.write_bytes(b"x" * len(VOC_TAR))  # same size, other bytes
    ann.unlink()
    download.prepare("fake", tmp_path, progress=False, force=True)
    assert ann.is_file() and archive.read_bytes() == VOC_TAR and len(handler.log) == hits + 1
    assert not archive.with_name("fake.tar.bad").exists()  # removed once the new download verified
    assert "no longer matches its sha256" in capsys.readouterr().err


def test_archives_sharing_a_top_folder_are_merged(tmp_path):
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    first.write_bytes(_tar({"VOCdevkit/VOC2007/JPEGImages/000005.jpg": b"a",
                            "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt": b"000005\n"}))
    second.write_bytes(_tar({"VOCdevkit/VOC2007/JPEGImages/000001.jpg": b"b",
                             "VOCdevkit/VOC2007/ImageSets/Main/test.txt": b"000001\n"}))
    dest = tmp_path / "data"
    download.unpack(first, dest)
    download.unpack(second, dest)
    assert sorted(p.name for p in (dest / "VOCdevkit/VOC2007/JPEGImages").iterdir()) == ["000001.jpg", "000005.jpg"]
    assert sorted(p.name for p in (dest / "VOCdevkit/VOC2007/ImageSets/Main").iterdir()) == ["test.txt",
                                                                                           "trainval.txt"]
    assert not list(dest.glob(".extract-*"))


def test_checksum_mismatch_is_an_error_and_nothing_is_unpacked(server, tmp_path, monkeypatch):
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    _entry(monkeypatch, url, VOC_TAR, sha="0" * 64)
    with pytest.raises(download.ChecksumError, match="moved to .*bad"):
        download.prepare("fake", tmp_path, progress=False)
    assert (tmp_path / "downloads" / "fake" / "fake.tar.bad").is_file()
    assert not (tmp_path / "downloads" / "fake" / "fake.tar").exists()
    assert not (tmp_path / "VOCdevkit").exists()


def test_unverified_files_need_an_explicit_flag(server, tmp_path, monkeypatch, capsys):
    url, handler = server
    handler.files["/ids.pkl"] = b"abc"
    _entry(monkeypatch, url, b"abc", name="ids.pkl", sha="", marker="lt/ids.pkl", action="copy", dest="lt")
    with pytest.raises(download.ChecksumError, match="--allow-unverified"):
        download.prepare("fake", tmp_path, progress=False)
    download.prepare("fake", tmp_path, progress=False, allow_unverified=True)
    assert (tmp_path / "lt" / "ids.pkl").read_bytes() == b"abc"
    assert hashlib.sha256(b"abc").hexdigest() in capsys.readouterr().err


def test_zip_and_unreachable_url(server, tmp_path, monkeypatch):
    url, handler = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("annotations/instances_val2014.json", "{}")
    body = buf.getvalue()
    handler.files["/ann.zip"] = body
    _entry(monkeypatch, url, body, name="ann.zip", marker="coco/annotations/instances_val2014.json", dest="coco")
    assert download.prepare("fake", tmp_path, progress=False).read_text() == "{}"
    _entry(monkeypatch, url, b"x", name="missing.zip", marker="nothing")
    with pytest.raises(ConnectionError, match="every server answered that it has no such file: it may have moved"):
        download.prepare("fake", tmp_path / "other", progress=False)  # a 404
    handler.status["/busy.zip"] = 503
    f_busy = RemoteFile("busy.zip", (f"{url}/busy.zip",), 1, "0" * 64)
    with pytest.raises(ConnectionError, match="if it is 429 or 5xx the server is busy or failing, retry later"):
        download.download(f_busy, tmp_path / "busy", progress=False)
    f = RemoteFile("x.zip", ("http://127.0.0.1:9/x.zip",), 1, "0" * 64)  # nothing listens on port 9 (discard)
    with pytest.raises(ConnectionError, match="nothing was downloaded: check the network"):
        download.download(f, tmp_path / "third", progress=False)


def test_archives_that_escape_the_target_are_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    evil.write_bytes(_tar({"../outside.txt": b"x"}))
    with pytest.raises(RuntimeError, match="refusing"):
        download.unpack(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize("target", ["/etc", "../../outside"])
@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_that_leave_the_target_are_refused_without_the_data_filter(tmp_path, monkeypatch, target, kind):
    """Python before 3.10.12 / 3.11.4 has no tarfile ``data`` filter: the library's own check must refuse a link
    out of the folder (and a file written through it) before anything is extracted."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        link = tarfile.TarInfo("VOCdevkit/lnk")
        link.type, link.linkname = kind, target
        t.addfile(link)
        info = tarfile.TarInfo("VOCdevkit/lnk/evil.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    evil = tmp_path / "links.tar"
    evil.write_bytes(buf.getvalue())
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    with pytest.raises(RuntimeError, match=f"refusing to extract the link 'VOCdevkit/lnk' -> '{target}'"):
        download.unpack(evil, tmp_path / "a" / "b" / "dest")
    assert not (tmp_path / "a" / "b" / "dest" / "VOCdevkit").exists()


def test_a_killed_extraction_leaves_nothing_behind_after_the_next_attempt(tmp_path):
    """SIGTERM/SIGKILL skip unpack's cleanup: the temporary folder of a killed extraction (GBs for COCO) used to stay
    under a random name for ever; the next unpack of that archive removes it."""
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar({"VOCdevkit/VOC2007/JPEGImages/000005.jpg": b"a"}))
    dest = tmp_path / "data"
    leftover = dest / ".extract-a.tar" / "VOCdevkit" / "VOC2007" / "JPEGImages"
    leftover.mkdir(parents=True)
    (leftover / "000009.jpg").write_bytes(b"half")  # what a killed run extracted before it died
    download.unpack(archive, dest)
    assert [p.name for p in (dest / "VOCdevkit/VOC2007/JPEGImages").iterdir()] == ["000005.jpg"]
    assert [p.name for p in dest.iterdir()] == ["VOCdevkit"]


def test_a_damaged_archive_is_a_clear_error_and_nothing_is_unpacked(tmp_path):
    bad = tmp_path / "cut.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("VOCdevkit/a.txt")
        info.size = 5000
        t.addfile(info, io.BytesIO(bytes(5000)))
    bad.write_bytes(buf.getvalue()[:-40])  # the gzip stream ends early
    with pytest.raises(RuntimeError, match="could not unpack .*cut.tar.gz.*delete the archive and rerun"):
        download.unpack(bad, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_a_damaged_deflate_stream_is_the_same_clear_error(tmp_path):
    """A kept zip whose bytes went bad at the same size (only its size is checked on reuse) raised zlib.error, which
    the CLI does not catch: a traceback instead of the message that says how to repair it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("annotations/a.json", bytes(range(256)).hex() * 12)
    bad = bytearray(buf.getvalue())
    start = bytes(bad).index(b"a.json") + len("a.json")  # the local header's name ends here: the stream follows
    for i in range(start + 20, start + 80):
        bad[i] ^= 0xFF
    archive = tmp_path / "annotations.zip"
    archive.write_bytes(bytes(bad))
    with pytest.raises(RuntimeError, match="could not unpack .*annotations.zip.*delete the archive and rerun"):
        download.unpack(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_an_interrupted_copy_to_another_file_system_leaves_no_half_folder(tmp_path, monkeypatch):
    """``VOCdevkit`` linked to another disk: the unpacked folder is copied there. An interrupted copy used to leave a
    half-filled ``VOC2012`` whose marker made the dataset look present; it now fills a hidden sibling that a rename
    puts in place, and the next attempt starts that copy afresh."""
    import errno
    from pathlib import Path as P

    big = tmp_path / "big" / "VOCdevkit"
    big.mkdir(parents=True)
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "VOCdevkit").symlink_to(big)
    replace = P.replace

    def cross(self, target):  # a rename from the extraction folder into the linked one crosses file systems
        if str(P(target).resolve()).startswith(str(big)) and not str(self.resolve()).startswith(str(big)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return replace(self, target)

    monkeypatch.setattr(P, "replace", cross)
    rename = os.rename

    def os_cross(src, dst):  # what shutil.move tries before it copies
        if str(P(dst).resolve()).startswith(str(big)) and not str(P(src).resolve()).startswith(str(big)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", os_cross)
    names = ["VOCdevkit/VOC2012/ImageSets/Main/trainval.txt"] + [f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg"
                                                                 for i in range(5)]
    archive = tmp_path / "voc.tar"
    archive.write_bytes(_tar({n: b"x" for n in names}))
    copy, copied = shutil.copyfile, []

    def interrupted(src, dst, **kw):  # Ctrl-C part-way through the copy
        if len(copied) == 3:
            raise KeyboardInterrupt
        copied.append(dst)
        return copy(src, dst, **kw)

    monkeypatch.setattr(shutil, "copyfile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download.unpack(archive, dest)
    assert len(copied) == 3
    assert not (big / "VOC2012").exists()  # not a half-filled folder with its marker in place
    monkeypatch.setattr(shutil, "copyfile", copy)
    download.unpack(archive, dest)
    assert sorted(str(p.relative_to(big.parent)) for p in (big / "VOC2012").rglob("*.*")) == sorted(names)
    assert [p.name for p in big.iterdir()] == ["VOC2012"]  # the interrupted copy's folder is gone too


def test_registry_is_well_formed():
    for key, entry in registry.DATASETS.items():
        assert entry.key == key and not Path(entry.marker).is_absolute()
        for f in entry.files:
            assert f.urls and all(u.startswith(("http://", "https://")) for u in f.urls)
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), f.name
            assert f.action in {"extract", "copy"}
    assert {"voc2007", "voc2012", "coco2014", "coco2017", "mnist", "cifar10", "voc_lt", "coco_lt"} <= set(
        registry.DATASETS)
    with pytest.raises(ValueError, match="known datasets"):
        registry.get("imagenet")


def test_split_file_checksums_match_the_reference_copies():
    shared = reference_data_dir()
    if not shared.is_dir():
        pytest.skip("../shared/data is not present")
    checked = 0
    for key in ("voc_lt", "coco_lt"):
        for f in registry.get(key).files:
            assert f.sha256, f"{key}/{f.name} has no recorded sha256"
            local = shared / key / f.saved_name
            if local.is_file():
                assert download.sha256_of(local) == f.sha256, f"{key}/{f.name}"
                assert local.stat().st_size == f.size
                checked += 1
    assert checked, f"no split file of the registry found under {shared}"


def _serve_entry(monkeypatch, url, handler, key, bodies, verify=True):
    """Point registry entry ``key`` at the loopback server, serving ``bodies[file.name]`` for each file."""
    files = []
    for f in registry.get(key).files:
        handler.files[f"/{key}/{f.name}"] = bodies[f.name]
        f = dataclasses.replace(f, urls=(f"{url}/{key}/{f.name}",))
        files.append(f if verify else dataclasses.replace(f, size=None, sha256=None))
    monkeypatch.setitem(registry.DATASETS, key, dataclasses.replace(registry.get(key), files=tuple(files)))


def test_datasets_with_the_same_file_names_do_not_share_downloads(server, tmp_path, monkeypatch):
    url, handler = server
    for key in ("voc_lt", "coco_lt"):  # small fixture bodies, so no size or sha256 to check
        bodies = {f.name: f"{key}:{f.name}".encode() for f in registry.get(key).files}
        _serve_entry(monkeypatch, url, handler, key, bodies, verify=False)
    download.prepare("voc_lt", tmp_path, progress=False, allow_unverified=True)
    download.prepare("coco_lt", tmp_path, progress=False, allow_unverified=True)
    assert (tmp_path / "voc_lt" / "class_freq.pkl").read_bytes() == b"voc_lt:class_freq.pkl"
    assert (tmp_path / "coco_lt" / "class_freq.pkl").read_bytes() == b"coco_lt:class_freq.pkl"
    # COCO-LT's id list is published as img_id.pkl (a text file) and saved as img_id.txt for the loader
    assert (tmp_path / "coco_lt" / "img_id.txt").read_bytes() == b"coco_lt:img_id.pkl"
    assert not (tmp_path / "coco_lt" / "img_id.pkl").exists()
    assert not list(tmp_path.glob("*/.*.tmp")), "temporary copy left behind"


def test_prepared_split_files_are_readable(server, tmp_path, monkeypatch):
    """``mlic data prepare voc_lt / coco_lt`` (served the reference copies) gives folders read_lt_split reads."""
    shared = reference_data_dir()
    if not all((shared / k).is_dir() for k in ("voc_lt", "coco_lt")):
        pytest.skip("../shared/data/{voc_lt,coco_lt} are not present")
    url, handler = server
    for key in ("voc_lt", "coco_lt"):
        bodies = {f.name: (shared / key / f.saved_name).read_bytes() for f in registry.get(key).files}
        _serve_entry(monkeypatch, url, handler, key, bodies)
        download.prepare(key, tmp_path, progress=False)  # verified against the registry's sha256
    voc, coco = read_lt_split(tmp_path / "voc_lt", "voc_lt"), read_lt_split(tmp_path / "coco_lt", "coco_lt")
    assert (len(voc.image_ids), voc.gt_labels.shape[1]) == (1142, 20)  # VOC-LT: 1,142 images, 20 classes
    assert (len(coco.image_ids), coco.gt_labels.shape[1]) == (1909, 80)  # COCO-LT: 1,909 images, 80 classes


def test_cli_prepare_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_DATA", str(tmp_path))
    assert cli.main(["data", "prepare", "imagenet"]) == 2
    assert "known datasets" in capsys.readouterr().err
    assert cli.main(["data", "prepare", "nuswide"]) == 2
    assert "place the 'Flickr' image folder" in capsys.readouterr().err


def test_an_interrupted_prepare_says_a_rerun_resumes_the_download(tmp_path, monkeypatch, capsys):
    """The message was the training one ("a rerun loads the runs that finished"), and prepare.py printed a
    traceback."""
    import importlib.util

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "prepare", interrupted)
    monkeypatch.setenv("MLIC_DATA", str(tmp_path))
    assert cli.main(["data", "prepare", "voc2007"]) == 130
    assert capsys.readouterr().err.strip() == ("mlic: interrupted; a rerun of `mlic data prepare` resumes the partial "
                                               "download")
    monkeypatch.setattr(download, "check", interrupted)
    assert cli.main(["data", "check"]) == 130
    assert "mlic data prepare" not in capsys.readouterr().err  # nothing was being downloaded
    script_path = Path(__file__).resolve().parents[1] / "data_scripts" / "prepare.py"
    spec = importlib.util.spec_from_file_location("prepare_script", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["voc2007"]) == 130 and "a rerun resumes" in capsys.readouterr().err


def test_prepare_script_matches_the_cli_options(tmp_path, monkeypatch, capsys):
    """`python data_scripts/prepare.py` is documented as `mlic data prepare`: the same options reach prepare()."""
    import importlib.util

    script_path = Path(__file__).resolve().parents[1] / "data_scripts" / "prepare.py"
    spec = importlib.util.spec_from_file_location("prepare_script", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []
    monkeypatch.setattr(download, "prepare", lambda name, **kw: calls.append((name, kw)) or tmp_path / name)
    assert script.main(["voc2007", "--force", "--delete-archives"]) == 0
    assert calls == [("voc2007", {"allow_unverified": False, "keep_archives": False, "force": True})]
    assert script.main(["imagenet"]) == 2 and "known datasets" in capsys.readouterr().err
    monkeypatch.setenv("MLIC_DATA", str(tmp_path))
    assert script.main(["--check"]) == 0 and "voc2007   missing" in capsys.readouterr().out
    assert script.main(["--check", "mnist"]) == 1 and capsys.readouterr().out.strip() == "mnist     missing"
    assert script.main(["--check", "bogus"]) == 2 and "known datasets" in capsys.readouterr().err
    assert script.main(["--check", "--force"]) == 2 and "--force only apply" in capsys.readouterr().err
    assert script.main(["--delete-archives"]) == 2 and "name them" in capsys.readouterr().err
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")
    monkeypatch.setenv("MLIC_DATA", str(not_a_folder))  # a message and status 2, as `mlic data check`; not 1, which
    assert script.main(["--check"]) == 2 and capsys.readouterr().err.startswith("prepare.py: error: ")  # is "absent"


def test_a_check_of_a_missing_named_dataset_exits_with_status_1(tmp_path, monkeypatch, capsys):
    """So that a script can branch on it (it exited 0 whatever it found); a check of every dataset lists them."""
    from mlic_lib.data.fake import write_fake

    monkeypatch.setenv("MLIC_DATA", str(tmp_path))
    assert cli.main(["data", "prepare", "mnist", "--check"]) == 1 and "mnist     missing" in capsys.readouterr().out
    assert cli.main(["data", "check", "mnist"]) == 1
    assert cli.main(["data", "check"]) == 0
    write_fake("mnist", tmp_path, force=True)
    assert cli.main(["data", "check", "mnist"]) == 0 and "mnist     present" in capsys.readouterr().out
    assert not download.usable("present (needs voc2012: missing)") and download.usable("present")


def test_a_data_root_that_is_a_file_is_an_error_naming_mlic_data(tmp_path, monkeypatch, capsys):
    """Every dataset read as missing, and preparing one failed with a bare "Not a directory"."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("MLIC_DATA", str(tmp_path / "afile"))
    assert cli.main(["data", "check"]) == 2
    assert re.search(r"MLIC_DATA .*afile is a file, not a folder", capsys.readouterr().err)
    from mlic_lib.data.paths import data_root

    with pytest.raises(ValueError, match=r"MLIC_DATA .*afile is a file, not a folder"):
        data_root()


def test_cli_check_refuses_the_options_of_prepare(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLIC_DATA", str(tmp_path))
    assert cli.main(["data", "check", "--force", "--allow-unverified"]) == 2
    assert "--force, --allow-unverified only apply to `mlic data prepare NAME`" in capsys.readouterr().err
    assert cli.main(["data", "prepare", "voc2007", "--check", "--delete-archives"]) == 2


def test_check_needs_every_path_of_a_hand_placed_dataset_and_names_a_missing_dependency(tmp_path):
    (tmp_path / "nuswide" / "Flickr").mkdir(parents=True)  # the images folder alone
    assert download.check(tmp_path)["nuswide"].startswith("incomplete (missing: nuswide/Concepts81.txt, ")
    (tmp_path / "nuswide" / "ConceptsList").mkdir()
    (tmp_path / "nuswide" / "ConceptsList" / "Concepts81.txt").write_text("airport\n")  # the other layout
    for p in ("ImageList/ImageList/TrainImagelist.txt", "ImageList/TestImagelist.txt"):
        (tmp_path / "nuswide" / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "nuswide" / p).write_text("")
    assert download.check(tmp_path)["nuswide"] == "incomplete (missing: nuswide/Groundtruth/TrainTestLabels)"
    (tmp_path / "nuswide" / "Groundtruth" / "TrainTestLabels").mkdir(parents=True)
    assert download.check(tmp_path)["nuswide"] == "present"
    (tmp_path / registry.get("voc_lt").marker).parent.mkdir(parents=True)
    (tmp_path / registry.get("voc_lt").marker).write_bytes(b"")  # the split files without the VOC images
    assert download.check(tmp_path)["voc_lt"] == "present (needs voc2012: missing; needs voc2007: missing)"


def test_a_relative_data_folder_is_made_absolute_for_the_kernels(tmp_path, monkeypatch):
    from mlic_lib.book import env_defaults

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLIC_DATA", "rel")
    monkeypatch.setenv("MLIC_REFERENCE_DATA", "~/ref")
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "r"))
    monkeypatch.setenv("MLIC_CACHE", "c")
    env_defaults(tmp_path / "_build")
    assert os.environ["MLIC_DATA"] == str(tmp_path / "rel")  # the kernels run in notebooks/, not here
    assert os.environ["MLIC_CACHE"] == str(tmp_path / "c")
    assert os.environ["MLIC_REFERENCE_DATA"] == str(Path("~/ref").expanduser())


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="needs tarfile's data filter (Python >= 3.11.4)")
def test_a_member_the_data_filter_refuses_is_named_not_called_a_damaged_archive(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        dev = tarfile.TarInfo("VOCdevkit/device")
        dev.type = tarfile.CHRTYPE
        t.addfile(dev)
    archive = tmp_path / "special.tar"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(RuntimeError, match=r"refusing to extract .*special.tar: .*VOCdevkit/device.*Nothing was "
                                           r"written") as info:
        download.unpack(archive, tmp_path / "dest")
    assert "download it again" not in str(info.value)


@pytest.mark.parametrize("mode", ["wrong_start", "no_satisfy"])
def test_a_resume_answer_that_does_not_continue_the_part_starts_over(server, tmp_path, monkeypatch, mode, capsys):
    """A 206 from another byte than the kept length would be appended and corrupt the file; a 416 would be
    asked again on every rerun. Both discard the part and download the whole file."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    getattr(handler, mode).add("/fake.tar")
    entry = _entry(monkeypatch, url, VOC_TAR)
    downloads = tmp_path / "downloads" / "fake"
    downloads.mkdir(parents=True)
    (downloads / "fake.tar.part").write_bytes(VOC_TAR[:1000])
    assert download.download(entry.files[0], downloads, progress=False).read_bytes() == VOC_TAR
    assert handler.log == [("/fake.tar", "bytes=1000-"), ("/fake.tar", None)]
    assert "starting over" in capsys.readouterr().err
    assert not list(downloads.glob("*.bad"))


def _two_tars(monkeypatch, url, handler):
    """A dataset of two archives whose marker comes from the second (as VOC2007's test tar)."""
    a = _tar({"VOCdevkit/VOC2007/JPEGImages/000001.jpg": b"jpeg"})
    b = _tar({"VOCdevkit/VOC2007/ImageSets/Main/test.txt": b"000001\n"})
    handler.files.update({"/a.tar": a, "/b.tar": b})
    files = tuple(RemoteFile(n, (f"{url}/{n}",), len(body), hashlib.sha256(body).hexdigest())
                  for n, body in (("a.tar", a), ("b.tar", b)))
    monkeypatch.setitem(registry.DATASETS, "fake",
                        DatasetEntry("fake", "Fake VOC", files, "VOCdevkit/VOC2007/ImageSets/Main/test.txt"))
    return b


def test_an_interrupted_prepare_keeps_the_files_it_finished(server, tmp_path, monkeypatch):
    url, handler = server
    b = _two_tars(monkeypatch, url, handler)
    handler.cut["/b.tar"] = 100
    with pytest.raises(ConnectionError):
        download.prepare("fake", tmp_path, progress=False, keep_archives=False)
    assert download.check(tmp_path)["fake"].startswith("incomplete (1 of 2 files prepared")
    del handler.cut["/b.tar"]
    handler.log.clear()
    download.prepare("fake", tmp_path, progress=False, keep_archives=False)
    assert handler.log == [("/b.tar", "bytes=100-")], "the finished first archive must not be fetched again"
    assert (tmp_path / "VOCdevkit/VOC2007/JPEGImages/000001.jpg").is_file() and len(b) > 100
    assert download.check(tmp_path)["fake"] == "present"


def test_a_present_dataset_without_its_downloads_folder_is_not_fetched_again(server, tmp_path, monkeypatch, capsys):
    url, handler = server
    _two_tars(monkeypatch, url, handler)
    download.prepare("fake", tmp_path, progress=False)
    shutil.rmtree(tmp_path / "downloads")  # archives and stamps deleted to free space
    assert download.check(tmp_path)["fake"] == "present"
    handler.log.clear()
    assert download.prepare("fake", tmp_path, progress=False).is_file()
    assert handler.log == [] and "already present" in capsys.readouterr().err
    # --force re-fetches; when that fails, the dataset is still reported as it was
    handler.files.clear()
    with pytest.raises(ConnectionError):
        download.prepare("fake", tmp_path, progress=False, force=True)
    assert download.check(tmp_path)["fake"] == "present"


def test_stamped_files_whose_content_was_deleted_are_unpacked_again(server, tmp_path, monkeypatch):
    """The first archive stamped, the second not, and the dataset's folder deleted in between: the rerun must
    not leave the first archive's files missing."""
    url, handler = server
    _two_tars(monkeypatch, url, handler)
    handler.cut["/b.tar"] = 100
    with pytest.raises(ConnectionError):
        download.prepare("fake", tmp_path, progress=False)
    shutil.rmtree(tmp_path / "VOCdevkit")
    del handler.cut["/b.tar"]
    download.prepare("fake", tmp_path, progress=False)
    assert (tmp_path / "VOCdevkit/VOC2007/JPEGImages/000001.jpg").is_file()


def test_an_extraction_that_fails_part_way_writes_nothing_to_the_dataset_folder(tmp_path):
    """Members go to a temporary folder first: a member refused after others were unpacked leaves the dataset
    folder as it was, as the error says ("Nothing was written")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("VOCdevkit/a.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"a"))
        dev = tarfile.TarInfo("VOCdevkit/dev")
        dev.type = tarfile.CHRTYPE  # a device file: the "data" filter refuses it, after a.txt was written
        t.addfile(dev)
    archive = tmp_path / "dev.tar"
    archive.write_bytes(buf.getvalue())
    if not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no data filter")
    with pytest.raises(RuntimeError, match="Nothing was written"):
        download.unpack(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "VOCdevkit").exists()


def test_a_member_that_climbs_out_in_the_middle_of_its_path_is_refused_without_the_data_filter(tmp_path, monkeypatch):
    evil = tmp_path / "evil.tar"
    evil.write_bytes(_tar({"VOCdevkit/../../outside.txt": b"x"}))
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    with pytest.raises(RuntimeError, match="refusing"):
        download.unpack(evil, tmp_path / "a" / "dest")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "a" / "outside.txt").exists()


def test_a_part_file_that_is_already_whole_is_not_requested_again(server, tmp_path, monkeypatch):
    """A run killed after the last byte arrived but before the check: the rerun verifies the kept file, with no
    request (a Range request past the end would get a 416 and start the whole download over: 19 GB for COCO)."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    entry = _entry(monkeypatch, url, VOC_TAR)
    downloads = tmp_path / "downloads" / "fake"
    downloads.mkdir(parents=True)
    (downloads / "fake.tar.part").write_bytes(VOC_TAR)
    assert download.download(entry.files[0], downloads, progress=False).read_bytes() == VOC_TAR
    assert handler.log == []


def test_a_resume_answer_of_unknown_total_length_continues_the_part(server, tmp_path, monkeypatch):
    """``Content-Range: bytes 1000-N/*`` (a server that does not say the file's length) is a valid answer to the
    resume request: the kept bytes are continued, not discarded for a download from the start."""
    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    handler.star_total.add("/fake.tar")
    entry = _entry(monkeypatch, url, VOC_TAR)
    downloads = tmp_path / "downloads" / "fake"
    downloads.mkdir(parents=True)
    (downloads / "fake.tar.part").write_bytes(VOC_TAR[:1000])
    assert download.download(entry.files[0], downloads, progress=False).read_bytes() == VOC_TAR
    assert handler.log == [("/fake.tar", "bytes=1000-")]


def test_a_resumed_download_needs_room_for_the_rest_of_the_file_only(server, tmp_path, monkeypatch):
    """The free-space check before a download counts the bytes still to come: a partial file that fills most of the
    disk is resumed, not refused for want of room for the whole file again."""
    import collections

    url, handler = server
    handler.files["/fake.tar"] = VOC_TAR
    entry = _entry(monkeypatch, url, VOC_TAR)
    downloads = tmp_path / "downloads" / "fake"
    downloads.mkdir(parents=True)
    (downloads / "fake.tar.part").write_bytes(VOC_TAR[:1000])
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(10**9, 0, len(VOC_TAR) - 1000 + 10))
    assert download.download(entry.files[0], downloads, progress=False).read_bytes() == VOC_TAR
    assert handler.log == [("/fake.tar", "bytes=1000-")]


def test_a_marker_deleted_by_hand_is_restored_when_it_is_not_the_archives_first_file(server, tmp_path, monkeypatch):
    url, handler = server
    body = _tar({"VOCdevkit/VOC2007/Annotations/000001.xml": b"<annotation/>",
                 "VOCdevkit/VOC2007/ImageSets/Main/test.txt": b"000001\n"})
    handler.files["/fake.tar"] = body
    _entry(monkeypatch, url, body)
    marker = download.prepare("fake", tmp_path, progress=False)
    marker.unlink()
    assert download.prepare("fake", tmp_path, progress=False).read_text() == "000001\n"


def test_deleting_archives_keeps_the_files_that_are_copied_not_unpacked(server, tmp_path, monkeypatch):
    """``--delete-archives`` removes unpacked archives only: a copied file (the long-tail split files) stays in
    ``downloads/``, so a later ``--force`` does not fetch it again."""
    url, handler = server
    handler.files["/split.txt"] = b"1\n2\n"
    _entry(monkeypatch, url, b"1\n2\n", name="split.txt", marker="fake_lt/split.txt", action="copy", dest="fake_lt")
    download.prepare("fake", tmp_path, progress=False, keep_archives=False)
    assert (tmp_path / "fake_lt" / "split.txt").read_bytes() == b"1\n2\n"
    assert (tmp_path / "downloads" / "fake" / "split.txt").read_bytes() == b"1\n2\n"
