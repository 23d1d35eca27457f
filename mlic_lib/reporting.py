"""Chapter results: the small JSON of headline numbers each chapter writes, provenance strings, and the
book's rule for calling a difference measurable (:func:`seed_spread`, :func:`spread_category`,
:func:`spread_verdict`).

The rule is the same in every chapter: a difference counts only beyond the seed spread, and one beyond the
spread but within :data:`BORDERLINE_FACTOR` times it is called *borderline* (with two or three seeds a standard
deviation is itself uncertain). Chapters that refine the rule say so where they do: LTML judges its paired rows
(two readings of one trained model per seed) against the standard deviation of the per-seed differences, and
SpliceMix's Fig. 6 gives verdicts only at the resolutions where some method is clearly above chance.

The book's pages read these JSONs, so every number shown comes from the build that made the page.
"""

from __future__ import annotations

import platform
import textwrap
import time
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mlic_lib import __version__
from mlic_lib.utils import atomic_write_json, env_path


def results_dir() -> Path:
    """``$MLIC_RESULTS`` (the book sets ``_build/results``), else ``~/.cache/mlic/results``."""
    return env_path("MLIC_RESULTS", "~/.cache/mlic/results")


def provenance(settings: Mapping[str, Any], data: str, seeds: Sequence[int] | None = None) -> str:
    """One line for a figure footnote: chapter, profile, seeds, data and the device the profile's
    ``train.device`` resolves to (``auto``: the GPU when there is one; ``-o train.device=cpu`` says CPU
    on a GPU machine too)."""
    from mlic_lib.utils import pick_device

    seeds = seeds if seeds is not None else settings.get("seeds", [])
    dev = pick_device((settings.get("train") or {}).get("device"))
    device = (torch.cuda.get_device_name(dev) if dev.type == "cuda" and torch.cuda.is_available()
              else dev.type.upper())  # 'CUDA' when a profile names a GPU this machine lacks (training will say so)
    return (f"mlic_lib {__version__} | chapter={settings.get('chapter')} profile={settings.get('profile')} | "
            f"seeds={list(seeds)} | data={data} | device={device}")


def shown_path(path: str | Path) -> str:
    """A path as a chapter prints it: relative to the current folder when it lies below it, or below its parent
    (a book build prints ``../_build/results/psd.json``, not the name of the temporary folder it ran in; not when
    that parent is the file system's root or the home folder), else with ``~`` for the home folder, else absolute."""
    p = Path(path).resolve()
    here, home = Path.cwd().resolve(), Path.home().resolve()
    if p.is_relative_to(here):
        return str(p.relative_to(here))
    if here.parent not in (Path(here.anchor), home) and p.is_relative_to(here.parent):
        return "../" + str(p.relative_to(here.parent))
    return "~/" + str(p.relative_to(home)) if p.is_relative_to(home) else str(p)


#: The units a chapter's results JSON may declare (:func:`write_chapter_results`), with what each means.
UNITS = {
    "fraction": "a share or a metric in [0, 1] (mAP, F1, a CAM's mass), or a difference of two such values",
    "%": "percent, 0 to 100 (mAP and F1 as the papers print them)",
    "points": "a difference of two percentages, in percentage points",
    "1": "dimensionless (a correlation, an ARI, a ratio, a weight such as lambda or alpha)",
    "s": "seconds of wall-clock time",
    "count": "a number of things (runs, classes, optimiser steps, groups)",
    "px": "pixels",
    "seed": "a random seed (an identifier, not a quantity)",
}
#: Largest magnitude a value of a bounded unit can take; :func:`write_chapter_results` refuses one beyond it.
_UNIT_BOUND = {"fraction": 1.0, "%": 100.0, "points": 100.0}


def flatten_numbers(obj: Any, prefix: str = ""):
    """``(dotted key, number)`` pairs of a nested dict/list of results (``{"mAP": {"A": 0.5}}`` gives
    ``("mAP.A", 0.5)``, list items are numbered, and so are the items of numpy arrays and torch tensors); strings,
    booleans and ``None`` are skipped."""
    if isinstance(obj, np.ndarray | torch.Tensor):
        obj = obj.tolist()  # a 0-d array gives its number; nothing inside an array escapes the unit checks
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from flatten_numbers(v, f"{prefix}{k}.")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from flatten_numbers(v, f"{prefix}{i}.")
    elif isinstance(obj, int | float | np.integer | np.floating) and not isinstance(obj, bool | np.bool_):
        yield prefix[:-1], obj


