"""The seed statistics of `make bench` (vspa.reporting.seeds) on hand-made metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vspa.reporting import seeds

from loaders import ROOT, load_script


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    assert seeds.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError):
        seeds.t_quantile(0.4, 3)
    with pytest.raises(ValueError):
        seeds.t_quantile(0.975, 0)


def test_paired_difference_hand_computed():
    a, b = {0: 3.0, 1: 5.0, 2: 4.0, 7: 9.0}, {0: 1.0, 1: 2.0, 2: 3.0}  # seed 7 has no pair: left out
    d = seeds.paired(a, b)
    assert d["seeds"] == [0, 1, 2] and d["diffs"] == [2.0, 3.0, 1.0]
    assert d["mean"] == pytest.approx(2.0) and d["sd"] == pytest.approx(1.0)
    assert d["half_width"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-3)  # 2.484: the interval holds 0
    assert d["ci"][0] < 0 < d["ci"][1] and d["verdict"] == "not shown"
    tight = seeds.paired({s: 10.0 + 0.1 * (s % 2) for s in range(6)}, {s: 8.0 for s in range(6)})
    assert tight["ci"][0] > 0 and tight["verdict"] == "shown"
    worse = seeds.paired({s: 8.0 for s in range(6)}, {s: 10.0 + 0.1 * (s % 2) for s in range(6)})
    assert worse["ci"][1] < 0 and worse["verdict"] == "shown"  # shown also when the row is worse
    single = seeds.paired({0: 5.0}, {0: 1.0})
    assert single["mean"] == 4.0 and single["ci"] is None and single["verdict"] == "not shown"


def test_seeds_needed_inverts_the_half_width():
    n = seeds.seeds_needed(2.7, 2.0)
    assert seeds.t_quantile(0.975, n - 1) * 2.7 / math.sqrt(n) <= 2.0
    assert seeds.t_quantile(0.975, n - 2) * 2.7 / math.sqrt(n - 1) > 2.0
    assert n == 10


def test_summary_table_and_gap_closed():
    results = {
        s: {
            "source_on_target": {"mAP": 20.0 + s, "AP": {"car": 20.0, "person": None}},
            "at_like": {"mAP": 44.0 + s, "AP": {"car": 50.0 + s, "person": 30.0}},
            "vspa": {"mAP": 46.0 + s + 0.5 * (s == 1), "AP": {"car": 54.0, "person": 34.0}},
            "oracle_on_target": {"mAP": 70.0 + s, "AP": {"car": 70.0, "person": 60.0}},
        }
        for s in (0, 1, 2)
    }
    rows = ["source_on_target", "at_like", "vspa", "oracle_on_target"]
    summary = seeds.summarise(results, rows, ["at_like", "fair_source"])  # no fair_source row: no table for it
    assert list(summary["paired"]) == ["at_like"]
    assert summary["rows"]["at_like"]["mAP"]["mean"] == pytest.approx(45.0)
    assert summary["rows"]["at_like"]["mAP"]["std"] == pytest.approx(1.0)
    assert summary["rows"]["source_on_target"]["AP"]["person"]["n"] == 0  # no AP (no object): not averaged
    d = summary["paired"]["at_like"]["vspa"]
    assert d["diffs"] == pytest.approx([2.0, 2.5, 2.0]) and d["verdict"] == "shown"
    assert seeds.gap_closed(summary)["vspa"] == pytest.approx(100 * (47.1667 - 21.0) / 50.0, abs=1e-3)
    text = seeds.render(summary, {"vspa": "VSPA"})
    assert "| VSPA | 3 | 54.0 ± 0.0 | 34.0 ± 0.0 | 47.2 ± 1.0 | 46.0, 47.5, 48.0 |" in text
    assert "| VSPA | 3 | +2.17 | 0.29 |" in text and "| shown |" in text


def test_plot_differences_writes_a_png(tmp_path):
    results = {s: {"at_like": {"mAP": 40.0 + s, "AP": {}}, "vspa": {"mAP": 41.0 + 2 * s, "AP": {}}} for s in range(3)}
    summary = seeds.summarise(results, ["at_like", "vspa"], ["at_like"])
    seeds.plot_differences(summary, tmp_path / "d.png", {})
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_every_chain_step_reads_the_bench_data_folder(tmp_path, monkeypatch):
    """A chain with --data elsewhere must train and evaluate on that folder: no step may fall back to a stage
    script's default data/benchmark path (the diversity study's first run did, training on the standard data)."""
    bench, root = _bench_module()
    data = tmp_path / "other_data"
    monkeypatch.setattr(bench, "DATA", data)
    calls = []

    def fake_run(self, step, args, output):
        calls.append((step, args))
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        if step.startswith("evaluate"):
            output.write_text(json.dumps({"mAP": 1.0, "AP": {"car": 1.0}}))
        elif step.startswith("adapt"):
            logs = Path(args[args.index("--log-dir") + 1])
            logs.mkdir(parents=True, exist_ok=True)
            (logs / "diagnostics.json").write_text("{}")

    monkeypatch.setattr(bench.Chain, "run", fake_run)
    params = tmp_path / "params.yaml"
    params.write_text((root / "params.yaml").read_text())
    chain = bench.Chain(0, list(bench.ORDER), params, tmp_path / "out", tmp_path / "work", 1, 0)
    chain.go()
    assert json.loads((tmp_path / "out" / "seed0" / "code.json").read_text())["commit"]
    by_step = dict(calls)
    assert {"pretrain", "oracle", "extract_memory", "adapt_vspa", "adapt_at_like"} <= set(by_step)
    for step, args in calls:
        if step == "subsample":
            continue  # reads the memory file only
        paths = [a for a in args if a.startswith(str(data))]
        assert paths, f"{step} reads no file under --data: {args}"
        if step.startswith("adapt"):
            assert {str(data / "source_train"), str(data / "target_train")} <= set(args)


def _bench_module():
    return load_script("benchmarks/bench_rows.py"), ROOT


def test_a_finished_seed_keeps_its_other_rows_and_its_params_check(tmp_path):
    """A seed finished with more rows (fair source, MILA-like) keeps them in the table when a later call asks for
    fewer; a params file that differs only in sections the bench does not read is accepted, one that differs in
    the adaptation is refused."""
    import yaml

    bench, root = _bench_module()
    params = tmp_path / "params.yaml"
    params.write_text((root / "params.yaml").read_text())
    out, work = tmp_path / "out", tmp_path / "work"
    bench.Chain(0, ["at_like"], params, out, work, 1, 200)  # writes seed0/params.yaml
    for split in ("metrics", "metrics_val"):
        for row, value in (("at_like", 40.0), ("vspa", 42.0), ("fair_source", 30.0), ("mila_like", 41.0)):
            f = out / "seed0" / split / f"{row}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"mAP": value, "AP": {}}))
    got = bench.Chain(0, ["at_like", "vspa"], params, out, work, 1, 200).finished()
    assert set(got["test"]) == {"at_like", "vspa", "fair_source", "mila_like"}
    assert bench.Chain(0, ["at_like", "oracle_on_target"], params, out, work, 1, 200).finished() is None

    p = yaml.safe_load(params.read_text())
    p.setdefault("translate", {})["lambda_ga"] = 0.5  # not read by any bench run
    params.write_text(yaml.safe_dump(p, sort_keys=False))
    bench.Chain(0, ["at_like"], params, out, work, 1, 200)
    p["adapt"]["lr"] = 123.0
    params.write_text(yaml.safe_dump(p, sort_keys=False))
    with pytest.raises(bench.VspaError, match="other params"):
        bench.Chain(0, ["at_like"], params, out, work, 1, 200)


def test_code_summary_groups_seeds_by_commit(tmp_path):
    bench, _ = _bench_module()
    for s, commit, dirty in ((0, "a" * 40, False), (1, "a" * 40, False), (2, "b" * 40, True)):
        (tmp_path / f"seed{s}").mkdir()
        (tmp_path / f"seed{s}" / "code.json").write_text(json.dumps({"commit": commit, "dirty": dirty}))
    assert bench.code_summary(tmp_path, [0, 1, 2, 3]) == (
        "seeds 0, 1 at aaaaaaa; seed 2 at bbbbbbb (tree differed); seed 3 at unknown"
    )
    assert bench.code_version()["commit"] != "unknown"


_WRITE_TABLES = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from loaders import load_script
bench = load_script("benchmarks/bench_rows.py")
out = Path(sys.argv[1])
results = {{}}
for s in (0, 1, 2):
    m = lambda v: {{"mAP": v, "AP": {{"car": v}}}}
    rows = {{"fair_source": m(30.0 + s), "at_like": m(40.0 + 2 * s), "vspa": m(42.0 + s * s)}}
    budget = {{f"{{r}}@{{i}}": m(v.get("mAP") - 600 / i + s) for r, v in rows.items() for i in (200, 400)}}
    results[s] = {{"test": rows, "val": rows, "budget": budget}}
meta = {{"command": "t", "jobs": 1, "threads": 1, "machine": "m", "torch": "t"}}
bench.write_tables(results, out, meta)
"""


