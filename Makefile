# `make demo` and `make test` work on a fresh clone with only python3: the first run creates
# .venv and installs the project with its dev extra; later runs reuse it until
# pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# No downloads at run time: tests and the demo use the project's own tiny model.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test bench quality install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py --config configs/demo.yaml

# Lint (ruff) and the layers contract (import-linter, docs/architecture.md) first: both take
# seconds and fail the build on a violation, before the 12-minute suite starts.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra --durations=15

# Every CPU benchmark, each appending its figures to BENCHMARKS.md (about 4 minutes on 2 cores, 2026-11-30).
# The GPU benchmark (bench/gpu.py) runs only where a GPU is: see bench/README.md.
bench: $(STAMP)
	$(BIN)/python bench/annotate.py
	$(BIN)/python bench/infer.py --record
	$(BIN)/python bench/train.py --steps 12
	$(BIN)/python bench/score.py --record
	$(BIN)/python bench/serve.py --record

# Does the trained model learn? The real path (annotate -> train the small model for two seeds
# -> evaluate held-out, with chance and a shuffled-image control): 59 minutes on 2 cores (2026-12-01).
# Writes bench/results/quality.json and a BENCHMARKS.md section.
quality: $(STAMP)
	$(BIN)/python bench/quality.py

clean:
	rm -rf demo_out .pytest_cache
