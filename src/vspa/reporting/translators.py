"""The translator rows over seeds: mean ± std per variant, paired differences with 95% intervals
(:mod:`vspa.reporting.seeds`), and the per-run diagnostics that say whether the local-global loss learns and the
attention masks split (``reports/translate/seed<S>/<variant>_diagnostics.json``).

A seed fixes the crops, views and initialisations of every variant (the translator's seed streams), and the
frozen source detector is the same for all, so the rows of one seed are paired.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vspa.reporting.seeds import render, summarise
from vspa.utils import VspaError

VARIANTS = ("cut", "attention", "attention_lg")
DESCRIPTIONS = {
    "source_on_target": "Source only (no adaptation, no translator)",
    "cut": "Translator without attention (CUT-like) + frozen source detector",
    "attention": "Attention translator, no local-global loss + frozen source detector",
    "attention_lg": "Attention translator + local-global loss + frozen source detector",
}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise VspaError(
            f"{path}: missing. Run `dvc repro report_translate` (it runs the stage that writes it)."
        ) from exc
    except json.JSONDecodeError as exc:
        raise VspaError(f"{path}: not valid JSON ({exc}). Rerun the stage that writes it.") from exc


def collect(
    metrics_dir: Path,
    diagnostics_dir: Path,
    seeds: list[int],
    source_row: str = "source_on_target",
    variants: tuple[str, ...] = VARIANTS,
) -> tuple[dict, dict]:
    """``(results[seed][row] metrics, diagnostics[seed][variant])`` from ``<metrics_dir>/translate_<variant>_s<S>.json``,
    ``<metrics_dir>/<source_row>.json`` (the same frozen detector for every seed) and
    ``<diagnostics_dir>/seed<S>/<variant>_diagnostics.json``."""
    source = _read(metrics_dir / f"{source_row}.json")
    results, diagnostics = {}, {}
    for seed in seeds:
        results[seed] = {"source_on_target": source}
        diagnostics[seed] = {}
        for variant in variants:
            results[seed][variant] = _read(metrics_dir / f"translate_{variant}_s{seed}.json")
            diagnostics[seed][variant] = _read(diagnostics_dir / f"seed{seed}" / f"{variant}_diagnostics.json")
    return results, diagnostics


def _get(d: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _f(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render_translators(results: dict, diagnostics: dict, variants: tuple[str, ...] = VARIANTS) -> tuple[str, dict]:
    """Markdown (rows, paired differences against CUT-like and against attention, diagnostics per run) and the
    summary as a dict."""
    rows = ["source_on_target", *variants]
    summary = summarise(results, rows, references=["cut", "attention"])
    text = render(summary, DESCRIPTIONS)
    text = text.replace(
        "over training seeds; a seed fixes the\nsource detector and every run made from it",
        "over translator seeds; a seed fixes every translator's crops,\nviews and initialisation "
        "(the source detector is the same frozen one)",
    )
    lines = [
        "",
        "Diagnostics per run (`<variant>_diagnostics.json`): L_GA and PatchNCE over the first and last 10% of "
        "the iterations; the attention masks at the end: mean per-pixel entropy (max ln 10 = 2.303), the "
        "background mask inside / outside the annotated boxes; L_GA's view separation at the end (cosine of "
        "two views of one image minus that of two images).",
        "",
        "| variant | seed | L_GA first -> last | PatchNCE first -> last | mask entropy | bg mask on / off objects "
        "| L_GA same - diff |",
        "|---|---:|---|---|---:|---|---:|",
    ]
    for variant in variants:
        for seed in sorted(diagnostics):
            d = diagnostics[seed].get(variant, {})
            ga = (_get(d, "losses", "loss_GA", "first_10pct"), _get(d, "losses", "loss_GA", "last_10pct"))
            nce = (_get(d, "losses", "loss_NCE", "first_10pct"), _get(d, "losses", "loss_NCE", "last_10pct"))
            final = _get(d, "final") or {}
            lines.append(
                f"| {variant} | {seed} | {_f(ga[0], '.2f')} -> {_f(ga[1], '.2f')} | {_f(nce[0], '.2f')} -> "
                f"{_f(nce[1], '.2f')} | {_f(final.get('mask_entropy'))} | {_f(final.get('bg_on_objects'))} / "
                f"{_f(final.get('bg_off_objects'))} | {_f(final.get('lg_gap'))} |"
            )
    return text + "\n".join(lines) + "\n", summary
