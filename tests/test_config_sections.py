"""One config path: each stage's params section is parsed by vspa.config.parse_section into its dataclass."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from vspa.adaptation.config import AdaptConfig
from vspa.config import parse_section, stage_config
from vspa.coreset.config import SubsampleConfig
from vspa.detection.model import DetectorConfig
from vspa.detection.train import TrainConfig
from vspa.evaluation.config import EvalConfig
from vspa.memory.config import ExtractConfig
from vspa.utils import VspaError

from loaders import stage_main

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

    defaults = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    assert defaults == ({"subsets"} if cls is EvalConfig else set())
    assert not defaults & set(committed(name))


def test_eval_config_checks():
    base = {"device": "cpu", "iou": 0.5, "batch_size": 2}
    assert parse_section(EvalConfig, base, "evaluate").subsets == {}
    for bad, match in [
        ({"iou": 0.0}, r"evaluate.iou must be in \(0, 1\], got 0.0"),
        ({"iou": 1.5}, r"evaluate.iou must be in \(0, 1\]"),
        ({"batch_size": 0}, "evaluate.batch_size must be at least 1, got 0"),
        ({"device": "gpu"}, "evaluate.device 'gpu' is not a device"),
        ({"subsets": [1]}, r"evaluate.subsets must be a mapping, got \[1\]\. Map a subset name"),
        ({"subsets": {"dense": {}}}, "evaluate.subsets.dense must map image fields to values"),
    ]:
        with pytest.raises(VspaError, match=match):
            parse_section(EvalConfig, {**base, **bad}, "evaluate")
    foggy = stage_config({"scenario": "cityscapes_foggy", "evaluate": base}, "evaluate")["evaluate"]
    assert parse_section(EvalConfig, foggy, "evaluate").subsets["beta_0.02"] == {"fog_beta": 0.02}


def test_extract_config_checks():
    base = committed("extract_memory")
    for bad, match in [
        ({"keep": "some"}, "extract_memory.keep 'some' is unknown. Use one of: all, correct"),
        ({"batch_size": 0}, "extract_memory.batch_size must be at least 1"),
        ({"chunk_rows": 0}, "extract_memory.chunk_rows must be at least 1"),
        ({"batch_size": None}, "extract_memory.batch_size is not set"),
    ]:
        with pytest.raises(VspaError, match=match):
            parse_section(ExtractConfig, {**base, **bad}, "extract_memory")


def test_subsample_config_checks():
    base = committed("subsample")
    for bad, match in [
        ({"method": "kmeans"}, "subsample.method 'kmeans' is unknown. Use one of: coreset, random, none"),
        ({"fg_ratio": 0}, r"subsample.fg_ratio must be in \(0, 1\]"),
        ({"bg_ratio": 1.5}, r"subsample.bg_ratio must be in \(0, 1\]"),
        ({"projection_dim": -1}, "subsample.projection_dim must be >= 0"),
        ({"seed": 0.5}, "subsample.seed must be an integer, got 0.5"),
        ({"method": False}, "subsample.method must be a string"),
    ]:
        with pytest.raises(VspaError, match=match):
            parse_section(SubsampleConfig, {**base, **bad}, "subsample")


# --------------------------------------------------------------------------- the stages


def test_evaluate_stage_rejects_a_typo_naming_the_key_and_the_params_file(tmp_path, monkeypatch, capsys):
    params = tmp_path / "my_params.yaml"
    params.write_text("evaluate: {device: cpu, iou: 0.5, batch_size: 2, bacth_size: 3}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        stage_main("evaluate")(
            params=str(params),
            model=tmp_path / "model.pt",
            data=tmp_path / "split",
            name="tiny",
            metrics_dir=Path("reports/metrics"),
            plots_dir=Path("reports/plots/pr"),
        )
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
    paths = (
        {
            "model": tmp_path / "nope.pt",
            "data": tmp_path / "split",
            "out": tmp_path / "full.h5",
            "stats": tmp_path / "extract.json",
        }
        if name == "extract_memory"
        else {"memory": tmp_path / "nope.h5", "out": tmp_path / "sub.h5", "coverage": tmp_path / "coverage.json"}
    )
    with pytest.raises(SystemExit) as exc:
        stage_main(name)(params=str(params), **paths)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(params) in err and ("batch_szie" in err or "fg_raito" in err)


# --------------------------------------------------------------------------- pretrain / oracle, adapt, model
# These keep a thin from_params (many callers) that is parse_section; the dataclass defaults are what a params
# file that omits a key gets (params.yaml omits e.g. adapt.weight_decay and most model keys).

PORTED = [(TrainConfig, "pretrain"), (TrainConfig, "oracle"), (AdaptConfig, "adapt"), (DetectorConfig, "model")]


def from_params(cls, section, name, path="params.yaml"):
    if cls is DetectorConfig:
        return DetectorConfig.from_params(section, path=path)
    return cls.from_params(section, name=name, path=path)


@pytest.mark.parametrize("cls,name", PORTED)
def test_ported_committed_section_parses_the_same_by_both_paths(cls, name):
    section = committed(name)
    cfg = from_params(cls, section, name, str(PARAMS))
    assert cfg == parse_section(cls, section, name, str(PARAMS))
    for key, value in section.items():
        if value is not None:
            assert getattr(cfg, key) == value  # the same values reach the library


@pytest.mark.parametrize("cls,name", PORTED)
def test_ported_typo_is_an_error_naming_the_key_the_section_and_the_file(cls, name):
    section = committed(name)
    section["bacth_size"] = 4
    with pytest.raises(VspaError) as exc:
        from_params(cls, section, name, "some/params.yaml")
    msg = str(exc.value)
    assert msg.startswith(f"some/params.yaml: unknown key(s) in section '{name}:': bacth_size.")
    assert "Known keys:" in msg and ("batch_size" in msg if cls is not DetectorConfig else "min_size" in msg)


@pytest.mark.parametrize(
    "cls,name,key,bad,expected",
    [
        (TrainConfig, "pretrain", "iterations", "ten", "an integer"),
        (TrainConfig, "oracle", "lr", "fast", "a number"),
        (TrainConfig, "pretrain", "lr_steps", [750, 0.5], "a list of integers"),
        (TrainConfig, "pretrain", "strong_aug", "yes", "true or false"),
        (AdaptConfig, "adapt", "iterations", "ten", "an integer"),
        (AdaptConfig, "adapt", "tau", "high", "a number"),
        (AdaptConfig, "adapt", "amp", 1, "true or false"),
        (AdaptConfig, "adapt", "fg_boxes", False, "a string"),  # only fg_mode / bg_mode read false as "off"
        (DetectorConfig, "model", "min_size", "big", "an integer"),
        (DetectorConfig, "model", "rpn_fg_iou_thresh", "half", "a number"),
        (DetectorConfig, "model", "anchor_sizes", [12, "x"], "a list of integers or null"),
        (DetectorConfig, "model", "from_scratch", "no", "true or false"),
    ],
)
def test_ported_wrong_type_names_the_file_the_key_and_the_type(cls, name, key, bad, expected):
    section = {**committed(name), key: bad}
    with pytest.raises(VspaError) as exc:
        from_params(cls, section, name, "some/params.yaml")
    assert str(exc.value).startswith(f"some/params.yaml: {name}.{key} must be {expected}, got {bad!r}")


def test_train_config_committed_values_and_types():
    cfg = TrainConfig.from_params(committed("pretrain"), name="pretrain", path=str(PARAMS))
    assert (cfg.iterations, cfg.batch_size, cfg.lr, cfg.warmup_iters, cfg.lr_steps) == (1000, 4, 0.02, 100, [750])
    assert (cfg.strong_aug, cfg.amp, cfg.device, cfg.weight_decay, cfg.checkpoint_every) == (
        False,
        False,
        "auto",
        1e-4,
        100,
    )
    assert TrainConfig.from_params(committed("oracle"), name="oracle") == cfg
    assert "amp" not in cfg.record()  # the resume fingerprint's dict is as before
    coerced = TrainConfig.from_params(
        {**committed("pretrain"), "iterations": 10.0, "batch_size": 2, "lr": 1, "momentum": 0, "lr_steps": [5.0, 8]}
    )
    assert type(coerced.iterations) is int and type(coerced.lr) is float and type(coerced.momentum) is float
    assert coerced.lr_steps == [5, 8] and all(type(s) is int for s in coerced.lr_steps)
    assert TrainConfig.from_params({**committed("pretrain"), "lr_steps": []}).lr_steps == []
    with pytest.raises(VspaError, match=r"pretrain\.lr_steps is not set"):  # conf states it: null is no value
        TrainConfig.from_params({**committed("pretrain"), "lr_steps": None})


def test_train_config_value_checks_name_the_file_and_the_key():
    base = {**committed("oracle"), "iterations": 10, "batch_size": 2, "lr": 0.1}
    for bad, match in [
        ({"batch_size": 0}, r"^p\.yaml: oracle\.batch_size must be >= 1, got 0\.$"),
        ({"momentum": 1.0}, r"oracle\.momentum must be in \[0, 1\), got 1\.0"),
        ({"lr": float("nan")}, r"oracle\.lr must be a positive number, got nan"),
        ({"lr_steps": [8, 4]}, r"oracle\.lr_steps must be increasing, got \[8, 4\]"),
        ({"device": "gpu"}, r"oracle\.device 'gpu' is not a device"),
        ({"lr": None}, r"^p\.yaml: oracle\.lr is not set"),
    ]:
        with pytest.raises(VspaError, match=match):
            TrainConfig.from_params({**base, **bad}, name="oracle", path="p.yaml")


def test_adapt_config_committed_values_and_the_run_sections():
    import sys

    cfg = AdaptConfig.from_params(committed("adapt"), path=str(PARAMS))
    assert (cfg.iterations, cfg.batch_size, cfg.lr, cfg.ema_keep, cfg.refresh_every) == (600, 2, 0.01, 0.99, 150)
    assert (cfg.fg_mode, cfg.bg_mode, cfg.bg_form, cfg.margin, cfg.top_k) == ("memory", "memory", "scaled", 1.5, 1)
    assert cfg.weight_decay == 1e-4 and cfg.disc_full_rate and cfg.source_strong  # omitted: the dataclass default
    assert type(cfg.lambda_unsup) is float and type(cfg.bg_scale) is float and type(cfg.top_k) is int
    assert not {"amp", "snapshot_every", "pairing_mode"} & set(cfg.record())  # the fingerprint's dict as before

    sys.path.insert(0, str(ROOT / "stages"))
    from adapt import adapt_section

    raw = yaml.safe_load(PARAMS.read_text())
    at_like = AdaptConfig.from_params(adapt_section(raw, "at_like", str(PARAMS)), name="adapt (+ adapt_at_like)")
    assert (at_like.fg_mode, at_like.bg_mode) == ("off", "off") and not at_like.needs_memory
    fair = AdaptConfig.from_params(adapt_section(raw, "fair_source", str(PARAMS)))
    assert fair.lambda_unsup == 0.0 and type(fair.lambda_unsup) is float and not fair.uses_target
    pairing = AdaptConfig.from_params(adapt_section(raw, "pairing_color", str(PARAMS)))
    assert (pairing.fg_mode, pairing.pairing_mode, pairing.pairing_variants) == (
        "pairing",
        "color",
        "data/augsim/pairing",
    )


def test_adapt_config_reads_an_unquoted_off_and_names_the_key_of_a_bad_value():
    base = {**committed("adapt"), "iterations": 5, "batch_size": 2, "lr": 0.01}
    unquoted = AdaptConfig.from_params({**base, **yaml.safe_load("fg_mode: off\nbg_mode: off\n")})
    assert (unquoted.fg_mode, unquoted.bg_mode) == ("off", "off")
    with pytest.raises(VspaError) as exc:
        AdaptConfig.from_params({**base, "bg_mode": True}, path="p.yaml")  # an unquoted on
    msg = str(exc.value)
    assert msg.startswith("p.yaml: adapt.bg_mode must be a string, got True") and "quote it" in msg
    for bad, match in [
        ({"fg_mode": "memroy"}, r"adapt\.fg_mode must be one of memory, .*, off, got 'memroy'"),
        ({"tau": 1.5}, r"^p\.yaml: adapt\.tau must be in \[0, 1\], got 1\.5\.$"),
        ({"lambda_bg": -0.1}, r"adapt\.lambda_bg must be >= 0, got -0\.1"),
        ({"device": "tpu:x"}, r"adapt\.device 'tpu:x' is not a device"),
        ({"iterations": None}, r"^p\.yaml: adapt\.iterations is not set"),
    ]:
        with pytest.raises(VspaError, match=match):
            AdaptConfig.from_params({**base, **bad}, path="p.yaml")


def test_detector_config_committed_values_and_checks():
    cfg = DetectorConfig.from_params(committed("model"), path=str(PARAMS))
    assert (cfg.backbone, cfg.min_size, cfg.max_size, cfg.pretrained_weights) == ("small", 160, 320, None)
    assert cfg.anchor_sizes == [12, 24, 48, 96, 192] and all(type(s) is int for s in cfg.anchor_sizes)
    assert (cfg.rpn_fg_iou_thresh, cfg.box_batch_size_per_image, cfg.small_width) == (0.5, 64, 16)
    assert cfg.aspect_ratios == [0.5, 1.0, 2.0, 3.0] and not cfg.from_scratch
    # a float given as an integer becomes a float; null is "the default", also for anchor_sizes (int | None)
    given = DetectorConfig.from_params(
        {**committed("model"), "rpn_fg_iou_thresh": 1, "aspect_ratios": [1, 2], "anchor_sizes": None, "min_size": 96.0}
    )
    assert type(given.rpn_fg_iou_thresh) is float and given.aspect_ratios == [1.0, 2.0]
    assert all(type(a) is float for a in given.aspect_ratios) and given.anchor_sizes is None
    assert type(given.min_size) is int and given.min_size == 96
    for bad, match in [
        ({"backbone": "resnet18"}, r"^p\.yaml: unknown model\.backbone 'resnet18'"),
        ({"min_size": 0}, r"^p\.yaml: model\.min_size must be a positive integer, got 0\.$"),
        ({"min_size": 400}, r"model\.min_size \(400\) is larger than model\.max_size \(320\)"),
        ({"rpn_bg_iou_thresh": 0.6}, r"need 0 < model\.rpn_bg_iou_thresh <= model\.rpn_fg_iou_"),
        ({"anchor_sizes": []}, r"model\.anchor_sizes must be a non-empty list"),
        ({"aspect_ratios": [1.0, 0]}, r"model\.aspect_ratios must be a non-empty list of positive"),
    ]:
        with pytest.raises(VspaError, match=match):
            DetectorConfig.from_params({**committed("model"), **bad}, path="p.yaml")


def test_training_stage_rejects_a_typo_naming_the_key_and_the_params_file(tmp_path):
    from vspa.detection.train import run_training_stage

    params = tmp_path / "my_params.yaml"
    raw = yaml.safe_load(PARAMS.read_text())
    raw["oracle"]["lr_step"] = [750]
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(VspaError) as exc:
        run_training_stage(
            str(params),
            "oracle",
            tmp_path / "split",
            tmp_path / "model.pt",
            tmp_path / "l.csv",
            tmp_path / "work",
            "oracle",
        )
    assert str(exc.value).startswith(f"{params}: unknown key(s) in section 'oracle:': lr_step.")
    raw = yaml.safe_load(PARAMS.read_text())
    raw["model"]["min_size"] = "big"
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(VspaError, match=rf"^{re.escape(str(params))}: model\.min_size must be an integer, got 'bi"):
        run_training_stage(
            str(params),
            "pretrain",
            tmp_path / "split",
            tmp_path / "model.pt",
            tmp_path / "l.csv",
            tmp_path / "work",
            "pretrain",
        )
    assert not (tmp_path / "work").exists() and not (tmp_path / "model.pt").exists()


def test_train_stage_serves_pretrain_and_oracle_and_rejects_another_section(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    paths = dict(data=tmp_path / "split", out=tmp_path / "m.pt", log=tmp_path / "l.csv", work_dir=tmp_path / "w")
    with pytest.raises(SystemExit) as exc:
        stage_main("train")(section="pretrian", params=str(tmp_path / "p.yaml"), **paths)
    assert exc.value.code == 2
    assert "--section 'pretrian': choose one of pretrain, oracle" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()
    raw = yaml.safe_load(PARAMS.read_text())
    raw["oracle"]["iterations"] = 0
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit):
        stage_main("train")(section="oracle", params=str(tmp_path / "p.yaml"), **paths)
    assert "p.yaml: oracle.iterations must be >= 1, got 0" in capsys.readouterr().err  # the oracle section was read
