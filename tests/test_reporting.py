"""The book's reporting rules: seed standard deviations, verdicts against the paper, paired bootstrap intervals."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from mlic_lib.reporting import (
    AGREES,
    BORDERLINE_FACTOR,
    CONTRADICTS,
    BootstrapDifference,
    bootstrap_difference,
    borderline_note,
    check_units,
    checklist_text,
    claim_over,
    claim_verdict,
    compare_rows,
    comparison_table,
    correlation_signs,
    dash_missing,
    flagged_verdict,
    flatten_numbers,
    interval_sentence,
    paired_bootstrap,
    paired_differences,
    paper_verdict,
    ranking,
    seed_sd,
    seed_spread,
    shown_path,
    spread_category,
    spread_note,
    spread_verdict,
    unit_of,
    verdict_summary,
    write_chapter_results,
)


def test_seed_sd_is_the_sample_std_and_nan_with_one_seed():
    assert seed_sd([1.0, 2.0, 4.0]) == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert math.isnan(seed_sd([3.0]))
    table = np.array([[1.0, 5.0], [3.0, 9.0]])  # seeds x groups
    np.testing.assert_allclose(seed_sd(table), [np.sqrt(2.0), np.sqrt(8.0)])
    assert np.isnan(seed_sd(table[:1])).all() and seed_sd(table[:1]).shape == (2,)
    with pytest.raises(ValueError, match="one value per seed"):
        seed_sd(1.0)


def test_claim_verdict_states_the_difference_the_spread_and_the_papers_verdict():
    assert claim_verdict(2.1, 1.4, +1, basis=" over 3 seeds") == (
        "+2.1 mAP points, beyond the seed spread of 1.4 over 3 seeds: agrees with the paper")
    assert claim_verdict(2.0, 1.4, -1, unit="points", decimals=2) == (
        "+2.00 points, beyond the seed spread of 1.40: CONTRADICTS the paper (borderline: within 1.5 times the spread)")
    assert claim_verdict(-0.3, 1.4, +1) == (
        "-0.3 mAP points, within the seed spread of 1.4: no verdict (opposite to the paper)")
    assert claim_verdict(0.0, 1.4, +1).endswith("no verdict (a zero difference)")
    assert claim_verdict(0.4, float("nan"), +1) == (
        "+0.4 mAP points (same direction as the paper); one seed: no spread, so no verdict")
    assert claim_verdict(float("nan"), 1.0, +1) == "no value: no verdict"
    # a difference that prints as zero says that its sign is below the printed precision
    assert claim_verdict(-0.004, 0.5, -1, decimals=2) == ("-0.00 mAP points, within the seed spread of 0.50: no "
                                                          "verdict (same direction as the paper, by less than 0.005)")
    # a difference just beyond the spread is printed with the decimals that tell them apart
    assert claim_verdict(1.44, 1.40, +1).startswith("+1.44 mAP points, beyond the seed spread of 1.40: agrees")
    assert claim_verdict(0.04, 0.0, +1).startswith("+0.04 mAP points, beyond the seed spread of 0.00")
    with pytest.raises(ValueError, match="paper_sign"):
        claim_verdict(1.0, 0.5, 0)


def _printed_category(text: str) -> str:
    """The category a reader gets from the first '+d ... spread s' pair printed in ``text``."""
    d, s = (float(v) for v in re.search(r"([-+]\d+\.\d+)\D*?spread (?:of )?(\d+\.\d+)", text).groups())
    return spread_category(d, s)


@pytest.mark.parametrize("diff, spread", [(1.44, 2 ** 0.5), (1.43, 1.4361), (2.24, 1.46), (2.16, 1.46),
                                          (0.054, 0.0504), (-1.414, 1.4142), (2.1, 1.4), (0.3, 1.0)])
def test_printed_numbers_fall_in_the_category_the_verdict_states(diff, spread):
    """A difference and a spread printed as the same number, or as numbers in another band than the verdict's
    (beyond / borderline / within), read as a contradiction: every verdict printer adds decimals until they agree."""
    truth = spread_category(diff, spread)
    for text in (claim_verdict(diff, spread, +1), claim_over({"a": diff}, spread, +1, decimals=1),
                 spread_note(diff, spread), verdict_summary(
                     compare_rows(pd.DataFrame({2: [diff, 0.0]}, index=["m", "b"]),
                                  pd.DataFrame({2: [spread / 2 ** 0.5] * 2}, index=["m", "b"]), "m", "b"),
                     numbers=True)):
        if text.startswith(("within", "larger")):  # spread_note: the caller prints the difference (1 decimal here)
            printed = float(re.search(r"spread of (\d+\.\d+)", text).group(1))
            assert spread_category(round(diff, 1), printed) == truth, text
        else:
            assert _printed_category(text) == truth, text
    # several differences against one spread: the decimals must tell every one of them (4.41 alone needed 1)
    text = claim_over({0: 4.413, 1: -2.88, 2: -2.66}, 2.94, +1, "k=", decimals=1)
    values = dict(re.findall(r"k=(\d): ([-+]\d+\.\d+)", text))
    spread = float(re.search(r"seed spread (\d+\.\d+)", text).group(1))
    for k, v in {0: 4.413, 1: -2.88, 2: -2.66}.items():
        assert spread_category(float(values[str(k)]), spread) == spread_category(v, 2.94), text
    # the check can fail: two decimals print 1.43 against 1.44, beyond, where the numbers are within
    assert spread_category(1.43, round(1.4361, 1)) != spread_category(1.43, 1.4361)


def test_claim_over_agrees_only_where_every_point_does_and_names_where_it_fails():
    assert claim_over({2: 2.5, 3: 3.0}, 1.0, +1, "k=") == (
        "k=2: +2.5; k=3: +3.0 mAP points (seed spread 1.0): agrees with the paper")
    v = claim_over({2: 1.2, 3: 0.5, 5: -2.0}, 1.0, +1, "k=")
    assert v.startswith("k=2: +1.2 (borderline); k=3: +0.5; k=5: -2.0 mAP points") and v.endswith(
        "CONTRADICTS the paper at k=5")
    assert claim_over({2: 2.0, 3: 0.5}, 1.0, +1, "k=").endswith(
        "no verdict: beyond the spread in the paper's direction at k=2 only")
    assert claim_over({"a": 0.5, "b": -0.5}, 1.0, -1).endswith("no verdict: none beyond the spread")
    assert claim_over({"a": -3.0}, 1.0, -1).endswith(AGREES)  # the paper's direction is down
    assert claim_over({"a": 3.0}, float("nan"), +1) == "a: +3.0 mAP points; one seed: no spread, so no verdict"
    assert claim_over({"a": float("nan"), "b": 3.0}, 1.0, +1).endswith(
        "beyond the spread in the paper's direction at b only")
    assert claim_over({2: float("nan"), 3: float("nan")}, 1.0, +1, "k=") == (
        "k=2: no value; k=3: no value: no value to judge, so no verdict")
    with pytest.raises(ValueError, match="empty"):
        claim_over({}, 1.0, +1)


def test_checklist_text_wraps_each_claim_and_refuses_malformed_items():
    text = checklist_text([("claim " * 20, "verdict " * 20), ("c", "v")], title="T:", width=60)
    lines = text.splitlines()
    assert lines[0] == "T:" and lines[1].startswith("- claim claim") and lines[-1] == "- c -> v"
    assert all(len(line) <= 60 for line in lines) and any(line.startswith("    ") for line in lines)
    assert " -> verdict" in " ".join(line.strip() for line in lines)
    assert checklist_text([], title="") == ""
    with pytest.raises(ValueError, match="pair"):
        checklist_text([("only a claim",)])
    with pytest.raises(ValueError, match="width"):
        checklist_text([("a", "b")], width=10)


def test_paper_verdict_follows_the_papers_sign_and_the_spread_rule():
    assert paper_verdict(2.0, 1.0, +1) == AGREES and paper_verdict(-2.0, 1.0, +1) == CONTRADICTS
    assert paper_verdict(-2.0, 1.0, -1) == AGREES and paper_verdict(2.0, 1.0, -1) == CONTRADICTS
    assert paper_verdict(1.0, 1.0, +1) == "within the seed spread"  # equal to the spread is not measurable
    assert paper_verdict(0.0, 1.0, -1) == "within the seed spread"
    assert paper_verdict(5.0, float("nan"), +1) == "one seed: no spread"
    assert paper_verdict(float("nan"), 1.0, +1) == "no value to judge"
    with pytest.raises(ValueError, match="paper_sign"):
        paper_verdict(1.0, 0.5, 0)


def test_spread_verdict_does_not_judge_a_missing_difference():
    assert spread_verdict(float("nan"), 1.0, "higher", "lower") == "no value to judge"


def test_spread_category_has_one_borderline_band_for_every_chapter():
    assert BORDERLINE_FACTOR == 1.5
    assert [spread_category(d, 1.0) for d in (0.0, 1.0, -1.2, 1.5, 1.51, -3.0)] == [
        "within", "within", "borderline", "borderline", "beyond", "beyond"]
    assert spread_category(2.0, float("nan")) == "none" and spread_category(float("inf"), 1.0) == "undefined"
    # a borderline difference still counts (with a qualifier where it is printed)
    assert spread_verdict(1.2, 1.0, "higher", "lower") == "higher" and paper_verdict(-1.2, 1.0, +1) == CONTRADICTS
    assert borderline_note(1.2, 1.0) == " (borderline: within 1.5 times the spread)"
    assert borderline_note(2.0, 1.0) == borderline_note(0.5, 1.0) == borderline_note(1.2, float("nan")) == ""
    assert spread_note(1.2, 0.6, 0.8) == "larger than the seed spread of 1.0 (borderline: within 1.5 times the spread)"
    assert spread_note(2.0, 0.6, 0.8) == "larger than the seed spread of 1.0"
    assert spread_note(0.9, 0.6, 0.8) == "within the seed spread of 1.0, so not a measurable difference"


def test_ranking_joins_neighbours_by_the_spread_rule():
    means = {"A": 3.0, "B": 1.0, "C": 0.9, "D": -0.4}
    sds = {"A": 0.3, "B": 0.4, "C": 0.0, "D": 1.0}  # spreads of the neighbours: 0.5, 0.4, 1.0
    assert ranking(means, sds) == "A (3.0) > B (1.0) ≈ C (0.9) ≳ D (-0.4)"
    assert ranking({"A": 1.0, "B": 0.0}, {"A": 0.1, "B": 0.1}, n_seeds=1) == "A (1.0) ≈ B (0.0)"  # no spread
    assert ranking({}, {}) == ""
    nan = float("nan")  # a missing mean is listed, not ranked first
    assert ranking({"A": nan, "B": 1.0, "C": 2.0}, {"A": 0.1, "B": 0.1, "C": 0.1}) == "C (2.0) > B (1.0); no value: A"
    with pytest.raises(ValueError, match="same items"):
        ranking({"A": 1.0}, {"B": 0.1})


def test_paired_bootstrap_matches_a_direct_resampling_and_is_reproducible():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 40)
    mean, lo, hi = paired_bootstrap(a, b, n_boot=500, level=0.9, seed=7)
    d = a - b
    ref_rng = np.random.default_rng(7)  # the same draws, written out
    boots = [d[ref_rng.integers(0, 40, size=40)].mean() for _ in range(500)]
    assert mean == pytest.approx(d.mean())
    assert (lo, hi) == pytest.approx(tuple(np.quantile(boots, [0.05, 0.95])))
    assert paired_bootstrap(a, b, n_boot=500, level=0.9, seed=7) == (mean, lo, hi)  # independent of earlier calls
    assert lo < mean < hi
    for x, y in (([1.0], [0.0]), (a, 0.0), (a[:5], b[:4])):  # too short; a scalar b would broadcast; unpaired
        with pytest.raises(ValueError, match="paired 1-d sequences of the same length"):
            paired_bootstrap(x, y)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(a, b, level=1.0)
    with pytest.raises(ValueError, match="1 of the 40 pairs are NaN"):
        paired_bootstrap(np.r_[a[:-1], np.nan], b)


def test_dash_missing_rounds_and_marks_missing_values():
    df = pd.DataFrame({"ours": [1.234, np.nan], "paper": [np.nan, 95.4], "sd": [2.0, 0.6], "n": [3, 4],
                       "name": ["a", None]})
    out = dash_missing(df)
    assert out.loc[0, "ours"] == "1.2" and out.loc[1, "ours"] == "—" and out.loc[0, "paper"] == "—"
    assert out.loc[1, "paper"] == "95.4"
    assert list(dash_missing(df, 2)["sd"]) == ["2.00", "0.60"]  # fixed decimals: a column reads evenly
    assert list(out["n"]) == [3, 4] and list(out["name"]) == ["a", "—"]  # integers and text as they are


def test_provenance_names_library_chapter_profile_seeds_data_and_device(monkeypatch):
    import torch

    from mlic_lib import __version__
    from mlic_lib.profiles import load_profile
    from mlic_lib.reporting import provenance

    settings = {**load_profile("primer", "full"), "seeds": [0, 1, 2]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = provenance(settings, "embedded scenes (train)")
    assert line == (f"mlic_lib {__version__} | chapter=primer profile=full | seeds=[0, 1, 2] | "
                    "data=embedded scenes (train) | device=CPU")
    assert "\n" not in line  # one line, for a footnote
    # explicit seeds (e.g. the one seed a figure shows) replace the profile's; any sequence is listed
    assert "| seeds=[1] |" in provenance(settings, "d", seeds=(1,))
    assert "| seeds=[] |" in provenance(settings, "d", seeds=[])  # an empty list is not "use the profile's"
    assert "| seeds=[] |" in provenance({"chapter": "x", "profile": "p"}, "d")  # settings without seeds
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 80GB")
    assert provenance(settings, "d").endswith("| data=d | device=Fake GPU 80GB")
    on_cpu = {**settings, "train": {**settings["train"], "device": "cpu"}}  # a run forced onto the CPU
    assert provenance(on_cpu, "d").endswith("| device=CPU")


def test_shown_path_hides_the_build_folder_but_keeps_other_paths(tmp_path, monkeypatch):
    book = tmp_path / "clone"
    (book / "notebooks").mkdir(parents=True)
    monkeypatch.chdir(book / "notebooks")
    assert shown_path(book / "_build" / "results" / "psd.json") == "../_build/results/psd.json"
    assert shown_path(book / "notebooks" / "x.png") == "x.png"
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert shown_path(tmp_path / "home" / ".cache" / "r.json") == "~/.cache/r.json"
    assert shown_path("/definitely/elsewhere/r.json") == "/definitely/elsewhere/r.json"
    monkeypatch.chdir(tmp_path / "home")  # its parent is neither the root nor a book: no "../" paths through it
    assert shown_path(tmp_path / "home" / ".cache" / "r.json") == ".cache/r.json"
    (tmp_path / "home" / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "home" / "proj")  # its parent is the home folder: ~ rather than ../
    assert shown_path(tmp_path / "home" / ".cache" / "r.json") == "~/.cache/r.json"
    monkeypatch.chdir("/tmp")  # one level below the root: absolute paths stay absolute
    assert shown_path("/definitely/elsewhere/r.json") == "/definitely/elsewhere/r.json"


def test_flatten_numbers_names_nested_values_by_dotted_keys_and_skips_non_numbers():
    nested = {"mAP": {"A": 0.5, "pair": [1, np.int64(2)]}, "ok": True, "name": "x", "none": None, "t": np.float32(1.5)}
    assert list(flatten_numbers(nested)) == [("mAP.A", 0.5), ("mAP.pair.0", 1), ("mAP.pair.1", 2), ("t", 1.5)]
    assert list(flatten_numbers({"a": np.array([[1, 2]]), "t": torch.tensor(0.25)})) == [
        ("a.0.0", 1), ("a.0.1", 2), ("t", 0.25)]


def test_unit_of_takes_the_first_matching_pattern():
    units = {"mAP_std*": "points", "mAP*": "%", "*": "count"}
    assert unit_of("mAP_std.A", units) == "points" and unit_of("mAP.A", units) == "%"
    assert unit_of("runs", units) == "count" and unit_of("x", {"mAP": "%"}) is None
    assert unit_of("MAP", {"mAP": "%"}) is None  # case matters, on every platform


@pytest.mark.parametrize("numbers, units, match", [
    ({"mAP": 0.5}, {"mAP": "percent"}, "unknown unit"),
    ({"mAP": 0.5, "secs": 3.0}, {"mAP": "fraction"}, r"no unit for \['secs'\]"),
    ({"mAP": {"A": 61.5}}, {"mAP.*": "fraction"}, r"mAP.A = 61.5 \(fraction\)"),
    ({"mAP": 161.5}, {"mAP": "%"}, "outside their unit's range"),
    # values inside arrays and tensors used to escape both checks
    ({"mAP": np.array([50.0, 60.0])}, {"mAP*": "fraction"}, r"mAP.0 = 50 \(fraction\)"),
    ({"mAP": torch.tensor([0.5]), "gain": torch.tensor(7.0)}, {"mAP*": "fraction"}, r"no unit for \['gain'\]"),
    ({"mAP": float("-inf")}, {"mAP": "points"}, r"mAP = -inf \(points\)"),  # NaN is "no value"; infinity is not
])
def test_results_with_a_missing_unknown_or_implausible_unit_are_refused_before_writing(tmp_path, monkeypatch,
                                                                                       numbers, units, match):
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path))
    with pytest.raises(ValueError, match=match):
        write_chapter_results("demo", {"profile": "smoke"}, numbers, units=units)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_results_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails before its data are on disk (a full disk reported at fsync, a killed kernel) leaves the
    previous results file as it was, and no temporary file: the reproduction page reads it."""
    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path))
    first = write_chapter_results("demo", {"profile": "smoke"}, {"mAP": 0.5}, units={"mAP": "fraction"})
    before = first.read_text()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_chapter_results("demo", {"profile": "smoke"}, {"mAP": 0.7}, units={"mAP": "fraction"})
    assert first.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["demo.json"]


