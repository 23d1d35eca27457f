"""Every chapter notebook: committed without outputs, has a papermill parameters cell, and runs
end to end with profile=smoke (a fresh cache, so it really trains)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_parameters(nb):
    cells = json.loads(nb.read_text())["cells"]
    for c in cells:
        if c["cell_type"] == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, f"{nb.name} has outputs"
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and 'profile = "default"' in "".join(params[0]["source"])


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_smoke_run(nb, tmp_path):
    from mlic_lib.book import execute_notebook

    os.environ.pop("MPLBACKEND", None)  # the kernel must use its inline backend
    out = tmp_path / nb.name
    execute_notebook(nb, out, "smoke", timeout=600)
    executed = json.loads(out.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in executed["cells"] for o in c.get("outputs", []))
    assert images > 0, "the chapter drew no figure"
    results = list((tmp_path / "results").glob("*.json"))
    assert results, "the chapter wrote no results JSON"
    # every headline row of the reproduction matrix names a key this chapter really writes
    import yaml

    from mlic_lib.book import row_scale
    from mlic_lib.reporting import flatten_numbers, unit_of

    pub = yaml.safe_load((REPO / "book" / "published.yaml").read_text())
    for f in results:
        res = json.loads(f.read_text())
        flat, units = dict(flatten_numbers(res["numbers"])), dict(res["units"])
        for row in pub.get(res["chapter"], {}).get("rows", []):
            for key in (row["key"], row.get("std")):
                if key is None:
                    continue
                if not row.get("optional"):
                    assert key in flat, f"book/published.yaml: {res['chapter']} writes no {key!r}"
                row_scale(unit_of(key, units), row["unit"])  # raises when the row's unit does not fit the stored one
            caveat = (row.get("caveat") or {}).get("key")
            if caveat is not None and not row.get("optional"):  # a row's flag count is written too, as a count
                assert caveat in flat and unit_of(caveat, units) == "count", (res["chapter"], caveat)
