"""Every config default is stated once (issue 14): a dataclass field parsed from a params section has a Python
default only when no conf file always provides the key.

A key is "always provided" when it is in conf/config.yaml's section (a ``~`` there is a placeholder that every
scenario sets: tests/test_params.py) or in that section of every scenario file (src/vspa/presets/, which
conf/scenario/ is). Such a key reaches every params.yaml Hydra composes, so a default in the dataclass would be a
second statement of the value, free to drift from the first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from vspa.adaptation.config import AdaptConfig
from vspa.config import available_scenarios, load_preset
from vspa.coreset.config import SubsampleConfig
from vspa.detection.model import DetectorConfig
from vspa.detection.train import TrainConfig
from vspa.evaluation.config import EvalConfig
from vspa.memory.config import ExtractConfig
from vspa.translation.trainer import TranslateConfig

ROOT = Path(__file__).resolve().parents[1]

# every (dataclass, section) pair a stage parses with vspa.config.parse_section
PARSED = [
    (AdaptConfig, "adapt"),
    (DetectorConfig, "model"),
    (TrainConfig, "pretrain"),
    (TrainConfig, "oracle"),
    (TranslateConfig, "translate"),
    (EvalConfig, "evaluate"),
    (ExtractConfig, "extract_memory"),
    (SubsampleConfig, "subsample"),
]


def always_provided(section: str) -> set[str]:
    """The keys of ``section`` that every composed params file has."""
    shared = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text()).get(section) or {}
    per_scenario = [set(load_preset(name).get(section) or {}) for name in available_scenarios()]
    return set(shared) | set.intersection(*per_scenario)


def with_default(cls) -> set[str]:
    return {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def test_the_scenarios_are_the_conf_group():
    assert available_scenarios() == sorted(p.stem for p in (ROOT / "conf" / "scenario").glob("*.yaml"))


@pytest.mark.parametrize("cls,section", PARSED, ids=[f"{c.__name__}-{s}" for c, s in PARSED])
def test_no_field_default_repeats_a_value_conf_always_provides(cls, section):
    provided = always_provided(section)
    assert provided, f"conf states no key of '{section}:'"
    assert provided <= {f.name for f in dataclasses.fields(cls)}, "conf provides a key the dataclass lacks"
    twice = sorted(with_default(cls) & provided)
    assert not twice, (
        f"{cls.__name__} repeats as Python defaults the values conf always provides for '{section}:': "
        f"{', '.join(twice)}. Remove those defaults (the values are stated once, in conf/)."
    )