def test_results_json_keeps_the_units_in_order_with_their_meanings(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("MLIC_RESULTS", str(tmp_path))
    numbers = {"mAP_std": 2.0, "mAP": 0.61, "gain": -0.4, "chance": float("nan"), "seconds": 12.0}
    units = {"mAP_std": "points", "mAP*": "fraction", "gain": "points", "chance": "fraction", "*": "s"}
    check_units(numbers, units)  # NaN (no value) passes the range check
    res = json.loads(write_chapter_results("demo", {"profile": "smoke"}, numbers, units=units).read_text())
    assert res["units"] == [list(kv) for kv in units.items()]  # a list: the order decides, json sorts dict keys
    assert set(res["unit_meanings"]) == {"fraction", "points", "s"}
    read = dict(res["units"])
    assert unit_of("seconds", read) == "s" and unit_of("mAP", read) == "fraction"
    assert unit_of("mAP_std", read) == "points"  # the first pattern wins over the later "mAP*"


def test_bootstrap_difference_drops_items_without_a_value_and_has_no_interval_below_two():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0, 1, 30), rng.uniform(0, 1, 30)
    a[[2, 5]], b[[5, 9]] = np.nan, np.nan  # items 2, 5 and 9 have no value in one of the two
    keep = np.setdiff1d(np.arange(30), [2, 5, 9])
    got = bootstrap_difference(a, b, scale=100, n_boot=300, seed=2)
    ref = paired_bootstrap(100 * a[keep], 100 * b[keep], n_boot=300, seed=2)
    assert got.n == 27 and (got.mean, got.lo, got.hi) == pytest.approx(ref)
    one = bootstrap_difference([0.5, np.nan, 0.1], [0.2, 0.3, np.nan], scale=100)  # one item in both
    assert one.n == 1 and one.mean == pytest.approx(30.0) and math.isnan(one.lo) and math.isnan(one.hi)
    none = bootstrap_difference([np.nan, 0.4], [0.1, np.nan])
    assert none.n == 0 and all(math.isnan(v) for v in none[:3])
    with pytest.raises(ValueError, match="paired 1-d sequences"):
        bootstrap_difference(a, b[:-1])
    with pytest.raises(ValueError, match=r"finite or NaN \(no value\); 1 infinite value"):
        bootstrap_difference(np.r_[a[:-1], np.inf], b)
    with pytest.raises(ValueError, match="1 infinite value"):  # one item: no interval, but no "+inf points" either
        bootstrap_difference([np.inf, np.nan], [0.0, 0.0])


