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

A stage reads its section with :func:`stage_config` and turns it into its typed dataclass with
:func:`parse_section` (unknown keys, missing values, wrong types and bad values are errors naming the file and
the key). The values themselves are stated once, in conf/config.yaml (composed into params.yaml); a dataclass
field has a default only where params.yaml may omit the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

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


def compose(
    conf_dir: str | Path = "conf", overrides: list[str] | tuple[str, ...] = (), config_name: str = "config"
) -> dict:
    """The params that ``dvc exp run -S <overrides>`` writes: Hydra's composition of ``conf_dir/config.yaml``
    (its ``defaults`` select ``scenario: <name>``, i.e. ``conf/scenario/<name>.yaml``) with ``overrides``
    such as ``scenario=cityscapes_foggy`` or ``adapt.tau=0.6``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    conf = Path(conf_dir).resolve()
    if not (conf / f"{config_name}.yaml").is_file():
        raise VspaError(
            f"{conf / config_name}.yaml: not found; the Hydra config folder is conf/ at the repository root."
        )
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


# --------------------------------------------------------------------------- typed sections

T = TypeVar("T")

_MISSING = object()


class _WrongType(Exception):
    """A value that does not fit its annotation: ``expected`` in words, ``where`` the list index if any."""

    def __init__(self, expected: str, value: Any, where: str = "") -> None:
        super().__init__(expected)
        self.expected, self.value, self.where = expected, value, where


def _optional_inner(annotation: Any) -> Any:
    """``X`` for ``X | None`` / ``Optional[X]``; ``_MISSING`` for any other annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return _MISSING


def _type_name(annotation: Any) -> str:
    inner = _optional_inner(annotation)
    if inner is not _MISSING:
        return f"{_type_name(inner)} or null"
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (Any,)
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural.get(item, _type_name(item))}"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a mapping",
        list: "a list",
    }.get(annotation, str(annotation))


def _coerce(annotation: Any, value: Any) -> Any:
    """``value`` as ``annotation`` says (see :func:`parse_section`); raises _WrongType."""
    inner = _optional_inner(annotation)
    if inner is not _MISSING:
        try:
            return None if value is None else _coerce(inner, value)
        except _WrongType as exc:
            raise _WrongType(f"{exc.expected} or null", value, exc.where) from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as the string '1e-4'
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads unquoted off / on / no / yes as booleans
            raise _WrongType("a string", value, "quote it: YAML reads an unquoted off, on, no or yes as true/false")
    elif annotation is dict or typing.get_origin(annotation) is dict:
        if isinstance(value, dict):
            return value
    elif annotation is list or typing.get_origin(annotation) is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(annotation) or (Any,)
            if item is Any:
                return list(value)
            out = []
            for i, element in enumerate(value):
                try:
                    out.append(_coerce(item, element))
                except _WrongType:
                    raise _WrongType(
                        _type_name(annotation), value, f"[{i}] = {element!r} is not {_type_name(item)}"
                    ) from None
            return out
    elif annotation is Any:
        return value
    else:
        raise TypeError(f"parse_section: unsupported annotation {annotation!r}")
    raise _WrongType(_type_name(annotation), value)


def parse_section(cls: type[T], section: dict | None, name: str, path: str = "params.yaml") -> T:
    """The params section ``name`` (a mapping, e.g. ``stage_config(...)[name]``) as the dataclass ``cls``.

    - a key that is not a field of ``cls`` is an error naming ``path``, the section, the key and the known keys;
    - a field without a default in ``cls`` is required (``path: name.key is not set``);
    - ``null`` means "not given" (the field's default, else the required error), except for a field annotated
      ``X | None``, for which ``null`` is a value;
    - values are coerced by the field's annotation: ``int`` (an integral number; not true/false), ``float`` (an
      integer or a number; also a string such as '1e-4', which PyYAML reads for 1e-4), ``bool`` (only
      true/false), ``str``, ``list[int]`` / ``list[float]`` / ``list[str]`` (each item as its type), ``dict`` (as
      is), ``X | None``; a value of another type is an error naming the key, the expected type and the value
      (with the field's ``metadata["hint"]``, if it has one);
    - finally ``obj.validate(name, path)`` is called when ``cls`` has it.
    """
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise VspaError(f"{path}: section '{name}:' must be a mapping of keys to values, got {section!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section) - set(fields), key=str)
    if unknown:
        raise VspaError(
            f"{path}: unknown key(s) in section '{name}:': {', '.join(map(str, unknown))}. "
            f"Known keys: {', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, f in fields.items():
        annotation = hints[key]
        value = section.get(key)
        if value is None and not (key in section and _optional_inner(annotation) is not _MISSING):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise VspaError(
                    f"{path}: {name}.{key} is not set. Give it a value (the default is in conf/config.yaml; "
                    f"`make params` composes params.yaml from it)."
                )
            continue  # the dataclass default
        try:
            values[key] = _coerce(annotation, value)
        except _WrongType as exc:
            detail = f" ({exc.where})" if exc.where else ""
            hint = f" {f.metadata['hint']}" if "hint" in f.metadata else ""
            raise VspaError(f"{path}: {name}.{key} must be {exc.expected}, got {value!r}{detail}.{hint}") from None
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(name, path)
    return obj


def check_device(device: str, key: str, path: str = "params.yaml") -> None:
    """VspaError unless ``device`` is 'auto' or a device string torch reads ('cpu', 'cuda', 'cuda:1', ...).

    Whether the device exists is checked where it is used (:func:`vspa.utils.get_device`)."""
    if device == "auto":
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise VspaError(f"{path}: {key} '{device}' is not a device. Use auto, cpu, cuda or cuda:<index>.") from None


def check_choice(value: str, choices: tuple[str, ...] | list[str], key: str, path: str = "params.yaml") -> None:
    """VspaError unless ``value`` is one of ``choices`` (the message lists them)."""
    if value not in choices:
        raise VspaError(f"{path}: {key} '{value}' is unknown. Use one of: {', '.join(choices)}.")


def check_number(ok: bool, value: Any, key: str, requirement: str, path: str = "params.yaml") -> None:
    """VspaError ``path: key must be <requirement>, got <value>`` unless ``ok``."""
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise VspaError(f"{path}: {key} must be {requirement}, got {value!r}.")
