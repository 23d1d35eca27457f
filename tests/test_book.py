"""Book builder pieces: the reproduction matrix page and the staging of executed notebooks."""

from __future__ import annotations

import json
from pathlib import Path

from mlic_lib.book import _hide_default_parameters, reproduction_page
from mlic_lib.reporting import write_chapter_results


def test_reproduction_page_puts_ours_next_to_published(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "res"))
    write_chapter_results("demo", {"profile": "smoke", "chapter": "demo"},
                          {"mAP_x": 0.5, "cached": True, "note": "text", "n": 3, "std_x": 0.012,
                           "mAP": {"Baseline": 61.5, "pair": [1, 2]}, "one_seed_std": float("nan")})
    published = tmp_path / "published.yaml"
    published.write_text(
        "demo:\n  paper: Demo paper\n  source: Table 1\n  rows:\n"
        "    - {label: Baseline mAP, key: mAP.Baseline, unit: '%', published: 93.3}\n"
        "    - {label: x, key: mAP_x, scale: 100, std: std_x, unit: '%'}\n"
        "    - {label: second of pair, key: mAP.pair.1, unit: ''}\n"
        "    - {label: one seed, key: n, std: one_seed_std, unit: runs}\n"
        "    - {label: absent, key: nope, unit: '%', published: 1.0}\n")
    page = reproduction_page(tmp_path / "res", published)
    assert "## Demo paper" in page and "Profile `smoke`" in page and "Published: Table 1." in page
    assert "| Baseline mAP | % | 61.50 | 93.3 |" in page
    assert "| x | % | 50.00 ± 1.20 | - |" in page  # a stored fraction shown in %, with its spread on the same scale
    assert "| second of pair |  | 2 | - |" in page
    assert "| one seed | runs | 3 | - |" in page  # a NaN spread (one seed) is left out
    assert "| absent | % | not computed in this build | 1.0 |" in page
    assert "cached" not in page and "note" not in page  # only the listed rows
    other = tmp_path / "other.yaml"
    other.write_text("demo:\n  paper: Demo paper\n")
    assert "No headline rows" in reproduction_page(tmp_path / "res", other)
    assert "No chapter" in reproduction_page(tmp_path / "missing", published)


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


def test_default_parameters_hidden_only_when_injected(tmp_path):
    def nb(*tag_lists):
        cells = [{"cell_type": "code", "metadata": {"tags": list(t)}, "source": "", "outputs": []}
                 for t in tag_lists]
        return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}

    path = tmp_path / "a.ipynb"
    path.write_text(json.dumps(nb(["parameters"], ["injected-parameters"], [])))
    _hide_default_parameters(path)
    tags = [c["metadata"]["tags"] for c in json.loads(path.read_text())["cells"]]
    assert tags == [["parameters", "remove-cell"], ["injected-parameters"], []]
    path.write_text(json.dumps(nb(["parameters"], [])))
    _hide_default_parameters(path)
    assert json.loads(path.read_text())["cells"][0]["metadata"]["tags"] == ["parameters"]


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
    assert spread_note(-7.0, 3.0, 4.0, decimals=2) == "larger than the seed spread of 5.00"
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