def test_interval_sentence_reads_the_side_of_zero_and_says_when_there_is_no_interval():
    words = ("above", "below", "neither")
    assert interval_sentence(bootstrap_difference([0.5, 0.6, 0.7], [0.0, 0.1, 0.0], scale=100), *words).endswith(
        "above")
    assert interval_sentence(bootstrap_difference([0.0, 0.1, 0.0], [0.5, 0.6, 0.7], scale=100), *words).endswith(
        "below")
    text = interval_sentence(bootstrap_difference([0.1, 0.5, 0.2, 0.6], [0.4, 0.1, 0.5, 0.2], scale=100), *words)
    assert text.startswith("+5.0 points (95% interval over 4 images -") and text.endswith("neither")
    assert interval_sentence(bootstrap_difference([0.5, np.nan], [0.2, 0.1], scale=100), *words,
                             defined="with a map") == "no interval: 1 image with a map (mean +30.0 points)"
    wide = bootstrap_difference([0.1, 0.5, 0.2, 0.6], [0.4, 0.1, 0.5, 0.2], scale=100, level=0.8)
    assert "(80% interval over 4 images" in interval_sentence(wide, *words)
    no_item = bootstrap_difference([np.nan], [0.2])
    assert interval_sentence(no_item, *words) == "no interval: 0 images with a value in both"