def test_budget_table_is_the_same_under_any_hash_seed(tmp_path):
    """budget_val.md lists its reference sections in the rows' fixed order: it once iterated a set of strings, so
    two runs of the same seeds (other PYTHONHASHSEED) wrote the sections in another order."""
    import os
    import subprocess
    import sys

    script = tmp_path / "write.py"
    script.write_text(_WRITE_TABLES.format(tests=str(ROOT / "tests")))
    texts = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"out{hash_seed}"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, MPLBACKEND="Agg")
        subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, cwd=ROOT)
        texts.append((out / "budget_val.md").read_text())
    assert texts[0] == texts[1]
    refs = [line.split("**")[1] for line in texts[0].splitlines() if line.startswith("Paired mAP difference")]
    assert refs == ["fair_source@final", "at_like@final", "vspa@final"]


def _rows_json(values: dict[str, dict[str, float]], precision: dict[str, dict[str, float]] | None = None) -> dict:
    rows = {}
    for row, vals in values.items():
        v = list(vals.values())
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        rows[row] = {"mAP": {"n": len(v), "mean": mean, "std": std, "values": vals}}
    return {
        "test": {"rows": rows, "paired": {}},
        "teacher_drift": {r: {"precision": p} for r, p in (precision or {}).items()},
    }


