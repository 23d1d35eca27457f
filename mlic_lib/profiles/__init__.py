"""Per-chapter run profiles: ``smoke`` (seconds, CI), ``default`` (the CPU book), ``full`` (paper recipe, GPU).

Each chapter has ``mlic_lib/profiles/<chapter>.yaml`` with one mapping per profile. Overrides use
dotted keys (``{"train.epochs": 3}``); a key is valid when some profile of the chapter has it, when its
parent is a section with a validator that knows the name (``train`` / ``teacher_train``:
``TrainConfig`` fields; ``scenes``: ``SceneSpec`` fields; ``augment``: the image presets' options; a real
dataset's ``data`` / ``real``: :func:`mlic_lib.data.real.real_data`'s keys), or when its parent is an open
mapping that is empty in some profile (``model.backbone_kwargs``). A value must fit the type of the value it
replaces: a number for a number (``"1e-3"``, which YAML 1.1 reads as text, becomes 0.001, in a list or a mapping
too), true/false for a flag, a list for a list, ``null`` for a number or flag only where some profile has ``null``
(a name or a list may be null: ``model.weights=null``); a non-empty mapping given for a section is merged into it
key by key (``{"train": {"epochs": 3}}`` is ``{"train.epochs": 3}``: the section's other settings stay), each key
checked, and ``{}`` replaces it (its code's defaults) where every key has one (:data:`DEFAULTED_SECTIONS`, open
mappings, optional sections); a whole number written ``2.0`` becomes the ``int`` the profile has. Sections with a
validator are checked as a whole when an override touches them (:data:`VALUE_CHECKS`, :data:`SETTINGS_CHECKS`, and
``TrainConfig`` for the training sections), before anything runs.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

PROFILES = ("smoke", "default", "full")


def chapters() -> list[str]:
    """Names of the chapters that have a profile file."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def _read(chapter: str) -> dict[str, Any]:
    path = resources.files(__name__) / f"{chapter}.yaml"
    if not path.is_file():
        raise ValueError(f"no profiles for chapter {chapter!r}; chapters with profiles: {chapters()}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{chapter}.yaml must map profile names to settings")
    return data


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _train_field_kinds() -> dict[str, str]:
    """``{field: annotation}`` of :class:`~mlic_lib.engine.TrainConfig`."""
    from dataclasses import fields

    from mlic_lib.engine import TrainConfig

    return {f.name: str(f.type) for f in fields(TrainConfig)}


# keys whose values may take several types, given whole (a mapping for them is a value, not a section to merge
# into): INDeeD's lam (a number or {minmax: .., l2: ..}), the presets' randaugment (true/false or a policy name),
# SpliceMix's grids (a table {RxC: probability} or a list of grids); only a number written as text is converted
MIXED_TYPE_KEYS = frozenset({"lam", "randaugment", "grids"})
#: Keys whose value means a count when it is a whole number and a fraction when it is a decimal (SpliceMix's
#: ``mixed_size``: 4 mixed images, or 0.25 of the batch): a whole number given there stays a whole number.
COUNT_OR_FRACTION_KEYS = frozenset({"mixed_size"})
TRAIN_SECTIONS = ("train", "teacher_train")  # sections that TrainConfig checks
#: sections whose every key has a default in the code that reads them, so that ``{}`` may replace them: CPSD's
#: teacher overrides (the students' recipe), SceneSpec's fields, the image presets' options, ASL's parameters
DEFAULTED_SECTIONS = frozenset({"teacher_train", "scenes", "augment", "asl"})
#: chapter -> {key: (module, function)} checking the value at that dotted key (a section or a list) when an
#: override touches it (the method's own check, run now rather than hours into a run); imported only then, to keep
#: the CLI light.
_BACKBONE = ("mlic_lib.models.backbones", "check_backbone")
_POOL = ("mlic_lib.models.backbones", "check_pool")
VALUE_CHECKS = {
    "primer": {"model.backbone": _BACKBONE, "model.pool": _POOL},
    "psd": {"psd": ("mlic_lib.psd", "check_options"), "model.backbone": _BACKBONE, "model.pool": _POOL},
    "assocformer": {"model.backbone": ("mlic_lib.models.assocformer", "check_transformer_name"),
                    "model.kernel_size": ("mlic_lib.models.assocformer", "check_kernel_size"),
                    "analysis.regularizers": ("mlic_lib.models.assocformer", "check_regularizers"),
                    "loss": ("mlic_lib.profiles", "check_assocformer_loss")},
    "indeed": {"indeed": ("mlic_lib.indeed", "check_options"), "model.name": ("mlic_lib.indeed", "check_model_name"),
               "n_labels": ("mlic_lib.indeed", "check_n_labels"),
               "ablation_n_labels": ("mlic_lib.indeed", "check_ablation_n_labels"),
               "lambda_sweep": ("mlic_lib.profiles", "check_lambda_sweep")},
    "ltml": {"model": ("mlic_lib.ltml", "check_model_options"), "ltml": ("mlic_lib.ltml", "check_options")},
    "splicemix": {"methods": ("mlic_lib.splicemix_cl", "check_methods"),
                  "mixing": ("mlic_lib.splicemix_cl", "check_mixing"),
                  "regime_check": ("mlic_lib.splicemix_cl", "check_regime"),
                  "parallel": ("mlic_lib.process_pool", "check_parallel"),
                  "model.backbone": _BACKBONE, "model.pool": _POOL},
}
_DATA = ("mlic_lib.data.section", "check_data_section")
for _checks in VALUE_CHECKS.values():
    _checks["data"] = _DATA
