"""One config path: each stage's params section is parsed by vspa.config.parse_section into its dataclass."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from vspa.config import parse_section, stage_config
from vspa.coreset.config import SubsampleConfig
from vspa.evaluation.config import EvalConfig
from vspa.memory.config import ExtractConfig
from vspa.utils import VspaError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@dataclass
class Toy:
    count: int
    rate: float
    flag: bool
    label: str
    steps: list[int] = field(default_factory=lambda: [1, 2])
    scales: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    limit: int | None = 5
    note: str = "plain"
    validated: bool = False

    def validate(self, name: str, path: str) -> None:
        if self.count < 0:
            raise VspaError(f"{path}: {name}.count must be >= 0, got {self.count}.")
        self.validated = True


REQUIRED = {"count": 3, "rate": 0.5, "flag": True, "label": "x"}


def toy(**changes) -> Toy:
    return parse_section(Toy, {**REQUIRED, **changes}, "toy", "my_params.yaml")


def error(**changes) -> str:
    with pytest.raises(VspaError) as exc:
        toy(**changes)
    return str(exc.value)


# --------------------------------------------------------------------------- parse_section


def test_a_valid_section_gives_the_dataclass_with_its_defaults_and_is_validated():
    cfg = toy()
    assert (cfg.count, cfg.rate, cfg.flag, cfg.label) == (3, 0.5, True, "x")
    assert cfg.steps == [1, 2] and cfg.extra == {} and cfg.limit == 5 and cfg.note == "plain"
    assert cfg.validated  # validate(name, path) was called
    msg = error(count=-1)
    assert msg == "my_params.yaml: toy.count must be >= 0, got -1."


def test_unknown_key_names_the_key_the_section_the_file_and_the_known_keys():
    msg = error(cuont=4)
    assert msg.startswith("my_params.yaml: unknown key(s) in section 'toy:': cuont.")
    assert "Known keys:" in msg and "count" in msg and "rate" in msg


def test_a_field_without_default_is_required_and_null_is_not_a_value():
    section = dict(REQUIRED)
    del section["rate"]
    with pytest.raises(VspaError, match=r"^my_params\.yaml: toy\.rate is not set"):
        parse_section(Toy, section, "toy", "my_params.yaml")
    assert error(rate=None).startswith("my_params.yaml: toy.rate is not set")
    with pytest.raises(VspaError, match="toy.count is not set"):
        parse_section(Toy, None, "toy", "my_params.yaml")  # an empty section


def test_null_falls_back_to_the_default_except_for_an_optional_field():
    assert toy(note=None).note == "plain" and toy(steps=None).steps == [1, 2]
    assert toy(limit=None).limit is None  # int | None: null is a value
    assert toy().limit == 5  # absent: the default
    assert toy(limit=7).limit == 7 and toy(limit=7.0).limit == 7


def test_int_coercion():
    assert toy(count=4.0).count == 4 and isinstance(toy(count=4.0).count, int)
    assert "toy.count must be an integer, got True" in error(count=True)
    assert "toy.count must be an integer, got 2.5" in error(count=2.5)
    assert "toy.count must be an integer, got '3'" in error(count="3")
    assert "toy.limit must be an integer or null, got 'many'" in error(limit="many")


def test_float_coercion():
    assert toy(rate=1).rate == 1.0 and isinstance(toy(rate=1).rate, float)
    assert toy(rate="1e-4").rate == 1e-4  # PyYAML reads 1e-4 (no dot) as a string
    assert "toy.rate must be a number, got False" in error(rate=False)
    assert "toy.rate must be a number, got 'fast'" in error(rate="fast")
    assert "toy.rate must be a number, got [0.5]" in error(rate=[0.5])


def test_bool_only_true_or_false():
    assert toy(flag=False).flag is False
    assert "toy.flag must be true or false, got 1" in error(flag=1)
    assert "toy.flag must be true or false, got 'yes'" in error(flag="yes")


def test_str_and_the_yaml_off_trap():
    assert toy(label="cuda:1").label == "cuda:1"
    assert "toy.label must be a string, got 3" in error(label=3)
    msg = error(label=False)  # `label: off` unquoted
    assert "toy.label must be a string" in msg and "quote it" in msg


def test_list_coercion():
    cfg = toy(steps=[750, 900.0], scales=[1, 0.5], names=["a", "b"])
    assert cfg.steps == [750, 900] and cfg.scales == [1.0, 0.5] and cfg.names == ["a", "b"]
    assert all(isinstance(s, int) for s in cfg.steps) and all(isinstance(s, float) for s in cfg.scales)
    msg = error(steps=[750, 0.5])
    assert "toy.steps must be a list of integers" in msg and "[1] = 0.5 is not an integer" in msg
    assert "toy.steps must be a list of integers, got 750" in error(steps=750)
    assert "toy.names must be a list of strings" in error(names=["a", 1])


def test_dict_is_taken_as_is():
    assert toy(extra={"a": {"b": 1}}).extra == {"a": {"b": 1}}
    assert "toy.extra must be a mapping, got [1, 2]" in error(extra=[1, 2])


def test_a_section_that_is_not_a_mapping():
    with pytest.raises(VspaError, match="my_params.yaml: section 'toy:' must be a mapping"):
        parse_section(Toy, [1, 2], "toy", "my_params.yaml")


# --------------------------------------------------------------------------- the stage sections

SECTIONS = [(EvalConfig, "evaluate"), (ExtractConfig, "extract_memory"), (SubsampleConfig, "subsample")]


def committed(name: str) -> dict:
    return stage_config(str(PARAMS), name)[name]


@pytest.mark.parametrize("cls,name", SECTIONS)
def test_the_committed_section_parses_and_every_key_is_a_field(cls, name):
    section = committed(name)
    cfg = parse_section(cls, section, name, str(PARAMS))
    for key, value in section.items():
        assert getattr(cfg, key) == value  # the same values reach the library


@pytest.mark.parametrize("cls,name", SECTIONS)
def test_a_typo_is_an_error_naming_the_key_and_the_file(cls, name):
    section = committed(name)
    key = sorted(section)[0]
    typo = key[::-1] + "x"
    section[typo] = section.pop(key)
    with pytest.raises(VspaError) as exc:
        parse_section(cls, section, name, "some/params.yaml")
    msg = str(exc.value)
    assert msg.startswith("some/params.yaml: unknown key(s) in section") and typo in msg and f"'{name}:'" in msg


@pytest.mark.parametrize("cls,name", SECTIONS)
def test_no_default_is_stated_twice(cls, name):
    """Every key of the committed section is required by the dataclass (its value lives in conf/config.yaml);
    only keys params.yaml may omit (evaluate.subsets, set by one scenario preset) have a dataclass default."""
    import dataclasses

    defaults = {f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    assert defaults == ({"subsets"} if cls is EvalConfig else set())
    assert not defaults & set(committed(name))


def test_eval_config_checks():
    base = {"device": "cpu", "iou": 0.5, "batch_size": 2}
    assert parse_section(EvalConfig, base, "evaluate").subsets == {}
    for bad, match in [({"iou": 0.0}, r"evaluate.iou must be in \(0, 1\], got 0.0"),
                       ({"iou": 1.5}, r"evaluate.iou must be in \(0, 1\]"),
                       ({"batch_size": 0}, "evaluate.batch_size must be at least 1, got 0"),
                       ({"device": "gpu"}, "evaluate.device 'gpu' is not a device"),
                       ({"subsets": [1]}, r"evaluate.subsets must be a mapping, got \[1\]\. Map a subset name"),
                       ({"subsets": {"dense": {}}}, "evaluate.subsets.dense must map image fields to values")]:
        with pytest.raises(VspaError, match=match):
            parse_section(EvalConfig, {**base, **bad}, "evaluate")
    foggy = stage_config({"scenario": "cityscapes_foggy", "evaluate": base}, "evaluate")["evaluate"]
    assert parse_section(EvalConfig, foggy, "evaluate").subsets["beta_0.02"] == {"fog_beta": 0.02}


def test_extract_config_checks():
    base = committed("extract_memory")
    for bad, match in [({"keep": "some"}, "extract_memory.keep 'some' is unknown. Use one of: all, correct"),
                       ({"batch_size": 0}, "extract_memory.batch_size must be at least 1"),
                       ({"chunk_rows": 0}, "extract_memory.chunk_rows must be at least 1"),
                       ({"batch_size": None}, "extract_memory.batch_size is not set")]:
        with pytest.raises(VspaError, match=match):
            parse_section(ExtractConfig, {**base, **bad}, "extract_memory")


def test_subsample_config_checks():
    base = committed("subsample")
    for bad, match in [({"method": "kmeans"}, "subsample.method 'kmeans' is unknown. Use one of: coreset, random, "
                                              "none"),
                       ({"fg_ratio": 0}, r"subsample.fg_ratio must be in \(0, 1\]"),
                       ({"bg_ratio": 1.5}, r"subsample.bg_ratio must be in \(0, 1\]"),
                       ({"projection_dim": -1}, "subsample.projection_dim must be >= 0"),
                       ({"seed": 0.5}, "subsample.seed must be an integer, got 0.5"),
                       ({"method": False}, "subsample.method must be a string")]:
        with pytest.raises(VspaError, match=match):
            parse_section(SubsampleConfig, {**base, **bad}, "subsample")


# --------------------------------------------------------------------------- the stages


def stage_main(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}_sections", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_evaluate_stage_rejects_a_typo_naming_the_key_and_the_params_file(tmp_path, monkeypatch, capsys):
    params = tmp_path / "my_params.yaml"
    params.write_text("evaluate: {device: cpu, iou: 0.5, batch_size: 2, bacth_size: 3}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        stage_main("evaluate")(params=str(params), model=tmp_path / "model.pt", data=tmp_path / "split",
                               name="tiny", metrics_dir=Path("reports/metrics"), plots_dir=Path("reports/plots/pr"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bacth_size" in err and str(params) in err and "'evaluate:'" in err
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("name", ["extract_memory", "subsample"])
def test_memory_stages_reject_a_typo_before_reading_anything(name, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    section = committed(name)
    section["batch_szie" if name == "extract_memory" else "fg_raito"] = 0.5
    params.write_text(yaml.safe_dump({name: section}))
    paths = ({"model": tmp_path / "nope.pt", "data": tmp_path / "split", "out": tmp_path / "full.h5",
              "stats": tmp_path / "extract.json"} if name == "extract_memory" else
             {"memory": tmp_path / "nope.h5", "out": tmp_path / "sub.h5", "coverage": tmp_path / "coverage.json"})
    with pytest.raises(SystemExit) as exc:
        stage_main(name)(params=str(params), **paths)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(params) in err and ("batch_szie" in err or "fg_raito" in err)
