"""The training stages' commands, as dvc.yaml writes them, also run under ``torchrun`` (README: "Multi-GPU /
multi-process"): torchrun's own parser reads every option of the whole command line before it hands the
script's options over, and refuses one that abbreviates several of its own (``--log`` did: --log-dir,
--log-line-prefix-template, --logs-specs)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import default_section
from test_train import TINY_MODEL, read_csv, write_tiny_split

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ["--standalone", "--nproc_per_node=2"]


def training_commands() -> dict[str, list[str]]:
    """Stage (or foreach / matrix template) name -> its cmd's words after ``python``, for every stage whose
    script trains with torch.distributed (stages/train.py, stages/adapt.py)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        cmd = (stage.get("do") or stage)["cmd"]
        words = shlex.split(cmd)
        if words[0] == "python" and words[1] in ("stages/train.py", "stages/adapt.py"):
            out[name] = words[1:]
    return out


def test_every_training_command_passes_torchruns_parser_unchanged():
    from torch.distributed.run import get_args_parser

    commands = training_commands()
    assert {"pretrain", "oracle", "adapt", "pretrain_augsim", "adapt_pairing"} <= set(commands)
    for name, words in commands.items():
        try:
            args = get_args_parser().parse_args([*TORCHRUN, *words])
        except SystemExit as exc:
            raise AssertionError(f"dvc.yaml stage {name}: torchrun refuses `{shlex.join(words)}`") from exc
        assert [args.training_script, *args.training_script_args] == words, name
    readme = (ROOT / "README.md").read_text()
    line = readme.split("Multi-GPU / multi-process: `torchrun", 1)[1].split("`", 1)[0]
    shown = [w for w in line.split() if w.startswith("--") and not w.startswith("--nproc")]
    assert shown == [w for w in commands["pretrain"] if w.startswith("--")], line  # README shows the real options


def test_pretrain_command_of_dvc_yaml_trains_in_two_processes(tmp_path):
    """dvc.yaml's pretrain cmd, its paths moved into tmp_path, run by torch.distributed.run on the CPU."""
    write_tiny_split(tmp_path / "split")
    params = {
        "scenario": "synth_fog",
        "model": {**default_section("model"), **TINY_MODEL, "pretrained_weights": None},
        "pretrain": {
            **default_section("pretrain"),
            "device": "cpu",
            "iterations": 2,
            "batch_size": 2,
            "warmup_iters": 1,
            "lr_steps": [],
            "checkpoint_every": 1,
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    words = training_commands()["pretrain"]
    moved = {}
    for i in range(1, len(words) - 1, 2):
        option, value = words[i], words[i + 1]
        assert option.startswith("--"), words
        if option == "--data":
            value = str(tmp_path / "split")
        elif option != "--section":
            value = str(tmp_path / "out" / Path(value).name)
        moved[option] = value
        words[i + 1] = value
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *TORCHRUN, *words, "--params", str(tmp_path / "params.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stderr
    assert Path(moved["--out"]).stat().st_size > 0
    log = next(Path(v) for v in moved.values() if v.endswith(".csv"))
    assert [int(r["iteration"]) for r in read_csv(log)] == [1, 2]