#: chapter -> {key: (module, function)} like :data:`VALUE_CHECKS`, for checks that need the whole settings
#: (SpliceMix: the regime check compares methods that section 3 trained too; its steps have no label mask).
SETTINGS_CHECKS = {"splicemix": {"regime_check": ("mlic_lib.splicemix_cl", "check_regime_methods"),
                                 "methods": ("mlic_lib.splicemix_cl", "check_regime_methods"),
                                 "data": ("mlic_lib.splicemix_cl", "check_no_label_mask"),
                                 "mixing": ("mlic_lib.profiles", "check_splicemix_numbers"),
                                 "analysis": ("mlic_lib.profiles", "check_splicemix_numbers")}}
SETTINGS_CHECKS["indeed"] = {"data": ("mlic_lib.profiles", "check_indeed_data"),
                              "cifar": ("mlic_lib.profiles", "check_indeed_data")}
SETTINGS_CHECKS["ltml"] = {"data": ("mlic_lib.profiles", "check_ltml_groups")}
_WEIGHTS = ("mlic_lib.profiles", "check_model_weights")
for _chapter in ("primer", "psd", "splicemix", "ltml"):  # the chapters whose model goes to build_model(weights=...)
    SETTINGS_CHECKS.setdefault(_chapter, {})["model"] = _WEIGHTS


def check_model_weights(settings: Mapping[str, Any]) -> None:
    """``model.weights`` as :func:`mlic_lib.models.backbones.build_model` takes it, checked when an override touches
    ``model``: null (random init), ``imagenet``, or the path of an existing state-dict file; small_resnet has none.
    Otherwise a typo (``imagnet``) or ``none`` failed at the chapter's first model build, after its data was loaded
    (on ``full``, after COCO/VOC), or in ``mlic teachers``' workers. Kept here: the backbones module is part of every
    run's cache key."""
    from pathlib import Path

    model = settings.get("model")
    if not isinstance(model, Mapping):
        return
    weights, backbone = model.get("weights"), model.get("backbone")
    if weights is None:
        return
    if backbone == "small_resnet":
        raise ValueError(f"model.weights is {weights!r}, but small_resnet has no pretrained weights: give "
                         "-o model.weights=null (random init), or a backbone with weights (resnet18/34/50/101)")
    if weights == "imagenet":
        if isinstance(backbone, str) and backbone.startswith("timm/"):  # the offline file is EfficientNet-Lite0's
            raise ValueError(f"model.weights=imagenet is available for resnet18/34/50/101 and efficientnet_lite0, "
                             f"not for {backbone}: give the path of a local .pth state dict of that timm model, "
                             "or -o model.weights=null")
        return
    path = Path(weights).expanduser() if isinstance(weights, (str, Path)) else None
    # a relative path is read by the chapter's kernel, in notebooks/, not in the folder `mlic reproduce` runs in:
    # only an absolute one can be checked here (load_weights_file names a missing relative one)
    if path is None or not (path.is_file() or (not path.is_absolute() and path.suffix in (".pth", ".pt"))):
        close = difflib.get_close_matches(str(weights), ["imagenet"], n=1)
        hint = (" (did you mean 'imagenet'?)" if close else
                " (no pretrained weights is null: -o model.weights=null)"
                if str(weights).lower() in ("none", "false", "no", "off", "scratch", "random") else "")
        raise ValueError(f"model.weights must be null (random init), imagenet or the path of an existing .pth "
                         f"file, got {weights!r}{hint}")


