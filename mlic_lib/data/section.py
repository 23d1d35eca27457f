"""The check of a profile's ``data`` section (and its form in a run's cache key, :func:`data_key`), shared by the
profile loader (:func:`mlic_lib.profiles.load_profile`, when an override touches the section) and
:func:`mlic_lib.experiments.scene_data` (for settings built by hand). It lives with the data code, not in
:mod:`mlic_lib.profiles`, so that a run's code key (which follows the imports of the data code) does not take in the
profile loader and, through its checks, every method module."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["check_data_section", "data_key"]

_COUNTS = ("n_train", "n_test", "n_bias_test")  # numbers of images
_SEEDS = ("data_seed", "subset_seed")


def _check_data_keys(data: Mapping[str, Any], where: str, real: bool) -> None:
    for key in _COUNTS:
        if key not in data:
            continue
        v = data[key]
        if v is None and real:
            continue  # a real dataset: null = all its images
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}.{key} must be a whole number of images >= 1"
                             + (" or null (all of them)" if real else "") + f", got {v!r}; e.g. -o {where}.{key}=200")
    for key in _SEEDS:
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 0):
            raise ValueError(f"{where}.{key} must be a whole number >= 0, got {data[key]!r}")
    if "downsample" in data and (isinstance(data["downsample"], bool) or not isinstance(data["downsample"], int)
                                 or data["downsample"] < 1):
        raise ValueError(f"{where}.downsample must be a whole number >= 1 (1 = full resolution), got "
                         f"{data['downsample']!r}")


def check_data_section(data: Any) -> None:
    """Check a profile's ``data`` section after an override touched it, so that a bad value fails now with the key's
    name rather than minutes into a chapter: the section must be a mapping; the numbers of images (``n_train``,
    ``n_test``, ``n_bias_test``) whole numbers >= 1, or ``null`` (all images) for a real dataset; ``data_seed`` and
    ``subset_seed`` whole numbers >= 0; ``downsample`` >= 1; ``scenes`` a mapping that
    :class:`~mlic_lib.data.scenes.SceneSpec` accepts; ``real`` (SpliceMix's real-data part) null or a mapping
    checked the same way."""
    from mlic_lib.data.real import check_options

    if not isinstance(data, Mapping):
        raise ValueError(f"the data section must be a mapping of settings, got {data!r}; override one of its keys "
                         "instead, e.g. -o data.n_train=200")
    real = data.get("dataset") not in (None, "scenes")
    _check_data_keys(data, "data", real)
    if real:
        try:
            check_options(data)
        except ValueError as err:
            raise ValueError(f"data: {err}") from None
    if "scenes" in data:
        scenes = data["scenes"]
        if not isinstance(scenes, Mapping):
            raise ValueError(f"data.scenes must be a mapping ({{}} for the defaults), got {scenes!r}")
        from mlic_lib.data.scenes import SceneSpec

        try:
            SceneSpec.from_dict(scenes)
        except (TypeError, ValueError) as err:
            raise ValueError(f"data.scenes: {err}") from None
    if data.get("real") is not None:
        if not isinstance(data["real"], Mapping):
            raise ValueError(f"data.real must be a mapping (a real dataset's settings) or null, got {data['real']!r}")
        _check_data_keys(data["real"], "data.real", True)
        try:
            check_options(data["real"])
        except ValueError as err:
            raise ValueError(f"data.real: {err}") from None


def data_key(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` section as it enters a run's cache key: for the embedded scenes, the scene options with their
    defaults written out (:meth:`~mlic_lib.data.scenes.SceneSpec.to_dict`), ``data_seed`` 0 when it is left out and
    ``dataset: scenes`` for ``null``, as :func:`mlic_lib.experiments.scene_data` reads them. A profile that writes
    out a default then shares the runs of one that leaves it out, instead of training them again. A real dataset's
    section is keyed as it is."""
    key = dict(data)
    if key.get("dataset") in (None, "scenes"):
        from mlic_lib.data.scenes import SceneSpec

        key["dataset"] = "scenes"
        key["data_seed"] = key.get("data_seed", 0)
        key["scenes"] = SceneSpec.from_dict(dict(key.get("scenes") or {})).to_dict()
    return key
