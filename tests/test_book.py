"""Book builder pieces: the reproduction matrix page and the staging of executed notebooks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mlic_lib.book import _hide_default_parameters, reproduction_page
from mlic_lib.reporting import write_chapter_results


def test_reproduction_page_puts_ours_next_to_published(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "res"))
    write_chapter_results("demo", {"profile": "smoke", "chapter": "demo"},
                          {"mAP_x": 0.5, "cached": True, "note": "text", "n": 3, "std_x": 0.012,
                           "mAP": {"Baseline": 61.5, "pair": [1, 2]}, "one_seed_std": float("nan"), "secs": 2.0,
                           "ari": 0.25},
                          units={"mAP_x": "fraction", "std_x": "fraction", "mAP.Baseline": "%", "mAP.pair.*": "count",
                                 "n": "count", "one_seed_std": "count", "secs": "s", "ari": "1"})
    published = tmp_path / "published.yaml"
    published.write_text(
        "demo:\n  paper: Demo paper\n  source: Table 1\n  rows:\n"
        "    - {label: Baseline mAP, key: mAP.Baseline, unit: '%', published: 93.3}\n"
        "    - {label: x, key: mAP_x, std: std_x, unit: '%'}\n"
        "    - {label: x gain, key: mAP_x, unit: points}\n"
        "    - {label: second of pair, key: mAP.pair.1, unit: count}\n"
        "    - {label: one seed, key: n, std: one_seed_std, unit: count}\n"
        "    - {label: an index, key: ari, unit: ARI}\n"
        "    - {label: wrong unit, key: secs, unit: '%'}\n"
        "    - {label: wrong std, key: mAP_x, std: secs, unit: '%'}\n"
        "    - {label: absent, key: nope, unit: '%', published: 1.0}\n"
        "    - {label: needs files, key: nope, unit: '%', optional: true, needs: the label files}\n"
        "    - {label: flagged, key: ari, unit: ARI, caveat: {key: n, text: run(s) on a plateau}}\n"
        "    - {label: not flagged, key: ari, unit: ARI, caveat: {key: secs2, text: run(s) on a plateau}}\n")
    page = reproduction_page(tmp_path / "res", published)
    assert "## Demo paper" in page and "Profile `smoke`" in page and "Published: Table 1." in page
    assert "| Baseline mAP | % | 61.50 | 93.3 |" in page  # stored in %: shown as is
    assert "| x | % | 50.00 ± 1.20 | - |" in page  # a stored fraction shown in %, with its spread on the same scale
    assert "| x gain | points | 50.00 | - |" in page
    assert "| second of pair | count | 2 | - |" in page
    assert "| one seed | count | 3 | - |" in page  # a NaN spread (one seed) is left out
    assert "| an index | ARI | 0.25 | - |" in page  # dimensionless, under the index's name
    assert "| wrong unit | % | secs is stored in unit 's', not '%' | - |" in page  # never a number on the wrong scale
    assert "| wrong std | % | secs is stored in unit 's', not '%' | - |" in page  # nor a spread
    assert "| absent | % | not computed in this build | 1.0 |" in page
    assert "| needs files | % | not computed in this build (the label files) | - |" in page  # an optional row says why
    assert "| flagged | ARI | 0.25 (3 run(s) on a plateau) | - |" in page  # a count the chapter flags, when above 0
    assert "| not flagged | ARI | 0.25 | - |" in page
    assert "cached" not in page and "note" not in page  # only the listed rows
    other = tmp_path / "other.yaml"
    other.write_text("demo:\n  paper: Demo paper\n")
    assert "No headline rows" in reproduction_page(tmp_path / "res", other)
    assert "No chapter" in reproduction_page(tmp_path / "missing", published)
    old = tmp_path / "old"  # a results file of an mlic_lib before units: no number on a guessed scale
    old.mkdir()
    (old / "demo.json").write_text(json.dumps({"chapter": "demo", "profile": "smoke", "numbers": {"mAP_x": 0.5}}))
    assert "| x | % | the results file declares no units" in reproduction_page(old, published)



def test_reproduction_page_says_no_value_for_nan_and_skips_a_stray_json(tmp_path, monkeypatch):
    """A headline the chapter wrote as NaN (the primer's CAM share when every map is zero) reads as no value, not
    "nan", and an infinite spread is not shown; a JSON in the results folder that is not a chapter's results (a
    list, or broken JSON) is named and skipped instead of stopping the build after every chapter has run."""
    res = tmp_path / "res"
    monkeypatch.setenv("MLIC_RESULTS", str(res))
    write_chapter_results("demo", {"profile": "smoke", "chapter": "demo"},
                          {"cam": float("nan"), "n": 3, "spread": float("inf")},
                          units={"cam": "fraction", "n": "count", "spread": "count"})
    (res / "notes.json").write_text('["not", "a", "chapter"]')
    (res / "broken.json").write_text('{"chapter": ')
    published = tmp_path / "published.yaml"
    published.write_text("demo:\n  paper: Demo paper\n  rows:\n"
                         "    - {label: CAM share, key: cam, unit: '%', published: 40.0}\n"
                         "    - {label: runs, key: n, std: spread, unit: count}\n")
    page = reproduction_page(res, published)
    assert "| CAM share | % | no value in this build (the chapter wrote NaN) | 40.0 |" in page
    assert "| runs | count | 3 | - |" in page  # an infinite spread is not shown as "± inf"
    assert "`notes.json` in the results folder is not a chapter's results file: skipped." in page
    assert "`broken.json` in the results folder" in page and "## Demo paper" in page


def test_published_rows_name_keys_the_chapters_write():
    """Every row of book/published.yaml has a label, a key and a unit; published values are numbers."""
    import yaml

    pub = yaml.safe_load((Path(__file__).resolve().parents[1] / "book" / "published.yaml").read_text())
    assert set(pub) == {"primer", "splicemix", "psd", "assocformer", "indeed", "ltml"}
    for chapter, info in pub.items():
        assert info.get("rows"), chapter
        for row in info["rows"]:
            assert {"label", "key", "unit"} <= set(row), (chapter, row)
            assert isinstance(row.get("published", 0.0), int | float), (chapter, row)


OWN = 'profile = "default"  # smoke | default | full\noverrides = {}  # dotted keys, e.g. {"train.epochs": 3}'


def _parameters_nb(injected: str | None) -> dict:
    cells = [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": OWN, "outputs": []}]
    if injected is not None:
        cells.append({"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "source": injected,
                      "outputs": []})
    cells.append({"cell_type": "code", "metadata": {"tags": []}, "source": "x = 1", "outputs": []})
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_the_book_shows_one_parameters_cell_with_every_parameter(tmp_path):
    """The book showed papermill's injected cell (``profile = "default"``) and hid the notebook's own, so the
    ``overrides`` the text points at appeared nowhere: with the default values the own cell is shown; with other
    values the injected cell, headed by the own cell as a comment."""
    path = tmp_path / "a.ipynb"
    path.write_text(json.dumps(_parameters_nb('# Parameters\nprofile = "default"\n')))
    _hide_default_parameters(path)
    cells = json.loads(path.read_text())["cells"]
    assert [c["metadata"]["tags"] for c in cells] == [["parameters"], ["injected-parameters", "remove-cell"], []]
    assert cells[0]["source"] == OWN
    path.write_text(json.dumps(_parameters_nb('# Parameters\nprofile = "smoke"\noverrides = {"train.epochs": 1}\n')))
    _hide_default_parameters(path)
    cells = json.loads(path.read_text())["cells"]
    assert [c["metadata"]["tags"] for c in cells] == [["parameters", "remove-cell"], ["injected-parameters"], []]
    assert cells[1]["source"] == (
        "# The notebook's parameters:\n# profile = \"default\"  # smoke | default | full\n# overrides = {}  # dotted "
        "keys, e.g. {\"train.epochs\": 3}\n# The values this build ran with:\nprofile = \"smoke\"\n"
        "overrides = {\"train.epochs\": 1}\n")
    path.write_text(json.dumps(_parameters_nb(None)))  # not run by papermill: nothing to hide
    _hide_default_parameters(path)
    assert [c["metadata"]["tags"] for c in json.loads(path.read_text())["cells"]] == [["parameters"], []]


def test_seed_spread_and_verdicts():
    import math

    from mlic_lib.reporting import seed_spread, spread_note, spread_verdict

    assert seed_spread(3.0, 4.0) == 5.0 and seed_spread(2.0) == 2.0
    assert math.isnan(seed_spread(1.0, float("nan"))) and math.isnan(seed_spread(1.0, 1.0, n_seeds=1))
    assert spread_verdict(6.0, 5.0) == "larger than the seed spread"
    assert spread_verdict(-6.0, 5.0, "gain", "loss") == "loss" and spread_verdict(6.0, 5.0, "gain", "loss") == "gain"
    assert spread_verdict(5.0, 5.0) == "within the seed spread"  # equal to the spread is not measurable
    assert spread_verdict(9.0, float("nan")) == "one seed: no spread"
    assert spread_note(1.0, 3.0, 4.0) == "within the seed spread of 5.0, so not a measurable difference"
    assert spread_note(-8.0, 3.0, 4.0, decimals=2) == "larger than the seed spread of 5.00"
    assert spread_note(-7.0, 3.0, 4.0, decimals=2) == ("larger than the seed spread of 5.00 (borderline: within 1.5 "
                                                       "times the spread)")
    assert spread_note(7.0, 3.0, 4.0, n_seeds=1) == "one seed: no spread to compare"


def test_a_failed_run_keeps_the_last_good_notebook_and_the_failure_apart(tmp_path):
    import nbformat
    import pytest
    from papermill.exceptions import PapermillExecutionError

    from mlic_lib.book import execute_notebook, failed_copy

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    params = nbformat.v4.new_code_cell("profile = 'default'\nfail = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("assert not fail, 'asked to fail'\nprint('ran', profile)")]
    src, dst = tmp_path / "chapter.ipynb", tmp_path / "out" / "chapter.ipynb"
    nbformat.write(nb, src)
    execute_notebook(src, dst, "smoke")
    good = dst.read_text()
    assert "ran smoke" in good and not failed_copy(dst).exists()
    with pytest.raises(PapermillExecutionError, match="asked to fail"):
        execute_notebook(src, dst, "smoke", {"fail": True})
    assert dst.read_text() == good  # the last complete run is untouched
    assert "asked to fail" in failed_copy(dst).read_text()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["chapter.failed.ipynb", "chapter.ipynb"]
    execute_notebook(src, dst, "smoke")
    assert not failed_copy(dst).exists()  # a later success clears the stale failure


def test_cli_reproduce_writes_where_out_says_and_streams_the_cells_output(tmp_path, capfd, monkeypatch):
    """`mlic reproduce --out NB --log-output`: the executed copy goes to NB (the book's copy is untouched) and the
    cells' output reaches stderr while they run; --out must be a new .ipynb."""
    import nbformat

    from mlic_lib import cli

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the CLI sets it (as the book does); undone after the test
    monkeypatch.setenv("MLIC_RESULTS", "")  # unset: the CLI picks the folder (the old value comes back after the test)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    params = nbformat.v4.new_code_cell("profile = 'default'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print('cell ran with', profile)"),
                nbformat.v4.new_code_cell("import os\nprint('sockets here:', sorted(f for f in os.listdir('.') "
                                          "if f.startswith('kernel')))\n"
                                          "print('results in', os.environ['MLIC_RESULTS'])")]
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "00_multilabel_primer.ipynb")
    out = tmp_path / "runs" / "primer.ipynb"
    assert cli.main(["--root", str(tmp_path), "reproduce", "primer", "--profile", "smoke", "--out", str(out),
                     "--log-output", "--no-progress"]) == 0
    assert "cell ran with smoke" in out.read_text()
    assert "sockets here: []" in out.read_text()  # the kernel's IPC sockets live in a private folder, not in cwd
    assert not (tmp_path / "_build" / "executed").exists()
    # the chapter's results JSON goes beside the executed copy, not into the book's _build/results
    assert f"results in {out.parent / 'results'}" in out.read_text()
    captured = capfd.readouterr()
    assert "cell ran with smoke" in captured.err and f"-> {out}" in captured.out
    if os.name == "posix":  # the kernel runs over Unix sockets: ipykernel has no TCP port to warn about
        assert "TCP without encryption" not in captured.err
    assert cli.main(["--root", str(tmp_path), "reproduce", "primer", "--profile", "smoke", "--out", str(out)]) == 0
    captured = capfd.readouterr()  # the progress bar over the cells, although the book's TQDM_DISABLE is set
    assert os.environ.get("TQDM_DISABLE") == "1" and "Executing: 100%" in captured.err
    assert "cell ran with smoke" not in captured.err  # --log-output was for that run only
    for bad in (tmp_path / "x.json", tmp_path / "notebooks" / "01_splicemix.ipynb"):  # not a notebook; a chapter
        assert cli.main(["--root", str(tmp_path), "reproduce", "primer", "--out", str(bad)]) == 2
        assert "give a .ipynb path outside notebooks/" in capfd.readouterr().err


