"""Per-chapter run profiles: ``smoke`` (seconds, CI), ``default`` (the CPU book), ``full`` (paper recipe, GPU).

Each chapter has ``mlic_lib/profiles/<chapter>.yaml`` with one mapping per profile. Overrides use
dotted keys (``{"train.epochs": 3}``); a key is valid when some profile of the chapter has it, or when
its parent is a section (``train``, ``data.scenes``) whose own validator (``TrainConfig``,
``SceneSpec``) then checks the name.
"""

from __future__ import annotations

import copy
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


def load_profile(chapter: str, profile: str = "default", overrides: Mapping[str, Any] | None = None) -> dict:
    """Return the settings of ``chapter`` under ``profile``, with dotted-key ``overrides`` applied.

    Raises ``ValueError`` for an unknown profile or an override key the chapter does not have (the
    message lists the valid ones).
    """
    data = _read(chapter)
    if profile not in data:
        raise ValueError(f"unknown profile {profile!r} for chapter {chapter!r}; choose one of {sorted(data)}")
    settings = copy.deepcopy(data[profile])
    valid: set[str] = set()
    sections: set[str] = set()
    for prof in data.values():
        flat = _flatten(prof)
        valid.update(flat)
        sections.update(k.rsplit(".", 1)[0] for k in flat if "." in k)
    for key, value in (overrides or {}).items():
        if key not in valid and key.rsplit(".", 1)[0] not in sections:
            raise ValueError(f"unknown parameter {key!r} for chapter {chapter!r}; valid keys: {sorted(valid)}")
        node = settings
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):  # absent, or null in this profile (a section turned off)
                node[p] = {}
            node = node[p]
        node[leaf] = value
    settings["profile"] = profile
    settings["chapter"] = chapter
    return settings