def test_bootstrap_difference_draws_its_interval_at_the_level_it_states():
    """The interval a sentence labels "80%" is paired_bootstrap's at 0.8, not at the default 0.95."""
    a, b = [0.1, 0.5, 0.2, 0.6, 0.9], [0.4, 0.1, 0.5, 0.2, 0.3]
    wide = bootstrap_difference(a, b, scale=100, level=0.8, n_boot=500, seed=1)
    ref = paired_bootstrap(100 * np.asarray(a), 100 * np.asarray(b), level=0.8, n_boot=500, seed=1)
    assert (wide.mean, wide.lo, wide.hi) == pytest.approx(ref) and wide.level == 0.8
    text = interval_sentence(wide, "above", "below", "neither", level=0.5)  # an explicit level is what is printed
    assert "(50% interval over 5 images" in text
    with pytest.raises(ValueError, match="paired 1-d sequences"):  # a table of values is not one value per item
        bootstrap_difference(np.ones((2, 3)), np.zeros((2, 3)))


def test_interval_sentence_counts_an_interval_touching_zero_as_holding_it():
    """An interval with an end exactly at 0 holds 0: neither above nor below."""
    words = ("above", "below", "neither")
    touching = BootstrapDifference(2.0, 0.0, 5.0, 4)
    assert interval_sentence(touching, *words).endswith("neither")
    assert interval_sentence(BootstrapDifference(-2.0, -5.0, 0.0, 4), *words).endswith("neither")
    assert interval_sentence(BootstrapDifference(2.0, 1e-9, 5.0, 4), *words).endswith("above")


