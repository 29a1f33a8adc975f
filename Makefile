# Two commands for a fresh machine with Python 3.11:  make run   and   make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# GPU=1 (e.g. make venv GPU=1): TensorFlow with its CUDA libraries, from requirements-gpu.txt.
REQUIREMENTS := requirements$(if $(GPU),-gpu).txt
STAMP := $(VENV)/.installed$(if $(GPU),-gpu)
# Sony's IMX500 converter cannot share .venv with MCT 2.6.1: it gets a virtual environment of its own.
IMX_VENV := .venv-imx500
IMX_STAMP := $(IMX_VENV)/.installed

.PHONY: venv run test test-fast lint format lab bench bench-scale clean

# (Re)install only when the virtual environment is missing or older than the requirements.
$(STAMP): $(REQUIREMENTS) requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info[:2] == (3, 11), \
		"Python 3.11 is required (TensorFlow 2.15 + MCT 2.6.1); got " + sys.version' \
		|| { echo "Recreate with: make clean && make PYTHON=python3.11 ..."; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(REQUIREMENTS) -e .
	@touch $(STAMP)

$(IMX_STAMP): requirements-imx500.txt
	@test -x $(IMX_VENV)/bin/python || $(PYTHON) -m venv $(IMX_VENV)
	$(IMX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(IMX_VENV)/bin/python -m pip install --quiet -r requirements-imx500.txt
	@touch $(IMX_STAMP)
	@command -v java >/dev/null || echo "Note: the IMX500 converter needs Java 17+ on the PATH \
		(Debian/Ubuntu: sudo apt-get install openjdk-17-jre-headless)."

venv: $(STAMP) $(IMX_STAMP)

## Run the notebook headless on configuration.json, keep the executed copy, print Top-1.
run: venv
	$(BIN)/python -m tl_helpers.run_notebook image_classification.ipynb \
		--output output/image_classification.executed.ipynb

## The test suite (unit tests, notebook runs through nbclient, one end-to-end run on real photos),
## one pytest-xdist worker per core: much of a test's time is spent starting kernels, processes
## and the converter, so two workers on 2 cores take about 0.6 of one. TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto
test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

## Unit tests only: no notebook kernel, no MCT, no extra TensorFlow processes (see the markers
## in pyproject.toml).
test-fast: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow and not notebook and not mct and not distributed and not savedmodel"

## The benchmark (not a test; 15-40 minutes on 2 cores, on a quiet machine): this project vs
## the per-epoch procedure vs the floor on ../shared/datasets/flowers128; results in bench/out/,
## table and chart published to docs/benchmark/ and docs/performance.md.
## Quick check of the script: make bench BENCH_ARGS="--limit-per-class 20 --epochs 2"
BENCH_ARGS ?= --publish --repeat 2
bench: venv
	$(BIN)/python bench/benchmark.py $(BENCH_ARGS)

## The feature pass at scale: 100,000 generated JPEGs (bench/out/scale/data, about 1 GB), first
## run, unchanged re-run, 1 % changed; then flowers128 itself for comparison. Hours on 2 cores.
bench-scale: venv
	$(BIN)/python bench/scale.py --images 100000
	$(BIN)/python bench/scale.py --images 4317 --source-only

lint: venv
	$(BIN)/ruff check tl_helpers tests bench samples
	$(BIN)/ruff format --check tl_helpers tests bench samples

format: venv
	$(BIN)/ruff format tl_helpers tests bench samples
	$(BIN)/ruff check --fix tl_helpers tests bench samples

lab: venv
	$(BIN)/jupyter lab image_classification.ipynb

clean:
	rm -rf $(VENV) $(IMX_VENV) output .pytest_cache