def unit_of(key: str, units: Mapping[str, str]) -> str | None:
    """The unit of the dotted ``key`` by the first pattern of ``units`` (``fnmatch`` patterns, in order) that
    matches it, or None."""
    return next((u for pat, u in units.items() if fnmatchcase(key, pat)), None)


def check_units(numbers: Mapping[str, Any], units: Mapping[str, str]) -> None:
    """Raise ``ValueError`` unless every unit is one of :data:`UNITS`, every number in ``numbers`` has a unit by
    :func:`unit_of`, and no value of a bounded unit lies outside its range (a mAP stored in % but declared a
    fraction, say)."""
    bad = {pat: u for pat, u in units.items() if u not in UNITS}
    if bad:
        raise ValueError(f"unknown unit(s) {bad}; use one of {sorted(UNITS)}")
    flat = [(k, v, unit_of(k, units)) for k, v in flatten_numbers(numbers)]
    missing = [k for k, _, u in flat if u is None]
    if missing:
        raise ValueError(f"no unit for {missing[:8]}{' ...' if len(missing) > 8 else ''}: add a pattern that matches "
                         "these keys to the chapter's units")
    out = [(k, v, u) for k, v, u in flat if u in _UNIT_BOUND and not np.isnan(v) and abs(v) > _UNIT_BOUND[u]]
    if out:
        shown = ", ".join(f"{k} = {v:g} ({u})" for k, v, u in out[:8])
        raise ValueError(f"value(s) outside their unit's range: {shown}; is the unit right (a fraction in [0, 1] "
                         "or percent)?")


