"""Effective stage configuration: params.yaml over the scenario preset.

``params.yaml`` selects a scenario with the top-level key ``scenario``. Each scenario has a preset,
``src/vspa/presets/<scenario>.yaml``, laid out like params.yaml. A key whose value in params.yaml is
``null`` takes the preset's value; any other value wins. So ``dvc exp run -S scenario=sim10k_cityscapes``
switches every preset-controlled default at once, and ``-S adapt.tau=0.6`` still overrides one of them.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from vspa.utils import VspaError, load_params

PRESET_PACKAGE = "vspa.presets"


def available_scenarios() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml")
    )


def load_preset(scenario: str) -> dict:
    path = resources.files(PRESET_PACKAGE) / f"{scenario}.yaml"
    if not path.is_file():
        raise VspaError(
            f"params.yaml: unknown scenario '{scenario}'. Choose one of: {', '.join(available_scenarios())}."
        )
    return yaml.safe_load(path.read_text()) or {}


def _overlay(preset: Any, given: Any) -> Any:
    """params value wins unless it is None; mappings merge key by key."""
    if isinstance(preset, dict) and isinstance(given, dict):
        out = dict(preset)
        for key, value in given.items():
            out[key] = _overlay(preset.get(key), value)
        return out
    return preset if given is None else given


def effective_params(params: dict) -> dict:
    """The whole params mapping with nulls filled from the scenario preset."""
    scenario = params.get("scenario") or "synth_fog"
    merged = _overlay(load_preset(scenario), params)
    merged["scenario"] = scenario
    return merged


def stage_config(params: dict | str, *sections: str, path: str = "params.yaml") -> dict:
    """Effective values of the named sections (``params`` may be the parsed mapping or a file path).

    Raises VspaError naming a missing section.
    """
    if isinstance(params, str):
        path = params
        params = load_params(params)
    merged = effective_params(params)
    out: dict = {"scenario": merged["scenario"]}
    for name in sections:
        if name not in merged or not isinstance(merged[name], dict):
            raise VspaError(f"{path}: missing section '{name}:'. Add it (see the README's params table).")
        out[name] = merged[name]
    return out