def _notebook(*tag_lists, marker: str = "") -> dict:
    cells = [{"cell_type": "code", "metadata": {"tags": list(t)}, "source": marker, "outputs": [],
              "execution_count": None} for t in tag_lists]
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _book_root(root: Path, chapters=("01_second", "00_first")) -> Path:
    """A minimal book source tree: config, toc, book/ pages, published.yaml and chapter notebooks."""
    (root / "book").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "_config.yml").write_text("title: test book\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    (root / "book" / "intro.md").write_text("# Intro\n")
    (root / "book" / "published.yaml").write_text(
        "first:\n  paper: First paper\n  rows:\n    - {label: headline mAP, key: mAP, unit: '%', published: 90.0}\n")
    for name in chapters:
        (root / "notebooks" / f"{name}.ipynb").write_text(json.dumps(_notebook(["parameters"], [], marker=name)))
    return root


def _tags(path: Path) -> list[list[str]]:
    return [c["metadata"]["tags"] for c in json.loads(path.read_text())["cells"]]


def test_notebooks_are_listed_in_file_name_order_and_filtered_by_substring(tmp_path):
    from mlic_lib.book import notebooks

    root = _book_root(tmp_path, chapters=("10_last", "02_middle", "00_first"))
    (root / "notebooks" / "notes.md").write_text("not a chapter")
    (root / "notebooks" / ".ipynb_checkpoints").mkdir()
    (root / "notebooks" / ".ipynb_checkpoints" / "00_first-checkpoint.ipynb").write_text("{}")
    assert [p.name for p in notebooks(root)] == ["00_first.ipynb", "02_middle.ipynb", "10_last.ipynb"]
    assert notebooks(root, []) == notebooks(root)  # an empty filter is no filter
    assert [p.stem for p in notebooks(root, ["last", "first"])] == ["00_first", "10_last"]  # in book order
    assert [p.stem for p in notebooks(root, ["02"])] == ["02_middle"]
    with pytest.raises(ValueError, match=r"no notebook matches \['psd'\]"):
        notebooks(root, ["psd"])


def test_the_repositorys_chapters_are_in_the_order_of_the_toc():
    import yaml

    from mlic_lib.book import notebooks

    root = Path(__file__).resolve().parents[1]
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    chapters = [c["file"] for part in toc["parts"] for c in part["chapters"] if c["file"].startswith("notebooks/")]
    assert [f"notebooks/{p.stem}" for p in notebooks(root)] == chapters


def test_stage_sources_copies_the_book_drops_failures_and_hides_default_parameters(tmp_path, monkeypatch):
    from mlic_lib.book import stage_sources

    root, build = _book_root(tmp_path / "repo"), tmp_path / "repo" / "_build"
    executed = build / "executed"
    (executed / "notebooks").mkdir(parents=True)
    ran = executed / "notebooks" / "00_first.ipynb"
    ran.write_text(json.dumps(_notebook(["parameters"], ["injected-parameters"], [], marker="ran")))
    (executed / "notebooks" / "01_second.ipynb").write_text(json.dumps(_notebook(["parameters"], [])))
    (executed / "notebooks" / "02_third.failed.ipynb").write_text(json.dumps(_notebook(["parameters"])))
    (executed / "notebooks" / "02_third.running.ipynb").write_text(json.dumps(_notebook(["parameters"])))
    executed_before = ran.read_text()
    (build / "src" / "notebooks").mkdir(parents=True)
    (build / "src" / "notebooks" / "99_stale.ipynb").write_text("{}")  # left from an earlier build
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "res"))
    write_chapter_results("first", {"profile": "smoke"}, {"mAP": 61.25}, units={"mAP": "%"})

    src = stage_sources(root, build, executed)
    assert src == build / "src"
    assert sorted(p.name for p in (src / "notebooks").iterdir()) == ["00_first.ipynb", "01_second.ipynb"]
    assert (src / "_config.yml").read_text() == "title: test book\n"
    assert (src / "_toc.yml").read_text() == (root / "_toc.yml").read_text()
    assert (src / "book" / "intro.md").read_text() == "# Intro\n"
    # the defaults cell is hidden where papermill injected the values used, and only in the book's copy
    assert _tags(src / "notebooks" / "00_first.ipynb") == [["parameters", "remove-cell"], ["injected-parameters"], []]
    assert json.loads((src / "notebooks" / "00_first.ipynb").read_text())["cells"][0]["source"] == "ran"
    assert _tags(src / "notebooks" / "01_second.ipynb") == [["parameters"], []]
    assert ran.read_text() == executed_before
    # the reproduction matrix is written from $MLIC_RESULTS and the root's published.yaml
    page = (src / "book" / "reproduction.md").read_text()
    assert page == reproduction_page(tmp_path / "res", root / "book" / "published.yaml")
    assert "## First paper" in page and "| headline mAP | % | 61.25 | 90.0 |" in page
    assert not (root / "book" / "reproduction.md").exists()  # the sources stay as committed