def test_paired_bootstrap_interval_covers_the_true_mean_at_about_its_level():
    """Over 200 samples of n = 100 differences drawn around 0, the 95% interval contains 0 about 95% of the time
    (the percentile bootstrap runs a little under its level at this n)."""
    rng = np.random.default_rng(11)
    hits = [lo <= 0.0 <= hi for _, lo, hi in (paired_bootstrap(rng.normal(0.0, 1.0, 100), np.zeros(100),
                                                                n_boot=1000, seed=s) for s in range(200))]
    assert 0.90 <= np.mean(hits) <= 0.99


def test_flagged_verdict_adds_the_borderline_flag_only_when_borderline():
    assert flagged_verdict(2.0, 1.0) == "higher"  # beyond 1.5 x the spread
    assert flagged_verdict(-1.2, 1.0) == "lower, borderline"
    assert flagged_verdict(1.2, 1.0, "gain", "loss") == "gain, borderline"
    assert flagged_verdict(0.5, 1.0) == "within the seed spread"
    assert flagged_verdict(0.5, float("nan")) == "one seed: no spread"
    assert flagged_verdict(0.5, 1.0, within="same") == "same"


def test_paired_differences_against_a_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3))
    b = a - np.array([2.0, 0.0, -0.3]) + 0.1 * rng.normal(size=(5, 3))  # columns: clearly higher, noise, lower
    pc = paired_differences(a, b)
    d = a - b
    np.testing.assert_allclose(pc.diffs, d)
    np.testing.assert_allclose(pc.mean, d.mean(0))
    np.testing.assert_allclose(pc.sd, d.std(0, ddof=1))
    assert pc.verdicts == [flagged_verdict(m, s) for m, s in zip(d.mean(0), d.std(0, ddof=1), strict=True)]
    assert pc.verdicts[0] == "higher" and pc.verdicts[2].startswith("lower")
    # the per-seed pairing removes what both rows share: a large common seed effect does not hide the difference
    common = rng.normal(scale=10, size=(5, 1))
    assert paired_differences(a + common, b + common).verdicts == pc.verdicts
    # one column as a 1-d array; one seed has no spread
    assert paired_differences(a[:, 0], b[:, 0]).verdicts == pc.verdicts[:1]
    one = paired_differences(a[:1], b[:1])
    assert np.isnan(one.sd).all() and set(one.verdicts) == {"one seed: no spread"}