def check_splicemix_numbers(settings: Mapping[str, Any]) -> None:
    """SpliceMix's ``mixing.alpha`` (Beta(alpha, alpha) of Mixup/CutMix: a finite number > 0), ``mixing.cl_weight``
    (the weight of Eq. 6 in Eq. 7: finite, >= 0), ``mixing.fill`` (a pixel value: finite),
    ``analysis.tsne_perplexity`` (finite, > 0) and ``analysis.ratio_min_frac`` (a share in [0, 1]). The methods' own
    checks (``alpha <= 0``, ``cl_weight < 0``) let NaN through, which trained on NaN losses or failed in the t-SNE
    cell after the training. Kept here, not in :mod:`mlic_lib.mixing` / :mod:`mlic_lib.splicemix_cl`, whose source
    is part of the chapter's cache keys."""
    from mlic_lib.checks import number

    checks = {  # (section, key): (lowest value, whether that value is excluded, highest value, what the option is)
        ("mixing", "alpha"): (0.0, True, math.inf, "Beta(alpha, alpha) of Mixup and CutMix; the paper's 0.5"),
        ("mixing", "cl_weight"): (0.0, False, math.inf,
                                  "the weight of Eq. 6 in Eq. 7; 0 is plain SpliceMix, 1 SpliceMix-CL"),
        ("mixing", "fill"): (-math.inf, False, math.inf, "the pixel value of a dropped cell; -1 is the scenes' blank"),
        ("analysis", "tsne_perplexity"): (0.0, True, math.inf, "t-SNE's perplexity; the profiles' 5"),
        ("analysis", "ratio_min_frac"): (0.0, False, 1.0,
                                         "the share of the training images a class needs for Table VII's ratios"),
    }
    for (section, key), (low, strict, high, what) in checks.items():
        options = settings.get(section)
        if not isinstance(options, Mapping) or key not in options:
            continue
        x = number(options[key])
        if x is None or x < low or (strict and x == low) or x > high:
            bound = ("" if low == -math.inf else f" {'>' if strict else '>='} {low:g}") + (
                "" if high == math.inf else f" and <= {high:g}")
            raise ValueError(f"{section}.{key} must be a finite number{bound} ({what}), got {options[key]!r}")


def check_assocformer_loss(loss: Any) -> None:
    """AssocFormer's ``loss`` section (Eqs. 8-9: ``theta``, ``gamma_pos``, ``gamma_neg``, ``clip``, ``reduction``),
    checked by building the loss and taking it on a dummy batch, so that ASL's own checks run now: a ``clip`` outside
    [0, 1) or a ``reduction`` other than mean/sum failed when the first run started. Kept here, not in
    :mod:`mlic_lib.assoc_losses`, whose source is part of the chapter's cache keys."""
    if not isinstance(loss, Mapping):
        raise ValueError(f"loss must be a mapping of Eqs. 8-9's options (theta, gamma_pos, gamma_neg, clip, "
                         f"reduction), got {loss!r}")
    import torch

    from mlic_lib.assoc_losses import AssocFormerLoss

    try:
        AssocFormerLoss(**loss)(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2, 2))
    except (ValueError, TypeError) as err:
        raise ValueError(f"loss: {err} (the profiles give {{theta: 0.1, gamma_pos: 0.0, gamma_neg: 2.0, clip: 0.0, "
                         "reduction: mean})") from None


def check_ltml_groups(settings: Mapping[str, Any]) -> None:
    """LTML's ``data.head_min`` / ``data.tail_max`` on a whole real long-tailed set (``data.n_train`` null): the
    chapter then takes the head/medium/tail groups from the split file (``class_split.pkl``: >= 100 / <= 19 images),
    not from these thresholds, which it would print over those groups."""
    data = settings.get("data")
    if not isinstance(data, Mapping) or data.get("dataset", "scenes") == "scenes" or data.get("n_train") is not None:
        return
    asked = {k: data.get(k) for k in ("head_min", "tail_max")}
    official = {"head_min": 100, "tail_max": 19}
    changed = [f"data.{k}={v}" for k, v in asked.items() if v is not None and v != official[k]]
    if changed:
        raise ValueError(f"{', '.join(changed)}: on the whole {data.get('dataset')} training set (data.n_train null) "
                         "the chapter uses the split file's head/medium/tail groups (>= 100 / <= 19 images); other "
                         "thresholds apply to a subset only (set data.n_train as well)")


#: INDeeD's canvas sources and the side of one of their 3x3 cells in pixels (MNIST digits 28, CIFAR-10 images 32).
INDEED_CELL_SIDE = {"embedded": 28, "mnist": 28, "cifar10": 32}


