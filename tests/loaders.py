"""Loading a stage or benchmark script as a module, to call its ``main`` in-process (a subprocess would spend
seconds importing torch). The scripts' logic lives in the package and is tested there; what a test reaches
through this is the glue itself: options, outputs, error handling."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """``stages/evaluate.py`` or ``benchmarks/bench_rows.py`` (relative to the repository) as a fresh module."""
    path = ROOT / relative
    name = "script_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing resolve names through the module's entry
    spec.loader.exec_module(module)
    return module


def stage_main(name: str):
    """The ``main`` of ``stages/<name>.py``."""
    return load_script(f"stages/{name}.py").main