def write_chapter_results(chapter: str, settings: Mapping[str, Any], numbers: Mapping[str, Any],
                          units: Mapping[str, str]) -> Path:
    """Write ``<results_dir>/<chapter>.json`` atomically and return its path.

    ``units`` maps ``fnmatch`` patterns of the flattened keys (:func:`flatten_numbers`: ``"mAP.*"`` matches
    ``mAP.Baseline``) to one of :data:`UNITS`; the first matching pattern gives a key's unit. The file stores
    them in order as ``[pattern, unit]`` pairs, with what each unit means, so a reader of the JSON knows the scale
    of every number. Every number must have a unit and lie within its unit's range (:func:`check_units`);
    otherwise nothing is written."""
    check_units(numbers, units)
    payload = {
        "chapter": chapter,
        "profile": settings.get("profile"),
        "settings": dict(settings),
        "numbers": dict(numbers),
        "units": [[pat, u] for pat, u in units.items()],  # a list: the order decides, and the file sorts dict keys
        "unit_meanings": {u: UNITS[u] for u in dict.fromkeys(units.values())},
        "library_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return atomic_write_json(payload, results_dir() / f"{chapter}.json")


def seed_spread(*stds: float, n_seeds: int | None = None) -> float:
    """The book's noise scale for a difference of two methods' results: the root-sum-square
    ``sqrt(sd_1^2 + sd_2^2 + ...)`` of their standard deviations over the seeds, i.e. the spread of a
    difference of two *single* runs. Applied to means of ``n`` seeds it is ``sqrt(n)`` times their standard
    error (and it ignores any pairing by seed): a deliberately conservative convention with few seeds, not a
    significance test. NaN when a standard deviation is NaN or ``n_seeds < 2``: one seed has no spread (pass
    ``n_seeds`` where the stds were computed with ``ddof=0``)."""
    if n_seeds is not None and n_seeds < 2:
        return float("nan")
    return float(np.sqrt(np.sum(np.square(np.asarray(stds, dtype=float)))))


def seed_sd(values, axis: int = 0) -> float | np.ndarray:
    """Sample standard deviation over seeds (``ddof=1``) along ``axis``; NaN where there are fewer than two
    seeds (one seed has no spread). The standard deviations the book's tables and :func:`seed_spread` use."""
    v = np.asarray(values, dtype=float)
    if v.ndim == 0:
        raise ValueError("seed_sd needs one value per seed (a sequence or an array), got a scalar")
    if v.shape[axis] < 2:
        out = np.full(np.delete(np.asarray(v.shape), axis), np.nan)
        return float("nan") if out.ndim == 0 else out
    out = v.std(axis=axis, ddof=1)
    return float(out) if np.ndim(out) == 0 else out


#: A difference beyond the seed spread but within this many times it is *borderline* (:func:`spread_category`).
BORDERLINE_FACTOR = 1.5


def spread_category(diff: float, spread: float) -> str:
    """Where ``diff`` falls by the book's rule: ``'undefined'`` (a NaN or infinite difference), ``'none'`` (no
    spread: NaN, one seed), ``'within'`` (``|diff| <= spread``), ``'borderline'`` (beyond the spread but within
    :data:`BORDERLINE_FACTOR` times it) or ``'beyond'``."""
    if not np.isfinite(diff):
        return "undefined"
    if not np.isfinite(spread):
        return "none"
    if abs(diff) <= spread:
        return "within"
    return "borderline" if abs(diff) <= BORDERLINE_FACTOR * spread else "beyond"


def spread_verdict(diff: float, spread: float, up: str = "larger than the seed spread", down: str | None = None,
                   within: str = "within the seed spread", none: str = "one seed: no spread",
                   undefined: str = "no value to judge") -> str:
    """The book's rule: a difference counts only when ``|diff|`` exceeds ``spread`` (:func:`seed_spread`).
    Returns ``undefined`` for a missing (NaN) or infinite difference (e.g. an AP of a class without test
    positives), ``none`` without a spread (NaN), ``within`` when ``|diff| <= spread``, else ``up`` (or ``down``
    for a negative difference when given). A borderline difference (:func:`spread_category`) counts too: add
    :func:`borderline_note` to the phrase where it is shown."""
    cat = spread_category(diff, spread)
    if cat in ("undefined", "none", "within"):
        return {"undefined": undefined, "none": none, "within": within}[cat]
    return down if diff < 0 and down is not None else up


def borderline_note(diff: float, spread: float) -> str:
    """``" (borderline: within 1.5 times the spread)"`` for a borderline difference, else ``""``: the book's
    qualifier of a verdict that rests on a difference just beyond the spread."""
    if spread_category(diff, spread) != "borderline":
        return ""
    return f" (borderline: within {BORDERLINE_FACTOR:g} times the spread)"


def borderline_flag(diff: float, spread: float) -> str:
    """``", borderline"`` for a borderline difference (:func:`spread_category`), else ``""``: the short form of
    :func:`borderline_note` for tables and lists."""
    return ", borderline" if spread_category(diff, spread) == "borderline" else ""


def flagged_verdict(diff: float, spread: float, up: str = "higher", down: str | None = "lower", **kwargs) -> str:
    """:func:`spread_verdict` followed by :func:`borderline_flag`: the short form the book prints in tables and
    lists, e.g. ``"higher, borderline"``. ``kwargs`` go to :func:`spread_verdict` (``within``, ``none``,
    ``undefined``)."""
    return spread_verdict(diff, spread, up, down, **kwargs) + borderline_flag(diff, spread)


class PairedComparison(NamedTuple):
    """The result of :func:`paired_differences` (arrays over the columns, ``diffs`` over seeds x columns)."""

    diffs: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    verdicts: list[str]


def paired_differences(a, b, up: str = "higher", down: str = "lower") -> PairedComparison:
    """Compare two rows measured on the *same* runs (e.g. two inference modes of one trained model per seed).

    ``a`` and ``b`` are ``seeds x columns`` arrays (a 1-d array is one column). The per-seed differences
    ``a - b`` cancel what the two rows share through their run, so the noise scale is the standard deviation of
    those differences (:func:`seed_sd`): the spread of one paired difference, the paired counterpart of
    :func:`seed_spread` for unpaired rows. Each column's mean difference is judged against it by
    :func:`flagged_verdict` (``up`` / ``down``; ``"one seed: no spread"`` with one seed)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim not in (1, 2) or a.shape[0] < 1:
        raise ValueError(f"a and b must be paired arrays of the same shape (seeds,) or (seeds, columns), one row "
                         f"per seed; got shapes {a.shape} and {b.shape}")
    d = (a - b).reshape(len(a), -1)
    mean, sd = d.mean(0), np.atleast_1d(seed_sd(d))
    return PairedComparison(d, mean, sd, [flagged_verdict(m, s, up, down) for m, s in zip(mean, sd, strict=True)])


def compare_rows(mean, sd, a: Any, b: Any, up: str = "gain beyond the spread", down: str = "loss beyond the spread"):
    """Row ``a`` minus row ``b`` of a table of means, column by column, judged by the book's rule.

    ``mean`` and ``sd`` are ``pandas.DataFrame`` of the same shape (e.g. method x N: the mean over the seeds and
    their :func:`seed_sd`, NaN with one seed). Returns a DataFrame indexed by the columns with ``difference``,
    ``spread`` (:func:`seed_spread` of the two rows' sds), ``verdict`` (:func:`spread_verdict` with ``up`` /
    ``down``) and ``borderline`` (:func:`spread_category` is ``'borderline'``); ``up`` and ``down`` are kept in
    its ``attrs``, from which :func:`verdict_summary` turns it into a sentence."""
    import pandas as pd

    if mean.shape != sd.shape or list(mean.index) != list(sd.index) or list(mean.columns) != list(sd.columns):
        raise ValueError(f"mean and sd must be tables with the same rows and columns, got {mean.shape} and {sd.shape}")
    missing = [r for r in (a, b) if r not in mean.index]
    if missing:
        raise ValueError(f"no row {missing} in the table; its rows are {list(mean.index)}")
    d = mean.loc[a] - mean.loc[b]
    s = pd.Series([seed_spread(sd.loc[a, c], sd.loc[b, c]) for c in d.index], index=d.index, dtype=float)
    out = pd.DataFrame({"difference": d, "spread": s,
                        "verdict": [spread_verdict(x, y, up, down) for x, y in zip(d, s, strict=True)],
                        "borderline": [spread_category(x, y) == "borderline" for x, y in zip(d, s, strict=True)]})
    out.attrs.update(up=up, down=down)
    return out


def verdict_summary(comparison, label: str = "N", numbers: bool = False, decimals: int = 1) -> str:
    """:func:`compare_rows`' table as a sentence: where the difference is ``up``, within the seed spread and
    ``down`` (the words given to :func:`compare_rows`; ``"none"`` for an empty group), then the borderline
    columns, e.g. ``"gain beyond the spread at N=7; within the seed spread at N=2, N=3; loss beyond the spread at
    none; borderline (within 1.5 times the spread) at N=7"``; columns that got no verdict (no value, or no spread)
    are named too (``"; no verdict at N=5"``). With ``numbers`` it starts with each column's difference and spread.
    Without a spread in any column (one seed) it lists the differences and says there is no verdict."""
    c = comparison
    up, down = c.attrs.get("up", "gain beyond the spread"), c.attrs.get("down", "loss beyond the spread")

    def at(mask) -> str:
        return ", ".join(f"{label}={k}" for k in c.index[mask]) or "none"

    if c["spread"].isna().all():
        return (", ".join(f"{label}={k}: {d:+.{decimals}f}" for k, d in c["difference"].items())
                + " (one seed: no spread, no verdict)")
    text = (f"{up} at {at(c['verdict'] == up)}; {WITHIN} at {at(c['verdict'] == WITHIN)}; "
            f"{down} at {at(c['verdict'] == down)}")
    judged = c["verdict"].isin([up, WITHIN, down]).to_numpy()
    if not judged.all():  # a column without a value or a spread: named, not silently left out
        text += f"; no verdict at {at(~judged)}"
    if c["borderline"].any():
        text += f"; borderline (within {BORDERLINE_FACTOR:g} times the spread) at {at(c['borderline'].to_numpy())}"
    if numbers:  # per column, the decimals at which the difference and its spread read as the verdict's band
        places = {k: _telling_decimals(r.difference, r.spread, decimals) for k, r in c.iterrows()}
        text = (", ".join(f"{label}={k}: {r.difference:+.{places[k]}f} (spread {r.spread:.{places[k]}f})"
                          for k, r in c.iterrows()) + ". " + text[0].upper() + text[1:])
    return text


def comparison_table(comparison, decimals: int = 2):
    """:func:`compare_rows`' table for display: each row's ``difference`` and ``spread`` written with the decimals
    at which the two read as that row's verdict (``decimals``, or more where two numbers would round alike, as in
    :func:`verdict_summary`), a missing value as "—", and " (borderline)" after a borderline verdict; the
    ``borderline`` column is folded into ``verdict``."""
    import pandas as pd

    def num(v: float, fmt: str) -> str:
        return f"{v:{fmt}}" if np.isfinite(v) else "—"

    rows = []
    for _, r in comparison.iterrows():
        k = _telling_decimals(r.difference, r.spread, decimals)
        rows.append({"difference": num(r.difference, f"+.{k}f"), "spread": num(r.spread, f".{k}f"),
                     "verdict": r.verdict + (" (borderline)" if r.borderline else "")})
    # the comparison's own index: a dict keyed by it merged repeated labels and dropped a MultiIndex's names
    return pd.DataFrame(rows, index=comparison.index, columns=["difference", "spread", "verdict"])


def correlation_signs(r, p, paper_sign: int = 1, alpha: float = 0.05) -> dict[str, Any]:
    """Tally several correlation tests against the sign a paper describes.

    ``r`` and ``p`` are the tests' coefficients and p-values (same shape). A test *agrees* when its sign is
    ``paper_sign`` and ``p < alpha``, goes *against* the paper when its sign is the other and ``p < alpha``, and
    is *not distinguishable from 0* otherwise; a NaN coefficient is *undefined*. The same tally with the
    Bonferroni level ``alpha / m`` (``m`` defined tests) is returned under the ``*_bonferroni`` keys: with
    ``m`` tests at level ``alpha`` about ``alpha * m`` pass by chance when nothing is correlated.

    Returns a dict with ``labels`` (one of ``"agrees"``, ``"against"``, ``"not distinguishable from 0"``,
    ``"undefined"`` per test, in the input's flattened order), the counts ``agrees``, ``against``,
    ``not_distinguishable``, ``undefined``, ``m`` and ``bonferroni_alpha``, and ``agrees_bonferroni`` /
    ``against_bonferroni``."""
    if paper_sign not in (1, -1):
        raise ValueError(f"paper_sign must be +1 or -1 (the sign the paper describes), got {paper_sign!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    r, p = np.asarray(r, dtype=float).ravel(), np.asarray(p, dtype=float).ravel()
    if r.shape != p.shape:
        raise ValueError(f"r and p must have one value per test each, got {r.size} and {p.size}")
    defined = np.isfinite(r) & np.isfinite(p)
    m = int(defined.sum())

    def tally(level: float) -> tuple[np.ndarray, np.ndarray]:
        sig = defined & (p < level)
        return sig & (np.sign(r) == paper_sign), sig & (np.sign(r) == -paper_sign)

    agree, against = tally(alpha)
    labels = np.where(~defined, "undefined", np.where(agree, "agrees", np.where(against, "against",
                                                                                  "not distinguishable from 0")))
    bonf = alpha / max(m, 1)
    agree_b, against_b = tally(bonf)
    return {"labels": labels.tolist(), "agrees": int(agree.sum()), "against": int(against.sum()),
            "not_distinguishable": int(m - agree.sum() - against.sum()), "undefined": int((~defined).sum()),
            "m": m, "bonferroni_alpha": bonf, "agrees_bonferroni": int(agree_b.sum()),
            "against_bonferroni": int(against_b.sum())}


def spread_note(diff: float, *stds: float, n_seeds: int | None = None, decimals: int = 1) -> str:
    """:func:`spread_verdict` as a phrase with the spread's value, for printed sentences, e.g.
    ``"within the seed spread of 1.4, so not a measurable difference"`` or ``"larger than the seed spread of
    1.4 (borderline: within 1.5 times the spread)"``.

    ``decimals`` are those the caller prints ``diff`` with. Where the difference and the spread at those decimals
    would read as another band than the verdict's (+1.4 "larger than" a spread of 1.4, or +2.2 beyond a spread of
    1.5 and yet borderline), the phrase starts with the difference to the decimals that tell them apart:
    ``"+1.44, larger than the seed spread of 1.41 (borderline: ...)"``."""
    s = seed_spread(*stds, n_seeds=n_seeds)
    k = _telling_decimals(diff, s, decimals)
    lead = f"{diff:+.{k}f}, " if k > decimals else ""
    return spread_verdict(diff, s, up=f"{lead}larger than the seed spread of {s:.{k}f}{borderline_note(diff, s)}",
                          within=f"{lead}within the seed spread of {s:.{k}f}, so not a measurable difference",
                          none="one seed: no spread to compare")


def ranking(means: Mapping[str, float], sds: Mapping[str, float], n_seeds: int | None = None,
            decimals: int = 1) -> str:
    """An ordering by mean that does not over-claim, e.g. ``"A (3.0) > B (2.0) ≈ C (1.9) ≳ D (1.0)"``: neighbours
    in the order are joined by ``">"`` when their difference is beyond the seed spread (:func:`seed_spread` of
    their two standard deviations), ``"≳"`` when it is borderline (:func:`spread_category`) and ``"≈"``
    otherwise (within the spread, or no spread). Only neighbours are compared, so ``"A ≈ B ≈ C"`` does not say
    that A and C are within the spread of each other. Items without a finite mean are not ranked; they are
    listed at the end (``"; no value: E"``)."""
    if set(means) != set(sds):
        raise ValueError(f"means and sds must name the same items, got {sorted(means)} and {sorted(sds)}")
    order = sorted((k for k in means if np.isfinite(means[k])), key=lambda k: -means[k])
    missing = [k for k in means if not np.isfinite(means[k])]
    out = [f"{order[0]} ({means[order[0]]:.{decimals}f})"] if order else []
    for a, b in zip(order[:-1], order[1:], strict=True):
        cat = spread_category(means[a] - means[b], seed_spread(sds[a], sds[b], n_seeds=n_seeds))
        out.append(f"{ {'beyond': '>', 'borderline': '≳'}.get(cat, '≈')} {b} ({means[b]:.{decimals}f})")
    return " ".join(out) + (f"; no value: {', '.join(missing)}" if missing else "")


#: The outcomes of :func:`paper_verdict` (the last three are :func:`spread_verdict`'s defaults).
AGREES, CONTRADICTS = "agrees with the paper", "CONTRADICTS the paper"
WITHIN, NO_SPREAD, NO_VALUE = "within the seed spread", "one seed: no spread", "no value to judge"


def paper_verdict(diff: float, spread: float, paper_sign: int) -> str:
    """The book's rule for a difference whose direction the paper states: ``paper_sign`` is +1 when the paper
    finds the first term larger, -1 when smaller. Beyond the spread the difference :data:`AGREES` with the
    paper or :data:`CONTRADICTS` it; otherwise :data:`WITHIN`, :data:`NO_SPREAD` (one seed) or
    :data:`NO_VALUE` (a NaN difference)."""
    if paper_sign not in (1, -1):
        raise ValueError(f"paper_sign must be +1 (the paper finds the difference positive) or -1, got {paper_sign!r}")
    up, down = (AGREES, CONTRADICTS) if paper_sign == 1 else (CONTRADICTS, AGREES)
    return spread_verdict(diff, spread, up=up, down=down, within=WITHIN, none=NO_SPREAD, undefined=NO_VALUE)


def _telling_decimals(diff: float, spread: float, decimals: int) -> int:
    """``decimals``, or up to three more, so that ``|diff|`` and ``spread`` do not print as the same number when
    they differ (a verdict "beyond the spread of 1.4" on a difference printed as 1.4 reads as a contradiction), and
    the printed numbers fall in the verdict's category, borderline band included (+2.2 against a spread printed as
    1.5 is within 1.5 times it, whatever the unrounded values say)."""
    if not (np.isfinite(diff) and np.isfinite(spread)) or abs(diff) == spread:
        return decimals
    truth = spread_category(diff, spread)
    for extra in range(4):
        d, s = round(abs(diff), decimals + extra), round(spread, decimals + extra)
        # also the borderline band: the printed numbers must fall in the category the verdict states
        if d != s and spread_category(d, s) == truth:
            return decimals + extra
    return decimals + 3


def claim_verdict(diff: float, spread: float, paper_sign: int, unit: str = "mAP points", decimals: int = 1,
                  basis: str = "") -> str:
    """A paper's claim about the sign of ``diff`` judged by the book's rule (:func:`paper_verdict`), as the phrase
    a chapter's checklist prints: the difference with its ``unit``, the spread it was judged against (``basis``
    says of what, e.g. ``" over 3 seeds"``) and the verdict, e.g. ``"+2.1 mAP points, beyond the seed spread of
    1.4 over 3 seeds: agrees with the paper"`` or ``"-0.3 mAP points, within the seed spread of 1.4: no verdict
    (opposite to the paper)"``; with one seed ``"+0.4 mAP points (same direction as the paper); one seed: no
    spread, so no verdict"``. A borderline difference carries :func:`borderline_note`."""
    v = paper_verdict(diff, spread, paper_sign)
    decimals = _telling_decimals(diff, spread, decimals)
    head = f"{diff:+.{decimals}f} {unit}" if np.isfinite(diff) else "no value"
    if v in (AGREES, CONTRADICTS):
        return f"{head}, beyond the seed spread of {spread:.{decimals}f}{basis}: {v}{borderline_note(diff, spread)}"
    if v == NO_VALUE:
        return f"{head}: no verdict"
    side = ("same direction as the paper" if np.sign(diff) == paper_sign else "a zero difference" if diff == 0
            else "opposite to the paper")
    if diff != 0 and round(abs(diff), decimals) == 0:  # "-0.00 ... same direction" reads as a contradiction
        side += f", by less than {0.5 * 10 ** -decimals:g}"
    if v == NO_SPREAD:
        return f"{head} ({side}); {v}, so no verdict"
    return f"{head}, {v} of {spread:.{decimals}f}{basis}: no verdict ({side})"