def test_stage_sources_reads_results_from_the_build_when_mlic_results_is_unset(tmp_path, monkeypatch):
    from mlic_lib.book import stage_sources

    root, build = _book_root(tmp_path), tmp_path / "_build"
    (build / "executed" / "notebooks").mkdir(parents=True)
    monkeypatch.setenv("MLIC_RESULTS", str(build / "results"))
    write_chapter_results("first", {"profile": "smoke"}, {"mAP": 70.5}, units={"mAP": "%"})
    monkeypatch.setenv("MLIC_RESULTS", "")  # empty counts as unset
    src = stage_sources(root, build, build / "executed")
    assert "| headline mAP | % | 70.50 | 90.0 |" in (src / "book" / "reproduction.md").read_text()


def test_build_html_runs_jupyter_book_on_the_staged_tree(tmp_path, monkeypatch):
    import subprocess
    import sys

    import mlic_lib.book
    from mlic_lib.book import build_html

    calls = []
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, **kw: calls.append((cmd, kw)) or subprocess.CompletedProcess(cmd, 0))
    fake_python = tmp_path / "venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    (fake_python.parent / "jupyter-book").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(fake_python))
    src, out = tmp_path / "src", tmp_path / "out"
    assert build_html(src, out) == out / "_build" / "html"
    exe = str(fake_python.parent / "jupyter-book")  # the environment's own jupyter-book, next to python
    assert calls[-1] == ([exe, "build", str(src), "--path-output", str(out), "--keep-going", "-W", "-n"], {})
    build_html(src, out, strict=False)
    assert calls[-1][0] == [exe, "build", str(src), "--path-output", str(out), "--keep-going"]
    (fake_python.parent / "jupyter-book").unlink()
    monkeypatch.setattr(mlic_lib.book.shutil, "which", lambda name: f"/elsewhere/{name}")
    build_html(src, out)
    assert calls[-1][0][0] == "/elsewhere/jupyter-book"  # else the one on PATH
    monkeypatch.setattr(mlic_lib.book.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="jupyter-book is not installed"):
        build_html(src, out)
    assert len(calls) == 3