@pytest.mark.parametrize("a, b", [(np.zeros((3, 2)), np.zeros((3, 3))), (np.zeros((2, 2, 2)), np.zeros((2, 2, 2))),
                                  (np.zeros((0, 2)), np.zeros((0, 2)))])
def test_paired_differences_refuses_unpaired_shapes(a, b):
    with pytest.raises(ValueError, match="paired arrays of the same shape"):
        paired_differences(a, b)


def test_correlation_signs_against_a_direct_tally():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    ys = [x + 0.1 * rng.normal(size=40), -x + 0.1 * rng.normal(size=40), rng.normal(size=40),
          x + 3 * rng.normal(size=40)]
    res = [spearmanr(x, y) for y in ys]
    r, p = [t.statistic for t in res], [t.pvalue for t in res]
    out = correlation_signs(r + [np.nan], p + [np.nan], paper_sign=1)
    direct = ["agrees" if pv < 0.05 and rv > 0 else "against" if pv < 0.05 else "not distinguishable from 0"
              for rv, pv in zip(r, p, strict=True)] + ["undefined"]
    assert out["labels"] == direct
    assert out["labels"][:2] == ["agrees", "against"]
    assert out["m"] == 4 and out["undefined"] == 1 and out["bonferroni_alpha"] == pytest.approx(0.05 / 4)
    assert out["agrees"] + out["against"] + out["not_distinguishable"] == 4
    assert out["agrees_bonferroni"] == sum(rv > 0 and pv < 0.05 / 4 for rv, pv in zip(r, p, strict=True))
    assert out["against_bonferroni"] == sum(rv < 0 and pv < 0.05 / 4 for rv, pv in zip(r, p, strict=True))
    flipped = correlation_signs(r, p, paper_sign=-1)
    assert (flipped["agrees"], flipped["against"]) == (out["against"], out["agrees"])
    # a p-value just above a Bonferroni level counts at 5% but not after the correction
    edge = correlation_signs([0.5, 0.5], [0.03, 0.5])  # Bonferroni level 0.025
    assert (edge["agrees"], edge["agrees_bonferroni"]) == (1, 0)


