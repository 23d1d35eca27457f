"""Book builder pieces: the reproduction matrix page and the staging of executed notebooks."""

from __future__ import annotations

import json

from mlic_lib.book import _hide_default_parameters, reproduction_page
from mlic_lib.reporting import write_chapter_results


def test_reproduction_page_puts_ours_next_to_published(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path / "res"))
    write_chapter_results("demo", {"profile": "smoke", "chapter": "demo"},
                          {"mAP_x": 0.5, "cached": True, "note": "text", "n": 3,
                           "mAP": {"Baseline": 61.5, "pair": [1, 2]}})
    published = tmp_path / "published.yaml"
    published.write_text("demo:\n  paper: Demo paper\n  source: Table 1\n  numbers:\n    mAP.Baseline: 93.3\n")
    page = reproduction_page(tmp_path / "res", published)
    assert "## Demo paper" in page and "Profile `smoke`" in page and "Published: Table 1." in page
    assert "| `mAP_x` | 0.5 | - |" in page
    assert "| `mAP.Baseline` | 61.5 | 93.3 |" in page and "| `mAP.pair.1` | 2 | - |" in page
    assert "| `n` | 3 | - |" in page
    assert "cached" not in page and "note" not in page  # booleans and strings are not numbers
    assert "No chapter" in reproduction_page(tmp_path / "missing", published)


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
