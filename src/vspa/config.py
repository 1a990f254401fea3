"""The pipeline's configuration: Hydra composition of conf/ into params.yaml, and each stage's sections.

``conf/config.yaml`` holds the values every scenario shares and selects a scenario in its ``defaults``;
``conf/scenario/<name>.yaml`` (the files of ``src/vspa/presets/``, the package's own copy so importers and
checks can read them without the repository) sets what the scenario changes. DVC composes them on
``dvc exp run -S scenario=sim10k_cityscapes -S adapt.tau=0.6`` (Hydra overrides; ``.dvc/config`` has
``hydra.enabled``) and writes params.yaml; :func:`compose` is the same composition for code and tests, and
``vspa params`` / ``make params`` rewrite params.yaml with it. The committed params.yaml therefore holds the
effective values of the default scenario, explicitly. ``dvc repro`` reads params.yaml as it is.

A params file written before composition (a ``null`` meaning "the scenario preset's value") still works:
:func:`effective_params` fills such nulls from the preset.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
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


def compose(conf_dir: str | Path = "conf", overrides: list[str] | tuple[str, ...] = (),
            config_name: str = "config") -> dict:
    """The params that ``dvc exp run -S <overrides>`` writes: Hydra's composition of ``conf_dir/config.yaml``
    (its ``defaults`` select ``scenario: <name>``, i.e. ``conf/scenario/<name>.yaml``) with ``overrides``
    such as ``scenario=cityscapes_foggy`` or ``adapt.tau=0.6``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    conf = Path(conf_dir).resolve()
    if not (conf / f"{config_name}.yaml").is_file():
        raise VspaError(f"{conf / config_name}.yaml: not found; the Hydra config folder is conf/ at the repository root.")
    try:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except HydraException as exc:
        raise VspaError(f"{conf}: composing with {list(overrides)} failed: {exc}") from exc
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg)


def dump_params(params: dict) -> str:
    """``params`` as DVC's Hydra composition writes params.yaml (OmegaConf's YAML), so a `dvc exp run -S`
    that changes nothing rewrites the file byte for byte."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(params))