@pytest.mark.parametrize("kwargs, match", [({"paper_sign": 0}, "paper_sign"), ({"alpha": 1.5}, "alpha")])
def test_correlation_signs_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        correlation_signs([0.1], [0.5], **kwargs)
    with pytest.raises(ValueError, match="one value per test"):
        correlation_signs([0.1, 0.2], [0.5])


def test_compare_rows_against_a_direct_computation_and_its_summary():
    """Per column: the difference of the means, sqrt(sd_a^2 + sd_b^2), the verdict and the borderline flag; the
    summary groups the columns by verdict (the book's wording) and can start with the numbers."""
    cols = [2, 3, 5, 7]
    mean = pd.DataFrame([[50.0, 52.0, 60.0, 70.0], [49.0, 40.0, 61.3, 66.0]], index=["m", "base"], columns=cols)
    sd = pd.DataFrame([[1.0, 3.0, 0.6, 2.0], [1.0, 4.0, 0.8, 2.0]], index=["m", "base"], columns=cols)
    c = compare_rows(mean, sd, "m", "base")
    for n in cols:
        d, s = mean.loc["m", n] - mean.loc["base", n], np.hypot(sd.loc["m", n], sd.loc["base", n])
        assert c.loc[n, "difference"] == d and np.isclose(c.loc[n, "spread"], s)
    # N=2: +1 within 1.41; N=3: +12 beyond 5 (> 7.5); N=5: -1.3 beyond 1.0, within 1.5: borderline;
    # N=7: +4 beyond 2.83, within 4.24: borderline
    assert list(c["verdict"]) == ["within the seed spread", "gain beyond the spread", "loss beyond the spread",
                                  "gain beyond the spread"]
    assert list(c["borderline"]) == [False, False, True, True]
    assert verdict_summary(c) == ("gain beyond the spread at N=3, N=7; within the seed spread at N=2; loss beyond the "
                                  "spread at N=5; borderline (within 1.5 times the spread) at N=5, N=7")
    assert verdict_summary(c, numbers=True).startswith("N=2: +1.0 (spread 1.4), N=3: +12.0 (spread 5.0), "
                                                       "N=5: -1.3 (spread 1.0), N=7: +4.0 (spread 2.8). Gain beyond "
                                                       "the spread at")
    flipped = compare_rows(mean, sd, "base", "m", up="base higher", down="m higher")
    assert verdict_summary(flipped).startswith("base higher at N=5; within")  # compare_rows' words
    one_seed = compare_rows(mean, sd * np.nan, "m", "base")
    assert verdict_summary(one_seed) == "N=2: +1.0, N=3: +12.0, N=5: -1.3, N=7: +4.0 (one seed: no spread, no verdict)"
    with pytest.raises(ValueError, match="no row"):
        compare_rows(mean, sd, "m", "other")
    with pytest.raises(ValueError, match="same rows and columns"):
        compare_rows(mean, sd.iloc[:, :2], "m", "base")


def test_two_seeds_have_a_spread_and_one_has_none():
    """Most default profiles train two seeds: the rule must judge them (n_seeds=2 has a spread), and the seed count a
    caller passes must reach the spread (spread_note, ranking)."""
    assert seed_spread(3.0, 4.0, n_seeds=2) == pytest.approx(5.0)
    assert math.isnan(seed_spread(3.0, 4.0, n_seeds=1))
    assert ranking({"A": 3.0, "B": 0.0}, {"A": 1.0, "B": 1.0}, n_seeds=2) == "A (3.0) > B (0.0)"
    assert ranking({"A": 3.0, "B": 0.0}, {"A": 1.0, "B": 1.0}, n_seeds=1) == "A (3.0) ≈ B (0.0)"
    assert spread_note(2.0, 0.0, 0.0, n_seeds=1) == "one seed: no spread to compare"
    assert spread_note(2.0, 0.6, 0.8, n_seeds=2).startswith("larger than the seed spread of 1.0")


def test_seed_sd_along_another_axis():
    np.testing.assert_allclose(seed_sd(np.array([[1.0, 2.0, 4.0], [0.0, 0.0, 3.0]]), axis=1),
                               [np.std([1.0, 2.0, 4.0], ddof=1), np.std([0.0, 0.0, 3.0], ddof=1)])
    assert np.isnan(seed_sd(np.array([[1.0], [2.0]]), axis=1)).all()  # one seed along that axis