def test_compare_rows_pairs_seeds_against_the_base_spread(tmp_path):
    compare_rows = load_script("benchmarks/compare_rows.py")
    base = _rows_json(
        {"at_like": {"0": 40.0, "1": 44.0, "2": 48.0}, "vspa": {"0": 50.0, "1": 52.0}},
        {"at_like": {"0": 0.9, "1": 0.5}, "vspa": {"0": 0.9, "1": 0.8}},
    )
    new = _rows_json(
        {"at_like": {"0": 42.0, "1": 43.0}, "vspa": {"1": 51.0, "5": 70.0}, "oracle_on_target": {"0": 77.0}},
        {"at_like": {"0": 0.8, "1": 0.6}, "vspa": {"1": 0.4, "5": 0.9}},
    )
    out = compare_rows.compare(base, new)
    assert set(out) == {"at_like", "vspa"}  # the oracle is not in the base run
    a = out["at_like"]
    assert a["seeds"] == ["0", "1"] and a["diff"] == {"0": 2.0, "1": -1.0}
    assert a["base_std"] == pytest.approx(4.0) and a["mean_diff"] == pytest.approx(0.5)
    assert a["max_abs_diff_in_std"] == pytest.approx(0.5)
    assert a["pseudo_precision"] == {"base": {"0": 0.9, "1": 0.5}, "new": {"0": 0.8, "1": 0.6}}
    assert out["vspa"]["seeds"] == ["1"] and out["vspa"]["diff"] == {"1": -1.0}  # seed 5 has no base
    md = compare_rows.to_markdown(out, Path("b.json"), Path("n.json"), "test")
    assert "| 0 | 40.0 | 42.0 | +2.0 | 0.50 |" in md
    # the precision table spans the seeds of every row: seed 0 has no VSPA pair, seed 1 has both rows
    assert "| Method | seed 0 | seed 1 |" in md
    assert "| 0.90 / 0.80 | 0.50 / 0.60 |" in md and "| - | 0.80 / 0.40 |" in md
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "n.json").write_text(json.dumps({"test": {"rows": {}}}))
    with pytest.raises(SystemExit):  # no common row: a clear error, not an empty table
        compare_rows.main(base=tmp_path / "b.json", new=tmp_path / "n.json", out=tmp_path / "o", split="test")
    assert not (tmp_path / "o").exists()


def test_bench_iteration_report_gives_both_speed_ups():
    bench = load_script("benchmarks/bench_iteration.py")
    seconds = {
        "old": {"pretrain": [0.2, 0.3, 0.24], "adapt": [0.5, 0.5, 0.5]},
        "new": {"pretrain": [0.1, 0.2, 0.3], "adapt": [0.25, 0.5, 0.4]},
    }
    # per repetition old / new: 2.0, 1.5, 0.8 -> median 1.5; ratio of medians 0.24 / 0.2 = 1.2
    assert bench.paired_speedup(seconds, "pretrain") == pytest.approx(1.5)
    assert bench.paired_speedup(seconds, "adapt") == pytest.approx(1.25)
    result = {
        "command": "python benchmarks/bench_iteration.py --reps 3",
        "machine": "x86_64 2 cores",
        "torch": "2.x",
        "threads": 2,
        "reps": 3,
        "windows": {"pretrain": [10, 60], "adapt": [5, 55]},  # as read back from the JSON: lists
        "old": {"revision": "050fbb5", "commit": "050fbb5" + "0" * 33},
        "new": {"revision": "HEAD", "commit": "abcdef1" + "0" * 33, "amp": True},
        "seconds_per_iteration": seconds,
        "median": {"pretrain": {"old": 0.24, "new": 0.2}, "adapt": {"old": 0.5, "new": 0.4}},
        "speedup": {"pretrain": 1.2, "adapt": 1.25},
    }
    md = bench.markdown(result)
    assert "new (HEAD = abcdef1, amp: true (bfloat16 autocast)) code timed in one run on cpu" in md
    assert "| pretrain (batch 4, 10->60 its) | 0.240 | 0.200 | 1.20x | 1.50x | 0.200, 0.300, 0.240 |" in md
    assert "| adapt VSPA (2+2 images, 5->55 its) | 0.500 | 0.400 | 1.25x | 1.25x |" in md
    # data threads named per version when set (--old-data-workers / --new-data-workers), and the device
    result["old"]["data_workers"], result["new"]["data_workers"], result["device"] = 0, 1, "cuda"
    md = bench.markdown(result)
    assert "old (050fbb5 = 050fbb5, 0 data threads) and new (HEAD = abcdef1, amp: true" in md
    assert "autocast), 1 data thread) code timed in one run on cuda" in md