def _fake_execute_and_html(monkeypatch, executed_log, html_log, make_index=True):
    """Replace papermill and jupyter-book: an 'executed' chapter is its source with an injected-parameters cell
    (and writes its result JSON, as the chapters do); the 'HTML build' records its arguments."""
    import os

    import mlic_lib.book

    def execute(src, dst, profile, parameters=None):
        executed_log.append((src.name, dst, profile))
        nb = json.loads(src.read_text())
        nb["cells"].insert(1, {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]},
                               "source": f"profile = {profile!r}", "outputs": [], "execution_count": None})
        nb.setdefault("metadata", {})["papermill"] = {"parameters": {"profile": profile}}  # as papermill records it
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps(nb))
        if src.stem == "00_first":
            results = Path(os.environ["MLIC_RESULTS"])
            results.mkdir(parents=True, exist_ok=True)
            (results / "first.json").write_text(json.dumps({"chapter": "first", "profile": profile,
                                                            "numbers": {"mAP": 55.0}, "units": [["mAP", "%"]]}))
        return {"00_first": 1.04, "01_second": 2.5}[src.stem]

    def html(src, out_root, strict=True):
        html_log.append((src, out_root, strict))
        (out_root / "_build" / "html").mkdir(parents=True, exist_ok=True)
        if make_index:
            (out_root / "_build" / "html" / "index.html").write_text("<html></html>")
        return out_root / "_build" / "html"

    monkeypatch.setattr(mlic_lib.book, "execute_notebook", execute)
    monkeypatch.setattr(mlic_lib.book, "build_html", html)