def claim_over(diffs: Mapping[Any, float], spread: float, paper_sign: int, label: str = "",
               unit: str = "mAP points", decimals: int = 1, basis: str = "") -> str:
    """A paper's claim that should hold at each of several points (e.g. at every ``k``), judged at each by
    :func:`paper_verdict` against one ``spread``: the differences (``label`` prefixes each key, e.g. ``"k="``;
    a borderline one carries ``" (borderline)"``), the spread, and one verdict. It :data:`AGREES` when every
    difference does, :data:`CONTRADICTS` the paper when any difference does (naming where), and otherwise gives
    no verdict, naming where the paper's direction holds beyond the spread."""
    if not diffs:
        raise ValueError("diffs is empty: pass at least one (point, difference) pair")
    if not any(np.isfinite(v) for v in diffs.values()):
        return "; ".join(f"{label}{k}: no value" for k in diffs) + f": {NO_VALUE}, so no verdict"
    verdicts = {k: paper_verdict(v, spread, paper_sign) for k, v in diffs.items()}
    # the fewest decimals telling for every difference at once (the max of each one's own need is not: more digits
    # can move another difference's printed value across a band edge)
    decimals = next((k for k in range(decimals, decimals + 4)
                     if all(_telling_decimals(v, spread, k) == k for v in diffs.values())), decimals + 3)
    values = "; ".join(f"{label}{k}: " + (f"{v:+.{decimals}f}" if np.isfinite(v) else "no value")
                       + (" (borderline)" if borderline_flag(v, spread) else "") for k, v in diffs.items()) + f" {unit}"
    if not np.isfinite(spread):
        return f"{values}; {NO_SPREAD}, so no verdict"

    def where(keys):
        return ", ".join(f"{label}{k}" for k in keys)

    against = [k for k, v in verdicts.items() if v == CONTRADICTS]
    agree = [k for k, v in verdicts.items() if v == AGREES]
    if against:
        verdict = f"{CONTRADICTS} at {where(against)}"
    elif len(agree) == len(diffs):
        verdict = AGREES
    elif agree:
        verdict = f"no verdict: beyond the spread in the paper's direction at {where(agree)} only"
    else:
        verdict = "no verdict: none beyond the spread"
    return f"{values} (seed spread {spread:.{decimals}f}{basis}): {verdict}"