def test_units_range_applies_to_negative_values_and_p_at_alpha_is_not_significant():
    with pytest.raises(ValueError, match="outside their unit's range"):
        check_units({"gain": -150.0}, {"gain": "points"})
    check_units({"gain": -15.0}, {"gain": "points"})
    assert correlation_signs([0.5], [0.05])["agrees"] == 0  # p < alpha, not <=
    assert correlation_signs([0.5], [0.049])["agrees"] == 1


def test_comparison_table_prints_each_row_with_decimals_that_agree_with_its_verdict():
    cols = pd.Index([2, 7, 9, 11], name="N")
    # N=2: 1.414 against a spread of sqrt(2) = 1.41421 would read "1.41 (spread 1.41)" at two decimals
    # N=11: 2.0 against sqrt(2): beyond it, and within 1.5 times it (borderline)
    mean = pd.DataFrame([[81.414, 75.0, np.nan, 82.0], [80.0, 70.0, 60.0, 80.0]], index=["m", "base"],
                        columns=cols)
    sd = pd.DataFrame(1.0, index=["m", "base"], columns=cols)
    c = compare_rows(mean, sd, "m", "base")
    t = comparison_table(c)
    assert list(t.columns) == ["difference", "spread", "verdict"] and t.index.name == "N"
    assert t.loc[2].tolist() == ["+1.4140", "1.4142", "within the seed spread"]
    assert t.loc[7].tolist() == ["+5.00", "1.41", "gain beyond the spread"]
    assert t.loc[9, "difference"] == "—" and t.loc[9, "spread"] == "1.41"
    assert t.loc[11, "verdict"] == "gain beyond the spread (borderline)"
    for key, row in t.iterrows():  # the printed numbers fall in the row's category
        if row.difference != "—":
            assert spread_category(float(row.difference), float(row.spread)) == spread_category(
                c.loc[key, "difference"], c.loc[key, "spread"])
    assert comparison_table(c.iloc[:0]).empty
    stacked = pd.concat({"x": c, "y": c.assign(verdict="within the seed spread", borderline=False)}, names=["m"])
    t = comparison_table(stacked)  # a dict keyed by the labels dropped the level names (and would merge repeats)
    assert t.index.names == ["m", "N"] and len(t) == 2 * len(c)
    assert t.loc[("x", 7), "verdict"] == "gain beyond the spread"
    assert t.loc[("y", 7), "verdict"] == "within the seed spread"
    repeated = comparison_table(pd.concat([c, c.assign(verdict="other", borderline=False)]))
    assert len(repeated) == 2 * len(c) and list(repeated["verdict"][-len(c):]) == ["other"] * len(c)


def test_verdict_summary_names_the_columns_without_a_verdict():
    cols = [2, 3, 5]
    mean = pd.DataFrame([[50.0, 60.0, np.nan], [49.0, 40.0, 61.0]], index=["m", "base"], columns=cols)
    sd = pd.DataFrame([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], index=["m", "base"], columns=cols)
    text = verdict_summary(compare_rows(mean, sd, "m", "base"))
    assert text == ("gain beyond the spread at N=3; within the seed spread at N=2; loss beyond the spread at none; "
                    "no verdict at N=5")
    sd_gap = sd.astype(float).copy()
    sd_gap.loc["m", 5] = np.nan  # one column without a spread leaves the others' verdicts standing
    mean_all = mean.fillna(70.0)
    assert verdict_summary(compare_rows(mean_all, sd_gap, "m", "base")) == (
        "gain beyond the spread at N=3; within the seed spread at N=2; loss beyond the spread at none; no verdict at "
        "N=5")


# ------------------------------------------------------------------------------------- mutation follow-ups


def test_paired_differences_judge_the_mean_against_the_sd_of_the_differences_itself():
    """The paired noise scale is the sd of the per-seed differences, not the root-sum-square of two such sds:
    a mean of 2 against an sd of 1 is beyond 1.5 times it, a mean of 1.2 borderline."""
    d = np.array([[1.0, 0.2], [2.0, 1.2], [3.0, 2.2]])  # seeds x columns: means 2.0 and 1.2, sds 1.0 and 1.0
    pc = paired_differences(d, np.zeros_like(d))
    np.testing.assert_allclose(pc.sd, d.std(0, ddof=1))
    assert pc.verdicts == ["higher", "higher, borderline"]
    assert paired_differences(-d, np.zeros_like(d), "gain", "loss").verdicts == ["loss", "loss, borderline"]


def test_seed_sd_of_one_seed_is_nan_without_a_numpy_warning():
    """The smoke profiles train one seed: its NaN sd is the documented "no spread", not a degrees-of-freedom
    RuntimeWarning in every chapter."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(seed_sd([3.0]))
        assert np.isnan(seed_sd(np.ones((1, 4)))).all()