def test_build_book_executes_every_chapter_stages_and_builds(tmp_path, monkeypatch, capsys):
    import os

    from mlic_lib.book import build_book

    root = _book_root(tmp_path.resolve() / "repo")  # build_book resolves the root
    build = root / "_build"
    for name in ("MLIC_RESULTS", "MLIC_CACHE", "TQDM_DISABLE"):
        monkeypatch.setenv(name, "")  # recorded, so that what build_book sets is undone after the test
        monkeypatch.delenv(name)  # unset: the book's defaults apply
    executed, html = [], []
    _fake_execute_and_html(monkeypatch, executed, html)

    index = build_book(root, "smoke")
    assert index == build / "html" / "index.html"
    assert [(name, dst, profile) for name, dst, profile in executed] == [
        ("00_first.ipynb", build / "executed" / "notebooks" / "00_first.ipynb", "smoke"),
        ("01_second.ipynb", build / "executed" / "notebooks" / "01_second.ipynb", "smoke")]
    assert json.loads((build / "executed" / "timings.json").read_text()) == {
        "profile": "smoke", "seconds": {"00_first": 1.0, "01_second": 2.5}, "total_seconds": 3.5}
    assert html == [(build / "src", root, True)]
    assert os.environ["MLIC_RESULTS"] == str(build / "results")
    assert os.environ["MLIC_CACHE"] == str(build / "cache") and os.environ["TQDM_DISABLE"] == "1"
    staged = build / "src" / "notebooks"
    assert _tags(staged / "00_first.ipynb") == [["parameters", "remove-cell"], ["injected-parameters"], []]
    assert "| headline mAP | % | 55.00 | 90.0 |" in (build / "src" / "book" / "reproduction.md").read_text()

    executed.clear()
    capsys.readouterr()
    build_book(root, "smoke", only=["second"], strict=False)
    assert [e[0] for e in executed] == ["01_second.ipynb"] and html[-1][2] is False
    # a partial build updates its chapters' timings (it replaced the whole record with its own)
    assert json.loads((build / "executed" / "timings.json").read_text())["seconds"] == {"00_first": 1.0,
                                                                                         "01_second": 2.5}
    assert sorted(p.name for p in staged.iterdir()) == ["00_first.ipynb", "01_second.ipynb"]  # earlier run kept
    assert "another profile" not in capsys.readouterr().out

    executed.clear()
    build_book(root, "default", only=["second"], strict=False)
    assert json.loads((build / "executed" / "timings.json").read_text()) == {  # another profile: replaced
        "profile": "default", "seconds": {"01_second": 2.5}, "total_seconds": 2.5}
    assert "with another profile than default: 00_first.ipynb (smoke)" in capsys.readouterr().out

    executed.clear()
    build_book(root, "smoke", skip_execute=True)
    assert executed == [] and len(html) == 4
    assert json.loads((build / "executed" / "timings.json").read_text())["profile"] == "default"  # untouched
    assert "with another profile than smoke: 01_second.ipynb (default)" in capsys.readouterr().out


