# The two commands of the README. Both create .venv on first use and reinstall only when
# pyproject.toml changes (the stamp file .venv/.installed records the last install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc runs each stage's `python ...` through the shell: the venv's interpreter must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: params repro augsim translate test format test-slow bench bench-diversity bench-iteration real-scale gpu-check smoke-real readme clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

repro: $(STAMP)
	@test -d .dvc || $(BIN)/dvc init --quiet
	$(BIN)/dvc repro report evaluate@source_on_source

# The visual-similarity experiment (AugSim -> FoggyAugSim, one adaptation run per pairing mode):
# reports/augsim/{table.md,results.json,bar.png}. Not part of `repro`.
augsim: $(STAMP)
	@test -d .dvc || $(BIN)/dvc init --quiet
	$(BIN)/dvc repro augsim_report

# The second system over translator seeds 0-2 (three variants): reports/translate/seeds.md and
# reports/comparison_all.md. Not part of `repro` (about an hour on 2 cores, one thread per translator).
translate: $(STAMP)
	@test -d .dvc || $(BIN)/dvc init --quiet
	$(BIN)/dvc repro report_all report_translate

test: $(STAMP)
	$(BIN)/ruff check src stages benchmarks tests conf
	$(BIN)/ruff format --check src stages benchmarks tests conf
	$(BIN)/python -m pytest -q

# The formatter `make test` checks (ruff format, pyproject.toml [tool.ruff.format]); then `make test`.
format: $(STAMP)
	$(BIN)/ruff format src stages benchmarks tests conf
	$(BIN)/ruff check --fix src stages benchmarks tests conf

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# params.yaml = Hydra's composition of conf/ (what `dvc exp run -S ...` writes); run after editing conf/ or a
# scenario file (conf/scenario/ = src/vspa/presets/). `make params SCENARIO=sim10k_cityscapes` for another one.
params: $(STAMP)
	$(BIN)/vspa params $(if $(SCENARIO),scenario=$(SCENARIO),)

# The comparison protocol: every row over paired training seeds (a seed fixes the source detector and every
# run made from it), two seed chains at a time, each process pinned to one thread; paired differences with 95%
# intervals in reports/bench/rows/rows.md. Slow (about 15 min per seed of the core rows on 2 cores, 25 with the
# extra rows); resumable: a seed whose metrics are committed is not run again. SEEDS / EXTRA_SEEDS to change.
SEEDS ?= 0-17
EXTRA_SEEDS ?= 0-2
bench: $(STAMP)
	@test -d .dvc || $(BIN)/dvc init --quiet
	$(BIN)/dvc repro prepare
	$(BIN)/python benchmarks/bench_rows.py --seeds $(SEEDS) --extra-seeds $(EXTRA_SEEDS)

# Where instance-level alignment should matter: AT-like, MILA-like and VSPA at high within-class appearance
# diversity (prepare.diversity: high) beside make bench's standard rows -> reports/bench/diversity/diversity.md.
# Slow (about 40 min per seed on one core); DIV_SEEDS to change.
DIV_SEEDS ?= 0-2
bench-diversity: $(STAMP)
	@test -d .dvc || $(BIN)/dvc init --quiet
	$(BIN)/dvc repro prepare
	$(BIN)/python benchmarks/diversity_study.py --seeds $(DIV_SEEDS)

# Measured CPU seconds per iteration, peak RSS, extraction rows/s and checkpoint sizes of each real-data preset
# at its real image size and batch (smoke fixtures, random backbones) -> reports/bench/real_scale.md.
# ADAPT_BATCH=2: adaptation at 2+2 images (the committed table; 4+4 needs more than this 24 GB machine).
real-scale: $(STAMP)
	$(BIN)/python benchmarks/real_scale.py $(if $(ADAPT_BATCH),--adapt-batch $(ADAPT_BATCH),)

# On a GPU node, before a long run: every training stage for 30 iterations on CUDA (finite losses, seconds per
# iteration, peak GPU memory) -> reports/bench/gpu_check/gpu_check.md. `make gpu-check AMP=1`: mixed precision.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --device cuda $(if $(AMP),--amp,)

# Each real-data preset through the real dvc.yaml (prepare ... report) at its real image size, on tiny
# generated datasets in the real folder layouts with randomly initialised backbones: reports/bench/smoke_real.md.
# Slow (11-15 min per preset on one thread); SCENARIOS=cityscapes_foggy,... to run some.
smoke-real: $(STAMP)
	$(BIN)/python benchmarks/smoke_real.py $(if $(SCENARIOS),--scenarios $(SCENARIOS),)

# Seconds per pretrain and VSPA adaptation iteration of two git revisions timed side by side in one run
# (OLD=050fbb5 NEW=HEAD by default) -> reports/bench/bench_iteration.md; AMP=1 runs NEW with amp: true (bfloat16 on
# the CPU) -> reports/bench/bench_iteration_amp/. Needs `dvc repro subsample` first; run alone.
OLD ?= 050fbb5
NEW ?= HEAD
bench-iteration: $(STAMP)
	$(BIN)/python benchmarks/bench_iteration.py --old $(OLD) --new $(NEW) \
		$(if $(AMP),--new-amp --out reports/bench/bench_iteration_amp,)

# README tables are copies of the reports' tables (a `<!-- table: PATH -->` marker above each): refresh them.
readme: $(STAMP)
	$(BIN)/python -m vspa.reporting.readme README.md

clean-venv:
	rm -rf $(VENV)
