# The two sacred commands: `make demo` and `make test`. Each sets up .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINTED := src tests benchmarks scripts conftest.py

.PHONY: demo test docs lint bench readme-figures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/invsim demo

test: $(STAMP)
	bash scripts/ensure-chromium.sh
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest src tests
	$(MAKE) docs

# the docs site (mkdocs-material + mkdocstrings) into site/, warnings as errors
docs: $(STAMP)
	$(BIN)/python scripts/docs_pages.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

bench: $(STAMP)
	$(BIN)/python -m pip install -e '.[dev,bench]'
	$(BIN)/python benchmarks/bench_cka.py
	$(BIN)/python benchmarks/bench_inversion.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_startup.py
	$(BIN)/python benchmarks/bench_measures.py
	$(BIN)/python benchmarks/bench_calibration.py
	$(BIN)/python benchmarks/bench_passes.py
	$(BIN)/python benchmarks/bench_layers.py
	$(BIN)/python benchmarks/bench_layer_coverage.py
	$(BIN)/python benchmarks/bench_convergence.py --demo-dir runs/demo   # trains the demo zoo if missing

readme-figures: $(STAMP)
	$(BIN)/python scripts/readme_figures.py

clean:
	rm -rf $(VENV) build site docs/generated *.egg-info src/*.egg-info