def test_a_second_build_of_the_same_checkout_is_refused_at_once(tmp_path, monkeypatch):
    """Two builds at once executed into the same notebook copies and restaged _build/src under each other."""
    import fcntl

    from mlic_lib.book import build_book
    from mlic_lib.file_lock import Busy

    root = _book_root(tmp_path / "repo")
    monkeypatch.setenv("TQDM_DISABLE", "")
    executed, html = [], []
    _fake_execute_and_html(monkeypatch, executed, html)
    (root / "_build").mkdir()
    with open(root / "_build" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another build holds it
        with pytest.raises(Busy, match="another `mlic book` is building .*_build: wait for it"):
            build_book(root, "smoke")
    assert executed == [] and html == []
    build_book(root, "smoke")  # released
    assert len(executed) == 2


def test_two_runs_of_one_chapter_into_one_copy_are_refused(tmp_path, monkeypatch):
    """Two `mlic reproduce` of one chapter and profile shared the .running copy (the second's rename failed, or the
    first's result was replaced by a half-run)."""
    import fcntl

    import mlic_lib.book
    from mlic_lib.book import run_chapter
    from mlic_lib.file_lock import Busy

    ran = []
    monkeypatch.setattr(mlic_lib.book, "execute_notebook", lambda nb, dst, *a, **k: ran.append(dst) or 1.0)
    nb, dst = tmp_path / "00_first.ipynb", tmp_path / "out" / "00_first.ipynb"
    dst.parent.mkdir()
    with open(dst.parent / ".00_first.ipynb.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(Busy, match="another run is executing 00_first.ipynb into .*out/00_first.ipynb"):
            run_chapter(nb, dst, "smoke")
    assert ran == []
    assert run_chapter(nb, dst, "smoke") == 1.0 and ran == [dst]
    assert run_chapter(nb, tmp_path / "other" / "00_first.ipynb", "smoke") == 1.0  # another copy: no conflict


def test_the_full_profile_without_a_gpu_is_refused_unless_asked_for(tmp_path, monkeypatch, capsys):
    """`make full` on a machine without a GPU started the papers' recipes (days on a CPU) after a one-line note."""
    import torch

    from mlic_lib import cli
    from mlic_lib.book import build_book, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root = _book_root(tmp_path / "repo")
    monkeypatch.setenv("TQDM_DISABLE", "")
    executed, html = [], []
    _fake_execute_and_html(monkeypatch, executed, html)
    with pytest.raises(ValueError, match="no CUDA GPU: run it on one, or pass --allow-cpu"):
        build_book(root, "full")
    assert executed == [] and not (root / "_build").exists()
    build_book(root, "full", allow_cpu=True)
    assert [e[2] for e in executed] == ["full", "full"]
    check_device("default")  # the CPU profiles need no GPU
    repo = Path(__file__).resolve().parents[1]
    for argv in (["reproduce", "primer", "--profile", "full"], ["teachers"]):
        assert cli.main(["--root", str(repo), *argv]) == 2
        assert "pass --allow-cpu" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_device("full")


def test_a_kernel_that_dies_is_reported_with_the_chapter_and_its_partly_executed_copy(tmp_path, monkeypatch):
    """A kernel killed for lack of memory ended the book with a bare "mlic: error: Kernel died"."""
    from nbclient.exceptions import DeadKernelError

    import mlic_lib.book
    from mlic_lib.book import build_book, failed_copy

    root = _book_root(tmp_path / "repo")
    monkeypatch.setenv("TQDM_DISABLE", "")

    def execute(src, dst, profile, parameters=None):
        failed_copy(dst).parent.mkdir(parents=True, exist_ok=True)
        failed_copy(dst).write_text("{}")  # what execute_notebook keeps of the run
        raise DeadKernelError("Kernel died")

    monkeypatch.setattr(mlic_lib.book, "execute_notebook", execute)
    with pytest.raises(RuntimeError, match=r"(?s)^00_first.ipynb: the run stopped with DeadKernelError: Kernel died "
                       r"\(a kernel that dies was often killed for lack of memory\)\n  the partly executed notebook "
                       r"is .*00_first.failed.ipynb"):
        build_book(root, "smoke")


def test_a_long_tmpdir_does_not_break_the_kernel_sockets(tmp_path, monkeypatch):
    """A Unix socket path has at most 107 characters: under a long $TMPDIR every kernel failed to start with a raw
    ZMQError; the sockets' folder is then made in /tmp."""
    import tempfile

    from mlic_lib.book import _kernel_transport

    long = tmp_path / ("x" * 90)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    with _kernel_transport() as config:
        ip = config.KernelManager.ip
        assert len(ip + "-99999") <= 107 and ip.startswith("/tmp/mlic-kernel-")
        assert Path(ip).parent.is_dir()
    assert not Path(ip).parent.exists()  # removed afterwards
    monkeypatch.setattr(tempfile, "tempdir", None)
    with _kernel_transport() as config:
        assert Path(config.KernelManager.ip).parent.parent == Path(tempfile.gettempdir())


def test_build_book_errors(tmp_path, monkeypatch):
    from mlic_lib.book import build_book

    root = _book_root(tmp_path / "repo")
    monkeypatch.setenv("TQDM_DISABLE", "")  # build_book sets it: undone after the test
    executed, html = [], []
    _fake_execute_and_html(monkeypatch, executed, html, make_index=False)
    with pytest.raises(ValueError, match="no executed chapters in .*without --skip-execute"):
        build_book(root, skip_execute=True)
    assert html == []  # nothing was staged or built
    with pytest.raises(RuntimeError, match="jupyter-book finished but .*index.html is missing"):
        build_book(root)
    assert len(html) == 1


def test_a_failing_chapter_stops_the_book_with_a_message_naming_the_cell_and_the_failed_copy(tmp_path, monkeypatch):
    """`make book` used to end in papermill's traceback, without saying where the partly executed notebook was."""
    from papermill.exceptions import PapermillExecutionError

    import mlic_lib.book
    from mlic_lib.book import build_book, failed_copy

    root = _book_root(tmp_path / "repo")
    monkeypatch.setenv("TQDM_DISABLE", "")
    ran = []

    def execute(src, dst, profile, parameters=None):
        ran.append(src.name)
        raise PapermillExecutionError(3, 4, "make_scenes(...)", "ValueError", "bad scenes", ["Traceback ..."])

    monkeypatch.setattr(mlic_lib.book, "execute_notebook", execute)
    dst = root.resolve() / "_build" / "executed" / "notebooks" / "00_first.ipynb"
    with pytest.raises(RuntimeError, match=r"(?s)^00_first.ipynb failed in cell 4 with ValueError: bad scenes\n.*"
                       + re.escape(str(failed_copy(dst)))) as info:
        build_book(root, "smoke")
    assert "last complete run" not in str(info.value)  # there is none yet
    assert ran == ["00_first.ipynb"]  # the next chapter does not start


def test_a_failing_jupyter_book_build_is_a_clear_error(tmp_path, monkeypatch):
    import subprocess

    import mlic_lib.book

    calls = []
    monkeypatch.setattr(mlic_lib.book.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 2))
    with pytest.raises(RuntimeError, match=r"jupyter-book build failed \(exit status 2\).*every Sphinx warning"):
        mlic_lib.book.build_html(tmp_path / "src", tmp_path)
    with pytest.raises(RuntimeError, match=r"exit status 2\); its messages are above$"):
        mlic_lib.book.build_html(tmp_path / "src", tmp_path, strict=False)
    assert "-W" in calls[0] and "-W" not in calls[1]


def test_preflight_names_the_missing_datasets_and_gpu_of_a_full_run(tmp_path, monkeypatch):
    """A `full` run found a missing dataset only at the cell that reads it (SpliceMix's VOC part comes after hours
    of scene runs): the notes say so before the kernel starts."""
    import torch

    from mlic_lib.book import preflight
    from mlic_lib.data.fake import write_fake

    monkeypatch.setenv("MLIC_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    notes = preflight("splicemix", "full")
    assert len(notes) == 2
    assert notes[0].startswith("voc2007 is missing under ") and "`mlic data prepare voc2007` first" in notes[0]
    assert notes[1].startswith("no CUDA GPU")
    write_fake("voc2007", tmp_path / "data", 10, 10, 32, force=True)
    assert [n[:11] for n in preflight("splicemix", "full")] == ["no CUDA GPU"]  # synthetic files count as there
    assert len(preflight("indeed", "full")) == 3  # mnist, cifar10, the GPU
    ltml = [n.split(" ")[0] for n in preflight("ltml", "full")]
    assert ltml == ["voc2012", "voc_lt", "no"]  # VOC-LT reads VOC2012's images (and VOC2007's, written above)
    # a section's own root, not $MLIC_DATA
    from mlic_lib.profiles import load_profile

    elsewhere = load_profile("assocformer", "full", {"data.root": str(tmp_path / "nothing")})
    assert preflight("assocformer", "full", elsewhere)[0].startswith(f"voc2007 is missing under {tmp_path / 'nothing'}")
    here = load_profile("assocformer", "full", {"data.root": str(tmp_path / "data")})
    assert [n[:11] for n in preflight("assocformer", "full", here)] == ["no CUDA GPU"]
    # a relative root is the kernel's: relative to notebooks/, not to where the command runs
    (tmp_path / "repo" / "notebooks").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    relative = load_profile("assocformer", "full", {"data.root": "../../data"})  # tmp_path/data from notebooks/
    nbs = tmp_path / "repo" / "notebooks"
    assert [n[:11] for n in preflight("assocformer", "full", relative, run_dir=nbs)] == ["no CUDA GPU"]
    assert preflight("assocformer", "full", relative)[0].startswith("voc2007 is missing under ../../data")
    assert preflight("splicemix", "default") == [] and preflight("ltml", "smoke") == []  # embedded data, a CPU book
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preflight("splicemix", "full") == []


# ------------------------------------------------------------------------------------- mutation follow-ups


def test_row_scale_converts_only_between_units_that_fit_and_fmt_prints_an_index_with_two_decimals():
    """A dimensionless number (unit "1") goes under a named index as is, never into a % or points row; the
    papers' precision of two decimals holds for %, points and ARI, four significant digits elsewhere."""
    from mlic_lib.book import _fmt, row_scale

    assert row_scale("%", "%") == 1.0 and row_scale("fraction", "%") == 100.0 == row_scale("fraction", "points")
    assert row_scale("1", "ARI") == 1.0
    for stored, shown in (("1", "%"), ("1", "points"), ("%", "fraction"), ("s", "%"), (None, "%")):
        with pytest.raises(ValueError, match="cannot be shown"):
            row_scale(stored, shown)
    assert [_fmt(0.123456, u) for u in ("%", "points", "ARI", "1", "count")] == [
        "0.12", "0.12", "0.12", "0.1235", "0.1235"]


def test_reproduction_page_follows_the_book_order_and_flags_only_a_positive_count(tmp_path, monkeypatch):
    """Chapters appear in the order of published.yaml (unlisted ones last), not alphabetically; a caveat whose
    count is 0 adds nothing to the row."""
    res = tmp_path / "res"
    monkeypatch.setenv("MLIC_RESULTS", str(res))
    for chapter in ("alpha", "zeta", "extra"):
        write_chapter_results(chapter, {"profile": "smoke", "chapter": chapter}, {"ari": 0.5, "n0": 0, "n2": 2},
                              units={"*": "1"})
    published = tmp_path / "published.yaml"
    published.write_text(
        "zeta:\n  paper: Zeta paper\n  rows:\n"
        "    - {label: none flagged, key: ari, unit: ARI, caveat: {key: n0, text: run(s) on a plateau}}\n"
        "    - {label: two flagged, key: ari, unit: ARI, caveat: {key: n2, text: run(s) on a plateau}}\n"
        "alpha:\n  paper: Alpha paper\n  rows:\n    - {label: index, key: ari, unit: ARI}\n")
    page = reproduction_page(res, published)
    assert page.index("## Zeta paper") < page.index("## Alpha paper") < page.index("## extra")
    assert "| none flagged | ARI | 0.50 | - |" in page
    assert "| two flagged | ARI | 0.50 (2 run(s) on a plateau) | - |" in page


def test_executed_profiles_skips_failed_and_running_copies(tmp_path):
    """Only complete copies are shown in the book: a failed or still running one names no profile of the book."""
    from mlic_lib.book import executed_profiles

    def nb(profile):
        meta = {} if profile is None else {"papermill": {"parameters": {"profile": profile}}}
        return json.dumps({**_notebook(["parameters"]), "metadata": meta})

    (tmp_path / "00_first.ipynb").write_text(nb("smoke"))
    (tmp_path / "01_second.ipynb").write_text(nb(None))
    (tmp_path / "01_second.failed.ipynb").write_text(nb("full"))
    (tmp_path / "02_third.running.ipynb").write_text(nb("full"))
    assert executed_profiles(tmp_path) == {"00_first.ipynb": "smoke", "01_second.ipynb": None}


def _keep_env(monkeypatch, *names):
    """Record ``names`` with monkeypatch, so that what env_defaults / build_book set is undone after the test."""
    for name in names:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:  # recorded as unset
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)


def test_env_defaults_treats_an_empty_variable_as_unset(tmp_path, monkeypatch):
    """An empty MLIC_RESULTS / MLIC_CACHE gets the build's folder: the kernels would otherwise write their results
    to ~/.cache while the reproduction page reads _build/results."""
    from mlic_lib.book import env_defaults

    _keep_env(monkeypatch, "MLIC_DATA", "MLIC_REFERENCE_DATA", "TQDM_DISABLE")
    monkeypatch.setenv("MLIC_RESULTS", "")
    monkeypatch.setenv("MLIC_CACHE", "")
    build = tmp_path / "_build"
    env_defaults(build)
    assert os.environ["MLIC_RESULTS"] == str((build / "results").resolve())
    assert os.environ["MLIC_CACHE"] == str((build / "cache").resolve())


def test_check_folders_refuses_a_cache_or_results_folder_that_is_a_file(tmp_path, monkeypatch):
    """A file where the run cache should be is an error before any kernel starts, not a note and a failure when
    the first run is saved."""
    from mlic_lib.book import check_folders

    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("MLIC_CACHE", str(afile))
    with pytest.raises(ValueError, match="MLIC_CACHE=.* is a file, not a folder"):
        check_folders()
    monkeypatch.setenv("MLIC_CACHE", str(tmp_path / "cache"))
    check_folders()
    monkeypatch.setenv("MLIC_RESULTS", str(afile))
    with pytest.raises(ValueError, match=r"MLIC_RESULTS=.* cannot be written \(it is a file, not a folder\)"):
        check_folders()


def test_record_timings_totals_the_merged_record(tmp_path):
    """A partial build's total is that of every chapter in the merged record, not of the chapters it ran."""
    from mlic_lib.book import _record_timings

    path = tmp_path / "timings.json"
    _record_timings(path, "smoke", {"00_first": 1.5, "01_second": 2.0})
    _record_timings(path, "smoke", {"01_second": 3.0})
    assert json.loads(path.read_text()) == {"profile": "smoke", "seconds": {"00_first": 1.5, "01_second": 3.0},
                                            "total_seconds": 4.5}


def test_build_book_prints_each_chapters_preflight_notes_before_running_it(tmp_path, monkeypatch, capsys):
    """The notes on missing data are printed before the chapter's kernel starts, for the chapter's name."""
    import mlic_lib.book
    from mlic_lib.book import build_book

    root = _book_root(tmp_path.resolve() / "repo")
    _keep_env(monkeypatch, "MLIC_RESULTS", "MLIC_CACHE", "MLIC_DATA", "MLIC_REFERENCE_DATA", "TQDM_DISABLE")
    monkeypatch.delenv("MLIC_RESULTS", raising=False)  # unset: the book's defaults apply
    monkeypatch.delenv("MLIC_CACHE", raising=False)
    _fake_execute_and_html(monkeypatch, [], [])
    monkeypatch.setattr(mlic_lib.book, "chapter_of", lambda nb: nb.stem.split("_", 1)[1])  # 00_first: "first"
    calls = []

    def preflight(chapter, profile, settings=None, run_dir=None):
        calls.append((chapter, profile, run_dir))
        return [f"{chapter} lacks its data"]

    monkeypatch.setattr(mlic_lib.book, "preflight", preflight)
    build_book(root, "smoke")
    assert calls == [("first", "smoke", root / "notebooks"), ("second", "smoke", root / "notebooks")]
    out = capsys.readouterr().out
    assert out.index("[book] note: first lacks its data") < out.index("[book] executing 00_first.ipynb")
    assert out.index("[book] note: second lacks its data") < out.index("[book] executing 01_second.ipynb")