def check_indeed_data(settings: Mapping[str, Any]) -> None:
    """INDeeD's ``data.source`` (``embedded``, ``mnist`` or ``cifar10``) and ``data.downsample``, which must divide
    the side of a canvas cell: a factor that only divides the canvas (3 of 84) pools across the cells' borders, and
    the chapter's cell boxes (``cell side // downsample``) drift off the cells. Otherwise an unknown source failed in
    the chapter's first cell with a bare error. Kept here, not in :mod:`mlic_lib.indeed`, whose source is part of
    its runs' cache keys."""
    cifar = settings.get("cifar")
    if cifar and isinstance(cifar, Mapping) and not {"data", "model", "train"} <= set(cifar):
        # a cifar.* override on a profile without the section (smoke, default) made a partial one, which the
        # chapter's Table 2 cell trains on after every other run: it failed there with a KeyError
        missing = sorted({"data", "model", "train"} - set(cifar))
        raise ValueError(f"cifar (ML-CIFAR-10, Table 2) needs its data, model and train sections (missing {missing}): "
                         "it runs with the full profile (--profile full -o cifar....), or give it whole")
    sections = {"data": settings.get("data"), "cifar.data": cifar.get("data") if isinstance(cifar, Mapping) else None}
    for where, data in sections.items():  # the full profile's ML-CIFAR-10 section builds its canvases the same way
        if not isinstance(data, Mapping):
            continue
        source = data.get("source", "embedded")
        if source not in INDEED_CELL_SIDE:
            close = difflib.get_close_matches(str(source), list(INDEED_CELL_SIDE), n=1)
            raise ValueError(f"{where}.source must be one of {list(INDEED_CELL_SIDE)}, got {source!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        side, ds = INDEED_CELL_SIDE[source], data.get("downsample", 1)
        if isinstance(ds, int) and not isinstance(ds, bool) and ds >= 1 and side % ds:
            ok = [f for f in range(1, side + 1) if side % f == 0]
            raise ValueError(f"{where}.downsample={ds} does not divide the {side}-pixel cells of the {source} "
                             f"canvases (the pooled cells would mix neighbouring cells); give one of {ok}")
        augment, cell = data.get("augment"), side // ds if isinstance(ds, int) and ds >= 1 else side
        cutout = augment.get("cutout", 0) if isinstance(augment, Mapping) else 0
        if isinstance(cutout, int | float) and not isinstance(cutout, bool) and cutout >= cell:
            raise ValueError(f"{where}.augment.cutout={cutout} px can hide a whole {cell}-pixel cell (the "
                             f"{side}-pixel cells, downsampled by {ds}) and the labelled object in it; give a hole "
                             f"smaller than the cell (the paper's recipe: 16 px on 32-pixel cells)")


LAMBDA_SWEEP_KEYS = ("lams", "n_labels", "seeds", "data_seed")  # INDeeD's lambda_sweep, as the chapter reads it


def check_lambda_sweep(sweep: Any) -> None:
    """INDeeD's ``lambda_sweep``: null/false (skipped) or ``{lams, n_labels, seeds, data_seed}``, every key given (the
    chapter reads all four after its main training: a partial section given where the profile has null failed there
    with a KeyError). Kept here, not in :mod:`mlic_lib.indeed`, whose source is part of its runs' cache keys."""
    if not sweep:
        return
    example = "-o 'lambda_sweep={lams: [0.1, 0.3, 1.0], n_labels: [2, 7], seeds: [0], data_seed: 1}'"
    if not isinstance(sweep, Mapping) or set(sweep) != set(LAMBDA_SWEEP_KEYS):
        missing = sorted(set(LAMBDA_SWEEP_KEYS) - set(sweep)) if isinstance(sweep, Mapping) else []
        raise ValueError(f"lambda_sweep must be null or a mapping with the keys {list(LAMBDA_SWEEP_KEYS)}"
                         + (f" (missing {missing})" if missing else "") + f", got {sweep!r}; e.g. {example}")
    from mlic_lib.checks import number, whole_list
    from mlic_lib.indeed import _check_label_counts

    lams = sweep["lams"]
    if not isinstance(lams, (list, tuple)) or not lams or any((x := number(v)) is None or x < 0 for v in lams):
        raise ValueError(f"lambda_sweep.lams must be a non-empty list of numbers >= 0 (lambda of Eq. 6), got {lams!r}")
    _check_label_counts(sweep["n_labels"], "lambda_sweep.n_labels")
    if not whole_list([sweep["data_seed"]], 0):
        raise ValueError(f"lambda_sweep.data_seed must be a whole number >= 0, got {sweep['data_seed']!r}")


def parse_overrides(items: str | list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.epochs=3", "seeds=[0, 1]"]`` (the CLI's ``-o`` form, or one such string) -> ``{key: value}``,
    each value read as YAML (a number, true/false, a name, a list or a mapping)."""
    out: dict[str, Any] = {}
    for item in [items] if isinstance(items, str) else items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. -o train.epochs=3)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML (a number, true/false, a name, or a "
                             f"list like [1, 2]): {str(err).splitlines()[0]}") from None
    return out


def _expand(key: Any, value: Any, section: Any) -> list[tuple[Any, Any]]:
    """A non-empty mapping given for a section (``section``: the mapping it replaces, in the profile or another one)
    becomes one dotted override per leaf, merged into the section instead of replacing it. ``{}`` replaces the
    section (its code's defaults: ``teacher_train={}`` trains CPSD's teachers with the students' recipe)."""
    if not isinstance(value, Mapping) or not value or not isinstance(key, str) or (
            key.rsplit(".", 1)[-1] in MIXED_TYPE_KEYS):
        return [(key, value)]
    out: list[tuple[Any, Any]] = []
    for k, v in value.items():
        sub = section.get(k) if isinstance(section, Mapping) else None
        out += _expand(f"{key}.{k}", v, sub)
    return out


def _validator_keys(chapter: str, section: str, node: Any) -> set[str] | None:
    """Names the validator of the section at dotted path ``section`` accepts (``None``: no validator)."""
    from dataclasses import fields

    last = section.rsplit(".", 1)[-1]
    if chapter == "indeed" and last == "augment":  # mlic_lib.indeed's cell augmentation, not the image presets
        return {"randaugment", "cutout"}
    if last in TRAIN_SECTIONS:
        return set(_train_field_kinds())
    if chapter == "ltml" and section == "model":  # build_two_branch's options, most absent from the profiles
        from mlic_lib.ltml import MODEL_KEYS

        return set(MODEL_KEYS)
    if last == "scenes":
        from mlic_lib.data.scenes import SceneSpec

        return {f.name for f in fields(SceneSpec)}
    if last == "augment":
        from mlic_lib.data.presets import _KEYS

        return set(_KEYS)
    if last == "real" or (last == "data" and isinstance(node, Mapping) and node.get("dataset", "scenes") != "scenes"):
        from mlic_lib.data.real import _KEYS

        return set(_KEYS)
    if last == "data" and chapter != "indeed" and isinstance(node, Mapping):  # the embedded scenes (scene_data)
        return set(node) | {"data_seed"}
    return None


def _every_key(chapter: str, settings: Mapping[str, Any], valid: set[str]) -> set[str]:
    """The keys the chapter's profiles give (``valid``) and those their sections' validators accept besides
    (``data.scenes.p_bias``, ``data.data_seed``, ...): what an unknown-parameter error lists."""
    out = set(valid)
    for section in {k.rsplit(".", 1)[0] for k in valid if "." in k} | {k for k in valid if "." not in k}:
        found, node = _lookup(settings, section)
        allowed = _validator_keys(chapter, section, node if found else None)
        out |= {f"{section}.{a}" for a in allowed or ()}
    return out


def _scene_default(parent: str, leaf: str) -> Any:
    """The default of :class:`~mlic_lib.data.scenes.SceneSpec`'s field ``leaf`` when ``parent`` is a ``scenes``
    section (``None`` otherwise): the kind of value an override of a field that no profile sets must have."""
    if parent.rsplit(".", 1)[-1] != "scenes":
        return None
    from dataclasses import MISSING, fields

    from mlic_lib.data.scenes import SceneSpec

    f = next((f for f in fields(SceneSpec) if f.name == leaf), None)
    return None if f is None or f.default is MISSING else f.default


def _refuse_another_profiles_key(chapter: str, profile: str, data: Mapping[str, Any], settings: Mapping[str, Any],
                                 key: str) -> None:
    """A ``ValueError`` when ``key``, which another profile of the chapter has, falls under a section of this
    profile whose validator does not take it: a real dataset's option (``data.image_size``, ``data.augment.*``) on
    a profile whose ``data`` is the embedded scenes, which never read it (but its runs' cache keys would change).
    ``data.dataset`` is left to :func:`load_profile`'s own message."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the nearest section of this profile above the key
        section = ".".join(parts[:i])
        found, node = _lookup(settings, section)
        if not found:
            continue
        allowed = _validator_keys(chapter, section, node) if isinstance(node, Mapping) else None
        if allowed is not None and parts[i] not in allowed and f"{section}.{parts[i]}" != "data.dataset":
            others = [p for p, prof in data.items() if _lookup(prof, key)[0]]
            raise ValueError(f"parameter {key!r} is not read with profile {profile!r} of chapter {chapter!r}: its "
                             f"{section!r} section takes {sorted(allowed)} ({key!r} is a setting of profile "
                             f"{' / '.join(others)}; choose that profile to use it)")
        return


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _lookup(d: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return False, None
        d = d[part]
    return True, d


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _whole(key: str, value: Any, ref: Any) -> Any:
    """``2.0`` as ``2`` where the value it replaces is a whole number (``psd.cpsd_k``, a seed): the chapters name
    runs and index results by these values (``f"cpsd-{k}"``), so a float would miss the runs named after ``int(k)``."""
    if (_is_int(ref) and isinstance(value, float) and value.is_integer()
            and key.rsplit(".", 1)[-1] not in COUNT_OR_FRACTION_KEYS):
        return int(value)
    return value


def _numbers_in(value: Any) -> Any:
    """``value`` with the numbers written as text inside its lists and mappings made numbers (``[1e-1, 1]`` is
    ``[0.1, 1]``: YAML 1.1 reads an exponent without a dot as text), as :func:`_coerce` does for a value given
    alone (``psd.ks=[1, 2e0]`` then becomes ``[1, 2]`` there, as ``[1, 2.0]`` does); other text is left alone."""
    def item(v: Any) -> Any:
        return float(v) if isinstance(v, str) and _is_number(v) else _numbers_in(v)

    if isinstance(value, list):
        return [item(v) for v in value]
    if isinstance(value, Mapping):
        return {k: item(v) for k, v in value.items()}
    return value


def _coerce(key: str, value: Any, ref: Any) -> Any:
    """``value`` made to fit ``ref``, the value it replaces, or a ``ValueError`` naming ``key``."""
    value = _numbers_in(value)
    if key.rsplit(".", 1)[-1] in MIXED_TYPE_KEYS:
        ref = 0.0 if isinstance(value, str) and _is_number(value) else None
    if ref is None or value is None:
        return value
    if isinstance(ref, bool):
        if not isinstance(value, bool):
            raise ValueError(f"parameter {key!r} takes true or false, got {value!r}")
    elif isinstance(ref, (int, float)):
        if isinstance(value, str) and _is_number(value):
            number = float(value)
            value = int(number) if isinstance(ref, int) and number.is_integer() and "." not in value else number
        if isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
            raise ValueError(f"parameter {key!r} takes a number (like {ref!r}), got {value!r}")
        if isinstance(ref, float) and isinstance(value, int) and key.rsplit(".", 1)[-1] not in COUNT_OR_FRACTION_KEYS:
            value = float(value)  # 4 for 4.0: the same setting, so the same run's cache key
        value = _whole(key, value, ref)
    elif isinstance(ref, list) and isinstance(value, list) and ref and all(_is_int(r) for r in ref):
        value = [_whole(key, v, ref[0]) for v in value]  # seeds=[0.0], psd.ks=[1, 2.0]: whole numbers stay whole
    elif isinstance(ref, list) and not isinstance(value, list):
        raise ValueError(f"parameter {key!r} takes a list (like {ref!r}), got {value!r}; write it in brackets, "
                         f"e.g. -o {key}=[{value}]")
    elif isinstance(ref, Mapping) and ref and not isinstance(value, Mapping):
        example = f"{key}.{next(iter(ref))}=..."
        raise ValueError(f"{key!r} is a section, not a value: override one of its keys, e.g. -o {example}")
    return value


def _is_seed_list(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf == "seeds" or leaf.endswith("_seeds")


def _is_count(key: str) -> bool:
    """A number of images, epochs, repeats, inits or channels (``cam_images``, ``ratio_epochs``, ``n_init``, a model's
    ``widths`` and ``hidden`` units, ...)."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf in ("epochs", "lowres", "widths", "hidden") or leaf.startswith("n_") or leaf.endswith((
        "_images", "_epochs", "_batch", "_batch_size", "_repeats", "_dim", "_classes"))


def _check_general(key: str, value: Any, in_profiles: list[tuple[bool, Any]]) -> None:
    """The checks every chapter's settings share, on an overridden ``key``: a seed list (``seeds``,
    ``*_seeds``) holds distinct whole numbers >= 0 (a repeated seed would load one run twice and report a spread
    of 0), and ``seeds`` at least one; a count (:func:`_is_count`) that every profile gives as a whole number
    >= 1 is one too (``cam_images=-3`` failed only after the training). ``in_profiles``: ``(found, value)`` of
    ``key`` in each of the chapter's profiles."""
    from mlic_lib.checks import whole_list

    # null widths are build_model's default ones (ltml's model check says so too)
    nullable = any(found and v is None for found, v in in_profiles) or key.rsplit(".", 1)[-1] == "widths"
    if _is_seed_list(key) and (value is not None or not nullable):
        if not isinstance(value, list) or (not value and key.rsplit(".", 1)[-1] == "seeds"):
            raise ValueError(f"{key!r} must be a non-empty list of seeds, e.g. -o {key}=[0,1]; got {value!r}")
        if value and not whole_list(value, 0):  # the check psd's options use for its random_seeds
            raise ValueError(f"{key!r} takes whole numbers >= 0, e.g. -o {key}=[0,1]; got {value!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"{key!r} repeats a seed ({value!r}): each seed is one run, and a repeat would load the "
                             "same run twice and report a seed spread of 0; give distinct seeds")
        return
    given = [v for found, v in in_profiles if found and v is not None]
    if _is_count(key) and given and whole_list(given, 1) and not (value is None and nullable):
        if not whole_list([value], 1):
            raise ValueError(f"parameter {key!r} is a count: give a whole number >= 1 (the profiles give "
                             f"{', '.join(map(str, sorted(set(given))))}); got {value!r}")
    # a list of counts (budget_check.epochs, analysis.lowres, analysis.cost_classes): the notebooks int() each
    # entry (2.5 epochs trained 2) or fail on it after the chapter's training
    if _is_count(key) and given and all(whole_list(v, 1) for v in given) and not (value is None and nullable):
        if not whole_list(value, 1):
            raise ValueError(f"parameter {key!r} is a list of counts: give whole numbers >= 1, e.g. -o {key}="
                             f"[{','.join(map(str, given[0]))}]; got {value!r}")


def load_profile(chapter: str, profile: str = "default",
                 overrides: Mapping[str, Any] | str | list[str] | None = None) -> dict:
    """Return the settings of ``chapter`` under ``profile``, with dotted-key ``overrides`` applied.

    ``overrides`` is ``{"train.epochs": 3}``, or the CLI's form ``["train.epochs=3"]`` (see
    :func:`parse_overrides`). Raises ``ValueError`` for an unknown profile, an override key the chapter does not
    have (the message lists the valid ones) or a value of the wrong kind.
    """
    data = _read(chapter)
    if profile not in data:
        close = difflib.get_close_matches(str(profile), sorted(data), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown profile {profile!r} for chapter {chapter!r}{hint}; choose one of {sorted(data)}")
    settings = copy.deepcopy(data[profile])
    data_profiles = {p: v.get("data") for p, v in data.items() if isinstance(v, Mapping)}
    valid: set[str] = set()
    open_maps: set[str] = set()  # mappings that are empty in some profile: any key goes (e.g. backbone_kwargs)
    nullable: set[str] = set()  # keys that are null in some profile (a part turned off): null may be given
    for prof in data.values():
        flat = _flatten(prof)
        valid.update(flat)
        open_maps.update(k for k, v in flat.items() if isinstance(v, Mapping))
        nullable.update(k for k, v in flat.items() if v is None)
    if isinstance(overrides, (str, list, tuple)):
        overrides = parse_overrides(overrides)
    elif overrides is not None and not isinstance(overrides, Mapping):
        raise ValueError(f"overrides must be a mapping like {{'train.epochs': 3}} (or a list like "
                         f"['train.epochs=3']), got {type(overrides).__name__}")

    def reference(key: str, ok: Any = lambda r: r is not None) -> Any:
        """The value ``key`` replaces: this profile's if it has the key, else the first of another profile's that
        passes ``ok`` (``None`` if none does)."""
        found, ref = _lookup(settings, key)
        if found and ok(ref):
            return ref
        return next((r for f, r in (_lookup(prof, key) for prof in data.values()) if f and ok(r)), None)

    pairs = [kv for k, v in (overrides or {}).items()
             for kv in _expand(k, v, reference(k, lambda r: isinstance(r, Mapping)) if isinstance(k, str) else None)]
    for key, value in pairs:
        if not isinstance(key, str) or not key:
            raise ValueError(f"override keys are dotted names like 'train.epochs', got {key!r}")
        parent, _, leaf = key.rpartition(".")
        known = key in valid or any(k.startswith(key + ".") for k in valid)
        if known and parent:
            _refuse_another_profiles_key(chapter, profile, data, settings, key)
        if not known and parent:
            found, node = _lookup(settings, parent)
            allowed = _validator_keys(chapter, parent, node if found else None)
            if allowed is not None:
                known = leaf in allowed
                if not known:
                    close = difflib.get_close_matches(leaf, sorted(allowed), n=3)
                    hint = f" (did you mean {', '.join(repr(f'{parent}.{c}') for c in close)}?)" if close else ""
                    raise ValueError(f"unknown parameter {key!r} for chapter {chapter!r}{hint}; valid keys under "
                                     f"{parent!r}: {sorted(allowed)}")
            known = known or parent in open_maps
        if not known:
            every = _every_key(chapter, settings, valid)
            close = difflib.get_close_matches(key, sorted(every), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"unknown parameter {key!r} for chapter {chapter!r}{hint}; valid keys: {sorted(every)}")
        if leaf == "seed" and parent.rsplit(".", 1)[-1] in TRAIN_SECTIONS and value != reference(key, lambda r: True):
            # every chapter trains with {**train, "seed": s} for each seed s of its seed lists: the value is never read
            raise ValueError(f"{key!r} is not read: the chapters train one run per seed of 'seeds' (each run's seed "
                             f"replaces {key}); give the seeds instead, e.g. -o seeds=[{value}]")
        kind = _train_field_kinds().get(leaf) if parent.rsplit(".", 1)[-1] in TRAIN_SECTIONS else None
        if kind is not None:  # TrainConfig's own check, now rather than when a run starts
            from mlic_lib.engine import _typed

            value = _typed(leaf, value, kind)
        else:
            found, ref = _lookup(settings, key)
            if not found or ref is None:  # absent, or off in this profile: the kind of value another profile gives
                ref = reference(key)
            scene_default = _scene_default(parent, leaf)
            if ref is None and scene_default is not None:  # a SceneSpec field no profile sets: its default's kind
                ref = scene_default
            optional = key in nullable or not all(_lookup(prof, key)[0] for prof in data.values())
            if value is None and isinstance(ref, Mapping) and ref and not optional:
                raise ValueError(f"{key!r} is a section that no profile turns off: null is not accepted; override "
                                 f"one of its keys instead, e.g. -o {key}.{next(iter(ref))}=...")
            if (isinstance(value, Mapping) and not value and isinstance(ref, Mapping) and ref and not optional
                    and key not in open_maps and leaf not in DEFAULTED_SECTIONS):
                # the notebooks read these sections key by key (psd's opts["cpsd_k"], analysis.cam_images after the
                # training, ltml's train.epochs after Table 2): {} would fail there with a KeyError
                raise ValueError(f"{key}={{}} would drop every setting of the section, which the chapter reads key by "
                                 f"key; override its keys instead, e.g. -o {key}.{next(iter(ref))}=...")
            if value is None and isinstance(ref, (int, float)) and key not in nullable:
                raise ValueError(f"parameter {key!r} cannot be null (no profile turns it off); give a value like "
                                 f"{ref!r}")  # names and lists may be null (model.weights=null: from scratch)
            value = _coerce(key, value, ref)
            if isinstance(scene_default, int) and not isinstance(scene_default, bool):  # SceneSpec's int fields
                from mlic_lib.checks import number  # (their ranges are SceneSpec's own check, below)

                low = 0 if leaf == "world_seed" else -math.inf  # numpy seeds are >= 0
                if (x := number(value, whole=True)) is None or x < low:
                    raise ValueError(f"parameter {key!r} takes a whole number{' >= 0' if low == 0 else ''} (like "
                                     f"{scene_default}), got {value!r}")
                value = int(value)  # 2.0 is 2: the same scenes, so the same cache key
        node = settings
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):  # absent, or null in this profile (a section turned off)
                node[p] = {}
            node = node[p]
        node[leaf] = value
    touched = [str(k) for k, _ in pairs]  # only an override can make a profile's values wrong

    def touches(key: str) -> bool:
        return any(k == key or k.startswith(f"{key}.") for k in touched)

    dsec = settings.get("data")
    if touches("data.dataset") and isinstance(dsec, Mapping) and dsec.get("dataset") not in (None, "scenes") and (
            "scenes" in dsec):  # the section's own check would name data.scenes, which the user did not give
        real = [p for p, d in data_profiles.items() if isinstance(d, Mapping) and "scenes" not in d
                and d.get("dataset") not in (None, "scenes")]
        raise ValueError(f"data.dataset={dsec['dataset']}: profile {profile!r} runs on the embedded scenes "
                         "(its data section has scenes options), not a real dataset"
                         + (f"; use --profile {real[0]} -o data.dataset={dsec['dataset']}" if real else ""))
    for section, (module, function) in VALUE_CHECKS.get(chapter, {}).items():
        if touches(section):
            import importlib

            found, value = _lookup(settings, section)
            getattr(importlib.import_module(module), function)(value if found else None)
    for module, function in {v for k, v in SETTINGS_CHECKS.get(chapter, {}).items() if touches(k)}:
        import importlib

        getattr(importlib.import_module(module), function)(settings)
    train_sections = {k.rsplit(".", 1)[0] for k in touched if k.rsplit(".", 1)[0].rsplit(".", 1)[-1] in
                      TRAIN_SECTIONS}
    for section in sorted(train_sections):
        found, value = _lookup(settings, section)
        if found and isinstance(value, Mapping):
            from mlic_lib.engine import TrainConfig

            try:
                TrainConfig.from_dict(value)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{section}: {err}") from None
    for key in touched:  # after the sections' own checks, whose messages say more
        _check_general(key, _lookup(settings, key)[1], [_lookup(prof, key) for prof in data.values()])
    settings["profile"] = profile
    settings["chapter"] = chapter
    return settings