def checklist_text(items: Sequence[tuple[str, str]], title: str = "Checklist (paper claim -> this run's verdict):",
                   width: int = 118) -> str:
    """A chapter's checklist as printed text: ``title``, then one ``- claim -> verdict`` line per item of
    ``items`` (``(claim, verdict)`` pairs), wrapped at ``width`` with continuation lines indented."""
    if width < 40:
        raise ValueError(f"width must be at least 40 characters, got {width}")
    lines = [title] if title else []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"each checklist item must be a (claim, verdict) pair, got {item!r}")
        claim, verdict = item
        lines.append(textwrap.fill(f"- {claim} -> {verdict}", width, subsequent_indent="    "))
    return "\n".join(lines)


def paired_bootstrap(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items (e.g. one value per test image for two models) with its percentile
    bootstrap interval at ``level``: ``(mean, lo, hi)``. The items are resampled with replacement ``n_boot``
    times from a generator seeded with ``seed``, so each call is reproducible on its own."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"a and b must be paired 1-d sequences of the same length, at least 2 values (one per item "
                         f"for each model); got shapes {a.shape} and {b.shape}")
    d = a - b
    if not np.isfinite(d).all():
        raise ValueError(f"a and b must be finite; {int((~np.isfinite(d)).sum())} of the {len(d)} pairs are NaN or "
                         "infinite: drop those items first")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


class BootstrapDifference(NamedTuple):
    """:func:`bootstrap_difference`'s result: mean of ``a - b``, its interval (NaN without one) and the item count."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95  # the interval's coverage, as interval_sentence states it


def bootstrap_difference(a, b, scale: float = 1.0, **kwargs) -> BootstrapDifference:
    """:func:`paired_bootstrap` of ``scale * (a - b)`` over the items where neither ``a`` nor ``b`` is NaN (NaN marks
    an item without a value, e.g. the CAM-in-box share of an all-zero map). With fewer than 2 such items there is
    no interval (``lo = hi = nan``): the mean is that of the one item, or NaN with none. ``kwargs`` go to
    :func:`paired_bootstrap` (``n_boot``, ``level``, ``seed``). An infinite value is refused (``ValueError``)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be paired 1-d sequences of the same length (one value per item for each "
                         f"model); got shapes {a.shape} and {b.shape}")
    both = ~(np.isnan(a) | np.isnan(b))
    a, b, n = scale * a[both], scale * b[both], int(both.sum())
    if np.isinf(a).any() or np.isinf(b).any():  # here, not only in paired_bootstrap: one item gets no interval
        raise ValueError(f"a and b must be finite or NaN (no value); {int(np.isinf(a).sum() + np.isinf(b).sum())} "
                         "infinite value(s)")
    level = float(kwargs.get("level", 0.95))
    if n < 2:
        return BootstrapDifference(float(a[0] - b[0]) if n else np.nan, np.nan, np.nan, n, level)
    return BootstrapDifference(*paired_bootstrap(a, b, **kwargs), n, level)


def interval_sentence(diff: BootstrapDifference, above: str, below: str, neither: str, unit: str = "points",
                      items: str = "images", defined: str = "with a value in both", level: float | None = None) -> str:
    """One sentence for a :func:`bootstrap_difference`: the mean with its interval and ``above`` (the interval is
    above 0), ``below`` (below 0) or ``neither`` (it holds 0); "no interval" with the count of ``items``
    ``defined`` when there are fewer than 2 (a plural ``items`` loses its "s" for 1)."""
    m, lo, hi, n = diff[:4]
    level = getattr(diff, "level", 0.95) if level is None else level  # the level the interval was drawn at
    if np.isnan(lo):
        noun = items[:-1] if n == 1 and items.endswith("s") else items  # "1 image"
        return f"no interval: {n} {noun} {defined}" + ("" if np.isnan(m) else f" (mean {m:+.1f} {unit})")
    return (f"{m:+.1f} {unit} ({100 * level:g}% interval over {n} {items} {lo:+.1f} to {hi:+.1f}): "
            + (above if lo > 0 else below if hi < 0 else neither))


def dash_missing(df, decimals: int = 1):
    """A table for display: every float written with ``decimals`` decimals (``2.0`` shows as ``2.00`` beside
    ``80.71``, so a column reads evenly), every missing value (NaN: not reported, or no spread with one seed) as
    "—"; integers and text stay as they are."""
    def cell(v):
        if v is None or (isinstance(v, float | np.floating) and np.isnan(v)):
            return "—"
        return f"{v:.{decimals}f}" if isinstance(v, float | np.floating) else v

    return df.astype(object).map(cell)
